// CUDA implementations of pack_weight, unpack_weight and packed_linear, on the canonical layout of
// csrc/packed_layout.h (no GPU-specific repack: unpack_weight stays the exact inverse everywhere).
//
// packed_linear: for M <= 16 activation rows a GEMV-class kernel reads every packed byte once,
// decodes in registers and accumulates in fp32 (no dequantized weight in memory). Larger M, where
// tensor cores win, dequantizes into x's dtype once and calls ATen's matmul (spec §3, G7).
//
// Argument checks and messages are those of csrc/cpu/packed.cpp. pack_weight validates its codes
// like the CPU does; reporting a bad code needs one device-to-host read (pack_weight is an offline
// export step; the matmul path never syncs).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "cuda/common.cuh"
#include "cuda/lsq_math.cuh"
#include "packed_checks.h"
#include "packed_layout.h"
#include "quant_range.h"

namespace rfq::cuda {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// ---- layout helpers (device) --------------------------------------------------------------------
// Element e of a row (0 <= e < padded K) lives in byte `packed_byte(e)` of the row at bit offset
// `packed_shift(e)` (csrc/packed_layout.h).
template <int CB>
__device__ __forceinline__ int64_t packed_byte(int64_t e) {
  const int64_t block = e / packed::kBlockK, j = e % packed::kBlockK;
  constexpr int64_t block_bytes = packed::block_bytes(CB);
  return block * block_bytes + j % block_bytes;
}
template <int CB>
__device__ __forceinline__ int packed_shift(int64_t e) {
  constexpr int64_t block_bytes = packed::block_bytes(CB);
  return CB == 8 ? 0 : static_cast<int>((e % packed::kBlockK) / block_bytes) * CB;
}

// Container value u of a field: 2/4-bit fields are unsigned offset-binary, int8 stores q itself.
template <int CB>
__device__ __forceinline__ int field_value(uint32_t byte, int shift) {
  if constexpr (CB == 8) {
    return static_cast<int>(static_cast<int8_t>(byte & 0xffu));
  } else {
    return static_cast<int>((byte >> shift) & ((1u << CB) - 1u));
  }
}

// ---- pack_weight ---------------------------------------------------------------------------------
// One thread per output byte. Every code e < K is read by exactly one thread, which also checks it
// and records the smallest bad flat index (integer atomicMin: the same answer as the CPU's scan).
template <int CB>
__global__ void pack_kernel(const int8_t* __restrict__ codes, int64_t n, int64_t k,
                            int64_t row_bytes, int64_t data_bytes, int offset, int lo, int hi,
                            bool binary, uint8_t* __restrict__ out,
                            unsigned long long* __restrict__ first_bad) {
  constexpr int kFields = 8 / CB;
  constexpr int64_t block_bytes = packed::block_bytes(CB);
  const int64_t total = n * row_bytes;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / row_bytes, p = idx % row_bytes;
    uint32_t byte = 0;
    if (p < data_bytes) {
      const int64_t block = p / block_bytes, j = p % block_bytes;
#pragma unroll
      for (int f = 0; f < kFields; ++f) {
        const int64_t e = block * packed::kBlockK + j + f * block_bytes;
        int q = 0;  // K padding holds code 0
        if (e < k) {
          q = codes[r * k + e];
          if (q < lo || q > hi || (binary && q == 0)) {
            atomicMin(first_bad, static_cast<unsigned long long>(r * k + e));
          }
        }
        byte |= (static_cast<uint32_t>(q + offset) & (CB == 8 ? 0xffu : (1u << CB) - 1u))
                << (f * CB);
      }
    }
    out[idx] = static_cast<uint8_t>(byte);
  }
}

// ---- unpack_weight and dequantize: 8 consecutive elements of one row per thread -----------------
// The 8 elements share one group (8 | 32) and sit in 8 consecutive bytes at one bit offset.
template <int CB>
__device__ __forceinline__ void load_fields8(const uint8_t* __restrict__ row, int64_t e0,
                                             int (&u)[8]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(row + packed_byte<CB>(e0));
  const int shift = packed_shift<CB>(e0);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t word = i < 4 ? raw.x : raw.y;
    u[i] = field_value<CB>(word >> (8 * (i % 4)), shift);
  }
}

