// Torch-free launchers of the CUDA masked HF-AdamW step (fsosr::masked_adamw_ on CUDA tensors; semantics in
// fsosr/ops/masked_adamw.py). Every pointer is a device pointer to a contiguous buffer; nothing here synchronises
// with the host, so the two launches can be captured in a CUDA graph.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fsosr {
namespace cuda {

// Bytes of scratch memory for the per-(segment, owner slot) rule table of num_pairs = S * (N + 1) pairs.
int64_t masked_adamw_workspace_bytes(int64_t num_pairs);

// params, exp_avg, exp_avg_sq, grads: [numel] of float (is_double false) or double. steps: int64 [S, N+1],
// advanced in place when advance_steps. owner uint8 [numel] (255 = shared), segment_offsets int64 [S+1],
// selected int64 [S, draws] (the experts drawn per segment since the last step), weight_decay double [S]; semantics 0 mosa | 1 skip | 2 freeze. Values are not checked here:
// an owner >= N other than 255 leaves its entry unchanged and the segment search never leaves [0, S).
cudaError_t masked_adamw(bool is_double, void* params, void* exp_avg, void* exp_avg_sq, int64_t* steps,
                         const void* grads, const uint8_t* owner, const int64_t* segment_offsets,
                         const int64_t* selected, int64_t draws, const double* weight_decay, int64_t numel,
                         int64_t num_segments,
                         int64_t num_experts, double lr, double beta1, double beta2, double eps, int64_t semantics,
                         bool advance_steps, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fsosr
