// Device-side element conversions shared by the CUDA kernels: every kernel loads its element type, computes in
// fp32 and rounds once on store; with_element_type turns the launcher's ElementType into the kernel's T.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "element_type.h"

namespace fsosr {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// f(T{}) with T the element type of `type` (fp32, fp16, bf16: the fp32-accumulating kernels).
template <typename F>
cudaError_t with_element_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat32: return f(float{});
    case ElementType::kFloat16: return f(__half{});
    case ElementType::kBFloat16: return f(__nv_bfloat16{});
    case ElementType::kFloat64: break;  // not instantiated for these kernels
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fsosr
