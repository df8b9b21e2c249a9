// Separable self-attention (MobileViTv2), CUDA: one block per (row b·P+p, channel tile) streams
// the tile's k and v rows (forward) or grad_y, v and k rows (backward) once, with 16-byte loads
// where alignment allows, accumulating fp16/bf16 in float32. Mirrors csrc/cpu/
// separable_attention.cpp; the maths is DESIGN.md §1; mvit2_kernels/reference.py is the oracle.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "../checks.h"

namespace mvit2 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Channels whose loads a lane issues before it uses any of them (memory-level parallelism).
constexpr int kBatch = 4;
// Bounds the per-block shared ctx/dctx arrays (4 KiB each in float32).
constexpr int64_t kMaxChannelTile = 1024;
// Blocks wanted per launch when B·P is small: ≥ 2 waves of 2 blocks on a 132-SM H100.
constexpr int64_t kMinBlocks = 512;
// Bytes of each streamed tensor per block (the tile is ~16 KiB of k, of v, ...): with B=256 the
// grid then has several waves, so the tail wave costs little.
constexpr int64_t kTileBytes = 16 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

struct RowStrides {  // element strides of dims 0..2; dim 3 (N) has unit stride
  int64_t b, c, p;
};

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// How a launch splits the channels, and how a block's threads split a channel row: `group`
// lanes (a power of two ≤ 32, so shuffles stay inside a warp) read W-element vectors of one
// row, and the block's kThreads / group groups take the tile's channels in turn. A function of
// the shape alone, so the backward's cross-tile ds sum has one fixed order on every device.
struct Tiling {
  int64_t tiles;     // channel tiles per row
  int64_t channels;  // channels per tile (the last tile may hold fewer)
  int group;
};

Tiling tiling(int64_t rows, int64_t C, int64_t N, int W, int64_t elem_size) {
  const int64_t vecs = N / W;
  int group = 1;
  while (group < 32 && group < vecs) group *= 2;
  const int64_t groups = kThreads / group;
  if (C == 0) return {1, 1, group};  // one (empty) tile per row still writes dq = s * 0
  const int64_t want_tiles = (kMinBlocks + rows - 1) / rows;
  const int64_t fill = (C + want_tiles - 1) / want_tiles;
  // At least one channel per group, or some warps would idle.
  const int64_t budget = std::max(kTileBytes / elem_size / std::max<int64_t>(N, 1), groups);
  const int64_t per = std::max<int64_t>(1, std::min({fill, budget, C, kMaxChannelTile}));
  const int64_t tiles = (C + per - 1) / per;
  return {tiles, (C + tiles - 1) / tiles, group};
}

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

// Inputs are read-only for the kernel's life: load through the non-coherent path (ld.global.nc).
template <typename scalar_t, int W>
__device__ __forceinline__ Pack<scalar_t, W> load_pack(const scalar_t* p) {
  using PackT = Pack<scalar_t, W>;
  PackT out;
  if constexpr (sizeof(PackT) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, sizeof(out));
  } else if constexpr (sizeof(PackT) == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(&out, &raw, sizeof(out));
  } else if constexpr (sizeof(PackT) == 4) {
    const unsigned raw = __ldg(reinterpret_cast<const unsigned*>(p));
    memcpy(&out, &raw, sizeof(out));
  } else {
    out = *reinterpret_cast<const PackT*>(p);
  }
  return out;
}

template <typename scalar_t, int W>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, W>& x) {
  *reinterpret_cast<Pack<scalar_t, W>*>(p) = x;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// torch.relu and torch.max propagate NaN; fmaxf would drop it.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return (x > acc_t(0) || x != x) ? x : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t max_nan(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// Sum over the `group` lanes of an aligned lane group; every lane gets the same bits (a + b is
// commutative). All 32 lanes of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// Block-wide reduction in a fixed order; every thread gets the result. `red`: kWarps values.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t x, Op op, acc_t* red) {
  for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_xor_sync(kFullMask, x, off));
  __syncthreads();  // an earlier reduction may still be reading red
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < kWarps; ++w) x = op(x, red[w]);
  return x;
}

// Max and 1 / Σ exp(q - max) of one q row, as the CPU's softmax_row: s[n] = exp(q[n]-mx) * inv.
template <typename scalar_t, typename acc_t>
__device__ void softmax_stats(const scalar_t* q, int64_t N, acc_t* red, acc_t& mx, acc_t& inv) {
  acc_t m = -INFINITY;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) m = max_nan(static_cast<acc_t>(q[n]), m);
  m = block_reduce(m, [](acc_t a, acc_t b) { return max_nan(a, b); }, red);
  acc_t sum = 0;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) sum += exp_acc(static_cast<acc_t>(q[n]) - m);
  sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; }, red);
  mx = m;
  inv = acc_t(1) / sum;
}

