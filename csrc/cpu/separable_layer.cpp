// The whole-layer fusion's kernels, CPU: the context pass (scores, softmax, x̄) and the epilogue
// (relu(v) * ctx), both directions. Contracts: separable_layer_*_reference in
// mvit2_kernels/reference.py; the layer around them: mvit2_kernels/layer.py.
//
//   context forward,  task per row (b, p):  scores -> s | softmax in place | x̄
//   context backward, task per row (b, p):  dx̄ · x̄ | ds, dq | dx, the row's partial dw_q
//                                           then dw_q = the rows' partials, summed in row order
//   epilogue forward,  task per row of v as [B·C·P, N]:  y = relu(v) ctx
//   epilogue backward, task per row:                     dv = g ctx [v > 0], dctx = Σ_n g relu(v)
//
// A row of x is a [D, N] matrix with channels P·N apart. The context kernels take the rows of a
// task's range in blocks of consecutive rows of one batch, whose channels interleave in memory:
// each pass sweeps the block channel by channel (G = 4 at a time, four independent FMA chains),
// reading x in address order, so the hardware prefetcher streams it (row by row, each channel
// would be a short run of N values P·N apart, often alone in its page: 1.4x slower in fp32 at
// D=128, P=4, N=256). A block is at most kBlockBytes of x, so that the second pass (x̄; dx)
// finds it in L2. The arithmetic of a row does not depend on its block:
// results are the same bits for any thread count.
#include "vec_isa.h"  // first: it configures at::vec

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "../separable_layer_checks.h"
#include "outputs.h"
#include "row_ops.h"

namespace mvit2 {
namespace {

constexpr int kChannelGroup = 4;
// x per block of rows: half of a core's L2, so that the second pass finds the block there.
constexpr int64_t kBlockBytes = int64_t{512} << 10;

// f(std::integral_constant<int, G>, d) for the channel groups [d, d + G) of D: G = 4, then 1.
template <typename F>
inline void for_channel_groups(int64_t D, const F& f) {
  int64_t d = 0;
  for (; d + kChannelGroup <= D; d += kChannelGroup) {
    f(std::integral_constant<int, kChannelGroup>{}, d);
  }
  for (; d < D; ++d) f(std::integral_constant<int, 1>{}, d);
}

template <typename scalar_t>
inline int64_t block_rows(int64_t D, int64_t N) {
  return std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, D * N * sizeof(scalar_t)));
}

// f(row, rows) for the blocks of [begin, end): consecutive rows of one batch, at most block_rows.
template <typename scalar_t, typename F>
inline void for_row_blocks(int64_t begin, int64_t end, int64_t D, int64_t P, int64_t N,
                           const F& f) {
  const int64_t max_rows = block_rows<scalar_t>(D, N);
  for (int64_t row = begin; row < end;) {
    const int64_t rows = std::min({end - row, P - row % P, max_rows});
    f(row, rows);
    row += rows;
  }
}

// out[n] += Σ_{g < G} w[g] x[g, n]: a weighted sum of G channels of a row (scores, ds).
template <int G, typename scalar_t>
inline void accumulate_channels(const scalar_t* x, int64_t ld, const at::opmath_type<scalar_t>* w,
                                int64_t N, at::opmath_type<scalar_t>* out) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  Vec wg[G];
  for (int g = 0; g < G; ++g) wg[g] = Vec(w[g]);
  over_n<IO::W>(N, [&](int64_t n, int64_t count) {
    Vec acc = Vec::loadu(out + n, count);
    for (int g = 0; g < G; ++g) acc = at::vec::fmadd(wg[g], IO::load(x + g * ld + n, count), acc);
    acc.store(out + n, count);
  });
}

// out[i, n] = Σ_d w[i, d] x[i, d, n] for the rows i of a block: row i of x at + i * N, of w at
// + i * w_stride (0: one w for every row), of out at + i * N. 0 when D = 0.
template <typename scalar_t>
void weighted_channel_sum(const scalar_t* x, int64_t ld, const at::opmath_type<scalar_t>* w,
                          int64_t w_stride, int64_t D, int64_t N, int64_t rows,
                          at::opmath_type<scalar_t>* out) {
  std::fill(out, out + rows * N, at::opmath_type<scalar_t>(0));
  for_channel_groups(D, [&](auto group, int64_t d) {
    constexpr int G = decltype(group)::value;
    for (int64_t i = 0; i < rows; ++i) {
      accumulate_channels<G>(x + d * ld + i * N, ld, w + i * w_stride + d, N, out + i * N);
    }
  });
}

