// Efficient additive attention (SwiftFormer), CPU. The maths is docs/design.md §2 (both published
// variants); mvit2_kernels/reference.py is the oracle.
//
// Forward: one pass over q per (batch, token chunk) writes qn and accumulates the chunk's
// unnormalised global query sum_n a[n] qn[n] and sum_n a[n]^2 (G is linear in the weights, so
// the normalisation over N can wait); a fixed-order sum of the chunks gives G and ||a|| per
// batch; one pass over k writes out = G * kn. Backward: one pass over (grad_out, k) writes dk and
// partial dG; one pass over (grad_qn, q) writes dq and partial dw_g. Each row of D is read from
// memory once and reused from L1 (see the kernels); the per-token norms are recomputed there
// instead of being saved.
#include "vec_isa.h"  // first: it configures at::vec

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../additive_attention_checks.h"
#include "outputs.h"
#include "row_ops.h"

namespace mvit2 {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T dot(const T* x, const T* y, int64_t D) {
  return at::vec::map2_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a * b; },
                                     [](Vec<T> a, Vec<T> b) { return a + b; }, x, y, D);
}

// Row n of batch b of a [B, N, D] tensor whose D axis has unit stride.
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1;
  T* operator()(int64_t b, int64_t n) const { return data + b * s0 + n * s1; }
};
template <typename T>
Rows<const T> rows_of(const at::Tensor& x) {
  return {x.const_data_ptr<T>(), x.stride(0), x.stride(1)};
}
template <typename T>
Rows<T> mutable_rows_of(at::Tensor& x) {
  return {x.mutable_data_ptr<T>(), x.stride(0), x.stride(1)};
}

// (batch, token chunk) tasks: enough to feed every thread at B = 1, at least 16 tokens each.
// A function of the shape alone, not of the thread count, so the fixed-order sums of the chunks'
// partials are the same on every run.
struct TokenChunks {
  int64_t count, size;
};
inline TokenChunks token_chunks(int64_t B, int64_t N) {
  constexpr int64_t kMinTasks = 64, kMinTokens = 16;
  const int64_t want = std::clamp<int64_t>((kMinTasks + B - 1) / std::max<int64_t>(B, 1), 1,
                                           std::max<int64_t>(1, N / kMinTokens));
  const int64_t size = std::max<int64_t>(1, (N + want - 1) / want);
  return {std::max<int64_t>(1, (N + size - 1) / size), size};
}

// w_g [D, 1] in the accumulation type, read with its stride (it is D values).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> load_w(const at::Tensor& w_g) {
  std::vector<at::opmath_type<scalar_t>> w(w_g.size(0));
  const scalar_t* p = w_g.const_data_ptr<scalar_t>();
  for (int64_t d = 0; d < w_g.size(0); ++d) w[d] = p[d * w_g.stride(0)];
  return w;
}

// max(x, eps) that keeps NaN, as torch's clamp_min: x < eps is false for NaN. (std::max(x, eps)
// would too, but only by its argument order; fmax would drop the NaN.)
template <typename acc_t>
inline acc_t clamp_eps(acc_t x) {
  return x < static_cast<acc_t>(kAdditiveEps) ? static_cast<acc_t>(kAdditiveEps) : x;
}

// The backward of xn = x / max(||x||, eps) for a vector of its row, given dxn and t = x . dxn over
// the row (as the CUDA and Triton kernels' normalize_backward): dxn / eps where ||x|| < eps
// (autograd's clamp_min blocks the norm's gradient below eps), else (dxn - xn (xn . dxn)) / ||x||:
// at equality, where clamp_min passes it, and for a NaN norm, which that formula spreads over the
// row as autograd does (`norm < eps` is false for NaN).
template <typename acc_t>
inline Vec<acc_t> normalize_backward(const Vec<acc_t>& dxn, const Vec<acc_t>& x, acc_t norm,
                                     acc_t inv, acc_t t) {
  return norm < static_cast<acc_t>(kAdditiveEps)
             ? dxn / Vec<acc_t>(static_cast<acc_t>(kAdditiveEps))
             : dxn * Vec<acc_t>(inv) - x * Vec<acc_t>(inv * inv * inv * t);
}

