// at::vec chooses its implementation from the CPU_CAPABILITY_* macros, which torch sets for its
// own kernels but not for extensions. Map what the compiler targets (setup.py: MVIT2_CPU_ISA,
// default -march=native) to them, so Vectorized<float> is 16 lanes on AVX-512, 8 on AVX2.
// Include this before any ATen header.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
