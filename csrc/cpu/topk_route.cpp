// CPU kernels of fsosr::topk_route_fwd / topk_route_bwd (semantics: docs/ops/topk_route.md).
//
// Rows are processed in fixed blocks of kRowsPerBlock, whatever the thread count, and every cross-row sum
// (counts, importance, load) is formed per block and then added up in block order, so results are bitwise
// reproducible on any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace fsosr {
namespace {

constexpr int64_t kRowsPerBlock = 256;

// Elementwise kernels over a whole block of values through ATen's vectorised CPU kernels (SLEEF on AVX2 and
// AVX-512, picked at run time). Scalar erfc/exp per (row, expert) would dominate the noisy paths.
template <typename acc_t>
void exp_inplace(acc_t* values, int64_t count) {
  at::Tensor t = at::from_blob(values, {count}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::exp_out(t, t);
}

template <typename acc_t>
void normal_cdf_inplace(acc_t* values, int64_t count) {
  at::Tensor t = at::from_blob(values, {count}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::special_ndtr_out(t, t);
}

// Standardised margin (clean - thr) / std of a smooth-load term: -inf for a disabled expert (clean = -inf), even
// against a -inf threshold (which would give NaN); +inf for a finite logit against a -inf threshold.
template <typename acc_t>
acc_t load_margin(acc_t clean, acc_t thr, acc_t std_dev) {
  return clean == -std::numeric_limits<acc_t>::infinity() ? clean : (clean - thr) / std_dev;
}

// Ranking keys: an unsigned integer that orders like the value (NaN above +inf, -0.0 == +0.0) with the
// complement of the expert index in the low bits, so keys are unique and a tie goes to the lower index.
// Comparing plain integers keeps NaN and tie handling out of the selection loop's branches.
inline uint64_t rank_key(float v, int64_t e) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = v == 0.f ? 0u : bits;  // -0.0 ties with +0.0
  // Sign flip without branches: negative values get all bits inverted, non-negative ones the sign bit set.
  const uint32_t order = v != v ? 0xFFFFFFFFu : bits ^ (uint32_t(int32_t(bits) >> 31) | 0x80000000u);
  return (uint64_t(order) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(e));
}

inline unsigned __int128 rank_key(double v, int64_t e) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = v == 0.0 ? 0u : bits;
  const uint64_t order = v != v ? ~uint64_t(0) : bits ^ (uint64_t(int64_t(bits) >> 63) | (uint64_t(1) << 63));
  return ((unsigned __int128)order << 64) | (unsigned __int128)(~uint64_t(0) - uint64_t(e));
}

template <typename acc_t>
inline bool is_nan_or_posinf(acc_t v) { return (v != v) | (v == acc_t(INFINITY)); }

// The m largest of keys[0..E), best first, into top_keys/top (m <= E; keys are unique). The running worst kept
// key lives in a register and nearly every later key fails the one comparison against it.
template <typename key_t>
inline void select_top(const key_t* keys, int64_t num_experts, int64_t m, key_t* top_keys, int64_t* top) {
  for (int64_t i = 0; i < m; ++i) {  // seed with the first m keys, sorted by insertion
    int64_t pos = i;
    while (pos > 0 && keys[i] > top_keys[pos - 1]) {
      top_keys[pos] = top_keys[pos - 1];
      top[pos] = top[pos - 1];
      --pos;
    }
    top_keys[pos] = keys[i];
    top[pos] = i;
  }
  key_t worst = top_keys[m - 1];
  for (int64_t e = m; e < num_experts; ++e) {
    const key_t key = keys[e];
    if (key <= worst) continue;
    int64_t pos = m - 1;
    while (pos > 0 && key > top_keys[pos - 1]) {
      top_keys[pos] = top_keys[pos - 1];
      top[pos] = top[pos - 1];
      --pos;
    }
    top_keys[pos] = key;
    top[pos] = e;
    worst = top_keys[m - 1];
  }
}

// Expert index stored in a key's low bits.
inline int64_t key_expert(uint64_t key) { return int64_t(0xFFFFFFFFu - uint32_t(key)); }
inline int64_t key_expert(unsigned __int128 key) { return int64_t(~uint64_t(0) - uint64_t(key)); }

// The same selection for a compile-time m <= 8, without branches: every key passes through a sorted register
// network of conditional moves. Random logits make the branchy insertion above mispredict several times per
// row; this costs a fixed few instructions per key instead. Zero is below every real key (see rank_key).
template <int M, typename key_t>
inline void select_top_network(const key_t* keys, int64_t num_experts, key_t* top_keys, int64_t* top) {
  key_t t[M];
  for (int i = 0; i < M; ++i) t[i] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const key_t key = keys[e];
    for (int i = M - 1; i > 0; --i) t[i] = key > t[i - 1] ? t[i - 1] : (key > t[i] ? key : t[i]);
    t[0] = key > t[0] ? key : t[0];
  }
  for (int i = 0; i < M; ++i) {
    top_keys[i] = t[i];
    top[i] = key_expert(t[i]);
  }
}

