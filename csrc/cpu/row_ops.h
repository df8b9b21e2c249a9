// Row helpers of the CPU kernels: vector loads/stores in the accumulation type (with
// non-temporal stores for large outputs), relu, the softmax of one row, the parallel grain.
// Include after vec_isa.h (it configures at::vec).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

namespace mvit2 {

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t W = Vec::size();

#if defined(CPU_CAPABILITY_AVX512)
  static __mmask16 lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // One float vector rounded to W halves (convert_from_float would convert two for one), with
  // at::vec's round-to-nearest-even, as at::BFloat16 and the scalar tails round. Not AVX512-BF16's
  // vcvtneps2bf16: it flushes bf16 subnormals to zero, so a native build would differ.
  static auto narrow(const Vec& x) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return at::vec::cvtfp32_bf16(x);
    } else {
      return at::vec::cvtfp32_fp16(x);
    }
  }
#endif
  static Vec load(const scalar_t* p) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float(p, out);  // Vec::size() halves -> one float vector
      return out;
    } else {
      return Vec::loadu(p);
    }
  }
  static void store(scalar_t* p, const Vec& x) {
    if constexpr (!kReduced) {
      x.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(x));
#elif defined(CPU_CAPABILITY_AVX2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(x));
#else
      at::vec::convert_from_float<scalar_t>(x, x).store(p, Vec::size());
#endif
    }
  }
  // The first `count` (<= W) elements, the rest 0: a row's last, partial vector goes through
  // the same vector code as the others. Called with count == W in the bulk loop (see over_n),
  // where the branch folds away. AVX-512 masks the partial vector's loads and stores; elsewhere
  // it goes through a buffer (a wide load cannot forward from narrow stores: slow, once a row).
  static Vec load(const scalar_t* p, int64_t count) {
    if (count == W) return load(p);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (!kReduced) {
      return Vec::loadu(p, count);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(lanes(count), p);
      __m512 out;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        at::vec::cvtbf16_fp32(h, out);
      } else {
        at::vec::cvtfp16_fp32(h, out);
      }
      return out;
    }
#else
    scalar_t buf[W] = {};
    std::copy_n(p, count, buf);
    return load(buf);
#endif
  }
  static void store(scalar_t* p, const Vec& x, int64_t count) {
    if (count == W) return store(p, x);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (!kReduced) {
      x.store(p, count);
    } else {
      _mm256_mask_storeu_epi16(p, lanes(count), narrow(x));
    }
#else
    scalar_t buf[W];
    store(buf, x);
    std::copy_n(buf, count, p);
#endif
  }
  // A non-temporal store, for outputs too large to be read back from cache: it skips the read
  // for ownership of the line, a third of the traffic of a plain store. p must be aligned to
  // kStreamAlign; the caller fences (_mm_sfence) before other threads read the output.
  static constexpr int64_t kStreamAlign = Vec::size() * sizeof(scalar_t);
  static void store_stream(scalar_t* p, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, x);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm512_stream_pd(p, x);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(x));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, x);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(p, x);
    } else {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(x));
    }
#else
    store(p, x);
#endif
  }
  static void put(bool stream, scalar_t* p, const Vec& x) {
    stream ? store_stream(p, x) : store(p, x);  // loop-invariant: the branch predicts perfectly
  }
  static void put(bool stream, scalar_t* p, const Vec& x, int64_t count) {
    count == W ? put(stream, p, x) : store(p, x, count);
  }
};

// f(n, count) for the vectors of a row of N: full ones (count == W, a constant after inlining),
// then the partial last one.
template <int64_t W, typename F>
inline void over_n(int64_t N, const F& f) {
  int64_t n = 0;
  for (; n + W <= N; n += W) f(n, W);
  if (n < N) f(n, N - n);
}

// Outputs above this size bypass the cache (store_stream): they cannot stay in a 2-core share of
// the last-level cache until the next op reads them, and streaming saves the read for ownership.
// MVIT2_STREAM_MIB overrides it (A/B measurements); a value that is not a whole number of MiB in
// [0, 2^20] is ignored.
inline int64_t streaming_store_bytes() {
  static const int64_t bytes = [] {
    int64_t mib = 8;
    if (const char* env = std::getenv("MVIT2_STREAM_MIB")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && v >= 0 && v <= (int64_t{1} << 20)) mib = v;
    }
    return mib << 20;
  }();
  return bytes;
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// torch.relu propagates NaN; std::max(x, 0) would not.
template <typename acc_t>
inline acc_t relu(acc_t x) {
  return (x > acc_t(0) || std::isnan(x)) ? x : acc_t(0);
}

// Tasks per at::parallel_for chunk so that a chunk moves at least ~16K elements.
inline int64_t task_grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, elements_per_task));
}

template <typename scalar_t>
using acc_vector = std::vector<at::opmath_type<scalar_t>>;

template <typename acc_t, typename Vec>
inline acc_t vec_sum(const Vec& x) {
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, x);
}

// s = softmax(q_row) in acc_t, like torch.softmax: a max pass, then exp and sum (a NaN anywhere
// makes the row NaN; an all -inf row is NaN). q and s may be the same acc_t row.
template <typename scalar_t>
void softmax_row(const scalar_t* q, int64_t N, at::opmath_type<scalar_t>* s) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  const int64_t Nv = N - N % W;
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  for (int64_t n = 0; n < Nv; n += W) vmax = at::vec::maximum(vmax, IO::load(q + n));
  acc_t mx = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (int64_t n = Nv; n < N; ++n) {
    const acc_t x = static_cast<acc_t>(q[n]);
    mx = (x > mx || std::isnan(x)) ? x : mx;
  }
  Vec vsum(acc_t(0));
  for (int64_t n = 0; n < Nv; n += W) {
    const Vec e = (IO::load(q + n) - Vec(mx)).exp();
    e.store(s + n);
    vsum = vsum + e;
  }
  acc_t sum = vec_sum<acc_t>(vsum);
  for (int64_t n = Nv; n < N; ++n) {
    s[n] = std::exp(static_cast<acc_t>(q[n]) - mx);
    sum += s[n];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t n = 0; n < N; ++n) s[n] *= inv;
}

}  // namespace mvit2
