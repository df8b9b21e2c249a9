// The op library: schemas shared by every backend (CPU and CUDA here, Triton in Python), and the
// pybind11 module that Python imports to load them.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(mvit2, m) {
  // y = relu(v) * sum_n softmax_N(q) * k; ctx [B, C, P, 1] is kept (in float32, or float64) for
  // the backward.
  m.def("separable_attention_forward(Tensor q, Tensor k, Tensor v) -> (Tensor y, Tensor ctx)");
  m.def(
      "separable_attention_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor ctx)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "mvit2_kernels compiled ops (registered under torch.ops.mvit2)";
#ifdef MVIT2_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
