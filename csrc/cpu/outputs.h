// The CPU kernels' output allocation: at::empty, with large outputs backed by 2 MiB pages.
//
// An allocation of glibc's largest mmap threshold (32 MiB) or more is mapped afresh by every
// call and faulted in 4 KiB at a time on the kernel's first write. For the packed backward's dqkv at
// B, C, P, N = 32, 128, 4, 256 in fp32 (33.7 MB) the faults cost 14 ms, against 0.4 ms for
// writing a buffer that is already mapped: more than the kernel itself. Transparent huge pages
// cut that to about 3 ms, but the common kernel setting ("madvise") gives them only to memory
// that asks for them. PyTorch asks for every allocation of 2 MiB or more under
// THP_MEM_ALLOC_ENABLE=1; this asks for the kernels' own outputs of 32 MiB or more, by default
// (a power-of-two shape such as 32 x 256 x 4 x 256 floats is exactly 32 MiB).
// Smaller outputs are left alone: malloc serves them from memory it keeps and reuses, which is
// faulted in once. On a host whose memory is fragmented a huge-page fault may compact memory
// first (THP "defrag" setting): MVIT2_HUGE_PAGES=0 turns the advice off.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mvit2 {

inline bool huge_page_advice_on() {
  static const bool on = [] {
    const char* env = std::getenv("MVIT2_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kMmapThreshold = size_t(32) << 20;
  const size_t nbytes = out.nbytes();
  if (out.device().is_cpu() && nbytes >= kMmapThreshold && huge_page_advice_on()) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    // Only the whole huge pages inside the block: the ends may share pages with other memory.
    const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t hi = (begin + nbytes) & ~(kHugePage - 1);
    // Advice: where THP is "never" (or the call fails) nothing changes, where it is "always"
    // the pages were huge already.
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace mvit2
