// Torch-free launcher of the CUDA kernel of MoSA's merge of N sparse experts (fsosr/ops/sparse_adapter.py:
// merge_experts; called from merge_experts_glue.cpp). Pointers are device pointers to contiguous buffers; nothing
// here synchronises.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "element_type.h"

namespace fsosr {
namespace cuda {

// out[i] = (own[i] + c[owner[i]] · rest[i]) / num_experts over n entries of `type` (fp32, fp16, bf16, fp64),
// computed in fp32 (fp64 for fp64) with the product, the sum and the division each rounded to nearest (no FMA),
// and rounded once to `type`. c[k] = (compute type) coefficients[k] for k < num_experts, 0 for larger owner values
// (never read out of bounds). rest null: out[i] = own[i] / num_experts. coefficients: fp64 [num_experts],
// 1 <= num_experts <= 256.
cudaError_t merge_experts(ElementType type, const void* own, const void* rest, const uint8_t* owner,
                          const double* coefficients, int64_t num_experts, void* out, int64_t n,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace fsosr
