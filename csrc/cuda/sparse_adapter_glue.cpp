// Torch glue of the CUDA sparse-expert kernels (sparse_adapter.cuh): validation (no data reads, so no host
// synchronisation), allocation, and launches on the current stream. The forward GEMM and grad_x use ATen's
// matmul (cuBLAS) on the selected weight; the weight gradient is our GEMM with the owner mask in its epilogue.
// Schemas: csrc/fsosr.cpp; semantics: fsosr/ops/sparse_adapter.py.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../sparse_adapter_checks.h"
#include "sparse_adapter.cuh"

namespace {

using fsosr::cuda::ElementType;

constexpr int64_t kTile = 64;            // output tile edge of the weight-gradient kernel
constexpr int64_t kTargetBlocks = 264;   // ~2 blocks per SM of an H100
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kMinRowsPerSplit = 256;

struct ExpertArg {
  const int64_t* ptr = nullptr;  // device copy, read in the kernel
  int64_t value = 0;             // used when ptr is null
  at::Tensor keep;               // keeps the device copy alive until the launch is queued
};

// A CPU id is read on the host (no synchronisation); a device id is read by the kernel.
ExpertArg expert_arg(const char* op, const at::Tensor& expert, const at::Tensor& like) {
  TORCH_CHECK_TYPE(expert.dim() == 0 && !at::isFloatingType(expert.scalar_type()) &&
                       expert.scalar_type() != at::kBool,
                   op, ": expert must be a 0-d integer tensor, got ", expert.scalar_type(), expert.sizes());
  ExpertArg arg;
  if (expert.device().is_cpu()) {
    arg.value = expert.item<int64_t>();
  } else {
    TORCH_CHECK_VALUE(expert.device() == like.device(), op, ": expert must be on the CPU or on ", like.device(),
                      ", got ", expert.device());
    arg.keep = expert.to(at::kLong).contiguous();
    arg.ptr = arg.keep.data_ptr<int64_t>();
  }
  return arg;
}

void check_compact(const char* op, const at::Tensor& w_own, const at::Tensor& owner,
                   const std::optional<at::Tensor>& w_rest) {
  TORCH_CHECK_VALUE(w_own.is_cuda(), op, ": w_own must be a CUDA tensor, got ", w_own.device());
  fsosr::check_compact_inputs(op, w_own, owner, w_rest);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor select_weight(const char* op, const at::Tensor& w_own, const at::Tensor& owner,
                         const std::optional<at::Tensor>& w_rest, const ExpertArg& expert) {
  const at::Tensor own = w_own.contiguous(), map = owner.contiguous();
  const bool has_rest = w_rest.has_value() && w_rest->defined();
  const at::Tensor rest = has_rest ? w_rest->contiguous() : at::Tensor();
  at::Tensor out = at::empty(own.sizes(), own.options());
  check_launch(op, fsosr::cuda::sparse_select(int(own.element_size()), own.data_ptr(),
                                              has_rest ? rest.data_ptr() : nullptr, map.data_ptr<uint8_t>(),
                                              expert.ptr, expert.value, out.data_ptr(), own.numel(),
                                              c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor sparse_adapter_weight_cuda(const at::Tensor& w_own, const at::Tensor& owner,
                                      const std::optional<at::Tensor>& w_rest, const at::Tensor& expert) {
  constexpr const char* op = "sparse_adapter_weight";
  check_compact(op, w_own, owner, w_rest);
  const c10::cuda::CUDAGuard guard(w_own.device());
  return select_weight(op, w_own, owner, w_rest, expert_arg(op, expert, w_own));
}

std::tuple<at::Tensor, at::Tensor> sparse_adapter_weight_bwd_cuda(const at::Tensor& grad, const at::Tensor& owner,
                                                                  const at::Tensor& expert, bool rest_grad) {
  constexpr const char* op = "sparse_adapter_weight_bwd";
  check_compact(op, grad, owner, std::nullopt);
  const c10::cuda::CUDAGuard guard(grad.device());
  const ExpertArg e = expert_arg(op, expert, grad);
  const at::Tensor g = grad.contiguous(), map = owner.contiguous();
  at::Tensor own = at::empty_like(g);
  at::Tensor rest = rest_grad ? at::empty_like(g) : at::empty({0}, g.options());
  check_launch(op, fsosr::cuda::sparse_split(int(g.element_size()), g.data_ptr(), map.data_ptr<uint8_t>(), e.ptr,
                                             e.value, own.data_ptr(), rest_grad ? rest.data_ptr() : nullptr,
                                             g.numel(), c10::cuda::getCurrentCUDAStream().stream()));
  return {own, rest};
}

ElementType gemm_type(const char* op, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": CUDA runs float32, float16 and bfloat16, got ", type);
  }
  return ElementType::kFloat32;  // unreachable
}

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& w_own, const at::Tensor& owner,
                  const std::optional<at::Tensor>& w_rest, const std::optional<at::Tensor>& bias) {
  check_compact(op, w_own, owner, w_rest);
  gemm_type(op, w_own.scalar_type());
  TORCH_CHECK_VALUE(w_own.dim() == 2, op, ": w_own must be 2-D [out, in], got shape ", w_own.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == w_own.size(1), op, ": x must be [M, in = ", w_own.size(1),
                    "], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == w_own.scalar_type(), op, ": x must have w_own's dtype ", w_own.scalar_type());
  TORCH_CHECK_VALUE(x.device() == w_own.device(), op, ": x must be on ", w_own.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w_own.size(0), op, ": bias must be [out = ",
                      w_own.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == w_own.scalar_type(), op, ": bias must have w_own's dtype");
    TORCH_CHECK_VALUE(bias->device() == w_own.device(), op, ": bias must be on ", w_own.device());
  }
}

at::Tensor sparse_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& w_own,
                                  const std::optional<at::Tensor>& w_rest, const at::Tensor& owner,
                                  const at::Tensor& expert, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse_linear_fwd";
  check_linear(op, x, w_own, owner, w_rest, bias);
  const c10::cuda::CUDAGuard guard(w_own.device());
  const at::Tensor weight = select_weight(op, w_own, owner, w_rest, expert_arg(op, expert, w_own));
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_own, const std::optional<at::Tensor>& w_rest,
    const at::Tensor& owner, const at::Tensor& expert, bool x_grad, bool weight_grad, bool rest_grad,
    bool bias_grad) {
  constexpr const char* op = "sparse_linear_bwd";
  check_linear(op, x, w_own, owner, w_rest, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == w_own.size(0), op,
                    ": grad_y must be [M = ", x.size(0), ", out = ", w_own.size(0), "], got shape ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == w_own.scalar_type(), op, ": grad_y must have w_own's dtype");
  const c10::cuda::CUDAGuard guard(w_own.device());
  const ExpertArg e = expert_arg(op, expert, w_own);
  const at::Tensor gy = grad_y.contiguous(), xc = x.contiguous(), map = owner.contiguous();
  // Unused outputs are fresh empty tensors (outputs of an op may not alias each other).
  auto empty = [&] { return at::empty({0}, w_own.options()); };
  at::Tensor grad_x = x_grad ? at::mm(gy, select_weight(op, w_own, map, w_rest, e)) : empty();
  at::Tensor grad_bias = bias_grad ? gy.sum(0) : empty();
  at::Tensor grad_own = empty(), grad_rest = empty();
  if (weight_grad || rest_grad) {
    const int64_t M = xc.size(0), out_features = w_own.size(0), in_features = w_own.size(1);
    // Splits of M: a function of shapes only, so the fixed-order sum below gives the same bits every run.
    const int64_t tiles = ((out_features + kTile - 1) / kTile) * ((in_features + kTile - 1) / kTile);
    int64_t splits = std::max<int64_t>(1, std::min({(kTargetBlocks + tiles - 1) / std::max<int64_t>(tiles, 1),
                                                    kMaxSplits, (M + kMinRowsPerSplit - 1) / kMinRowsPerSplit}));
    const int64_t rows_per_split = std::max<int64_t>(1, (M + splits - 1) / splits);
    splits = M == 0 ? 1 : (M + rows_per_split - 1) / rows_per_split;
    const bool partials = splits > 1;
    const auto out_options = partials ? w_own.options().dtype(at::kFloat) : w_own.options();
    at::Tensor own = at::empty({splits, out_features, in_features}, out_options);
    at::Tensor rest = rest_grad ? at::empty_like(own) : at::Tensor();
    check_launch(op, fsosr::cuda::sparse_weight_grad(
                         gemm_type(op, w_own.scalar_type()), gy.data_ptr(), xc.data_ptr(), map.data_ptr<uint8_t>(),
                         e.ptr, e.value, own.data_ptr(), rest_grad ? rest.data_ptr() : nullptr, M, out_features,
                         in_features, splits, rows_per_split, partials, c10::cuda::getCurrentCUDAStream().stream()));
    auto reduce = [&](const at::Tensor& t) { return partials ? t.sum(0).to(w_own.scalar_type()) : t[0]; };
    if (weight_grad) grad_own = reduce(own);
    if (rest_grad) grad_rest = reduce(rest);
  }
  return {grad_x, grad_own, grad_rest, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CUDA, m) {
  m.impl("sparse_adapter_weight", &sparse_adapter_weight_cuda);
  m.impl("sparse_adapter_weight_bwd", &sparse_adapter_weight_bwd_cuda);
  m.impl("sparse_linear_fwd", &sparse_linear_fwd_cuda);
  m.impl("sparse_linear_bwd", &sparse_linear_bwd_cuda);
}

#endif  // WITH_CUDA
