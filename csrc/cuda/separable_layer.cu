// The whole-layer fusion's kernels (docs/layer_fusion.md), CUDA: the context pass and the
// epilogue, both directions. Mirrors mvit2_kernels/triton/separable_layer.py; the contracts are
// separable_layer_{context,epilogue}_{forward,backward}_reference in reference.py.
//
//   context forward,  block per row (b, p):  scores | max, sum | s | x̄
//   context backward, block per row:         dx̄ · x̄ | ds -> dq | dx, row partial of dw_q
//                     then dw_q = the rows' partials summed in row order (no atomics)
//   (when B·P rows are too few blocks, both split each row's channels over several blocks:
//    partial scores or ds per chunk | a block per row sums them in chunk order | x̄ or dx)
//   epilogue forward,  flat over v's vectors:        y = relu(v) ctx
//   epilogue backward, lane group per row of N:      dv = g ctx [v > 0], dctx = Σ_n g relu(v)
//
// A row of x is a [D, N] matrix (d at stride P·N, n contiguous). Its block's lane groups of
// `group` lanes take the d's in turn, each lane a W-vector of n per panel of group·W columns:
// loads are coalesced along n, and sums over d (scores, ds) end with the groups' partials summed
// in group order through shared memory, sums over n (x̄, dw_q) with a shuffle within the group.
// The per-row vectors (scores then s; dq and s) live in shared memory up to kRowCacheBytes, else
// in global memory (s itself, a workspace) through the same pointer: any N works.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../separable_layer_checks.h"
#include "common.cuh"

namespace mvit2 {
namespace {

constexpr const char* kOp = "separable_layer";
// d rows whose loads a lane issues before it uses any of them (memory-level parallelism).
constexpr int kBatch = 4;
// Shared memory for a row's vectors: N ≤ 8192 (forward) or 4096 (backward) in float32. With the
// static arrays this stays under the 48 KiB a block gets without opting in.
constexpr int64_t kRowCacheBytes = 32 * 1024;
// Context blocks wanted when B·P is small: ~4 per SM of a 132-SM H100 (as separable_attention.cu).
constexpr int64_t kMinBlocks = 512;

// How a launch splits each row's channels: `chunks` blocks per row, each owning `chunk_d`
// consecutive d's (a whole number of d slots, see RowTile). One chunk is the fused path: a block
// per row runs the whole pass. A function of the shape alone, so results do not depend on the
// device.
struct Split {
  int64_t chunks, chunk_d;
};

// Where a context block works: row (b, p) of x, channels [d0, d1). Lane group grp owns d = d0 +
// grp + slot·groups (slot = 0 .. slots-1), its lane the W-vectors j = pan·group + lane (pan = 0
// .. panels-1). slots and panels are block-uniform, so every lane runs every shuffle and barrier.
struct RowTile {
  int64_t D, P, N, row, b, p, vecs, panels;
  int group, lane, grp, groups;
  int64_t d0, d1, slots, x_row, x_sd;  // x_row: element (b, 0, p, 0); x_sd: the stride of d

  __device__ RowTile(int64_t D_, int64_t P_, int64_t N_, int W, int group_, const Split& sp)
      : D(D_), P(P_), N(N_), row(blockIdx.x / sp.chunks), b(row / P_), p(row % P_), vecs(N_ / W),
        panels((vecs + group_ - 1) / group_), group(group_), lane(threadIdx.x & (group_ - 1)),
        grp(threadIdx.x / group_), groups(kThreads / group_),
        d0(blockIdx.x % sp.chunks * sp.chunk_d), d1(d0 + sp.chunk_d < D_ ? d0 + sp.chunk_d : D_),
        slots((d1 - d0 + groups - 1) / groups), x_row((b * D_ * P_ + p) * N_), x_sd(P_ * N_) {}

