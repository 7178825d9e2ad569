// CPU kernel of fsosr::masked_adamw_: one fused HF-AdamW step over a flat buffer of every adapter parameter of a
// model, with MoSA's expert masks (semantics: fsosr/ops/masked_adamw.py and reference.masked_adamw_flat).
//
// Everything that can be rejected is checked before the first write, so a bad call leaves the buffers as they
// were. Entries are processed in fixed blocks of kEntriesPerBlock whatever the thread count; the update is purely
// elementwise, so results are bitwise reproducible on any number of threads.
#include <cstdlib>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../masked_adamw_checks.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fsosr {
namespace {

constexpr int64_t kEntriesPerBlock = 16384;
constexpr int64_t kShared = 255;  // owner value of entries not split between experts (every expert updates them)
enum Semantics : int64_t { kMosa = 0, kSkip = 1, kFreeze = 2 };

// What one (segment, owner slot) pair does this step. Slot N is the shared slot (owner == 255).
template <typename scalar_t>
struct SlotRule {
  bool update;         // false: params and moments of these entries are not touched
  bool use_grad;       // false: the moments see g = 0 (an expert that exists but was not drawn, under mosa)
  scalar_t step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t), HF AdamW's bias correction
  scalar_t decay;      // lr * weight_decay, applied to the parameter after the Adam step
};

// The moment coefficients in the parameters' dtype. 1 - beta is the double 1 - beta rounded once, as HF AdamW's
// `alpha=1 - beta1` and the cuda/triton kernels have it: in fp32, 1.f - float(0.9999) is 1.66e-4 too large.
template <typename scalar_t>
struct Moments {
  scalar_t beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  Moments(double b1, double b2, double e)
      : beta1(scalar_t(b1)), beta2(scalar_t(b2)), one_minus_beta1(scalar_t(1.0 - b1)),
        one_minus_beta2(scalar_t(1.0 - b2)), eps(scalar_t(e)) {}
};

// Advances the per-(segment, slot) step counters (HF AdamW's state["step"] of each dense tensor the slot stands
// for) and returns the rule for every slot. steps is [S, N + 1] and is only written when advance is true.
template <typename scalar_t>
std::vector<SlotRule<scalar_t>> slot_rules(int64_t* steps, const int64_t* selected, int64_t draws,
                                           const double* weight_decay, int64_t num_segments, int64_t num_experts,
                                           int64_t semantics, bool advance, double lr, double beta1, double beta2) {
  const int64_t slots = num_experts + 1;
  std::vector<SlotRule<scalar_t>> rules(num_segments * slots);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t* chosen = selected + s * draws;  // the experts drawn for this segment since the last step
    for (int64_t o = 0; o < slots; ++o) {
      const bool drawn = o == num_experts || std::find(chosen, chosen + draws, o) != chosen + draws;
      int64_t& t = steps[s * slots + o];
      // mosa (torch 1.11 zero_grad keeps zero grads): an expert steps every step once it has been drawn once.
      // skip / freeze (set_to_none): only the drawn expert steps.
      const bool update = semantics == kMosa ? (drawn || t > 0) : drawn;
      if (advance && update) ++t;
      SlotRule<scalar_t>& rule = rules[s * slots + o];
      rule.update = update;
      rule.use_grad = drawn;
      const double correction1 = 1.0 - std::pow(beta1, double(t));
      const double correction2 = 1.0 - std::pow(beta2, double(t));
      rule.step_size = update ? scalar_t(lr * std::sqrt(correction2) / correction1) : scalar_t(0);
      rule.decay = scalar_t(lr * weight_decay[s]);
    }
  }
  return rules;
}

