// C++ users' view of the op library: find the op by name, run it, check it against the maths.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mvit2::separable_attention_forward", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&)>();
  const auto qkv = at::randn({2, 1 + 2 * 3, 4, 37});
  const auto parts = qkv.split_with_sizes({1, 3, 3}, 1);
  const auto [y, ctx] = op.call(parts[0], parts[1], parts[2]);
  const auto expected = at::relu(parts[2]) * (at::softmax(parts[0], -1) * parts[1]).sum(-1, true);
  if (!at::allclose(y, expected, 1e-5, 1e-6)) {
    std::cerr << "mvit2_smoke: forward differs from the reference\n";
    return 1;
  }
  std::cout << "mvit2_smoke: ok\n";
  return 0;
}