// out[g * out_stride] = Σ_n v[n] x[g, n] for G channels (x̄).
template <int G, typename scalar_t>
inline void dot_channels(const scalar_t* x, int64_t ld, const at::opmath_type<scalar_t>* v,
                         int64_t N, at::opmath_type<scalar_t>* out, int64_t out_stride) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec acc[G];
  for (int g = 0; g < G; ++g) acc[g] = Vec(acc_t(0));
  over_n<IO::W>(N, [&](int64_t n, int64_t count) {
    const Vec vn = Vec::loadu(v + n, count);  // 0 past the row: padded lanes add 0
    for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(vn, IO::load(x + g * ld + n, count), acc[g]);
  });
  for (int g = 0; g < G; ++g) out[g * out_stride] = vec_sum<acc_t>(acc[g]);
}

// For G channels: dx[g, n] = gx[g] s[n] + w[g] dq[n], and dw[g] = Σ_n dq[n] x[g, n].
template <int G, typename scalar_t>
inline void dx_channels(const scalar_t* x, scalar_t* dx, int64_t ld,
                        const at::opmath_type<scalar_t>* gx, const at::opmath_type<scalar_t>* w,
                        const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* dq,
                        int64_t N, bool stream, at::opmath_type<scalar_t>* dw) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec acc[G], gg[G], wg[G];
  bool st = stream;
  for (int g = 0; g < G; ++g) {
    acc[g] = Vec(acc_t(0));
    gg[g] = Vec(gx[g]);
    wg[g] = Vec(w[g]);
    st = st && aligned_to(dx + g * ld, IO::kStreamAlign);
  }
  over_n<IO::W>(N, [&](int64_t n, int64_t count) {
    const Vec sn = Vec::loadu(s + n, count), dqn = Vec::loadu(dq + n, count);
    for (int g = 0; g < G; ++g) {
      IO::put(st, dx + g * ld + n, at::vec::fmadd(gg[g], sn, wg[g] * dqn), count);
      acc[g] = at::vec::fmadd(dqn, IO::load(x + g * ld + n, count), acc[g]);
    }
  });
  for (int g = 0; g < G; ++g) dw[g] = vec_sum<acc_t>(acc[g]);
}

// A column of a contiguous [B, D, P] accumulator tensor (d at stride P), into out[D].
template <typename acc_t>
inline void gather_column(const acc_t* col, int64_t D, int64_t P, acc_t* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = col[d * P];
}

template <typename scalar_t>
void separable_layer_context_forward_kernel(const at::Tensor& x, const at::Tensor& w_q,
                                            at::Tensor& s, at::Tensor& xbar) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  const int64_t ld = P * N;  // between the channels of a row
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = w_q.const_data_ptr<scalar_t>();
  acc_t* s_ptr = s.mutable_data_ptr<acc_t>();        // contiguous [B, P, N]
  acc_t* xbar_ptr = xbar.mutable_data_ptr<acc_t>();  // contiguous [B, D, P]

  at::parallel_for(0, B * P, task_grain(D * N), [&](int64_t begin, int64_t end) {
    acc_vector<scalar_t> w(w_ptr, w_ptr + D);
    for_row_blocks<scalar_t>(begin, end, D, P, N, [&](int64_t row, int64_t rows) {
      const int64_t b = row / P, p = row % P;
      const scalar_t* xr = x_ptr + b * D * ld + p * N;  // row i of the block at + i * N
      acc_t* sr = s_ptr + row * N;                      // likewise
      // Scores, raw, into s (the softmax needs the whole row), then normalised in place.
      weighted_channel_sum(xr, ld, w.data(), 0, D, N, rows, sr);
      for (int64_t i = 0; i < rows; ++i) softmax_row<acc_t>(sr + i * N, N, sr + i * N);
      acc_t* xbar_col = xbar_ptr + b * D * P + p;  // row i at + i
      for_channel_groups(D, [&](auto group, int64_t d) {
        constexpr int G = decltype(group)::value;
        for (int64_t i = 0; i < rows; ++i) {
          dot_channels<G>(xr + d * ld + i * N, ld, sr + i * N, N, xbar_col + d * P + i, P);
        }
      });
    });
  });
}

