// CUDA top-k routing, backward: one launch, one row per group of lanes (rows are independent: no cross-row
// reduction), formulas from docs/ops/topk_route.md, noisy logits recomputed bit for bit as the forward ranked them.
#include "topk_route.cuh"
#include "topk_route_common.cuh"

namespace fsosr {
namespace cuda {
namespace {
using namespace topk_detail;

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
struct BackwardArgs {
  Inputs in;
  const float* grad_gates; const float* grad_importance; const float* grad_load;  // [N, k], [E], [E]
  const int32_t* indices; const float* gates; const int32_t* next_index;
  int64_t num_units;
  int num_experts, k;
  bool renormalize, smooth;
  void* grad_logits; void* grad_noise_std;  // [N, E] of T; grad_noise_std null for clean routing
};

template <typename T>
__device__ __forceinline__ void store_grads(const BackwardArgs& a, int64_t offset, const Element& x, float dnoisy,
                                            LoadGrad lg) {
  static_cast<T*>(a.grad_logits)[offset] = from_float<T>(dnoisy + lg.dclean);
  if (a.grad_noise_std != nullptr) static_cast<T*>(a.grad_noise_std)[offset] = from_float<T>(dnoisy * x.noise + lg.dstd);
}

// Register path: one group per row, one row per group (no loop: rows need no reduction).
template <typename T, int G>
__global__ void __launch_bounds__(kRowThreads) backward_rows_registers(BackwardArgs a) {
  constexpr int kGroups = kRowThreads / G;
  const int E = a.num_experts, k = a.k;
  const int member = threadIdx.x % G;
  const int64_t row = int64_t(blockIdx.x) * kGroups + threadIdx.x / G;
  const bool active = row < a.num_units;
  const int64_t offset = row * E, picks = row * k;

  Element x[kSlots];
  bool valid[kSlots], picked[kSlots];
  float dg[kSlots], gate[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    valid[i] = active && member + G * i < E;
    picked[i] = false, dg[i] = 0.f, gate[i] = 0.f;
    x[i] = valid[i] ? load_element<T>(a.in, offset + member + G * i) : Element{0.f, 0.f, 1.f, 0.f};
  }
  float s = 0.f, top = 0.f, thr_in = 0.f, thr_out = 0.f;
  int last = -1, next = -1;
  if (active) {
    for (int j = 0; j < k; ++j) {  // every member walks all picks (same addresses: broadcast loads)
      const int e = a.indices[picks + j];
      const float g = a.gates[picks + j];
      const float dgj = a.grad_gates[picks + j] + a.grad_importance[e];
      s += g * dgj;
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if (e == member + G * i) picked[i] = true, dg[i] = dgj, gate[i] = g;
    }
    last = a.indices[picks + k - 1];
    top = load_element<T>(a.in, offset + a.indices[picks]).noisy;  // the forward's softmax shift
    if (a.smooth) {
      next = a.next_index[row];
      thr_in = load_element<T>(a.in, offset + next).noisy;
      thr_out = load_element<T>(a.in, offset + last).noisy;
    }
  }
  float dnoisy[kSlots];
  if (a.renormalize) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) dnoisy[i] = picked[i] ? gate[i] * (dg[i] - s) : 0.f;
  } else {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (valid[i]) sum += expf(x[i].noisy - top);
    const float denom = group_sum<G>(sum);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) dnoisy[i] = valid[i] ? expf(x[i].noisy - top) / denom * (dg[i] - s) : 0.f;
  }
  LoadGrad lg[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) lg[i] = LoadGrad{0.f, 0.f};
  if (a.smooth) {
    float pull_in = 0.f, pull_out = 0.f;  // summed per threshold
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (!valid[i]) continue;
      lg[i] = load_grad(x[i], picked[i] ? thr_in : thr_out, a.grad_load[member + G * i]);
      (picked[i] ? pull_in : pull_out) += lg[i].dclean;
    }
    pull_in = group_sum<G>(pull_in);
    pull_out = group_sum<G>(pull_out);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (member + G * i == next) dnoisy[i] -= pull_in;
      if (member + G * i == last) dnoisy[i] -= pull_out;
    }
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (valid[i]) store_grads<T>(a, offset + member + G * i, x[i], dnoisy[i], lg[i]);
  }
}

