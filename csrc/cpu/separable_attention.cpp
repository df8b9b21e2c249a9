// Separable self-attention (MobileViTv2), CPU: one pass over k and v (forward) and over
// grad_y, v and k (backward) per (row, channel block), vectorised with at::vec, accumulating
// fp16/bf16 in float32. The maths is docs/design.md §1; mvit2_kernels/reference.py is the oracle.
#include "vec_isa.h"  // first: it configures at::vec

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "../checks.h"
#include "outputs.h"
#include "row_ops.h"

namespace mvit2 {
namespace {

// Tasks are (batch, channel block); each walks its channels and, inside, the P rows, so that k, v
// and y stream through memory in order (the P*N plane of a channel is contiguous). Enough tasks
// to feed every thread even at B=1; a function of the shape alone, not of the thread count, so the
// backward's cross-block ds sum always has the same order (bitwise-reproducible results).
struct ChannelBlocks {
  int64_t count, size;
};
inline ChannelBlocks channel_blocks(int64_t B, int64_t C) {
  constexpr int64_t kMinTasks = 64;
  if (B >= kMinTasks || C <= 1) return {1, std::max<int64_t>(C, 1)};
  const int64_t want = std::min(C, (kMinTasks + B - 1) / B);
  const int64_t size = (C + want - 1) / want;
  return {(C + size - 1) / size, size};
}

// The P softmax rows of batch b, into s[P * N]; a thread recomputes them only when b changes
// (its tasks are consecutive), so q, 1/C of the data, is read about once.
template <typename scalar_t>
inline void softmax_rows(const at::Tensor& q, int64_t b, at::opmath_type<scalar_t>* s) {
  const int64_t P = q.size(2), N = q.size(3);
  const scalar_t* qb = q.const_data_ptr<scalar_t>() + b * q.stride(0);
  for (int64_t p = 0; p < P; ++p) softmax_row(qb + p * q.stride(2), N, s + p * N);
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
  const ChannelBlocks cb = channel_blocks(B, C);
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
  acc_t* ctx_ptr = ctx.mutable_data_ptr<acc_t>();  // contiguous [B, C, P, 1]
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);

  const bool stream = y.nbytes() >= streaming_store_bytes();

  at::parallel_for(0, B * cb.count, task_grain(cb.size * P * N), [&](int64_t begin, int64_t end) {
    acc_vector<scalar_t> s(P * N);
    int64_t s_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / cb.count, c_begin = (task % cb.count) * cb.size;
      if (b != s_b) softmax_rows<scalar_t>(q, s_b = b, s.data());
      for (int64_t c = c_begin; c < std::min(C, c_begin + cb.size); ++c) {
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* sp = s.data() + p * N;
          const scalar_t* kc = k_ptr + b * ks0 + c * ks1 + p * ks2;
          const scalar_t* vc = v_ptr + b * vs0 + c * vs1 + p * vs2;
          scalar_t* yc = y_ptr + ((b * C + c) * P + p) * N;
          // ctx = sum_n s * k
          Vec vacc(acc_t(0));
          for (int64_t n = 0; n < Nv; n += W) {
            vacc = at::vec::fmadd(Vec::loadu(sp + n), IO::load(kc + n), vacc);
          }
          acc_t cx = vec_sum<acc_t>(vacc);
          for (int64_t n = Nv; n < N; ++n) cx += sp[n] * static_cast<acc_t>(kc[n]);
          ctx_ptr[(b * C + c) * P + p] = cx;
          // y = relu(v) * ctx
          const Vec vcx(cx), zero(acc_t(0));
          const bool st = stream && aligned_to(yc, IO::kStreamAlign);
          for (int64_t n = 0; n < Nv; n += W) {
            IO::put(st, yc + n, at::vec::maximum(IO::load(vc + n), zero) * vcx);
          }
          for (int64_t n = Nv; n < N; ++n) {
            yc[n] = static_cast<scalar_t>(relu(static_cast<acc_t>(vc[n])) * cx);
          }
        }
      }
    }
    fence_streaming_stores();
  });
}

