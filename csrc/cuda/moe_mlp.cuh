// Torch-free launchers of the CUDA moe_mlp kernels (moe_mlp_forward.cu, moe_mlp_backward_rows.cu,
// moe_mlp_backward_weights.cu), called from moe_mlp_glue.cpp. Contract: docs/ops/moe_mlp.md ("Native op
// contract" and "cuda backend").
//
// Every pointer is a device pointer to a contiguous row-major buffer. Nothing here reads device memory on the
// host or synchronises: launch sizes come from the shapes in MoeProblem only, so the launches can be captured in
// a CUDA graph. The plan functions below are plain inline C++ so the glue (g++) and the kernels (nvcc) agree on
// buffer sizes without duplicating the arithmetic.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "element_type.h"

namespace fsosr {
namespace cuda {
namespace moe {

// Shapes and options of one call. Routed rows: every (unit n, slot j, token t), R = units * k * group of them,
// ordered by expert through `order`/`offsets` (see moe_mlp_common.cuh).
struct MoeProblem {
  ElementType dtype;           // of x, w1, b1, w2, b2, y, grad_y, grad_x and the weight gradients
  int64_t units, k, group;     // N, k, G (G = 1 for per-expert input)
  int64_t d_in, hidden, d_out, experts;
  int activation;              // 0 relu, 1 gelu (erf), 2 quick_gelu, 3 identity
  double scale, dropout;
  uint64_t seed_key;           // the dropout key, or
  const int64_t* seed_key_ptr; // where the kernels load it from (device memory), when not null
  bool per_expert_input;       // x is [E, N, d_in] and slot (n, j) reads x[indices[n, j], n]
  // Inputs (device). gates fp32 [N, k]; indices, order int32; offsets int32 [E+1].
  const void* x;
  const float* gates;
  const int32_t* order;
  const int32_t* offsets;
  const void* w1;  // [E, d_in, hidden]
  const void* b1;  // [E, hidden]
  const void* w2;  // [E, hidden, d_out]
  const void* b2;  // [E, d_out]
};

// ------------------------------------------------------------------------------------------------------------
// Plan: tiling choices and buffer sizes that both the glue and the kernels need.
// ------------------------------------------------------------------------------------------------------------
constexpr int kMaxHiddenChunk = 128;   // hidden columns a row block keeps on chip at once (shared memory)
constexpr int kMaxWeightSplits = 16;   // row chunks per expert of the weight-gradient reduction
constexpr int64_t kWeightWorkspaceFloats = int64_t(1) << 24;  // cap of the split partials (64 MiB)
constexpr int64_t kWeightRowsPerSplit = 1024;                 // about this many routed rows per split

inline int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t routed_rows(const MoeProblem& p) { return p.units * p.k * p.group; }

// Width of the on-chip hidden chunk: the smallest of 32, 64, 128 that holds `hidden`, else 128 (several chunks).
inline int hidden_chunk(const MoeProblem& p) {
  return p.hidden <= 32 ? 32 : p.hidden <= 64 ? 64 : kMaxHiddenChunk;
}
inline int64_t hidden_chunks(const MoeProblem& p) {
  const int64_t c = ceil_div_host(p.hidden, hidden_chunk(p));
  return c < 1 ? 1 : c;  // hidden == 0 still runs one (empty) chunk so that the biases reach the output
}

// Forward: with k == 1 and one hidden chunk every output row gets exactly one finished value, stored directly in
// y (x's dtype). Otherwise each (unit, slot, token) writes an fp32 row of a slot buffer [N*k*G, d_out] (partial
// sums over hidden chunks are read back by the same thread) and a second kernel sums the k slots in ascending j.
inline bool forward_writes_y_directly(const MoeProblem& p) { return p.k == 1 && hidden_chunks(p) == 1; }
inline int64_t forward_slot_buffer_floats(const MoeProblem& p) {
  return forward_writes_y_directly(p) ? 0 : routed_rows(p) * p.d_out;
}

// Backward grad_x: direct into grad_x when each destination row has one contribution and one hidden chunk
// (per-expert input: a unit picks an expert at most once; shared input with k == 1). Otherwise an fp32 buffer:
// shared input [N*k*G, d_in] (slot rows, summed over j afterwards), per-expert input [E*N, d_in] (zero-filled by
// the caller: rows (e, n) that unit n did not pick get no gradient), then cast into grad_x.
inline bool backward_writes_dx_directly(const MoeProblem& p) {
  return hidden_chunks(p) == 1 && (p.per_expert_input || p.k == 1);
}
inline int64_t backward_dx_buffer_floats(const MoeProblem& p) {
  if (backward_writes_dx_directly(p)) return 0;
  return (p.per_expert_input ? p.experts * p.units : routed_rows(p)) * p.d_in;
}

// Weight gradients: rows of expert e are split into S fixed chunks; chunk s of expert e reduces its rows in
// routed order into partial [S, E, rows, cols] (layer 1: rows d_in + 1, the last one db1; layer 2: rows
// hidden + 1, the last one db2), then the S partials are summed in ascending s. S depends on shapes only.
inline int weight_splits(const MoeProblem& p) {
  const int64_t per_split = p.experts * ((p.d_in + 1) * p.hidden + (p.hidden + 1) * p.d_out);
  int64_t s = ceil_div_host(routed_rows(p), (p.experts > 0 ? p.experts : 1) * kWeightRowsPerSplit);
  if (s > kMaxWeightSplits) s = kMaxWeightSplits;
  if (per_split > 0 && s * per_split > kWeightWorkspaceFloats) s = kWeightWorkspaceFloats / per_split;
  return s < 1 ? 1 : int(s);
}
inline int64_t weight_partial1_floats(const MoeProblem& p) {
  return int64_t(weight_splits(p)) * p.experts * (p.d_in + 1) * p.hidden;
}
inline int64_t weight_partial2_floats(const MoeProblem& p) {
  return int64_t(weight_splits(p)) * p.experts * (p.hidden + 1) * p.d_out;
}

// ------------------------------------------------------------------------------------------------------------
// Launchers. Each returns the first launch error (cudaSuccess otherwise). Require routed_rows(p) >= 1.
// ------------------------------------------------------------------------------------------------------------

// hidden_pre: fp32 [N, k, G, hidden] (written). y: [N*G, d_out] (or [N, d_out]) of p.dtype.
// slot_buffer: forward_slot_buffer_floats(p) floats (null when 0).
cudaError_t moe_mlp_forward(const MoeProblem& p, float* hidden_pre, void* y, float* slot_buffer,
                            cudaStream_t stream);

// Rows pass of the backward: grad_gates (fp32 [N, k]), grad_x, and dpre (fp32 [R, hidden], routed order) for
// the weight pass. grad_x: like x, of p.dtype; for per-expert input it must be zero-filled by the caller when
// backward_writes_dx_directly(p). dx_buffer: backward_dx_buffer_floats(p) floats (per-expert input: zero-filled).
// gate_partial: R floats of scratch.
cudaError_t moe_mlp_backward_rows(const MoeProblem& p, const void* grad_y, const float* hidden_pre, float* dpre,
                                  float* gate_partial, float* grad_gates, void* grad_x, float* dx_buffer,
                                  cudaStream_t stream);

// Weight pass: grad_w1 [E, d_in, hidden], grad_b1 [E, hidden], grad_w2 [E, hidden, d_out], grad_b2 [E, d_out]
// of p.dtype from dpre (rows pass), hidden_pre and grad_y. partial1/partial2: weight_partial{1,2}_floats(p).
cudaError_t moe_mlp_backward_weights(const MoeProblem& p, const void* grad_y, const float* hidden_pre,
                                     const float* dpre, float* partial1, float* partial2, void* grad_w1,
                                     void* grad_b1, void* grad_w2, void* grad_b2, cudaStream_t stream);

}  // namespace moe
}  // namespace cuda
}  // namespace fsosr
