// Argument checks shared by every C++/CUDA backend of the ops (the Python wrappers check the same
// things first, with friendlier messages; these keep direct torch.ops calls safe).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/narrow.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <utility>

namespace mvit2 {

#define MVIT2_CHECK_FLOAT(x)                                                              \
  TORCH_CHECK_TYPE(                                                                       \
      (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||              \
          (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,           \
      #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())

#define MVIT2_CHECK_SAME(x, ref)                                                          \
  TORCH_CHECK_TYPE((x).scalar_type() == (ref).scalar_type(), #x " must have dtype ",      \
                   (ref).scalar_type(), " like " #ref ", got ", (x).scalar_type());       \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x " must be on ", (ref).device(),    \
                    " like " #ref ", got ", (x).device())

#define MVIT2_CHECK_SHAPE(x, ...)                                                         \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

// q: [B, 1, P, N], k and v: [B, C, P, N], all of one float dtype on one device.
inline void check_separable_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v) {
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be [B, C, P, N], got shape ", k.sizes());
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  MVIT2_CHECK_FLOAT(k);
  MVIT2_CHECK_SAME(q, k);
  MVIT2_CHECK_SAME(v, k);
  MVIT2_CHECK_SHAPE(q, B, 1, P, N);
  MVIT2_CHECK_SHAPE(v, B, C, P, N);
}

// Whether the memory spans of a and b in one storage meet (conservative for strided tensors).
// at::assert_no_overlap gives up ("too hard") on views such as the q, k, v of one qkv.
inline bool spans_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto* begin = static_cast<const char*>(t.const_data_ptr());
    return std::pair{begin, begin + (last + 1) * static_cast<int64_t>(t.element_size())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// y of separable_attention_forward_out: where the forward op would put it, and not over an input
// (the kernels read the inputs while they write y).
inline void check_separable_attention_out(const at::Tensor& y, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& v) {
  MVIT2_CHECK_SAME(y, k);
  MVIT2_CHECK_SHAPE(y, k.size(0), k.size(1), k.size(2), k.size(3));
  TORCH_CHECK_VALUE(y.is_contiguous(), "y must be contiguous");
  for (const auto& [name, input] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK_VALUE(!spans_meet(y, *input), "y shares memory with ", name,
                      ": the kernels read the inputs while they write it");
  }
}

inline void check_separable_attention_backward_inputs(const at::Tensor& grad_y,
                                                      const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& ctx) {
  check_separable_attention_inputs(q, k, v);
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  MVIT2_CHECK_SAME(grad_y, k);
  MVIT2_CHECK_SHAPE(grad_y, B, C, P, N);
  const auto acc = k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(ctx.scalar_type() == acc, "ctx must have dtype ", acc, ", got ",
                   ctx.scalar_type());
  TORCH_CHECK_VALUE(ctx.device() == k.device(), "ctx must be on ", k.device());
  MVIT2_CHECK_SHAPE(ctx, B, C, P, 1);
}

// qkv: [B, 1 + 2C, P, N] with an odd channel count >= 3 (the 1x1 convolution's output), split
// along dim 1 into the views q [B, 1, P, N], k and v [B, C, P, N]: no copies.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv(const at::Tensor& qkv) {
  TORCH_CHECK_VALUE(qkv.dim() == 4 && qkv.size(1) >= 3 && qkv.size(1) % 2 == 1,
                    "qkv must be [B, 1 + 2C, P, N] with an odd channel count >= 3, got shape ",
                    qkv.sizes());
  MVIT2_CHECK_FLOAT(qkv);
  const int64_t C = (qkv.size(1) - 1) / 2;
  return {at::narrow(qkv, 1, 0, 1), at::narrow(qkv, 1, 1, C), at::narrow(qkv, 1, 1 + C, C)};
}

// The kernels index the N axis with unit stride and everything else with the given strides, so
// the q/k/v views of one qkv tensor are read in place; only a strided last axis is copied.
inline at::Tensor unit_last_stride(const at::Tensor& x) {
  return (x.size(-1) <= 1 || x.stride(-1) == 1) ? x : x.contiguous();
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mvit2
