// Argument checks of MoSA's compact-weight ops (sparse_adapter_weight, sparse_linear, merge_experts) shared by the
// CPU kernels and the CUDA glue (schemas: csrc/fsosr.cpp). Dtypes, shapes and devices only: nothing here reads
// tensor data, so the CUDA path stays free of host synchronisation. Every tensor must be on w_own's device; the
// caller checks which device that is.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fsosr {

constexpr int64_t kMergeOwnerValues = 256;  // every value a uint8 owner map can hold

// The compact form: w_own floating point, owner uint8 of its shape, w_rest (optional) of its dtype and shape, all
// on one device. Returns whether w_rest is present.
inline bool check_compact_inputs(const char* op, const at::Tensor& w_own, const at::Tensor& owner,
                                 const std::optional<at::Tensor>& w_rest) {
  TORCH_CHECK_TYPE(at::isFloatingType(w_own.scalar_type()), op, ": w_own must be floating point, got ",
                   w_own.scalar_type());
  TORCH_CHECK_TYPE(owner.scalar_type() == at::kByte, op, ": owner must be uint8, got ", owner.scalar_type());
  TORCH_CHECK_VALUE(owner.sizes() == w_own.sizes(), op, ": owner must have w_own's shape ", w_own.sizes(), ", got ",
                    owner.sizes());
  TORCH_CHECK_VALUE(owner.device() == w_own.device(), op, ": owner must be on ", w_own.device(), ", got ",
                    owner.device());
  const bool has_rest = w_rest.has_value() && w_rest->defined();
  if (has_rest) {
    TORCH_CHECK_TYPE(w_rest->scalar_type() == w_own.scalar_type(), op, ": w_rest must have w_own's dtype ",
                     w_own.scalar_type(), ", got ", w_rest->scalar_type());
    TORCH_CHECK_VALUE(w_rest->sizes() == w_own.sizes(), op, ": w_rest must have w_own's shape ", w_own.sizes(),
                      ", got ", w_rest->sizes());
    TORCH_CHECK_VALUE(w_rest->device() == w_own.device(), op, ": w_rest must be on ", w_own.device(), ", got ",
                      w_rest->device());
  }
  return has_rest;
}

// merge_experts: the compact form plus N and the fp64 [N] coefficient vector. Returns whether w_rest is present.
inline bool check_merge_experts_inputs(const at::Tensor& w_own, const at::Tensor& owner,
                                       const std::optional<at::Tensor>& w_rest, const at::Tensor& coefficients,
                                       int64_t num_experts) {
  constexpr const char* op = "merge_experts";
  const bool has_rest = check_compact_inputs(op, w_own, owner, w_rest);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMergeOwnerValues, op, ": num_experts must be in [1, ",
                    kMergeOwnerValues, "], got ", num_experts);
  TORCH_CHECK_TYPE(coefficients.scalar_type() == at::kDouble, op, ": coefficients must be float64, got ",
                   coefficients.scalar_type());
  TORCH_CHECK_VALUE(coefficients.dim() == 1 && coefficients.size(0) == num_experts, op,
                    ": coefficients must be [num_experts = ", num_experts, "], got shape ", coefficients.sizes());
  TORCH_CHECK_VALUE(coefficients.device() == w_own.device(), op, ": coefficients must be on ", w_own.device(),
                    ", got ", coefficients.device());
  return has_rest;
}

}  // namespace fsosr
