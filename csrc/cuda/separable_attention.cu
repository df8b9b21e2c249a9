// Separable self-attention (MobileViTv2), CUDA: one block per (row b·P+p, channel tile) streams
// the tile's k and v rows (forward) or grad_y, v and k rows (backward) once, with vector loads of
// up to 16 bytes where alignment allows, accumulating fp16/bf16 in float32. Mirrors
// csrc/cpu/separable_attention.cpp; the maths is docs/design.md §1; reference.py is the oracle.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "common.cuh"

namespace mvit2 {
namespace {

constexpr const char* kOp = "separable_attention";
// Channels whose loads a lane issues before it uses any of them (memory-level parallelism).
constexpr int kBatch = 4;
// Bounds the shared ctx/dctx arrays of a block (4 KiB each in float32).
constexpr int64_t kMaxChannelTile = 1024;
// Blocks wanted when B·P is small: ~4 per SM of a 132-SM H100, so B=1 still fills it.
constexpr int64_t kMinBlocks = 512;
// Bytes of each streamed tensor per block: at B=256 the grid then has several waves.
constexpr int64_t kTileBytes = 16 * 1024;

// How a launch splits the channels, and how a block's threads split a channel row: `group`
// lanes (a power of two ≤ 32, so shuffles stay inside a warp) read W-element vectors of one row,
// and the block's kThreads / group lane groups take the tile's channels in turn. A function of the
// shape and W alone, not of the device, so the backward's ds sum has one order everywhere.
struct Tiling {
  int64_t tiles;     // channel tiles per row
  int64_t channels;  // channels per tile (the last tile may hold fewer)
  int group;
};

Tiling tiling(int64_t rows, int64_t C, int64_t N, int W, int64_t elem_size) {
  const int group = lanes_per_row(N, W);
  const int64_t groups = kThreads / group;
  if (C == 0) return {1, 1, group};  // one empty tile per row still writes dq = s * 0
  const int64_t want_tiles = (kMinBlocks + rows - 1) / rows;
  const int64_t fill = (C + want_tiles - 1) / want_tiles;
  // A whole number of channels per lane group (at least one) where B·P allows: no idle warps.
  const int64_t budget =
      std::max<int64_t>(1, kTileBytes / elem_size / std::max<int64_t>(N, 1) / groups) * groups;
  const int64_t per = std::max<int64_t>(1, std::min({fill, budget, C, kMaxChannelTile}));
  const int64_t tiles = (C + per - 1) / per;
  return {tiles, (C + tiles - 1) / tiles, group};
}

// Where a block works: row (b, p), channels [c0, c0 + cn). Lane group `grp` owns the tile's
// channels grp + slot·groups (slot = 0 .. slots-1); its `lane` reads the row's W-vectors
// j = pan·group + lane (pan = 0 .. panels-1). slots and panels are block-uniform, so every lane
// runs every shuffle and barrier.
struct BlockTile {
  int64_t row, tile, b, p, c0, vecs, panels;
  int cn, group, lane, grp, groups, slots;

  __device__ BlockTile(const Tiling& t, int64_t C, int64_t P, int64_t N, int W)
      : row(blockIdx.x / t.tiles), tile(blockIdx.x % t.tiles), b(row / P), p(row % P),
        c0(tile * t.channels), vecs(N / W), panels((vecs + t.group - 1) / t.group),
        cn(static_cast<int>(C - c0 < t.channels ? C - c0 : t.channels)), group(t.group),
        lane(threadIdx.x & (t.group - 1)), grp(threadIdx.x / t.group),
        groups(kThreads / t.group), slots((cn + groups - 1) / groups) {}

