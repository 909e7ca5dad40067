// Shared by the .cu files: element <-> accumulator conversions, loads and stores of the
// dtype-tagged adapter tensors (device), a warp sum, and ceil_div (host).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "edora_kernels.cuh"

namespace edora {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, once, when a result is stored.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A double rounded once to T (as torch's .to(T) of a float64 or float32 value).
template <typename T>
__device__ __forceinline__ T from_double(double x);
template <>
__device__ __forceinline__ float from_double<float>(double x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ double from_double<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_double<__half>(double x) { return __double2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __double2bfloat16(x);
}

// Element i of a dtype-tagged array, converted to Acc (float or double). The tag is the same for
// every thread, so the switch never diverges.
template <typename Acc>
__device__ __forceinline__ Acc load_any(const void* data, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat32:
      return static_cast<Acc>(static_cast<const float*>(data)[i]);
    case Dtype::kFloat64:
      return static_cast<Acc>(static_cast<const double*>(data)[i]);
    case Dtype::kFloat16:
      return static_cast<Acc>(__half2float(static_cast<const __half*>(data)[i]));
    default:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]));
  }
}

template <typename Acc>
__device__ __forceinline__ Acc load_at(const AnyMatrix& a, int64_t i, int64_t j) {
  return load_any<Acc>(a.data, a.dtype, i * a.stride0 + j * a.stride1);
}

__device__ __forceinline__ double load_at(const F64Matrix& a, int64_t i, int64_t j) {
  return a.data[i * a.stride0 + j * a.stride1];
}

// out[i] = value rounded once to out's dtype.
__device__ __forceinline__ void store_any(const AnyOut& out, int64_t i, double value) {
  switch (out.dtype) {
    case Dtype::kFloat32:
      static_cast<float*>(out.data)[i] = static_cast<float>(value);
      break;
    case Dtype::kFloat64:
      static_cast<double*>(out.data)[i] = value;
      break;
    case Dtype::kFloat16:
      static_cast<__half*>(out.data)[i] = __double2half(value);
      break;
    default:
      static_cast<__nv_bfloat16*>(out.data)[i] = __double2bfloat16(value);
      break;
  }
}

// The sum over the 32 lanes of a warp (every lane must take part), in a fixed butterfly order:
// every lane gets the same bits, run to run.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace edora