  __device__ int64_t d(int64_t slot) const { return d0 + grp + slot * groups; }  // may be ≥ d1
  __device__ int64_t vec(int64_t pan) const { return pan * group + lane; }  // may be ≥ vecs
  __device__ bool active(int64_t slot, int64_t pan) const {
    return d(slot) < d1 && vec(pan) < vecs;
  }
  __device__ int64_t at(int64_t slot, int64_t pan, int W) const {  // the lane's x vector
    return x_row + d(slot) * x_sd + vec(pan) * W;
  }
  __device__ int64_t col(int64_t d) const { return (b * D + d) * P + p; }  // in [B, D, P]
};

// The lane's x vectors of the d slots slot0 .. slot0 + U - 1 in panel pan, where active.
template <int W, int U, typename scalar_t>
__device__ __forceinline__ void load_x(const RowTile& rt, const scalar_t* x, int64_t slot0,
                                       int64_t pan, Pack<scalar_t, W> (&xv)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (rt.active(slot0 + u, pan)) xv[u] = load_pack<scalar_t, W>(x + rt.at(slot0 + u, pan, W));
}

// out(n, Σ_d coef(d) x[d, n]) over the block's d's, for every n of the row, panel by panel: each
// thread sums its d's for its W columns, then column t of the panel sums the groups' partials in
// group order (red_s is [W][kThreads + pad]; the pad spreads one warp's reads over the banks).
template <int W, typename scalar_t, typename acc_t, typename Coef, typename Out>
__device__ void column_sums(const RowTile& rt, const scalar_t* x, const Coef& coef, acc_t* red_s,
                            const Out& out) {
  constexpr int kStride = kThreads + 32 / W;
  for (int64_t pan = 0; pan < rt.panels; ++pan) {
    acc_t acc[W] = {};
    for (int64_t slot0 = 0; slot0 < rt.slots; slot0 += kBatch) {
      Pack<scalar_t, W> xv[kBatch];
      load_x(rt, x, slot0, pan, xv);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (!rt.active(slot0 + u, pan)) continue;
        const acc_t c = coef(rt.d(slot0 + u));
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] += c * static_cast<acc_t>(xv[u].v[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < W; ++e) red_s[e * kStride + threadIdx.x] = acc[e];
    __syncthreads();
    const int cols = rt.group * W, t = threadIdx.x;
    const int64_t n = pan * cols + t;
    if (t < cols && n < rt.N) {
      acc_t sum = 0;
      for (int g = 0; g < rt.groups; ++g) sum += red_s[(t % W) * kStride + g * rt.group + t / W];
      out(n, sum);
    }
    __syncthreads();  // red_s is rewritten by the next panel; out's writes are published
  }
}

// The split kernels' first pass: the block's partial Σ_d coef(rt, d) x[d, n] over its d's,
// for every n, into part[(row, chunk), :].
template <int W, typename Args, typename Coef>
__device__ __forceinline__ void chunk_column_sums(const Args& a, const Coef& coef) {
  using acc_t = std::remove_pointer_t<decltype(a.part)>;
  __shared__ acc_t red_s[W * (kThreads + 32 / W)];
  const RowTile rt(a.D, a.P, a.N, W, a.group, a.split);
  acc_t* part = a.part + static_cast<int64_t>(blockIdx.x) * a.N;
  column_sums<W>(
      rt, a.x, [&](int64_t d) { return coef(rt, d); }, red_s,
      [&](int64_t n, acc_t sum) { part[n] = sum; });
}

template <typename scalar_t>
struct ContextForwardArgs {
  const scalar_t *x, *w_q;
  at::opmath_type<scalar_t> *s, *xbar;  // [B, P, N], [B, D, P]
  at::opmath_type<scalar_t>* part;      // split: [B·P, chunks, N] partial scores
  int64_t D, P, N;
  int group;
  bool cached;  // fused: the row's scores in shared memory (else in s)
  Split split;  // the split kernels' (the fused ones use {1, D}, constants)
};

// x̄[d] = Σ_n s[n] x[d, n] for the block's d's: kBatch d's at a time, each lane over its
// vectors, then the group.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void xbar_pass(const RowTile& rt, const scalar_t* x, const acc_t* s,
                                          acc_t* xbar) {
  for (int64_t slot0 = 0; slot0 < rt.slots; slot0 += kBatch) {
    acc_t acc[kBatch] = {};
    for (int64_t pan = 0; pan < rt.panels; ++pan) {
      if (rt.vec(pan) >= rt.vecs) continue;  // (no shuffle or barrier in this loop)
      Pack<scalar_t, W> xv[kBatch];
      load_x(rt, x, slot0, pan, xv);
      acc_t sv[W];
      load_accs<W>(s + rt.vec(pan) * W, sv);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (!rt.active(slot0 + u, pan)) continue;
#pragma unroll
        for (int e = 0; e < W; ++e) acc[u] += sv[e] * static_cast<acc_t>(xv[u].v[e]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const acc_t sum = group_sum(acc[u], rt.group);
      if (rt.lane == 0 && rt.d(slot0 + u) < rt.d1) xbar[rt.col(rt.d(slot0 + u))] = sum;
    }
  }
}

// Fused (a block per row): scores q[n] = w_q · x[:, n] (q's bias cancels in the softmax) | max,
// sum | s | x̄, the row read twice, the second time from L2.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_forward_kernel(const ContextForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red_s[W * (kThreads + 32 / W)];
  __shared__ acc_t red[kWarps];
  extern __shared__ __align__(16) unsigned char row_cache[];
  const RowTile rt(a.D, a.P, a.N, W, a.group, Split{1, a.D});
  acc_t* s = a.s + rt.row * a.N;
  acc_t* q = a.cached ? reinterpret_cast<acc_t*>(row_cache) : s;  // raw scores, then s

  column_sums<W>(
      rt, a.x, [&](int64_t d) { return static_cast<acc_t>(a.w_q[d]); }, red_s,
      [&](int64_t n, acc_t sum) { q[n] = sum; });
  acc_t mx, inv;
  softmax_stats(q, a.N, red, mx, inv);
  for (int64_t n = threadIdx.x; n < a.N; n += kThreads) {  // the n's this thread read above
    const acc_t sn = exp_acc(q[n] - mx) * inv;
    q[n] = sn;
    if (a.cached) s[n] = sn;
  }
  __syncthreads();
  // x̄ as xbar_pass, written out here with d < D (= d1): through xbar_pass, ptxas spilled the
  // bf16 W = 8 build for sm_90 at the 80-register bound, which this fast path never did.
  for (int64_t slot0 = 0; slot0 < rt.slots; slot0 += kBatch) {
    acc_t acc[kBatch] = {};
    for (int64_t pan = 0; pan < rt.panels; ++pan) {
      if (rt.vec(pan) >= rt.vecs) continue;  // (no shuffle or barrier in this loop)
      Pack<scalar_t, W> xv[kBatch];
      load_x(rt, a.x, slot0, pan, xv);
      acc_t sv[W];
      load_accs<W>(q + rt.vec(pan) * W, sv);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (!rt.active(slot0 + u, pan)) continue;
#pragma unroll
        for (int e = 0; e < W; ++e) acc[u] += sv[e] * static_cast<acc_t>(xv[u].v[e]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const acc_t sum = group_sum(acc[u], rt.group);
      if (rt.lane == 0 && rt.d(slot0 + u) < a.D) a.xbar[rt.col(rt.d(slot0 + u))] = sum;
    }
  }
}

// Split, when B·P rows are too few blocks to fill the GPU: each of a row's `chunks` blocks sums
// the scores over its d's, then one block per row sums the chunks' partials in chunk order and
// normalises s, then each chunk's block computes x̄ for its d's. No atomics: deterministic.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_scores_kernel(const ContextForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  chunk_column_sums<W>(a, [&](const RowTile&, int64_t d) { return static_cast<acc_t>(a.w_q[d]); });
}

// s = softmax(Σ_chunk part[row, chunk, :]), a block per row; each thread reads and rewrites its
// own n's, as the fused kernel does.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    separable_layer_context_softmax_kernel(const acc_t* part, acc_t* s_all, int64_t N,
                                           int64_t chunks) {
  __shared__ acc_t red[kWarps];
  const int64_t row = blockIdx.x;
  acc_t* s = s_all + row * N;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    acc_t q = 0;
    for (int64_t c = 0; c < chunks; ++c) q += part[(row * chunks + c) * N + n];
    s[n] = q;
  }
  acc_t mx, inv;
  softmax_stats(static_cast<const acc_t*>(s), N, red, mx, inv);
  for (int64_t n = threadIdx.x; n < N; n += kThreads) s[n] = exp_acc(s[n] - mx) * inv;
}