  __device__ int channel(int slot) const { return grp + slot * groups; }  // may be ≥ cn
  __device__ bool active(int slot, int64_t pan) const {
    return channel(slot) < cn && pan * group + lane < vecs;
  }
  template <typename T>
  __device__ T* row_start(const Rows<T>& r, int c) const {  // element (b, c0 + c, p, 0)
    return r.row(b, c0 + c, p);
  }
  // The lane's W-vector of channel slot `slot`, panel `pan`.
  template <int W, typename T>
  __device__ T* at(const Rows<T>& r, int slot, int64_t pan) const {
    return row_start(r, channel(slot)) + (pan * group + lane) * W;
  }
};

// s for the lane's W columns of panel pan, zero past the row's end.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_pack(const BlockTile& bt, const scalar_t* q, int64_t pan,
                                             acc_t mx, acc_t inv, acc_t (&s)[W]) {
  const int64_t j = pan * bt.group + bt.lane;
  const Pack<scalar_t, W> qv = j < bt.vecs ? load_pack<scalar_t, W>(q + j * W) : Pack<scalar_t, W>{};
#pragma unroll
  for (int e = 0; e < W; ++e)
    s[e] = j < bt.vecs ? exp_acc(static_cast<acc_t>(qv.v[e]) - mx) * inv : acc_t(0);
}

template <typename scalar_t>
struct ForwardArgs {
  Rows<const scalar_t> q, k, v;
  Rows<scalar_t> y;
  Rows<at::opmath_type<scalar_t>> ctx;  // [B, C, P, 1]
  int64_t C, P, N;
  Tiling t;
};

template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_attention_forward_kernel(const ForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, W>;
  __shared__ acc_t red[kWarps];
  __shared__ acc_t ctx_s[kMaxChannelTile];
  const BlockTile bt(a.t, a.C, a.P, a.N, W);
  const scalar_t* q = a.q.row(bt.b, 0, bt.p);

  // ctx_s[c] is only ever touched by lane 0 of the group owning c: no barrier needed.
  if (bt.lane == 0)
    for (int c = bt.grp; c < bt.cn; c += bt.groups) ctx_s[c] = 0;

  // ctx[c] = Σ_n s[n] k[c, n], panel by panel with s in registers and kBatch channels' loads in
  // flight. The first batch is loaded before the softmax statistics, to overlap their latency.
  PackT kv[kBatch];
  const auto load_k = [&](int slot0, int64_t pan) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (bt.active(slot0 + u, pan)) kv[u] = load_pack<scalar_t, W>(bt.at<W>(a.k, slot0 + u, pan));
  };
  load_k(0, 0);
  acc_t mx, inv;
  softmax_stats(q, a.N, red, mx, inv);
  for (int64_t pan = 0; pan < bt.panels; ++pan) {
    acc_t s[W];
    softmax_pack<W>(bt, q, pan, mx, inv, s);
    for (int slot0 = 0; slot0 < bt.slots; slot0 += kBatch) {
      if (pan > 0 || slot0 > 0) load_k(slot0, pan);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        acc_t d = 0;
        if (bt.active(slot0 + u, pan)) {
#pragma unroll
          for (int e = 0; e < W; ++e) d += s[e] * static_cast<acc_t>(kv[u].v[e]);
        }
        d = group_sum(d, bt.group);
        if (bt.lane == 0 && bt.channel(slot0 + u) < bt.cn) ctx_s[bt.channel(slot0 + u)] += d;
      }
    }
  }
  __syncthreads();  // ctx_s complete

  for (int c = threadIdx.x; c < bt.cn; c += kThreads) *bt.row_start(a.ctx, c) = ctx_s[c];
  // y[c, n] = relu(v[c, n]) * ctx[c].
  for (int slot0 = 0; slot0 < bt.slots; slot0 += kBatch) {
    for (int64_t pan = 0; pan < bt.panels; ++pan) {
      PackT vv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (bt.active(slot0 + u, pan)) vv[u] = load_pack<scalar_t, W>(bt.at<W>(a.v, slot0 + u, pan));
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (!bt.active(slot0 + u, pan)) continue;
        const acc_t cx = ctx_s[bt.channel(slot0 + u)];
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e)
          out.v[e] = static_cast<scalar_t>(relu(static_cast<acc_t>(vv[u].v[e])) * cx);
        store_pack(bt.at<W>(a.y, slot0 + u, pan), out);
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  Rows<const scalar_t> g, q, k, v;
  Rows<const at::opmath_type<scalar_t>> ctx;
  Rows<scalar_t> dk, dv;
  // Workspace for the dq kernel: per (row, tile) the partial ds[N] and Σ_c dctx·ctx; per row the
  // softmax max and 1/sum (every tile computes the same bits; tile 0 writes them).
  at::opmath_type<scalar_t> *ds_part, *dot_part, *stats;
  int64_t C, P, N;
  Tiling t;
};

