// Torch glue of the CUDA moe_mlp kernels: validates, allocates outputs and workspaces, and calls the torch-free
// launchers of moe_mlp.cuh on the current stream. Schemas: csrc/fsosr.cpp; semantics: docs/ops/moe_mlp.md (the
// CPU backend, csrc/cpu/moe_mlp.cpp, is the behaviour to match). No host synchronisation: sizes come from shapes,
// the routing metadata is only read by the kernels, so a whole MoE layer can be captured in a CUDA graph.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "moe_mlp.cuh"

namespace {

namespace moe = fsosr::cuda::moe;

fsosr::cuda::ElementType element_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return fsosr::cuda::ElementType::kFloat32;
    case at::kHalf: return fsosr::cuda::ElementType::kFloat16;
    case at::kBFloat16: return fsosr::cuda::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "moe_mlp (CUDA): unsupported dtype ", type,
                  "; the cuda backend takes float32, float16 or bfloat16 (float64 runs on the cpu and reference "
                  "backends)");
  }
  return fsosr::cuda::ElementType::kFloat32;  // unreachable
}

void check_on(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "moe_mlp (CUDA): ", name, " must be a tensor");
  TORCH_CHECK(t.device() == x.device(), "moe_mlp (CUDA): ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_dtype(const char* name, const at::Tensor& t, at::ScalarType type) {
  TORCH_CHECK(t.scalar_type() == type, "moe_mlp (CUDA): ", name, " must be ", type, ", got ", t.scalar_type());
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "moe_mlp (CUDA): ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Validated, contiguous inputs of one call and the MoeProblem that describes them to the kernels.
struct Call {
  at::Tensor x, gates, order, offsets, w1, b1, w2, b2;
  moe::MoeProblem p;
};

Call make_call(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates, const at::Tensor& order,
               const at::Tensor& offsets, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, int64_t group_size, int64_t activation, double scale, double dropout,
               const at::Tensor& seed_key, bool per_expert_input) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "moe_mlp (CUDA): x must be a CUDA tensor");
  const fsosr::cuda::ElementType type = element_type(x.scalar_type());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "moe_mlp (CUDA): w1 and w2 must be [E, ., .], got ", w1.sizes(),
              " and ", w2.sizes());
  TORCH_CHECK(indices.dim() == 2, "moe_mlp (CUDA): indices must be [N, k], got ", indices.sizes());
  TORCH_CHECK(activation >= 0 && activation <= 3, "moe_mlp (CUDA): activation code must be 0..3, got ", activation);
  TORCH_CHECK(dropout >= 0 && dropout < 1, "moe_mlp (CUDA): dropout must be in [0, 1), got ", dropout);
  const int64_t units = indices.size(0), k = indices.size(1), experts = w1.size(0);
  const int64_t d_in = w1.size(1), hidden = w1.size(2), d_out = w2.size(2);
  const int64_t group = per_expert_input ? 1 : group_size;
  TORCH_CHECK(group >= 1, "moe_mlp (CUDA): group_size must be >= 1, got ", group_size);
  TORCH_CHECK(k >= 1 && k <= experts, "moe_mlp (CUDA): indices must have k in [1, E=", experts, "] columns, got ", k);
  TORCH_CHECK(experts <= 65535, "moe_mlp (CUDA): at most 65535 experts (a grid dimension), got ", experts);
  TORCH_CHECK(units <= std::numeric_limits<int32_t>::max() / k, "moe_mlp (CUDA): N*k does not fit int32");
  if (per_expert_input) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == experts && x.size(1) == units && x.size(2) == d_in,
                "moe_mlp (CUDA): per-expert x must be [E, N, d] = [", experts, ", ", units, ", ", d_in, "], got ",
                x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == units * group && x.size(1) == d_in,
                "moe_mlp (CUDA): x must be [N*G, d] = [", units * group, ", ", d_in, "], got ", x.sizes());
  }
  auto check_weight = [&](const char* name, const at::Tensor& t) {
    check_on(name, t, x);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "moe_mlp (CUDA): ", name, " is ", t.scalar_type(), " but x is ",
                x.scalar_type(), " (one dtype for x and the expert weights)");
  };
  check_weight("w1", w1);
  check_weight("b1", b1);
  check_weight("w2", w2);
  check_weight("b2", b2);
  check_shape("b1", b1, {experts, hidden});
  check_shape("w2", w2, {experts, hidden, d_out});
  check_shape("b2", b2, {experts, d_out});
  check_on("indices", indices, x);
  check_on("gates", gates, x);
  check_on("order", order, x);
  check_on("offsets", offsets, x);
  check_dtype("indices", indices, at::kInt);
  check_dtype("gates", gates, at::kFloat);
  check_dtype("order", order, at::kInt);
  check_dtype("offsets", offsets, at::kInt);
  check_shape("gates", gates, {units, k});
  check_shape("order", order, {units * k});
  check_shape("offsets", offsets, {experts + 1});
  // The dropout key: on the CPU it is read here (host memory, no synchronisation) and passed by value; on x's
  // device the kernels load it, so a CUDA graph that advances it in place draws fresh masks at every replay.
  TORCH_CHECK(seed_key.defined() && seed_key.dim() == 0 && seed_key.scalar_type() == at::kLong,
              "moe_mlp (CUDA): seed_key must be a 0-d int64 tensor");
  TORCH_CHECK(seed_key.device().is_cpu() || seed_key.device() == x.device(), "moe_mlp (CUDA): seed_key is on ",
              seed_key.device(), "; it must be on the CPU or on x's device ", x.device());
  const bool key_on_host = seed_key.device().is_cpu();
  const uint64_t key_value = key_on_host ? uint64_t(seed_key.item<int64_t>()) : 0;
  const int64_t* key_pointer = key_on_host ? nullptr : seed_key.data_ptr<int64_t>();

  Call c{x.contiguous(),  gates.contiguous(), order.contiguous(), offsets.contiguous(),
         w1.contiguous(), b1.contiguous(),    w2.contiguous(),    b2.contiguous(), {}};
  c.p = moe::MoeProblem{type, units, k, group, d_in, hidden, d_out, experts, int(activation), scale, dropout,
                        key_value, key_pointer, per_expert_input, c.x.data_ptr(), c.gates.data_ptr<float>(),
                        c.order.data_ptr<int32_t>(), c.offsets.data_ptr<int32_t>(), c.w1.data_ptr(),
                        c.b1.data_ptr(), c.w2.data_ptr(), c.b2.data_ptr()};
  return c;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "moe_mlp (CUDA): ", op, " launch failed: ", cudaGetErrorString(err));
}