// One segment's entries [begin, end): every entry looks up its owner's rule (a table of N + 1 entries).
// The masked gradient is a select, not a multiply, so a NaN in an entry the drawn expert does not own is dropped
// exactly as a dense copy that never saw that gradient would.
template <typename scalar_t>
void update_range(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g, const uint8_t* owner, int64_t begin,
                  int64_t end, const SlotRule<scalar_t>* rules, int64_t num_experts, const Moments<scalar_t>& c) {
  const scalar_t beta1 = c.beta1, beta2 = c.beta2, one_minus_beta1 = c.one_minus_beta1, eps = c.eps;
  const scalar_t one_minus_beta2 = c.one_minus_beta2;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t slot = owner[i] == kShared ? num_experts : owner[i];
    const SlotRule<scalar_t>& rule = rules[slot];
    if (!rule.update) continue;
    const scalar_t grad = rule.use_grad ? g[i] : scalar_t(0);
    const scalar_t m_new = beta1 * m[i] + one_minus_beta1 * grad;
    const scalar_t v_new = beta2 * v[i] + one_minus_beta2 * (grad * grad);
    const scalar_t stepped = p[i] - rule.step_size * (m_new / (std::sqrt(v_new) + eps));
    m[i] = m_new;
    v[i] = v_new;
    p[i] = stepped - rule.decay * stepped;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The fp32 loop eight entries at a time with AVX2 (picked at run time; the build targets baseline x86-64). The
// rule fields are gathered from per-slot tables by owner; the operations and their order are the scalar loop's
// (no FMA), so both paths give bitwise-equal results.
struct SlotTables {
  std::vector<float> step_size, decay, grad_keep, update;  // grad_keep/update: all-ones bit masks or 0
};

SlotTables slot_tables(const std::vector<SlotRule<float>>& rules) {
  SlotTables t;
  const float ones = [] { uint32_t bits = 0xFFFFFFFFu; float f; std::memcpy(&f, &bits, 4); return f; }();
  for (const auto& r : rules) {
    t.step_size.push_back(r.step_size);
    t.decay.push_back(r.decay);
    t.grad_keep.push_back(r.use_grad ? ones : 0.f);
    t.update.push_back(r.update ? ones : 0.f);
  }
  return t;
}

__attribute__((target("avx2"))) int64_t update_range_avx2(float* p, float* m, float* v, const float* g,
                                                           const uint8_t* owner, int64_t begin, int64_t end,
                                                           const SlotTables& t, int64_t table_offset,
                                                           int64_t num_experts, const Moments<float>& c) {
  const __m256 b1 = _mm256_set1_ps(c.beta1), b2 = _mm256_set1_ps(c.beta2), e = _mm256_set1_ps(c.eps);
  const __m256 ob1 = _mm256_set1_ps(c.one_minus_beta1), ob2 = _mm256_set1_ps(c.one_minus_beta2);
  const __m256i shared = _mm256_set1_epi32(int(kShared)), shared_slot = _mm256_set1_epi32(int(num_experts));
  const float* ss = t.step_size.data() + table_offset;
  const float* dc = t.decay.data() + table_offset;
  const float* gk = t.grad_keep.data() + table_offset;
  const float* up = t.update.data() + table_offset;
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256i slot = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(owner + i)));
    slot = _mm256_blendv_epi8(slot, shared_slot, _mm256_cmpeq_epi32(slot, shared));
    const __m256 step_size = _mm256_i32gather_ps(ss, slot, 4), decay = _mm256_i32gather_ps(dc, slot, 4);
    const __m256 keep = _mm256_i32gather_ps(gk, slot, 4), write = _mm256_i32gather_ps(up, slot, 4);
    const __m256 grad = _mm256_and_ps(_mm256_loadu_ps(g + i), keep);
    const __m256 m_old = _mm256_loadu_ps(m + i), v_old = _mm256_loadu_ps(v + i), p_old = _mm256_loadu_ps(p + i);
    const __m256 m_new = _mm256_add_ps(_mm256_mul_ps(b1, m_old), _mm256_mul_ps(ob1, grad));
    const __m256 v_new = _mm256_add_ps(_mm256_mul_ps(b2, v_old), _mm256_mul_ps(ob2, _mm256_mul_ps(grad, grad)));
    const __m256 ratio = _mm256_div_ps(m_new, _mm256_add_ps(_mm256_sqrt_ps(v_new), e));
    const __m256 stepped = _mm256_sub_ps(p_old, _mm256_mul_ps(step_size, ratio));
    const __m256 decayed = _mm256_sub_ps(stepped, _mm256_mul_ps(decay, stepped));
    _mm256_storeu_ps(p + i, _mm256_blendv_ps(p_old, decayed, write));
    _mm256_storeu_ps(m + i, _mm256_blendv_ps(m_old, m_new, write));
    _mm256_storeu_ps(v + i, _mm256_blendv_ps(v_old, v_new, write));
  }
  return i;  // the scalar loop finishes the tail
}

