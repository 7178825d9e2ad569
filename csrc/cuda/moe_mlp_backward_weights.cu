// CUDA moe_mlp backward, weight pass: grad_w1, grad_b1, grad_w2, grad_b2 as deterministic per-expert reductions.
//
// Both layers are one product shape, C[a, b] = sum over the expert's routed rows of A[row, a] * B[row, b]:
//   layer 1: A = [x_row, 1]            (d_in + 1 columns), B = dpre_row (hidden):  C = [grad_w1[e]; grad_b1[e]]
//   layer 2: A = [sg * hid_row, sg]    (hidden + 1),        B = dy_row (d_out):     C = [grad_w2[e]; grad_b2[e]]
// with sg = scale * gate and hid = act(pre) * mask/(1-p) recomputed from hidden_pre (not stored by the rows pass).
// The appended column turns each bias gradient into the last row of its matrix, so one kernel does all four.
//
// weights_kernel: grid (64x64 output tiles of both layers, E, S). Block (tile, e, s) walks the s-th fixed chunk
// of expert e's routed rows in routed order, 32 rows per shared-memory stage, and writes its fp32 partial tile to
// partial[s, e]. Chunk bounds depend on offsets and shapes only; reduce_partials_kernel sums the S partials in
// ascending s and rounds once into the weights' dtype. Each output element is therefore produced by a fixed
// sequence of fp32 operations: bitwise reproducible, no atomics (split-K with an ordered reduction).
#include "moe_mlp.cuh"
#include "moe_mlp_common.cuh"

