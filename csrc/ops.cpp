// The op library: schemas shared by every backend (CPU and CUDA here, Triton in Python), and the
// pybind11 module that Python imports to load them (left out of the CMake build for C++ users).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

TORCH_LIBRARY(mvit2, m) {
  // y = relu(v) * sum_n softmax_N(q) * k; ctx [B, C, P, 1] is kept (in float32, or float64) for
  // the backward.
  m.def("separable_attention_forward(Tensor q, Tensor k, Tensor v) -> (Tensor y, Tensor ctx)");
  // The same into a preallocated y (contiguous [B, C, P, N], the dtype and device of k, sharing
  // no memory with q, k, v), for inference loops: a fresh large output costs the page faults of
  // its first write on every call. Not differentiable.
  m.def(
      "separable_attention_forward_out(Tensor q, Tensor k, Tensor v, Tensor(a!) y)"
      " -> Tensor ctx");
  m.def(
      "separable_attention_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor ctx)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
  // The same on the channel views of qkv [B, 1 + 2C, P, N] (q, k, v = qkv.split([1, C, C], 1)):
  // the backward writes dq, dk, dv into one contiguous dqkv shaped like qkv.
  m.def("separable_attention_qkv_forward(Tensor qkv) -> (Tensor y, Tensor ctx)");
  m.def(
      "separable_attention_qkv_backward(Tensor grad_y, Tensor qkv, Tensor ctx) -> Tensor dqkv");
  // SwiftFormer: (out, qn) = (G * kn, qn) with variant "normalize" or "softmax"; g = G [B, D] and
  // a_norm = ||a|| over N [B] are kept (float32, or float64) for the backward.
  m.def(
      "additive_attention_forward(Tensor q, Tensor k, Tensor w_g, str variant)"
      " -> (Tensor out, Tensor qn, Tensor g, Tensor a_norm)");
  m.def(
      "additive_attention_backward(Tensor grad_out, Tensor grad_qn, Tensor q, Tensor k,"
      " Tensor w_g, Tensor g, Tensor a_norm, str variant) -> (Tensor dq, Tensor dk, Tensor dw_g)");
  // The whole-layer fusion's two kernels (reference.py, separable_layer_*): the context pass
  // (s = softmax_N(w_q . x), xbar = sum_n s x; both float32, or float64) and the epilogue
  // (y = relu(v) * ctx). Inputs x, v and grad_y are contiguous; the GEMMs around them are
  // the library's.
  m.def("separable_layer_context_forward(Tensor x, Tensor w_q) -> (Tensor s, Tensor xbar)");
  m.def(
      "separable_layer_context_backward(Tensor grad_xbar, Tensor x, Tensor w_q, Tensor s,"
      " Tensor xbar) -> (Tensor dx, Tensor dw_q)");
  m.def("separable_layer_epilogue_forward(Tensor v, Tensor ctx) -> Tensor y");
  m.def(
      "separable_layer_epilogue_backward(Tensor grad_y, Tensor v, Tensor ctx)"
      " -> (Tensor dv, Tensor dctx)");
  // CPU only: the two projections around the epilogue in one tiled pass, GEMMs included
  // (v = w_v x + b_v, y = relu(v) * ctx, out = w_out y + b_out; v and y are also written when
  // keep, for the backward), and the backward's dy = w_out^T grad_out fused with the epilogue's
  // backward. w_v [C, D] and w_out [D_out, C] are 2-D.
  m.def(
      "separable_layer_project_forward(Tensor x, Tensor w_v, Tensor? b_v, Tensor ctx,"
      " Tensor w_out, Tensor? b_out, bool keep) -> (Tensor out, Tensor v, Tensor y)");
  m.def(
      "separable_layer_project_backward(Tensor grad_out, Tensor v, Tensor ctx, Tensor w_out)"
      " -> (Tensor dv, Tensor dctx)");
  // CPU only: the projections' gradients with the same GEMM: dw = sum over (b, p, n) of
  // grad (x) input, [O, I] in the accumulation dtype (dW_v from dv and x, dW_out from grad_out
  // and y), and dx += w^T dv in place (after the context backward has written dx).
  m.def("separable_layer_project_weight_backward(Tensor grad, Tensor input) -> Tensor dw");
  m.def("separable_layer_project_input_backward(Tensor(a!) dx, Tensor dv, Tensor w) -> ()");
}

// The op that writes y, as ATen's in-place ops do: at the Autograd key it refuses to record
// gradients (ATen's out= functions do too); at ADInplaceOrView, which also runs under
// inference mode for normal tensors, it bumps y's version, so that autograd notices a y it
// saved for a backward being overwritten.
namespace {
using ForwardOut = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              at::Tensor&);

const c10::TypedOperatorHandle<ForwardOut>& forward_out_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mvit2::separable_attention_forward_out", "")
                             .typed<ForwardOut>();
  return op;
}

at::Tensor separable_attention_forward_out_autograd(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, at::Tensor& y) {
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                    y.requires_grad()),
              "separable_attention_forward_out writes a given y and records no gradients, but "
              "one of q, k, v, y requires grad: call it under torch.no_grad()");
  for (const at::Tensor* t : {&q, &k, &v, static_cast<const at::Tensor*>(&y)}) {
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(),
                "separable_attention_forward_out writes a given y and records no forward-mode "
                "gradients, but one of q, k, v, y is a dual tensor");
  }
  const at::AutoDispatchBelowAutograd below;
  return forward_out_op().call(q, k, v, y);
}

at::Tensor separable_attention_forward_out_inplace(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, at::Tensor& y) {
  at::Tensor ctx;
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    ctx = forward_out_op().call(q, k, v, y);
  }
  torch::autograd::impl::bump_version(y);  // a no-op for an inference tensor in inference mode
  return ctx;
}
}  // namespace

TORCH_LIBRARY_IMPL(mvit2, Autograd, m) {
  m.impl("separable_attention_forward_out", &separable_attention_forward_out_autograd);
}
TORCH_LIBRARY_IMPL(mvit2, ADInplaceOrView, m) {
  m.impl("separable_attention_forward_out", &separable_attention_forward_out_inplace);
}

#ifndef MVIT2_NO_PYTHON
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "mvit2_kernels compiled ops (registered under torch.ops.mvit2)";
#ifdef MVIT2_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
#endif  // MVIT2_NO_PYTHON