// Pass A per (row, channel tile): dv and dctx from (grad_y, v). Pass B: dk and the tile's
// partial ds from k, summed over the block's lane groups in shared memory in a fixed order. The
// dq kernel sums the tiles, also in a fixed order: the backward is deterministic.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    separable_attention_backward_kernel(const BackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, W>;
  // ds_s is [W][kDsStride]: thread t writes column t (conflict-free), and the pad of 32/W spreads
  // one warp's reads (32/W lanes x W elements) over the 32 banks.
  constexpr int kDsStride = kThreads + 32 / W;
  __shared__ acc_t red[kWarps];
  __shared__ acc_t ctx_s[kMaxChannelTile], dctx_s[kMaxChannelTile];
  __shared__ acc_t ds_s[W * kDsStride];
  const BlockTile bt(a.t, a.C, a.P, a.N, W);

  // Pass A: dv = v <= 0 ? 0 : g * ctx, autograd's relu backward (a select: 0 * inf stays 0,
  // and NaN v passes the gradient);
  // dctx = Σ_n g * relu(v). Two tensors are loaded here, so half the channels per batch keep the
  // bytes in flight of the other passes (and the registers under the launch bound).
  constexpr int kBatchA = kBatch / 2;
  for (int slot0 = 0; slot0 < bt.slots; slot0 += kBatchA) {
    acc_t cx[kBatchA], dc[kBatchA];
#pragma unroll
    for (int u = 0; u < kBatchA; ++u) {
      const int c = bt.channel(slot0 + u);
      cx[u] = c < bt.cn ? *bt.row_start(a.ctx, c) : acc_t(0);
      dc[u] = 0;
    }
    for (int64_t pan = 0; pan < bt.panels; ++pan) {
      PackT gv[kBatchA], vv[kBatchA];
#pragma unroll
      for (int u = 0; u < kBatchA; ++u) {
        if (!bt.active(slot0 + u, pan)) continue;
        gv[u] = load_pack<scalar_t, W>(bt.at<W>(a.g, slot0 + u, pan));
        vv[u] = load_pack<scalar_t, W>(bt.at<W>(a.v, slot0 + u, pan));
      }
#pragma unroll
      for (int u = 0; u < kBatchA; ++u) {
        if (!bt.active(slot0 + u, pan)) continue;
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const acc_t gn = static_cast<acc_t>(gv[u].v[e]), vn = static_cast<acc_t>(vv[u].v[e]);
          out.v[e] = static_cast<scalar_t>(vn <= acc_t(0) ? acc_t(0) : gn * cx[u]);
          dc[u] += gn * relu(vn);
        }
        store_pack(bt.at<W>(a.dv, slot0 + u, pan), out);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatchA; ++u) {
      const int c = bt.channel(slot0 + u);
      const acc_t d = group_sum(dc[u], bt.group);
      if (bt.lane == 0 && c < bt.cn) {
        dctx_s[c] = d;
        ctx_s[c] = cx[u];
      }
    }
  }

  const scalar_t* q = a.q.row(bt.b, 0, bt.p);
  acc_t mx, inv;
  softmax_stats(q, a.N, red, mx, inv);  // its barriers also publish dctx_s and ctx_s
  const int64_t part = bt.row * a.t.tiles + bt.tile;
  if (bt.tile == 0 && threadIdx.x == 0) {
    a.stats[2 * bt.row] = mx;
    a.stats[2 * bt.row + 1] = inv;
  }
  if (threadIdx.x < 32) {  // Σ_c dctx·ctx over the tile: lane-strided, then a butterfly
    acc_t d = 0;
    for (int c = threadIdx.x; c < bt.cn; c += 32) d += dctx_s[c] * ctx_s[c];
    d = group_sum(d, 32);
    if (threadIdx.x == 0) a.dot_part[part] = d;
  }

  // Pass B: dk = dctx * s; ds[n] = Σ_c dctx[c] k[c, n] over the tile.
  for (int64_t pan = 0; pan < bt.panels; ++pan) {
    acc_t s[W], ds[W];
    softmax_pack<W>(bt, q, pan, mx, inv, s);
#pragma unroll
    for (int e = 0; e < W; ++e) ds[e] = 0;
    for (int slot0 = 0; slot0 < bt.slots; slot0 += kBatch) {
      PackT kv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (bt.active(slot0 + u, pan)) kv[u] = load_pack<scalar_t, W>(bt.at<W>(a.k, slot0 + u, pan));
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (!bt.active(slot0 + u, pan)) continue;
        const acc_t d = dctx_s[bt.channel(slot0 + u)];
        PackT out;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          out.v[e] = static_cast<scalar_t>(d * s[e]);
          ds[e] += d * static_cast<acc_t>(kv[u].v[e]);
        }
        store_pack(bt.at<W>(a.dk, slot0 + u, pan), out);
      }
    }
    // Column t = lane·W + e of the panel: the groups' partials summed in group order.
