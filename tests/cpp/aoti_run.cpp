// A C++ program that runs an AOTInductor package of a fused model (docs/export.md): linked with
// libmvit2_ops, which registers the mvit2:: ops the package calls, it loads the .pt2, runs it on
// the input that tests/cpp/make_aoti_package.py saved, checks the output against the eager
// model's, and counts the fused ops the run called (through the dispatcher's RecordFunction).
//
//   mvit2_aoti_run model.pt2 input.pt expected.pt
#include <ATen/record_function.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <atomic>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string_view>

namespace {

std::atomic<int> fused_calls{0};

// A tensor saved by Python's torch.save.
at::Tensor read_tensor(const char* path) {
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: mvit2_aoti_run model.pt2 input.pt expected.pt\n";
    return 2;
  }
  at::addGlobalCallback(at::RecordFunctionCallback(
      [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
        if (std::string_view(fn.name()).substr(0, 7) == "mvit2::") {
          ++fused_calls;
        }
        return nullptr;
      }));

  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const auto x = read_tensor(argv[2]);
  const auto expected = read_tensor(argv[3]);
  const auto outputs = loader.run({x});
  const double err = (outputs.at(0) - expected).abs().max().item<double>() /
                     expected.abs().max().item<double>();
  std::cout << "mvit2_aoti_run: output " << outputs.at(0).sizes() << ", max rel error " << err
            << ", fused op calls " << fused_calls.load() << "\n";
  if (!(err <= 1e-4)) {
    std::cerr << "mvit2_aoti_run: the package's output differs from the eager model's\n";
    return 1;
  }
  if (fused_calls.load() == 0) {
    std::cerr << "mvit2_aoti_run: the package called no mvit2:: op\n";
    return 1;
  }
  return 0;
}