template <typename scalar_t>
void separable_layer_context_backward_kernel(const at::Tensor& grad_xbar, const at::Tensor& x,
                                             const at::Tensor& w_q, const at::Tensor& s,
                                             const at::Tensor& xbar, at::Tensor& dx,
                                             at::Tensor& dw_q) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  const int64_t ld = P * N, all_rows = B * P;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = w_q.const_data_ptr<scalar_t>();
  const acc_t* gx_ptr = grad_xbar.const_data_ptr<acc_t>();
  const acc_t* s_ptr = s.const_data_ptr<acc_t>();
  const acc_t* xbar_ptr = xbar.const_data_ptr<acc_t>();
  scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();  // contiguous like x
  const bool stream = dx.nbytes() >= streaming_store_bytes();
  // The rows' partial dw_q, [rows, D]; each task writes its whole row (no initialisation).
  std::unique_ptr<acc_t[]> dw_rows(new acc_t[all_rows * D]);

  at::parallel_for(0, all_rows, task_grain(D * N), [&](int64_t begin, int64_t end) {
    const int64_t max_rows = block_rows<scalar_t>(D, N);
    acc_vector<scalar_t> w(w_ptr, w_ptr + D), gx(max_rows * D), dq(max_rows * N);
    for_row_blocks<scalar_t>(begin, end, D, P, N, [&](int64_t row, int64_t rows) {
      const int64_t b = row / P, p = row % P;
      const int64_t off = b * D * ld + p * N;  // of channel 0 of the block's row 0, in x and dx
      const acc_t* sr = s_ptr + row * N;
      for (int64_t i = 0; i < rows; ++i) {
        gather_column(gx_ptr + b * D * P + p + i, D, P, &gx[i * D]);
      }
      // ds = Σ_d dx̄[d] x[d, :] into dq, then dq = s (ds - dx̄ · x̄), where
      // Σ_n s[n] ds[n] = dx̄ · x̄ is the softmax backward's dot product without a pass over x.
      weighted_channel_sum(x_ptr + off, ld, gx.data(), D, D, N, rows, dq.data());
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t* xbar_col = xbar_ptr + b * D * P + p + i;
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += gx[i * D + d] * xbar_col[d * P];
        const Vec vdot(dot);
        at::vec::map2([&](Vec sn, Vec dsn) { return sn * (dsn - vdot); }, &dq[i * N], sr + i * N,
                      &dq[i * N], N);
      }
      acc_t* dw = dw_rows.get() + row * D;  // row i at + i * D
      for_channel_groups(D, [&](auto group, int64_t d) {
        constexpr int G = decltype(group)::value;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t o = off + d * ld + i * N;
          dx_channels<G>(x_ptr + o, dx_ptr + o, ld, &gx[i * D + d], &w[d], sr + i * N,
                         &dq[i * N], N, stream, dw + i * D + d);
        }
      });
    });
    fence_streaming_stores();
  });

  // dw_q[d] = Σ_rows dw_rows[row, d], rows in order: the same sum whatever the thread count.
  acc_t* dwq = dw_q.mutable_data_ptr<acc_t>();
  at::parallel_for(0, D, task_grain(all_rows), [&](int64_t begin, int64_t end) {
    std::copy(dw_rows.get() + begin, dw_rows.get() + end, dwq + begin);
    for (int64_t row = 1; row < all_rows; ++row) {
      at::vec::map2([](Vec a, Vec b) { return a + b; }, dwq + begin, dwq + begin,
                    dw_rows.get() + row * D + begin, end - begin);
    }
  });
}

template <typename scalar_t>
void separable_layer_epilogue_forward_kernel(const at::Tensor& v, const at::Tensor& ctx,
                                             at::Tensor& y) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t N = v.size(3), rows = v.numel() / N;
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();  // [B, C, P]: one value per row of v
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
  const bool stream = y.nbytes() >= streaming_store_bytes();

  at::parallel_for(0, rows, task_grain(N), [&](int64_t begin, int64_t end) {
    const Vec zero(acc_t(0));
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* vr = v_ptr + r * N;
      scalar_t* yr = y_ptr + r * N;
      const Vec cx(ctx_ptr[r]);
      const bool st = stream && aligned_to(yr, IO::kStreamAlign);
      over_n<IO::W>(N, [&](int64_t n, int64_t count) {
        // at::vec::maximum propagates NaN, like torch.relu.
        IO::put(st, yr + n, at::vec::maximum(IO::load(vr + n, count), zero) * cx, count);
      });
    }
    fence_streaming_stores();
  });
}