template <int CB>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed_w, int64_t n, int64_t k,
                              int64_t row_bytes, int offset, bool vec_out,
                              int8_t* __restrict__ out) {
  const int64_t per_row = (k + 7) / 8, total = n * per_row;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / per_row, e0 = (idx % per_row) * 8;
    int u[8];
    load_fields8<CB>(packed_w + r * row_bytes, e0, u);
    Pack<int8_t, 8> q;
#pragma unroll
    for (int i = 0; i < 8; ++i) q.v[i] = static_cast<int8_t>(u[i] - offset);
    int8_t* dst = out + r * k + e0;
    if (vec_out && e0 + 8 <= k) {
      *reinterpret_cast<Pack<int8_t, 8>*>(dst) = q;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (e0 + i < k) dst[i] = q.v[i];
      }
    }
  }
}

// Scale/zero addressing shared by the dequantize and GEMV kernels: group g of row r is
// scales[r * groups + g]; per-tensor weights have groups == 0 (one scale at index 0).
struct ScaleArgs {
  const float* scales;
  const float* zeros;  // nullptr: the container offset
  int64_t groups;      // 0: per-tensor
  int group_size;      // elements per group (kBlockK for per-tensor: any value works there)
  float offset;
  __device__ __forceinline__ void at(int64_t r, int64_t e, float& s, float& z) const {
    const int64_t gi = groups ? r * groups + e / group_size : 0;
    s = scales[gi];
    z = (zeros != nullptr && groups) ? zeros[gi] : offset;
  }
};

// w[r, e] = (u - z) * s in fp32, rounded once to T (the reference's fp32 dequantize, then a cast).
template <typename T, int CB>
__global__ void dequant_kernel(const uint8_t* __restrict__ packed_w, int64_t n, int64_t k,
                               int64_t row_bytes, ScaleArgs sc, bool vec_out,
                               T* __restrict__ w) {
  const int64_t per_row = (k + 7) / 8, total = n * per_row;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / per_row, e0 = (idx % per_row) * 8;
    int u[8];
    load_fields8<CB>(packed_w + r * row_bytes, e0, u);
    float s, z;
    sc.at(r, e0, s, z);
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = mul_rn(sub_rn(static_cast<float>(u[i]), z), s);
    T* dst = w + r * k + e0;
    if (vec_out && e0 + 8 <= k) {
      constexpr int W = VecWidth<T>::value;  // 8 (16-bit) or 4 (fp32) per 16-byte store
#pragma unroll
      for (int h = 0; h < 8 / W; ++h) {
        Pack<T, W> pk;
#pragma unroll
        for (int i = 0; i < W; ++i) pk.v[i] = static_cast<T>(v[h * W + i]);
        *reinterpret_cast<Pack<T, W>*>(dst + h * W) = pk;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (e0 + i < k) dst[i] = static_cast<T>(v[i]);
      }
    }
  }
}

// ---- packed_linear, M <= 16: decode in registers --------------------------------------------------
// A row's packed data is cut into 16-byte chunks. Chunk c covers bytes [16c, 16c + 16) of block
// c / CB and holds 8/CB runs of 16 consecutive elements (one group each, since 16 | 32): run f
// starts at element (c / CB) * kBlockK + f * block_bytes(CB) + (c % CB) * 16 (a block is CB
// chunks: block_bytes(CB) = 16 CB, asserted in gemv_kernel). A block of kGemvThreads threads
// is split into groups of `tpr` threads (a power of two), each group owning kRows output rows;
// a group's threads stride over the chunks, so each packed byte is loaded exactly once (with an
// evict-first hint: weights are streamed, activations stay cached). fp32 accumulation, reduced
// across the group in a fixed order.
constexpr int kGemvThreads = 128;
constexpr int kRows = 2;
constexpr int kMaxGemvM = 16;

