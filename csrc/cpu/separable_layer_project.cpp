// The fused layer's two projections around its epilogue, CPU, in one tiled pass with our own GEMM
// (gemm.h). Per task, a tile of x (all D channels of a few (b, p) rows, a block of N columns of
// each) is packed once, then
//   v = W_v x + b_v,  y = relu(v) * ctx   (epilogue of the first GEMM, into an fp32 y tile)
//   out = W_out y + b_out                 (epilogue of the second GEMM, stored in x's dtype)
// so that v and y stay in L1/L2 and reach memory only when the backward needs them (keep). The
// backward fuses dy = W_out^T grad_out with the epilogue's backward: dy is never written.
// Accumulation in float32 (float64 for float64); tests/test_separable_layer_project.py holds the
// ops against the plain-PyTorch composition.
#include "vec_isa.h"  // first: it configures at::vec

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "../separable_layer_checks.h"
#include "gemm.h"
#include "layer_tiles.h"
#include "outputs.h"

namespace mvit2 {
namespace {

using gemm::Vec;
using tiles::Tile;
using tiles::Tiling;

// A value whose bits are all ones: `x & V(all_ones)` keeps x, `x & V(0)` gives +0.
template <typename acc_t>
inline acc_t all_ones() {
  acc_t out;
  std::memset(&out, 0xff, sizeof(out));
  return out;
}

// For each vector q of a tile: the tile row r it lies in and that row's ctx, &ctx[b, 0, p]
// (ctx[b, c, p] = ctx_of[q][c * P]), looked up by the epilogues instead of dividing.
template <typename acc_t>
struct VectorRows {
  std::vector<int64_t> row;
  std::vector<const acc_t*> ctx_of;

  explicit VectorRows(int64_t vectors) : row(vectors), ctx_of(vectors) {}
  void assign(const Tile& t, int64_t width, const acc_t* ctx, int64_t C, int64_t P) {
    for (int64_t q = 0; q < t.width() / width; ++q) {
      row[q] = q * width / t.seg;
      const int64_t bp = t.row0 + row[q];
      ctx_of[q] = ctx + bp / P * C * P + bp % P;
    }
  }
};

// A 1-D optional bias as acc_t, zeros when absent.
template <typename acc_t>
std::vector<acc_t> bias_values(const std::optional<at::Tensor>& bias, int64_t size) {
  std::vector<acc_t> out(static_cast<size_t>(size), acc_t(0));
  if (bias.has_value()) {
    const at::Tensor b = bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy_n(b.const_data_ptr<acc_t>(), size, out.begin());
  }
  return out;
}

template <typename scalar_t>
void separable_layer_project_forward_kernel(const at::Tensor& x, const at::Tensor& w_v,
                                            const std::optional<at::Tensor>& b_v,
                                            const at::Tensor& ctx, const at::Tensor& w_out,
                                            const std::optional<at::Tensor>& b_out, bool keep,
                                            at::Tensor& out, at::Tensor& v, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  const int64_t C = w_v.size(0), D_out = w_out.size(0);
  const auto wv = gemm::pack_a<acc_t>(w_v.const_data_ptr<scalar_t>(), C, D, D, 1);
  const auto wo = gemm::pack_a<acc_t>(w_out.const_data_ptr<scalar_t>(), D_out, C, C, 1);
  const std::vector<acc_t> bv = bias_values<acc_t>(b_v, C), bo = bias_values<acc_t>(b_out, D_out);
  const Tiling tiling(B, P, N, W);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();  // [B, C, P]
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  scalar_t* v_ptr = keep ? v.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_ptr = keep ? y.mutable_data_ptr<scalar_t>() : nullptr;
  const bool stream_out = out.nbytes() >= streaming_store_bytes();
  const bool stream_vy = v.nbytes() >= streaming_store_bytes();

  // Per thread: the x tile; the y tile, the second GEMM's operand; v and out tiles staging stores.
  const int64_t most = tiling.max_width();
  struct Scratch {
    std::vector<acc_t> x, y, v, out;
    VectorRows<acc_t> rows;
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<acc_t>(D * most), std::vector<acc_t>(C * most),
                   std::vector<acc_t>(keep ? C * most : 0), std::vector<acc_t>(D_out * most),
                   VectorRows<acc_t>(most / W)};
  };
  tiles::run_tasks(tiling.tasks, make_scratch, [&](Scratch& s, int64_t task, int64_t next) {
    const Tile t = tiling.tile(task);
    s.rows.assign(t, W, ctx_ptr, C, P);
    tiles::pack_tile(x_ptr, D, P, N, t, s.x.data());
    tiles::TilePrefetcher prefetch(x_ptr, D, P, N, next < 0 ? Tile{} : tiling.tile(next));
    gemm::gemm(wv, s.x.data(), t.width(), t.width(), [&](int64_t c, int64_t j, V acc) {
      const V vv = acc + V(bv[c]);
      // relu as maximum, which propagates NaN like torch.relu
      const V yy = at::vec::maximum(vv, V(acc_t(0))) * V(s.rows.ctx_of[j / W][c * P]);
      yy.store(s.y.data() + c * t.width() + j);
      if (keep) vv.store(s.v.data() + c * t.width() + j);
      prefetch.next();
    });
    if (keep) {
      tiles::unpack_tile(s.v.data(), t, C, P, N, v_ptr, stream_vy);
      tiles::unpack_tile(s.y.data(), t, C, P, N, y_ptr, stream_vy);
    }
    gemm::gemm(wo, s.y.data(), t.width(), t.width(), [&](int64_t o, int64_t j, V acc) {
      (acc + V(bo[o])).store(s.out.data() + o * t.width() + j);
      prefetch.next();
    });
    tiles::unpack_tile(s.out.data(), t, D_out, P, N, out_ptr, stream_out);
  });
}

// dy = W_out^T grad_out per tile (A = W_out^T: W_out's storage with the strides swapped); the
// epilogue turns the v tile into dv in place, dv = v <= 0 ? 0 : dy * ctx (relu's backward: NaN v
// passes the gradient; a select, so 0 * inf stays 0), and sums dy * relu(v) per channel and row
// for dctx. A task's partial dctx goes to its own slot; the blocks of a row are summed in order
// afterwards (deterministic, independent of the thread count).
template <typename scalar_t>
void separable_layer_project_backward_kernel(const at::Tensor& g, const at::Tensor& v,
                                             const at::Tensor& ctx, const at::Tensor& w_out,
                                             at::Tensor& dv, at::Tensor& dctx) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = v.size(0), C = v.size(1), P = v.size(2), N = v.size(3);
  const int64_t D_out = w_out.size(0);
  const auto wt = gemm::pack_a<acc_t>(w_out.const_data_ptr<scalar_t>(), C, D_out, 1, C);
  const Tiling tiling(B, P, N, W);
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const acc_t* ctx_ptr = ctx.const_data_ptr<acc_t>();
  scalar_t* dv_ptr = dv.mutable_data_ptr<scalar_t>();
  const bool stream = dv.nbytes() >= streaming_store_bytes();
  std::vector<acc_t> dctx_part(B * P * tiling.blocks * C);  // [B * P rows, blocks, C]

