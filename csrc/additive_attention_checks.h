// Argument checks of the additive-attention ops, shared by the CPU and CUDA backends (the Python
// wrapper checks the same things first, with friendlier messages; these keep direct torch.ops
// calls memory-safe).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

#include "checks.h"

namespace mvit2 {

// F.normalize's default eps, which every published SwiftFormer uses for q, k and the weights.
constexpr double kAdditiveEps = 1e-12;

enum class AdditiveVariant { kNormalize, kSoftmax };

inline AdditiveVariant parse_additive_variant(c10::string_view variant) {
  if (variant == "normalize") return AdditiveVariant::kNormalize;
  TORCH_CHECK_VALUE(variant == "softmax", "variant must be \"normalize\" or \"softmax\", got \"",
                    variant, "\"");
  return AdditiveVariant::kSoftmax;
}

// The published scale_factor = token_dim ** -0.5 (token_dim = D); 0 for D = 0, where every token
// weight is an empty dot product (0, not 0 * inf).
inline double additive_scale(int64_t D) { return D > 0 ? 1.0 / std::sqrt(double(D)) : 0.0; }

// q, k: [B, N, D]; w_g: [D, 1]; one float dtype on one device.
inline void check_additive_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& w_g) {
  TORCH_CHECK_VALUE(k.dim() == 3, "k must be [B, N, D], got shape ", k.sizes());
  MVIT2_CHECK_FLOAT(k);
  MVIT2_CHECK_SAME(q, k);
  MVIT2_CHECK_SAME(w_g, k);
  MVIT2_CHECK_SHAPE(q, k.size(0), k.size(1), k.size(2));
  MVIT2_CHECK_SHAPE(w_g, k.size(2), 1);
}

inline void check_additive_attention_backward_inputs(const at::Tensor& grad_out,
                                                     const at::Tensor& grad_qn,
                                                     const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& w_g, const at::Tensor& g,
                                                     const at::Tensor& a_norm) {
  check_additive_attention_inputs(q, k, w_g);
  const int64_t B = k.size(0), N = k.size(1), D = k.size(2);
  MVIT2_CHECK_SAME(grad_out, k);
  MVIT2_CHECK_SAME(grad_qn, k);
  MVIT2_CHECK_SHAPE(grad_out, B, N, D);
  MVIT2_CHECK_SHAPE(grad_qn, B, N, D);
  const auto acc = acc_type(k.scalar_type());
  for (const at::Tensor* t : {&g, &a_norm}) {
    const char* name = t == &g ? "g" : "a_norm";
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, " must have dtype ", acc, ", got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == k.device(), name, " must be on ", k.device(), ", got ",
                      t->device());
  }
  MVIT2_CHECK_SHAPE(g, B, D);
  MVIT2_CHECK_SHAPE(a_norm, B);
}

}  // namespace mvit2
