// CUDA kernels of fsosr::masked_adamw_ (declared in masked_adamw.cuh; semantics: fsosr/ops/masked_adamw.py).
//
// 1. rules_kernel, one thread per (segment, owner slot): whether the slot steps (mosa: drawn or drawn before;
//    skip/freeze: drawn), HF AdamW's step counter (advanced in place), and the bias-corrected step size and
//    decay in double, as the CPU kernel computes them.
// 2. step_kernel, one thread per entry: the entry's segment by binary search over segment_offsets (S + 1 values,
//    cached), its slot from owner (255 -> slot N), then the update. Entries whose slot does not step are neither
//    read nor written. Purely elementwise, hence bitwise reproducible.
#include "masked_adamw.cuh"

namespace fsosr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kShared = 255;
constexpr int kFlagUpdate = 1;  // the slot steps this time
constexpr int kFlagGrad = 2;    // the slot reads its gradient (drawn); otherwise its moments see g = 0

// Workspace layout: step_size[num_pairs] and decay[num_pairs] as doubles (also used, reinterpreted, for the
// float tables), then flags[num_pairs] as int32.
struct RuleTables {
  void* step_size;
  void* decay;
  int32_t* flags;
};

RuleTables tables_of(void* workspace, int64_t num_pairs) {
  char* base = static_cast<char*>(workspace);
  return {base, base + num_pairs * sizeof(double),
          reinterpret_cast<int32_t*>(base + 2 * num_pairs * sizeof(double))};
}

template <typename scalar_t>
__global__ void rules_kernel(int64_t* steps, const int64_t* selected, int64_t draws, const double* weight_decay,
                             scalar_t* step_size, scalar_t* decay, int32_t* flags, int64_t num_pairs,
                             int64_t num_experts, double lr, double beta1, double beta2, bool mosa, bool advance) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_pairs) return;
  const int64_t slots = num_experts + 1;
  const int64_t segment = i / slots, slot = i % slots;
  int64_t t = steps[i];
  bool drawn = slot == num_experts;  // the shared slot, and every expert drawn since the last step
  for (int64_t d = 0; d < draws; ++d) drawn = drawn || slot == selected[segment * draws + d];
  // mosa (torch 1.11 zero_grad keeps zero grads): once drawn, an expert steps every step. skip / freeze: drawn only.
  const bool update = mosa ? (drawn || t > 0) : drawn;
  if (advance && update) steps[i] = ++t;
  const double tt = double(t < 1 ? 1 : t);
  const double correction1 = 1.0 - pow(beta1, tt);
  const double correction2 = 1.0 - pow(beta2, tt);
  step_size[i] = update ? scalar_t(lr * sqrt(correction2) / correction1) : scalar_t(0);
  decay[i] = scalar_t(lr * weight_decay[segment]);
  flags[i] = (update ? kFlagUpdate : 0) | (drawn ? kFlagGrad : 0);
}

template <typename scalar_t>
__global__ void step_kernel(scalar_t* __restrict__ p, scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                            const scalar_t* __restrict__ g, const uint8_t* __restrict__ owner,
                            const int64_t* __restrict__ offsets, const scalar_t* __restrict__ step_size,
                            const scalar_t* __restrict__ decay, const int32_t* __restrict__ flags, int64_t numel,
                            int64_t num_segments, int64_t num_experts, scalar_t beta1, scalar_t beta2,
                            scalar_t one_minus_beta1, scalar_t one_minus_beta2, scalar_t eps) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  const int o = owner[i];
  if (o >= num_experts && o != kShared) return;  // an unchecked bad owner: the entry is left as it is
  // Last segment s with offsets[s] <= i (empty segments are skipped because a later start wins).
  int64_t lo = 0, hi = num_segments;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldg(offsets + mid) <= i) lo = mid; else hi = mid;
  }
  const int64_t rule = lo * (num_experts + 1) + (o == kShared ? num_experts : o);
  const int32_t flag = __ldg(flags + rule);
  if (!(flag & kFlagUpdate)) return;
  // A masked-out gradient is never read: the select drops NaN/inf like a copy that never saw it.
  const scalar_t grad = (flag & kFlagGrad) ? g[i] : scalar_t(0);
  const scalar_t m_new = beta1 * m[i] + one_minus_beta1 * grad;
  const scalar_t v_new = beta2 * v[i] + one_minus_beta2 * (grad * grad);
  const scalar_t stepped = p[i] - __ldg(step_size + rule) * (m_new / (sqrt(v_new) + eps));
  m[i] = m_new;
  v[i] = v_new;
  p[i] = stepped - __ldg(decay + rule) * stepped;
}

template <typename scalar_t>
cudaError_t launch(void* params, void* exp_avg, void* exp_avg_sq, int64_t* steps, const void* grads,
                   const uint8_t* owner, const int64_t* segment_offsets, const int64_t* selected,
                   int64_t draws, const double* weight_decay, int64_t numel, int64_t num_segments,
                   int64_t num_experts, double lr, double beta1, double beta2, double eps, int64_t semantics,
                   bool advance_steps, void* workspace, cudaStream_t stream) {
  const int64_t num_pairs = num_segments * (num_experts + 1);
  if (num_pairs == 0) return cudaSuccess;
  const RuleTables t = tables_of(workspace, num_pairs);
  auto* step_size = static_cast<scalar_t*>(t.step_size);
  auto* decay = static_cast<scalar_t*>(t.decay);
  rules_kernel<scalar_t><<<unsigned((num_pairs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      steps, selected, draws, weight_decay, step_size, decay, t.flags, num_pairs, num_experts, lr, beta1, beta2,
      semantics == 0, advance_steps);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || numel == 0) return err;
  // HF AdamW writes add_(grad, alpha=1 - beta1): the double 1 - beta1 rounded once to the tensor dtype, as in
  // the reference (not 1 - float(beta1), which differs in the last bit).
  const scalar_t b1 = scalar_t(beta1), b2 = scalar_t(beta2);
  step_kernel<scalar_t><<<unsigned((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<scalar_t*>(params), static_cast<scalar_t*>(exp_avg), static_cast<scalar_t*>(exp_avg_sq),
      static_cast<const scalar_t*>(grads), owner, segment_offsets, step_size, decay, t.flags, numel, num_segments,
      num_experts, b1, b2, scalar_t(1.0 - beta1), scalar_t(1.0 - beta2), scalar_t(eps));
  return cudaGetLastError();
}

}  // namespace

int64_t masked_adamw_workspace_bytes(int64_t num_pairs) {
  return num_pairs * int64_t(2 * sizeof(double) + sizeof(int32_t));
}

cudaError_t masked_adamw(bool is_double, void* params, void* exp_avg, void* exp_avg_sq, int64_t* steps,
                         const void* grads, const uint8_t* owner, const int64_t* segment_offsets,
                         const int64_t* selected, int64_t draws, const double* weight_decay, int64_t numel,
                         int64_t num_segments, int64_t num_experts, double lr, double beta1, double beta2,
                         double eps, int64_t semantics, bool advance_steps, void* workspace, cudaStream_t stream) {
  auto run = is_double ? launch<double> : launch<float>;
  return run(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, draws, weight_decay, numel,
             num_segments, num_experts, lr, beta1, beta2, eps, semantics, advance_steps, workspace, stream);
}

}  // namespace cuda
}  // namespace fsosr
