// CUDA moe_mlp backward, rows pass: everything that is per routed row (grad_gates, dpre, grad_x). The weight
// gradients, which reduce over rows, are in moe_mlp_backward_weights.cu.
//
// backward_rows_kernel: the forward's tiles again (32 routed rows of one expert per block). With
// dyW = dy_row @ w2[e]^T, hid = act(pre) * mask/(1-p) and sg = scale * gate (docs/ops/moe_mlp.md):
//   0. dy . b2[e] per row (a warp per row, shuffle sum);
//   per chunk of HS hidden columns:
//   1. dyW[:, chunk] = dy_rows @ w2[e][chunk, :]^T (dy rows gathered, fp32 registers);
//   2. from the saved pre-activation (activation and dropout mask recomputed, never stored):
//      gate partial += sum_c hid * dyW; dpre = sg * dyW * mask/(1-p) * act'(pre), written to the dpre workspace
//      [R, h] (routed order, for the weight pass) and kept in shared memory;
//   3. dx = dpre[:, chunk] @ w1[e][:, chunk]^T over d_in in kOutCols passes, accumulated over chunks by the
//      thread that owns the element (fp32 buffer) or, with one chunk and one contribution per row, stored directly.
//   Finally grad-gate partial of the row = scale * (sum hid*dyW + dy.b2) into gate_partial[slot row].
// sum_gate_parts_kernel sums each slot's G token partials in ascending t, and the slot combine of the forward
// (launch_sum_slots) sums grad_x over the k slots in ascending j. No atomics anywhere: bitwise reproducible.
#include "moe_mlp.cuh"
#include "moe_mlp_common.cuh"

namespace fsosr {
namespace cuda {
namespace moe {
namespace detail {
namespace {

template <typename T, int HS>
__global__ void __launch_bounds__(kThreads, 2) backward_rows_kernel(const MoeProblem p, const Dropout drop_arg,
                                                                 const T* __restrict__ grad_y,
                                                                 const float* __restrict__ hidden_pre,
                                                                 float* __restrict__ dpre,
                                                                 float* __restrict__ gate_partial,
                                                                 T* __restrict__ grad_x,
                                                                 float* __restrict__ dx_buffer, bool direct) {
  const Dropout drop = resolve_key(drop_arg);
  constexpr int TN = HS / 32;
  constexpr int TO = kOutCols / 32;
  __shared__ RowTable<kTileRows> rows;
  __shared__ float dys[kTileRows][kStepK + 1];  // gathered grad_y tile
  __shared__ float w2t[kStepK][HS + 1];         // w2t[kk][c] = w2[e][h0 + c, k0 + kk]; +1: transposed stores
  __shared__ float ds[kTileRows][HS + 1];       // dpre of the chunk
  __shared__ float w1t[kStepK][kOutCols + 1];   // w1t[kk][c] = w1[e][n0 + c, h0 + kh + kk]

  Tile tile;
  if (!find_tile(p, blockIdx.x, tile)) return;
  rows.fill(p, tile.expert, tile.first, tile.end);
  __syncthreads();

  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t e = tile.expert, d = p.d_in, h = p.hidden, d_out = p.d_out;

  // 0. dy . b2[e]: warp ty owns rows ty + 8 i, so the condition below is warp-uniform and every lane takes part
  //    in the shuffle sum.
  float gate_sum[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = ty + kWarps * i;
    float s = 0.f;
    if (rows.slot[r] >= 0) {
      for (int64_t c = tx; c < d_out; c += 32) {
        s += load<T>(grad_y, rows.out[r] * d_out + c) * load<T>(p.b2, e * d_out + c);
      }
    }
    gate_sum[i] = warp_sum(s);
  }

  const int64_t chunks = h > 0 ? ceil_div(h, HS) : 1;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t h0 = chunk * HS;

    // 1. dyW = dy_rows @ w2[e][h0 : h0 + HS, :]^T
    float dyw[kRowsPerThread][TN];
    zero(dyw);
    for (int64_t k0 = 0; k0 < d_out; k0 += kStepK) {
      for (int idx = threadIdx.x; idx < kTileRows * kStepK; idx += kThreads) {
        const int r = idx / kStepK, kk = idx % kStepK;
        const int64_t col = k0 + kk;
        dys[r][kk] = (rows.slot[r] >= 0 && col < d_out) ? load<T>(grad_y, rows.out[r] * d_out + col) : 0.f;
      }
      for (int idx = threadIdx.x; idx < kStepK * HS; idx += kThreads) {
        const int kk = idx % kStepK, c = idx / kStepK;  // kk fastest: w2 rows are contiguous along d_out
        const int64_t hid_row = h0 + c, col = k0 + kk;
        w2t[kk][c] = (hid_row < h && col < d_out) ? load<T>(p.w2, (e * h + hid_row) * d_out + col) : 0.f;
      }
      __syncthreads();
      tile_fma<TN, kStepK + 1, HS + 1, kStepK>(dyw, &dys[0][0], &w2t[0][0], ty, tx);
      __syncthreads();
    }

    // 2. gate partials and dpre.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + kWarps * i;
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int c = tx + 32 * j;
        const int64_t col = h0 + c;
        float dp = 0.f;
        if (rows.slot[r] >= 0 && col < h) {
          const int64_t at = rows.slot[r] * h + col;  // hidden_pre index and dropout counter
          const float pre = hidden_pre[at];
          const float keep = keep_multiplier(drop, uint64_t(at));
          part += activate(pre, p.activation) * keep * dyw[i][j];
          dp = rows.gate_scale[r] * dyw[i][j] * keep * activation_slope(pre, p.activation);
          dpre[(tile.first + r) * h + col] = dp;
        }
        ds[r][c] = dp;
      }
      gate_sum[i] += warp_sum(part);  // warp-uniform call (r depends on the warp only)
    }
    __syncthreads();