// s for the W columns of vector j of the row, zero past the row's end.
template <typename scalar_t, int W, typename acc_t>
__device__ __forceinline__ void softmax_pack(const scalar_t* q, int64_t j, bool in_row, acc_t mx,
                                             acc_t inv, acc_t (&s)[W]) {
  const Pack<scalar_t, W> qv = in_row ? load_pack<scalar_t, W>(q + j * W) : Pack<scalar_t, W>{};
#pragma unroll
  for (int e = 0; e < W; ++e) s[e] = in_row ? exp_acc(static_cast<acc_t>(qv.v[e]) - mx) * inv : 0;
}

// Where a block works: row (b, p) and channels [c0, c0 + cn). Its lane group `grp` owns the
// channels grp, grp + groups, ...; its lane reads vectors lane, lane + group, ... of each row.
struct BlockTile {
  int64_t row, tile, b, p, c0;
  int cn, group, lane, grp, groups, iters;  // iters: channel slots per group (block-uniform)
  int64_t vecs, panels;                     // W-vectors per row; group-wide column panels

  __device__ BlockTile(const Tiling& t, int64_t C, int64_t P, int64_t N, int W)
      : row(blockIdx.x / t.tiles), tile(blockIdx.x % t.tiles), b(row / P), p(row % P),
        c0(tile * t.channels), cn(static_cast<int>(C - c0 < t.channels ? C - c0 : t.channels)),
        group(t.group), lane(threadIdx.x & (t.group - 1)), grp(threadIdx.x / t.group),
        groups(kThreads / t.group), iters((cn + groups - 1) / groups), vecs(N / W),
        panels((vecs + group - 1) / group) {}

  __device__ int channel(int slot) const { return grp + slot * groups; }  // local, may be ≥ cn
};

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t *q, *k, *v;
  RowStrides qs, ks, vs;
  scalar_t* y;                          // contiguous [B, C, P, N]
  at::opmath_type<scalar_t>* ctx;       // contiguous [B, C, P, 1]
  int64_t C, P, N;
  Tiling t;
};

template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads)
    separable_attention_forward_kernel(const ForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, W>;
  __shared__ acc_t red[kWarps];
  __shared__ acc_t ctx_s[kMaxChannelTile];
  const BlockTile bt(a.t, a.C, a.P, a.N, W);
  const scalar_t* q = a.q + bt.b * a.qs.b + bt.p * a.qs.p;
  const auto k_row = [&](int c) { return a.k + bt.b * a.ks.b + (bt.c0 + c) * a.ks.c + bt.p * a.ks.p; };
  const auto v_row = [&](int c) { return a.v + bt.b * a.vs.b + (bt.c0 + c) * a.vs.c + bt.p * a.vs.p; };

  // Each ctx_s[c] is written only by lane 0 of the group owning c, so no barrier is needed here.
  if (bt.lane == 0)
    for (int c = bt.grp; c < bt.cn; c += bt.groups) ctx_s[c] = 0;

  // ctx[c] = Σ_n s[n] k[c, n]: panel by panel, s in registers, kBatch channels' loads in flight.
  // The first batch is loaded before the softmax statistics so that its latency overlaps their
  // block reductions.
  PackT kv[kBatch];
  const auto load_k = [&](int64_t pan, int slot0) {
    const int64_t j = pan * bt.group + bt.lane;
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (j < bt.vecs && bt.channel(slot0 + u) < bt.cn)
        kv[u] = load_pack<scalar_t, W>(k_row(bt.channel(slot0 + u)) + j * W);
  };
  if (bt.panels > 0 && bt.iters > 0) load_k(0, 0);
  acc_t mx, inv;
  softmax_stats(q, a.N, red, mx, inv);
  for (int64_t pan = 0; pan < bt.panels; ++pan) {
    const int64_t j = pan * bt.group + bt.lane;
    const bool in_row = j < bt.vecs;
    acc_t s[W];
    softmax_pack<scalar_t, W>(q, j, in_row, mx, inv, s);
    for (int slot0 = 0; slot0 < bt.iters; slot0 += kBatch) {
      if (pan > 0 || slot0 > 0) load_k(pan, slot0);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = bt.channel(slot0 + u);
        acc_t d = 0;
        if (in_row && c < bt.cn) {
#pragma unroll
          for (int e = 0; e < W; ++e) d += s[e] * static_cast<acc_t>(kv[u].v[e]);
        }
        d = group_sum(d, bt.group);
        if (bt.lane == 0 && c < bt.cn) ctx_s[c] += d;
      }
    }
  }
  __syncthreads();  // ctx_s complete

  for (int c = threadIdx.x; c < bt.cn; c += kThreads)
    a.ctx[((bt.b * a.C + bt.c0 + c) * a.P + bt.p)] = ctx_s[c];
  // y[c, n] = relu(v[c, n]) * ctx[c].
  for (int slot0 = 0; slot0 < bt.iters; slot0 += kBatch) {
    for (int64_t pan = 0; pan < bt.panels; ++pan) {
      const int64_t j = pan * bt.group + bt.lane;
      if (j >= bt.vecs) continue;  // no shuffles below: lanes may leave
      PackT vv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (bt.channel(slot0 + u) < bt.cn)
          vv[u] = load_pack<scalar_t, W>(v_row(bt.channel(slot0 + u)) + j * W);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = bt.channel(slot0 + u);
        if (c >= bt.cn) continue;
        const acc_t cx = ctx_s[c];
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e)
          out.v[e] = static_cast<scalar_t>(relu(static_cast<acc_t>(vv[u].v[e])) * cx);
        store_pack(a.y + ((bt.b * a.C + bt.c0 + c) * a.P + bt.p) * a.N + j * W, out);
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t *g, *q, *k, *v;
  const at::opmath_type<scalar_t>* ctx;
  RowStrides gs, qs, ks, vs, cs;
  scalar_t *dk, *dv;  // contiguous [B, C, P, N]
  // Workspace for the dq pass: per (row, tile) the partial ds[N] and Σ_c dctx·ctx; per row the
  // softmax max and 1/sum (every tile computes the same bits; tile 0 writes them).
  at::opmath_type<scalar_t> *ds_part, *dot_part, *stats;
  int64_t C, P, N;
  Tiling t;
};

