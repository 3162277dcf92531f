// Interface between the CPU wrappers of the CSQ ops (csq.cpp) and the per-ISA kernel files
// (csq_kernels_{default,avx2,avx512}.cpp), which all compile csq_kernels_impl.h.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/lsq_kernels.h"  // kReduceChunk

namespace rfq::cpu {

// p, q, dp, dq: `planes` rows of `n` elements (plane-major, dense); w, grad_w: n elements; all of
// `dtype` (fp32 or fp64). coef[i] = scale g(beta m_i) 2^(N-1-i) / (2^N - 1), resolved by the
// wrapper. plane_sums[i] = sum_e grad_w[e] (g(beta p[i,e]) - g(beta q[i,e])), from fixed
// kReduceChunk partials combined in fp64 in chunk order (independent of the thread count).
struct CsqKernels {
  void (*forward)(c10::ScalarType dtype, const void* p, const void* q, void* w, int64_t planes,
                  int64_t n, const double* coef, double beta);
  void (*backward)(c10::ScalarType dtype, const void* grad_w, const void* p, const void* q,
                   void* dp, void* dq, int64_t planes, int64_t n, const double* coef,
                   double beta, double* plane_sums);
};

namespace DEFAULT { extern const CsqKernels kCsqKernels; }
#ifdef RFQ_X86_DISPATCH
namespace AVX2 { extern const CsqKernels kCsqKernels; }
namespace AVX512 { extern const CsqKernels kCsqKernels; }
#endif

// The best table this CPU supports; honours ATEN_CPU_CAPABILITY like lsq_kernels().
const CsqKernels& csq_kernels();

}  // namespace rfq::cpu
