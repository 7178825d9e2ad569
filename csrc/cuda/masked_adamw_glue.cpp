// Torch glue of the CUDA masked HF-AdamW step: checks dtypes, shapes and devices (nothing that reads tensor data,
// so no host synchronisation: the value checks are the Python wrapper's, on request), then calls the torch-free
// launcher of masked_adamw.cuh on the current stream. Schema: csrc/fsosr.cpp.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <cstdint>

#include "../masked_adamw_checks.h"
#include "masked_adamw.cuh"

namespace {

void masked_adamw_cuda(at::Tensor params, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor steps,
                       const at::Tensor& grads, const at::Tensor& owner, const at::Tensor& segment_offsets,
                       const at::Tensor& selected, const at::Tensor& weight_decay, double lr, double beta1,
                       double beta2, double eps, int64_t semantics, bool advance_steps) {
  fsosr::check_masked_adamw_inputs(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected,
                                   weight_decay, semantics);
  const c10::cuda::CUDAGuard guard(params.device());
  const int64_t num_segments = segment_offsets.numel() - 1;
  const int64_t num_experts = steps.size(1) - 1;
  at::Tensor workspace = at::empty({fsosr::cuda::masked_adamw_workspace_bytes(steps.numel())},
                                   params.options().dtype(at::kByte));
  const cudaError_t err = fsosr::cuda::masked_adamw(
      params.scalar_type() == at::kDouble, params.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
      steps.data_ptr<int64_t>(), grads.data_ptr(), owner.data_ptr<uint8_t>(), segment_offsets.data_ptr<int64_t>(),
      selected.data_ptr<int64_t>(), selected.dim() == 2 ? selected.size(1) : 1, weight_decay.data_ptr<double>(),
      params.numel(), num_segments, num_experts, lr,
      beta1, beta2, eps, semantics, advance_steps, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "masked_adamw_: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CUDA, m) { m.impl("masked_adamw_", &masked_adamw_cuda); }

#endif  // WITH_CUDA