#pragma unroll
    for (int e = 0; e < W; ++e) ds_s[e * kDsStride + threadIdx.x] = ds[e];
    __syncthreads();
    const int cols = bt.group * W, t = threadIdx.x;
    if (t < cols) {
      acc_t sum = 0;
      for (int g = 0; g < bt.groups; ++g) sum += ds_s[(t % W) * kDsStride + g * bt.group + t / W];
      const int64_t n = pan * cols + t;
      if (n < a.N) a.ds_part[part * a.N + n] = sum;
    }
    __syncthreads();  // ds_s is rewritten by the next panel
  }
}

template <typename scalar_t>
struct DqArgs {
  Rows<const scalar_t> q;
  Rows<scalar_t> dq;
  const at::opmath_type<scalar_t> *ds_part, *dot_part, *stats;
  int64_t rows, P, N, tiles;
};

// dq = s * (ds - Σ_c dctx·ctx) with the tiles' partials summed in tile order, and s recomputed
// from q and the saved statistics (q and dq are 1/C of the traffic).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    separable_attention_backward_dq_kernel(const DqArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.rows * a.N;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / a.N, n = i % a.N, b = row / a.P, p = row % a.P;
    acc_t dot = 0, ds = 0;
    for (int64_t t = 0; t < a.tiles; ++t) {
      dot += a.dot_part[row * a.tiles + t];
      ds += a.ds_part[(row * a.tiles + t) * a.N + n];
    }
    const acc_t x = static_cast<acc_t>(a.q.row(b, 0, p)[n]);
    const acc_t s = exp_acc(x - a.stats[2 * row]) * a.stats[2 * row + 1];
    a.dq.row(b, 0, p)[n] = static_cast<scalar_t>(s * (ds - dot));
  }
}

template <typename scalar_t, int W>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& y,
                    at::Tensor& ctx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  const ForwardArgs<scalar_t> a{rows_of<const scalar_t>(q), rows_of<const scalar_t>(k),
                                rows_of<const scalar_t>(v), rows_of<scalar_t>(y),
                                rows_of<acc_t>(ctx), C, P, N,
                                tiling(B * P, C, N, W, sizeof(scalar_t))};
  separable_attention_forward_kernel<scalar_t, W>
      <<<grid_size(B * P * a.t.tiles, kOp), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int W>
