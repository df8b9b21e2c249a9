// The fused layer's projection gradients on CPU, with the GEMM of the forward (gemm.h) over the
// same tiles (layer_tiles.h):
//   weight: dW = sum_{b,p,n} grad[:, n] (x) input[:, n]   ([O, I], for dW_v and dW_out)
//   input:  dx += W^T dv                                  (in place, after the context backward)
// Why not the library's: its fp32 GEMM reaches ~90 GFLOP/s on the 2-core AMD EPYC we measure on
// (a batched GEMM and a sum for dW; a third GEMM and an add for dx), our register blocks reach
// about twice that (docs/performance.md).
// dW sums per tile (K = the tile's columns) into one of kChunks fixed slices of the tasks, each
// summed in task order, then the slices in order: deterministic, independent of the thread count.
#include "vec_isa.h"  // first: it configures at::vec

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../separable_layer_checks.h"
#include "gemm.h"
#include "layer_tiles.h"

namespace mvit2 {
namespace {

using gemm::Vec;
using tiles::Tile;
using tiles::Tiling;

// dW's partial sums: a fixed number (the result must not depend on the thread count), enough to
// balance up to 8 threads; each is an [O, I] buffer, so more cost zeroing and summing (measured
// at D = 256, N = 16, B = 32: 16 slices 25% slower than 4).
constexpr int64_t kChunks = 8;

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N: at::vec's 16 x 16 AVX-512 blocks for
// float where torch has its runtime-size transpose_mxn (2.6 on), a plain loop otherwise.
template <typename T>
inline void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(M), static_cast<int>(N));
#else
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
#endif
}

template <typename scalar_t>
void separable_layer_project_weight_backward_kernel(const at::Tensor& grad,
                                                    const at::Tensor& input, at::Tensor& dw) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = grad.size(0), O = grad.size(1), P = grad.size(2), N = grad.size(3);
  const int64_t I = input.size(1), I_pad = (I + W - 1) / W * W;  // gemm's columns: whole vectors
  const Tiling tiling(B, P, N, W);
  const int64_t chunks = std::min(kChunks, tiling.tasks);
  const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
  const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
  std::vector<acc_t> part(chunks * O * I_pad, acc_t(0));  // [chunks, O, I_pad]

  // Per thread: both tiles as packed, grad's as A panels ([width][kMR]) and input's transposed
  // ([width][I_pad]). The columns past I stay zero (ld_dst is fixed, the transposes never write
  // them); the lanes past O of the last panel may hold an earlier, wider tile's values when K
  // changes, harmless: gemm discards the accumulators of rows past M.
  const int64_t most = tiling.max_width();
  struct Scratch {
    std::vector<acc_t> g, in, in_t;
    gemm::PackedA<acc_t> a;
  };
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    Scratch s{std::vector<acc_t>(O * most), std::vector<acc_t>(I * most),
              std::vector<acc_t>(most * I_pad, acc_t(0)), {}};
    s.a.M = O;
    s.a.data.assign(s.a.panels() * most * gemm::kMR, acc_t(0));
    for (int64_t chunk = counter++; chunk < chunks; chunk = counter++) {
      acc_t* sum = part.data() + chunk * O * I_pad;
      const int64_t end = (chunk + 1) * tiling.tasks / chunks;
      for (int64_t task = chunk * tiling.tasks / chunks; task < end; ++task) {
        const Tile t = tiling.tile(task);
        // The chunk's next tile into L2 while this one multiplies (as in the forward).
        const Tile upcoming = task + 1 < end ? tiling.tile(task + 1) : Tile{};
        tiles::TilePrefetcher prefetch_g(g_ptr, O, P, N, upcoming);
        tiles::TilePrefetcher prefetch_in(in_ptr, I, P, N, upcoming);
        const int64_t K = t.width();  // the padding columns are zero in both tiles
        tiles::pack_tile(g_ptr, O, P, N, t, s.g.data());
        tiles::pack_tile(in_ptr, I, P, N, t, s.in.data());
        s.a.K = K;
        for (int64_t i = 0; i < s.a.panels(); ++i) {
          const int64_t rows = std::min(gemm::kMR, O - i * gemm::kMR);
          transpose(s.g.data() + i * gemm::kMR * K, K, s.a.data.data() + i * K * gemm::kMR,
                    gemm::kMR, rows, K);
        }
        transpose(s.in.data(), K, s.in_t.data(), I_pad, I, K);
        gemm::gemm(s.a, s.in_t.data(), I_pad, I_pad, [&](int64_t o, int64_t i, V acc) {
          (V::loadu(sum + o * I_pad + i) + acc).store(sum + o * I_pad + i);
          prefetch_g.next();
          prefetch_in.next();
        });
      }
    }
  });

  acc_t* dw_ptr = dw.mutable_data_ptr<acc_t>();
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t i = 0; i < I; ++i) {
        acc_t total = 0;
        for (int64_t c = 0; c < chunks; ++c) total += part[(c * O + o) * I_pad + i];
        dw_ptr[o * I + i] = total;
      }
    }
  });
}