template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_xbar_kernel(const ContextForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowTile rt(a.D, a.P, a.N, W, a.group, a.split);
  xbar_pass<W>(rt, a.x, static_cast<const acc_t*>(a.s + rt.row * a.N), a.xbar);
}

template <typename scalar_t>
struct ContextBackwardArgs {
  const scalar_t *x, *w_q;
  const at::opmath_type<scalar_t> *gx, *s, *xbar;  // [B, D, P], [B, P, N], [B, D, P]
  scalar_t* dx;
  at::opmath_type<scalar_t> *dq_ws, *dw_rows;  // [B·P, N] (unless cached), [B·P, D]
  at::opmath_type<scalar_t>* part;             // split: [B·P, chunks, N] partial ds
  int64_t D, P, N;
  int group;
  bool cached;  // fused: dq and s of the row in shared memory (else dq_ws and s)
  Split split;  // the split kernels' (the fused ones use {1, D}, constants)
};

// Σ_n s[n] ds[n] = dx̄ · x̄ over all D: the softmax backward's dot product without a pass over x.
template <typename acc_t>
__device__ __forceinline__ acc_t softmax_dot(const acc_t* gx, const acc_t* xbar, int64_t b,
                                             int64_t p, int64_t D, int64_t P, acc_t* red) {
  acc_t dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const int64_t i = (b * D + d) * P + p;
    dot += gx[i] * xbar[i];
  }
  return block_reduce(dot, [](acc_t u, acc_t v) { return u + v; }, red);
}

