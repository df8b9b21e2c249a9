// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): block shape and occupancy, strided row
// access, 16-byte vector loads and stores, NaN-propagating relu/max, fixed-order warp and block reductions, the softmax statistics
// of a row, and the choice of vector width. Everything here is inline or a template, so every .cu
// may include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace mvit2 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The streaming kernels' __launch_bounds__ minimum: ≤ 80 registers, so that 3 blocks (768
// threads) share an SM and keep ~48 KiB of loads in flight; float64 (gradcheck, not speed) gets
// 128 rather than spill.
template <typename scalar_t>
constexpr int kBlocksPerSm = sizeof(scalar_t) == 8 ? 2 : 3;

// A tensor whose last dim has unit stride (unit_last_stride): data and the element strides of
// the other dims, [b, c, p] of [B, C, P, N] or [b, n] of [B, N, D]. Read as they are, so the
// q/k/v views of one qkv tensor need no copy.
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1, s2;
  __device__ T* row(int64_t i0, int64_t i1, int64_t i2 = 0) const {
    return data + i0 * s0 + i1 * s1 + i2 * s2;
  }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 3 || t.dim() == 4, "rows_of: a 3-D or 4-D tensor");
  const int64_t s2 = t.dim() == 4 ? t.stride(2) : 0;
  if constexpr (std::is_const_v<T>) {
    return {t.const_data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), s2};
  } else {
    return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1), s2};
  }
}

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

// A Pack moves as one unsigned integer (vector) of its size, through the __ldg/__stwb intrinsics:
// plain copies of c10::Half/BFloat16 members get split into 2-byte accesses. The inputs are
// read-only for the kernel's life, so loads take the non-coherent path (ld.global.nc).
template <int Bytes>
struct RawOf;
template <>
struct RawOf<2> { using type = unsigned short; };
template <>
struct RawOf<4> { using type = unsigned; };
template <>
struct RawOf<8> { using type = uint2; };
template <>
struct RawOf<16> { using type = uint4; };

template <typename scalar_t, int W>
__device__ __forceinline__ Pack<scalar_t, W> load_pack(const scalar_t* p) {
  using Raw = typename RawOf<sizeof(Pack<scalar_t, W>)>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<scalar_t, W> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}

template <typename scalar_t, int W>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, W>& x) {
  using Raw = typename RawOf<sizeof(Pack<scalar_t, W>)>::type;
  Raw raw;
  memcpy(&raw, &x, sizeof(raw));
  __stwb(reinterpret_cast<Raw*>(p), raw);  // a plain store of raw may still be split
}

template <typename acc_t, int K>
struct AccVecOf;
template <>
struct AccVecOf<float, 1> { using type = float; };
template <>
struct AccVecOf<float, 2> { using type = float2; };
template <>
struct AccVecOf<float, 4> { using type = float4; };
template <>
struct AccVecOf<double, 1> { using type = double; };
template <>
struct AccVecOf<double, 2> { using type = double2; };

// W consecutive accumulator values that the kernel itself wrote (shared or global memory, through
// a generic pointer), in accesses of up to 16 bytes: plain loads, as ld.global.nc could be stale.
// p must be aligned to min(16, W * sizeof(acc_t)) bytes.
template <int W, typename acc_t>
__device__ __forceinline__ void load_accs(const acc_t* p, acc_t (&out)[W]) {
  constexpr int kPer = W * sizeof(acc_t) <= 16 ? W : static_cast<int>(16 / sizeof(acc_t));
  using Vec = typename AccVecOf<acc_t, kPer>::type;
#pragma unroll
  for (int i = 0; i < W; i += kPer) {
    const Vec vec = *reinterpret_cast<const Vec*>(p + i);
    memcpy(&out[i], &vec, sizeof(vec));
  }
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

// Sum over an aligned group of `group` lanes; every lane gets the same bits (+ commutes). All
// 32 lanes of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// Block-wide reduction in a fixed order; every thread gets the result. red: kWarps values.
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

// Max and 1 / Σ exp(q - max) of a row of N scores, as torch.softmax: two passes, so a leading
// -inf does not poison the sum; a NaN anywhere makes every s[n] = exp(q[n] - mx) * inv NaN.
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

// W-element vectors need every row start aligned: the base pointer and the strides of dims 0..2
// (those of size > 1) multiples of W elements, and N a multiple of W (no tail).
inline bool vectorizable(int W, int64_t elem_size, int64_t N,
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

inline int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= INT_MAX, op, " (CUDA): ", blocks,
              " blocks exceed the grid limit; split the batch");
  return static_cast<int>(blocks);
}

// Lanes that share one row of N elements read as W-vectors: a power of two ≤ 32 (so shuffles
// stay inside a warp), no more than the row's vectors need.
inline int lanes_per_row(int64_t N, int W) {
  int group = 1;
  while (group < 32 && group < N / W) group *= 2;
  return group;
}

}  // namespace mvit2
