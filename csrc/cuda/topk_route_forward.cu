// CUDA top-k routing, forward: rank, gates, per-expert statistics and dispatch order.
// The contract (tie and NaN rules, formulas) is docs/ops/topk_route.md; fsosr/ops/reference.py is the oracle.
//
// Four launches, no atomics and no host synchronisation, so results are bitwise reproducible:
//   A  route_rows_*    rank every row, write indices/gates/next_index, and per-part partial counts/importance/
//                      load into the workspace ([num_parts, E]; a part is a fixed contiguous range of rows and
//                      everything inside it is summed in a fixed order)
//   B1 reduce_parts    per expert: sum the partials in part order -> counts/importance/load, and overwrite the
//                      partial counts with their exclusive prefix (where each part starts within the expert)
//   B2 expert_offsets  exclusive scan of counts -> offsets
//   C  scatter_order   per part, walk its flat ids n*k+j in ascending order and place them in `order` (stable)
#include "topk_route.cuh"
#include "topk_route_common.cuh"

namespace fsosr {
namespace cuda {
namespace {
using namespace topk_detail;

// ------------------------------------------------------------------------------------------------------------
// Kernel A: ranking, gates and per-part partials
// ------------------------------------------------------------------------------------------------------------
struct ForwardArgs {
  Inputs in;
  int64_t num_units, rows_per_part, num_parts;
  int num_experts, k;
  bool renormalize, smooth;  // smooth: noisy routing with k < E (else load = counts, filled in by B1)
  int32_t* indices; float* gates; int32_t* next_index;
  int32_t* part_counts; float* part_importance; float* part_load;  // workspace, [num_parts, E] each
};

// Register path: block = part. Groups take rows group, group+kGroups, ... of the part; every group runs the same
// number of iterations (idle ones on padding) so all 32 lanes reach every shuffle.
template <typename T, int G>
__global__ void __launch_bounds__(kRowThreads) route_rows_registers(ForwardArgs a) {
  constexpr int kGroups = kRowThreads / G;
  __shared__ int32_t s_count[kRowThreads * kSlots];  // [kGroups, E], E <= G*kSlots
  __shared__ float s_importance[kRowThreads * kSlots];
  __shared__ float s_load[kRowThreads * kSlots];
  const int E = a.num_experts, k = a.k;
  const int n_pass = k < E ? k + 1 : k;  // the (k+1)-th pass finds next_index
  const int group = threadIdx.x / G, member = threadIdx.x % G;
  const int64_t part = blockIdx.x;
  const int64_t row_begin = part * a.rows_per_part;
  const int64_t row_end = min64(a.num_units, row_begin + a.rows_per_part);

  int32_t acc_count[kSlots];
  float acc_importance[kSlots], acc_load[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) acc_count[i] = 0, acc_importance[i] = 0.f, acc_load[i] = 0.f;

  for (int64_t base = row_begin; base < row_end; base += kGroups) {
    const int64_t row = base + group;
    const bool active = row < row_end;
    float clean[kSlots], stdev[kSlots], noisy[kSlots];
    uint64_t key[kSlots];
    int rank[kSlots];  // position among the row's picks, -1 if not picked
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = member + G * i;
      rank[i] = -1, key[i] = kNoKey, clean[i] = 0.f, stdev[i] = 1.f, noisy[i] = 0.f;
      if (active && e < E) {
        const Element x = load_element<T>(a.in, row * E + e);
        clean[i] = x.clean, stdev[i] = x.std, noisy[i] = x.noisy, key[i] = rank_key(x.noisy, e);
      }
    }
    // Pass p finds the largest key below the previous winner: the expert ranked p.
    uint64_t prev = kAboveAllKeys;
    float top = 0.f, denom = 0.f, thr_in = 0.f, thr_out = 0.f;
    int next = -1;
    for (int p = 0; p < n_pass; ++p) {
      uint64_t best = kNoKey;
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if (key[i] < prev && key[i] > best) best = key[i];
      best = group_max<G>(best);
      const float v = key_value(best);
      if (p == 0) top = v;  // the row maximum (NaN if the row has one): the softmax shift
      if (p < k) {
        denom += expf(v - top);
#pragma unroll
        for (int i = 0; i < kSlots; ++i)
          if (key[i] == best && key[i] != kNoKey) rank[i] = p;
      }
      if (p == k - 1) thr_out = v;
      if (p == k) thr_in = v, next = key_expert(best);
      prev = best;
    }
    if (!a.renormalize) {  // softmax over all E: replace the k-term denominator by the full one
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if (key[i] != kNoKey) sum += expf(noisy[i] - top);
      denom = group_sum<G>(sum);
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (rank[i] >= 0) {
          const float gate = expf(noisy[i] - top) / denom;
          a.indices[row * k + rank[i]] = member + G * i;
          a.gates[row * k + rank[i]] = gate;
          acc_count[i] += 1;
          acc_importance[i] += gate;
        }
        if (a.smooth && key[i] != kNoKey) {
          const float thr = rank[i] >= 0 ? thr_in : thr_out;
          acc_load[i] += normal_cdf(load_margin(clean[i], thr, stdev[i]));
        }
      }
      if (member == 0) a.next_index[row] = next;
    }
  }