// dx[d, n] = dx̄[d] s[n] + w_q[d] dq[n] for the block's d's, and the row's dw_q partials
// Σ_n dq[n] x[d, n]. x is loaded and dx stored, so half the d's per step keep the bytes in flight
// of the other passes (and the registers under the launch bound).
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void dx_pass(const RowTile& rt, const ContextBackwardArgs<scalar_t>& a,
                                        const acc_t* s, const acc_t* dq) {
  constexpr int kBatchDx = kBatch / 2;
  for (int64_t slot0 = 0; slot0 < rt.slots; slot0 += kBatchDx) {
    acc_t gxd[kBatchDx], wd[kBatchDx], dw[kBatchDx] = {};
#pragma unroll
    for (int u = 0; u < kBatchDx; ++u) {
      const int64_t d = rt.d(slot0 + u);
      gxd[u] = d < rt.d1 ? a.gx[rt.col(d)] : acc_t(0);
      wd[u] = d < rt.d1 ? static_cast<acc_t>(a.w_q[d]) : acc_t(0);
    }
    for (int64_t pan = 0; pan < rt.panels; ++pan) {
      if (rt.vec(pan) >= rt.vecs) continue;  // (no shuffle or barrier in this loop)
      Pack<scalar_t, W> xv[kBatchDx];
      load_x(rt, a.x, slot0, pan, xv);
      acc_t sv[W], dqv[W];
      load_accs<W>(s + rt.vec(pan) * W, sv);
      load_accs<W>(dq + rt.vec(pan) * W, dqv);
#pragma unroll
      for (int u = 0; u < kBatchDx; ++u) {
        if (!rt.active(slot0 + u, pan)) continue;
        Pack<scalar_t, W> out;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          out.v[e] = static_cast<scalar_t>(gxd[u] * sv[e] + wd[u] * dqv[e]);
          dw[u] += dqv[e] * static_cast<acc_t>(xv[u].v[e]);
        }
        store_pack(a.dx + rt.at(slot0 + u, pan, W), out);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatchDx; ++u) {
      const acc_t sum = group_sum(dw[u], rt.group);
      if (rt.lane == 0 && rt.d(slot0 + u) < rt.d1) a.dw_rows[rt.row * a.D + rt.d(slot0 + u)] = sum;
    }
  }
}

// Fused (a block per row): dot | ds -> dq = s (ds - dot), ds[n] = Σ_d dx̄[d] x[d, n] | dx, dw_q
// partials, summed over rows by separable_layer_dw_q_kernel.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_backward_kernel(const ContextBackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red_s[W * (kThreads + 32 / W)];
  __shared__ acc_t red[kWarps];
  extern __shared__ __align__(16) unsigned char row_cache[];
  const RowTile rt(a.D, a.P, a.N, W, a.group, Split{1, a.D});
  const acc_t* s_in = a.s + rt.row * a.N;
  acc_t* dq = a.cached ? reinterpret_cast<acc_t*>(row_cache) : a.dq_ws + rt.row * a.N;
  acc_t* s_cache = reinterpret_cast<acc_t*>(row_cache) + a.N;  // used only when cached
  const acc_t* s = a.cached ? s_cache : s_in;

  const acc_t dot = softmax_dot(a.gx, a.xbar, rt.b, rt.p, a.D, a.P, red);
  column_sums<W>(
      rt, a.x, [&](int64_t d) { return a.gx[rt.col(d)]; }, red_s,
      [&](int64_t n, acc_t ds) {
        const acc_t sn = s_in[n];
        dq[n] = sn * (ds - dot);
        if (a.cached) s_cache[n] = sn;
      });
  dx_pass<W>(rt, a, s, static_cast<const acc_t*>(dq));
}