template <typename T>
__device__ __forceinline__ void load_x16(const T* __restrict__ xrow, int64_t start, int64_t k,
                                         bool vec_x, float (&xv)[16]) {
  constexpr int W = VecWidth<T>::value;
  if (vec_x && start + 16 <= k) {
#pragma unroll
    for (int h = 0; h < 16 / W; ++h) {
      const Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(xrow + start + h * W);
#pragma unroll
      for (int i = 0; i < W; ++i) xv[h * W + i] = static_cast<float>(pk.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      xv[i] = start + i < k ? static_cast<float>(xrow[start + i]) : 0.f;  // padding: x = 0
    }
  }
}

template <typename T, int CB, int MT>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const T* __restrict__ x, int m, int64_t k, const uint8_t* __restrict__ packed_w,
                int64_t row_bytes, int64_t n, int64_t chunks, ScaleArgs sc,
                const float* __restrict__ bias, int tpr, bool vec_x, T* __restrict__ y) {
  constexpr int kFields = 8 / CB;
  constexpr int64_t run_stride = packed::block_bytes(CB);
  static_assert(run_stride == 16 * CB, "a block must be CB 16-byte chunks");
  __shared__ float red[kGemvThreads / 32][kRows * MT];
  const int tid = threadIdx.x;
  const int group = tid / tpr, lane_in_group = tid % tpr;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (kGemvThreads / tpr) + group) * kRows;

  float acc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) acc[r][mm] = 0.f;
  }

  for (int64_t c = lane_in_group; c < chunks; c += tpr) {
    uint4 raw[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      raw[r] = row0 + r < n
                   ? __ldcs(reinterpret_cast<const uint4*>(packed_w + (row0 + r) * row_bytes) + c)
                   : make_uint4(0, 0, 0, 0);
    }
    const int64_t base = (c / CB) * packed::kBlockK + (c % CB) * 16;
#pragma unroll
    for (int f = 0; f < kFields; ++f) {
      const int64_t start = base + f * run_stride;
      if (start >= k) continue;  // K padding: nothing to add
      float wv[kRows][16], s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float z = 0.f;
        s[r] = 0.f;
        if (row0 + r < n) sc.at(row0 + r, start, s[r], z);
        const uint32_t words[4] = {raw[r].x, raw[r].y, raw[r].z, raw[r].w};
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          wv[r][i] = static_cast<float>(field_value<CB>(words[i / 4] >> (8 * (i % 4)), f * CB)) - z;
        }
      }
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < m) {
          float xv[16];
          load_x16<T>(x + mm * k, start, k, vec_x, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) dot = fmaf(wv[r][i], xv[i], dot);
            acc[r][mm] = fmaf(s[r], dot, acc[r][mm]);
          }
        }
      }
    }
  }

  // Fixed-order reduction over the group's tpr threads: shuffles within a warp (segments of
  // min(tpr, 32) lanes), then shared memory across the group's warps.
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      for (int off = width / 2; off > 0; off >>= 1) {
        acc[r][mm] += __shfl_down_sync(0xffffffffu, acc[r][mm], off, width);
      }
    }
  }
  auto emit = [&](int r, int mm, float total) {
    const int64_t row = row0 + r;
    if (row < n && mm < m) {
      if (bias != nullptr) total += bias[row];
      y[mm * n + row] = static_cast<T>(total);
    }
  };
  if (tpr <= 32) {
    if (lane_in_group == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) emit(r, mm, acc[r][mm]);
      }
    }
  } else {
    const int warp = tid / 32;
    if (tid % 32 == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) red[warp][r * MT + mm] = acc[r][mm];
      }
    }
    __syncthreads();
    if (lane_in_group < kRows * MT) {
      const int first_warp = group * (tpr / 32);
      float total = 0.f;
      for (int w = 0; w < tpr / 32; ++w) total += red[first_warp + w][lane_in_group];
      emit(lane_in_group / MT, lane_in_group % MT, total);
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

unsigned grid_1d(int64_t work, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads,
                                                                       kMaxBlocks)));
}

