// Torch glue for the CUDA top-k routing kernels: validates, allocates, and calls the torch-free launchers of
// topk_route.cuh on the current stream. Schemas: csrc/fsosr.cpp; semantics: docs/ops/topk_route.md.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "topk_route.cuh"

namespace {

using fsosr::cuda::ElementType;

ElementType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "topk_route (CUDA): unsupported dtype ", type);
  }
  return ElementType::kFloat32;  // unreachable
}

void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.defined(), op, ": logits must be a tensor");
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, E], got shape ", logits.sizes());
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16 on CUDA, got ", type);
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one expert column (E >= 1)");
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), op, ": too many experts (", logits.size(1), ")");
}

void check_like_logits(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.sizes() == logits.sizes(), op, ": ", name, " must have the shape of logits ", logits.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == logits.scalar_type(), op, ": ", name, " must have the dtype of logits (",
              logits.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the device of logits (", logits.device(),
              "), got ", t.device());
}

// noise and noise_std: both given (like logits) or both absent. Returns whether they are given.
bool check_noise(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                 const std::optional<at::Tensor>& noise_std) {
  const bool has_noise = noise.has_value() && noise->defined();
  const bool has_std = noise_std.has_value() && noise_std->defined();
  TORCH_CHECK(has_noise == has_std, op, ": noise and noise_std must be given together (got noise ",
              has_noise ? "present" : "absent", ", noise_std ", has_std ? "present" : "absent", ")");
  if (has_noise) {
    check_like_logits(op, "noise", *noise, logits);
    check_like_logits(op, "noise_std", *noise_std, logits);
  }
  return has_noise;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType type,
                  at::IntArrayRef shape, const at::Tensor& logits) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the device of logits (", logits.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_route_fwd_cuda(const at::Tensor& logits, int64_t k, bool renormalize, const std::optional<at::Tensor>& noise,
                    const std::optional<at::Tensor>& noise_std) {
  constexpr const char* op = "topk_route_fwd";
  check_logits(op, logits);
  const int64_t n_units = logits.size(0), n_experts = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= n_experts, op, ": k must be in [1, E=", n_experts, "], got ", k);
  TORCH_CHECK(n_units <= std::numeric_limits<int32_t>::max() / k, op, ": N*k = ", n_units, "*", k,
              " does not fit the int32 flat ids of `order`");
  const bool noisy = check_noise(op, logits, noise, noise_std);

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor noise_c = noisy ? noise->contiguous() : at::Tensor();
  const at::Tensor std_c = noisy ? noise_std->contiguous() : at::Tensor();
  const auto i32 = logits.options().dtype(at::kInt);
  const auto f32 = logits.options().dtype(at::kFloat);

  at::Tensor indices = at::empty({n_units, k}, i32);
  at::Tensor gates = at::empty({n_units, k}, f32);
  at::Tensor order = at::empty({n_units * k}, i32);
  at::Tensor next_index = at::empty({n_units}, i32);
  if (n_units == 0) {  // nothing to launch; every per-expert statistic is an empty sum
    return {gates, at::zeros({n_experts}, f32), at::zeros({n_experts}, f32), indices, at::zeros({n_experts}, i32),
            order, at::zeros({n_experts + 1}, i32), next_index};
  }
  at::Tensor counts = at::empty({n_experts}, i32);
  at::Tensor offsets = at::empty({n_experts + 1}, i32);
  at::Tensor importance = at::empty({n_experts}, f32);
  at::Tensor load = at::empty({n_experts}, f32);
  at::Tensor workspace =
      at::empty({fsosr::cuda::topk_route_workspace_bytes(n_units, n_experts)}, logits.options().dtype(at::kByte));

  const cudaError_t err = fsosr::cuda::topk_route_forward(
      kernel_dtype(logits.scalar_type()), logits_c.data_ptr(), noisy ? noise_c.data_ptr() : nullptr,
      noisy ? std_c.data_ptr() : nullptr, n_units, n_experts, k, renormalize, indices.data_ptr<int32_t>(),
      gates.data_ptr<float>(), counts.data_ptr<int32_t>(), order.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
      importance.data_ptr<float>(), load.data_ptr<float>(), next_index.data_ptr<int32_t>(), workspace.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(op, err);
  // Differentiable outputs first (see csrc/fsosr.cpp).
  return {gates, importance, load, indices, counts, order, offsets, next_index};
}