void launch_backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& ctx, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3), rows = B * P;
  const Tiling t = tiling(rows, C, N, W, sizeof(scalar_t));
  const at::Tensor ws = at::empty({rows * t.tiles * N + rows * t.tiles + 2 * rows},
                                  k.options().dtype(acc_type(k.scalar_type())));
  acc_t* ds_part = ws.mutable_data_ptr<acc_t>();
  acc_t* dot_part = ds_part + rows * t.tiles * N;
  acc_t* stats = dot_part + rows * t.tiles;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const BackwardArgs<scalar_t> a{
      rows_of<const scalar_t>(g), rows_of<const scalar_t>(q), rows_of<const scalar_t>(k),
      rows_of<const scalar_t>(v), rows_of<const acc_t>(ctx), rows_of<scalar_t>(dk),
      rows_of<scalar_t>(dv), ds_part, dot_part, stats, C, P, N, t};
  separable_attention_backward_kernel<scalar_t, W>
      <<<grid_size(rows * t.tiles, kOp), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const DqArgs<scalar_t> d{rows_of<const scalar_t>(q), rows_of<scalar_t>(dq), ds_part, dot_part,
                           stats, rows, P, N, t.tiles};
  const int64_t dq_blocks = std::min<int64_t>((rows * N + kThreads - 1) / kThreads, 1 << 20);
  separable_attention_backward_dq_kernel<scalar_t>
      <<<grid_size(dq_blocks, kOp), kThreads, 0, stream>>>(d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward into dq, dk, dv: unit stride along N, any other strides (the vector width
// follows the outputs' alignment too).
void backward_into(const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in,
                   const at::Tensor& v_in, const at::Tensor& ctx, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  const at::Tensor g = unit_last_stride(grad_y_in), q = unit_last_stride(q_in),
                   k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  if (dq.numel() == 0 && dk.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, k.scalar_type(), "separable_attention_backward_cuda", [&] {
        with_vector_width<scalar_t>(k.size(3), {&g, &q, &k, &v, &dk, &dv}, [&](auto w) {
          launch_backward<scalar_t, decltype(w)::value>(g, q, k, v, ctx, dq, dk, dv);
        });
      });
}

// The forward into y (contiguous, checked); returns ctx.
at::Tensor forward_into(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        at::Tensor& y) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in),
                   v = unit_last_stride(v_in);
  const int64_t B = k.size(0), C = k.size(1), P = k.size(2), N = k.size(3);
  at::Tensor ctx = at::empty({B, C, P, 1}, k.options().dtype(acc_type(k.scalar_type())));
  if (y.numel() == 0 && ctx.numel() == 0) return ctx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, k.scalar_type(), "separable_attention_forward_cuda", [&] {
        with_vector_width<scalar_t>(N, {&q, &k, &v, &y}, [&](auto w) {
          launch_forward<scalar_t, decltype(w)::value>(q, k, v, y, ctx);
        });
      });
  return ctx;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_attention_forward_cuda(const at::Tensor& q,
                                                                    const at::Tensor& k,
                                                                    const at::Tensor& v) {
  check_separable_attention_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor y = at::empty(k.sizes(), k.options());
  at::Tensor ctx = forward_into(q, k, v, y);
  return {y, ctx};
}

at::Tensor separable_attention_forward_out_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, at::Tensor& y) {
  check_separable_attention_inputs(q, k, v);
  check_separable_attention_out(y, q, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  return forward_into(q, k, v, y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_attention_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& ctx) {
  check_separable_attention_backward_inputs(grad_y, q, k, v, ctx);
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  backward_into(grad_y, q, k, v, ctx, dq, dk, dv);
  return {dq, dk, dv};
}

// The same kernels on the channel views of one qkv [B, 1 + 2C, P, N], as on CPU: the backward
// writes dq, dk, dv into the views of one contiguous dqkv (the kernels take output strides).
std::tuple<at::Tensor, at::Tensor> separable_attention_qkv_forward_cuda(const at::Tensor& qkv) {
  const auto [q, k, v] = split_qkv(qkv);
  return separable_attention_forward_cuda(q, k, v);
}

at::Tensor separable_attention_qkv_backward_cuda(const at::Tensor& grad_y, const at::Tensor& qkv,
                                                 const at::Tensor& ctx) {
  const auto [q, k, v] = split_qkv(qkv);
  check_separable_attention_backward_inputs(grad_y, q, k, v, ctx);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto [dq, dk, dv] = split_qkv(dqkv);
  backward_into(grad_y, q, k, v, ctx, dq, dk, dv);
  return dqkv;
}

TORCH_LIBRARY_IMPL(mvit2, CUDA, m) {
  m.impl("separable_attention_forward", &separable_attention_forward_cuda);
  m.impl("separable_attention_forward_out", &separable_attention_forward_out_cuda);
  m.impl("separable_attention_backward", &separable_attention_backward_cuda);
  m.impl("separable_attention_qkv_forward", &separable_attention_qkv_forward_cuda);
  m.impl("separable_attention_qkv_backward", &separable_attention_qkv_backward_cuda);
}

}  // namespace mvit2