// Pass 1 per (batch, channel block): dv, dctx from (grad_y, v); dk and the block's partial
// ds[P, N] from k. Pass 2 per row: ds summed over blocks in a fixed order, then dq.
// dq, dk, dv are written with their strides (unit stride along N): separate contiguous tensors,
// or the channel views of one dqkv [B, 1 + 2C, P, N] (separable_attention_qkv_backward).
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
  const ChannelBlocks cb = channel_blocks(B, C);
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();
  scalar_t* dq_ptr = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dk_ptr = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv_ptr = dv.mutable_data_ptr<scalar_t>();
  const int64_t gs0 = g.stride(0), gs1 = g.stride(1), gs2 = g.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t xs0 = ctx.stride(0), xs1 = ctx.stride(1), xs2 = ctx.stride(2);
  const int64_t dks0 = dk.stride(0), dks1 = dk.stride(1), dks2 = dk.stride(2);
  const int64_t dvs0 = dv.stride(0), dvs1 = dv.stride(1), dvs2 = dv.stride(2);
  const bool stream = dk.nbytes() >= streaming_store_bytes();
  // Per (batch, block): partial ds[P, N] and partial sum_c dctx * ctx [P].
  // Left uninitialised (each task zeroes its own slice): a std::vector would add a pass.
  std::unique_ptr<acc_t[]> ds_part(new acc_t[B * cb.count * P * N]);
  std::unique_ptr<acc_t[]> dot_part(new acc_t[B * cb.count * P]);

  at::parallel_for(0, B * cb.count, task_grain(cb.size * P * N), [&](int64_t begin, int64_t end) {
    acc_vector<scalar_t> s(P * N);
    int64_t s_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / cb.count, c_begin = (task % cb.count) * cb.size;
      if (b != s_b) softmax_rows<scalar_t>(q, s_b = b, s.data());
      acc_t* ds = ds_part.get() + task * P * N;
      acc_t* dot = dot_part.get() + task * P;
      std::fill(ds, ds + P * N, acc_t(0));
      std::fill(dot, dot + P, acc_t(0));
      for (int64_t c = c_begin; c < std::min(C, c_begin + cb.size); ++c) {
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* sp = s.data() + p * N;
          acc_t* dsp = ds + p * N;
          const scalar_t* gc = g_ptr + b * gs0 + c * gs1 + p * gs2;
          const scalar_t* kc = k_ptr + b * ks0 + c * ks1 + p * ks2;
          const scalar_t* vc = v_ptr + b * vs0 + c * vs1 + p * vs2;
          scalar_t* dkc = dk_ptr + b * dks0 + c * dks1 + p * dks2;
          scalar_t* dvc = dv_ptr + b * dvs0 + c * dvs1 + p * dvs2;
          const acc_t cx = ctx_ptr[b * xs0 + c * xs1 + p * xs2];
          // dv = v <= 0 ? 0 : g * ctx, autograd's relu backward (a select: 0 * inf stays 0, and
          // NaN v passes the gradient); dctx = sum_n g * relu(v).
          const Vec vcx(cx), zero(acc_t(0));
          // Each row start on its own: in one dqkv, dk and dv rows are C*P*N elements apart.
          const bool st_v = stream && aligned_to(dvc, IO::kStreamAlign);
          const bool st_k = stream && aligned_to(dkc, IO::kStreamAlign);
          Vec vdctx(acc_t(0));
          for (int64_t n = 0; n < Nv; n += W) {
            const Vec gn = IO::load(gc + n), vn = IO::load(vc + n);
            IO::put(st_v, dvc + n, Vec::blendv(gn * vcx, zero, vn <= zero));
            vdctx = at::vec::fmadd(gn, at::vec::maximum(vn, zero), vdctx);
          }
          acc_t dctx = vec_sum<acc_t>(vdctx);
          for (int64_t n = Nv; n < N; ++n) {
            const acc_t gn = static_cast<acc_t>(gc[n]), vn = static_cast<acc_t>(vc[n]);
            dvc[n] = static_cast<scalar_t>(vn <= acc_t(0) ? acc_t(0) : gn * cx);
            dctx += gn * relu(vn);
          }
          // dk = dctx * s; ds += dctx * k.
          const Vec vd(dctx);
          for (int64_t n = 0; n < Nv; n += W) {
            IO::put(st_k, dkc + n, vd * Vec::loadu(sp + n));
            at::vec::fmadd(vd, IO::load(kc + n), Vec::loadu(dsp + n)).store(dsp + n);
          }
          for (int64_t n = Nv; n < N; ++n) {
            dkc[n] = static_cast<scalar_t>(dctx * sp[n]);
            dsp[n] += dctx * static_cast<acc_t>(kc[n]);
          }
          dot[p] += dctx * cx;
        }
      }
    }
    fence_streaming_stores();
  });

  // dq = s * (ds - sum_c dctx * ctx), s recomputed: q and dq are 1/C of the traffic.
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  at::parallel_for(0, B * P, task_grain(cb.count * N), [&](int64_t begin, int64_t end) {
    acc_vector<scalar_t> s(N), ds(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / P, p = row % P;
      softmax_row(q_ptr + b * q.stride(0) + p * q.stride(2), N, s.data());
      std::fill(ds.begin(), ds.end(), acc_t(0));
      acc_t dot = 0;
      for (int64_t blk = 0; blk < cb.count; ++blk) {
        const int64_t part = (b * cb.count + blk) * P + p;
        at::vec::map2([](Vec a, Vec x) { return a + x; }, ds.data(), ds.data(),
                      ds_part.get() + part * N, N);
        dot += dot_part[part];
      }
      scalar_t* dqr = dq_ptr + b * dq.stride(0) + p * dq.stride(2);
      for (int64_t n = 0; n < N; ++n) dqr[n] = static_cast<scalar_t>(s[n] * (ds[n] - dot));
    }
  });
}

