// CPU kernel of MoSA's merge of N sparse experts (fsosr/ops/sparse_adapter.py: merge_experts; schema in
// csrc/fsosr.cpp):
//
//   merged = (w_own + coefficients[owner] · w_rest) / N      (w_rest absent: w_own / N)
//
// computed in fp32 for fp16/bf16/fp32 (fp64 for fp64) and rounded once to w_own's dtype. The operations, their
// order and their roundings are exactly those of the reference expression (a product, a sum, a true division,
// each rounded to the compute type), so the result equals the reference bit for bit. Elements are independent
// and the parallel chunks are fixed, so the thread count cannot change a bit either.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>

// No FMA contraction in what follows: the reference rounds the product before the sum (two separate torch
// kernels), and a fused multiply-add would round once and differ in the last bit. x86-64's baseline has no FMA,
// but other targets (aarch64) do, and GCC contracts across statements by default.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fsosr {
namespace {

constexpr int64_t kMergeGrain = 1 << 15;  // entries per parallel chunk
constexpr int64_t kOwnerValues = 256;     // every value a uint8 owner map can hold

template <typename scalar_t, typename acc_t>
void merge_range(const scalar_t* own, const scalar_t* rest, const uint8_t* owner, const acc_t* table, acc_t n,
                 scalar_t* out, int64_t begin, int64_t end) {
  if (rest == nullptr) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(own[i]) / n);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const acc_t product = table[owner[i]] * static_cast<acc_t>(rest[i]);
    const acc_t sum = static_cast<acc_t>(own[i]) + product;
    out[i] = static_cast<scalar_t>(sum / n);
  }
}

at::Tensor merge_experts_cpu(const at::Tensor& w_own, const at::Tensor& owner, const std::optional<at::Tensor>& w_rest,
                             const at::Tensor& coefficients, int64_t num_experts) {
  constexpr const char* op = "merge_experts";
  TORCH_CHECK_TYPE(at::isFloatingType(w_own.scalar_type()), op, ": w_own must be floating point, got ",
                   w_own.scalar_type());
  TORCH_CHECK_TYPE(owner.scalar_type() == at::kByte, op, ": owner must be uint8, got ", owner.scalar_type());
  TORCH_CHECK_VALUE(owner.sizes() == w_own.sizes(), op, ": owner must have w_own's shape ", w_own.sizes(), ", got ",
                    owner.sizes());
  TORCH_CHECK_VALUE(w_own.device().is_cpu() && owner.device().is_cpu(), op, ": tensors must be on the CPU");
  const bool has_rest = w_rest.has_value() && w_rest->defined();
  if (has_rest) {
    TORCH_CHECK_TYPE(w_rest->scalar_type() == w_own.scalar_type(), op, ": w_rest must have w_own's dtype ",
                     w_own.scalar_type(), ", got ", w_rest->scalar_type());
    TORCH_CHECK_VALUE(w_rest->sizes() == w_own.sizes(), op, ": w_rest must have w_own's shape ", w_own.sizes(),
                      ", got ", w_rest->sizes());
    TORCH_CHECK_VALUE(w_rest->device().is_cpu(), op, ": w_rest must be on the CPU");
  }
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kOwnerValues, op, ": num_experts must be in [1, ",
                    kOwnerValues, "], got ", num_experts);
  TORCH_CHECK_TYPE(coefficients.scalar_type() == at::kDouble, op, ": coefficients must be float64, got ",
                   coefficients.scalar_type());
  TORCH_CHECK_VALUE(coefficients.dim() == 1 && coefficients.size(0) == num_experts, op,
                    ": coefficients must be [num_experts = ", num_experts, "], got shape ", coefficients.sizes());
  TORCH_CHECK_VALUE(coefficients.device().is_cpu(), op, ": coefficients must be on the CPU");

  const at::Tensor own = w_own.contiguous(), map = owner.contiguous();
  const at::Tensor rest = has_rest ? w_rest->contiguous() : at::Tensor();
  const at::Tensor coef = coefficients.contiguous();
  at::Tensor out = at::empty(own.sizes(), own.options());
  const int64_t n = own.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, own.scalar_type(), "merge_experts_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
    // One coefficient per possible owner value, cast from fp64 once per expert; values no expert has (owner >=
    // num_experts) read 0, so a bad map never reads out of bounds.
    std::array<acc_t, kOwnerValues> table{};
    const double* c = coef.data_ptr<double>();
    for (int64_t k = 0; k < num_experts; ++k) table[k] = static_cast<acc_t>(c[k]);
    const auto divisor = static_cast<acc_t>(num_experts);
    const scalar_t* own_ptr = own.data_ptr<scalar_t>();
    const scalar_t* rest_ptr = has_rest ? rest.data_ptr<scalar_t>() : nullptr;
    const uint8_t* map_ptr = map.data_ptr<uint8_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kMergeGrain, [&](int64_t begin, int64_t end) {
      merge_range<scalar_t, acc_t>(own_ptr, rest_ptr, map_ptr, table.data(), divisor, out_ptr, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) { m.impl("merge_experts", &merge_experts_cpu); }

}  // namespace fsosr