template <typename key_t>
inline void select_top_any(const key_t* keys, int64_t num_experts, int64_t m, key_t* top_keys, int64_t* top) {
  switch (m) {
    case 1: return select_top_network<1>(keys, num_experts, top_keys, top);
    case 2: return select_top_network<2>(keys, num_experts, top_keys, top);
    case 3: return select_top_network<3>(keys, num_experts, top_keys, top);
    case 4: return select_top_network<4>(keys, num_experts, top_keys, top);
    case 5: return select_top_network<5>(keys, num_experts, top_keys, top);
    case 6: return select_top_network<6>(keys, num_experts, top_keys, top);
    default: return select_top(keys, num_experts, m, top_keys, top);
  }
}

void check_routing_inputs(const at::Tensor& logits, int64_t k, const c10::optional<at::Tensor>& noise,
                          const c10::optional<at::Tensor>& noise_std) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "topk_route: logits must be 2-D [N, E], got shape ", logits.sizes());
  TORCH_CHECK_TYPE(logits.is_floating_point(), "topk_route: logits must be floating point, got ", logits.scalar_type());
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "topk_route: logits must have at least one expert column");
  TORCH_CHECK_VALUE(k >= 1 && k <= num_experts, "topk_route: k must be in [1, E=", num_experts, "], got ", k);
  TORCH_CHECK(noise.has_value() == noise_std.has_value(),
              "topk_route: noise and noise_std must be given together");
  for (const auto* t : {&noise, &noise_std}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->sizes() == logits.sizes() && (*t)->scalar_type() == logits.scalar_type() &&
                    (*t)->device() == logits.device(),
                "topk_route: noise and noise_std must match logits in shape ", logits.sizes(), ", dtype ",
                logits.scalar_type(), " and device ", logits.device(), "; got ", (*t)->sizes(), " ",
                (*t)->scalar_type(), " ", (*t)->device());
  }
}

