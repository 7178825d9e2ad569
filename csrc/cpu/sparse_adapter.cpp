// CPU kernels of MoSA's compact sparse-expert weights (fsosr/ops/sparse_adapter.py, docs/ops/sparse_adapter.md):
//
//   sparse_adapter_weight     W_e = where(owner == e, w_own, w_rest or 0)           (a select, copied bit for bit)
//   sparse_adapter_weight_bwd (where(owner == e, g, 0), where(owner == e, 0, g))
//   sparse_linear_fwd         y = x W_e^T + bias
//   sparse_linear_bwd         grad_x = grad_y W_e; grad_w = grad_y^T x with the owner mask applied to each output
//                             tile right after the GEMM that produced it (the backward's epilogue), so the masked
//                             gradient is never a separate pass over a full dW.
//
// The selects only move bits, so they are written once per element size (2, 4, 8 bytes) instead of per dtype; an
// all-zero bit pattern is +0.0 in every floating type. Work is split into fixed chunks, so results do not depend on
// the thread count (the per-tile GEMMs run single-threaded inside the parallel region).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../sparse_adapter_checks.h"

namespace fsosr {
namespace {

constexpr int64_t kSelectGrain = 1 << 15;  // entries per parallel chunk of a select
constexpr int64_t kTileRows = 32;          // rows of dW (output features) per GEMM tile of the backward

int64_t expert_value(const char* op, const at::Tensor& expert) {
  TORCH_CHECK_TYPE(expert.dim() == 0 && !at::isFloatingType(expert.scalar_type()) &&
                       expert.scalar_type() != at::kBool,
                   op, ": expert must be a 0-d integer tensor, got ", expert.scalar_type(), expert.sizes());
  TORCH_CHECK_VALUE(expert.device().is_cpu(), op, ": expert must be on the CPU, got ", expert.device());
  return expert.item<int64_t>();
}

void check_compact(const char* op, const at::Tensor& w_own, const at::Tensor& owner,
                   const std::optional<at::Tensor>& w_rest) {
  TORCH_CHECK_VALUE(w_own.device().is_cpu(), op, ": tensors must be on the CPU, got ", w_own.device());
  check_compact_inputs(op, w_own, owner, w_rest);
}

template <typename bits_t>
void select_range(const bits_t* own, const bits_t* rest, const uint8_t* owner, int64_t expert, bits_t* out,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const bool mine = owner[i] == expert;
    out[i] = mine ? own[i] : (rest != nullptr ? rest[i] : bits_t(0));
  }
}

// Calls fn.template operator()<bits_t>() with the unsigned integer type of the element size.
template <typename Fn>
void by_element_size(const at::Tensor& t, Fn&& fn) {
  switch (t.element_size()) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    case 8: fn(uint64_t{}); break;
    default: TORCH_CHECK(false, "sparse_adapter: unsupported element size ", t.element_size());
  }
}

// W_e into a new tensor (contiguous inputs).
at::Tensor select_weight(const at::Tensor& w_own, const at::Tensor& owner, const at::Tensor& w_rest,
                         int64_t expert) {
  at::Tensor out = at::empty_like(w_own, at::MemoryFormat::Contiguous);
  const int64_t n = w_own.numel();
  by_element_size(w_own, [&](auto tag) {
    using bits_t = decltype(tag);
    const auto* own = static_cast<const bits_t*>(w_own.data_ptr());
    const auto* rest = w_rest.defined() ? static_cast<const bits_t*>(w_rest.data_ptr()) : nullptr;
    const uint8_t* map = owner.data_ptr<uint8_t>();
    auto* dst = static_cast<bits_t*>(out.data_ptr());
    at::parallel_for(0, n, kSelectGrain, [&](int64_t begin, int64_t end) {
      select_range(own, rest, map, expert, dst, begin, end);
    });
  });
  return out;
}

at::Tensor sparse_adapter_weight_cpu(const at::Tensor& w_own, const at::Tensor& owner,
                                     const std::optional<at::Tensor>& w_rest, const at::Tensor& expert) {
  constexpr const char* op = "sparse_adapter_weight";
  check_compact(op, w_own, owner, w_rest);
  const at::Tensor rest = w_rest.has_value() && w_rest->defined() ? w_rest->contiguous() : at::Tensor();
  return select_weight(w_own.contiguous(), owner.contiguous(), rest, expert_value(op, expert));
}