template <typename scalar_t>
void separable_layer_epilogue_backward_kernel(const at::Tensor& g, const at::Tensor& v,
                                              const at::Tensor& ctx, at::Tensor& dv,
                                              at::Tensor& dctx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t N = v.size(3), rows = v.numel() / N;
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();
  scalar_t* dv_ptr = dv.mutable_data_ptr<scalar_t>();
  acc_t* dctx_ptr = dctx.mutable_data_ptr<acc_t>();
  const bool stream = dv.nbytes() >= streaming_store_bytes();

  at::parallel_for(0, rows, task_grain(2 * N), [&](int64_t begin, int64_t end) {
    const Vec zero(acc_t(0));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * N;
      const Vec cx(ctx_ptr[r]);
      const bool st = stream && aligned_to(dv_ptr + off, IO::kStreamAlign);
      Vec acc(acc_t(0));
      over_n<IO::W>(N, [&](int64_t n, int64_t count) {
        const Vec gn = IO::load(g_ptr + off + n, count), vn = IO::load(v_ptr + off + n, count);
        // Autograd's relu backward, a select: 0 where v <= 0 even if g * ctx is inf or NaN,
        // and the gradient where v is NaN.
        IO::put(st, dv_ptr + off + n, Vec::blendv(gn * cx, zero, vn <= zero), count);
        acc = at::vec::fmadd(gn, at::vec::maximum(vn, zero), acc);
      });
      dctx_ptr[r] = vec_sum<acc_t>(acc);
    }
    fence_streaming_stores();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> separable_layer_context_forward_cpu(const at::Tensor& x,
                                                                       const at::Tensor& w_q) {
  check_layer_context_forward_inputs(x, w_q);
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor s = at::empty({B, P, N}, acc);
  at::Tensor xbar = at::empty({B, D, P}, acc);
  if (s.numel() == 0) return {s, xbar.zero_()};  // x̄ is an empty sum (D = 0 runs: s = 1/N)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "separable_layer_context_forward_cpu", [&] {
                                    separable_layer_context_forward_kernel<scalar_t>(x, w_q, s,
                                                                                     xbar);
                                  });
  return {s, xbar};
}

std::tuple<at::Tensor, at::Tensor> separable_layer_context_backward_cpu(
    const at::Tensor& grad_xbar, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& s,
    const at::Tensor& xbar) {
  check_layer_context_backward_inputs(grad_xbar, x, w_q, s, xbar);
  at::Tensor dx = empty_output(x.sizes(), x.options());
  at::Tensor dw_q = at::empty({x.size(1)}, s.options());
  if (dx.numel() == 0) return {dx, dw_q.zero_()};  // no (b, p, n) term: dw_q is an empty sum
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "separable_layer_context_backward_cpu", [&] {
                                    separable_layer_context_backward_kernel<scalar_t>(
                                        grad_xbar, x, w_q, s, xbar, dx, dw_q);
                                  });
  return {dx, dw_q};
}

at::Tensor separable_layer_epilogue_forward_cpu(const at::Tensor& v, const at::Tensor& ctx) {
  check_layer_epilogue_inputs(v, ctx);
  at::Tensor y = empty_output(v.sizes(), v.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "separable_layer_epilogue_forward_cpu", [&] {
                                    separable_layer_epilogue_forward_kernel<scalar_t>(v, ctx, y);
                                  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> separable_layer_epilogue_backward_cpu(const at::Tensor& grad_y,
                                                                         const at::Tensor& v,
                                                                         const at::Tensor& ctx) {
  check_layer_epilogue_backward_inputs(grad_y, v, ctx);
  at::Tensor dv = empty_output(v.sizes(), v.options());
  at::Tensor dctx = at::empty(ctx.sizes(), ctx.options());
  if (dv.numel() == 0) return {dv, dctx.zero_()};  // N = 0: dctx is an empty sum
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "separable_layer_epilogue_backward_cpu", [&] {
                                    separable_layer_epilogue_backward_kernel<scalar_t>(
                                        grad_y, v, ctx, dv, dctx);
                                  });
  return {dv, dctx};
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("separable_layer_context_forward", &separable_layer_context_forward_cpu);
  m.impl("separable_layer_context_backward", &separable_layer_context_backward_cpu);
  m.impl("separable_layer_epilogue_forward", &separable_layer_epilogue_forward_cpu);
  m.impl("separable_layer_epilogue_backward", &separable_layer_epilogue_backward_cpu);
}

}  // namespace mvit2