// The backward into dq, dk, dv: unit stride along N, any other strides.
void backward_into(const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in,
                   const at::Tensor& v_in, const at::Tensor& ctx, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  const at::Tensor g = unit_last_stride(grad_y_in), q = unit_last_stride(q_in),
                   k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  if (dq.numel() == 0 && dk.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "separable_attention_backward_cpu", [&] {
                                    separable_attention_backward_kernel<scalar_t>(g, q, k, v, ctx,
                                                                                  dq, dk, dv);
                                  });
}

// The forward into y (contiguous, checked); returns ctx.
at::Tensor forward_into(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        at::Tensor& y) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in),
                   v = unit_last_stride(v_in);
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2);
  at::Tensor ctx = at::empty({B, C, P, 1}, k.options().dtype(acc_type(k.scalar_type())));
  if (y.numel() == 0 && ctx.numel() == 0) return ctx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "separable_attention_forward_cpu", [&] {
                                    separable_attention_forward_kernel<scalar_t>(q, k, v, y, ctx);
                                  });
  return ctx;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_attention_forward_cpu(const at::Tensor& q,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& v) {
  check_separable_attention_inputs(q, k, v);
  at::Tensor y = empty_output(k.sizes(), k.options());
  at::Tensor ctx = forward_into(q, k, v, y);
  return {y, ctx};
}

at::Tensor separable_attention_forward_out_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, at::Tensor& y) {
  check_separable_attention_inputs(q, k, v);
  check_separable_attention_out(y, q, k, v);
  return forward_into(q, k, v, y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_attention_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& ctx) {
  check_separable_attention_backward_inputs(grad_y, q, k, v, ctx);
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  backward_into(grad_y, q, k, v, ctx, dq, dk, dv);
  return {dq, dk, dv};
}

// The same kernels on the channel views of one qkv [B, 1 + 2C, P, N]: the forward reads them in
// place, and the backward writes dq, dk, dv into the views of one contiguous dqkv, so autograd
// has no split backward to concatenate.
std::tuple<at::Tensor, at::Tensor> separable_attention_qkv_forward_cpu(const at::Tensor& qkv) {
  const auto [q, k, v] = split_qkv(qkv);
  return separable_attention_forward_cpu(q, k, v);
}

at::Tensor separable_attention_qkv_backward_cpu(const at::Tensor& grad_y, const at::Tensor& qkv,
                                                const at::Tensor& ctx) {
  const auto [q, k, v] = split_qkv(qkv);
  check_separable_attention_backward_inputs(grad_y, q, k, v, ctx);
  at::Tensor dqkv = empty_output(qkv.sizes(), qkv.options());
  auto [dq, dk, dv] = split_qkv(dqkv);
  backward_into(grad_y, q, k, v, ctx, dq, dk, dv);
  return dqkv;
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("separable_attention_forward", &separable_attention_forward_cpu);
  m.impl("separable_attention_forward_out", &separable_attention_forward_out_cpu);
  m.impl("separable_attention_backward", &separable_attention_backward_cpu);
  m.impl("separable_attention_qkv_forward", &separable_attention_qkv_forward_cpu);
  m.impl("separable_attention_qkv_backward", &separable_attention_qkv_backward_cpu);
}

}  // namespace mvit2