// Each row of D (SwiftFormer's D is 48-512: at most 2 KiB) is read from memory once and then from
// L1: a first pass sums what the row's scalars need (||x||^2 and its dot products), a second
// writes the row's output and adds to the chunk's partial sums, converting fp16/bf16 a vector at
// a time in registers. (A float32 copy of each row, then one at::vec pass per use, took 1.3-3x
// as long in bf16: docs/performance.md.)
template <typename scalar_t>
void additive_attention_forward_kernel(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& w_g, AdditiveVariant variant,
                                       at::Tensor& out, at::Tensor& qn, at::Tensor& g,
                                       at::Tensor& a_norm) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t B = k.size(0), N = k.size(1), D = k.size(2);
  const acc_t scale = static_cast<acc_t>(additive_scale(D));
  const std::vector<acc_t> w = load_w<scalar_t>(w_g);
  const TokenChunks tc = token_chunks(B, N);
  std::vector<acc_t> g_part(B * tc.count * D), ss_part(B * tc.count);
  const auto q_rows = rows_of<scalar_t>(q), k_rows = rows_of<scalar_t>(k);
  auto qn_rows = mutable_rows_of<scalar_t>(qn), out_rows = mutable_rows_of<scalar_t>(out);
  acc_t* g_ptr = g.mutable_data_ptr<acc_t>();  // contiguous [B, D]
  acc_t* a_norm_ptr = a_norm.mutable_data_ptr<acc_t>();

  at::parallel_for(0, B * tc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tc.count, n0 = (task % tc.count) * tc.size;
      acc_t* gp = g_part.data() + task * D;
      std::fill(gp, gp + D, acc_t(0));
      acc_t ss = 0;
      for (int64_t n = n0; n < std::min(N, n0 + tc.size); ++n) {
        const scalar_t* x = q_rows(b, n);
        scalar_t* y = qn_rows(b, n);
        V x_x(0), x_w(0);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V xv = IO::load(x + d, cnt);
          x_x = at::vec::fmadd(xv, xv, x_x);
          x_w = at::vec::fmadd(xv, V::loadu(w.data() + d, cnt), x_w);
        });
        const acc_t inv = acc_t(1) / clamp_eps(std::sqrt(vec_sum<acc_t>(x_x)));
        const acc_t a = vec_sum<acc_t>(x_w) * inv * scale;
        // softmax over a size-1 axis is exp(a - a): 1, or NaN where a is not finite.
        const V weight(variant == AdditiveVariant::kNormalize ? a : std::exp(a - a));
        ss += a * a;
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V qv = IO::load(x + d, cnt) * V(inv);  // G sums the unrounded qn
          IO::store(y + d, qv, cnt);
          at::vec::fmadd(weight, qv, V::loadu(gp + d, cnt)).store(gp + d, cnt);
        });
      }
      ss_part[task] = ss;
    }
  });

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t ss = 0;
      acc_t* gb = g_ptr + b * D;
      std::fill(gb, gb + D, acc_t(0));
      for (int64_t c = 0; c < tc.count; ++c) {  // chunk order: deterministic
        ss += ss_part[b * tc.count + c];
        at::vec::map2([](V x, V y) { return x + y; }, gb, gb, g_part.data() + (b * tc.count + c) * D, D);
      }
      a_norm_ptr[b] = std::sqrt(ss);
      const acc_t f = variant == AdditiveVariant::kNormalize ? acc_t(1) / clamp_eps(a_norm_ptr[b])
                                                             : acc_t(1);
      at::vec::map([f](V x) { return x * V(f); }, gb, gb, D);
    }
  });

  at::parallel_for(0, B * N, task_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / N, n = r % N;
      const scalar_t* x = k_rows(b, n);
      scalar_t* y = out_rows(b, n);
      const acc_t* gb = g_ptr + b * D;
      V x_x(0);
      over_n<W>(D, [&](int64_t d, int64_t cnt) {
        const V xv = IO::load(x + d, cnt);
        x_x = at::vec::fmadd(xv, xv, x_x);
      });
      const V inv(acc_t(1) / clamp_eps(std::sqrt(vec_sum<acc_t>(x_x))));
      over_n<W>(D, [&](int64_t d, int64_t cnt) {
        IO::store(y + d, IO::load(x + d, cnt) * inv * V::loadu(gb + d, cnt), cnt);
      });
    }
  });
}

