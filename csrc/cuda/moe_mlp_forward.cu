// CUDA moe_mlp forward: one fused kernel per tile of expert-sorted routed rows, plus the slot combine.
//
// forward_kernel: a block owns kTileRows (32) routed rows of one expert e (tile map: moe_mlp_common.cuh). For each
// chunk of HS hidden columns (one chunk unless hidden > 128):
//   1. pre = x_rows @ w1[e][:, chunk] + b1[e][chunk]: x rows gathered through `order` straight into shared
//      memory, fp32 accumulation in registers; pre is stored to hidden_pre (the schema's saved tensor);
//   2. hid = act(pre) * dropout multiplier (counter hash, recomputed in backward), kept in shared memory;
//   3. out = hid @ w2[e][chunk, :] over d_out in kOutCols passes, + b2[e] on the first chunk; with several chunks
//      the fp32 partial goes to the block's own rows of the slot buffer and is read back by the same thread;
//   4. after the last chunk: out * (scale * gate), stored directly in y (k == 1, one chunk) or in the fp32 slot
//      buffer [N*k*G, d_out].
// sum_slots_kernel then writes y[n*G + t] = sum_j slot[(n*k + j)*G + t] in ascending j: each output value is
// written by one thread with a fixed summation order, so y is bitwise reproducible with no atomics.
#include "moe_mlp.cuh"
#include "moe_mlp_common.cuh"

namespace fsosr {
namespace cuda {
namespace moe {
namespace detail {
namespace {

template <typename T, int HS>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const MoeProblem p, const Dropout drop_arg,
                                                           float* __restrict__ hidden_pre, T* __restrict__ y,
                                                           float* __restrict__ slot_buffer, bool direct) {
  const Dropout drop = resolve_key(drop_arg);
  constexpr int TN = HS / 32;        // hidden columns per thread in step 1
  constexpr int TO = kOutCols / 32;  // output columns per thread in step 3
  __shared__ RowTable<kTileRows> rows;
  __shared__ float xs[kTileRows][kStepK + 1];  // gathered x tile; +1 keeps the row-wise stores off one bank
  __shared__ float w1s[kStepK][HS];            // w1[e][k0 + kk, h0 + c]
  __shared__ float hs[kTileRows][HS + 1];      // hidden activations of the chunk
  __shared__ float w2s[kStepK][kOutCols];      // w2[e][h0 + kh + kk, n0 + c]

  Tile tile;
  if (!find_tile(p, blockIdx.x, tile)) return;  // uniform per block: past the last tile of the upper-bound grid
  rows.fill(p, tile.expert, tile.first, tile.end);
  __syncthreads();

  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t e = tile.expert, d = p.d_in, h = p.hidden, d_out = p.d_out;
  const int64_t chunks = h > 0 ? ceil_div(h, HS) : 1;  // = hidden_chunks(p) on the host
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t h0 = chunk * HS;

    // 1. pre = x_rows @ w1[e][:, h0 : h0 + HS]
    float acc[kRowsPerThread][TN];
    zero(acc);
    for (int64_t k0 = 0; k0 < d; k0 += kStepK) {
      for (int idx = threadIdx.x; idx < kTileRows * kStepK; idx += kThreads) {
        const int r = idx / kStepK, kk = idx % kStepK;
        const int64_t col = k0 + kk;
        xs[r][kk] = (rows.slot[r] >= 0 && col < d) ? load<T>(p.x, rows.in[r] * d + col) : 0.f;
      }
      for (int idx = threadIdx.x; idx < kStepK * HS; idx += kThreads) {
        const int kk = idx / HS, c = idx % HS;  // c fastest: w1 rows are contiguous along the hidden axis
        const int64_t row = k0 + kk, col = h0 + c;
        w1s[kk][c] = (row < d && col < h) ? load<T>(p.w1, (e * d + row) * h + col) : 0.f;
      }
      __syncthreads();
      tile_fma<TN, kStepK + 1, HS, kStepK>(acc, &xs[0][0], &w1s[0][0], ty, tx);
      __syncthreads();
    }

    // 2. bias, save pre, activation and dropout. Padding columns and invalid rows hold 0 in hs.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + kWarps * i;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int c = tx + 32 * j;
        const int64_t col = h0 + c;
        float hid = 0.f;
        if (rows.slot[r] >= 0 && col < h) {
          const int64_t at = rows.slot[r] * h + col;  // also the dropout counter ((n*k + j)*G + t)*h + c
          const float pre = acc[i][j] + load<T>(p.b1, e * h + col);
          hidden_pre[at] = pre;
          hid = activate(pre, p.activation) * keep_multiplier(drop, uint64_t(at));
        }
        hs[r][c] = hid;
      }
    }
    __syncthreads();