template <typename F>
void dispatch_container(int64_t container_bits, const F& fn) {
  switch (container_bits) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// The packed kernels load 8 or 16 bytes at a time from row starts (multiples of 64 bytes).
at::Tensor packed_for_kernels(const at::Tensor& packed_w) {
  at::Tensor p = packed_w.contiguous();
  if (!aligned_to(p.const_data_ptr(), 16)) p = p.clone();
  return p;
}

at::Tensor pack_weight(const at::Tensor& codes, int64_t bits) {
  constexpr const char* op = "rfq.pack_weight";
  check_bit(op, "bits", bits);
  TORCH_CHECK(codes.scalar_type() == at::kChar, op,
              ": codes must be int8 (quantize_codes of a signed weight), got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be 2-D [N, K] (flatten conv weights to ",
              "[C_out, C_in*kh*kw]), got shape ", codes.sizes());
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous();
  const int64_t n = c.size(0), k = c.size(1);
  const QuantRange<int64_t> range = quant_range<int64_t>(bits, /*is_signed=*/true);
  const int64_t rb = packed::row_bytes(k, bits), cb = packed::container_bits(bits);
  at::Tensor out = at::empty({n, rb}, c.options().dtype(at::kByte));
  if (n * rb == 0) return out;
  constexpr auto kNone = std::numeric_limits<int64_t>::max();
  at::Tensor first_bad = at::full({1}, kNone, c.options().dtype(at::kLong));
  const int64_t data_bytes = packed::data_bytes(k, bits);
  dispatch_container(cb, [&](auto cb_tag) {
    constexpr int CB = decltype(cb_tag)::value;
    pack_kernel<CB><<<grid_1d(n * rb, 256), 256, 0, stream()>>>(
        c.const_data_ptr<int8_t>(), n, k, rb, data_bytes,
        static_cast<int>(packed::code_offset(bits)), static_cast<int>(range.qn),
        static_cast<int>(range.qp), range.binary, out.mutable_data_ptr<uint8_t>(),
        reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The one host read of this op: a bad code must raise, as on CPU.
  const int64_t i = first_bad.item<int64_t>();
  if (i != kNone) {
    const int value = c.view({-1})[i].item<int>();
    TORCH_CHECK(false, op, ": codes[", i / k, ", ", i % k, "] = ", value, " is not a signed ",
                bits, "-bit code (range [", range.qn, ", ", range.qp, "]",
                range.binary ? ", binary: -1 or +1" : "", ")");
  }
  return out;
}

at::Tensor unpack_weight(const at::Tensor& packed_w, int64_t bits, c10::IntArrayRef shape) {
  constexpr const char* op = "rfq.unpack_weight";
  check_unpack(op, packed_w, bits, shape);
  const c10::cuda::CUDAGuard guard(packed_w.device());
  const int64_t n = shape[0], k = shape[1];
  at::Tensor out = at::empty({n, k}, packed_w.options().dtype(at::kChar));
  if (n * k == 0) return out;
  const at::Tensor p = packed_for_kernels(packed_w);
  const bool vec_out = k % 8 == 0 && aligned_to(out.const_data_ptr(), 8);
  dispatch_container(packed::container_bits(bits), [&](auto cb_tag) {
    constexpr int CB = decltype(cb_tag)::value;
    unpack_kernel<CB><<<grid_1d(n * ((k + 7) / 8), 256), 256, 0, stream()>>>(
        p.const_data_ptr<uint8_t>(), n, k, p.size(1),
        static_cast<int>(packed::code_offset(bits)), vec_out, out.mutable_data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Activation rows up to which the decode-in-registers kernel runs (<= 16, its register tile);
// RFQ_CUDA_GEMV_MAX_M lowers it for tuning (read once).
int64_t gemv_max_m() {
  static const int64_t value = [] {
    const char* env = std::getenv("RFQ_CUDA_GEMV_MAX_M");
    const int64_t v = env ? std::atoll(env) : int64_t{kMaxGemvM};
    return std::max<int64_t>(0, std::min<int64_t>(v, kMaxGemvM));
  }();
  return value;
}

// Threads per output row: enough to cover a row's chunks in one pass, a power of two in [4, 128].
int threads_per_row(int64_t chunks) {
  int t = 4;
  while (t < kGemvThreads && t < chunks) t *= 2;
  return t;
}

template <typename F>
void dispatch_m_tile(int64_t m, const F& fn) {
  if (m <= 1) return fn(std::integral_constant<int, 1>{});
  if (m <= 2) return fn(std::integral_constant<int, 2>{});
  if (m <= 4) return fn(std::integral_constant<int, 4>{});
  if (m <= 8) return fn(std::integral_constant<int, 8>{});
  return fn(std::integral_constant<int, 16>{});
}

// packed_linear's fused input quantizer: the codes of x as exact fp32 integers (NaN kept; a bad
// step gives NaN codes, so no host sync is needed to report it).
template <typename T>
__global__ void input_codes_kernel(const T* __restrict__ x, int64_t n,
                                   const float* __restrict__ step, QuantRange<float> q,
                                   float* __restrict__ codes) {
  const float s0 = *step;
  const float s = step_ok(s0) ? s0 : std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{blockDim.x} * gridDim.x) {
    codes[i] = quant_code(div_rn(static_cast<float>(x[i]), s), q);
  }
}

at::Tensor packed_linear_codes(const at::Tensor& x2, const at::Tensor& packed_w,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias, const LinearDims& dims);

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed_w,
                         const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                         int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& x_step, int64_t x_bits, bool x_signed) {
  constexpr const char* op = "rfq.packed_linear";
  const LinearDims dims =
      check_packed_linear(op, x, packed_w, scales, zeros, bits, group_size, bias);
  check_input_quant(op, x, x_step, x_bits);
  const c10::cuda::CUDAGuard guard(x.device());

  if (is_empty_product(dims)) return empty_product(dims, x, bias);

  const at::Tensor x2 = x.reshape({dims.m, dims.k}).contiguous();
  if (!x_step.has_value()) {
    return packed_linear_codes(x2, packed_w, scales, zeros, bits, group_size, bias, dims);
  }
  // Input stage: x's codes (fp32), the product on them, then y = s_x (k @ W^T) + bias, all on
  // the device (the step is read by the kernels, never by the host).
  at::Tensor codes = at::empty({dims.m, dims.k}, x.options().dtype(at::kFloat));
  const at::Tensor step = x_step->contiguous();
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    input_codes_kernel<T><<<grid_1d(codes.numel(), 256), 256, 0, stream()>>>(
        static_cast<const T*>(x2.const_data_ptr()), codes.numel(), step.const_data_ptr<float>(),
        quant_range<float>(x_bits, x_signed), codes.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor y = packed_linear_codes(codes, packed_w, scales, zeros, bits, group_size,
                                     std::nullopt, dims);
  y.mul_(step.reshape({}));
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

// The product on x2 = [M, K] (contiguous; x itself or its input codes), output in x2's dtype.
at::Tensor packed_linear_codes(const at::Tensor& x2, const at::Tensor& packed_w,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias, const LinearDims& dims) {
  constexpr const char* op = "rfq.packed_linear";
  const int64_t m = dims.m, k = dims.k, n = dims.n, groups = dims.groups;
  const at::Tensor& x = x2;
  const at::Tensor p = packed_for_kernels(packed_w);
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  at::Tensor z;
  if (zeros.has_value()) z = zeros->to(at::kFloat).contiguous();
  const ScaleArgs sc{s.const_data_ptr<float>(), z.defined() ? z.const_data_ptr<float>() : nullptr,
                     group_size ? groups : 0,
                     static_cast<int>(group_size ? group_size : packed::kBlockK),
                     static_cast<float>(packed::code_offset(bits))};
  const int64_t cb = packed::container_bits(bits);

  if (m <= gemv_max_m()) {
    at::Tensor y = at::empty({m, n}, x.options());
    at::Tensor bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
    const int64_t chunks = packed::data_bytes(k, bits) / 16;
    const int tpr = threads_per_row(chunks);
    const int64_t rows_per_block = int64_t{kGemvThreads / tpr} * kRows;
    const auto blocks = static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block);
    TORCH_CHECK(blocks <= 0x7fffffffu, op, ": too many output rows (N=", n, ")");
    dispatch_float_types(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* xp = static_cast<const T*>(x2.const_data_ptr());
      const bool vec_x = aligned_to(xp, 16) && (k * int64_t{sizeof(T)}) % 16 == 0;
      dispatch_container(cb, [&](auto cb_tag) {
        constexpr int CB = decltype(cb_tag)::value;
        dispatch_m_tile(m, [&](auto mt_tag) {
          constexpr int MT = decltype(mt_tag)::value;
          gemv_kernel<T, CB, MT><<<blocks, kGemvThreads, 0, stream()>>>(
              xp, static_cast<int>(m), k, p.const_data_ptr<uint8_t>(), p.size(1), n, chunks, sc,
              bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr, tpr, vec_x,
              static_cast<T*>(y.mutable_data_ptr()));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    return y.reshape(dims.out_shape);
  }

  // Large M: one dequantize into x's dtype, then ATen's matmul (cuBLAS, tensor cores).
  at::Tensor w = at::empty({n, k}, x.options());
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* wp = static_cast<T*>(w.mutable_data_ptr());
    const bool vec_out = aligned_to(wp, 16) && (k * int64_t{sizeof(T)}) % 16 == 0;
    dispatch_container(cb, [&](auto cb_tag) {
      constexpr int CB = decltype(cb_tag)::value;
      dequant_kernel<T, CB><<<grid_1d(n * ((k + 7) / 8), 256), 256, 0, stream()>>>(
          p.const_data_ptr<uint8_t>(), n, k, p.size(1), sc, vec_out, wp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor y = bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x2, w.t())
                                        : at::mm(x2, w.t());
  return y.reshape(dims.out_shape);
}

}  // namespace
}  // namespace rfq::cuda

TORCH_LIBRARY_IMPL(rfq, CUDA, m) {
  m.impl("pack_weight", &rfq::cuda::pack_weight);
  m.impl("unpack_weight", &rfq::cuda::unpack_weight);
  m.impl("packed_linear", &rfq::cuda::packed_linear);
}
