// Internals shared by the CUDA top-k routing kernels (topk_route_forward.cu, topk_route_backward.cu): launch
// constants, element access, ranking keys, warp reductions and the host-side launch plan. Torch-free.
//
// A row (unit) is handled by a group of G lanes of one warp; member m of a group owns experts m, m+G, m+2G, ...
// For E <= 32*kSlots a row's values stay in registers (register path, G = the smallest power of two with
// G*kSlots >= E, so small E pack several rows per warp); larger E use one warp per row that re-reads the row from
// global memory on every sweep (loop path, any E).
#pragma once

#include "element_access.cuh"
#include "topk_route.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace fsosr {
namespace cuda {
namespace topk_detail {

constexpr int kSlots = 4;                        // experts per lane kept in registers
constexpr int kRegisterMaxExperts = 32 * kSlots;  // beyond this: loop path
constexpr int kRowThreads = 256;                  // register-path blocks
constexpr int kWarpsPerBlock = 4;                 // loop-path, order and loop-backward blocks (one warp per item)
constexpr int kReduceWarps = 8;                   // reduce_parts: one warp per expert
constexpr int kScanThreads = 1024;                // expert_offsets: one block
// Parts bound the workspace and the serial work of B1; fixed constants (not the device's SM count) so a given
// (N, E) always splits the same way and sums in the same order on every GPU.
constexpr int64_t kMaxParts = 2048;
constexpr int64_t kMaxPartialEntries = int64_t(1) << 22;
constexpr int64_t kSharedCounterBytes = 32 * 1024;  // scatter_order keeps its running slots in shared memory below this
constexpr size_t kAlign = 256;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint64_t kNoKey = 0;             // below every real key (padding slots, inactive rows)
constexpr uint64_t kAboveAllKeys = ~uint64_t(0);  // above every real key (start of the ranking passes)

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------------------
// Element access and numerics
// ------------------------------------------------------------------------------------------------------------
struct Inputs {  // [N, E] each, of the element type T the kernels are instantiated for
  const void* logits;
  const void* noise;  // null (with noise_std) for clean routing
  const void* noise_std;
};

struct Element {
  float clean, noise, std, noisy;
};

template <typename T>
__device__ __forceinline__ Element load_element(const Inputs& in, int64_t offset) {
  Element x{to_float(static_cast<const T*>(in.logits)[offset]), 0.f, 1.f, 0.f};
  x.noisy = x.clean;
  if (in.noise != nullptr) {
    x.noise = to_float(static_cast<const T*>(in.noise)[offset]);
    x.std = to_float(static_cast<const T*>(in.noise_std)[offset]);
    // Product and sum rounded separately (no FMA contraction), as the reference's two tensor ops do: ties and
    // thresholds then match it, and the backward's recomputation matches the forward bit for bit.
    x.noisy = __fadd_rn(x.clean, __fmul_rn(x.noise, x.std));
  }
  return x;
}

// Ranking key: larger = ranked first. High word: order-preserving image of the value with -0 folded onto +0 and
// every NaN above +inf; low word: INT32_MAX - e, so equal values rank the lower expert first. A real key is
// never kNoKey (low word >= 1) nor kAboveAllKeys (low word <= INT32_MAX), and all keys of a row are distinct.
__device__ __forceinline__ uint64_t rank_key(float v, int e) {
  uint32_t high;
  if (isnan(v)) {
    high = 0xffffffffu;
  } else {
    const uint32_t bits = __float_as_uint(v == 0.f ? 0.f : v);
    high = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (uint64_t(high) << 32) | uint32_t(0x7fffffff - e);
}
__device__ __forceinline__ float key_value(uint64_t key) {  // the (canonical) value back
  const uint32_t high = uint32_t(key >> 32);
  return __uint_as_float((high & 0x80000000u) ? (high & 0x7fffffffu) : ~high);
}
__device__ __forceinline__ int key_expert(uint64_t key) { return 0x7fffffff - int(uint32_t(key)); }

__device__ __forceinline__ float normal_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }
__device__ __forceinline__ float normal_pdf(float z) { return expf(-0.5f * z * z) * 0.3989422804014327f; }

// Backward of one smooth-load term Phi((clean - thr) / std) with upstream grad_load: d/dclean (which is also the
// pull on the threshold, d/dthr = -d/dclean) and d/dstd.
struct LoadGrad {
  float dclean, dstd;
};
// Standardised margin of a smooth-load term: -inf for a disabled expert (clean = -inf), even against a -inf
// threshold (which would give NaN); +inf for a finite logit against a -inf threshold.
__device__ __forceinline__ float load_margin(float clean, float thr, float stdev) {
  return clean == -INFINITY ? -INFINITY : (clean - thr) / stdev;
}
__device__ __forceinline__ LoadGrad load_grad(const Element& x, float thr, float grad_load) {
  const float z = load_margin(x.clean, thr, x.std);
  if (!isfinite(z)) return {0.f, 0.f};  // Phi is flat there (phi(z) * z -> 0); 0 * inf would give NaN
  const float w = grad_load * normal_pdf(z);
  return {w / x.std, -w * z / x.std};
}

// Butterfly reductions over aligned groups of G lanes. Every lane of the group ends with the same bits (each
// step combines the same two operands on both partners), so any lane may use the result.
template <int G>
__device__ __forceinline__ uint64_t group_max(uint64_t v) {
#pragma unroll
  for (int m = G / 2; m >= 1; m /= 2) {
    const uint64_t other = __shfl_xor_sync(kFullMask, v, m);
    v = other > v ? other : v;
  }
  return v;
}
template <int G, typename V>
__device__ __forceinline__ V group_sum(V v) {
#pragma unroll
  for (int m = G / 2; m >= 1; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int other = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += other;
  }
  return v;
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------
struct Plan {
  bool registers;
  int group;  // lanes per row on the register path
  int64_t rows_per_part, num_parts;
};

inline int group_size(int64_t num_experts) {
  int g = 1;
  while (g < 32 && int64_t(g) * kSlots < num_experts) g *= 2;
  return g;
}

// Depends on (N, E) only, so topk_route_workspace_bytes and topk_route_forward always agree.
inline Plan make_plan(int64_t num_units, int64_t num_experts) {
  Plan plan{num_experts <= kRegisterMaxExperts, group_size(num_experts), 0, 0};
  if (num_units <= 0 || num_experts <= 0) return plan;
  // A register-path part is at least one row per group; a loop-path part (one warp) at least one row.
  const int64_t min_rows = plan.registers ? kRowThreads / plan.group : 1;
  const int64_t max_parts = std::max<int64_t>(1, min64(kMaxParts, kMaxPartialEntries / num_experts));
  const int64_t parts = min64(ceil_div(num_units, min_rows), max_parts);
  plan.rows_per_part = ceil_div(num_units, parts);
  plan.num_parts = ceil_div(num_units, plan.rows_per_part);  // no empty trailing part
  return plan;
}

inline size_t partial_bytes(const Plan& plan, int64_t num_experts) {  // one [num_parts, E] array of 4-byte entries
  const size_t bytes = size_t(plan.num_parts) * size_t(num_experts) * 4;
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

// f(T{}) with T the element type of dtype; f(std::integral_constant<int, G>{}) for the register-path group.
template <typename F>
void with_group(int group, F&& f) {
  switch (group) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

inline bool valid_call(int64_t num_units, int64_t num_experts, int64_t k, const void* noise, const void* noise_std) {
  return num_units >= 1 && num_experts >= 1 && num_experts <= INT32_MAX && k >= 1 && k <= num_experts &&
         num_units <= INT32_MAX / k &&  // flat ids n*k+j are int32 (order)
         (noise == nullptr) == (noise_std == nullptr);
}
}  // namespace topk_detail
}  // namespace cuda
}  // namespace fsosr
