// Efficient additive attention (SwiftFormer), CUDA. Mirrors csrc/cpu/additive_attention.cpp and
// mvit2_kernels/triton/additive_attention.py; the maths is docs/design.md §2; reference.py is the
// oracle.
//
// A block owns (batch b, a chunk of tokens, a tile of up to kDTile features); each warp takes the
// chunk's rows in turn, its lanes striding over D (coalesced loads), and reduces a row's sums with
// butterflies, so every lane holds the same bits. A row's norms and dot products are summed over
// the whole row first (D = 48..512 in SwiftFormer: one tile, the row then re-read from L1), then
// the block's own features are written. Sums over N leave one partial per (b, chunk), combined
// over the warps in shared memory and over the chunks by a small kernel, each in a fixed order:
// deterministic, no atomics.
//
//   forward:  q pass -> qn, partial sum_n a qn and sum_n a^2 | reduce -> G, ||a|| | k pass -> out
//   backward: (grad_out, k) pass -> dk, partial dG | reduce -> dG, dG . G
//             (grad_qn, q) pass -> dq, partial dw_g | reduce -> dw_g
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../additive_attention_checks.h"
#include "common.cuh"

namespace mvit2 {
namespace {

constexpr const char* kOp = "additive_attention";
constexpr int kDTile = 512;  // features per block: at most 16 per lane
constexpr int64_t kMaxGridY = 65535;
// (b, chunk) blocks wanted when B is small (~4 per SM of a 132-SM H100), and tokens per chunk
// at least (4 rows per warp).
constexpr int64_t kMinBlocks = 512;
constexpr int64_t kMinTokens = 32;

// (batch, token chunk) blocks: enough to fill the GPU at B = 1, at least kMinTokens each. A
// function of the shape alone, so the chunk sums have one order on every device and run.
struct Chunks {
  int64_t count, size;
};
Chunks chunks_of(int64_t B, int64_t N) {
  const int64_t want = std::clamp<int64_t>((kMinBlocks + B - 1) / std::max<int64_t>(B, 1), 1,
                                           std::max<int64_t>(1, N / kMinTokens));
  const int64_t size = std::max<int64_t>(1, (N + want - 1) / want);
  return {std::max<int64_t>(1, (N + size - 1) / size), size};
}

__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

// max(x, eps) that keeps NaN, as torch's clamp_min (fmaxf would drop it).
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_eps(acc_t x) {
  return x < acc_t(kAdditiveEps) ? acc_t(kAdditiveEps) : x;
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> ld(const scalar_t* p) {
  return static_cast<at::opmath_type<scalar_t>>(*p);
}

// The backward of xn = x / max(||x||, eps) for one element, given dxn and t = x . dxn of its row:
// dxn / eps where ||x|| < eps, else (dxn - xn (xn . dxn)) / ||x||: at equality, where autograd's
// clamp_min passes the gradient, and for a NaN norm, which that formula spreads over the row as
// autograd does (`norm >= eps` is false for NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t normalize_backward(acc_t dxn, acc_t x, acc_t norm, acc_t inv,
                                                    acc_t t) {
  return norm < acc_t(kAdditiveEps) ? dxn / acc_t(kAdditiveEps)
                                    : dxn * inv - x * (inv * inv * inv * t);
}

// Where a block works: batch b, tokens [n0, n1) of chunk `task`, features d0 + lane + 32 v of
// feature tile `tile`.
struct BlockTile {
  int64_t task, b, n0, n1, d0;
  int warp, lane;
  __device__ BlockTile(const Chunks& c, int64_t N, int64_t tile)
      : task(blockIdx.x), b(task / c.count), n0((task % c.count) * c.size),
        n1(n0 + c.size < N ? n0 + c.size : N), d0(tile * kDTile), warp(threadIdx.x / 32),
        lane(threadIdx.x % 32) {}
  __device__ int64_t feature(int v) const { return d0 + lane + 32 * v; }
};

// The feature tiles of D, kDTile each: one per blockIdx.y where the grid allows (gridDim.y is
// capped at kMaxGridY, D is not), else each block loops over its share. The loop is block-uniform,
// so body may synchronise.
__host__ __device__ inline int64_t feature_tiles(int64_t D) { return (D + kDTile - 1) / kDTile; }
template <typename Body>
__device__ __forceinline__ void for_each_tile(const Chunks& c, int64_t N, int64_t D,
                                              const Body& body) {
  for (int64_t t = blockIdx.y; t < feature_tiles(D); t += gridDim.y) body(BlockTile(c, N, t));
}

// The block's per-warp partials acc[V] (lane's features) and per-warp scalars summed over the
// warps in warp order: part[task, d] for the tile's features, scalar_part[task] if given.
template <typename acc_t, int V>
__device__ void combine_warps(const BlockTile& bt, const acc_t (&acc)[V], acc_t scalar,
                              int64_t D, acc_t* part, acc_t* scalar_part) {
  __shared__ acc_t part_s[kWarps][kDTile];
  __shared__ acc_t red[kWarps];
  __syncthreads();  // the block's previous feature tile may still be reading part_s and red
#pragma unroll
  for (int v = 0; v < V; ++v) part_s[bt.warp][bt.lane + 32 * v] = acc[v];
  if (bt.lane == 0) red[bt.warp] = scalar;
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * V; i += kThreads) {
    if (bt.d0 + i >= D) continue;
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += part_s[w][i];
    part[bt.task * D + bt.d0 + i] = s;
  }
  if (scalar_part != nullptr && bt.d0 == 0 && threadIdx.x == 0) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    scalar_part[bt.task] = s;
  }
}