// Pass A per (row, channel tile): dv and dctx from (grad_y, v). Pass B: dk and the tile's
// partial ds from k, summed across the block's lane groups in shared memory in a fixed order.
// The dq kernel then sums the tiles, also in a fixed order: the backward is deterministic.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads)
    separable_attention_backward_kernel(const BackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, W>;
  // ds_s is [W][kThreads + 32/W]: lane groups write it column-wise conflict-free, and the pad
  // spreads the reads of one warp (32/W lanes x W elements) over all 32 banks.
  constexpr int kDsStride = kThreads + 32 / W;
  __shared__ acc_t red[kWarps];
  __shared__ acc_t ctx_s[kMaxChannelTile], dctx_s[kMaxChannelTile];
  __shared__ acc_t ds_s[W * kDsStride];
  const BlockTile bt(a.t, a.C, a.P, a.N, W);
  const auto row_of = [&](const scalar_t* base, const RowStrides& st, int c) {
    return base + bt.b * st.b + (bt.c0 + c) * st.c + bt.p * st.p;
  };
  const auto out_row = [&](int c) { return ((bt.b * a.C + bt.c0 + c) * a.P + bt.p) * a.N; };

  // Pass A: dv = g * ctx where v > 0 (a select, as autograd's relu backward: 0 * inf stays 0);
  // dctx = Σ_n g * relu(v).
  for (int slot0 = 0; slot0 < bt.iters; slot0 += kBatch) {
    acc_t cx[kBatch], dc[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = bt.channel(slot0 + u);
      cx[u] = c < bt.cn ? a.ctx[bt.b * a.cs.b + (bt.c0 + c) * a.cs.c + bt.p * a.cs.p] : acc_t(0);
      dc[u] = 0;
    }
    for (int64_t pan = 0; pan < bt.panels; ++pan) {
      const int64_t j = pan * bt.group + bt.lane;
      PackT gv[kBatch], vv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = bt.channel(slot0 + u);
        if (j < bt.vecs && c < bt.cn) {
          gv[u] = load_pack<scalar_t, W>(row_of(a.g, a.gs, c) + j * W);
          vv[u] = load_pack<scalar_t, W>(row_of(a.v, a.vs, c) + j * W);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = bt.channel(slot0 + u);
        if (j >= bt.vecs || c >= bt.cn) continue;
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const acc_t gn = static_cast<acc_t>(gv[u].v[e]), vn = static_cast<acc_t>(vv[u].v[e]);
          out.v[e] = static_cast<scalar_t>(vn > acc_t(0) ? gn * cx[u] : acc_t(0));
          dc[u] += gn * relu(vn);
        }
        store_pack(a.dv + out_row(c) + j * W, out);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = bt.channel(slot0 + u);
      const acc_t d = group_sum(dc[u], bt.group);
      if (bt.lane == 0 && c < bt.cn) {
        dctx_s[c] = d;
        ctx_s[c] = cx[u];
      }
    }
  }

  acc_t mx, inv;
  softmax_stats(a.q + bt.b * a.qs.b + bt.p * a.qs.p, a.N, red, mx, inv);  // its barriers also
                                                                          // publish dctx_s
  const int64_t part = bt.row * a.t.tiles + bt.tile;
  if (bt.tile == 0 && threadIdx.x == 0) {
    a.stats[2 * bt.row] = mx;
    a.stats[2 * bt.row + 1] = inv;
  }
  if (threadIdx.x < 32) {  // Σ_c dctx·ctx over the tile, lane-strided then butterfly
    acc_t d = 0;
    for (int c = threadIdx.x; c < bt.cn; c += 32) d += dctx_s[c] * ctx_s[c];
    d = group_sum(d, 32);
    if (threadIdx.x == 0) a.dot_part[part] = d;
  }

  // Pass B: dk = dctx * s; ds[n] = Σ_c dctx[c] k[c, n] over the tile.
  const scalar_t* q = a.q + bt.b * a.qs.b + bt.p * a.qs.p;
  for (int64_t pan = 0; pan < bt.panels; ++pan) {
    const int64_t j = pan * bt.group + bt.lane;
    const bool in_row = j < bt.vecs;
    acc_t s[W], ds[W];
    softmax_pack<scalar_t, W>(q, j, in_row, mx, inv, s);
#pragma unroll
    for (int e = 0; e < W; ++e) ds[e] = 0;
    for (int slot0 = 0; slot0 < bt.iters; slot0 += kBatch) {
      PackT kv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (in_row && bt.channel(slot0 + u) < bt.cn)
          kv[u] = load_pack<scalar_t, W>(row_of(a.k, a.ks, bt.channel(slot0 + u)) + j * W);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = bt.channel(slot0 + u);
        if (!in_row || c >= bt.cn) continue;
        const acc_t d = dctx_s[c];
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          out.v[e] = static_cast<scalar_t>(d * s[e]);
          ds[e] += d * static_cast<acc_t>(kv[u].v[e]);
        }
        store_pack(a.dk + out_row(c) + j * W, out);
      }
    }
    // Column t = lane * W + e of the panel: sum the groups' partials in group order.