  // Per thread: the grad_out tile (the GEMM's operand), the v tile that becomes dv in place,
  // and dctx's per-lane sums for each (row, channel) of the tile.
  const int64_t most = tiling.max_width();
  struct Scratch {
    std::vector<acc_t> g, v, dctx;
    VectorRows<acc_t> rows;
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<acc_t>(D_out * most), std::vector<acc_t>(C * most),
                   std::vector<acc_t>(tiling.rows * C * W), VectorRows<acc_t>(most / W)};
  };
  tiles::run_tasks(tiling.tasks, make_scratch, [&](Scratch& s, int64_t task, int64_t next) {
    const Tile t = tiling.tile(task);
    s.rows.assign(t, W, ctx_ptr, C, P);
    tiles::pack_tile(g_ptr, D_out, P, N, t, s.g.data());
    tiles::pack_tile(v_ptr, C, P, N, t, s.v.data());
    const Tile upcoming = next < 0 ? Tile{} : tiling.tile(next);
    tiles::TilePrefetcher prefetch_g(g_ptr, D_out, P, N, upcoming);
    tiles::TilePrefetcher prefetch_v(v_ptr, C, P, N, upcoming);
    std::fill(s.dctx.begin(), s.dctx.end(), acc_t(0));
    // The padding of a row's last vector holds dy = W^T 0, NaN where W holds an inf: masked.
    const V zero(acc_t(0)), tail = V::set(zero, V(all_ones<acc_t>()), W - (t.seg - t.cols));
    gemm::gemm(wt, s.g.data(), t.width(), t.width(), [&](int64_t c, int64_t j, V dy) {
      const int64_t r = s.rows.row[j / W];
      acc_t* vc = s.v.data() + c * t.width() + j;
      const V vv = V::loadu(vc);
      V::blendv(dy * V(s.rows.ctx_of[j / W][c * P]), zero, vv <= zero).store(vc);
      const V term = dy * at::vec::maximum(vv, zero);
      acc_t* sum = s.dctx.data() + (r * C + c) * W;
      (V::loadu(sum) + (j + W < (r + 1) * t.seg ? term : term & tail)).store(sum);
      prefetch_g.next();
      prefetch_v.next();
    });
    tiles::unpack_tile(s.v.data(), t, C, P, N, dv_ptr, stream);
    for (int64_t r = 0; r < t.rows; ++r) {
      acc_t* part = dctx_part.data() + ((t.row0 + r) * tiling.blocks + t.n0 / tiling.cols) * C;
      for (int64_t c = 0; c < C; ++c) {
        part[c] = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; },
                                                 V::loadu(s.dctx.data() + (r * C + c) * W));
      }
    }
  });

  acc_t* dctx_ptr = dctx.mutable_data_ptr<acc_t>();  // [B, C, P]
  at::parallel_for(0, B * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* part = dctx_part.data() + row * tiling.blocks * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t sum = 0;
        for (int64_t blk = 0; blk < tiling.blocks; ++blk) sum += part[blk * C + c];
        dctx_ptr[(row / P * C + c) * P + row % P] = sum;
      }
    }
  });
}

