// Internals shared by the CUDA moe_mlp kernels: element access, the dropout hash, activations, the expert tile
// map, per-row routing references and the register-tiled SIMT product. Torch-free.
//
// Row numbering (the same as kernels/moe_mlp.py, so the three native backends read alike):
// - routed row rr in [0, R), R = N*k*G: token t = rr % G of the slot at position p = rr / G of `order`. Sorted by
//   expert, so expert e owns routed rows offsets[e]*G .. offsets[e+1]*G - 1 (its "segment").
// - slot row  q = (n*k + j)*G + t with flat = order[p] = n*k + j: row of hidden_pre [N, k, G, h], of per-slot
//   buffers, and the dropout counter base (counter = q*h + c).
// - output row n*G + t (y, grad_y; per-expert input: n) and input row (shared: n*G + t; per-expert: e*N + n).
// Rows are gathered on load through these references: no permuted copy of x, y or grad_y is ever made.
#pragma once

#include "element_access.cuh"
#include "moe_mlp.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fsosr {
namespace cuda {
namespace moe {
namespace detail {

// Block shape of the row kernels: 256 threads = 8 warps; a block owns kTileRows routed rows of one expert.
// Thread (warp ty, lane tx) owns rows ty + 8*i (i < kRowsPerThread) and columns tx + 32*j of every output tile:
// a warp then reads the same A element (broadcast) and 32 consecutive B elements (no bank conflicts), and all
// columns of a row live in one warp, so per-row sums are warp shuffles.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;
constexpr int kRowsPerThread = kTileRows / kWarps;  // 4
constexpr int kStepK = 16;       // K depth of one shared-memory stage
constexpr int kOutCols = 64;     // output columns per pass of the second product (d_out in forward, d_in in dx)
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 4096;  // grid-stride beyond this (a fixed grid: shapes only)

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------------------
// Element access: every kernel computes in fp32 and rounds once on store.
// ------------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float load(const void* base, int64_t index) {
  return to_float(static_cast<const T*>(base)[index]);
}

// ------------------------------------------------------------------------------------------------------------
// Dropout and activations (the CPU backend's formulas, in fp32)
// ------------------------------------------------------------------------------------------------------------
// Uniform in [0, 1) with 24 random bits: SplitMix64 of (counter XOR seed key), as fsosr/ops/_rng.py. uint64
// arithmetic wraps modulo 2^64 and its right shifts are logical, which is what the Python version emulates.
__device__ __forceinline__ float dropout_uniform(uint64_t counter, uint64_t seed_key) {
  uint64_t z = (counter ^ seed_key) * 0x9E3779B97F4A7C15ull + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(z >> 40) * (1.0f / 16777216.0f);  // exact: 24 bits
}

// Dropout parameters as the CPU computes them: the threshold rounded to fp32, 1/(1-p) computed in fp32 from
// (1-p) rounded to fp32. keep_scale is 1 and the hash is skipped when p == 0.
struct Dropout {
  bool active;
  float threshold, keep_scale;
  uint64_t seed_key;
  const int64_t* seed_key_ptr;  // when not null, the key is loaded from here (resolve_key) instead
};

inline Dropout make_dropout(const MoeProblem& p) {
  Dropout d;
  d.active = p.dropout > 0.0;
  d.threshold = float(p.dropout);
  d.keep_scale = d.active ? 1.0f / float(1.0 - p.dropout) : 1.0f;
  d.seed_key = p.seed_key;
  d.seed_key_ptr = p.seed_key_ptr;
  return d;
}

// The kernels' first step: the key a device pointer holds (one load per thread, before any multiplier).
__device__ __forceinline__ Dropout resolve_key(Dropout d) {
  if (d.active && d.seed_key_ptr != nullptr) d.seed_key = uint64_t(*d.seed_key_ptr);
  return d;
}

// The multiplier mask/(1-p) of hidden element `counter`.
__device__ __forceinline__ float keep_multiplier(const Dropout& d, uint64_t counter) {
  if (!d.active) return 1.0f;
  return dropout_uniform(counter, d.seed_key) >= d.threshold ? d.keep_scale : 0.0f;
}

__device__ __forceinline__ float activate(float v, int activation) {
  switch (activation) {
    case 0: return v > 0.f ? v : 0.f;
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: return v / (1.f + expf(-1.702f * v));
    default: return v;
  }
}

// d act / d pre; relu's slope is 0 at 0 (torch's convention).
__device__ __forceinline__ float activation_slope(float v, int activation) {
  switch (activation) {
    case 0: return v > 0.f ? 1.f : 0.f;
    case 1: return 0.5f * (1.f + erff(v * 0.70710678118654752f)) + v * expf(-0.5f * v * v) * 0.3989422804014327f;
    case 2: {
      const float s = 1.f / (1.f + expf(-1.702f * v));
      return s + 1.702f * v * s * (1.f - s);
    }
    default: return 1.f;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Expert segments and the tile map
// ------------------------------------------------------------------------------------------------------------
// Routed rows [begin, end) of expert e. Offsets are clamped into [0, N*k] and made non-decreasing per expert,
// so inconsistent routing metadata can make results wrong but never makes a kernel read out of bounds.
struct Segment {
  int64_t begin, end;
};

__device__ __forceinline__ Segment expert_segment(const MoeProblem& p, int64_t e) {
  const int64_t slots = p.units * p.k;
  int64_t b = p.offsets[e], en = p.offsets[e + 1];
  b = b < 0 ? 0 : (b > slots ? slots : b);
  en = en < b ? b : (en > slots ? slots : en);
  return {b * p.group, en * p.group};
}

// Tile `tile` of the expert-sorted rows: expert e's segment is cut into ceil(rows/kTileRows) tiles, experts in
// ascending order. Every block walks the E offsets itself (E is small; the loads hit L1/L2), so no tile map
// needs to be built or sized on the host. The grid is the upper bound ceil(R/kTileRows) + E; blocks past the
// last tile return false and exit.
struct Tile {
  int64_t expert, first, end;  // rows [first, min(first + kTileRows, end)) of the expert's segment
};

__device__ __forceinline__ bool find_tile(const MoeProblem& p, int64_t tile, Tile& out) {
  int64_t seen = 0;
  for (int64_t e = 0; e < p.experts; ++e) {
    const Segment s = expert_segment(p, e);
    const int64_t tiles = ceil_div(s.end - s.begin, kTileRows);
    if (tile < seen + tiles) {
      out = Tile{e, s.begin + (tile - seen) * kTileRows, s.end};
      return true;
    }
    seen += tiles;
  }
  return false;
}

inline int64_t row_tile_blocks(const MoeProblem& p) {
  return ceil_div(routed_rows(p), kTileRows) + p.experts;
}

// Where routed row rr of expert e reads and writes. slot < 0 marks an invalid row (past the segment, or an
// `order` entry out of range): it loads zeros and stores nothing.
struct RowRefs {
  int64_t slot, in, out;
  float gate_scale;  // scale * gates[n, j], rounded to fp32 once (the CPU's `factor`)
};

__device__ __forceinline__ RowRefs row_refs(const MoeProblem& p, int64_t e, int64_t rr, int64_t end) {
  RowRefs r{-1, 0, 0, 0.f};
  if (rr >= end) return r;
  const int64_t position = rr / p.group;
  const int64_t token = rr - position * p.group;
  const int64_t flat = p.order[position];  // n*k + j
  if (flat < 0 || flat >= p.units * p.k) return r;
  const int64_t n = flat / p.k;
  r.slot = flat * p.group + token;
  r.out = n * p.group + token;
  r.in = p.per_expert_input ? e * p.units + n : r.out;
  r.gate_scale = float(p.scale * double(p.gates[flat]));
  return r;
}

// Shared-memory copy of the references of a block's rows (filled by the first `count` threads).
template <int ROWS>
struct RowTable {
  int64_t slot[ROWS], in[ROWS], out[ROWS];
  float gate_scale[ROWS];

  __device__ __forceinline__ void fill(const MoeProblem& p, int64_t e, int64_t first, int64_t end) {
    for (int r = threadIdx.x; r < ROWS; r += blockDim.x) {
      const RowRefs refs = row_refs(p, e, first + r, end);
      slot[r] = refs.slot, in[r] = refs.in, out[r] = refs.out, gate_scale[r] = refs.gate_scale;
    }
  }
};

// ------------------------------------------------------------------------------------------------------------
// Register-tiled product: acc[i][j] += sum_kk a[(ty + 8 i) * A_STRIDE + kk] * b[kk * B_STRIDE + tx + 32 j]
// for kk < K. a and b point into shared memory; the caller brackets it with __syncthreads.
// ------------------------------------------------------------------------------------------------------------
template <int TN, int A_STRIDE, int B_STRIDE, int K>
__device__ __forceinline__ void tile_fma(float (&acc)[kRowsPerThread][TN], const float* a, const float* b, int ty,
                                         int tx) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    float bv[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = b[kk * B_STRIDE + tx + 32 * j];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float av = a[(ty + kWarps * i) * A_STRIDE + kk];
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
    }
  }
}

template <int TN>
__device__ __forceinline__ void zero(float (&acc)[kRowsPerThread][TN]) {
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the same sum, added in the same butterfly order: deterministic
}

// ------------------------------------------------------------------------------------------------------------
// Host-side dispatch
// ------------------------------------------------------------------------------------------------------------
template <typename F>
cudaError_t with_hidden_chunk(int chunk, F&& f) {
  switch (chunk) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}

inline unsigned elementwise_blocks(int64_t count) {
  const int64_t blocks = ceil_div(count, kElementwiseThreads);
  return unsigned(blocks < 1 ? 1 : (blocks > kMaxElementwiseBlocks ? kMaxElementwiseBlocks : blocks));
}

inline bool valid_problem(const MoeProblem& p) {
  return p.units >= 1 && p.k >= 1 && p.group >= 1 && p.experts >= 1 && p.d_in >= 0 && p.hidden >= 0 &&
         p.d_out >= 0 && p.activation >= 0 && p.activation <= 3 && p.dropout >= 0.0 && p.dropout < 1.0 &&
         row_tile_blocks(p) <= 0x7fffffff;
}

// out[(n*G + t), c] = sum over j = 0 .. k-1 (ascending) of slots[((n*k + j)*G + t), c], rounded to T. rows_out =
// N*G output rows of `width` columns. With k = 1 it is a cast. Defined in moe_mlp_forward.cu.
cudaError_t launch_sum_slots(ElementType type, const float* slots, void* out, int64_t rows_out, int64_t k,
                             int64_t group, int64_t width, cudaStream_t stream);

}  // namespace detail
}  // namespace moe
}  // namespace cuda
}  // namespace fsosr
