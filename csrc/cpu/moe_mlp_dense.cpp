// The dense-masked formulation of the CPU moe_mlp (declared in moe_mlp.h): every expert runs on every row as
// a few wide GEMMs (x @ [w1 of all experts], then [hidden of all experts] @ [w2 of all experts]); the hidden
// columns of experts a unit did not pick are zero, so they add nothing to y and get no gradient. It costs E/k
// times the routed FLOPs but no gathers and no per-unit GEMM calls, so it wins where E/k is small or the
// routed GEMMs are too small to run at BLAS speed (see use_dense_masked and docs/ops/moe_mlp.md).
//
// Same contract as the routed path: the saved tensor is hidden_pre [N, k, G, h] of the picked slots only, and
// dropout masks come from the same counters. Layout of the dense [rows, experts, h] buffers:
// shared input  x [N*G, d]: buffer [N*G, E, h] (row-major over rows, one GEMM over all E*h columns);
// per-expert input x [E, N, d]: buffer [E, N, h] (one batched GEMM, expert e over its own rows).
#include "moe_mlp.h"

#include "gemm.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

namespace fsosr {
namespace moe_cpu {
namespace {

struct DenseLayout {
  int64_t row_stride, expert_stride;  // offset of (row r, expert e) in a dense hidden buffer: r*rs + e*es
};

DenseLayout layout_of(const Problem& p) {
  if (p.per_expert_input) return {p.hidden, p.units * p.hidden};
  return {p.experts * p.hidden, p.hidden};
}

// [N, E] gates times scale, zero off the top-k (the dense formulation's mask).
at::Tensor dense_gates(const Problem& p, const at::Tensor& indices, const at::Tensor& gates) {
  return at::zeros({p.units, p.experts}, gates.options()).scatter_(1, indices, gates * p.scale);
}

// Hidden epilogues of the picked (unit, slot) blocks, row by row (a block's rows are strided in the dense
// buffer). Forward: copy pre into hidden_pre and write hid; backward: also dpre, hid * gate and grad_gates.
template <typename acc_t>
void dense_epilogue(const Problem& p, const int64_t* idx, const acc_t* gate, acc_t* dense_a, acc_t* dense_b,
                    acc_t* dense_c, acc_t* hidden_pre, const acc_t* dy_sums, const acc_t* b2, acc_t* grad_gate) {
  const DenseLayout lay = layout_of(p);
  const bool backward = grad_gate != nullptr;
  at::parallel_for(0, p.units, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> keep(p.hidden);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t e = idx[n * p.k + j];
        const acc_t coef = acc_t(p.scale) * gate[n * p.k + j];
        acc_t dot = 0;
        for (int64_t t = 0; t < p.group; ++t) {
          const int64_t at_dense = (n * p.group + t) * lay.row_stride + e * lay.expert_stride;
          acc_t* pre = hidden_pre + ((n * p.k + j) * p.group + t) * p.hidden;
          const uint64_t base = dropout_base(p, n, j) + uint64_t(t * p.hidden);
          if (!backward) {  // dense_a: pre (read), dense_b: hid (written)
            std::memcpy(pre, dense_a + at_dense, sizeof(acc_t) * p.hidden);
            hidden_forward<acc_t>(p, base, p.hidden, coef, pre, dense_b + at_dense, keep.data());
          } else {  // dense_a: dy @ w2^T (read), dense_b: dpre, dense_c: hid * scale * gate (written)
            dot += hidden_backward<acc_t>(p, base, p.hidden, coef, pre, dense_a + at_dense, dense_c + at_dense,
                                          dense_b + at_dense, keep.data());
          }
        }
        if (backward) {
          const acc_t* s = dy_sums + n * p.d_out;
          const acc_t* b = b2 + e * p.d_out;
          for (int64_t c = 0; c < p.d_out; ++c) dot += s[c] * b[c];
          grad_gate[n * p.k + j] = acc_t(p.scale) * dot;
        }
      }
    }
  });
}