// Split, as the forward: each chunk's block sums ds over its d's; a block per row sums the
// chunks' partials in chunk order into dq; each chunk's block writes dx and dw_q partials.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_ds_kernel(const ContextBackwardArgs<scalar_t> a) {
  chunk_column_sums<W>(a, [&](const RowTile& rt, int64_t d) { return a.gx[rt.col(d)]; });
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    separable_layer_context_dq_kernel(const acc_t* part, const acc_t* gx, const acc_t* xbar,
                                      const acc_t* s_all, acc_t* dq_ws, int64_t D, int64_t P,
                                      int64_t N, int64_t chunks) {
  __shared__ acc_t red[kWarps];
  const int64_t row = blockIdx.x;
  const acc_t dot = softmax_dot(gx, xbar, row / P, row % P, D, P, red);
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    acc_t ds = 0;
    for (int64_t c = 0; c < chunks; ++c) ds += part[(row * chunks + c) * N + n];
    dq_ws[row * N + n] = s_all[row * N + n] * (ds - dot);
  }
}

template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_layer_context_dx_kernel(const ContextBackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowTile rt(a.D, a.P, a.N, W, a.group, a.split);
  dx_pass<W>(rt, a, a.s + rt.row * a.N, static_cast<const acc_t*>(a.dq_ws + rt.row * a.N));
}

// dw_q[d] = Σ_row dw_rows[row, d] in a fixed order: a block per 32 d's (coalesced), its warps
// summing rows warp, warp + kWarps, ..., then the warps' sums in warp order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    separable_layer_dw_q_kernel(const acc_t* dw_rows, acc_t* dw_q, int64_t rows, int64_t D) {
  __shared__ acc_t part[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  acc_t sum = 0;
  if (d < D)
    for (int64_t r = warp; r < rows; r += kWarps) sum += dw_rows[r * D + d];
  part[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && d < D) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += part[w][lane];
    dw_q[d] = total;
  }
}

// y = relu(v) ctx[r] over v as [R = B·C·P, N], one W-vector per thread and step; the row r of
// vector i = r·vpr + j is kept incrementally (no 64-bit division per step).
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads)
    separable_layer_epilogue_forward_kernel(const scalar_t* v, const at::opmath_type<scalar_t>* ctx,
                                            scalar_t* y, int64_t R, int64_t vpr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t dr = step / vpr, dj = step % vpr;
  for (int64_t r = first / vpr, j = first % vpr; r < R;) {
    const int64_t i = (r * vpr + j) * W;
    const Pack<scalar_t, W> vv = load_pack<scalar_t, W>(v + i);
    const acc_t c = ctx[r];
    Pack<scalar_t, W> out;
#pragma unroll
    for (int e = 0; e < W; ++e)
      out.v[e] = static_cast<scalar_t>(relu(static_cast<acc_t>(vv.v[e])) * c);
    store_pack(y + i, out);
    r += dr;
    j += dj;
    if (j >= vpr) {
      j -= vpr;
      ++r;
    }
  }
}

// A lane group per row r of [R = B·C·P, N]: dv = g ctx where v > 0 (autograd's relu backward, a
// select: 0 * inf stays 0 and NaN v passes the gradient), dctx[r] = Σ_n g relu(v) over the lanes'
// vectors, then the group. The loop over row bases is block-uniform, for the shuffles.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads)
    separable_layer_epilogue_backward_kernel(const scalar_t* g, const scalar_t* v,
                                             const at::opmath_type<scalar_t>* ctx, scalar_t* dv,
                                             at::opmath_type<scalar_t>* dctx, int64_t R, int64_t N,
                                             int group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & (group - 1), groups = kThreads / group;
  const int64_t vecs = N / W, grp = threadIdx.x / group;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < R;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t r = base + grp;
    const acc_t c = r < R ? ctx[r] : acc_t(0);
    acc_t acc = 0;
    for (int64_t j = lane; r < R && j < vecs; j += group) {
      const int64_t i = r * N + j * W;
      const Pack<scalar_t, W> gv = load_pack<scalar_t, W>(g + i);
      const Pack<scalar_t, W> vv = load_pack<scalar_t, W>(v + i);
      Pack<scalar_t, W> out;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const acc_t gn = static_cast<acc_t>(gv.v[e]), vn = static_cast<acc_t>(vv.v[e]);
        out.v[e] = static_cast<scalar_t>(vn <= acc_t(0) ? acc_t(0) : gn * c);
        acc += gn * relu(vn);
      }
      store_pack(dv + i, out);
    }
    acc = group_sum(acc, group);
    if (r < R && lane == 0) dctx[r] = acc;
  }
}

