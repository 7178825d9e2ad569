// Elementwise hidden-layer kernels of the CPU moe_mlp (declared in moe_mlp.h): dropout masks from the
// counter hash, activation, gate scaling, and the backward's dot product and pre-activation gradient.
#include "moe_mlp.h"

#include <cstdlib>

namespace fsosr {
namespace moe_cpu {
namespace {

inline uint64_t splitmix64(uint64_t counter, uint64_t seed_key) {
  uint64_t z = (counter ^ seed_key) * 0x9E3779B97F4A7C15ull + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The uniform is the top 24 bits / 2^24 compared with float(p) (as in _rng.py), so compare integers instead:
// u >= p  <=>  top24 >= ceil(float(p) * 2^24), exact because float(p) * 2^24 is exact in double.
inline uint32_t keep_threshold(double dropout) {
  return uint32_t(std::ceil(double(float(dropout)) * 16777216.0));
}

template <typename acc_t>
[[gnu::always_inline]] inline void keep_scale_loop(uint64_t base, int64_t count, uint64_t key, uint32_t threshold,
                                                   acc_t inv_keep, acc_t* keep) {
  for (int64_t i = 0; i < count; ++i) {
    keep[i] = uint32_t(splitmix64(base + uint64_t(i), key) >> 40) >= threshold ? inv_keep : acc_t(0);
  }
}

// Same loop compiled for AVX-512 (vpmullq makes the 64-bit multiplies vector instructions): about 7x faster.
[[gnu::target("avx512f,avx512dq,avx512vl")]] void keep_scale_avx512(uint64_t base, int64_t count, uint64_t key,
                                                                    uint32_t threshold, float inv, float* keep) {
  keep_scale_loop<float>(base, count, key, threshold, inv, keep);
}
[[gnu::target("avx512f,avx512dq,avx512vl")]] void keep_scale_avx512(uint64_t base, int64_t count, uint64_t key,
                                                                    uint32_t threshold, double inv, double* keep) {
  keep_scale_loop<double>(base, count, key, threshold, inv, keep);
}

// FSOSR_CPU_GENERIC=1 forces the portable loops (how the tests cover them on machines that have AVX-512).
bool cpu_has_avx512dq() {
  static const bool has = [] {
    const char* generic = std::getenv("FSOSR_CPU_GENERIC");
    if (generic != nullptr && generic[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}

// The loops below are instantiated per activation and per option so each is a straight vectorisable loop
// (relu is the adapters' hot path). The backward's dot product keeps 16 partial sums, added in a fixed order
// at the end: that lets the compiler vectorise a float reduction it may not reorder, and stays deterministic.
constexpr int64_t kLanes = 16;

template <typename acc_t, int64_t kAct, bool kMasked>
[[gnu::always_inline]] inline void forward_loop(int64_t count, acc_t coef, const acc_t* pre, acc_t* hid,
                                                const acc_t* keep) {
  for (int64_t i = 0; i < count; ++i) hid[i] = coef * activate(pre[i], kAct) * (kMasked ? keep[i] : acc_t(1));
}

template <typename acc_t, int64_t kAct, bool kMasked, bool kWriteHid>
[[gnu::always_inline]] inline acc_t backward_loop(int64_t count, acc_t coef, const acc_t* pre, const acc_t* dyw,
                                                  acc_t* hid_out, acc_t* dpre, const acc_t* keep) {
  acc_t partial[kLanes] = {};
  auto element = [&](int64_t i, acc_t& sum) {
    const acc_t m = kMasked ? keep[i] : acc_t(1);
    const acc_t g = dyw[i];
    const acc_t h = activate(pre[i], kAct) * m;
    sum += h * g;
    if (kWriteHid) hid_out[i] = coef * h;
    dpre[i] = coef * g * m * activation_slope(pre[i], kAct);
  };
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) element(i + l, partial[l]);
  }
  for (int64_t l = 0; i < count; ++i, ++l) element(i, partial[l]);
  acc_t dot = 0;
  for (int64_t l = 0; l < kLanes; ++l) dot += partial[l];
  return dot;
}

template <typename acc_t, bool kMasked>
[[gnu::always_inline]] inline void forward_dispatch(int64_t act, int64_t count, acc_t coef, const acc_t* pre,
                                                    acc_t* hid, const acc_t* keep) {
  switch (act) {
    case kRelu: return forward_loop<acc_t, kRelu, kMasked>(count, coef, pre, hid, keep);
    case kGelu: return forward_loop<acc_t, kGelu, kMasked>(count, coef, pre, hid, keep);
    case kQuickGelu: return forward_loop<acc_t, kQuickGelu, kMasked>(count, coef, pre, hid, keep);
    default: return forward_loop<acc_t, kIdentity, kMasked>(count, coef, pre, hid, keep);
  }
}

template <typename acc_t, bool kMasked, bool kWriteHid>
[[gnu::always_inline]] inline acc_t backward_dispatch(int64_t act, int64_t count, acc_t coef, const acc_t* pre,
                                                      const acc_t* dyw, acc_t* hid_out, acc_t* dpre,
                                                      const acc_t* keep) {
  switch (act) {
    case kRelu: return backward_loop<acc_t, kRelu, kMasked, kWriteHid>(count, coef, pre, dyw, hid_out, dpre, keep);
    case kGelu: return backward_loop<acc_t, kGelu, kMasked, kWriteHid>(count, coef, pre, dyw, hid_out, dpre, keep);
    case kQuickGelu:
      return backward_loop<acc_t, kQuickGelu, kMasked, kWriteHid>(count, coef, pre, dyw, hid_out, dpre, keep);
    default: return backward_loop<acc_t, kIdentity, kMasked, kWriteHid>(count, coef, pre, dyw, hid_out, dpre, keep);
  }
}

// One body, compiled twice: for the default x86-64 target and for AVX-512 (chosen at run time).
template <typename acc_t>
[[gnu::always_inline]] inline void forward_body(const Problem& p, uint64_t base, int64_t count, acc_t coef,
                                                const acc_t* pre, acc_t* hid, acc_t* keep) {
  if (p.dropout > 0) {
    keep_scale_loop<acc_t>(base, count, p.seed_key, keep_threshold(p.dropout), acc_t(1) / acc_t(1 - p.dropout), keep);
    forward_dispatch<acc_t, true>(p.activation, count, coef, pre, hid, keep);
  } else {
    forward_dispatch<acc_t, false>(p.activation, count, coef, pre, hid, keep);
  }
}

template <typename acc_t>
[[gnu::always_inline]] inline acc_t backward_body(const Problem& p, uint64_t base, int64_t count, acc_t coef,
                                                  const acc_t* pre, const acc_t* dyw, acc_t* hid_out, acc_t* dpre,
                                                  acc_t* keep) {
  const bool masked = p.dropout > 0;
  if (masked) {
    keep_scale_loop<acc_t>(base, count, p.seed_key, keep_threshold(p.dropout), acc_t(1) / acc_t(1 - p.dropout), keep);
  }
  if (hid_out != nullptr) {
    return masked ? backward_dispatch<acc_t, true, true>(p.activation, count, coef, pre, dyw, hid_out, dpre, keep)
                  : backward_dispatch<acc_t, false, true>(p.activation, count, coef, pre, dyw, hid_out, dpre, keep);
  }
  return masked ? backward_dispatch<acc_t, true, false>(p.activation, count, coef, pre, dyw, hid_out, dpre, keep)
                : backward_dispatch<acc_t, false, false>(p.activation, count, coef, pre, dyw, hid_out, dpre, keep);
}

template <typename acc_t>
void forward_generic(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre, acc_t* hid,
                     acc_t* keep) {
  forward_body<acc_t>(p, base, count, coef, pre, hid, keep);
}
template <typename acc_t>
[[gnu::target("avx512f,avx512dq,avx512vl")]] void forward_avx512(const Problem& p, uint64_t base, int64_t count,
                                                                 acc_t coef, const acc_t* pre, acc_t* hid,
                                                                 acc_t* keep) {
  forward_body<acc_t>(p, base, count, coef, pre, hid, keep);
}
template <typename acc_t>
acc_t backward_generic(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre,
                       const acc_t* dyw, acc_t* hid_out, acc_t* dpre, acc_t* keep) {
  return backward_body<acc_t>(p, base, count, coef, pre, dyw, hid_out, dpre, keep);
}
template <typename acc_t>
[[gnu::target("avx512f,avx512dq,avx512vl")]] acc_t backward_avx512(const Problem& p, uint64_t base, int64_t count,
                                                                   acc_t coef, const acc_t* pre, const acc_t* dyw,
                                                                   acc_t* hid_out, acc_t* dpre, acc_t* keep) {
  return backward_body<acc_t>(p, base, count, coef, pre, dyw, hid_out, dpre, keep);
}

}  // namespace

template <typename acc_t>
void dropout_keep_scale(const Problem& p, uint64_t base, int64_t count, acc_t* keep) {
  const uint32_t threshold = keep_threshold(p.dropout);
  const acc_t inv_keep = acc_t(1) / acc_t(1 - p.dropout);
  if (cpu_has_avx512dq()) {
    keep_scale_avx512(base, count, p.seed_key, threshold, inv_keep, keep);
  } else {
    keep_scale_loop<acc_t>(base, count, p.seed_key, threshold, inv_keep, keep);
  }
}

template <typename acc_t>
void hidden_forward(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre, acc_t* hid,
                    acc_t* keep) {
  if (cpu_has_avx512dq()) return forward_avx512<acc_t>(p, base, count, coef, pre, hid, keep);
  forward_generic<acc_t>(p, base, count, coef, pre, hid, keep);
}

template <typename acc_t>
acc_t hidden_backward(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre,
                      const acc_t* dyw, acc_t* hid_out, acc_t* dpre, acc_t* keep) {
  if (cpu_has_avx512dq()) return backward_avx512<acc_t>(p, base, count, coef, pre, dyw, hid_out, dpre, keep);
  return backward_generic<acc_t>(p, base, count, coef, pre, dyw, hid_out, dpre, keep);
}

#define FSOSR_INSTANTIATE(T)                                                                                    \
  template void dropout_keep_scale<T>(const Problem&, uint64_t, int64_t, T*);                                 \
  template void hidden_forward<T>(const Problem&, uint64_t, int64_t, T, const T*, T*, T*);                    \
  template T hidden_backward<T>(const Problem&, uint64_t, int64_t, T, const T*, const T*, T*, T*, T*);
FSOSR_INSTANTIATE(float)
FSOSR_INSTANTIATE(double)
#undef FSOSR_INSTANTIATE

}  // namespace moe_cpu

// Which vector code the CPU kernels run here (reported by `python -m fsosr.info`; tests check the generic switch).
const char* cpu_vector_isa() {
  if (moe_cpu::cpu_has_avx512dq()) return "avx512";
  const char* generic = std::getenv("FSOSR_CPU_GENERIC");
  if (generic != nullptr && generic[0] == '1') return "generic";
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? "avx2" : "generic";
}
}  // namespace fsosr