template <typename scalar_t>
void additive_attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_qn,
                                        const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& w_g, const at::Tensor& g_in,
                                        const at::Tensor& a_norm_in, AdditiveVariant variant,
                                        at::Tensor& dq, at::Tensor& dk, at::Tensor& dw) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t B = k.size(0), N = k.size(1), D = k.size(2);
  const acc_t scale = static_cast<acc_t>(additive_scale(D));
  const std::vector<acc_t> w = load_w<scalar_t>(w_g);
  const at::Tensor g_c = g_in.contiguous(), a_norm = a_norm_in.contiguous();  // [B, D], [B]
  const acc_t* G = g_c.const_data_ptr<acc_t>();
  const acc_t* a_norm_ptr = a_norm.const_data_ptr<acc_t>();
  const TokenChunks tc = token_chunks(B, N);
  std::vector<acc_t> part(B * tc.count * D), dg(B * D), dgg(B);
  const auto go_rows = rows_of<scalar_t>(grad_out), gq_rows = rows_of<scalar_t>(grad_qn);
  const auto q_rows = rows_of<scalar_t>(q), k_rows = rows_of<scalar_t>(k);
  auto dq_rows = mutable_rows_of<scalar_t>(dq), dk_rows = mutable_rows_of<scalar_t>(dk);

  // Pass 1: dkn = grad_out * G -> dk; partial dG = sum_n grad_out * kn.
  at::parallel_for(0, B * tc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tc.count, n0 = (task % tc.count) * tc.size;
      const acc_t* gb = G + b * D;
      acc_t* dgp = part.data() + task * D;
      std::fill(dgp, dgp + D, acc_t(0));
      for (int64_t n = n0; n < std::min(N, n0 + tc.size); ++n) {
        const scalar_t* x = k_rows(b, n);
        const scalar_t* go = go_rows(b, n);
        scalar_t* y = dk_rows(b, n);
        V x_x(0), x_dkn(0);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V xv = IO::load(x + d, cnt);
          x_x = at::vec::fmadd(xv, xv, x_x);
          x_dkn = at::vec::fmadd(xv, IO::load(go + d, cnt) * V::loadu(gb + d, cnt), x_dkn);
        });
        const acc_t norm = std::sqrt(vec_sum<acc_t>(x_x)), inv = acc_t(1) / clamp_eps(norm);
        const acc_t t = vec_sum<acc_t>(x_dkn);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V xv = IO::load(x + d, cnt), gov = IO::load(go + d, cnt);
          at::vec::fmadd(gov, xv * V(inv), V::loadu(dgp + d, cnt)).store(dgp + d, cnt);
          IO::store(y + d, normalize_backward(gov * V::loadu(gb + d, cnt), xv, norm, inv, t), cnt);
        });
      }
    }
  });

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* dgb = dg.data() + b * D;
      std::fill(dgb, dgb + D, acc_t(0));
      for (int64_t c = 0; c < tc.count; ++c) {
        at::vec::map2([](V x, V y) { return x + y; }, dgb, dgb, part.data() + (b * tc.count + c) * D, D);
      }
      dgg[b] = dot(dgb, G + b * D, D);  // = sum_n alpha[n] dalpha[n]
    }
  });

  // Pass 2: dqn = grad_qn + alpha dG + da scale w_g -> dq; partial dw_g = sum_n da scale qn.
  // dqn needs the row's scalars first and its own dot with q after: it waits in an L1 row.
  at::parallel_for(0, B * tc.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dqn(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tc.count, n0 = (task % tc.count) * tc.size;
      const acc_t* dgb = dg.data() + b * D;
      acc_t* dwp = part.data() + task * D;  // pass 1's partials are consumed: reuse the buffer
      std::fill(dwp, dwp + D, acc_t(0));
      const acc_t ra = a_norm_ptr[b], ra_c = clamp_eps(ra);
      for (int64_t n = n0; n < std::min(N, n0 + tc.size); ++n) {
        const scalar_t* x = q_rows(b, n);
        const scalar_t* gq = gq_rows(b, n);
        scalar_t* y = dq_rows(b, n);
        V x_x(0), x_w(0), x_dg(0);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V xv = IO::load(x + d, cnt);
          x_x = at::vec::fmadd(xv, xv, x_x);
          x_w = at::vec::fmadd(xv, V::loadu(w.data() + d, cnt), x_w);
          x_dg = at::vec::fmadd(xv, V::loadu(dgb + d, cnt), x_dg);
        });
        const acc_t norm = std::sqrt(vec_sum<acc_t>(x_x)), inv = acc_t(1) / clamp_eps(norm);
        const acc_t a = vec_sum<acc_t>(x_w) * inv * scale;
        const acc_t dalpha = vec_sum<acc_t>(x_dg) * inv;
        acc_t alpha, da;
        if (variant == AdditiveVariant::kNormalize) {
          alpha = a / ra_c;
          // Clamped only where ||a|| < eps: a NaN ||a|| takes the full branch, NaN.
          da = ra < static_cast<acc_t>(kAdditiveEps) ? dalpha / static_cast<acc_t>(kAdditiveEps)
                                                     : (dalpha - alpha * dgg[b]) / ra_c;
        } else {  // softmax's backward on a size-1 axis: 0 for every finite weight
          alpha = std::exp(a - a);
          da = alpha * (dalpha - alpha * dalpha);
        }
        const acc_t das = da * scale;
        V x_dqn(0);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          const V xv = IO::load(x + d, cnt);
          at::vec::fmadd(V(das * inv), xv, V::loadu(dwp + d, cnt)).store(dwp + d, cnt);
          const V dv = IO::load(gq + d, cnt) + V(alpha) * V::loadu(dgb + d, cnt) +
                       V(das) * V::loadu(w.data() + d, cnt);
          dv.store(dqn.data() + d, cnt);
          x_dqn = at::vec::fmadd(xv, dv, x_dqn);
        });
        const acc_t t = vec_sum<acc_t>(x_dqn);
        over_n<W>(D, [&](int64_t d, int64_t cnt) {
          IO::store(y + d,
                    normalize_backward(V::loadu(dqn.data() + d, cnt), IO::load(x + d, cnt), norm,
                                       inv, t),
                    cnt);
        });
      }
    }
  });

  // dw_g: every (batch, chunk) partial summed in task order.
  std::vector<acc_t> dw_acc(D, acc_t(0));
  for (int64_t task = 0; task < B * tc.count; ++task) {
    at::vec::map2([](V x, V y) { return x + y; }, dw_acc.data(), dw_acc.data(), part.data() + task * D, D);
  }
  scalar_t* dw_ptr = dw.mutable_data_ptr<scalar_t>();  // contiguous [D, 1]
  for (int64_t d = 0; d < D; ++d) dw_ptr[d] = static_cast<scalar_t>(dw_acc[d]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& w_g,
    c10::string_view variant) {
  check_additive_attention_inputs(q_in, k_in, w_g);
  const AdditiveVariant v = parse_additive_variant(variant);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  const int64_t B = k.size(0), D = k.size(2);
  const auto acc = k.options().dtype(acc_type(k.scalar_type()));
  at::Tensor out = empty_output(k.sizes(), k.options()), qn = empty_output(q.sizes(), q.options());
  at::Tensor g = at::empty({B, D}, acc), a_norm = at::empty({B}, acc);
  if (B == 0) return {out, qn, g, a_norm};
  if (D == 0) return {out, qn, g, a_norm.zero_()};  // every weight is an empty dot product: 0
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "additive_attention_forward_cpu", [&] {
                                    additive_attention_forward_kernel<scalar_t>(q, k, w_g, v, out,
                                                                                qn, g, a_norm);
                                  });
  return {out, qn, g, a_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_qn_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& w_g, const at::Tensor& g,
    const at::Tensor& a_norm, c10::string_view variant) {
  check_additive_attention_backward_inputs(grad_out_in, grad_qn_in, q_in, k_in, w_g, g, a_norm);
  const AdditiveVariant v = parse_additive_variant(variant);
  const at::Tensor go = unit_last_stride(grad_out_in), gq = unit_last_stride(grad_qn_in),
                   q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  at::Tensor dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  at::Tensor dw = at::empty({k.size(2), 1}, w_g.options());
  if (k.size(2) == 0) return {dq, dk, dw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "additive_attention_backward_cpu", [&] {
                                    additive_attention_backward_kernel<scalar_t>(
                                        go, gq, q, k, w_g, g, a_norm, v, dq, dk, dw);
                                  });
  return {dq, dk, dw};
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("additive_attention_forward", &additive_attention_forward_cpu);
  m.impl("additive_attention_backward", &additive_attention_backward_cpu);
}

}  // namespace mvit2