// Blocks of a grid-stride kernel over `items` of `per_block` per block and step: capped, since
// each thread then loops.
int strided_grid(int64_t items, int64_t per_block) {
  return grid_size(std::min<int64_t>((items + per_block - 1) / per_block, 1 << 20), kOp);
}

// A row's channel chunks: enough blocks for kMinBlocks when B·P rows alone are too few, each
// chunk a whole number of d slots (kThreads / group d's) so that no lane group idles; one chunk
// (the fused path) when B·P already fills the GPU or D has a single slot.
Split split_of(int64_t rows, int64_t D, int group) {
  const int64_t groups = kThreads / group, slots = (D + groups - 1) / groups;
  const int64_t want = std::min((kMinBlocks + rows - 1) / rows, slots);
  if (want <= 1) return {1, std::max<int64_t>(D, 1)};
  const int64_t per = (slots + want - 1) / want;  // slots per chunk
  return {(slots + per - 1) / per, per * groups};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_layer_context_forward_cuda(const at::Tensor& x,
                                                                        const at::Tensor& w_q) {
  check_layer_context_forward_inputs(x, w_q);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3), rows = B * P;
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor s = at::empty({B, P, N}, acc);
  if (s.numel() == 0) return {s, at::zeros({B, D, P}, acc)};  // x̄ is an empty sum
  at::Tensor xbar = at::empty({B, D, P}, acc);  // D = 0 still launches: s = 1/N
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "separable_layer_context_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        with_vector_width<scalar_t>(N, {&x}, [&](auto w) {
          constexpr int W = decltype(w)::value;
          const int group = lanes_per_row(N, W);
          const Split split = split_of(rows, D, group);
          const bool cached = N * static_cast<int64_t>(sizeof(acc_t)) <= kRowCacheBytes;
          const at::Tensor part = at::empty({split.chunks > 1 ? rows * split.chunks * N : 0}, acc);
          const ContextForwardArgs<scalar_t> a{
              x.const_data_ptr<scalar_t>(), w_q.const_data_ptr<scalar_t>(),
              s.mutable_data_ptr<acc_t>(), xbar.mutable_data_ptr<acc_t>(),
              part.mutable_data_ptr<acc_t>(), D, P, N, group, cached, split};
          if (split.chunks == 1) {
            separable_layer_context_forward_kernel<scalar_t, W>
                <<<grid_size(rows, kOp), kThreads, cached ? N * sizeof(acc_t) : 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
          const int blocks = grid_size(rows * split.chunks, kOp);
          separable_layer_context_scores_kernel<scalar_t, W><<<blocks, kThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          separable_layer_context_softmax_kernel<acc_t>
              <<<grid_size(rows, kOp), kThreads, 0, stream>>>(
                  part.const_data_ptr<acc_t>(), s.mutable_data_ptr<acc_t>(), N, split.chunks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          separable_layer_context_xbar_kernel<scalar_t, W><<<blocks, kThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {s, xbar};
}

std::tuple<at::Tensor, at::Tensor> separable_layer_context_backward_cuda(
    const at::Tensor& grad_xbar, const at::Tensor& x, const at::Tensor& w_q,
    const at::Tensor& s_in, const at::Tensor& xbar) {
  check_layer_context_backward_inputs(grad_xbar, x, w_q, s_in, xbar);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3), rows = B * P;
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dx.numel() == 0) return {dx, at::zeros({D}, acc)};  // no (b, p, n) term in dw_q
  // s is read in vectors of up to 16 bytes when it is not cached: a view at an odd offset is
  // copied (the layer passes the forward's own, aligned s).
  const at::Tensor s =
      reinterpret_cast<std::uintptr_t>(s_in.const_data_ptr()) % 16 == 0 ? s_in : s_in.clone();
  at::Tensor dw_q = at::empty({D}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "separable_layer_context_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor dw_rows = at::empty({rows, D}, acc);
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        with_vector_width<scalar_t>(N, {&x, &dx}, [&](auto w) {
          constexpr int W = decltype(w)::value;
          const int group = lanes_per_row(N, W);
          const Split split = split_of(rows, D, group);
          const bool cached =
              split.chunks == 1 && 2 * N * static_cast<int64_t>(sizeof(acc_t)) <= kRowCacheBytes;
          const at::Tensor dq_ws = at::empty({cached ? 0 : rows, N}, acc);
          const at::Tensor part = at::empty({split.chunks > 1 ? rows * split.chunks * N : 0}, acc);
          const ContextBackwardArgs<scalar_t> a{
              x.const_data_ptr<scalar_t>(), w_q.const_data_ptr<scalar_t>(),
              grad_xbar.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
              xbar.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
              dq_ws.mutable_data_ptr<acc_t>(), dw_rows.mutable_data_ptr<acc_t>(),
              part.mutable_data_ptr<acc_t>(), D, P, N, group, cached, split};
          if (split.chunks == 1) {
            separable_layer_context_backward_kernel<scalar_t, W>
                <<<grid_size(rows, kOp), kThreads, cached ? 2 * N * sizeof(acc_t) : 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
          const int blocks = grid_size(rows * split.chunks, kOp);
          separable_layer_context_ds_kernel<scalar_t, W><<<blocks, kThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          separable_layer_context_dq_kernel<acc_t><<<grid_size(rows, kOp), kThreads, 0, stream>>>(
              part.const_data_ptr<acc_t>(), grad_xbar.const_data_ptr<acc_t>(),
              xbar.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
              dq_ws.mutable_data_ptr<acc_t>(), D, P, N, split.chunks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          separable_layer_context_dx_kernel<scalar_t, W><<<blocks, kThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        separable_layer_dw_q_kernel<acc_t>
            <<<grid_size((D + 31) / 32, kOp), kThreads, 0, stream>>>(
                dw_rows.const_data_ptr<acc_t>(), dw_q.mutable_data_ptr<acc_t>(), rows, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {dx, dw_q};
}

at::Tensor separable_layer_epilogue_forward_cuda(const at::Tensor& v, const at::Tensor& ctx) {
  check_layer_epilogue_inputs(v, ctx);
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t N = v.size(3), R = v.size(0) * v.size(1) * v.size(2);
  at::Tensor y = at::empty(v.sizes(), v.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, v.scalar_type(), "separable_layer_epilogue_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_vector_width<scalar_t>(N, {&v, &y}, [&](auto w) {
          constexpr int W = decltype(w)::value;
          separable_layer_epilogue_forward_kernel<scalar_t, W>
              <<<strided_grid(R * (N / W), kThreads), kThreads, 0,
                 c10::cuda::getCurrentCUDAStream()>>>(v.const_data_ptr<scalar_t>(),
                                                      ctx.const_data_ptr<acc_t>(),
                                                      y.mutable_data_ptr<scalar_t>(), R, N / W);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> separable_layer_epilogue_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& v, const at::Tensor& ctx) {
  check_layer_epilogue_backward_inputs(grad_y, v, ctx);
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t N = v.size(3), R = ctx.numel();
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dv.numel() == 0) return {dv, at::zeros(ctx.sizes(), ctx.options())};  // N = 0: empty sums
  at::Tensor dctx = at::empty(ctx.sizes(), ctx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, v.scalar_type(), "separable_layer_epilogue_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_vector_width<scalar_t>(N, {&grad_y, &v, &dv}, [&](auto w) {
          constexpr int W = decltype(w)::value;
          const int group = lanes_per_row(N, W);
          separable_layer_epilogue_backward_kernel<scalar_t, W>
              <<<strided_grid(R, kThreads / group), kThreads, 0,
                 c10::cuda::getCurrentCUDAStream()>>>(
                  grad_y.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                  ctx.const_data_ptr<acc_t>(), dv.mutable_data_ptr<scalar_t>(),
                  dctx.mutable_data_ptr<acc_t>(), R, N, group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {dv, dctx};
}

TORCH_LIBRARY_IMPL(mvit2, CUDA, m) {
  m.impl("separable_layer_context_forward", &separable_layer_context_forward_cuda);
  m.impl("separable_layer_context_backward", &separable_layer_context_backward_cuda);
  m.impl("separable_layer_epilogue_forward", &separable_layer_epilogue_forward_cuda);
  m.impl("separable_layer_epilogue_backward", &separable_layer_epilogue_backward_cuda);
}

}  // namespace mvit2