template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> q, k, grad_out, grad_qn;  // the grads only in the backward
  Rows<scalar_t> qn_or_dq, out_or_dk;
  const scalar_t* w;
  int64_t w_s;
  const acc_t *g, *a_norm, *dg, *dgg;  // saved statistics; dG and dG . G in the backward
  acc_t *part, *scalar_part;            // workspace: [B * chunks, D] and [B * chunks]
  int64_t N, D;
  Chunks c;
  bool softmax;
};

// q pass: qn, and the chunk's partial sum_n weight[n] qn[n] (G before the normalisation over N,
// which is linear) and sum_n a[n]^2.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    additive_attention_forward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_tile(a.c, a.N, a.D, [&](const BlockTile& bt) {
    const acc_t scale = acc_t(1) / sqrt_acc(static_cast<acc_t>(a.D));  // token_dim ** -0.5
    acc_t gacc[V] = {};
    acc_t ss_a = 0;
    for (int64_t n = bt.n0 + bt.warp; n < bt.n1; n += kWarps) {
      const scalar_t* x = a.q.row(bt.b, n);
      acc_t ss = 0, xw = 0;
      for (int64_t d = bt.lane; d < a.D; d += 32) {
        const acc_t xv = ld(x + d);
        ss += xv * xv;
        xw += xv * ld(a.w + d * a.w_s);
      }
      const acc_t inv = acc_t(1) / clamp_eps(sqrt_acc(group_sum(ss, 32)));
      const acc_t av = group_sum(xw, 32) * inv * scale;
      // softmax over a size-1 axis is exp(a - a): 1, or NaN where a is not finite.
      const acc_t weight = a.softmax ? exp_acc(av - av) : av;
      ss_a += av * av;
      scalar_t* y = a.qn_or_dq.row(bt.b, n);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t d = bt.feature(v);
        if (d >= a.D) continue;
        const acc_t qn = ld(x + d) * inv;
        y[d] = static_cast<scalar_t>(qn);
        gacc[v] += weight * qn;
      }
    }
    combine_warps(bt, gacc, ss_a, a.D, a.part, a.scalar_part);
  });
}

// Per batch: ||a|| and G = (the chunks' partials, summed in chunk order) / max(||a||, eps).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    additive_attention_forward_reduce_kernel(const acc_t* part, const acc_t* ss_part, acc_t* g,
                                             acc_t* a_norm, int64_t D, int64_t chunks,
                                             bool softmax) {
  const int64_t b = blockIdx.x;
  acc_t ss = 0;  // every thread sums the same values in the same order
  for (int64_t c = 0; c < chunks; ++c) ss += ss_part[b * chunks + c];
  const acc_t ra = sqrt_acc(ss);
  if (threadIdx.x == 0) a_norm[b] = ra;
  const acc_t f = softmax ? acc_t(1) : acc_t(1) / clamp_eps(ra);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[(b * chunks + c) * D + d];
    g[b * D + d] = s * f;
  }
}

