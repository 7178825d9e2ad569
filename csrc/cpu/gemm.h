// Row-major GEMMs for the CPU kernels: C[M,N] (+)= A[M,K] @ B[K,N] on blocks with leading dimensions.
//
// Why not at::mm: ATen's CPU matmul is MKL's sgemm, which takes its AVX2 code path on AMD CPUs. oneDNN's
// batch-reduce GEMM ukernel (reached through ATen's public at::native::cpublas::brgemm) JIT-compiles
// AVX-512 code wherever the CPU has it: on the 2-core AMD EPYC (Zen 5) dev machine, one thread runs
// [6304,768]@[768,64] at 199 GFLOP/s against MKL's 76 (2.6x), [6304,64]@[64,768] at 209 against 86. ATen
// itself falls back to its BLAS gemm where oneDNN's ukernel is unavailable or disabled
// (torch.backends.mkldnn.enabled = False), so results are the same GEMM either way.
//
// brgemm takes row-major operands only: callers lay out transposed operands themselves (a transposed copy of
// the weights once per call where it pays, a transposed per-thread copy of a small block), which costs far less
// than the GEMM time it saves. Anything else (fp64, strided operands) goes through at::mm.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fsosr {
namespace cpu_gemm {

// C = (accumulate ? C : 0) + A @ B. Each block of C is computed by one thread, in brgemm calls over K chunks of
// 256, on a decomposition that depends only on (M, N, K), so results do not depend on the thread count. Outside
// a parallel region the blocks are spread over ATen's threads; inside one (a worker's task) they run on the
// calling thread.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate);

// MKL splits a GEMM by its thread count, which changes the rounding: called from a worker's task it runs on one
// thread, called at top level (where a single task runs inline) on all of them. Every ATen BLAS call of these
// kernels holds this guard, which pins MKL to one thread outside a parallel region, so that results do not
// depend on the thread count. A no-op where torch has no MKL (the symbol is looked up weakly).
class SequentialBlas {
 public:
  SequentialBlas();
  ~SequentialBlas();
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool pinned_ = false;
  int previous_ = 0;
};

// Tensor form for 2-D tensors of one dtype: out (+)= a @ b. Row-major fp32 operands (unit column stride) take
// gemm(); anything else at::mm_out / addmm_.
void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// out = a^T @ b for a [K, M], b [K, N] (weight gradients: x^T @ dy). brgemm reads row-major operands only, so
// one operand is transposed into a copy first: a (K*M values), or b with the [N, M] result transposed back
// (K*N + M*N values), whichever moves less. fp64 and strided operands: at::mm_out.
void matmul_tn_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = bias (one row, broadcast) + a @ b.
void addmm_into(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);

// dst[c, r] = src[r, c] for a rows x cols block (leading dimensions ld_src, ld_dst), in cache-sized tiles, on
// the calling thread (it transposes small per-task blocks inside a worker's task).
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst);

}  // namespace cpu_gemm
}  // namespace fsosr