#pragma unroll
    for (int e = 0; e < W; ++e) ds_s[e * kDsStride + threadIdx.x] = ds[e];
    __syncthreads();
    const int cols = bt.group * W;
    if (static_cast<int>(threadIdx.x) < cols) {
      const int t = threadIdx.x, e = t % W, l = t / W;
      acc_t sum = 0;
      for (int g = 0; g < bt.groups; ++g) sum += ds_s[e * kDsStride + g * bt.group + l];
      const int64_t n = pan * cols + t;
      if (n < a.N) a.ds_part[part * a.N + n] = sum;
    }
    __syncthreads();  // ds_s is rewritten by the next panel
  }
}

template <typename scalar_t>
struct DqArgs {
  const scalar_t* q;
  RowStrides qs;
  const at::opmath_type<scalar_t> *ds_part, *dot_part, *stats;
  scalar_t* dq;  // contiguous [B, 1, P, N]
  int64_t rows, P, N, tiles;
};

// dq = s * (ds - Σ_c dctx·ctx), the tiles' partials summed in tile order; s recomputed from q
// with the statistics the main kernel saved (q and dq are 1/C of the traffic).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    separable_attention_backward_dq_kernel(const DqArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = a.rows * a.N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / a.N, n = i % a.N, b = row / a.P, p = row % a.P;
    acc_t dot = 0, ds = 0;
    for (int64_t t = 0; t < a.tiles; ++t) {
      dot += a.dot_part[row * a.tiles + t];
      ds += a.ds_part[(row * a.tiles + t) * a.N + n];
    }
    const acc_t x = static_cast<acc_t>(a.q[b * a.qs.b + p * a.qs.p + n]);
    const acc_t s = exp_acc(x - a.stats[2 * row]) * a.stats[2 * row + 1];
    a.dq[i] = static_cast<scalar_t>(s * (ds - dot));
  }
}

