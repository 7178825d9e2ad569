// CPU kernels of fsosr::moe_mlp_fwd / moe_mlp_bwd (contract: docs/ops/moe_mlp.md, "Native op contract").
//
// Three paths, chosen by shape (the same rule in forward and backward):
// - by unit (G >= 16, e.g. per-sample routing): a unit's G rows are contiguous in x, so each (unit, slot) pair
//   is BLAS calls on views of x, y and the stacked weights, with no gathered [N*k*G, d] copy of x. GEMMs
//   accumulate straight into the unit's rows of y / grad_x (k slots in ascending j), so no atomics and no
//   per-unit scratch copies. Weight gradients are reduced per expert over its units in `order` sequence by a
//   single thread each: bitwise reproducible.
// - by expert (small G: per-token routing, FSMoE's per-expert inputs): gather each expert's rows, two GEMMs.
// - dense-masked (small E/k, moe_mlp_dense.cpp): every expert on every row as wide GEMMs.
#include "moe_mlp.h"

#include "gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <vector>

namespace fsosr {
namespace {

using namespace moe_cpu;

// The [G, d] block of x that slot (n, j) of expert e reads.
inline at::Tensor slot_rows(const at::Tensor& x, const Problem& p, int64_t n, int64_t e) {
  return p.per_expert_input ? x[e].narrow(0, n, 1) : x.narrow(0, n * p.group, p.group);
}

// The dropout key: a 0-d int64 tensor on the CPU (fsosr/ops/_rng.py seed_key_tensor makes it).
int64_t read_seed_key(const at::Tensor& seed_key) {
  TORCH_CHECK_VALUE(seed_key.defined() && seed_key.dim() == 0 && seed_key.scalar_type() == at::kLong,
                    "moe_mlp: seed_key must be a 0-d int64 tensor, got ",
                    seed_key.defined() ? seed_key.toString() + " of shape " + c10::str(seed_key.sizes()) : "none");
  TORCH_CHECK_VALUE(seed_key.device().is_cpu(), "moe_mlp: seed_key must be on the CPU, got ", seed_key.device());
  return seed_key.item<int64_t>();
}

Problem make_problem(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& w1, const at::Tensor& w2,
                     int64_t group_size, int64_t activation, double scale, double dropout,
                     const at::Tensor& seed_key, bool per_expert_input) {
  TORCH_CHECK_VALUE(w1.dim() == 3 && w2.dim() == 3, "moe_mlp: w1 and w2 must be [E, ., .]");
  TORCH_CHECK_VALUE(indices.dim() == 2, "moe_mlp: indices must be [N, k]");
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 3, "moe_mlp: activation code must be 0..3, got ", activation);
  TORCH_CHECK_VALUE(dropout >= 0 && dropout < 1, "moe_mlp: dropout must be in [0, 1), got ", dropout);
  Problem p{indices.size(0), indices.size(1), per_expert_input ? 1 : group_size, w1.size(1), w1.size(2),
            w2.size(2), w1.size(0), activation, scale, dropout, uint64_t(read_seed_key(seed_key)),
            per_expert_input};
  TORCH_CHECK_VALUE(p.group >= 1, "moe_mlp: group_size must be >= 1");
  if (per_expert_input) {
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == p.experts && x.size(1) == p.units && x.size(2) == p.d_in,
                      "moe_mlp: per-expert x must be [E, N, d], got ", x.sizes());
  } else {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == p.units * p.group && x.size(1) == p.d_in,
                      "moe_mlp: x must be [N*G, d] = [", p.units * p.group, ", ", p.d_in, "], got ", x.sizes());
  }
  TORCH_CHECK_VALUE(w2.size(0) == p.experts && w2.size(1) == p.hidden, "moe_mlp: w2 must be [E, h, d_out]");
  return p;
}