namespace fsosr {
namespace cuda {
namespace moe {
namespace detail {
namespace {

constexpr int kWeightTile = 64;   // output tile: 64 rows (a) x 64 columns (b)
constexpr int kWeightRows = 32;   // routed rows per shared-memory stage
constexpr int kTileA = kWeightTile / kWarps;  // 8 rows a per thread: a = ty + 8 i
constexpr int kTileB = kWeightTile / 32;      // 2 columns b per thread: b = tx + 32 j

struct WeightTile {
  bool first_layer;
  int64_t rows_a, cols_b, a0, b0;
};

// Output tiles: layer 1's ceil((d+1)/64) x ceil(h/64) tiles first, then layer 2's ceil((h+1)/64) x ceil(d_out/64).
__host__ __device__ inline int64_t layer1_tiles(const MoeProblem& p) {
  return ceil_div(p.d_in + 1, kWeightTile) * ceil_div(p.hidden, kWeightTile);
}
__host__ __device__ inline int64_t layer2_tiles(const MoeProblem& p) {
  return ceil_div(p.hidden + 1, kWeightTile) * ceil_div(p.d_out, kWeightTile);
}

__device__ inline WeightTile weight_tile(const MoeProblem& p, int64_t index) {
  const int64_t tiles1 = layer1_tiles(p);
  if (index < tiles1) {  // tiles1 > 0 implies hidden > 0, so the division is safe
    const int64_t nb = ceil_div(p.hidden, kWeightTile);
    return {true, p.d_in + 1, p.hidden, (index / nb) * kWeightTile, (index % nb) * kWeightTile};
  }
  index -= tiles1;
  const int64_t nb = ceil_div(p.d_out, kWeightTile);  // > 0: layer 2 tiles exist only when d_out > 0
  return {false, p.hidden + 1, p.d_out, (index / nb) * kWeightTile, (index % nb) * kWeightTile};
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) weights_kernel(const MoeProblem p, const Dropout drop_arg,
                                                           const T* __restrict__ grad_y,
                                                           const float* __restrict__ hidden_pre,
                                                           const float* __restrict__ dpre,
                                                           float* __restrict__ partial1,
                                                           float* __restrict__ partial2, int splits) {
  const Dropout drop = resolve_key(drop_arg);
  __shared__ RowTable<kWeightRows> rows;
  __shared__ float as[kWeightRows][kWeightTile];  // as[r][a]: read as[r][ty + 8 i], a warp-wide broadcast
  __shared__ float bs[kWeightRows][kWeightTile];  // bs[r][b]: read bs[r][tx + 32 j], conflict-free

  const int64_t e = blockIdx.y, split = blockIdx.z;
  const WeightTile w = weight_tile(p, blockIdx.x);
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t d = p.d_in, h = p.hidden, d_out = p.d_out;

  // This split's fixed chunk of the expert's segment (a multiple of kWeightRows, so stages never straddle splits).
  const Segment seg = expert_segment(p, e);
  const int64_t chunk = ceil_div(ceil_div(seg.end - seg.begin, splits), kWeightRows) * kWeightRows;
  const int64_t lo = seg.begin + split * chunk;
  const int64_t hi = lo + chunk < seg.end ? lo + chunk : seg.end;

  float acc[kTileA][kTileB];
#pragma unroll
  for (int i = 0; i < kTileA; ++i)
#pragma unroll
    for (int j = 0; j < kTileB; ++j) acc[i][j] = 0.f;

  for (int64_t r0 = lo; r0 < hi; r0 += kWeightRows) {
    rows.fill(p, e, r0, hi);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kWeightRows * kWeightTile; idx += kThreads) {
      const int r = idx / kWeightTile, c = idx % kWeightTile;
      const int64_t slot = rows.slot[r], a = w.a0 + c, b = w.b0 + c;
      float av = 0.f, bv = 0.f;
      if (slot >= 0) {
        if (w.first_layer) {
          av = a < d ? load<T>(p.x, rows.in[r] * d + a) : (a == d ? 1.f : 0.f);
          bv = b < h ? dpre[(r0 + r) * h + b] : 0.f;  // dpre is stored in routed-row order
        } else {
          const float sg = rows.gate_scale[r];
          if (a < h) {
            const int64_t at = slot * h + a;
            av = sg * (activate(hidden_pre[at], p.activation) * keep_multiplier(drop, uint64_t(at)));
          } else if (a == h) {
            av = sg;
          }
          bv = b < d_out ? load<T>(grad_y, rows.out[r] * d_out + b) : 0.f;
        }
      }
      as[r][c] = av;
      bs[r][c] = bv;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kWeightRows; ++r) {
      float bv[kTileB];
#pragma unroll
      for (int j = 0; j < kTileB; ++j) bv[j] = bs[r][tx + 32 * j];
#pragma unroll
      for (int i = 0; i < kTileA; ++i) {
        const float av = as[r][ty + kWarps * i];
#pragma unroll
        for (int j = 0; j < kTileB; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
      }
    }
    __syncthreads();  // rows, as and bs are rewritten by the next stage
  }

  // Every in-range element of the partial tile is written, zero for an empty chunk (the workspace is not
  // zero-filled).
  float* part = (w.first_layer ? partial1 : partial2) + ((split * p.experts + e) * w.rows_a) * w.cols_b;
#pragma unroll
  for (int i = 0; i < kTileA; ++i) {
    const int64_t a = w.a0 + ty + kWarps * i;
    if (a >= w.rows_a) continue;
#pragma unroll
    for (int j = 0; j < kTileB; ++j) {
      const int64_t b = w.b0 + tx + 32 * j;
      if (b < w.cols_b) part[a * w.cols_b + b] = acc[i][j];
    }
  }
}

// weight[e, a, b] (a < main_rows) or bias[e, b] (a == main_rows) = sum over s ascending of partial[s, e, a, b].
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) reduce_partials_kernel(const float* __restrict__ partial,
                                                                              int splits, int64_t experts,
                                                                              int64_t main_rows, int64_t cols,
                                                                              T* __restrict__ weight,
                                                                              T* __restrict__ bias) {
  const int64_t per_expert = (main_rows + 1) * cols;
  const int64_t per_split = experts * per_expert;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < per_split; idx += stride) {
    float s = partial[idx];
    for (int split = 1; split < splits; ++split) s += partial[split * per_split + idx];
    const int64_t e = idx / per_expert, rem = idx - e * per_expert;
    const int64_t a = rem / cols, b = rem - a * cols;
    if (a < main_rows) {
      weight[(e * main_rows + a) * cols + b] = from_float<T>(s);
    } else {
      bias[e * cols + b] = from_float<T>(s);
    }
  }
}

}  // namespace
}  // namespace detail

cudaError_t moe_mlp_backward_weights(const MoeProblem& p, const void* grad_y, const float* hidden_pre,
                                     const float* dpre, float* partial1, float* partial2, void* grad_w1,
                                     void* grad_b1, void* grad_w2, void* grad_b2, cudaStream_t stream) {
  using namespace detail;
  if (!valid_problem(p) || routed_rows(p) < 1 || p.experts > 65535) return cudaErrorInvalidValue;
  const int splits = weight_splits(p);
  const int64_t tiles = layer1_tiles(p) + layer2_tiles(p);
  const Dropout drop = make_dropout(p);
  return with_element_type(p.dtype, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    cudaError_t err = cudaSuccess;
    if (tiles > 0) {
      const dim3 grid(unsigned(tiles), unsigned(p.experts), unsigned(splits));
      weights_kernel<T><<<grid, kThreads, 0, stream>>>(p, drop, static_cast<const T*>(grad_y), hidden_pre, dpre,
                                                       partial1, partial2, splits);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    // Layer 1: [E, d_in + 1, hidden] -> grad_w1, grad_b1. Layer 2: [E, hidden + 1, d_out] -> grad_w2, grad_b2.
    const int64_t count1 = p.experts * (p.d_in + 1) * p.hidden, count2 = p.experts * (p.hidden + 1) * p.d_out;
    if (count1 > 0) {
      reduce_partials_kernel<T><<<elementwise_blocks(count1), kElementwiseThreads, 0, stream>>>(
          partial1, splits, p.experts, p.d_in, p.hidden, static_cast<T*>(grad_w1), static_cast<T*>(grad_b1));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (count2 > 0) {
      reduce_partials_kernel<T><<<elementwise_blocks(count2), kElementwiseThreads, 0, stream>>>(
          partial2, splits, p.experts, p.hidden, p.d_out, static_cast<T*>(grad_w2), static_cast<T*>(grad_b2));
      err = cudaGetLastError();
    }
    return err;
  });
}

}  // namespace moe
}  // namespace cuda
}  // namespace fsosr