    // 3. dx += dpre[:, chunk] @ w1[e][:, chunk]^T, over the K steps that hold real hidden columns.
    const int64_t live = h - h0 < HS ? (h - h0 > 0 ? h - h0 : 0) : HS;
    const int k_steps = int(ceil_div(live, kStepK));
    for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
      float dx[kRowsPerThread][TO];
      zero(dx);
      for (int ks = 0; ks < k_steps; ++ks) {
        const int kh = ks * kStepK;
        for (int idx = threadIdx.x; idx < kStepK * kOutCols; idx += kThreads) {
          const int kk = idx % kStepK, c = idx / kStepK;  // kk fastest: w1 rows are contiguous along hidden
          const int64_t hid_col = h0 + kh + kk, col = n0 + c;
          w1t[kk][c] = (hid_col < h && col < d) ? load<T>(p.w1, (e * d + col) * h + hid_col) : 0.f;
        }
        __syncthreads();
        tile_fma<TO, HS + 1, kOutCols + 1, kStepK>(dx, &ds[0][kh], &w1t[0][0], ty, tx);
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + kWarps * i;
        if (rows.slot[r] < 0) continue;
        // Destination row: per-expert input -> x's row (e, n) (a unit picks e at most once); shared input ->
        // the slot row (buffer, summed over j later) or, directly, the output row (k == 1: the same row).
        const int64_t dest_row = p.per_expert_input ? rows.in[r] : (direct ? rows.out[r] : rows.slot[r]);
#pragma unroll
        for (int j = 0; j < TO; ++j) {
          const int64_t col = n0 + tx + 32 * j;
          if (col >= d) continue;
          const int64_t dest = dest_row * d + col;
          if (direct) {
            grad_x[dest] = from_float<T>(dx[i][j]);  // direct implies a single chunk
          } else {
            dx_buffer[dest] = chunk == 0 ? dx[i][j] : dx_buffer[dest] + dx[i][j];
          }
        }
      }
    }
    __syncthreads();  // ds is rewritten by the next chunk
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + kWarps * i;
      if (rows.slot[r] >= 0) gate_partial[rows.slot[r]] = float(p.scale) * gate_sum[i];
    }
  }
}

// grad_gates[f] = sum over t = 0 .. G-1 (ascending) of gate_partial[f*G + t], for every flat slot f = n*k + j.
__global__ void __launch_bounds__(kElementwiseThreads) sum_gate_parts_kernel(const float* __restrict__ gate_partial,
                                                                             float* __restrict__ grad_gates,
                                                                             int64_t slots, int64_t group) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t f = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; f < slots; f += stride) {
    float s = 0.f;
    for (int64_t t = 0; t < group; ++t) s += gate_partial[f * group + t];
    grad_gates[f] = s;
  }
}

}  // namespace
}  // namespace detail

cudaError_t moe_mlp_backward_rows(const MoeProblem& p, const void* grad_y, const float* hidden_pre, float* dpre,
                                  float* gate_partial, float* grad_gates, void* grad_x, float* dx_buffer,
                                  cudaStream_t stream) {
  using namespace detail;
  if (!valid_problem(p) || routed_rows(p) < 1) return cudaErrorInvalidValue;
  const bool direct = backward_writes_dx_directly(p);
  if (!direct && dx_buffer == nullptr) return cudaErrorInvalidValue;
  const Dropout drop = make_dropout(p);
  const unsigned blocks = unsigned(row_tile_blocks(p));
  cudaError_t err = with_element_type(p.dtype, [&](auto element) {
    using T = decltype(element);
    return with_hidden_chunk(hidden_chunk(p), [&](auto chunk) {
      constexpr int HS = decltype(chunk)::value;
      backward_rows_kernel<T, HS><<<blocks, kThreads, 0, stream>>>(p, drop, static_cast<const T*>(grad_y),
                                                                  hidden_pre, dpre, gate_partial,
                                                                  static_cast<T*>(grad_x), dx_buffer, direct);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  const int64_t slots = p.units * p.k;
  sum_gate_parts_kernel<<<elementwise_blocks(slots), kElementwiseThreads, 0, stream>>>(gate_partial, grad_gates,
                                                                                        slots, p.group);
  if ((err = cudaGetLastError()) != cudaSuccess || direct) return err;
  if (p.per_expert_input) {  // the [E*N, d_in] buffer is grad_x itself in fp32: a cast (k = 1, G = 1)
    return launch_sum_slots(p.dtype, dx_buffer, grad_x, p.experts * p.units, 1, 1, p.d_in, stream);
  }
  return launch_sum_slots(p.dtype, dx_buffer, grad_x, p.units * p.group, p.k, p.group, p.d_in, stream);
}

}  // namespace moe
}  // namespace cuda
}  // namespace fsosr
