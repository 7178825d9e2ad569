// The fsosr operator library: every schema in one place, and the Python module that loads it.
//
// Kernels register themselves per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*_glue.cpp. Fake (meta)
// implementations and autograd formulas are registered from Python (fsosr/ops/*.py), so the schema text below
// is the single contract between C++, CUDA and Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fsosr, m) {
  // Top-k routing. noise and noise_std are both given (noisy routing) or both absent.
  // Returns (gates[N,k] f32|f64, importance[E] f32|f64, load[E] f32|f64, indices[N,k] i32, counts[E] i32,
  //          order[N*k] i32, offsets[E+1] i32, next_index[N] i32): the differentiable outputs first, because
  //          torch.library.opcheck's autograd test accumulates every output into the type of the first.
  m.def(
      "topk_route_fwd(Tensor logits, int k, bool renormalize, Tensor? noise, Tensor? noise_std) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients w.r.t. logits and noise_std (the latter is an empty tensor when noise_std is absent).
  m.def(
      "topk_route_bwd(Tensor grad_gates, Tensor grad_importance, Tensor grad_load, Tensor logits, "
      "Tensor? noise, Tensor? noise_std, Tensor indices, Tensor gates, Tensor next_index, bool renormalize) -> "
      "(Tensor, Tensor)");
  // Mixture-of-experts MLP over a routing (docs/ops/moe_mlp.md, "Native op contract"). seed_key: the dropout key,
  // a 0-d int64 tensor on the CPU (read on the host) or, for CUDA tensors, on x's device (read by the kernels).
  // Returns (y, hidden_pre[N, k, G, h] in the accumulation dtype, saved for backward).
  m.def(
      "moe_mlp_fwd(Tensor x, Tensor indices, Tensor gates, Tensor order, Tensor offsets, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int group_size, int activation, float scale, float dropout, Tensor seed_key, "
      "bool per_expert_input) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_gates, grad_w1, grad_b1, grad_w2, grad_b2).
  m.def(
      "moe_mlp_bwd(Tensor grad_y, Tensor x, Tensor indices, Tensor gates, Tensor order, Tensor offsets, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor hidden_pre, int group_size, int activation, "
      "float scale, float dropout, Tensor seed_key, bool per_expert_input) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused masked HF-AdamW step over flat adapter buffers (fsosr/ops/masked_adamw.py). Mutates params, exp_avg,
  // exp_avg_sq (fp32|fp64 [P]) and, when advance_steps, steps (int64 [S, N+1]: per-segment step counts of each
  // expert and, last, of the shared entries). owner uint8 [P] (expert id, 255 = shared), segment_offsets int64
  // [S+1], selected int64 [S], weight_decay f64 [S]; semantics 0 mosa | 1 skip | 2 freeze.
  m.def(
      "masked_adamw_(Tensor(a!) params, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) steps, "
      "Tensor grads, Tensor owner, Tensor segment_offsets, Tensor selected, Tensor weight_decay, float lr, "
      "float beta1, float beta2, float eps, int semantics, bool advance_steps) -> ()");
  // MoSA's compact sparse-expert weights (fsosr/ops/sparse_adapter.py). owner uint8 like w_own; w_rest like w_own
  // or absent (zeros); expert a 0-d integer tensor, on the CPU or on the weights' device (no host read on CUDA).
  // W_e = where(owner == expert, w_own, w_rest).
  m.def("sparse_adapter_weight(Tensor w_own, Tensor owner, Tensor? w_rest, Tensor expert) -> Tensor");
  // (grad where owner == expert else 0, grad where owner != expert else 0; the latter empty unless rest_grad).
  m.def("sparse_adapter_weight_bwd(Tensor grad, Tensor owner, Tensor expert, bool rest_grad) -> (Tensor, Tensor)");
  // y [M, out] = x [M, in] @ W_e^T + bias [out] (bias optional), with W_e as above ([out, in]).
  m.def(
      "sparse_linear_fwd(Tensor x, Tensor w_own, Tensor? w_rest, Tensor owner, Tensor expert, Tensor? bias) -> "
      "Tensor");
  // Returns (grad_x, grad_w_own = mask * grad_y^T x with the mask applied in the GEMM's epilogue,
  // grad_w_rest = (1 - mask) * grad_y^T x, grad_bias); each one is an empty tensor unless its flag is set.
  m.def(
      "sparse_linear_bwd(Tensor grad_y, Tensor x, Tensor w_own, Tensor? w_rest, Tensor owner, Tensor expert, "
      "bool x_grad, bool weight_grad, bool rest_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // MoSA's merge of the N experts (no autograd: an eval-time op; fsosr.ops.merge_experts differentiates through
  // its reference path instead). coefficients f64 [num_experts]: coefficients[i] multiplies w_rest where expert i
  // owns the entry (Σ_j rest_scale[j] − rest_scale[i], computed once by the caller so every backend shares it).
  // merged = (w_own + coefficients[owner] · w_rest) / num_experts in fp32 (fp64 for fp64), rounded once to
  // w_own's dtype; w_rest absent: w_own / num_experts. An owner value >= num_experts reads coefficient 0.
  m.def(
      "merge_experts(Tensor w_own, Tensor owner, Tensor? w_rest, Tensor coefficients, int num_experts) -> "
      "Tensor");
  // Internal: the cpu backend's GEMM engine (csrc/cpu/gemm.h) on its own, for its tests and benchmark.
  // Returns (c if given else 0) + a @ b; a [M, K], b [K, N], c [M, N], all fp32 or all fp64, CPU only.
  m.def("_cpu_gemm(Tensor a, Tensor b, Tensor? c) -> Tensor");
}

#ifdef WITH_CUDA
static constexpr long kWithCuda = 1;
#else
static constexpr long kWithCuda = 0;
#endif

namespace fsosr {
const char* cpu_vector_isa();  // csrc/cpu/moe_mlp_hidden.cpp
}

// A plain C-API module (no pybind11): importing it runs the static registrations above and exposes whether the CUDA
// kernels were compiled in, which `python -m fsosr.info` reports.
static PyModuleDef fsosr_module = {PyModuleDef_HEAD_INIT, "_C", "fsosr native operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fsosr_module);
  if (module == nullptr) return nullptr;
  PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda);
  PyModule_AddStringConstant(module, "CPU_VECTOR_ISA", fsosr::cpu_vector_isa());
  return module;
}
