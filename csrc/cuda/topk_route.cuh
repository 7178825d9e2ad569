// Torch-free launchers for the CUDA top-k routing kernels (implemented in topk_route.cu, called from
// topk_route_glue.cpp). Every pointer is a device pointer to a contiguous row-major buffer; nothing here
// synchronises with the host, so a caller may capture the launches in a CUDA graph.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "element_type.h"

namespace fsosr {
namespace cuda {


// Bytes of scratch memory topk_route_forward needs for N units and E experts (per-block partial sums).
int64_t topk_route_workspace_bytes(int64_t num_units, int64_t num_experts);

// logits/noise/noise_std: [N, E] of `dtype` (noise and noise_std both null for clean routing).
// Outputs: indices [N,k], gates [N,k] (fp32), counts [E], order [N*k], offsets [E+1], importance [E] (fp32),
// load [E] (fp32), next_index [N]. workspace: topk_route_workspace_bytes(N, E) bytes. Requires N >= 1.
cudaError_t topk_route_forward(ElementType dtype, const void* logits, const void* noise, const void* noise_std,
                               int64_t num_units, int64_t num_experts, int64_t k, bool renormalize,
                               int32_t* indices, float* gates, int32_t* counts, int32_t* order,
                               int32_t* offsets, float* importance, float* load, int32_t* next_index,
                               void* workspace, cudaStream_t stream);

// grad_gates [N,k], grad_importance [E], grad_load [E] (fp32). Writes grad_logits [N,E] and, when noise is
// given, grad_noise_std [N,E], both of `dtype`. Requires N >= 1.
cudaError_t topk_route_backward(ElementType dtype, const float* grad_gates, const float* grad_importance,
                                const float* grad_load, const void* logits, const void* noise,
                                const void* noise_std, const int32_t* indices, const float* gates,
                                const int32_t* next_index, int64_t num_units, int64_t num_experts, int64_t k,
                                bool renormalize, void* grad_logits, void* grad_noise_std, cudaStream_t stream);

}  // namespace cuda
}  // namespace fsosr