// w1 [E, d, h] as one [d, E*h] matrix (column block e = expert e), the shared-input form's first GEMM operand.
at::Tensor w1_wide(const at::Tensor& w1) {
  return w1.permute({1, 0, 2}).reshape({w1.size(1), w1.size(0) * w1.size(2)});  // no -1: a width may be 0
}

}  // namespace

bool use_dense_masked(const Problem& p) {
  // FSOSR_MOE_MLP_PATH=dense|routed forces a path (benchmarks and tests compare both at one shape).
  if (const char* forced = std::getenv("FSOSR_MOE_MLP_PATH")) {
    if (std::strcmp(forced, "dense") == 0) return true;
    if (std::strcmp(forced, "routed") == 0) return false;
  }
  // Measured on a 2-core AVX-512 machine (table in docs/ops/moe_mlp.md): with k == E there is nothing to route
  // and the dense GEMMs win or tie at every shape. Otherwise dense costs E/k times the routed FLOPs; that only
  // pays off where the routed path is slow, i.e. for small groups (per-token routing, per-expert inputs: row
  // gathers, small per-expert GEMMs, weight-bandwidth-bound), and there only up to E/k = 1.5. For groups of
  // >= 16 rows (per-sample routing) the routed GEMMs run at full BLAS speed and dense already loses at E/k = 2.
  if (p.k == p.experts) return true;
  return p.group < kUnitPathMinGroup && 2 * p.experts <= 3 * p.k;
}

void dense_forward(const Problem& p, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                   at::Tensor& hidden_pre, at::Tensor& y) {
  const auto acc = w1.scalar_type();
  const at::Tensor xa = x.to(acc);
  // GEMMs through cpu_gemm (oneDNN's AVX-512 ukernel, see gemm.h); per-expert input: one per expert, in order.
  at::Tensor pre;
  if (p.per_expert_input) {
    pre = at::empty({p.experts, p.units, p.hidden}, xa.options());  // [E, N, h]
    for (int64_t e = 0; e < p.experts; ++e) cpu_gemm::addmm_into(pre[e], b1[e], xa[e], w1[e]);
  } else {
    pre = at::empty({xa.size(0), p.experts * p.hidden}, xa.options());  // [N*G, E*h]
    cpu_gemm::addmm_into(pre, b1.reshape({-1}), xa, w1_wide(w1));
  }
  at::Tensor hid = at::zeros_like(pre);  // unpicked experts' hidden units stay 0
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_mlp_dense_fwd", [&] {
    dense_epilogue<scalar_t>(p, indices.data_ptr<int64_t>(), gates.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(),
                             hid.data_ptr<scalar_t>(), nullptr, hidden_pre.data_ptr<scalar_t>(), nullptr, nullptr,
                             nullptr);
  });
  // The b2 terms: one row per unit, sum_e scale * gate_e * b2[e].
  const at::Tensor bias = [&] {                                     // [N, d_out]
    const cpu_gemm::SequentialBlas sequential;
    return dense_gates(p, indices, gates).mm(b2);
  }();
  at::Tensor out = y.scalar_type() == acc ? y : at::empty(y.sizes(), y.options().dtype(acc));
  if (p.per_expert_input) {
    out.copy_(bias);
    for (int64_t e = 0; e < p.experts; ++e) cpu_gemm::matmul_into(out, hid[e], w2[e], /*accumulate=*/true);
  } else {
    out.view({p.units, p.group, p.d_out}).copy_(bias.unsqueeze(1).expand({p.units, p.group, p.d_out}));
    cpu_gemm::matmul_into(out, hid, w2.reshape({p.experts * p.hidden, p.d_out}), /*accumulate=*/true);
  }
  if (!out.is_same(y)) y.copy_(out);
}

