// A small register-blocked GEMM for the 1x1 projections of the fused layer: out = A @ B with A a
// weight matrix [M, K] (packed once per call) and B an activation tile [K, ncols] in the
// accumulation type (float32, or float64), row-major with ncols contiguous. The result never
// goes to memory as such: every accumulated vector is handed to an epilogue (bias, relu, scaling,
// the store), so the caller fuses what follows the GEMM into it.
//
// Why our own: on the project's 2-core AMD EPYC (AVX-512) the library fp32 GEMM reaches ~95
// GFLOP/s on these shapes (MKL takes its AVX2 path on AMD), and a library call cannot be fused
// with the epilogue. This one runs at ~80% of the core's FMA peak (separable_layer_project.cpp).
//
// Layout: the register block is kMR rows of A x NR vectors of B columns (NR <= kNR). A step over
// k broadcasts kMR scalars of A and loads NR vectors of one B row: kMR * NR independent FMAs
// (24 with 8 x 3, enough to hide the FMA latency on two pipes) for kMR + NR loads. K is small
// (the channel count, <= a few hundred), so there is no K blocking: the B column block of a
// register block (K x NR vectors) stays in L1 while the A panels stream past it.
//
// Include vec_isa.h before this header (it selects at::vec's AVX-512/AVX2 implementation).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mvit2::gemm {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

constexpr int64_t kMR = 8;  // rows of A per register block
constexpr int64_t kNR = 3;  // vectors of B columns per register block

// A [M, K] in panels of kMR rows, each panel laid out [K][kMR]: one k step reads kMR consecutive
// scalars. Rows past M are zero, so the kernel always runs full panels (their results are never
// handed to the epilogue).
template <typename acc_t>
struct PackedA {
  int64_t M = 0, K = 0;
  std::vector<acc_t> data;

  int64_t panels() const { return (M + kMR - 1) / kMR; }
  const acc_t* panel(int64_t i) const { return data.data() + i * K * kMR; }
};

// Packs A[m, k] = a[m * row_stride + k * col_stride] converted to acc_t; a transposed matrix is
// the same storage with the strides swapped. In parallel: at batch 1 and small N the packing is
// a fair share of the op (~10 us of ~110 for a 256 x 256 weight at N = 16).
template <typename acc_t, typename scalar_t>
PackedA<acc_t> pack_a(const scalar_t* a, int64_t M, int64_t K, int64_t row_stride,
                      int64_t col_stride) {
  PackedA<acc_t> out;
  out.M = M;
  out.K = K;
  out.data.resize(static_cast<size_t>(out.panels() * K * kMR));
  at::parallel_for(0, out.panels(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* dst = out.data.data() + i * K * kMR;
      const scalar_t* src = a + i * kMR * row_stride;
      const int64_t rows = std::min(kMR, M - i * kMR);
      // Read along the axis that is contiguous in memory (a row of a, or of a transposed).
      const auto at = [&](int64_t r, int64_t k) {
        return static_cast<acc_t>(src[r * row_stride + k * col_stride]);
      };
      if (col_stride == 1) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = 0; k < K; ++k) dst[k * kMR + r] = at(r, k);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t r = 0; r < rows; ++r) dst[k * kMR + r] = at(r, k);
        }
      }
      for (int64_t r = rows; r < kMR; ++r) {
        for (int64_t k = 0; k < K; ++k) dst[k * kMR + r] = acc_t(0);
      }
    }
  });
  return out;
}

// One register block: acc[r][j] = sum_k a[k][r] * b[k][j * W, (j + 1) * W), then
// epi(row0 + r, col0 + j * W, acc[r][j]) for the rows r < `rows`. The loops have compile-time
// bounds so that the compiler keeps the accumulators in registers.
template <int64_t NR, typename acc_t, typename Epilogue>
inline void register_block(const acc_t* a, const acc_t* b, int64_t ldb, int64_t K, int64_t row0,
                           int64_t rows, int64_t col0, Epilogue& epi) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  // One flat array indexed r * NR + j: GCC keeps it in registers where a 2-D array of
  // single-column rows (NR = 1) was spilled to the stack at every k.
  V acc[kMR * NR];
#pragma GCC unroll 24
  for (int64_t i = 0; i < kMR * NR; ++i) acc[i] = V(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* ak = a + k * kMR;
    const acc_t* bk = b + k * ldb;
    V bv[NR];
#pragma GCC unroll 4
    for (int64_t j = 0; j < NR; ++j) bv[j] = V::loadu(bk + j * W);
#pragma GCC unroll 24
    for (int64_t i = 0; i < kMR * NR; ++i) {
      acc[i] = at::vec::fmadd(V(ak[i / NR]), bv[i % NR], acc[i]);
    }
  }
#pragma GCC unroll 24
  for (int64_t i = 0; i < kMR * NR; ++i) {
    if (i / NR < rows) epi(row0 + i / NR, col0 + i % NR * W, acc[i]);
  }
}

// The register blocks of NR vectors from column vector j, for every panel of A.
template <int64_t NR, typename acc_t, typename Epilogue>
inline void column_block(const PackedA<acc_t>& a, const acc_t* b, int64_t ldb, int64_t j,
                         Epilogue& epi) {
  constexpr int64_t W = Vec<acc_t>::size();
  for (int64_t i = 0; i < a.panels(); ++i) {
    const int64_t rows = std::min(kMR, a.M - i * kMR);
    register_block<NR>(a.panel(i), b + j * W, ldb, a.K, i * kMR, rows, j * W, epi);
  }
}

// The last `left` (< kNR) vectors: one narrower block, its width chosen at compile time.
template <int64_t NR, typename acc_t, typename Epilogue>
inline void column_tail(const PackedA<acc_t>& a, const acc_t* b, int64_t ldb, int64_t j,
                        int64_t left, Epilogue& epi) {
  if constexpr (NR > 0) {
    if (left == NR) return column_block<NR>(a, b, ldb, j, epi);
    column_tail<NR - 1>(a, b, ldb, j, left, epi);
  }
}

// out[m, n] = sum_k A[m, k] * b[k * ldb + n] for m < A.M and n < ncols, delivered as
// epi(m, n0, Vec) for every vector n0 = 0, W, 2W, ... < ncols (ncols a multiple of
// Vec<acc_t>::size(); the caller pads its tile). Column blocks outside, A panels inside: the
// block of b (K x kNR vectors) is reused from L1 by every panel (panels outside measured the
// same). Not inlined: the caller's loop would take registers the accumulators need.
template <typename acc_t, typename Epilogue>
[[gnu::noinline]] void gemm(const PackedA<acc_t>& a, const acc_t* b, int64_t ldb, int64_t ncols,
                            Epilogue&& epi) {
  const int64_t vectors = ncols / Vec<acc_t>::size();
  int64_t j = 0;
  for (; j + kNR <= vectors; j += kNR) column_block<kNR>(a, b, ldb, j, epi);
  column_tail<kNR - 1>(a, b, ldb, j, vectors - j, epi);
}

}  // namespace mvit2::gemm