// k pass: out = G * k / max(||k||, eps).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    additive_attention_forward_out_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_tile(a.c, a.N, a.D, [&](const BlockTile& bt) {
    acc_t gv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) gv[v] = bt.feature(v) < a.D ? a.g[bt.b * a.D + bt.feature(v)] : 0;
    for (int64_t n = bt.n0 + bt.warp; n < bt.n1; n += kWarps) {
      const scalar_t* x = a.k.row(bt.b, n);
      acc_t ss = 0;
      for (int64_t d = bt.lane; d < a.D; d += 32) ss += ld(x + d) * ld(x + d);
      const acc_t inv = acc_t(1) / clamp_eps(sqrt_acc(group_sum(ss, 32)));
      scalar_t* y = a.out_or_dk.row(bt.b, n);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t d = bt.feature(v);
        if (d < a.D) y[d] = static_cast<scalar_t>(ld(x + d) * inv * gv[v]);
      }
    }
  });
}

// (grad_out, k) pass: dkn = grad_out * G -> dk, and the chunk's partial dG = sum_n grad_out kn.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    additive_attention_backward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_tile(a.c, a.N, a.D, [&](const BlockTile& bt) {
    const acc_t* G = a.g + bt.b * a.D;
    acc_t dgacc[V] = {};
    for (int64_t n = bt.n0 + bt.warp; n < bt.n1; n += kWarps) {
      const scalar_t *x = a.k.row(bt.b, n), *go = a.grad_out.row(bt.b, n);
      acc_t ss = 0, t = 0;  // ||k||^2 and k . dkn
      for (int64_t d = bt.lane; d < a.D; d += 32) {
        const acc_t xv = ld(x + d);
        ss += xv * xv;
        t += xv * ld(go + d) * G[d];
      }
      const acc_t norm = sqrt_acc(group_sum(ss, 32)), inv = acc_t(1) / clamp_eps(norm);
      t = group_sum(t, 32);
      scalar_t* y = a.out_or_dk.row(bt.b, n);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t d = bt.feature(v);
        if (d >= a.D) continue;
        const acc_t xv = ld(x + d), gov = ld(go + d);
        y[d] = static_cast<scalar_t>(normalize_backward(gov * G[d], xv, norm, inv, t));
        dgacc[v] += gov * xv * inv;
      }
    }
    combine_warps(bt, dgacc, acc_t(0), a.D, a.part, static_cast<acc_t*>(nullptr));
  });
}

// Per batch: dG = the chunks' partials summed in chunk order, and dG . G (= sum alpha dalpha).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    additive_attention_backward_reduce_kernel(const acc_t* part, const acc_t* g, acc_t* dg,
                                              acc_t* dgg, int64_t D, int64_t chunks) {
  __shared__ acc_t red[kWarps];
  const int64_t b = blockIdx.x;
  acc_t dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[(b * chunks + c) * D + d];
    dg[b * D + d] = s;
    dot += s * g[b * D + d];
  }
  dot = group_sum(dot, 32);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    dgg[b] = s;
  }
}

