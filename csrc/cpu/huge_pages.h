// Best-effort 2 MB pages for a large, freshly allocated CPU tensor (Linux transparent huge
// pages in "madvise" mode). Call before the first write: the kernel then backs the 2 MB-aligned
// middle of the buffer with huge pages at first touch, instead of faulting in 4 KB pages one at
// a time (and later missing the TLB on them). No effect where THP is off or on other systems;
// the unaligned head and tail of the buffer stay on small pages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rfq::cpu {

inline void advise_huge_pages(const at::Tensor& t, size_t min_bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = t.nbytes();
  if (bytes < min_bytes || bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
  (void)min_bytes;
#endif
}

}  // namespace rfq::cpu
