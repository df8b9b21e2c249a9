// Argument checks of the whole-layer fusion's kernels (context and epilogue), shared by the CPU
// and CUDA backends. The Python layer passes contiguous tensors it made itself; these keep direct
// torch.ops calls memory-safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace mvit2 {

#define MVIT2_CHECK_ACC(x, ref)                                                            \
  TORCH_CHECK_TYPE((x).scalar_type() == acc_type((ref).scalar_type()), #x " must have dtype ", \
                   acc_type((ref).scalar_type()), " (the accumulation dtype of " #ref "), got ", \
                   (x).scalar_type());                                                     \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x " must be on ", (ref).device(),     \
                    " like " #ref ", got ", (x).device());                                 \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")

#define MVIT2_CHECK_CONTIGUOUS_4D(x)                                                       \
  TORCH_CHECK_VALUE((x).dim() == 4, #x " must be a 4-D tensor, got shape ", (x).sizes()); \
  MVIT2_CHECK_FLOAT(x);                                                                    \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")

// x: [B, D, P, N] contiguous; w_q: [D] in x's dtype.
inline void check_layer_context_forward_inputs(const at::Tensor& x, const at::Tensor& w_q) {
  MVIT2_CHECK_CONTIGUOUS_4D(x);
  MVIT2_CHECK_SAME(w_q, x);
  MVIT2_CHECK_SHAPE(w_q, x.size(1));
  TORCH_CHECK_VALUE(w_q.is_contiguous(), "w_q must be contiguous");
}

// grad_xbar, xbar: [B, D, P] and s: [B, P, N], in the accumulation dtype.
inline void check_layer_context_backward_inputs(const at::Tensor& grad_xbar, const at::Tensor& x,
                                                const at::Tensor& w_q, const at::Tensor& s,
                                                const at::Tensor& xbar) {
  check_layer_context_forward_inputs(x, w_q);
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  MVIT2_CHECK_ACC(grad_xbar, x);
  MVIT2_CHECK_ACC(s, x);
  MVIT2_CHECK_ACC(xbar, x);
  MVIT2_CHECK_SHAPE(grad_xbar, B, D, P);
  MVIT2_CHECK_SHAPE(s, B, P, N);
  MVIT2_CHECK_SHAPE(xbar, B, D, P);
}

// v (and grad_y): [B, C, P, N] contiguous; ctx: [B, C, P] in the accumulation dtype.
inline void check_layer_epilogue_inputs(const at::Tensor& v, const at::Tensor& ctx) {
  MVIT2_CHECK_CONTIGUOUS_4D(v);
  MVIT2_CHECK_ACC(ctx, v);
  MVIT2_CHECK_SHAPE(ctx, v.size(0), v.size(1), v.size(2));
}

inline void check_layer_epilogue_backward_inputs(const at::Tensor& grad_y, const at::Tensor& v,
                                                 const at::Tensor& ctx) {
  check_layer_epilogue_inputs(v, ctx);
  MVIT2_CHECK_SAME(grad_y, v);
  MVIT2_CHECK_SHAPE(grad_y, v.size(0), v.size(1), v.size(2), v.size(3));
  TORCH_CHECK_VALUE(grad_y.is_contiguous(), "grad_y must be contiguous");
}

}  // namespace mvit2