// Work queue over the threads: every thread takes the next task as soon as it is free (a shared atomic counter),
// instead of a static share of the range. A static split stalls on the slowest thread (uneven expert loads, or
// a thread descheduled on a busy machine: measured 3x slower at 2 threads than at 1 under load). A task is done
// whole by one thread, so results do not depend on which thread ran it or on the thread count.
// `run(thread_state, task)` is called with a per-thread object made by `make_state()`.
template <typename MakeState, typename Run>
void for_each_task(const std::vector<int64_t>& tasks, const MakeState& make_state, const Run& run) {
  if (tasks.empty()) return;
  std::atomic<int64_t> next{0};
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), int64_t(tasks.size()));
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    BelowAutograd below_autograd;
    auto state = make_state();
    for (int64_t i = next.fetch_add(1); i < int64_t(tasks.size()); i = next.fetch_add(1)) run(state, tasks[i]);
  });
}

std::vector<int64_t> all_tasks(int64_t count) {
  std::vector<int64_t> tasks(count);
  for (int64_t i = 0; i < count; ++i) tasks[i] = i;
  return tasks;
}

// Non-empty tasks, longest first (ties in index order), so the queue ends with the short ones.
std::vector<int64_t> tasks_longest_first(const std::vector<int64_t>& costs) {
  std::vector<int64_t> tasks;
  for (size_t i = 0; i < costs.size(); ++i) {
    if (costs[i] > 0) tasks.push_back(int64_t(i));
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  return tasks;
}

// Experts' costs: their number of routed (unit, slot) pairs.
std::vector<int64_t> expert_costs(const Problem& p, const int64_t* off, int64_t copies) {
  std::vector<int64_t> costs(p.experts * copies);
  for (int64_t i = 0; i < p.experts * copies; ++i) costs[i] = off[i % p.experts + 1] - off[i % p.experts];
  return costs;
}


// Rows of the (unit, slot) pairs routed to one expert: in the flattened [N*k*G, .] per-slot layout (row
// f*G + t for flat id f = n*k + j), and in x / grad_y (row n*G + t; row n of x[e] for per-expert input).
struct ExpertRows {
  at::Tensor slot_rows, x_rows;
};

ExpertRows expert_rows(const Problem& p, const int64_t* ord, int64_t begin, int64_t end) {
  std::vector<int64_t> slot_rows, x_rows;
  slot_rows.reserve((end - begin) * p.group);
  x_rows.reserve((end - begin) * p.group);
  for (int64_t q = begin; q < end; ++q) {
    const int64_t n = ord[q] / p.k;
    for (int64_t t = 0; t < p.group; ++t) {
      slot_rows.push_back(ord[q] * p.group + t);
      x_rows.push_back(p.per_expert_input ? n : n * p.group + t);
    }
  }
  auto as_tensor = [](std::vector<int64_t>& v) {
    return at::from_blob(v.data(), {int64_t(v.size())}, at::kLong).clone();
  };
  return {as_tensor(slot_rows), as_tensor(x_rows)};
}

// y for small G: per-slot outputs by expert, then the gated sum over slots.
template <typename acc_t>
void forward_by_expert(const Problem& p, const at::Tensor& x, const at::Tensor& gates, const int64_t* ord,
                       const int64_t* off, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2, at::Tensor& hidden_pre, at::Tensor& y) {
  const auto acc = w1.scalar_type();
  // Explicit row counts, not -1: a view with -1 cannot infer a size when a width is 0.
  at::Tensor pre_flat = hidden_pre.view({p.units * p.k * p.group, p.hidden});
  // Every (unit, slot) is routed to exactly one expert, so every row of slot_out is written: no zero-fill.
  at::Tensor slot_out = at::empty({p.units * p.k * p.group, p.d_out}, w1.options());
  for_each_task(tasks_longest_first(expert_costs(p, off, 1)), [] { return 0; }, [&](int, int64_t e) {
    const ExpertRows rows = expert_rows(p, ord, off[e], off[e + 1]);
    const at::Tensor xe = (p.per_expert_input ? x[e] : x).index_select(0, rows.x_rows).to(acc);
    at::Tensor pre = at::empty({xe.size(0), p.hidden}, w1.options());
    cpu_gemm::addmm_into(pre, b1[e], xe, w1[e]);
    at::Tensor hid = at::empty_like(pre), keep = at::empty({p.group * p.hidden}, pre.options());
    const int64_t block = p.group * p.hidden;
    for (int64_t q = off[e]; q < off[e + 1]; ++q) {
      const int64_t s = q - off[e];
      hidden_forward<acc_t>(p, dropout_base(p, ord[q] / p.k, ord[q] % p.k), block, acc_t(1),
                            pre.data_ptr<acc_t>() + s * block, hid.data_ptr<acc_t>() + s * block,
                            keep.data_ptr<acc_t>());
    }
    pre_flat.index_copy_(0, rows.slot_rows, pre);
    at::Tensor out = at::empty({hid.size(0), p.d_out}, w1.options());
    cpu_gemm::addmm_into(out, b2[e], hid, w2[e]);
    slot_out.index_copy_(0, rows.slot_rows, out);
  });
  const at::Tensor weights = (gates * p.scale).view({p.units, p.k, 1, 1});
  y.copy_((slot_out.view({p.units, p.k, p.group, p.d_out}) * weights).sum(1).view(y.sizes()));
}

// Zero the weight gradients of experts no unit picked (the others are written whole by their task), with plain
// fills: zero-filling all of them first was a full extra pass over FSMoE's 87 MB of gradients, and each ATen zero_
// would be a parallel region of its own, which costs a scheduler time slice when the other core is busy.
template <typename acc_t>
void zero_empty_experts(const Problem& p, const int64_t* off, std::initializer_list<at::Tensor*> grads) {
  for (int64_t e = 0; e < p.experts; ++e) {
    if (off[e] != off[e + 1]) continue;
    for (at::Tensor* t : grads) {
      // Per-expert size from numel, not stride(0): a tensor with a zero-width dimension (d, h or d_out = 0) has
      // no elements but a nonzero stride.
      const int64_t per_expert = t->numel() / p.experts;
      if (per_expert == 0) continue;
      acc_t* begin = t->data_ptr<acc_t>() + e * per_expert;
      std::fill(begin, begin + per_expert, acc_t(0));
    }
  }
}

// All gradients for small G, by expert: one block of the expert's rows, four GEMMs, per-slot grad_x rows.
// w1t [E, h, d_in] and w2t [E, d_out, h]: the weights transposed (copies or views, see copy_transposed_weights).
template <typename acc_t>
void backward_by_expert(const Problem& p, const at::Tensor& x, const at::Tensor& grad_y, const acc_t* gate,
                        const int64_t* ord, const int64_t* off, const at::Tensor& w1t, const at::Tensor& w2t,
                        const at::Tensor& b2, const at::Tensor& hidden_pre, at::Tensor& grad_x, acc_t* grad_gate,
                        at::Tensor& grad_w1, at::Tensor& grad_b1, at::Tensor& grad_w2, at::Tensor& grad_b2) {
  const auto acc = w1t.scalar_type();
  const at::Tensor pre_flat = hidden_pre.view({p.units * p.k * p.group, p.hidden});
  const at::Tensor grad_y_rows = grad_y.view({grad_y.size(0), p.d_out});  // y is [rows, d_out] in both forms
  // Every row of slot_dx is written (each (unit, slot) has one expert): no zero-fill.
  at::Tensor slot_dx = p.per_expert_input ? at::Tensor() : at::empty({p.units * p.k * p.group, p.d_in}, w1t.options());
  for_each_task(tasks_longest_first(expert_costs(p, off, 1)), [] { return 0; }, [&](int, int64_t e) {
    const ExpertRows rows = expert_rows(p, ord, off[e], off[e + 1]);
    const at::Tensor xe = (p.per_expert_input ? x[e] : x).index_select(0, rows.x_rows).to(acc);
    const at::Tensor dy = grad_y_rows.index_select(0, rows.x_rows);      // y rows are x rows (see ExpertRows)
    const at::Tensor pre = pre_flat.index_select(0, rows.slot_rows);
    at::Tensor hid = at::empty_like(pre), keep = at::empty({p.group * p.hidden}, pre.options());
    at::Tensor dy_w2 = at::empty({dy.size(0), p.hidden}, w1t.options());
    cpu_gemm::matmul_into(dy_w2, dy, w2t[e], /*accumulate=*/false);
    const at::Tensor dy_b2 = dy.mv(b2[e]);
    at::Tensor dpre = at::empty_like(pre);
    at::Tensor row_factor = at::empty({pre.size(0), 1}, w1t.options());   // scale * gate of each row's slot
    const int64_t block = p.group * p.hidden;
    for (int64_t q = off[e]; q < off[e + 1]; ++q) {
      const int64_t s = q - off[e], n = ord[q] / p.k, j = ord[q] % p.k;
      const acc_t factor = acc_t(p.scale) * gate[ord[q]];
      // hid is stored times scale * gate: the grad_w2 GEMM below then needs no row scaling.
      acc_t dot = hidden_backward<acc_t>(p, dropout_base(p, n, j), block, factor, pre.data_ptr<acc_t>() + s * block,
                                         dy_w2.data_ptr<acc_t>() + s * block, hid.data_ptr<acc_t>() + s * block,
                                         dpre.data_ptr<acc_t>() + s * block, keep.data_ptr<acc_t>());
      for (int64_t t = 0; t < p.group; ++t) dot += dy_b2.data_ptr<acc_t>()[s * p.group + t];
      grad_gate[ord[q]] = acc_t(p.scale) * dot;
      for (int64_t t = 0; t < p.group; ++t) row_factor.data_ptr<acc_t>()[s * p.group + t] = factor;
    }
    cpu_gemm::matmul_tn_into(grad_w1[e], xe, dpre);
    grad_b1[e].copy_(dpre.sum(0));
    cpu_gemm::matmul_tn_into(grad_w2[e], hid, dy);
    grad_b2[e].copy_((dy * row_factor).sum(0));
    at::Tensor dxe = at::empty({dpre.size(0), p.d_in}, w1t.options());
    cpu_gemm::matmul_into(dxe, dpre, w1t[e], /*accumulate=*/false);
    if (p.per_expert_input) {
      grad_x[e].index_copy_(0, rows.x_rows, dxe);  // a unit picks an expert once: rows are distinct
    } else {
      slot_dx.index_copy_(0, rows.slot_rows, dxe);
    }
  });
  if (!p.per_expert_input) grad_x.copy_(slot_dx.view({p.units, p.k, p.group, p.d_in}).sum(1).view(grad_x.sizes()));
}

// x rows of slot (n, e) in the accumulation type: a pointer into x, or converted into `buffer` ([G, d_in]).
template <typename acc_t>
const acc_t* slot_rows_acc(const at::Tensor& x, const Problem& p, int64_t n, int64_t e, at::Tensor& buffer) {
  if (x.scalar_type() == buffer.scalar_type()) return slot_rows(x, p, n, e).template data_ptr<acc_t>();
  buffer.copy_(slot_rows(x, p, n, e));
  return buffer.template data_ptr<acc_t>();
}

// y for G >= kUnitPathMinGroup, by unit: y rows of unit n = bias row + sum_j (scale*g_j*hid_j) @ w2[e_j].
// GEMMs on raw row-major blocks (cpu_gemm::gemm: oneDNN's AVX-512 ukernel, see gemm.h).
template <typename acc_t>
void forward_by_unit(const Problem& p, const at::Tensor& x, const int64_t* idx, const acc_t* gate,
                     const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                     at::Tensor& hidden_pre, at::Tensor& y) {
  const bool direct = y.scalar_type() == w1.scalar_type();  // else the unit's rows are summed in scratch
  const acc_t *w1_data = w1.data_ptr<acc_t>(), *b1_data = b1.data_ptr<acc_t>();
  const acc_t *w2_data = w2.data_ptr<acc_t>(), *b2_data = b2.data_ptr<acc_t>();
  acc_t* pre_data = hidden_pre.data_ptr<acc_t>();
  struct Scratch {
    at::Tensor hid, keep, out, x;
    std::vector<acc_t> bias;
  };
  auto make_scratch = [&] {
    return Scratch{at::empty({p.group, p.hidden}, w1.options()), at::empty({p.group * p.hidden}, w1.options()),
                   direct ? at::Tensor() : at::empty({p.group, p.d_out}, w1.options()),
                   at::empty({p.group, p.d_in}, w1.options()), std::vector<acc_t>(p.d_out)};
  };
  for_each_task(all_tasks(p.units), make_scratch, [&](Scratch& s, int64_t n) {
    acc_t* out = direct ? y.data_ptr<acc_t>() + n * p.group * p.d_out : s.out.template data_ptr<acc_t>();
    acc_t* hid = s.hid.template data_ptr<acc_t>();
    // The b2 terms of all k slots are one row, written to every token before the GEMMs accumulate onto it.
    std::vector<acc_t>& bias = s.bias;
    std::fill(bias.begin(), bias.end(), acc_t(0));
    for (int64_t j = 0; j < p.k; ++j) {
      const acc_t coef = acc_t(p.scale) * gate[n * p.k + j];
      const acc_t* b = b2_data + idx[n * p.k + j] * p.d_out;
      for (int64_t c = 0; c < p.d_out; ++c) bias[c] += coef * b[c];
    }
    for (int64_t t = 0; t < p.group; ++t) std::copy(bias.begin(), bias.end(), out + t * p.d_out);
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t e = idx[n * p.k + j];
      acc_t* pre = pre_data + (n * p.k + j) * p.group * p.hidden;
      const acc_t* bias1 = b1_data + e * p.hidden;
      for (int64_t t = 0; t < p.group; ++t) std::copy(bias1, bias1 + p.hidden, pre + t * p.hidden);
      cpu_gemm::gemm(p.group, p.hidden, p.d_in, slot_rows_acc<acc_t>(x, p, n, e, s.x), p.d_in,
                     w1_data + e * p.d_in * p.hidden, p.hidden, pre, p.hidden, /*accumulate=*/true);
      hidden_forward<acc_t>(p, dropout_base(p, n, j), p.group * p.hidden, acc_t(p.scale) * gate[n * p.k + j], pre,
                            hid, s.keep.template data_ptr<acc_t>());
      cpu_gemm::gemm(p.group, p.d_out, p.hidden, hid, p.hidden, w2_data + e * p.hidden * p.d_out, p.d_out, out,
                     p.d_out, /*accumulate=*/true);
    }
    if (!direct) y.narrow(0, n * p.group, p.group).copy_(s.out);
  });
}