// W-element vectors need every row start aligned: the base pointer and the strides of dims 0..2
// (those of size > 1) multiples of W elements, and N a multiple of W (no tail).
bool vectorizable(int W, int64_t elem_size, int64_t N,
                  std::initializer_list<const at::Tensor*> ts) {
  if (N % W != 0) return false;
  for (const at::Tensor* t : ts) {
    if (reinterpret_cast<std::uintptr_t>(t->const_data_ptr()) % (W * elem_size) != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (t->size(d) > 1 && t->stride(d) % W != 0) return false;
  }
  return true;
}

// Calls f(std::integral_constant<int, W>) with the widest W (16 bytes, 8, 4, ... 1 element)
// the tensors allow: N = 36 in bf16 still gets 8-byte loads.
template <typename scalar_t, int W = 16 / sizeof(scalar_t), typename F>
void with_vector_width(int64_t N, std::initializer_list<const at::Tensor*> ts, const F& f) {
  if constexpr (W == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (vectorizable(W, sizeof(scalar_t), N, ts)) {
    f(std::integral_constant<int, W>{});
  } else {
    with_vector_width<scalar_t, W / 2>(N, ts, f);
  }
}

int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "separable_attention (CUDA): ", blocks,
              " blocks exceed the grid limit; split the batch");
  return static_cast<int>(blocks);
}

template <typename scalar_t, int W>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& y,
                    at::Tensor& ctx) {
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  ForwardArgs<scalar_t> a{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                          v.const_data_ptr<scalar_t>(), row_strides(q), row_strides(k),
                          row_strides(v), y.mutable_data_ptr<scalar_t>(),
                          ctx.mutable_data_ptr<at::opmath_type<scalar_t>>(), C, P, N,
                          tiling(B * P, C, N, W, sizeof(scalar_t))};
  separable_attention_forward_kernel<scalar_t, W>
      <<<grid_size(B * P * a.t.tiles), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int W>
void launch_backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& ctx, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3), rows = B * P;
  const Tiling t = tiling(rows, C, N, W, sizeof(scalar_t));
  at::Tensor ws = at::empty({rows * t.tiles * N + rows * t.tiles + 2 * rows},
                            k.options().dtype(acc_type(k.scalar_type())));
  acc_t* ds_part = ws.mutable_data_ptr<acc_t>();
  acc_t* dot_part = ds_part + rows * t.tiles * N;
  acc_t* stats = dot_part + rows * t.tiles;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BackwardArgs<scalar_t> a{g.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                           k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                           ctx.const_data_ptr<acc_t>(), row_strides(g), row_strides(q),
                           row_strides(k), row_strides(v), row_strides(ctx),
                           dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                           ds_part, dot_part, stats, C, P, N, t};
  separable_attention_backward_kernel<scalar_t, W>
      <<<grid_size(rows * t.tiles), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const DqArgs<scalar_t> d{q.const_data_ptr<scalar_t>(), row_strides(q), ds_part, dot_part,
                           stats, dq.mutable_data_ptr<scalar_t>(), rows, P, N, t.tiles};
  const int64_t dq_blocks = std::min<int64_t>((rows * N + kThreads - 1) / kThreads, 1 << 20);
  separable_attention_backward_dq_kernel<scalar_t>
      <<<grid_size(dq_blocks), kThreads, 0, stream>>>(d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_attention_forward_cuda(const at::Tensor& q_in,
                                                                    const at::Tensor& k_in,
                                                                    const at::Tensor& v_in) {
  check_separable_attention_inputs(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in),
                   v = unit_last_stride(v_in);
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  at::Tensor y = at::empty(k.sizes(), k.options());
  at::Tensor ctx = at::empty({B, C, P, 1}, k.options().dtype(acc_type(k.scalar_type())));
  if (y.numel() == 0 && ctx.numel() == 0) return {y, ctx};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, k.scalar_type(), "separable_attention_forward_cuda", [&] {
        with_vector_width<scalar_t>(N, {&q, &k, &v, &y}, [&](auto w) {
          launch_forward<scalar_t, decltype(w)::value>(q, k, v, y, ctx);
        });
      });
  return {y, ctx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_attention_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& ctx) {
  check_separable_attention_backward_inputs(grad_y_in, q_in, k_in, v_in, ctx);
  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor g = unit_last_stride(grad_y_in), q = unit_last_stride(q_in),
                   k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t N = k.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, k.scalar_type(), "separable_attention_backward_cuda", [&] {
        with_vector_width<scalar_t>(N, {&g, &q, &k, &v, &dk, &dv}, [&](auto w) {
          launch_backward<scalar_t, decltype(w)::value>(g, q, k, v, ctx, dq, dk, dv);
        });
      });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(mvit2, CUDA, m) {
  m.impl("separable_attention_forward", &separable_attention_forward_cuda);
  m.impl("separable_attention_backward", &separable_attention_backward_cuda);
}

}  // namespace mvit2