    // 3./4. out = hid @ w2[e][h0 : h0 + HS, :], only over the K steps that hold real hidden columns.
    const int64_t live = h - h0 < HS ? (h - h0 > 0 ? h - h0 : 0) : HS;
    const int k_steps = int(ceil_div(live, kStepK));
    const bool last = chunk == chunks - 1;
    for (int64_t n0 = 0; n0 < d_out; n0 += kOutCols) {
      float out[kRowsPerThread][TO];
      zero(out);
      for (int ks = 0; ks < k_steps; ++ks) {
        const int kh = ks * kStepK;
        for (int idx = threadIdx.x; idx < kStepK * kOutCols; idx += kThreads) {
          const int kk = idx / kOutCols, c = idx % kOutCols;
          const int64_t row = h0 + kh + kk, col = n0 + c;
          w2s[kk][c] = (row < h && col < d_out) ? load<T>(p.w2, (e * h + row) * d_out + col) : 0.f;
        }
        __syncthreads();
        tile_fma<TO, HS + 1, kOutCols, kStepK>(out, &hs[0][kh], &w2s[0][0], ty, tx);
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + kWarps * i;
        if (rows.slot[r] < 0) continue;
#pragma unroll
        for (int j = 0; j < TO; ++j) {
          const int64_t col = n0 + tx + 32 * j;
          if (col >= d_out) continue;
          const int64_t dest = (direct ? rows.out[r] : rows.slot[r]) * d_out + col;
          // Chunk 0 starts from the bias; later chunks from this thread's own earlier partial (no other thread
          // writes this element, so no synchronisation is needed).
          const float v = out[i][j] + (chunk == 0 ? load<T>(p.b2, e * d_out + col) : slot_buffer[dest]);
          if (!last) {
            slot_buffer[dest] = v;
          } else if (direct) {
            y[dest] = from_float<T>(v * rows.gate_scale[r]);
          } else {
            slot_buffer[dest] = v * rows.gate_scale[r];
          }
        }
      }
    }
    __syncthreads();  // hs is rewritten by the next chunk
  }
}

template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) sum_slots_kernel(const float* __restrict__ slots,
                                                                        T* __restrict__ out, int64_t rows_out,
                                                                        int64_t k, int64_t group, int64_t width) {
  const int64_t total = rows_out * width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / width, col = idx - row * width;
    const int64_t n = row / group, t = row - n * group;
    const float* src = slots + ((n * k) * group + t) * width + col;  // slot j = 0 of output row (n, t)
    float acc = src[0];
    for (int64_t j = 1; j < k; ++j) acc += src[j * group * width];
    out[idx] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t launch_sum_slots(ElementType type, const float* slots, void* out, int64_t rows_out, int64_t k,
                             int64_t group, int64_t width, cudaStream_t stream) {
  const int64_t total = rows_out * width;
  if (total == 0) return cudaSuccess;
  return with_element_type(type, [&](auto element) {
    using T = decltype(element);
    sum_slots_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
        slots, static_cast<T*>(out), rows_out, k, group, width);
    return cudaGetLastError();
  });
}

}  // namespace detail

cudaError_t moe_mlp_forward(const MoeProblem& p, float* hidden_pre, void* y, float* slot_buffer,
                            cudaStream_t stream) {
  using namespace detail;
  if (!valid_problem(p) || routed_rows(p) < 1) return cudaErrorInvalidValue;
  const bool direct = forward_writes_y_directly(p);
  if (!direct && slot_buffer == nullptr) return cudaErrorInvalidValue;
  const Dropout drop = make_dropout(p);
  const unsigned blocks = unsigned(row_tile_blocks(p));
  cudaError_t err = with_element_type(p.dtype, [&](auto element) {
    using T = decltype(element);
    return with_hidden_chunk(hidden_chunk(p), [&](auto chunk) {
      constexpr int HS = decltype(chunk)::value;
      forward_kernel<T, HS><<<blocks, kThreads, 0, stream>>>(p, drop, hidden_pre, static_cast<T*>(y), slot_buffer,
                                                            direct);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess || direct) return err;
  // Output rows: N*G (per-expert input: G = 1, so N).
  return launch_sum_slots(p.dtype, slot_buffer, y, p.units * p.group, p.k, p.group, p.d_out, stream);
}

}  // namespace moe
}  // namespace cuda
}  // namespace fsosr
