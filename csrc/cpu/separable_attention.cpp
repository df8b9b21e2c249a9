// Separable self-attention (MobileViTv2), CPU: one pass over k and v (forward) and over
// grad_y, v and k (backward) per (row, channel block), vectorised with at::vec, accumulating
// fp16/bf16 in float32. The maths is DESIGN.md §1; mvit2_kernels/reference.py is the oracle.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace mvit2 {
namespace {

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static Vec load(const scalar_t* p) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float(p, out);  // Vec::size() halves -> one float vector
      return out;
    } else {
      return Vec::loadu(p);
    }
  }
  static void store(scalar_t* p, const Vec& x) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(x, x).store(p, Vec::size());
    } else {
      x.store(p);
    }
  }
};

// torch.relu propagates NaN; std::max(x, 0) would not.
template <typename acc_t>
inline acc_t relu(acc_t x) {
  return (x > acc_t(0) || std::isnan(x)) ? x : acc_t(0);
}

// Enough (row, channel block) tasks to feed every thread even at B=1. A function of the shape
// alone, not of the thread count, so the backward's cross-block ds sum has one fixed order.
struct ChannelBlocks {
  int64_t count, size;
};
inline ChannelBlocks channel_blocks(int64_t rows, int64_t C) {
  constexpr int64_t kMinTasks = 64;
  if (rows >= kMinTasks || C <= 1) return {1, std::max<int64_t>(C, 1)};
  const int64_t want = std::min(C, (kMinTasks + rows - 1) / rows);
  const int64_t size = (C + want - 1) / want;
  return {(C + size - 1) / size, size};
}

// Tasks per at::parallel_for chunk so that a chunk moves at least ~16K elements.
inline int64_t task_grain(int64_t channels_per_task, int64_t N) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, channels_per_task * N));
}

// s = softmax(q_row) in acc_t. q is 1/C of the data, so every task recomputes it.
template <typename scalar_t>
void softmax_row(const scalar_t* q, int64_t N, at::opmath_type<scalar_t>* s) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  const int64_t Nv = N - N % W;
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  for (int64_t n = 0; n < Nv; n += W) vmax = at::vec::maximum(vmax, IO::load(q + n));
  acc_t mx = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                            vmax);
  for (int64_t n = Nv; n < N; ++n) {
    const acc_t x = static_cast<acc_t>(q[n]);
    mx = (x > mx || std::isnan(x)) ? x : mx;
  }
  Vec vsum(acc_t(0));
  for (int64_t n = 0; n < Nv; n += W) {
    const Vec e = (IO::load(q + n) - Vec(mx)).exp();
    e.store(s + n);
    vsum = vsum + e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (int64_t n = Nv; n < N; ++n) {
    s[n] = std::exp(static_cast<acc_t>(q[n]) - mx);
    sum += s[n];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t n = 0; n < N; ++n) s[n] *= inv;
}

template <typename scalar_t>
void separable_attention_forward_kernel(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, at::Tensor& y, at::Tensor& ctx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  const int64_t Nv = N - N % W;
  const ChannelBlocks cb = channel_blocks(B * P, C);
  const int64_t blocks = cb.count, per_block = cb.size;
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
  acc_t* ctx_ptr = ctx.mutable_data_ptr<acc_t>();  // contiguous [B, C, P, 1]

  at::parallel_for(0, B * P * blocks, task_grain(per_block, N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(N);
    int64_t s_row = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks, b = row / P, p = row % P;
      if (row != s_row) {  // tasks are row-major: a chunk recomputes s once per row it touches
        softmax_row(q_ptr + b * q.stride(0) + p * q.stride(2), N, s.data());
        s_row = row;
      }
      const int64_t c_end = std::min(C, (task % blocks + 1) * per_block);
      for (int64_t c = (task % blocks) * per_block; c < c_end; ++c) {
        const scalar_t* kc = k_ptr + b * k.stride(0) + c * k.stride(1) + p * k.stride(2);
        const scalar_t* vc = v_ptr + b * v.stride(0) + c * v.stride(1) + p * v.stride(2);
        scalar_t* yc = y_ptr + ((b * C + c) * P + p) * N;
        Vec vacc(acc_t(0));
        for (int64_t n = 0; n < Nv; n += W) vacc = at::vec::fmadd(Vec::loadu(&s[n]), IO::load(kc + n), vacc);
        acc_t cx = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vacc);
        for (int64_t n = Nv; n < N; ++n) cx += s[n] * static_cast<acc_t>(kc[n]);
        ctx_ptr[(b * C + c) * P + p] = cx;
        const Vec vcx(cx), zero(acc_t(0));
        for (int64_t n = 0; n < Nv; n += W) IO::store(yc + n, at::vec::maximum(IO::load(vc + n), zero) * vcx);
        for (int64_t n = Nv; n < N; ++n) yc[n] = static_cast<scalar_t>(relu(static_cast<acc_t>(vc[n])) * cx);
      }
    }
  });
}