// Splits g by the mask in one pass: own = where(mine, g, 0), rest = where(mine, 0, g) (rest only if wanted).
template <typename bits_t>
void split_range(const bits_t* g, const uint8_t* owner, int64_t expert, bits_t* own, bits_t* rest, int64_t begin,
                 int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const bits_t value = g[i];  // read first: the weight-gradient epilogue splits in place (own == g)
    const bool mine = owner[i] == expert;
    own[i] = mine ? value : bits_t(0);
    if (rest != nullptr) rest[i] = mine ? bits_t(0) : value;
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_adapter_weight_bwd_cpu(const at::Tensor& grad, const at::Tensor& owner,
                                                                 const at::Tensor& expert, bool rest_grad) {
  constexpr const char* op = "sparse_adapter_weight_bwd";
  check_compact(op, grad, owner, std::nullopt);
  const int64_t e = expert_value(op, expert);
  const at::Tensor g = grad.contiguous(), map = owner.contiguous();
  at::Tensor own = at::empty_like(g);
  at::Tensor rest = rest_grad ? at::empty_like(g) : at::empty({0}, g.options());
  by_element_size(g, [&](auto tag) {
    using bits_t = decltype(tag);
    const auto* src = static_cast<const bits_t*>(g.data_ptr());
    auto* own_ptr = static_cast<bits_t*>(own.data_ptr());
    auto* rest_ptr = rest_grad ? static_cast<bits_t*>(rest.data_ptr()) : nullptr;
    at::parallel_for(0, g.numel(), kSelectGrain, [&](int64_t begin, int64_t end) {
      split_range(src, map.data_ptr<uint8_t>(), e, own_ptr, rest_ptr, begin, end);
    });
  });
  return {own, rest};
}

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& w_own, const at::Tensor& owner,
                  const std::optional<at::Tensor>& w_rest, const std::optional<at::Tensor>& bias) {
  check_compact(op, w_own, owner, w_rest);
  TORCH_CHECK_VALUE(w_own.dim() == 2, op, ": w_own must be 2-D [out, in], got shape ", w_own.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == w_own.size(1), op, ": x must be [M, in = ", w_own.size(1),
                    "], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == w_own.scalar_type(), op, ": x must have w_own's dtype ", w_own.scalar_type(),
                   ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be on the CPU");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w_own.size(0), op, ": bias must be [out = ",
                      w_own.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == w_own.scalar_type(), op, ": bias must have w_own's dtype");
  }
}

at::Tensor sparse_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w_own, const std::optional<at::Tensor>& w_rest,
                                 const at::Tensor& owner, const at::Tensor& expert,
                                 const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse_linear_fwd";
  check_linear(op, x, w_own, owner, w_rest, bias);
  const at::Tensor rest = w_rest.has_value() && w_rest->defined() ? w_rest->contiguous() : at::Tensor();
  const at::Tensor weight = select_weight(w_own.contiguous(), owner.contiguous(), rest, expert_value(op, expert));
  // addmm(bias, x, W^T) is exactly what F.linear runs for a 2-D input, so the result matches it bit for bit.
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

// grad_w = grad_y^T x, tile by tile over output rows; each tile is masked (own / rest split) right after its GEMM.
void masked_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& owner, int64_t expert,
                        at::Tensor& grad_own, at::Tensor* grad_rest) {
  const int64_t rows = grad_own.size(0), cols = grad_own.size(1);
  const int64_t num_tiles = (rows + kTileRows - 1) / kTileRows;
  const at::Tensor grad_y_t = grad_y.t();  // [out, M] view: BLAS reads it transposed, no copy
  by_element_size(grad_own, [&](auto tag) {
    using bits_t = decltype(tag);
    const uint8_t* map = owner.data_ptr<uint8_t>();
    auto* own = static_cast<bits_t*>(grad_own.data_ptr());
    auto* rest = grad_rest != nullptr ? static_cast<bits_t*>(grad_rest->data_ptr()) : nullptr;
    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      // Worker threads do not inherit the caller's dispatch state: without this, mm_out would go through
      // autograd and refuse inputs that require grad.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t r0 = tile * kTileRows, len = std::min(kTileRows, rows - r0);
        at::Tensor out = grad_own.narrow(0, r0, len);
        at::mm_out(out, grad_y_t.narrow(0, r0, len), x);
        // Epilogue: the tile is still in cache; split it by the owner mask in place.
        split_range(own, map, expert, own, rest, r0 * cols, (r0 + len) * cols);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_own, const std::optional<at::Tensor>& w_rest,
    const at::Tensor& owner, const at::Tensor& expert, bool x_grad, bool weight_grad, bool rest_grad,
    bool bias_grad) {
  constexpr const char* op = "sparse_linear_bwd";
  check_linear(op, x, w_own, owner, w_rest, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == w_own.size(0), op,
                    ": grad_y must be [M = ", x.size(0), ", out = ", w_own.size(0), "], got shape ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == w_own.scalar_type(), op, ": grad_y must have w_own's dtype");
  const int64_t e = expert_value(op, expert);
  const at::Tensor map = owner.contiguous(), gy = grad_y.contiguous(), xc = x.contiguous();
  // Unused outputs are fresh empty tensors (outputs of an op may not alias each other).
  auto empty = [&] { return at::empty({0}, w_own.options()); };
  at::Tensor grad_x = empty();
  if (x_grad) {
    const at::Tensor rest = w_rest.has_value() && w_rest->defined() ? w_rest->contiguous() : at::Tensor();
    grad_x = at::mm(gy, select_weight(w_own.contiguous(), map, rest, e));
  }
  at::Tensor grad_own = empty(), grad_rest = empty();
  if (weight_grad || rest_grad) {  // the GEMM writes into grad_own, which the epilogue then splits
    grad_own = at::empty(w_own.sizes(), w_own.options().memory_format(at::MemoryFormat::Contiguous));
    if (rest_grad) grad_rest = at::empty_like(grad_own);
    masked_weight_grad(gy, xc, map, e, grad_own, rest_grad ? &grad_rest : nullptr);
    if (!weight_grad) grad_own = empty();
  }
  at::Tensor grad_bias = bias_grad ? gy.sum(0) : empty();
  return {grad_x, grad_own, grad_rest, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) {
  m.impl("sparse_adapter_weight", &sparse_adapter_weight_cpu);
  m.impl("sparse_adapter_weight_bwd", &sparse_adapter_weight_bwd_cpu);
  m.impl("sparse_linear_fwd", &sparse_linear_fwd_cpu);
  m.impl("sparse_linear_bwd", &sparse_linear_bwd_cpu);
}

}  // namespace fsosr