// (grad_qn, q) pass: dqn = grad_qn + alpha dG + da scale w_g -> dq, and the chunk's partial
// dw_g = sum_n da scale qn.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    additive_attention_backward_dq_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_tile(a.c, a.N, a.D, [&](const BlockTile& bt) {
    const acc_t scale = acc_t(1) / sqrt_acc(static_cast<acc_t>(a.D));
    const acc_t* dG = a.dg + bt.b * a.D;
    const acc_t ra = a.a_norm[bt.b], ra_c = clamp_eps(ra), dgg = a.dgg[bt.b];
    acc_t dwacc[V] = {};
    for (int64_t n = bt.n0 + bt.warp; n < bt.n1; n += kWarps) {
      const scalar_t *x = a.q.row(bt.b, n), *gq = a.grad_qn.row(bt.b, n);
      acc_t ss = 0, xw = 0, xdg = 0;
      for (int64_t d = bt.lane; d < a.D; d += 32) {
        const acc_t xv = ld(x + d);
        ss += xv * xv;
        xw += xv * ld(a.w + d * a.w_s);
        xdg += xv * dG[d];
      }
      const acc_t norm = sqrt_acc(group_sum(ss, 32)), inv = acc_t(1) / clamp_eps(norm);
      const acc_t av = group_sum(xw, 32) * inv * scale, dalpha = group_sum(xdg, 32) * inv;
      acc_t alpha, da;
      if (a.softmax) {  // softmax's backward on a size-1 axis: 0 for every finite weight
        alpha = exp_acc(av - av);
        da = alpha * (dalpha - alpha * dalpha);
      } else {
        alpha = av / ra_c;
        // Clamped only where ||a|| < eps: a NaN ||a|| takes the full branch, NaN.
        da = ra < acc_t(kAdditiveEps) ? dalpha / acc_t(kAdditiveEps)
                                      : (dalpha - alpha * dgg) / ra_c;
      }
      const acc_t das = da * scale;
      const auto dqn = [&](int64_t d) {
        return ld(gq + d) + alpha * dG[d] + das * ld(a.w + d * a.w_s);
      };
      acc_t t = 0;  // q . dqn
      for (int64_t d = bt.lane; d < a.D; d += 32) t += ld(x + d) * dqn(d);
      t = group_sum(t, 32);
      scalar_t* y = a.qn_or_dq.row(bt.b, n);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t d = bt.feature(v);
        if (d >= a.D) continue;
        const acc_t xv = ld(x + d);
        y[d] = static_cast<scalar_t>(normalize_backward(dqn(d), xv, norm, inv, t));
        dwacc[v] += das * inv * xv;
      }
    }
    combine_warps(bt, dwacc, acc_t(0), a.D, a.part, static_cast<acc_t*>(nullptr));
  });
}

// dw_g: every (b, chunk) partial, summed in task order; one thread per feature.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    additive_attention_backward_dw_kernel(const at::opmath_type<scalar_t>* part, scalar_t* dw,
                                          int64_t D, int64_t tasks) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  at::opmath_type<scalar_t> s = 0;
  for (int64_t t = 0; t < tasks; ++t) s += part[t * D + d];
  dw[d] = static_cast<scalar_t>(s);  // dw: contiguous [D, 1]
}

// (b, chunk) blocks along x (2^31 - 1 at most), feature tiles along y (65535 at most: for_each_tile
// loops over the rest).
dim3 grid_of(int64_t tasks, int64_t D) {
  return dim3(grid_size(tasks, kOp),
              static_cast<unsigned>(std::min<int64_t>(feature_tiles(D), kMaxGridY)));
}

// Calls f(std::integral_constant<int, V>) with V = features per lane of a block's tile.
template <typename F>
void with_values_per_lane(int64_t D, const F& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 4>{});
  } else if (D <= 256) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, kDTile / 32>{});
  }
}

template <typename scalar_t>
Args<scalar_t> base_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w_g,
                         bool softmax) {
  Args<scalar_t> a{};
  a.q = rows_of<const scalar_t>(q);
  a.k = rows_of<const scalar_t>(k);
  a.w = w_g.const_data_ptr<scalar_t>();
  a.w_s = w_g.stride(0);
  a.N = k.size(1);
  a.D = k.size(2);
  a.c = chunks_of(k.size(0), a.N);
  a.softmax = softmax;
  return a;
}