// Pass 1 per (row, channel block): dv, dctx from (grad_y, v); dk and the block's partial ds from
// k. Pass 2 per row: ds summed over blocks in a fixed order (deterministic), then dq.
template <typename scalar_t>
void separable_attention_backward_kernel(const at::Tensor& g, const at::Tensor& q,
                                         const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& ctx, at::Tensor& dq, at::Tensor& dk,
                                         at::Tensor& dv) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  const int64_t Nv = N - N % W;
  const ChannelBlocks cb = channel_blocks(B * P, C);
  const int64_t blocks = cb.count, per_block = cb.size;
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();
  scalar_t* dq_ptr = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dk_ptr = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv_ptr = dv.mutable_data_ptr<scalar_t>();
  // Per (row, block): partial ds[N] and partial sum_c dctx[c] * ctx[c].
  std::vector<acc_t> ds_part(B * P * blocks * N), dot_part(B * P * blocks);
  const auto ctx_at = [&](int64_t b, int64_t c, int64_t p) {
    return ctx_ptr[b * ctx.stride(0) + c * ctx.stride(1) + p * ctx.stride(2)];
  };

  at::parallel_for(0, B * P * blocks, task_grain(per_block, N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(N);
    int64_t s_row = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks, b = row / P, p = row % P;
      if (row != s_row) {
        softmax_row(q_ptr + b * q.stride(0) + p * q.stride(2), N, s.data());
        s_row = row;
      }
      acc_t* ds = ds_part.data() + task * N;
      std::fill(ds, ds + N, acc_t(0));
      acc_t dot = 0;
      const int64_t c_end = std::min(C, (task % blocks + 1) * per_block);
      for (int64_t c = (task % blocks) * per_block; c < c_end; ++c) {
        const scalar_t* gc = g_ptr + b * g.stride(0) + c * g.stride(1) + p * g.stride(2);
        const scalar_t* kc = k_ptr + b * k.stride(0) + c * k.stride(1) + p * k.stride(2);
        const scalar_t* vc = v_ptr + b * v.stride(0) + c * v.stride(1) + p * v.stride(2);
        const int64_t out = ((b * C + c) * P + p) * N;
        const acc_t cx = ctx_at(b, c, p);
        // dv = g * ctx where v > 0 (a select, as autograd's relu backward: 0 * inf stays 0);
        // dctx = sum_n g * relu(v).
        const Vec vcx(cx), zero(acc_t(0));
        Vec vdctx(acc_t(0));
        for (int64_t n = 0; n < Nv; n += W) {
          const Vec gn = IO::load(gc + n), vn = IO::load(vc + n);
          IO::store(dv_ptr + out + n, Vec::blendv(zero, gn * vcx, vn > zero));
          vdctx = at::vec::fmadd(gn, at::vec::maximum(vn, zero), vdctx);
        }
        acc_t dctx = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vdctx);
        for (int64_t n = Nv; n < N; ++n) {
          const acc_t gn = static_cast<acc_t>(gc[n]), vn = static_cast<acc_t>(vc[n]);
          dv_ptr[out + n] = static_cast<scalar_t>(vn > acc_t(0) ? gn * cx : acc_t(0));
          dctx += gn * relu(vn);
        }
        // dk = dctx * s; ds += dctx * k.
        const Vec vd(dctx);
        for (int64_t n = 0; n < Nv; n += W) {
          IO::store(dk_ptr + out + n, vd * Vec::loadu(&s[n]));
          at::vec::fmadd(vd, IO::load(kc + n), Vec::loadu(ds + n)).store(ds + n);
        }
        for (int64_t n = Nv; n < N; ++n) {
          dk_ptr[out + n] = static_cast<scalar_t>(dctx * s[n]);
          ds[n] += dctx * static_cast<acc_t>(kc[n]);
        }
        dot += dctx * cx;
      }
      dot_part[task] = dot;
    }
  });

  // dq = s * (ds - sum_c dctx * ctx), with s recomputed: q and dq are 1/C of the traffic.
  at::parallel_for(0, B * P, task_grain(blocks, N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / P, p = row % P;
      softmax_row(q_ptr + b * q.stride(0) + p * q.stride(2), N, s.data());
      acc_t dot = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) dot += dot_part[row * blocks + blk];
      scalar_t* dqr = dq_ptr + row * N;  // dq is contiguous [B, 1, P, N]
      for (int64_t n = 0; n < N; ++n) {
        acc_t ds = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) ds += ds_part[(row * blocks + blk) * N + n];
        dqr[n] = static_cast<scalar_t>(s[n] * (ds - dot));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_attention_forward_cpu(const at::Tensor& q_in,
                                                                   const at::Tensor& k_in,
                                                                   const at::Tensor& v_in) {
  check_separable_attention_inputs(q_in, k_in, v_in);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in),
                   v = unit_last_stride(v_in);
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2);
  at::Tensor y = at::empty(k.sizes(), k.options());
  at::Tensor ctx = at::empty({B, C, P, 1}, k.options().dtype(acc_type(k.scalar_type())));
  if (y.numel() == 0 && ctx.numel() == 0) return {y, ctx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "separable_attention_forward_cpu", [&] {
                                    separable_attention_forward_kernel<scalar_t>(q, k, v, y, ctx);
                                  });
  return {y, ctx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_attention_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& ctx) {
  check_separable_attention_backward_inputs(grad_y_in, q_in, k_in, v_in, ctx);
  const at::Tensor g = unit_last_stride(grad_y_in), q = unit_last_stride(q_in),
                   k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "separable_attention_backward_cpu", [&] {
                                    separable_attention_backward_kernel<scalar_t>(g, q, k, v, ctx,
                                                                                  dq, dk, dv);
                                  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("separable_attention_forward", &separable_attention_forward_cpu);
  m.impl("separable_attention_backward", &separable_attention_backward_cpu);
}

}  // namespace mvit2
