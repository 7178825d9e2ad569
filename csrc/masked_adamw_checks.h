// Shape, dtype, device and layout checks of masked_adamw_ shared by the CPU and CUDA kernels (csrc/fsosr.cpp has
// the schema). Nothing here reads tensor data, so the CUDA path stays free of host synchronisation; the CPU kernel
// adds its value checks (offsets, selected experts) after these.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace fsosr {

inline void check_masked_adamw_inputs(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                  const at::Tensor& steps, const at::Tensor& grads, const at::Tensor& owner,
                  const at::Tensor& segment_offsets, const at::Tensor& selected, const at::Tensor& weight_decay,
                  int64_t semantics) {
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
                   "masked_adamw_: params must be float32 or float64, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.dim() == 1, "masked_adamw_: params must be a flat 1-D buffer [P], got shape ",
                    params.sizes());
  const std::pair<const at::Tensor*, const char*> same_as_params[] = {
      {&grads, "grads"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [t, name] : same_as_params) {
    TORCH_CHECK_TYPE(t->scalar_type() == params.scalar_type(), "masked_adamw_: ", name, " must be ",
                     params.scalar_type(), " like params, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == params.sizes(), "masked_adamw_: ", name, " must have params' shape ",
                      params.sizes(), ", got ", t->sizes());
  }
  TORCH_CHECK_TYPE(owner.scalar_type() == at::kByte, "masked_adamw_: owner must be uint8, got ", owner.scalar_type());
  TORCH_CHECK_VALUE(owner.sizes() == params.sizes(), "masked_adamw_: owner must have params' shape ",
                    params.sizes(), ", got ", owner.sizes());
  TORCH_CHECK_TYPE(segment_offsets.scalar_type() == at::kLong && selected.scalar_type() == at::kLong &&
                       steps.scalar_type() == at::kLong,
                   "masked_adamw_: segment_offsets, selected and steps must be int64, got ",
                   segment_offsets.scalar_type(), ", ", selected.scalar_type(), ", ", steps.scalar_type());
  TORCH_CHECK_TYPE(weight_decay.scalar_type() == at::kDouble, "masked_adamw_: weight_decay must be float64, got ",
                   weight_decay.scalar_type());
  TORCH_CHECK_VALUE(segment_offsets.dim() == 1 && segment_offsets.numel() >= 1,
                    "masked_adamw_: segment_offsets must be 1-D [S + 1], got shape ", segment_offsets.sizes());
  const int64_t num_segments = segment_offsets.numel() - 1;
  TORCH_CHECK_VALUE((selected.dim() == 1 && selected.size(0) == num_segments) ||
                        (selected.dim() == 2 && selected.size(0) == num_segments && selected.size(1) >= 1),
                    "masked_adamw_: selected must be [S] or [S, D] with D >= 1 draws, S = ", num_segments,
                    ", got shape ", selected.sizes());
  TORCH_CHECK_VALUE(weight_decay.dim() == 1 && weight_decay.numel() == num_segments,
                    "masked_adamw_: weight_decay must be [S] = [", num_segments, "], got shape ",
                    weight_decay.sizes());
  TORCH_CHECK_VALUE(steps.dim() == 2 && steps.size(0) == num_segments && steps.size(1) >= 2,
                    "masked_adamw_: steps must be [S, N + 1] = [", num_segments, ", N + 1] with N >= 1, got shape ",
                    steps.sizes());
  TORCH_CHECK_VALUE(steps.size(1) - 1 <= 254, "masked_adamw_: at most 254 experts (owner 255 means shared), got ", steps.size(1) - 1);
  TORCH_CHECK_VALUE(semantics >= 0 && semantics <= 2, "masked_adamw_: semantics must be 0 (mosa), ",
                    "1 (skip) or 2 (freeze), got ", semantics);
  for (const at::Tensor* t : {&params, &exp_avg, &exp_avg_sq, &steps, &grads, &owner, &segment_offsets, &selected,
                              &weight_decay}) {
    TORCH_CHECK_VALUE(t->device() == params.device(), "masked_adamw_: every tensor must be on params' device ",
                      params.device(), ", got ", t->device());
    TORCH_CHECK_VALUE(t->is_contiguous(), "masked_adamw_: every tensor must be contiguous");
  }
}

}  // namespace fsosr