std::tuple<at::Tensor, at::Tensor> moe_mlp_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& indices_in, const at::Tensor& gates_in, const at::Tensor& order,
    const at::Tensor& offsets, const at::Tensor& w1_in, const at::Tensor& b1_in, const at::Tensor& w2_in,
    const at::Tensor& b2_in, int64_t group_size, int64_t activation, double scale, double dropout,
    const at::Tensor& seed_key, bool per_expert_input) {
  const Problem p = make_problem(x_in, indices_in, w1_in, w2_in, group_size, activation, scale, dropout, seed_key,
                                 per_expert_input);
  BelowAutograd below_autograd;
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Weights in the accumulation type once per call (a no-op for fp32/fp64); x converted per slot block.
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.to(acc).contiguous(), b1 = b1_in.to(acc).contiguous();
  const at::Tensor w2 = w2_in.to(acc).contiguous(), b2 = b2_in.to(acc).contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous(), gates = gates_in.to(acc).contiguous();
  at::Tensor hidden_pre = at::empty({p.units, p.k, p.group, p.hidden}, x.options().dtype(acc));
  at::Tensor y = at::empty(per_expert_input ? std::vector<int64_t>{p.units, p.d_out}
                                            : std::vector<int64_t>{p.units * p.group, p.d_out},
                           x.options());
  if (use_dense_masked(p)) {
    dense_forward(p, x, indices, gates, w1, b1, w2, b2, hidden_pre, y);
    return {y, hidden_pre};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_mlp_fwd_cpu", [&] {
    using acc_t = scalar_t;
    if (p.group < kUnitPathMinGroup) {
      const at::Tensor ord = order.to(at::kLong).contiguous(), off = offsets.to(at::kLong).contiguous();
      forward_by_expert<acc_t>(p, x, gates, ord.data_ptr<int64_t>(), off.data_ptr<int64_t>(), w1, b1, w2, b2,
                               hidden_pre, y);
    } else {
      forward_by_unit<acc_t>(p, x, indices.data_ptr<int64_t>(), gates.data_ptr<acc_t>(), w1, b1, w2, b2,
                             hidden_pre, y);
    }
  });
  return {y, hidden_pre};
}

