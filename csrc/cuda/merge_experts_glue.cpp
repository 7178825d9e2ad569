// Torch glue of the CUDA merge_experts kernel (merge_experts.cuh): validation (no data reads, so no host
// synchronisation), allocation, and the launch on the current stream. No autograd is registered: merging is an
// eval-time operation, and fsosr.ops.merge_experts takes its differentiable reference path when an input
// requires grad. Schema: csrc/fsosr.cpp; semantics: fsosr/ops/sparse_adapter.py.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../sparse_adapter_checks.h"
#include "merge_experts.cuh"

namespace {

using fsosr::cuda::ElementType;

// Elementwise, so fp64 runs here too (unlike the GEMM kernels).
ElementType element_type(const char* op, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kDouble: return ElementType::kFloat64;
    default: TORCH_CHECK_TYPE(false, op, ": w_own must be float32, float16, bfloat16 or float64, got ", type);
  }
  return ElementType::kFloat32;  // unreachable
}

at::Tensor merge_experts_cuda(const at::Tensor& w_own, const at::Tensor& owner,
                              const std::optional<at::Tensor>& w_rest, const at::Tensor& coefficients,
                              int64_t num_experts) {
  constexpr const char* op = "merge_experts";
  const ElementType type = element_type(op, w_own.scalar_type());
  TORCH_CHECK_VALUE(w_own.is_cuda(), op, ": w_own must be a CUDA tensor, got ", w_own.device());
  const bool has_rest = fsosr::check_merge_experts_inputs(w_own, owner, w_rest, coefficients, num_experts);
  const c10::cuda::CUDAGuard guard(w_own.device());
  const at::Tensor own = w_own.contiguous(), map = owner.contiguous(), coef = coefficients.contiguous();
  const at::Tensor rest = has_rest ? w_rest->contiguous() : at::Tensor();
  at::Tensor out = at::empty(own.sizes(), own.options());
  const cudaError_t err = fsosr::cuda::merge_experts(
      type, own.data_ptr(), has_rest ? rest.data_ptr() : nullptr, map.data_ptr<uint8_t>(), coef.data_ptr<double>(),
      num_experts, out.data_ptr(), own.numel(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CUDA, m) { m.impl("merge_experts", &merge_experts_cuda); }

#endif  // WITH_CUDA