// Loop path: one warp per row. Unpicked experts are written by their owner lane (picked <=> key >= the k-th
// key, exact because the noisy logits are recomputed bit for bit); picked ones by the lane holding their pick j.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) backward_rows_loop(BackwardArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.num_units) return;  // whole warp
  const int E = a.num_experts, k = a.k;
  const int64_t offset = row * E, picks = row * k;
  float s = 0.f;
  for (int j = lane; j < k; j += 32)
    s += a.gates[picks + j] * (a.grad_gates[picks + j] + a.grad_importance[a.indices[picks + j]]);
  s = group_sum<32>(s);
  const int last = a.indices[picks + k - 1];
  const float top = load_element<T>(a.in, offset + a.indices[picks]).noisy;
  const float thr_out = load_element<T>(a.in, offset + last).noisy;
  const uint64_t kth_key = rank_key(thr_out, last);
  float denom = 1.f;
  if (!a.renormalize) {
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += expf(load_element<T>(a.in, offset + e).noisy - top);
    denom = group_sum<32>(sum);
  }
  const int next = a.smooth ? a.next_index[row] : -1;
  const float thr_in = a.smooth ? load_element<T>(a.in, offset + next).noisy : 0.f;
  float pull_in = 0.f, pull_out = 0.f;
  if (a.smooth) {
    for (int e = lane; e < E; e += 32) {
      const Element x = load_element<T>(a.in, offset + e);
      const bool picked = rank_key(x.noisy, e) >= kth_key;
      (picked ? pull_in : pull_out) += load_grad(x, picked ? thr_in : thr_out, a.grad_load[e]).dclean;
    }
    pull_in = group_sum<32>(pull_in);
    pull_out = group_sum<32>(pull_out);
  }
  for (int e = lane; e < E; e += 32) {
    const Element x = load_element<T>(a.in, offset + e);
    if (rank_key(x.noisy, e) >= kth_key) continue;
    float dnoisy = a.renormalize ? 0.f : -(expf(x.noisy - top) / denom) * s;
    const LoadGrad lg = a.smooth ? load_grad(x, thr_out, a.grad_load[e]) : LoadGrad{0.f, 0.f};
    if (e == next) dnoisy -= pull_in;
    store_grads<T>(a, offset + e, x, dnoisy, lg);
  }
  for (int j = lane; j < k; j += 32) {
    const int e = a.indices[picks + j];
    const Element x = load_element<T>(a.in, offset + e);
    const float p = a.renormalize ? a.gates[picks + j] : expf(x.noisy - top) / denom;
    float dnoisy = p * (a.grad_gates[picks + j] + a.grad_importance[e] - s);
    const LoadGrad lg = a.smooth ? load_grad(x, thr_in, a.grad_load[e]) : LoadGrad{0.f, 0.f};
    if (a.smooth && j == k - 1) dnoisy -= pull_out;
    store_grads<T>(a, offset + e, x, dnoisy, lg);
  }
}

}  // namespace

using namespace topk_detail;

cudaError_t topk_route_backward(ElementType dtype, const float* grad_gates, const float* grad_importance,
                                const float* grad_load, const void* logits, const void* noise,
                                const void* noise_std, const int32_t* indices, const float* gates,
                                const int32_t* next_index, int64_t num_units, int64_t num_experts, int64_t k,
                                bool renormalize, void* grad_logits, void* grad_noise_std, cudaStream_t stream) {
  if (!valid_call(num_units, num_experts, k, noise, noise_std)) return cudaErrorInvalidValue;
  const BackwardArgs a{Inputs{logits, noise, noise_std}, grad_gates, grad_importance, grad_load, indices, gates,
                       next_index, num_units, int(num_experts), int(k), renormalize,
                       noise != nullptr && k < num_experts, grad_logits, noise != nullptr ? grad_noise_std : nullptr};
  const int group = group_size(num_experts);
  return with_element_type(dtype, [&](auto type) {
    using T = decltype(type);
    if (num_experts > kRegisterMaxExperts) {
      backward_rows_loop<T><<<unsigned(ceil_div(num_units, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, stream>>>(a);
      return cudaGetLastError();
    }
    with_group(group, [&](auto g) {
      backward_rows_registers<T, decltype(g)::value><<<unsigned(ceil_div(num_units, kRowThreads / group)), kRowThreads, 0, stream>>>(a);
    });
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fsosr
