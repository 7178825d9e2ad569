// CUDA kernels of MoSA's compact sparse-expert weights (declared in sparse_adapter.cuh).
//
// select / split: elementwise, by element size (they only move bits; an all-zero pattern is +0.0 in every
// floating type). weight_grad: a tiled GEMM grad_y^T x (64 x 64 output tile per block, 16 x 16 threads with 4 x 4
// outputs each, fp32 accumulation, fixed k order) whose epilogue loads the owner tile and writes the owned part to
// `own` and the rest to `rest`: the masked gradient is produced by the GEMM itself. The M reduction may be cut
// into a fixed number of splits (fp32 partials summed by the caller in a fixed order): bitwise reproducible.
#include "element_access.cuh"
#include "sparse_adapter.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fsosr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 64;      // output tile edge
constexpr int kChunk = 16;     // rows of M per shared-memory stage
constexpr int kPerThread = 4;  // outputs per thread along each tile edge

__device__ __forceinline__ int64_t read_expert(const int64_t* expert_ptr, int64_t expert_value) {
  return expert_ptr != nullptr ? *expert_ptr : expert_value;
}

template <typename bits_t>
__global__ void select_kernel(const bits_t* own, const bits_t* rest, const uint8_t* owner, const int64_t* expert_ptr,
                              int64_t expert_value, bits_t* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bool mine = owner[i] == read_expert(expert_ptr, expert_value);
  out[i] = mine ? own[i] : (rest != nullptr ? rest[i] : bits_t(0));
}

template <typename bits_t>
__global__ void split_kernel(const bits_t* grad, const uint8_t* owner, const int64_t* expert_ptr,
                             int64_t expert_value, bits_t* own, bits_t* rest, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bool mine = owner[i] == read_expert(expert_ptr, expert_value);
  const bits_t g = grad[i];
  own[i] = mine ? g : bits_t(0);
  if (rest != nullptr) rest[i] = mine ? bits_t(0) : g;
}