  // Block partials: each group's sums go to shared memory, then one warp per expert adds them in group order.
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = member + G * i;
    if (e < E) {
      s_count[group * E + e] = acc_count[i];
      s_importance[group * E + e] = acc_importance[i];
      s_load[group * E + e] = acc_load[i];
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = warp; e < E; e += kRowThreads / 32) {
    int32_t count = 0;
    float importance = 0.f, load = 0.f;
    for (int g = lane; g < kGroups; g += 32) {
      count += s_count[g * E + e];
      importance += s_importance[g * E + e];
      load += s_load[g * E + e];
    }
    count = group_sum<32>(count);
    importance = group_sum<32>(importance);
    load = group_sum<32>(load);
    if (lane == 0) {
      a.part_counts[part * E + e] = count;
      a.part_importance[part * E + e] = importance;
      if (a.smooth) a.part_load[part * E + e] = load;
    }
  }
}

// Loop path (large E): one warp per part, rows in order. Lane l owns experts l, l+32, ... of the part's partial
// row in the workspace and is the only one to touch them, so they accumulate there without shared memory.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) route_rows_loop(ForwardArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t part = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (part >= a.num_parts) return;  // whole warp
  const int E = a.num_experts, k = a.k;
  const int n_pass = k < E ? k + 1 : k;
  int32_t* my_count = a.part_counts + part * E;
  float* my_importance = a.part_importance + part * E;
  float* my_load = a.part_load + part * E;
  for (int e = lane; e < E; e += 32) {
    my_count[e] = 0, my_importance[e] = 0.f;
    if (a.smooth) my_load[e] = 0.f;
  }
  const int64_t row_end = min64(a.num_units, (part + 1) * a.rows_per_part);
  for (int64_t row = part * a.rows_per_part; row < row_end; ++row) {
    const int64_t offset = row * E, picks = row * k;
    uint64_t prev = kAboveAllKeys, kth_key = kNoKey;
    float top = 0.f, denom = 0.f, thr_in = 0.f, thr_out = 0.f;
    int next = -1;
    for (int p = 0; p < n_pass; ++p) {
      uint64_t best = kNoKey;
      for (int e = lane; e < E; e += 32) {
        const uint64_t key = rank_key(load_element<T>(a.in, offset + e).noisy, e);
        if (key < prev && key > best) best = key;
      }
      best = group_max<32>(best);
      const float v = key_value(best);
      if (p == 0) top = v;
      if (p < k) {
        denom += expf(v - top);
        // Lane p%32 parks the raw value in gates and rescales it below: no cross-lane hand-off needed.
        if (lane == p % 32) a.indices[picks + p] = key_expert(best), a.gates[picks + p] = v;
      }
      if (p == k - 1) kth_key = best, thr_out = v;
      if (p == k) thr_in = v, next = key_expert(best);
      prev = best;
    }
    if (!a.renormalize) {
      float sum = 0.f;
      for (int e = lane; e < E; e += 32) sum += expf(load_element<T>(a.in, offset + e).noisy - top);
      denom = group_sum<32>(sum);
    }
    for (int j = lane; j < k; j += 32) a.gates[picks + j] = expf(a.gates[picks + j] - top) / denom;
    // Picked <=> key >= the k-th key (keys are a strict order). The gate expression is the one used just above
    // on the same canonical value, so importance sums exactly the gates written.
    for (int e = lane; e < E; e += 32) {
      const Element x = load_element<T>(a.in, offset + e);
      const uint64_t key = rank_key(x.noisy, e);
      const bool picked = key >= kth_key;
      if (picked) my_count[e] += 1, my_importance[e] += expf(key_value(key) - top) / denom;
      if (a.smooth) my_load[e] += normal_cdf(load_margin(x.clean, picked ? thr_in : thr_out, x.std));
    }
    if (lane == 0) a.next_index[row] = next;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Kernels B1, B2, C: totals, offsets, dispatch order
// ------------------------------------------------------------------------------------------------------------
struct ReduceArgs {
  int64_t num_parts;
  int num_experts;
  bool smooth;
  int32_t* part_counts;  // in: partial counts; out: exclusive prefix over parts (per expert)
  const float* part_importance; const float* part_load;
  int32_t* counts; float* importance; float* load;
};

__global__ void __launch_bounds__(kReduceWarps * 32) reduce_parts(ReduceArgs r) {
  const int lane = threadIdx.x % 32;
  const int e = blockIdx.x * kReduceWarps + threadIdx.x / 32;
  if (e >= r.num_experts) return;  // whole warp
  const int E = r.num_experts;
  // Lane l takes a contiguous run of parts, so a lane scan plus a warp scan gives the per-part prefix.
  const int64_t per_lane = ceil_div(r.num_parts, 32);
  const int64_t p_begin = lane * per_lane, p_end = min64(r.num_parts, p_begin + per_lane);
  int32_t count = 0;
  float importance = 0.f, load = 0.f;
  for (int64_t p = p_begin; p < p_end; ++p) {
    count += r.part_counts[p * E + e];
    importance += r.part_importance[p * E + e];
    if (r.smooth) load += r.part_load[p * E + e];
  }
  const int32_t inclusive = warp_inclusive_scan(count, lane);
  const int32_t total = __shfl_sync(kFullMask, inclusive, 31);
  importance = group_sum<32>(importance);
  load = group_sum<32>(load);
  int32_t running = inclusive - count;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int32_t c = r.part_counts[p * E + e];
    r.part_counts[p * E + e] = running;
    running += c;
  }
  if (lane == 0) {
    r.counts[e] = total;
    r.importance[e] = importance;
    r.load[e] = r.smooth ? load : float(total);
  }
}

__global__ void __launch_bounds__(kScanThreads) expert_offsets(const int32_t* counts, int num_experts,
                                                               int32_t* offsets) {
  __shared__ int32_t s_warp_total[kScanThreads / 32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t per_thread = ceil_div(num_experts, kScanThreads);
  const int64_t e_begin = t * per_thread, e_end = min64(num_experts, e_begin + per_thread);
  int32_t local = 0;
  for (int64_t e = e_begin; e < e_end; ++e) local += counts[e];
  const int32_t inclusive = warp_inclusive_scan(local, lane);
  if (lane == 31) s_warp_total[warp] = inclusive;
  __syncthreads();
  if (warp == 0) s_warp_total[lane] = warp_inclusive_scan(s_warp_total[lane], lane);
  __syncthreads();
  int32_t running = inclusive - local + (warp > 0 ? s_warp_total[warp - 1] : 0);
  for (int64_t e = e_begin; e < e_end; ++e) {
    offsets[e] = running;
    running += counts[e];
  }
  if (t == kScanThreads - 1) offsets[num_experts] = running;  // the last thread's running end is the total
}

struct OrderArgs {
  const int32_t* indices;
  const int32_t* offsets;
  int32_t* part_base;  // [num_parts, E] from reduce_parts; the running slots themselves when not in shared
  int32_t* order;
  int64_t num_units, rows_per_part, num_parts;
  int num_experts, k;
  bool shared_slots;
};

// One warp per part walks its flat ids in chunks of 32 (ascending). Lanes routed to the same expert find each
// other with __match_any_sync; a lane's rank among them is the number of such lanes below it, so ids land in
// ascending order, and the lowest of them then advances the expert's running slot.
__global__ void __launch_bounds__(kWarpsPerBlock * 32) scatter_order(OrderArgs o) {
  extern __shared__ int32_t s_slots[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t part = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (part >= o.num_parts) return;  // whole warp
  const int E = o.num_experts;
  int32_t* base = o.part_base + part * E;
  int32_t* slot = o.shared_slots ? s_slots + warp * E : base;
  for (int e = lane; e < E; e += 32) slot[e] = o.offsets[e] + base[e];
  __syncwarp();
  const int64_t f_begin = part * o.rows_per_part * o.k;
  const int64_t f_end = min64(o.num_units, (part + 1) * o.rows_per_part) * o.k;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t f0 = f_begin; f0 < f_end; f0 += 32) {
    const int64_t f = f0 + lane;
    const bool valid = f < f_end;
    const int e = valid ? o.indices[f] : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank = __popc(peers & lanes_below);
    if (valid) o.order[slot[e] + rank] = int32_t(f);
    __syncwarp();  // every lane has read slot[e] before it moves
    if (valid && rank == 0) slot[e] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

using namespace topk_detail;


int64_t topk_route_workspace_bytes(int64_t num_units, int64_t num_experts) {
  const Plan plan = make_plan(num_units, num_experts);
  return int64_t(3 * partial_bytes(plan, num_experts));  // part counts, importance, load
}

cudaError_t topk_route_forward(ElementType dtype, const void* logits, const void* noise, const void* noise_std,
                               int64_t num_units, int64_t num_experts, int64_t k, bool renormalize,
                               int32_t* indices, float* gates, int32_t* counts, int32_t* order,
                               int32_t* offsets, float* importance, float* load, int32_t* next_index,
                               void* workspace, cudaStream_t stream) {
  if (!valid_call(num_units, num_experts, k, noise, noise_std)) return cudaErrorInvalidValue;
  const Plan plan = make_plan(num_units, num_experts);
  const size_t part_bytes = partial_bytes(plan, num_experts);  // workspace: [counts | importance | load] partials
  char* ws = static_cast<char*>(workspace);
  const bool smooth = noise != nullptr && k < num_experts;
  const ForwardArgs a{Inputs{logits, noise, noise_std}, num_units, plan.rows_per_part, plan.num_parts,
                      int(num_experts), int(k), renormalize, smooth, indices, gates, next_index,
                      reinterpret_cast<int32_t*>(ws), reinterpret_cast<float*>(ws + part_bytes),
                      reinterpret_cast<float*>(ws + 2 * part_bytes)};
  const unsigned part_warp_blocks = unsigned(ceil_div(plan.num_parts, kWarpsPerBlock));
  cudaError_t err = with_element_type(dtype, [&](auto type) {
    using T = decltype(type);
    if (!plan.registers) {
      route_rows_loop<T><<<part_warp_blocks, kWarpsPerBlock * 32, 0, stream>>>(a);
      return cudaGetLastError();
    }
    with_group(plan.group, [&](auto group) {
      route_rows_registers<T, decltype(group)::value><<<unsigned(plan.num_parts), kRowThreads, 0, stream>>>(a);
    });
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;

  const ReduceArgs r{plan.num_parts, int(num_experts), smooth, a.part_counts, a.part_importance, a.part_load,
                     counts, importance, load};
  reduce_parts<<<unsigned(ceil_div(num_experts, kReduceWarps)), kReduceWarps * 32, 0, stream>>>(r);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  expert_offsets<<<1, kScanThreads, 0, stream>>>(counts, int(num_experts), offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const bool shared_slots = int64_t(kWarpsPerBlock) * num_experts * 4 <= kSharedCounterBytes;
  const OrderArgs o{indices, offsets, a.part_counts, order, num_units, plan.rows_per_part, plan.num_parts,
                    int(num_experts), int(k), shared_slots};
  const size_t order_smem = shared_slots ? size_t(kWarpsPerBlock) * size_t(num_experts) * 4 : 0;
  scatter_order<<<part_warp_blocks, kWarpsPerBlock * 32, order_smem, stream>>>(o);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fsosr