// Asked on first use, not during library load: __builtin_cpu_supports needs __builtin_cpu_init before it there.
// FSOSR_CPU_GENERIC=1 forces the portable loops (how the tests cover them on machines that have AVX2).
bool has_avx2() {
  static const bool supported = [] {
    const char* generic = std::getenv("FSOSR_CPU_GENERIC");
    if (generic != nullptr && generic[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return supported;
}

// fp64 has no vector path (it only serves the reference tests): the scalar loop does every entry.
SlotTables slot_tables(const std::vector<SlotRule<double>>&) { return {}; }
int64_t update_range_avx2(double*, double*, double*, const double*, const uint8_t*, int64_t begin, int64_t,
                          const SlotTables&, int64_t, int64_t, const Moments<double>&) {
  return begin;
}
#endif

void check_inputs(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                  const at::Tensor& steps, const at::Tensor& grads, const at::Tensor& owner,
                  const at::Tensor& segment_offsets, const at::Tensor& selected, const at::Tensor& weight_decay,
                  int64_t semantics) {
  check_masked_adamw_inputs(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected,
                            weight_decay, semantics);
  const int64_t num_segments = segment_offsets.numel() - 1;
  const int64_t num_experts = steps.size(1) - 1;
  const int64_t* offsets = segment_offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[num_segments] == params.numel(),
                    "masked_adamw_: segment_offsets must run from 0 to P = ", params.numel(), ", got ", offsets[0],
                    " .. ", offsets[num_segments]);
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK_VALUE(offsets[s] <= offsets[s + 1], "masked_adamw_: segment_offsets must be non-decreasing (at ", s,
                      ")");
  }
  const int64_t* chosen = selected.data_ptr<int64_t>();
  for (int64_t i = 0; i < selected.numel(); ++i) {
    TORCH_CHECK_VALUE(chosen[i] >= 0 && chosen[i] < num_experts, "masked_adamw_: selected has expert ", chosen[i],
                      " (segment ", i / (selected.numel() / std::max<int64_t>(num_segments, 1)),
                      "), not an expert in [0, ", num_experts, ")");
  }
  const int64_t* step_counts = steps.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(std::all_of(step_counts, step_counts + steps.numel(), [](int64_t t) { return t >= 0; }),
                    "masked_adamw_: steps must be >= 0");
  // One parallel read of the owner map (1 byte per entry) before any write.
  const uint8_t* owners = owner.data_ptr<uint8_t>();
  const int64_t num_blocks = (params.numel() + kEntriesPerBlock - 1) / kEntriesPerBlock;
  std::vector<uint8_t> bad(num_blocks, 0);
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t end = std::min(params.numel(), (b + 1) * kEntriesPerBlock);
      bool any_bad = false;
      for (int64_t i = b * kEntriesPerBlock; i < end; ++i) any_bad |= owners[i] >= num_experts && owners[i] != kShared;
      bad[b] = any_bad;
    }
  });
  for (int64_t b = 0; b < num_blocks; ++b) {
    TORCH_CHECK_VALUE(!bad[b], "masked_adamw_: owner has a value >= N = ", num_experts,
                      " other than 255 (shared) in entries ", b * kEntriesPerBlock, "..",
                      std::min(params.numel(), (b + 1) * kEntriesPerBlock) - 1);
  }
}

void masked_adamw_cpu(at::Tensor params, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor steps,
                      const at::Tensor& grads, const at::Tensor& owner, const at::Tensor& segment_offsets,
                      const at::Tensor& selected, const at::Tensor& weight_decay, double lr, double beta1,
                      double beta2, double eps, int64_t semantics, bool advance_steps) {
  check_inputs(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, weight_decay, semantics);
  const int64_t num_segments = segment_offsets.numel() - 1;
  const int64_t num_experts = steps.size(1) - 1;
  const int64_t numel = params.numel();
  const int64_t* offsets = segment_offsets.data_ptr<int64_t>();
  if (!advance_steps) {  // a fixed step count must be >= 1 wherever it is used for bias correction
    const int64_t* t = steps.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(std::all_of(t, t + steps.numel(), [](int64_t x) { return x >= 1; }),
                      "masked_adamw_: step must be >= 1");
  }
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "masked_adamw_cpu", [&] {
    const int64_t draws = selected.dim() == 2 ? selected.size(1) : 1;
    const auto rules = slot_rules<scalar_t>(steps.data_ptr<int64_t>(), selected.data_ptr<int64_t>(), draws,
                                            weight_decay.data_ptr<double>(), num_segments, num_experts, semantics,
                                            advance_steps, lr, beta1, beta2);
    const Moments<scalar_t> moments(beta1, beta2, eps);
#if defined(__x86_64__) && defined(__GNUC__)
    const SlotTables tables = slot_tables(rules);
#endif
    scalar_t* p = params.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = grads.data_ptr<scalar_t>();
    const uint8_t* owners = owner.data_ptr<uint8_t>();
    const int64_t num_blocks = (numel + kEntriesPerBlock - 1) / kEntriesPerBlock;
    at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t b = block_begin; b < block_end; ++b) {
        const int64_t begin = b * kEntriesPerBlock;
        const int64_t end = std::min(numel, begin + kEntriesPerBlock);
        // First segment that ends after `begin`; empty segments are skipped by the loop condition.
        int64_t s = std::upper_bound(offsets, offsets + num_segments + 1, begin) - offsets - 1;
        for (; s < num_segments && offsets[s] < end; ++s) {
          int64_t first = std::max(begin, offsets[s]);
          const int64_t last = std::min(end, offsets[s + 1]);
#if defined(__x86_64__) && defined(__GNUC__)
          if (has_avx2()) {
            first = update_range_avx2(p, m, v, g, owners, first, last, tables, s * (num_experts + 1), num_experts,
                                      moments);
          }
#endif
          update_range<scalar_t>(p, m, v, g, owners, first, last, rules.data() + s * (num_experts + 1), num_experts,
                                 moments);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) { m.impl("masked_adamw_", &masked_adamw_cpu); }

}  // namespace fsosr
