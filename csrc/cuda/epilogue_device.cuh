// Device helpers shared by the two CUDA epilogue kernels: element types, 16-byte vector loads
// and stores with conversion to/from fp32, targets, and the dtype switch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "epilogue_launch.h"
#include "epilogue_math.h"

namespace papo_kernels::epilogue {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as Triton's .to() and torch's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));

// Loads VEC = kVec<T> elements at p (16-byte aligned) as fp32, scaled by `scale`. The load is
// "evict first" (ld.global.cs): the workspace (~0.5 GB per chunk at the 7B head) is far larger
// than L2, each element is read once per epilogue, and the cached lines would only evict the
// GEMM operands.
template <typename T>
__device__ __forceinline__ void load_vector(const T* p, float scale, float (&out)[kVec<T>]) {
  const uint4 bits = __ldcs(reinterpret_cast<const uint4*>(p));
  T values[kVec<T>];
  static_assert(sizeof(values) == sizeof(bits), "one 16-byte vector");
  __builtin_memcpy(values, &bits, sizeof(bits));
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(values[i]) * scale;
}

template <typename T>
__device__ __forceinline__ float load_scalar(const T* p, float scale) {
  return to_float(p[0]) * scale;
}

// Stores N fp32 values at p as Out; p is aligned to N * sizeof(Out) bytes (whole 16-byte vectors
// or, for N * sizeof(Out) < 16, one 8-byte store), written "evict first" for the same reason.
template <typename Out, int N>
__device__ __forceinline__ void store_vector(Out* p, const float (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(Out));
  static_assert(kBytes % 8 == 0, "whole 8-byte stores");
  Out values[N];
#pragma unroll
  for (int i = 0; i < N; ++i) values[i] = from_float<Out>(in[i]);
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) {
      uint4 bits;
      __builtin_memcpy(&bits, reinterpret_cast<const char*>(values) + 16 * k, 16);
      __stcs(reinterpret_cast<uint4*>(p) + k, bits);
    }
  } else {
    uint2 bits;
    __builtin_memcpy(&bits, values, 8);
    __stcs(reinterpret_cast<uint2*>(p), bits);
  }
}

__device__ __forceinline__ int64_t load_target(const void* targets, bool int32, int64_t row) {
  return int32 ? static_cast<int64_t>(static_cast<const int32_t*>(targets)[row])
               : static_cast<const int64_t*>(targets)[row];
}

// Calls f(T{}) with the element type of `dtype`.
template <typename F>
void with_element_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32:
      f(float{});
      break;
    case Dtype::kFloat16:
      f(__half{});
      break;
    case Dtype::kBFloat16:
      f(__nv_bfloat16{});
      break;
  }
}

}  // namespace papo_kernels::epilogue