template <typename scalar_t, typename acc_t>
void route_forward(const at::Tensor& logits, int64_t k, bool renormalize, const scalar_t* noise,
                   const scalar_t* noise_std, std::vector<at::Tensor>& out) {
  const int64_t num_units = logits.size(0), num_experts = logits.size(1);
  const int64_t m = std::min(k + 1, num_experts);
  const int64_t num_blocks = (num_units + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool noisy_load = noise != nullptr && k < num_experts;
  const scalar_t* x = logits.data_ptr<scalar_t>();
  int32_t* indices = out[0].data_ptr<int32_t>();
  acc_t* gates = out[1].data_ptr<acc_t>();
  int32_t* next_index = out[7].data_ptr<int32_t>();

  // Per-block partial sums, later added up in block order.
  std::vector<int64_t> block_counts(num_blocks * num_experts, 0);
  std::vector<acc_t> block_importance(num_blocks * num_experts, acc_t(0));
  std::vector<acc_t> block_load(num_blocks * num_experts, acc_t(0));
  std::vector<char> bad_logits(num_blocks, 0), bad_std(num_blocks, 0);

  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> noisy(num_experts);
    using key_t = decltype(rank_key(acc_t(0), 0));
    std::vector<key_t> keys(num_experts), top_keys(m);
    std::vector<int64_t> top(m);
    std::vector<char> selected(num_experts);
    std::vector<acc_t> z_block(noisy_load ? kRowsPerBlock * num_experts : 0);  // standardised load margins
    for (int64_t b = block_begin; b < block_end; ++b) {
      int64_t* counts_b = &block_counts[b * num_experts];
      acc_t* importance_b = &block_importance[b * num_experts];
      acc_t* load_b = &block_load[b * num_experts];
      const int64_t row_end = std::min(num_units, (b + 1) * kRowsPerBlock);
      for (int64_t n = b * kRowsPerBlock; n < row_end; ++n) {
        const scalar_t* row = x + n * num_experts;
        // Phase 1 (vectorisable, no branches): noisy values, ranking keys, and the input checks.
        bool row_bad = false;
        if (noise == nullptr) {
          for (int64_t e = 0; e < num_experts; ++e) {
            const acc_t clean = static_cast<acc_t>(row[e]);
            row_bad |= is_nan_or_posinf(clean);
            noisy[e] = clean;
            keys[e] = rank_key(clean, e);
          }
        } else {
          bool std_bad = false;
          for (int64_t e = 0; e < num_experts; ++e) {
            const acc_t clean = static_cast<acc_t>(row[e]);
            const acc_t std_dev = static_cast<acc_t>(noise_std[n * num_experts + e]);
            row_bad |= is_nan_or_posinf(clean);
            std_bad |= !(std_dev > 0) | (std_dev == acc_t(INFINITY));
            noisy[e] = clean + static_cast<acc_t>(noise[n * num_experts + e]) * std_dev;
            keys[e] = rank_key(noisy[e], e);
          }
          if (std_bad) bad_std[b] = 1;
        }
        if (row_bad) bad_logits[b] = 1;
        // Phase 2: the m best keys (almost every key fails the first comparison, a well-predicted branch).
        select_top_any(keys.data(), num_experts, m, top_keys.data(), top.data());
        // Gates: softmax over the k kept logits, or over all E then keep the k chosen probabilities.
        acc_t max_v = noisy[top[0]], denom = 0;
        if (renormalize) {
          for (int64_t j = 0; j < k; ++j) denom += std::exp(noisy[top[j]] - max_v);
        } else {
          for (int64_t e = 0; e < num_experts; ++e) denom += std::exp(noisy[e] - max_v);
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = top[j];
          const acc_t g = std::exp(noisy[e] - max_v) / denom;
          indices[n * k + j] = static_cast<int32_t>(e);
          gates[n * k + j] = g;
          counts_b[e] += 1;
          importance_b[e] += g;
        }
        next_index[n] = k < num_experts ? static_cast<int32_t>(top[k]) : -1;
        if (noisy_load) {
          std::fill(selected.begin(), selected.end(), 0);
          for (int64_t j = 0; j < k; ++j) selected[top[j]] = 1;
          const acc_t thr_in = noisy[top[k]], thr_out = noisy[top[k - 1]];
          acc_t* row_z = &z_block[(n - b * kRowsPerBlock) * num_experts];
          for (int64_t e = 0; e < num_experts; ++e) {
            const acc_t clean = static_cast<acc_t>(row[e]);
            const acc_t std_dev = static_cast<acc_t>(noise_std[n * num_experts + e]);
            row_z[e] = load_margin(clean, selected[e] ? thr_in : thr_out, std_dev);
          }
        }
      }
      if (noisy_load) {  // P(expert in top-k) for the whole block at once, summed in row order
        const int64_t rows = row_end - b * kRowsPerBlock;
        normal_cdf_inplace(z_block.data(), rows * num_experts);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t e = 0; e < num_experts; ++e) load_b[e] += z_block[r * num_experts + e];
        }
      }
    }
  });
  for (int64_t b = 0; b < num_blocks; ++b) {
    TORCH_CHECK_VALUE(!bad_logits[b], "topk_route: logits contain NaN or +inf (rows ", b * kRowsPerBlock, "..",
                std::min(num_units, (b + 1) * kRowsPerBlock) - 1, "); -inf is allowed");
    TORCH_CHECK_VALUE(!bad_std[b], "topk_route: noise_std must be positive and finite (rows ",
                b * kRowsPerBlock, "..", std::min(num_units, (b + 1) * kRowsPerBlock) - 1, ")");
  }

  // Totals in block order, expert offsets, and where each block's entries of each expert start in `order`.
  int32_t* counts = out[2].data_ptr<int32_t>();
  int32_t* offsets = out[4].data_ptr<int32_t>();
  acc_t* importance = out[5].data_ptr<acc_t>();
  acc_t* load = out[6].data_ptr<acc_t>();
  std::vector<int64_t> block_base(num_blocks * num_experts);
  offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t total = 0;
    acc_t imp = 0, ld = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
      block_base[b * num_experts + e] = total;
      total += block_counts[b * num_experts + e];
      imp += block_importance[b * num_experts + e];
      ld += block_load[b * num_experts + e];
    }
    counts[e] = static_cast<int32_t>(total);
    offsets[e + 1] = static_cast<int32_t>(offsets[e] + total);
    importance[e] = imp;
    load[e] = noisy_load ? ld : static_cast<acc_t>(total);
  }
  int32_t* order = out[3].data_ptr<int32_t>();
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<int64_t> cursor(num_experts);
    for (int64_t b = block_begin; b < block_end; ++b) {
      for (int64_t e = 0; e < num_experts; ++e) cursor[e] = offsets[e] + block_base[b * num_experts + e];
      const int64_t flat_end = std::min(num_units, (b + 1) * kRowsPerBlock) * k;
      for (int64_t f = b * kRowsPerBlock * k; f < flat_end; ++f) order[cursor[indices[f]]++] = static_cast<int32_t>(f);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_route_fwd_cpu(const at::Tensor& logits_in, int64_t k, bool renormalize, const c10::optional<at::Tensor>& noise_in,
                   const c10::optional<at::Tensor>& noise_std_in) {
  check_routing_inputs(logits_in, k, noise_in, noise_std_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  const at::Tensor noise_std = noise_std_in.has_value() ? noise_std_in->contiguous() : at::Tensor();
  const int64_t num_units = logits.size(0), num_experts = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto i32 = logits.options().dtype(at::kInt);
  const auto acc = logits.options().dtype(acc_type);
  std::vector<at::Tensor> out = {at::empty({num_units, k}, i32),      at::empty({num_units, k}, acc),
                                 at::empty({num_experts}, i32),       at::empty({num_units * k}, i32),
                                 at::empty({num_experts + 1}, i32),   at::empty({num_experts}, acc),
                                 at::empty({num_experts}, acc),       at::empty({num_units}, i32)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_forward<scalar_t, acc_t>(logits, k, renormalize, noise.defined() ? noise.data_ptr<scalar_t>() : nullptr,
                                   noise_std.defined() ? noise_std.data_ptr<scalar_t>() : nullptr, out);
  });
  // Differentiable outputs first (see csrc/fsosr.cpp).
  return {out[1], out[5], out[6], out[0], out[2], out[3], out[4], out[7]};
}

template <typename scalar_t, typename acc_t>
void route_backward(const acc_t* grad_gates, const acc_t* grad_importance, const acc_t* grad_load,
                    const scalar_t* logits, const scalar_t* noise, const scalar_t* noise_std,
                    const int32_t* indices, const acc_t* gates, const int32_t* next_index, int64_t num_units,
                    int64_t num_experts, int64_t k, bool renormalize, scalar_t* grad_logits,
                    scalar_t* grad_noise_std) {
  const bool noisy_load = noise != nullptr && k < num_experts;
  const int64_t num_blocks = (num_units + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> noisy(kRowsPerBlock * num_experts), dnoisy(kRowsPerBlock * num_experts);
    std::vector<acc_t> pdf(noisy_load ? kRowsPerBlock * num_experts : 0), dstd(pdf.size()), inverse_std(pdf.size());
    std::vector<char> selected(num_experts);
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t row_begin = b * kRowsPerBlock, rows = std::min(num_units, row_begin + kRowsPerBlock) - row_begin;
      const int64_t base = row_begin * num_experts;
      // Pass 1: noisy logits and the gates' contribution to their gradient, row by row.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = row_begin + r;
        acc_t* row_noisy = &noisy[r * num_experts];
        acc_t* row_dnoisy = &dnoisy[r * num_experts];
        for (int64_t e = 0; e < num_experts; ++e) {
          const int64_t i = base + r * num_experts + e;
          row_noisy[e] = static_cast<acc_t>(logits[i]);
          if (noise != nullptr) row_noisy[e] += static_cast<acc_t>(noise[i]) * static_cast<acc_t>(noise_std[i]);
          row_dnoisy[e] = 0;
        }
        acc_t dot = 0;  // sum_j gates_j * dg_j
        for (int64_t j = 0; j < k; ++j) {
          dot += gates[n * k + j] * (grad_gates[n * k + j] + grad_importance[indices[n * k + j]]);
        }
        if (renormalize) {
          for (int64_t j = 0; j < k; ++j) {
            const acc_t dg = grad_gates[n * k + j] + grad_importance[indices[n * k + j]];
            row_dnoisy[indices[n * k + j]] += gates[n * k + j] * (dg - dot);
          }
        } else {
          acc_t max_v = -INFINITY, denom = 0;
          for (int64_t e = 0; e < num_experts; ++e) max_v = std::max(max_v, row_noisy[e]);
          for (int64_t e = 0; e < num_experts; ++e) denom += std::exp(row_noisy[e] - max_v);
          for (int64_t e = 0; e < num_experts; ++e) row_dnoisy[e] = -std::exp(row_noisy[e] - max_v) / denom * dot;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t e = indices[n * k + j];
            row_dnoisy[e] += std::exp(row_noisy[e] - max_v) / denom * (grad_gates[n * k + j] + grad_importance[e]);
          }
        }
      }
      // Pass 2 (noisy routing): smooth-load terms. The normal pdf of the whole block is evaluated at once by
      // ATen's vectorised exp; a scalar exp per (row, expert) would dominate the backward.
      if (noisy_load) {
        // 2a: z and 1/std per entry (one division each), and -z^2/2 for the block-wide exp.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = row_begin + r;
          const acc_t thr_in = noisy[r * num_experts + next_index[n]];
          const acc_t thr_out = noisy[r * num_experts + indices[n * k + k - 1]];
          std::fill(selected.begin(), selected.end(), 0);
          for (int64_t j = 0; j < k; ++j) selected[indices[n * k + j]] = 1;
          for (int64_t e = 0; e < num_experts; ++e) {
            const int64_t i = base + r * num_experts + e, local = r * num_experts + e;
            const acc_t inv_std = acc_t(1) / static_cast<acc_t>(noise_std[i]);
            const acc_t clean = static_cast<acc_t>(logits[i]);
            const acc_t z = clean == -std::numeric_limits<acc_t>::infinity()
                                ? clean : (clean - (selected[e] ? thr_in : thr_out)) * inv_std;
            // Non-finite margin: Phi is flat there (phi(z) * z -> 0), no gradient; the clamp below would not
            // make phi exactly 0, and 0 * inf is NaN. Marked by inv_std = 0.
            inverse_std[local] = std::isfinite(z) ? inv_std : acc_t(0);
            dstd[local] = z;
            // Clamped so exp never underflows into denormals (a slow path of vectorised exp); phi(z) below
            // e^-80 contributes nothing at fp32 or fp64 precision to a sum of terms of order one.
            pdf[local] = std::max(acc_t(-0.5) * z * z, acc_t(-80));
          }
        }
        exp_inplace(pdf.data(), rows * num_experts);
        // 2b: a = grad_load * phi(z) / std is d load / d clean, minus the pull on the row's threshold logit.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = row_begin + r;
          const int64_t in_pos = next_index[n], out_pos = indices[n * k + k - 1];
          std::fill(selected.begin(), selected.end(), 0);
          for (int64_t j = 0; j < k; ++j) selected[indices[n * k + j]] = 1;
          acc_t pull_in = 0, pull_out = 0;  // gradient reaching the two threshold logits
          for (int64_t e = 0; e < num_experts; ++e) {
            const int64_t local = r * num_experts + e;
            const acc_t a = grad_load[e] * pdf[local] * acc_t(0.3989422804014327) * inverse_std[local];
            (selected[e] ? pull_in : pull_out) -= a;
            pdf[local] = a;                    // now: d load / d clean
            // z -> d load / d std; a non-finite z (marked by inverse_std 0) has none, and 0 * inf would be NaN.
            dstd[local] = inverse_std[local] != acc_t(0) ? -a * dstd[local] : acc_t(0);
          }
          dnoisy[r * num_experts + in_pos] += pull_in;
          dnoisy[r * num_experts + out_pos] += pull_out;
        }
      }
      // Pass 3: through noisy = clean + noise * std.
      for (int64_t local = 0; local < rows * num_experts; ++local) {
        const int64_t i = base + local;
        grad_logits[i] = static_cast<scalar_t>(dnoisy[local] + (noisy_load ? pdf[local] : acc_t(0)));
        if (grad_noise_std != nullptr) {
          grad_noise_std[i] = static_cast<scalar_t>(dnoisy[local] * static_cast<acc_t>(noise[i]) +
                                                    (noisy_load ? dstd[local] : acc_t(0)));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_route_bwd_cpu(
    const at::Tensor& grad_gates, const at::Tensor& grad_importance, const at::Tensor& grad_load,
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& noise_in,
    const c10::optional<at::Tensor>& noise_std_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const at::Tensor& next_index_in, bool renormalize) {
  const int64_t k = indices_in.size(1);
  check_routing_inputs(logits_in, k, noise_in, noise_std_in);
  const int64_t num_units = logits_in.size(0), num_experts = logits_in.size(1);
  const auto acc_type = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Gradients may arrive as expanded zeros or in another float type; bring everything to acc, contiguous.
  const at::Tensor gg = grad_gates.to(acc_type).contiguous(), gi = grad_importance.to(acc_type).contiguous();
  const at::Tensor gl = grad_load.to(acc_type).contiguous(), gates = gates_in.to(acc_type).contiguous();
  TORCH_CHECK(gg.sizes() == indices_in.sizes() && gates.sizes() == indices_in.sizes(),
              "topk_route_bwd: grad_gates and gates must be [N, k] like indices");
  TORCH_CHECK(gi.numel() == num_experts && gl.numel() == num_experts,
              "topk_route_bwd: grad_importance and grad_load must have E=", num_experts, " entries");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor indices = indices_in.to(at::kInt).contiguous(), next_index = next_index_in.to(at::kInt).contiguous();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  const at::Tensor noise_std = noise_std_in.has_value() ? noise_std_in->contiguous() : at::Tensor();
  at::Tensor grad_logits = at::empty_like(logits);
  at::Tensor grad_noise_std = noise_std.defined() ? at::empty_like(logits) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_backward<scalar_t, acc_t>(
        gg.data_ptr<acc_t>(), gi.data_ptr<acc_t>(), gl.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(),
        noise.defined() ? noise.data_ptr<scalar_t>() : nullptr,
        noise_std.defined() ? noise_std.data_ptr<scalar_t>() : nullptr, indices.data_ptr<int32_t>(),
        gates.data_ptr<acc_t>(), next_index.data_ptr<int32_t>(), num_units, num_experts, k, renormalize,
        grad_logits.data_ptr<scalar_t>(), noise_std.defined() ? grad_noise_std.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_logits, grad_noise_std};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) {
  m.impl("topk_route_fwd", &topk_route_fwd_cpu);
  m.impl("topk_route_bwd", &topk_route_bwd_cpu);
}

}  // namespace fsosr
