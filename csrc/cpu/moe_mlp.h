// Shared pieces of the CPU moe_mlp kernels (contract: docs/ops/moe_mlp.md, "Native op contract"):
// the problem description, the activations, and the elementwise hidden-layer kernels that both the routed
// path (moe_mlp.cpp) and the dense-masked path (moe_mlp_dense.cpp) use.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace fsosr {
namespace moe_cpu {

// The kernels compute their own gradients: ATen calls inside them (on views of tensors that may require grad)
// must not record autograd history. Set in every worker thread, since thread-local dispatch state is per thread.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

enum Activation : int64_t { kRelu = 0, kGelu = 1, kQuickGelu = 2, kIdentity = 3 };

struct Problem {
  int64_t units, k, group, d_in, hidden, d_out, experts;
  int64_t activation;
  double scale, dropout;
  uint64_t seed_key;
  bool per_expert_input;
};

// Small routing groups (G < kUnitPathMinGroup: per-token routing, FSMoE's per-expert inputs) would make the
// per-unit path a series of matrix-vector products; they are computed by expert instead: gather the expert's
// rows into one block, two GEMMs, and scatter results into per-slot buffers that are then summed over slots.
constexpr int64_t kUnitPathMinGroup = 16;

template <typename acc_t>
inline acc_t activate(acc_t v, int64_t activation) {
  switch (activation) {
    case kRelu: return v > 0 ? v : acc_t(0);
    case kGelu: return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
    case kQuickGelu: return v / (acc_t(1) + std::exp(acc_t(-1.702) * v));
    default: return v;
  }
}

template <typename acc_t>
inline acc_t activation_slope(acc_t v, int64_t activation) {
  switch (activation) {
    case kRelu: return v > 0 ? acc_t(1) : acc_t(0);
    case kGelu:
      return acc_t(0.5) * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2))) +
             v * std::exp(acc_t(-0.5) * v * v) * acc_t(0.3989422804014327);
    case kQuickGelu: {
      const acc_t s = acc_t(1) / (acc_t(1) + std::exp(acc_t(-1.702) * v));
      return s + acc_t(1.702) * v * s * (acc_t(1) - s);
    }
    default: return acc_t(1);
  }
}

// keep[i] = (dropout mask of counter base + i) / (1 - p) for i < count: the SplitMix64 hash of fsosr/ops/_rng.py,
// bit for bit. Vectorised with AVX-512 where the CPU has it (the hash is 64-bit multiplies, which the default
// x86-64 target cannot vectorise; scalar it costs about as much as a tenth of the GEMM time).
template <typename acc_t>
void dropout_keep_scale(const Problem& p, uint64_t base, int64_t count, acc_t* keep);

// Dropout counter of element (unit n, slot j, token 0, channel 0); element (t, c) adds t*h + c.
inline uint64_t dropout_base(const Problem& p, int64_t n, int64_t j) {
  return uint64_t((n * p.k + j) * p.group) * uint64_t(p.hidden);
}

// Forward epilogue of one (unit, slot) block of `count` hidden values:
// hid = coef * act(pre) * keep / (1 - p). `keep` is scratch of `count` values (unused without dropout).
template <typename acc_t>
void hidden_forward(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre, acc_t* hid,
                    acc_t* keep);

// Backward epilogue of one (unit, slot) block, given dyw = dy @ w2[e]^T:
// returns sum(hid * dyw) with hid = act(pre) * keep / (1 - p); writes hid_out = coef * hid (nullptr: skipped)
// and dpre = coef * dyw * keep / (1 - p) * act'(pre).
template <typename acc_t>
acc_t hidden_backward(const Problem& p, uint64_t base, int64_t count, acc_t coef, const acc_t* pre,
                      const acc_t* dyw, acc_t* hid_out, acc_t* dpre, acc_t* keep);

// The backward's grad_x and dy @ w2^T GEMMs read the weights transposed. A row-major transposed copy lets them
// run on oneDNN's AVX-512 ukernel (gemm.h: ~2.5x MKL's AVX2 sgemm per core on AMD), but the copy moves all
// E*d*h weights: it pays off when each expert's GEMMs see enough rows (~1.5e-11 s saved per row and weight vs
// ~1e-9 s per weight copied: >= 64 rows). FSMoE (32 images over 11 experts of 768x1536) does not: there the
// transposed views go to at::mm, which reads them in place (copying made its backward 1.8x slower).
inline bool copy_transposed_weights(const Problem& p, bool dense) {
  const int64_t rows = dense ? p.experts * p.units * p.group : p.units * p.k * p.group;
  return rows >= 64 * p.experts;
}

// The dense-masked formulation (moe_mlp_dense.cpp): every expert on every row as wide GEMMs, with the hidden
// columns of unselected experts zeroed through their gates. Same inputs, outputs and saved tensor as the routed
// path. `use_dense_masked` is the shape rule both directions evaluate, so backward follows forward.
bool use_dense_masked(const Problem& p);

void dense_forward(const Problem& p, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                   at::Tensor& hidden_pre, at::Tensor& y);

void dense_backward(const Problem& p, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& indices,
                    const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& hidden_pre, at::Tensor& grad_x, at::Tensor& grad_gates, at::Tensor& grad_w1,
                    at::Tensor& grad_b1, at::Tensor& grad_w2, at::Tensor& grad_b2);

}  // namespace moe_cpu
}  // namespace fsosr