// Backward pass A for G >= kUnitPathMinGroup, by unit: grad_gates, grad_pre (d loss / d pre-activation),
// hidden_scaled (scale * gate * drop(act(pre)), for grad_w2), the column sums of grad_y per unit and of
// grad_pre per slot (for the bias gradients), and grad_x, whose k slots accumulate into the unit's rows.
// w1t [E, h, d_in] and w2t [E, d_out, h]: the weights transposed (copies or views, see copy_transposed_weights).
template <typename acc_t>
void backward_units(const Problem& p, const at::Tensor& grad_y, const int64_t* idx, const acc_t* gate,
                    const at::Tensor& w1t, const at::Tensor& w2t, const at::Tensor& b2, const at::Tensor& hidden_pre,
                    at::Tensor& grad_x, acc_t* grad_gate, at::Tensor& grad_pre, at::Tensor& hidden_scaled,
                    at::Tensor& dy_sums, at::Tensor& dpre_sums) {
  const bool direct = grad_x.scalar_type() == w1t.scalar_type();
  const acc_t* pre_data = hidden_pre.data_ptr<acc_t>();
  acc_t *dpre_data = grad_pre.data_ptr<acc_t>(), *hs_data = hidden_scaled.data_ptr<acc_t>();
  struct Scratch {
    at::Tensor dy_w2, keep, dx;
  };
  auto make_scratch = [&] {
    return Scratch{at::empty({p.group, p.hidden}, w1t.options()), at::empty({p.group * p.hidden}, w1t.options()),
                   direct ? at::Tensor() : at::empty({p.group, p.d_in}, w1t.options())};
  };
  for_each_task(all_tasks(p.units), make_scratch, [&](Scratch& s, int64_t n) {
    const at::Tensor dy_rows = grad_y.narrow(0, n * p.group, p.group);
    const acc_t* dy = dy_rows.data_ptr<acc_t>();
    acc_t* dy_sum = dy_sums.data_ptr<acc_t>() + n * p.d_out;
    std::fill(dy_sum, dy_sum + p.d_out, acc_t(0));
    for (int64_t t = 0; t < p.group; ++t) {
      for (int64_t c = 0; c < p.d_out; ++c) dy_sum[c] += dy[t * p.d_out + c];
    }
    const at::Tensor dx = direct ? grad_x.narrow(0, n * p.group, p.group) : s.dx;
    acc_t* dy_w2 = s.dy_w2.template data_ptr<acc_t>();
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t e = idx[n * p.k + j], block = (n * p.k + j) * p.group * p.hidden;
      cpu_gemm::matmul_into(s.dy_w2, dy_rows, w2t[e], /*accumulate=*/false);
      const acc_t factor = acc_t(p.scale) * gate[n * p.k + j];
      acc_t* dp = dpre_data + block;
      acc_t dot = hidden_backward<acc_t>(p, dropout_base(p, n, j), p.group * p.hidden, factor, pre_data + block,
                                         dy_w2, hs_data + block, dp, s.keep.template data_ptr<acc_t>());
      const acc_t* b = b2.data_ptr<acc_t>() + e * p.d_out;
      for (int64_t c = 0; c < p.d_out; ++c) dot += dy_sum[c] * b[c];
      grad_gate[n * p.k + j] = acc_t(p.scale) * dot;
      acc_t* dp_sum = dpre_sums.data_ptr<acc_t>() + (n * p.k + j) * p.hidden;
      std::fill(dp_sum, dp_sum + p.hidden, acc_t(0));
      for (int64_t t = 0; t < p.group; ++t) {
        for (int64_t c = 0; c < p.hidden; ++c) dp_sum[c] += dp[t * p.hidden + c];
      }
      cpu_gemm::matmul_into(dx, grad_pre[n][j].view({p.group, p.hidden}), w1t[e], /*accumulate=*/j > 0);
    }
    if (!direct) grad_x.narrow(0, n * p.group, p.group).copy_(s.dx);
  });
}