std::tuple<at::Tensor, at::Tensor> topk_route_bwd_cuda(const at::Tensor& grad_gates, const at::Tensor& grad_importance,
                                                       const at::Tensor& grad_load, const at::Tensor& logits,
                                                       const std::optional<at::Tensor>& noise,
                                                       const std::optional<at::Tensor>& noise_std,
                                                       const at::Tensor& indices, const at::Tensor& gates,
                                                       const at::Tensor& next_index, bool renormalize) {
  constexpr const char* op = "topk_route_bwd";
  check_logits(op, logits);
  const int64_t n_units = logits.size(0), n_experts = logits.size(1);
  TORCH_CHECK(indices.defined() && indices.dim() == 2, op, ": indices must be 2-D [N, k]");
  const int64_t k = indices.size(1);
  TORCH_CHECK(k >= 1 && k <= n_experts, op, ": indices must have k in [1, E=", n_experts, "] columns, got ", k);
  TORCH_CHECK(n_units <= std::numeric_limits<int32_t>::max() / k, op, ": N*k = ", n_units, "*", k, " is too large");
  check_tensor(op, "indices", indices, at::kInt, {n_units, k}, logits);
  check_tensor(op, "gates", gates, at::kFloat, {n_units, k}, logits);
  check_tensor(op, "next_index", next_index, at::kInt, {n_units}, logits);
  check_tensor(op, "grad_gates", grad_gates, at::kFloat, {n_units, k}, logits);
  check_tensor(op, "grad_importance", grad_importance, at::kFloat, {n_experts}, logits);
  check_tensor(op, "grad_load", grad_load, at::kFloat, {n_experts}, logits);
  const bool noisy = check_noise(op, logits, noise, noise_std);

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor logits_c = logits.contiguous();
  at::Tensor grad_logits = at::empty({n_units, n_experts}, logits.options());
  at::Tensor grad_noise_std = noisy ? at::empty({n_units, n_experts}, logits.options()) : at::empty({0}, logits.options());
  if (n_units == 0) return {grad_logits, grad_noise_std};

  const at::Tensor noise_c = noisy ? noise->contiguous() : at::Tensor();
  const at::Tensor std_c = noisy ? noise_std->contiguous() : at::Tensor();
  const at::Tensor grad_gates_c = grad_gates.contiguous(), grad_importance_c = grad_importance.contiguous();
  const at::Tensor grad_load_c = grad_load.contiguous(), indices_c = indices.contiguous();
  const at::Tensor gates_c = gates.contiguous(), next_index_c = next_index.contiguous();

  const cudaError_t err = fsosr::cuda::topk_route_backward(
      kernel_dtype(logits.scalar_type()), grad_gates_c.data_ptr<float>(), grad_importance_c.data_ptr<float>(),
      grad_load_c.data_ptr<float>(), logits_c.data_ptr(), noisy ? noise_c.data_ptr() : nullptr,
      noisy ? std_c.data_ptr() : nullptr, indices_c.data_ptr<int32_t>(), gates_c.data_ptr<float>(),
      next_index_c.data_ptr<int32_t>(), n_units, n_experts, k, renormalize, grad_logits.data_ptr(),
      noisy ? grad_noise_std.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  check_launch(op, err);
  return {grad_logits, grad_noise_std};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CUDA, m) {
  m.impl("topk_route_fwd", TORCH_FN(topk_route_fwd_cuda));
  m.impl("topk_route_bwd", TORCH_FN(topk_route_bwd_cuda));
}

#endif  // WITH_CUDA