// w: [rows, cols] contiguous, in x's dtype; bias (if any): [rows] in x's dtype.
#define MVIT2_CHECK_WEIGHT(w, x, rows_name, cols, cols_name)                                    \
  MVIT2_CHECK_SAME(w, x);                                                                       \
  TORCH_CHECK_VALUE((w).dim() == 2 && (w).size(1) == (cols),                                    \
                    #w " must have shape [" rows_name ", " cols_name "] with " cols_name " = ", \
                    cols, ", got ", (w).sizes());                                               \
  TORCH_CHECK_VALUE((w).is_contiguous(), #w " must be contiguous")

#define MVIT2_CHECK_BIAS(bias, x, rows)                                                  \
  if ((bias).has_value()) {                                                              \
    MVIT2_CHECK_SAME(*(bias), x);                                                        \
    TORCH_CHECK_VALUE((bias)->sizes() == at::IntArrayRef({rows}), #bias " must have shape [", \
                      rows, "], got ", (bias)->sizes());                                 \
  }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_layer_project_forward_cpu(
    const at::Tensor& x, const at::Tensor& w_v, const std::optional<at::Tensor>& b_v,
    const at::Tensor& ctx, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    bool keep) {
  MVIT2_CHECK_CONTIGUOUS_4D(x);
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2), N = x.size(3);
  MVIT2_CHECK_WEIGHT(w_v, x, "C", D, "D");
  const int64_t C = w_v.size(0);
  MVIT2_CHECK_BIAS(b_v, x, C);
  MVIT2_CHECK_ACC(ctx, x);
  MVIT2_CHECK_SHAPE(ctx, B, C, P);
  MVIT2_CHECK_WEIGHT(w_out, x, "D_out", C, "C");
  const int64_t D_out = w_out.size(0);
  MVIT2_CHECK_BIAS(b_out, x, D_out);

  at::Tensor out = empty_output({B, D_out, P, N}, x.options());
  const auto kept = keep ? std::vector<int64_t>{B, C, P, N} : std::vector<int64_t>{0};
  at::Tensor v = empty_output(kept, x.options()), y = empty_output(kept, x.options());
  if (B * P * N == 0) return {out, v, y};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "separable_layer_project_forward_cpu", [&] {
        separable_layer_project_forward_kernel<scalar_t>(x, w_v, b_v, ctx, w_out, b_out, keep,
                                                         out, v, y);
      });
  return {out, v, y};
}

std::tuple<at::Tensor, at::Tensor> separable_layer_project_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& v, const at::Tensor& ctx,
    const at::Tensor& w_out) {
  check_layer_epilogue_inputs(v, ctx);
  const int64_t B = v.size(0), C = v.size(1), P = v.size(2), N = v.size(3);
  MVIT2_CHECK_WEIGHT(w_out, v, "D_out", C, "C");
  MVIT2_CHECK_CONTIGUOUS_4D(grad_out);
  MVIT2_CHECK_SAME(grad_out, v);
  MVIT2_CHECK_SHAPE(grad_out, B, w_out.size(0), P, N);

  at::Tensor dv = empty_output(v.sizes(), v.options());
  if (B * C * P == 0 || N == 0) return {dv, at::zeros(ctx.sizes(), ctx.options())};
  at::Tensor dctx = at::empty(ctx.sizes(), ctx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, v.scalar_type(), "separable_layer_project_backward_cpu", [&] {
        separable_layer_project_backward_kernel<scalar_t>(grad_out, v, ctx, w_out, dv, dctx);
      });
  return {dv, dctx};
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("separable_layer_project_forward", &separable_layer_project_forward_cpu);
  m.impl("separable_layer_project_backward", &separable_layer_project_backward_cpu);
}

}  // namespace mvit2