template <typename scalar_t>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w_g,
                    bool softmax, at::Tensor& out, at::Tensor& qn, at::Tensor& g,
                    at::Tensor& a_norm) {
  using acc_t = at::opmath_type<scalar_t>;
  Args<scalar_t> a = base_args<scalar_t>(q, k, w_g, softmax);
  const int64_t B = k.size(0), tasks = B * a.c.count;
  const at::Tensor ws = at::empty({tasks * (a.D + 1)}, g.options());
  a.part = ws.mutable_data_ptr<acc_t>();
  a.scalar_part = a.part + tasks * a.D;
  a.qn_or_dq = rows_of<scalar_t>(qn);
  a.out_or_dk = rows_of<scalar_t>(out);
  a.g = g.const_data_ptr<acc_t>();
  const dim3 grid = grid_of(tasks, a.D);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_values_per_lane(a.D, [&](auto v) {
    additive_attention_forward_kernel<scalar_t, decltype(v)::value><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    additive_attention_forward_reduce_kernel<acc_t><<<grid_size(B, kOp), kThreads, 0, stream>>>(
        a.part, a.scalar_part, g.mutable_data_ptr<acc_t>(), a_norm.mutable_data_ptr<acc_t>(), a.D,
        a.c.count, softmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    additive_attention_forward_out_kernel<scalar_t, decltype(v)::value>
        <<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_backward(const at::Tensor& go, const at::Tensor& gq, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& w_g, const at::Tensor& g,
                     const at::Tensor& a_norm, bool softmax, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dw) {
  using acc_t = at::opmath_type<scalar_t>;
  Args<scalar_t> a = base_args<scalar_t>(q, k, w_g, softmax);
  const int64_t B = k.size(0), tasks = B * a.c.count;
  // part is reused: the reduce kernel has consumed pass 1's partials when pass 2 writes its own.
  const at::Tensor ws = at::empty({tasks * a.D + B * a.D + B}, g.options());
  a.part = ws.mutable_data_ptr<acc_t>();
  acc_t* dg = a.part + tasks * a.D;
  acc_t* dgg = dg + B * a.D;
  a.grad_out = rows_of<const scalar_t>(go);
  a.grad_qn = rows_of<const scalar_t>(gq);
  a.qn_or_dq = rows_of<scalar_t>(dq);
  a.out_or_dk = rows_of<scalar_t>(dk);
  a.g = g.const_data_ptr<acc_t>();
  a.a_norm = a_norm.const_data_ptr<acc_t>();
  a.dg = dg;
  a.dgg = dgg;
  const dim3 grid = grid_of(tasks, a.D);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_values_per_lane(a.D, [&](auto v) {
    additive_attention_backward_kernel<scalar_t, decltype(v)::value>
        <<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    additive_attention_backward_reduce_kernel<acc_t><<<grid_size(B, kOp), kThreads, 0, stream>>>(
        a.part, a.g, dg, dgg, a.D, a.c.count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    additive_attention_backward_dq_kernel<scalar_t, decltype(v)::value>
        <<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  additive_attention_backward_dw_kernel<scalar_t>
      <<<grid_size((a.D + kThreads - 1) / kThreads, kOp), kThreads, 0, stream>>>(
          a.part, dw.mutable_data_ptr<scalar_t>(), a.D, tasks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& w_g,
    c10::string_view variant) {
  check_additive_attention_inputs(q_in, k_in, w_g);
  const bool softmax = parse_additive_variant(variant) == AdditiveVariant::kSoftmax;
  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  const int64_t B = k.size(0), N = k.size(1), D = k.size(2);
  const auto acc = k.options().dtype(acc_type(k.scalar_type()));
  at::Tensor out = at::empty(k.sizes(), k.options()), qn = at::empty(q.sizes(), q.options());
  at::Tensor g = at::empty({B, D}, acc), a_norm = at::empty({B}, acc);
  if (B == 0) return {out, qn, g, a_norm};
  if (N == 0 || D == 0) return {out, qn, g.zero_(), a_norm.zero_()};  // empty sums
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "additive_attention_forward_cuda", [&] {
                                    launch_forward<scalar_t>(q, k, w_g, softmax, out, qn, g,
                                                             a_norm);
                                  });
  return {out, qn, g, a_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& grad_qn_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& w_g, const at::Tensor& g_in,
    const at::Tensor& a_norm_in, c10::string_view variant) {
  check_additive_attention_backward_inputs(grad_out_in, grad_qn_in, q_in, k_in, w_g, g_in,
                                           a_norm_in);
  const bool softmax = parse_additive_variant(variant) == AdditiveVariant::kSoftmax;
  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor go = unit_last_stride(grad_out_in), gq = unit_last_stride(grad_qn_in),
                   q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  const at::Tensor g = g_in.contiguous(), a_norm = a_norm_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dw = at::empty({k.size(2), 1}, w_g.options());
  if (k.size(2) == 0) return {dq, dk, dw};
  if (k.size(0) == 0 || k.size(1) == 0) return {dq, dk, dw.zero_()};  // no tokens
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "additive_attention_backward_cuda", [&] {
                                    launch_backward<scalar_t>(go, gq, q, k, w_g, g, a_norm,
                                                              softmax, dq, dk, dw);
                                  });
  return {dq, dk, dw};
}

TORCH_LIBRARY_IMPL(mvit2, CUDA, m) {
  m.impl("additive_attention_forward", &additive_attention_forward_cuda);
  m.impl("additive_attention_backward", &additive_attention_backward_cuda);
}

}  // namespace mvit2