at::Tensor float_buffer(int64_t count, const at::Tensor& like, bool zeroed = false) {
  const auto options = like.options().dtype(at::kFloat);
  return zeroed ? at::zeros({count}, options) : at::empty({count}, options);
}

std::tuple<at::Tensor, at::Tensor> moe_mlp_fwd_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                    const at::Tensor& gates, const at::Tensor& order,
                                                    const at::Tensor& offsets, const at::Tensor& w1,
                                                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                    int64_t group_size, int64_t activation, double scale,
                                                    double dropout, const at::Tensor& seed_key,
                                                    bool per_expert_input) {
  const c10::cuda::CUDAGuard guard(x.device());
  Call c = make_call(x, indices, gates, order, offsets, w1, b1, w2, b2, group_size, activation, scale, dropout,
                     seed_key, per_expert_input);
  const moe::MoeProblem& p = c.p;
  at::Tensor y = at::empty({p.units * p.group, p.d_out}, c.x.options());  // per-expert input: G = 1, so [N, d_out]
  at::Tensor hidden_pre = at::empty({p.units, p.k, p.group, p.hidden}, c.x.options().dtype(at::kFloat));
  if (moe::routed_rows(p) == 0) return {y, hidden_pre};
  at::Tensor slots = float_buffer(moe::forward_slot_buffer_floats(p), c.x);
  check_launch("forward", moe::moe_mlp_forward(p, hidden_pre.data_ptr<float>(), y.data_ptr(),
                                               slots.numel() ? slots.data_ptr<float>() : nullptr,
                                               c10::cuda::getCurrentCUDAStream().stream()));
  return {y, hidden_pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& hidden_pre, int64_t group_size, int64_t activation,
    double scale, double dropout, const at::Tensor& seed_key, bool per_expert_input) {
  const c10::cuda::CUDAGuard guard(x.device());
  Call c = make_call(x, indices, gates, order, offsets, w1, b1, w2, b2, group_size, activation, scale, dropout,
                     seed_key, per_expert_input);
  const moe::MoeProblem& p = c.p;
  check_on("grad_y", grad_y, x);
  check_shape("grad_y", grad_y, {p.units * p.group, p.d_out});
  check_on("hidden_pre", hidden_pre, x);
  check_dtype("hidden_pre", hidden_pre, at::kFloat);
  check_shape("hidden_pre", hidden_pre, {p.units, p.k, p.group, p.hidden});
  // Autograd hands grad_y in y's dtype (x's); anything else is converted once here.
  const at::Tensor dy = grad_y.to(c.x.scalar_type()).contiguous();
  const at::Tensor pre = hidden_pre.contiguous();

  const int64_t rows = moe::routed_rows(p);
  const bool dx_direct = moe::backward_writes_dx_directly(p);
  // Per-expert input: rows (e, n) that unit n did not pick get no gradient, so grad_x starts at zero when the
  // kernel writes it directly (otherwise the zero-filled fp32 buffer is cast over all of it).
  at::Tensor grad_x = (per_expert_input && dx_direct) || rows == 0 ? at::zeros_like(c.x) : at::empty_like(c.x);
  at::Tensor grad_gates = at::empty({p.units, p.k}, c.gates.options());
  at::Tensor grad_w1 = at::empty_like(c.w1), grad_b1 = at::empty_like(c.b1);
  at::Tensor grad_w2 = at::empty_like(c.w2), grad_b2 = at::empty_like(c.b2);
  if (rows == 0) {
    return {grad_x, grad_gates, grad_w1.zero_(), grad_b1.zero_(), grad_w2.zero_(), grad_b2.zero_()};
  }
  at::Tensor dpre = float_buffer(rows * p.hidden, c.x);  // every element written by the rows pass
  at::Tensor gate_partial = float_buffer(rows, c.x);
  at::Tensor dx_buffer = float_buffer(moe::backward_dx_buffer_floats(p), c.x, /*zeroed=*/per_expert_input);
  at::Tensor partial1 = float_buffer(moe::weight_partial1_floats(p), c.x);
  at::Tensor partial2 = float_buffer(moe::weight_partial2_floats(p), c.x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };

  check_launch("backward rows pass", moe::moe_mlp_backward_rows(p, dy.data_ptr(), pre.data_ptr<float>(), ptr(dpre),
                                                                ptr(gate_partial), grad_gates.data_ptr<float>(),
                                                                grad_x.data_ptr(), ptr(dx_buffer), stream));
  check_launch("backward weight pass",
               moe::moe_mlp_backward_weights(p, dy.data_ptr(), pre.data_ptr<float>(), ptr(dpre), ptr(partial1),
                                             ptr(partial2), grad_w1.data_ptr(), grad_b1.data_ptr(),
                                             grad_w2.data_ptr(), grad_b2.data_ptr(), stream));
  return {grad_x, grad_gates, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsosr, CUDA, m) {
  m.impl("moe_mlp_fwd", TORCH_FN(moe_mlp_fwd_cuda));
  m.impl("moe_mlp_bwd", TORCH_FN(moe_mlp_bwd_cuda));
}

#endif  // WITH_CUDA