// Backward pass B for G >= kUnitPathMinGroup: weight gradients, each summed over its expert's (unit, slot)
// pairs in `order` sequence by one thread. Tasks are (matrix, expert): task e < E is grad_w1[e], task E + e is
// grad_w2[e], taken from a longest-first work queue. The GEMMs take the [G, h] blocks transposed into per-thread
// scratch ([h, G]: row-major operands, see gemm.h); grad_w1[e] is summed transposed ([h, d_in]) and transposed
// once at the end of its task. The first GEMM of a task overwrites, so nothing is zero-filled first.
template <typename acc_t>
void backward_weights(const Problem& p, const at::Tensor& x, const at::Tensor& grad_y, const acc_t* gate,
                      const int64_t* ord, const int64_t* off, const at::Tensor& grad_pre,
                      const at::Tensor& hidden_scaled, const at::Tensor& dy_sums, const at::Tensor& dpre_sums,
                      at::Tensor& grad_w1, at::Tensor& grad_b1, at::Tensor& grad_w2, at::Tensor& grad_b2) {
  zero_empty_experts<acc_t>(p, off, {&grad_w1, &grad_b1, &grad_w2, &grad_b2});  // empty experts are not queued
  struct Scratch {
    at::Tensor block_t, dw1_t, x;
  };
  auto make_scratch = [&] {
    return Scratch{at::empty({p.hidden, p.group}, grad_w1.options()), at::empty({p.hidden, p.d_in}, grad_w1.options()),
                   at::empty({p.group, p.d_in}, grad_w1.options())};
  };
  const acc_t *dpre_data = grad_pre.data_ptr<acc_t>(), *hs_data = hidden_scaled.data_ptr<acc_t>();
  for_each_task(tasks_longest_first(expert_costs(p, off, 2)), make_scratch, [&](Scratch& s, int64_t task) {
    const bool first_layer = task < p.experts;
    const int64_t e = first_layer ? task : task - p.experts;
    const int64_t width = first_layer ? p.hidden : p.d_out;
    acc_t* db = (first_layer ? grad_b1 : grad_b2).data_ptr<acc_t>() + e * width;
    std::fill(db, db + width, acc_t(0));
    acc_t* block_t = s.block_t.template data_ptr<acc_t>();
    for (int64_t q = off[e]; q < off[e + 1]; ++q) {
      const int64_t n = ord[q] / p.k, block = ord[q] * p.group * p.hidden;
      const bool first = q == off[e];
      cpu_gemm::transpose(p.group, p.hidden, (first_layer ? dpre_data : hs_data) + block, p.hidden, block_t,
                          p.group);
      if (first_layer) {
        cpu_gemm::gemm(p.hidden, p.d_in, p.group, block_t, p.group, slot_rows_acc<acc_t>(x, p, n, e, s.x), p.d_in,
                       s.dw1_t.template data_ptr<acc_t>(), p.d_in, /*accumulate=*/!first);
        const acc_t* sums = dpre_sums.data_ptr<acc_t>() + ord[q] * p.hidden;
        for (int64_t c = 0; c < width; ++c) db[c] += sums[c];
      } else {
        cpu_gemm::gemm(p.hidden, p.d_out, p.group, block_t, p.group, grad_y.data_ptr<acc_t>() + n * p.group * p.d_out,
                       p.d_out, grad_w2.data_ptr<acc_t>() + e * p.hidden * p.d_out, p.d_out, /*accumulate=*/!first);
        const acc_t factor = acc_t(p.scale) * gate[ord[q]];
        const acc_t* sums = dy_sums.data_ptr<acc_t>() + n * p.d_out;
        for (int64_t c = 0; c < width; ++c) db[c] += factor * sums[c];
      }
    }
    if (first_layer) {
      cpu_gemm::transpose(p.hidden, p.d_in, s.dw1_t.template data_ptr<acc_t>(), p.d_in,
                          grad_w1.data_ptr<acc_t>() + e * p.d_in * p.hidden, p.hidden);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const at::Tensor& order_in, const at::Tensor& offsets_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& b2_in, const at::Tensor& hidden_pre_in, int64_t group_size,
    int64_t activation, double scale, double dropout, const at::Tensor& seed_key, bool per_expert_input) {
  const Problem p = make_problem(x_in, indices_in, w1_in, w2_in, group_size, activation, scale, dropout, seed_key,
                                 per_expert_input);
  BelowAutograd below_autograd;
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.to(acc).contiguous(), w2 = w2_in.to(acc).contiguous();
  const at::Tensor b2 = b2_in.to(acc).contiguous();
  const at::Tensor grad_y = grad_y_in.to(acc).contiguous(), hidden_pre = hidden_pre_in.to(acc).contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous(), gates = gates_in.to(acc).contiguous();
  const at::Tensor order = order_in.to(at::kLong).contiguous(), offsets = offsets_in.to(at::kLong).contiguous();
  const bool dense = use_dense_masked(p);
  const bool unit_path = p.group >= kUnitPathMinGroup && !dense;
  // grad_x is written in x's dtype directly where that is the accumulation type (the unit path's GEMMs
  // accumulate into it); the by-expert path needs zeros (per-expert input rows not picked stay 0).
  at::Tensor grad_x = unit_path || dense ? at::empty_like(x) : at::zeros_like(x, x.options().dtype(acc));
  at::Tensor grad_gates = at::empty({p.units, p.k}, gates.options());
  at::Tensor grad_w1 = at::empty_like(w1), grad_b1 = at::empty({p.experts, p.hidden}, w1.options());
  at::Tensor grad_w2 = at::empty_like(w2), grad_b2 = at::empty_like(b2);
  if (dense) {
    dense_backward(p, x, grad_y, indices, gates, w1, w2, b2, hidden_pre, grad_x, grad_gates, grad_w1, grad_b1,
                   grad_w2, grad_b2);
  } else {
    AT_DISPATCH_FLOATING_TYPES(acc, "moe_mlp_bwd_cpu", [&] {
      using acc_t = scalar_t;
      const acc_t* gate = gates.data_ptr<acc_t>();
      acc_t* grad_gate = grad_gates.data_ptr<acc_t>();
      const int64_t* ord = order.data_ptr<int64_t>();
      const int64_t* off = offsets.data_ptr<int64_t>();
      // The weights transposed for the grad_x and dy @ w2^T GEMMs: a row-major copy where it pays (see
      // copy_transposed_weights), else views.
      const bool copy = copy_transposed_weights(p, /*dense=*/false);
      const at::Tensor w1t = copy ? w1.transpose(1, 2).contiguous() : w1.transpose(1, 2);
      const at::Tensor w2t = copy ? w2.transpose(1, 2).contiguous() : w2.transpose(1, 2);
      if (!unit_path) {
        zero_empty_experts<acc_t>(p, off, {&grad_w1, &grad_b1, &grad_w2, &grad_b2});
        backward_by_expert<acc_t>(p, x, grad_y, gate, ord, off, w1t, w2t, b2, hidden_pre, grad_x, grad_gate,
                                  grad_w1, grad_b1, grad_w2, grad_b2);
        return;
      }
      at::Tensor grad_pre = at::empty_like(hidden_pre), hidden_scaled = at::empty_like(hidden_pre);
      at::Tensor dy_sums = at::empty({p.units, p.d_out}, w1.options());
      at::Tensor dpre_sums = at::empty({p.units, p.k, p.hidden}, w1.options());
      backward_units<acc_t>(p, grad_y, indices.data_ptr<int64_t>(), gate, w1t, w2t, b2, hidden_pre, grad_x,
                            grad_gate, grad_pre, hidden_scaled, dy_sums, dpre_sums);
      backward_weights<acc_t>(p, x, grad_y, gate, ord, off, grad_pre, hidden_scaled, dy_sums, dpre_sums, grad_w1,
                              grad_b1, grad_w2, grad_b2);
    });
  }
  return {grad_x.to(x_in.scalar_type()), grad_gates.to(gates_in.scalar_type()), grad_w1.to(w1_in.scalar_type()),
          grad_b1.to(b1_in.scalar_type()), grad_w2.to(w2_in.scalar_type()), grad_b2.to(b2_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CPU, m) {
  m.impl("moe_mlp_fwd", &moe_mlp_fwd_cpu);
  m.impl("moe_mlp_bwd", &moe_mlp_bwd_cpu);
}

}  // namespace fsosr