// dx += W^T dv per tile: A = W^T (W's storage with the strides swapped), B = the dv tile, and the
// epilogue adds the dx tile packed before it (dx's rows are in cache for the store after).
template <typename scalar_t>
void separable_layer_project_input_backward_kernel(at::Tensor& dx, const at::Tensor& dv,
                                                   const at::Tensor& w) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = dv.size(0), C = dv.size(1), P = dv.size(2), N = dv.size(3);
  const int64_t D = dx.size(1);
  const auto wt = gemm::pack_a<acc_t>(w.const_data_ptr<scalar_t>(), D, C, 1, D);
  const Tiling tiling(B, P, N, W);
  const scalar_t* dv_ptr = dv.const_data_ptr<scalar_t>();
  scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();

  const int64_t most = tiling.max_width();
  struct Scratch {
    std::vector<acc_t> dv, dx;
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<acc_t>(C * most), std::vector<acc_t>(D * most)};
  };
  tiles::run_tasks(tiling.tasks, make_scratch, [&](Scratch& s, int64_t task, int64_t next) {
    const Tile t = tiling.tile(task);
    tiles::pack_tile(dv_ptr, C, P, N, t, s.dv.data());
    tiles::pack_tile(static_cast<const scalar_t*>(dx_ptr), D, P, N, t, s.dx.data());
    const Tile upcoming = next < 0 ? Tile{} : tiling.tile(next);
    tiles::TilePrefetcher prefetch_dv(dv_ptr, C, P, N, upcoming);
    tiles::TilePrefetcher prefetch_dx(dx_ptr, D, P, N, upcoming);
    gemm::gemm(wt, s.dv.data(), t.width(), t.width(), [&](int64_t d, int64_t j, V acc) {
      acc_t* out = s.dx.data() + d * t.width() + j;
      (V::loadu(out) + acc).store(out);
      prefetch_dv.next();
      prefetch_dx.next();
    });
    tiles::unpack_tile(s.dx.data(), t, D, P, N, dx_ptr, /*stream=*/false);
  });
}

// t: [B, K, P, N] with ref's B, P and N (the same columns; any channel count K).
inline void check_same_columns(const at::Tensor& t, const char* name, const char* K,
                               const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.size(0) == ref.size(0) && t.size(2) == ref.size(2) &&
                        t.size(3) == ref.size(3),
                    name, " must have shape [B, ", K, ", P, N] = [", ref.size(0), ", ", K, ", ",
                    ref.size(2), ", ", ref.size(3), "] like ", ref_name, ", got ", t.sizes());
}

}  // namespace

at::Tensor separable_layer_project_weight_backward_cpu(const at::Tensor& grad,
                                                       const at::Tensor& input) {
  MVIT2_CHECK_CONTIGUOUS_4D(grad);
  MVIT2_CHECK_CONTIGUOUS_4D(input);
  MVIT2_CHECK_SAME(input, grad);
  const int64_t B = grad.size(0), O = grad.size(1), P = grad.size(2), N = grad.size(3);
  const int64_t I = input.size(1);
  check_same_columns(input, "input", "I", grad, "grad");
  const auto acc = grad.options().dtype(acc_type(grad.scalar_type()));
  if (B * P * N == 0 || O * I == 0) return at::zeros({O, I}, acc);
  at::Tensor dw = at::empty({O, I}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "separable_layer_project_weight_backward_cpu",
      [&] { separable_layer_project_weight_backward_kernel<scalar_t>(grad, input, dw); });
  return dw;
}

void separable_layer_project_input_backward_cpu(at::Tensor& dx, const at::Tensor& dv,
                                                const at::Tensor& w) {
  MVIT2_CHECK_CONTIGUOUS_4D(dx);
  MVIT2_CHECK_CONTIGUOUS_4D(dv);
  MVIT2_CHECK_SAME(dv, dx);
  MVIT2_CHECK_SAME(w, dx);
  const int64_t B = dx.size(0), D = dx.size(1), P = dx.size(2), N = dx.size(3);
  const int64_t C = dv.size(1);
  check_same_columns(dv, "dv", "C", dx, "dx");
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == C && w.size(1) == D,
                    "w must have shape [C, D] = [", C, ", ", D, "], got ", w.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous(), "w must be contiguous");
  if (B * P * N == 0 || C * D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dx.scalar_type(), "separable_layer_project_input_backward_cpu",
      [&] { separable_layer_project_input_backward_kernel<scalar_t>(dx, dv, w); });
}

TORCH_LIBRARY_IMPL(mvit2, CPU, m) {
  m.impl("separable_layer_project_weight_backward", &separable_layer_project_weight_backward_cpu);
  m.impl("separable_layer_project_input_backward", &separable_layer_project_input_backward_cpu);
}

}  // namespace mvit2
