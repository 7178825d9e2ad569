// Row-major GEMMs on oneDNN's brgemm ukernel (see gemm.h for why).
#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>

// MKL's thread-local thread count, through its Fortran-convention entry point (the argument by pointer), which
// libtorch_cpu exports where torch links MKL (null elsewhere). Not the C name: in torch's bundled MKL it is an
// alias of this same function, so passing the count by value there crashes.
extern "C" int mkl_set_num_threads_local_(const int*) __attribute__((weak));

namespace fsosr {
namespace cpu_gemm {

SequentialBlas::SequentialBlas() {
  if (mkl_set_num_threads_local_ != nullptr && !at::in_parallel_region()) {
    const int one = 1;
    previous_ = mkl_set_num_threads_local_(&one);
    pinned_ = true;
  }
}

SequentialBlas::~SequentialBlas() {
  if (pinned_) mkl_set_num_threads_local_(&previous_);   // 0 restores the global setting
}

namespace {

// Decomposition of C into blocks. B's column panel (K x nb) is kept to about 512 KiB so that it stays in L2
// while the row blocks stream past it (the ukernel does not pack B: an unsplit [768, 1536] B ran at half speed),
// but at least 64 columns wide (16-column panels of a deep K ran at 256 instead of 355 GFLOP/s); rows go in
// blocks of 128 where M is large, so both threads get work.
// The decomposition depends on the shape only: the same blocks run whatever the thread count.
constexpr int64_t kPanelFloats = int64_t(128) * 1024;
constexpr int64_t kRowBlock = 128;
constexpr int64_t kDepthBlock = 256;

struct Blocks {
  int64_t mb, nb, row_blocks, col_blocks;
};

[[maybe_unused]] Blocks blocks_of(int64_t M, int64_t N, int64_t K) {
  int64_t nb = N;
  if (K * N > kPanelFloats) nb = std::min(N, std::max<int64_t>(64, kPanelFloats / std::max<int64_t>(K, 1) / 16 * 16));
  const int64_t mb = M > 2 * kRowBlock ? kRowBlock : M;
  return {mb, nb, (M + mb - 1) / mb, (N + nb - 1) / nb};
}

at::Tensor view_of(const void* data, int64_t rows, int64_t cols, int64_t ld, at::ScalarType dtype) {
  return at::from_blob(const_cast<void*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

// out (+)= a @ b through ATen's matmul (BLAS): fp64, strided operands, and fp32 where brgemm is missing.
void aten_matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const SequentialBlas sequential;
  accumulate ? (void)out.addmm_(a, b) : (void)at::mm_out(out, a, b);
}

// The same on raw row-major blocks, viewed as tensors.
template <typename T>
void aten_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
               bool accumulate) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  aten_matmul_into(view_of(C, M, N, ldc, dtype), view_of(A, M, K, lda, dtype), view_of(B, K, N, ldb, dtype),
                   accumulate);
}

// Leading dimension of a row-major 2-D tensor, or -1 where it is not one (transposed or strided columns).
int64_t row_major_ld(const at::Tensor& t) {
  if (t.size(1) > 1 && t.stride(1) != 1) return -1;
  if (t.size(0) <= 1) return std::max<int64_t>(t.size(1), 1);
  return t.stride(0) >= t.size(1) ? t.stride(0) : -1;
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t r = 0; r < M; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
    }
    return;
  }
#ifndef CPUBLAS_BRGEMM_F32F32F32
  // torch builds older than the fp32 brgemm (DESIGN supports torch >= 2.6): ATen's BLAS gemm, same results.
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#else
  const Blocks b = blocks_of(M, N, K);
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      // Column-panel-major: a thread's consecutive tasks share B's panel.
      const int64_t cb = task / b.row_blocks, rb = task % b.row_blocks;
      const int64_t r0 = rb * b.mb, c0 = cb * b.nb;
      const int64_t rows = std::min(b.mb, M - r0), cols = std::min(b.nb, N - c0);
      // K in chunks: a depth that varies from call to call (an expert's routed rows, in weight gradients) would
      // otherwise JIT-compile and cache a new kernel per value (~60 us each, kept per thread for good).
      for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
        at::native::cpublas::brgemm(rows, cols, std::min(kDepthBlock, K - k0), lda, ldb, ldc, accumulate || k0 > 0,
                                    A + r0 * lda + k0, B + k0 * ldb + c0, C + r0 * ldc + c0, /*is_vnni=*/false);
      }
    }
  };
  const int64_t tasks = b.row_blocks * b.col_blocks;
  if (tasks == 1 || at::in_parallel_region()) {
    const SequentialBlas sequential;   // where brgemm falls back to BLAS (no oneDNN ukernel)
    run(0, tasks);
  } else {
    at::parallel_for(0, tasks, 1, run);
  }
#endif
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "matmul_into: shapes ", out.sizes(), " = ", a.sizes(), " @ ", b.sizes());
  TORCH_CHECK(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(),
              "matmul_into: operands of one dtype");
  const int64_t lda = row_major_ld(a), ldb = row_major_ld(b), ldc = row_major_ld(out);
  if (out.scalar_type() == at::kFloat && lda > 0 && ldb > 0 && ldc > 0) {
    gemm(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), lda, b.data_ptr<float>(), ldb,
         out.data_ptr<float>(), ldc, accumulate);
    return;
  }
  aten_matmul_into(out, a, b, accumulate);
}

void matmul_tn_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() != at::kFloat) {
    aten_matmul_into(out, a.t(), b, /*accumulate=*/false);
    return;
  }
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  if (K * M <= K * N + M * N) {
    matmul_into(out, a.t().contiguous(), b, /*accumulate=*/false);
    return;
  }
  const at::Tensor out_t = at::empty({N, M}, out.options());
  matmul_into(out_t, b.t().contiguous(), a, /*accumulate=*/false);
  at::Tensor o = out;
  o.copy_(out_t.t());
}

void addmm_into(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor o = out;
  o.copy_(bias.reshape({1, bias.numel()}).expand(out.sizes()));
  matmul_into(out, a, b, /*accumulate=*/true);
}

template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
}

namespace {

// fsosr::_cpu_gemm: the engine on its own (tests/ops/test_cpu_gemm.py, benchmarks/test_cpu_gemm.py).
at::Tensor cpu_gemm_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
                    "_cpu_gemm: expects a [M, K] and b [K, N], got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type() &&
                        (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
                    "_cpu_gemm: a and b must both be float32 or both float64, got ", a.scalar_type(), " and ",
                    b.scalar_type());
  at::Tensor out;
  if (c.has_value()) {
    TORCH_CHECK_VALUE(c->dim() == 2 && c->size(0) == a.size(0) && c->size(1) == b.size(1) &&
                          c->scalar_type() == a.scalar_type(),
                      "_cpu_gemm: c must be [", a.size(0), ", ", b.size(1), "] of a's dtype, got ", c->sizes(), " ",
                      c->scalar_type());
    out = c->clone(at::MemoryFormat::Contiguous);
  } else {
    out = at::empty({a.size(0), b.size(1)}, a.options());
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  matmul_into(out, a, b, /*accumulate=*/c.has_value());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) { m.impl("_cpu_gemm", &cpu_gemm_op); }

template void transpose<float>(int64_t, int64_t, const float*, int64_t, float*, int64_t);
template void transpose<double>(int64_t, int64_t, const double*, int64_t, double*, int64_t);

}  // namespace cpu_gemm
}  // namespace fsosr
