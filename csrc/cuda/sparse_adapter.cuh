// Torch-free launchers of the CUDA kernels for MoSA's compact sparse-expert weights (fsosr/ops/sparse_adapter.py,
// called from sparse_adapter_glue.cpp). W_e = where(owner == e, w_own, w_rest or 0) for [out, in] weights.
// Pointers are device pointers to contiguous buffers. The expert id is read in the kernel from expert_ptr when it
// is not null (a device tensor: no host read), else taken from expert_value. Nothing here synchronises.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "element_type.h"

namespace fsosr {
namespace cuda {

// out = where(owner == e, own, rest or 0) over n entries of element_size bytes (2, 4 or 8); rest may be null.
cudaError_t sparse_select(int element_size, const void* own, const void* rest, const uint8_t* owner,
                          const int64_t* expert_ptr, int64_t expert_value, void* out, int64_t n,
                          cudaStream_t stream);

// own = where(owner == e, grad, 0) and, when rest is not null, rest = where(owner == e, 0, grad).
cudaError_t sparse_split(int element_size, const void* grad, const uint8_t* owner, const int64_t* expert_ptr,
                         int64_t expert_value, void* own, void* rest, int64_t n, cudaStream_t stream);

// Split s of the masked weight gradient grad_y^T x over rows [s * rows_per_split, (s + 1) * rows_per_split) of
// M: grad_y [M, out] and x [M, in] of `type`. The owner mask is applied to each output tile as it is written
// (own: owned entries, rest: the others; rest may be null). With fp32_out the outputs are fp32 partials
// [splits, out, in]; otherwise `type` tensors [out, in] (splits must then be 1).
cudaError_t sparse_weight_grad(ElementType type, const void* grad_y, const void* x, const uint8_t* owner,
                               const int64_t* expert_ptr, int64_t expert_value, void* own, void* rest, int64_t M,
                               int64_t out_features, int64_t in_features, int64_t splits, int64_t rows_per_split,
                               bool fp32_out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fsosr