// grid (ceil(out / 64), ceil(in / 64), splits); block 256.
template <typename T, typename OutT>
__global__ void weight_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const uint8_t* __restrict__ owner,
                                   const int64_t* expert_ptr, int64_t expert_value, OutT* own, OutT* rest, int64_t M,
                                   int64_t out_features, int64_t in_features, int64_t rows_per_split) {
  __shared__ float dy_tile[kChunk][kTile];  // [m][o]
  __shared__ float x_tile[kChunk][kTile];   // [m][i]
  const int64_t o0 = int64_t(blockIdx.x) * kTile, i0 = int64_t(blockIdx.y) * kTile;
  const int64_t lo = int64_t(blockIdx.z) * rows_per_split;
  const int64_t hi = lo + rows_per_split < M ? lo + rows_per_split : M;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // thread owns outputs o = ty + 16a, i = tx + 16b
  float acc[kPerThread][kPerThread] = {};
  for (int64_t m0 = lo; m0 < hi; m0 += kChunk) {
    // 16 x 64 elements per tile, 4 per thread, consecutive threads on consecutive columns (coalesced).
    for (int r = 0; r < kPerThread; ++r) {
      const int flat = threadIdx.x + r * kThreads;
      const int row = flat / kTile, col = flat % kTile;
      const int64_t m = m0 + row;
      const bool m_ok = m < hi;
      dy_tile[row][col] = m_ok && o0 + col < out_features ? to_float(dy[m * out_features + o0 + col]) : 0.f;
      x_tile[row][col] = m_ok && i0 + col < in_features ? to_float(x[m * in_features + i0 + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      float a[kPerThread], b[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        a[j] = dy_tile[k][ty + 16 * j];
        b[j] = x_tile[k][tx + 16 * j];
      }
#pragma unroll
      for (int p = 0; p < kPerThread; ++p)
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) acc[p][q] += a[p] * b[q];
    }
    __syncthreads();
  }
  // Epilogue: the owner mask, applied as the tile is written.
  const int64_t e = read_expert(expert_ptr, expert_value);
  const int64_t base = int64_t(blockIdx.z) * out_features * in_features;
  for (int p = 0; p < kPerThread; ++p) {
    const int64_t o = o0 + ty + 16 * p;
    if (o >= out_features) continue;
    for (int q = 0; q < kPerThread; ++q) {
      const int64_t i = i0 + tx + 16 * q;
      if (i >= in_features) continue;
      const int64_t w = o * in_features + i;
      const bool mine = owner[w] == e;
      own[base + w] = from_float<OutT>(mine ? acc[p][q] : 0.f);
      if (rest != nullptr) rest[base + w] = from_float<OutT>(mine ? 0.f : acc[p][q]);
    }
  }
}

unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

template <typename T>
cudaError_t launch_weight_grad(const void* grad_y, const void* x, const uint8_t* owner, const int64_t* expert_ptr,
                               int64_t expert_value, void* own, void* rest, int64_t M, int64_t out_features,
                               int64_t in_features, int64_t splits, int64_t rows_per_split, bool fp32_out,
                               cudaStream_t stream) {
  const dim3 grid(unsigned((out_features + kTile - 1) / kTile), unsigned((in_features + kTile - 1) / kTile),
                  unsigned(splits));
  const T* dy = static_cast<const T*>(grad_y);
  const T* xs = static_cast<const T*>(x);
  if (fp32_out) {
    weight_grad_kernel<T, float><<<grid, kThreads, 0, stream>>>(dy, xs, owner, expert_ptr, expert_value,
                                                                static_cast<float*>(own), static_cast<float*>(rest),
                                                                M, out_features, in_features, rows_per_split);
  } else {
    weight_grad_kernel<T, T><<<grid, kThreads, 0, stream>>>(dy, xs, owner, expert_ptr, expert_value,
                                                            static_cast<T*>(own), static_cast<T*>(rest), M,
                                                            out_features, in_features, rows_per_split);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_select(int element_size, const void* own, const void* rest, const uint8_t* owner,
                          const int64_t* expert_ptr, int64_t expert_value, void* out, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (element_size) {
    case 2:
      select_kernel<uint16_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(own), static_cast<const uint16_t*>(rest), owner, expert_ptr, expert_value,
          static_cast<uint16_t*>(out), n);
      break;
    case 4:
      select_kernel<uint32_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(own), static_cast<const uint32_t*>(rest), owner, expert_ptr, expert_value,
          static_cast<uint32_t*>(out), n);
      break;
    case 8:
      select_kernel<uint64_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint64_t*>(own), static_cast<const uint64_t*>(rest), owner, expert_ptr, expert_value,
          static_cast<uint64_t*>(out), n);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t sparse_split(int element_size, const void* grad, const uint8_t* owner, const int64_t* expert_ptr,
                         int64_t expert_value, void* own, void* rest, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (element_size) {
    case 2:
      split_kernel<uint16_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(grad), owner, expert_ptr, expert_value, static_cast<uint16_t*>(own),
          static_cast<uint16_t*>(rest), n);
      break;
    case 4:
      split_kernel<uint32_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(grad), owner, expert_ptr, expert_value, static_cast<uint32_t*>(own),
          static_cast<uint32_t*>(rest), n);
      break;
    case 8:
      split_kernel<uint64_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const uint64_t*>(grad), owner, expert_ptr, expert_value, static_cast<uint64_t*>(own),
          static_cast<uint64_t*>(rest), n);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t sparse_weight_grad(ElementType type, const void* grad_y, const void* x, const uint8_t* owner,
                               const int64_t* expert_ptr, int64_t expert_value, void* own, void* rest, int64_t M,
                               int64_t out_features, int64_t in_features, int64_t splits, int64_t rows_per_split,
                               bool fp32_out, cudaStream_t stream) {
  if (out_features == 0 || in_features == 0 || splits == 0) return cudaSuccess;
  return with_element_type(type, [&](auto element) {
    return launch_weight_grad<decltype(element)>(grad_y, x, owner, expert_ptr, expert_value, own, rest, M,
                                                 out_features, in_features, splits, rows_per_split, fp32_out, stream);
  });
}

}  // namespace cuda
}  // namespace fsosr
