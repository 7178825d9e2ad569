// CUDA kernel of MoSA's merge of N sparse experts (declared in merge_experts.cuh).
//
// Elementwise: each block first turns the fp64 coefficients into a 256-entry table of the compute type in shared
// memory (one cast per expert, as the reference does), then each thread merges kPerThread entries, strided by the
// block size so that a warp's loads stay coalesced. The arithmetic uses the _rn intrinsics: nvcc contracts a * b + c
// into an FMA by default (-fmad=true), which would round once where the reference rounds twice.
#include "element_access.cuh"
#include "merge_experts.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fsosr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int kOwnerValues = 256;  // every value a uint8 owner map can hold

// The compute type of each element type: fp32, fp64 for fp64.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T> __device__ __forceinline__ float widen(T v) { return to_float(v); }
__device__ __forceinline__ double widen(double v) { return v; }
template <typename T> __device__ __forceinline__ T narrow(float v) { return from_float<T>(v); }
template <typename T> __device__ __forceinline__ T narrow(double v) { return v; }

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename T, bool kHasRest>
__global__ void merge_kernel(const T* __restrict__ own, const T* __restrict__ rest,
                             const uint8_t* __restrict__ owner, const double* __restrict__ coefficients,
                             int64_t num_experts, T* __restrict__ out, int64_t n) {
  using acc_t = typename Compute<T>::type;
  __shared__ acc_t table[kOwnerValues];
  if (kHasRest) {
    for (int k = threadIdx.x; k < kOwnerValues; k += blockDim.x) {
      table[k] = k < num_experts ? static_cast<acc_t>(coefficients[k]) : acc_t(0);
    }
    __syncthreads();
  }
  const acc_t divisor = static_cast<acc_t>(num_experts);
  const int64_t base = int64_t(blockIdx.x) * (kThreads * kPerThread) + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = base + int64_t(j) * kThreads;
    if (i >= n) break;
    acc_t sum = widen(own[i]);
    if (kHasRest) sum = add_rn(sum, mul_rn(table[owner[i]], widen(rest[i])));
    out[i] = narrow<T>(div_rn(sum, divisor));
  }
}

template <typename T>
cudaError_t launch(const void* own, const void* rest, const uint8_t* owner, const double* coefficients,
                   int64_t num_experts, void* out, int64_t n, cudaStream_t stream) {
  const unsigned blocks = unsigned((n + kThreads * kPerThread - 1) / (kThreads * kPerThread));
  const T* own_ptr = static_cast<const T*>(own);
  T* out_ptr = static_cast<T*>(out);
  if (rest != nullptr) {
    merge_kernel<T, true><<<blocks, kThreads, 0, stream>>>(own_ptr, static_cast<const T*>(rest), owner,
                                                           coefficients, num_experts, out_ptr, n);
  } else {
    merge_kernel<T, false><<<blocks, kThreads, 0, stream>>>(own_ptr, nullptr, owner, coefficients, num_experts,
                                                            out_ptr, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_experts(ElementType type, const void* own, const void* rest, const uint8_t* owner,
                          const double* coefficients, int64_t num_experts, void* out, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > kOwnerValues) return cudaErrorInvalidValue;
  switch (type) {
    case ElementType::kFloat32: return launch<float>(own, rest, owner, coefficients, num_experts, out, n, stream);
    case ElementType::kFloat16: return launch<__half>(own, rest, owner, coefficients, num_experts, out, n, stream);
    case ElementType::kBFloat16:
      return launch<__nv_bfloat16>(own, rest, owner, coefficients, num_experts, out, n, stream);
    case ElementType::kFloat64: return launch<double>(own, rest, owner, coefficients, num_experts, out, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fsosr