void dense_backward(const Problem& p, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& indices,
                    const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& hidden_pre, at::Tensor& grad_x, at::Tensor& grad_gates, at::Tensor& grad_w1,
                    at::Tensor& grad_b1, at::Tensor& grad_w2, at::Tensor& grad_b2) {
  const auto acc = w1.scalar_type();
  const at::Tensor xa = x.to(acc);
  // The weights transposed, as row-major copies where that pays (see copy_transposed_weights), else views:
  // w2^T [E, d_out, h] or [d_out, E*h], and w1^T [E, h, d_in] (the wide [E*h, d_in] one is a copy either way).
  const bool copy = copy_transposed_weights(p, /*dense=*/true);
  auto row_major_if_copy = [copy](const at::Tensor& t) { return copy ? t.contiguous() : t; };
  const at::Tensor w2t = row_major_if_copy(p.per_expert_input ? w2.transpose(1, 2)
                                                              : w2.reshape({p.experts * p.hidden, p.d_out}).t());
  const at::Tensor w1t = row_major_if_copy(w1.transpose(1, 2));
  at::Tensor dy_w2;
  if (p.per_expert_input) {
    dy_w2 = at::empty({p.experts, p.units, p.hidden}, w1.options());  // [E, N, h]
    for (int64_t e = 0; e < p.experts; ++e) cpu_gemm::matmul_into(dy_w2[e], grad_y, w2t[e], /*accumulate=*/false);
  } else {
    dy_w2 = at::empty({grad_y.size(0), p.experts * p.hidden}, w1.options());  // [N*G, E*h]
    cpu_gemm::matmul_into(dy_w2, grad_y, w2t, /*accumulate=*/false);
  }
  at::Tensor dpre = at::zeros_like(dy_w2), hid = at::zeros_like(dy_w2);
  const at::Tensor dy_sums = p.per_expert_input ? grad_y : grad_y.view({p.units, p.group, p.d_out}).sum(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_mlp_dense_bwd", [&] {
    dense_epilogue<scalar_t>(p, indices.data_ptr<int64_t>(), gates.data_ptr<scalar_t>(),
                             dy_w2.data_ptr<scalar_t>(), dpre.data_ptr<scalar_t>(), hid.data_ptr<scalar_t>(),
                             hidden_pre.data_ptr<scalar_t>(), dy_sums.data_ptr<scalar_t>(),
                             b2.data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>());
  });
  {
    const cpu_gemm::SequentialBlas sequential;
    grad_b2.copy_(dense_gates(p, indices, gates).t().mm(dy_sums));
  }
  at::Tensor dx = grad_x.scalar_type() == acc ? grad_x : at::empty(grad_x.sizes(), grad_x.options().dtype(acc));
  if (p.per_expert_input) {
    for (int64_t e = 0; e < p.experts; ++e) {
      cpu_gemm::matmul_into(dx[e], dpre[e], w1t[e], /*accumulate=*/false);
      cpu_gemm::matmul_tn_into(grad_w1[e], xa[e], dpre[e]);
      cpu_gemm::matmul_tn_into(grad_w2[e], hid[e], grad_y);
    }
    at::sum_out(grad_b1, dpre, {1});
  } else {
    cpu_gemm::matmul_into(dx, dpre, w1t.reshape({p.experts * p.hidden, p.d_in}), /*accumulate=*/false);
    const at::Tensor grad_w1_wide = at::empty({p.d_in, p.experts * p.hidden}, w1.options());
    cpu_gemm::matmul_tn_into(grad_w1_wide, xa, dpre);
    grad_w1.copy_(grad_w1_wide.view({p.d_in, p.experts, p.hidden}).permute({1, 0, 2}));
    at::sum_out(grad_b1, dpre.view({dpre.size(0), p.experts, p.hidden}), {0});
    cpu_gemm::matmul_tn_into(grad_w2.view({p.experts * p.hidden, p.d_out}), hid, grad_y);
  }
  if (!dx.is_same(grad_x)) grad_x.copy_(dx);
}

}  // namespace moe_cpu
}  // namespace fsosr
