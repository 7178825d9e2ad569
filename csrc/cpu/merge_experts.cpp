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

#include "../sparse_adapter_checks.h"

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
  TORCH_CHECK_VALUE(w_own.device().is_cpu(), "merge_experts: tensors must be on the CPU, got ", w_own.device());
  const bool has_rest = check_merge_experts_inputs(w_own, owner, w_rest, coefficients, num_experts);

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
    std::array<acc_t, kMergeOwnerValues> table{};
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
