"""moe_mlp forward and forward+backward, fp32 (and on a GPU also bf16 at the adapter shape), providers side by side,
at three shapes:

- MoE-Adapters4CL: per-sample routing, 16 (CPU) / 64 (GPU) samples x 197 tokens, d 768, r 64, E 22, k 2,
  relu, dropout 0.1, scale 0.1 (the cpu backend takes its routed path);
- per-token routing with few experts: 3152 (CPU) / 12608 (GPU) tokens, d 768, r 64, E 2 and E 4, k 2 (E 2: the cpu
  backend takes its dense-masked path; E 4: routed); on a GPU also 50,000 tokens with E 8, k 2;
- FSMoE: per-expert inputs, B 32, E 11, k 5, 768 -> 1536 -> 512 (routed).

Providers:
- `loop`: the seeds' per-expert loop (MoE-Adapters4CL's dispatcher; fsosr's `reference` backend);
- `grouped_mm`: what a user would assemble from stock PyTorch: index_select the routed rows into expert order,
  `torch.nn.functional.grouped_mm` for both GEMMs, index_add the gated results back;
- `dense_masked`: stock PyTorch, every expert on every row as one wide GEMM, the unselected experts' hidden units
  masked by zero gates (FSMoE's own formulation);
- ours: `cpu` (automatic path), and `cpu-routed` / `cpu-dense` with the path forced (FSOSR_MOE_MLP_PATH), which
  show the shape rule's choice; `cpu-blas`: the automatic path with oneDNN switched off
  (`torch.backends.mkldnn.enabled = False`), so that ATen's brgemm falls back to its BLAS gemm: what the cpu
  backend's GEMM engine (csrc/cpu/gemm.h) is worth; `triton` and `cuda` on a GPU
  (each listed only where `backends.why_unavailable` allows it); at the adapter shape `triton-units`: the triton
  backend with its forward and rows pass tiled by unit (FSOSR_MOE_MLP_TRITON_TILES=units, kernels/moe_mlp_units.py),
  against `triton`'s default expert tiles;
- on CUDA, at the adapter shape, `<provider>-graph` for ours, grouped_mm and dense_masked: the step captured in a
  CUDA graph and replayed, i.e. its device time without host overhead (the loop cannot be captured).
Every fwd+bwd step starts with the gradients set to None, as a training step after zero_grad(set_to_none=True),
and back-propagates a fixed random gradient of y, as the layer above would hand it down (``y.sum().backward()``
would time the loss instead: a reduction over y, and an expanded gradient that the fused ops copy to a contiguous
tensor, ~55 us of a ~460 us bf16 triton step on an H100).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, cuda_graphed, environment, measure, record_bandwidth
from fsosr import backends
from fsosr.ops import moe_mlp, moe_mlp_per_expert_input, topk_route
from fsosr.ops.moe_mlp import IMPLEMENTED

OURS = [b for b in IMPLEMENTED if b != "reference" and backends.why_unavailable(b, DEVICE) is None]
CPU_PATHS = ["cpu-routed", "cpu-dense", "cpu-blas"] if "cpu" in OURS else []
TRITON_TILES = ["triton-units"] if "triton" in OURS else []
# What a forced path is set through, per backend.
PATH_VARIABLES = {"cpu": "FSOSR_MOE_MLP_PATH", "cuda": "FSOSR_MOE_MLP_PATH", "triton": "FSOSR_MOE_MLP_TRITON_TILES"}
# On a GPU, the fused providers and the stock-PyTorch ones that never sync with the host also run captured in a
# CUDA graph ("-graph"): the device time of the step, without the host's Python and launch costs. The seeds'
# loop cannot be captured (it reads routing results on the host).
GRAPHED = ([f"{p}-graph" for p in ["grouped_mm", "dense_masked"] + OURS + TRITON_TILES]
           if DEVICE.type == "cuda" else [])
DROPOUT, SCALE = 0.1, 0.1


@dataclass(frozen=True)
class Shape:
    units: int
    group: int
    width: int
    hidden: int
    experts: int
    k: int
    d_out: int = 0  # 0: same as width
    per_expert: bool = False

    @property
    def out(self) -> int:
        return self.d_out or self.width


ADAPTER = Shape(64 if DEVICE.type == "cuda" else 16, 197, 768, 64, 22, 2)
SHAPES = {
    "adapter": ADAPTER,
    "token_e2": Shape(ADAPTER.units * 197, 1, 768, 64, 2, 2),
    "token_e4": Shape(ADAPTER.units * 197, 1, 768, 64, 4, 2),
    "token_e8": Shape(50_000, 1, 768, 64, 8, 2),    # the per-token GPU shape
    "fsmoe": Shape(32, 1, 768, 1536, 11, 5, d_out=512, per_expert=True),
}


def make_inputs(s: Shape, dtype: torch.dtype = torch.float32):
    """x, logits, [w1, b1, w2, b2] (leaves requiring grad) and the upstream gradient of y, random, on DEVICE."""
    g = torch.Generator().manual_seed(0)
    x_shape = (s.experts, s.units, s.width) if s.per_expert else (s.units * s.group, s.width)
    x = torch.randn(*x_shape, generator=g).to(DEVICE, dtype).requires_grad_()
    logits = torch.randn(s.units, s.experts, generator=g).to(DEVICE, dtype).requires_grad_()
    shapes = [(s.experts, s.width, s.hidden), (s.experts, s.hidden), (s.experts, s.hidden, s.out),
              (s.experts, s.out)]
    weights = [(torch.randn(*w, generator=g) / w[-2 if len(w) == 3 else -1] ** 0.5).to(DEVICE, dtype).requires_grad_()
               for w in shapes]
    grad_y = torch.randn(s.units * s.group, s.out, generator=g).to(DEVICE, dtype)
    return x, logits, weights, grad_y


def grouped_mm_moe(s: Shape, x, routing, w1, b1, w2, b2):
    """index_select -> grouped_mm -> act/dropout -> grouped_mm -> gate -> index_add (stock PyTorch)."""
    order = routing.order.long()
    units = order // s.k                                                   # unit of each routed (unit, slot)
    rows = (units[:, None] * s.group + torch.arange(s.group, device=x.device)).reshape(-1)
    experts = routing.indices.reshape(-1).long()[order]
    expert_of_row = experts.repeat_interleave(s.group)
    ends = (routing.offsets[1:] * s.group).to(torch.int32)
    hidden = F.grouped_mm(x.index_select(0, rows), w1, offs=ends) + b1[expert_of_row]
    hidden = F.dropout(F.relu(hidden), DROPOUT, training=True)
    out = F.grouped_mm(hidden, w2, offs=ends) + b2[expert_of_row]
    gate = routing.gates.to(x.dtype).reshape(-1)[order].repeat_interleave(s.group)  # gates are fp32
    return torch.zeros(x.shape[0], s.out, device=x.device, dtype=x.dtype).index_add(0, rows, out * (gate * SCALE)[:, None])


def dense_masked_moe(s: Shape, x, routing, w1, b1, w2, b2):
    """Every expert on every row (one [d, E*r] GEMM, or a batched GEMM for per-expert inputs); the hidden
    units of unselected experts get gate 0."""
    dense_gates = torch.zeros(s.units, s.experts, device=x.device, dtype=x.dtype).scatter(
        1, routing.indices.long(), routing.gates.to(x.dtype)) * SCALE
    if s.per_expert:  # FSMoE's code: every expert densely (batched), masked by zero gates
        hidden = F.dropout(F.relu(torch.baddbmm(b1[:, None], x, w1)), DROPOUT, training=True)
        return (torch.baddbmm(b2[:, None], hidden, w2) * dense_gates.t()[:, :, None]).sum(0)
    hidden = x @ w1.permute(1, 0, 2).reshape(s.width, -1) + b1.reshape(-1)        # [rows, E*r]
    hidden = F.dropout(F.relu(hidden), DROPOUT, training=True)
    per_row_gate = dense_gates.repeat_interleave(s.group, dim=0)                   # [rows, E]
    hidden = (hidden.reshape(-1, s.experts, s.hidden) * per_row_gate[:, :, None]).reshape(-1, s.experts * s.hidden)
    return hidden @ w2.reshape(-1, s.out) + per_row_gate @ b2


def moe_step(shape_name: str, provider: str, mode: str, dtype: str = "float32", env: dict[str, str] | None = None):
    """The timed callable of one provider (inputs built once, outside it); env: launch options set around each
    call (a graph keeps those of its capture)."""
    if provider.removesuffix("-graph") == "grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    s = SHAPES[shape_name]
    x, logits, weights, grad_y = make_inputs(s, getattr(torch, dtype))
    leaves = [x, logits, *weights]
    graph = provider.endswith("-graph")
    base = provider.removesuffix("-graph")
    backend_name, _, path = base.partition("-")  # cpu-routed / cpu-dense / triton-units: the forced path
    blas = path == "blas"                         # cpu-blas: the automatic path on ATen's BLAS gemm
    variables = dict(env or {})
    if path and not blas:
        variables[PATH_VARIABLES[backend_name]] = path
    ours = backend_name in OURS
    route_backend = backend_name if ours else None  # ours route with the same backend; baselines automatically

    def forward(routing):
        if base == "grouped_mm":
            return grouped_mm_moe(s, x, routing, *weights)
        if base == "dense_masked":
            return dense_masked_moe(s, x, routing, *weights)
        kwargs = dict(scale=SCALE, dropout=DROPOUT, seed=0,
                      backend="reference" if base == "loop" else backend_name)
        if s.per_expert:
            return moe_mlp_per_expert_input(x, routing, *weights, **kwargs)
        return moe_mlp(x, routing, *weights, group_size=s.group, **kwargs)

    def fn():
        for t in leaves:
            t.grad = None
        mkldnn = torch.backends.mkldnn.enabled
        if blas:
            torch.backends.mkldnn.enabled = False
        try:
            with environment(variables):
                y = forward(topk_route(logits, s.k, check_finite=False, backend=route_backend))
                if mode == "fwd+bwd":
                    y.backward(grad_y)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        return y
    if graph:
        return cuda_graphed(fn)
    fn.leaves = leaves  # for peak_memory_mib, which drops the gradients of a warm-up step
    return fn


def _resident_bytes(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def steady_state_peak_mib(fn) -> float:
    """Extra peak memory of ``fn()`` after one warm-up call whose gradients are then dropped (as
    zero_grad(set_to_none=True) leaves a training step): on the GPU from the CUDA allocator (exact in any process:
    it counts allocated bytes, not the cache); on the CPU as the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at that point, which is meaningful only in a fresh process
    started as :func:`peak_memory_mib` starts it."""
    cuda = DEVICE.type == "cuda"
    fn()
    for leaf in fn.leaves:
        leaf.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    before = torch.cuda.memory_allocated() if cuda else _resident_bytes("VmRSS:")
    fn()
    if cuda:
        torch.cuda.synchronize()
    after = torch.cuda.max_memory_allocated() if cuda else _resident_bytes("VmHWM:")
    return (after - before) / 2**20


def peak_memory_mib(shape_name: str, provider: str, mode: str, dtype: str) -> float:
    """:func:`steady_state_peak_mib` of a fresh step. On the GPU in this process (until 2026-11-23 in a fresh
    one, ~100 s of a GPU session's benchmark call spent starting processes). On the CPU in a fresh process with
    glibc mapping every block over 64 KiB afresh and unmapping it when freed (a static MALLOC_MMAP_THRESHOLD_), so
    that the resident set follows the live buffers rather than the heap's free space (the warm-up's freed buffers,
    and those of earlier tests, would otherwise stay resident and hide the step's own)."""
    if DEVICE.type == "cuda":
        return steady_state_peak_mib(moe_step(shape_name, provider, mode, dtype))
    script = ("import sys; sys.path.insert(0, {here!r}); import test_moe_mlp as t\n"
              "print(t.steady_state_peak_mib(t.moe_step({shape!r}, {provider!r}, {mode!r}, {dtype!r})))\n"
              ).format(here=os.path.dirname(os.path.abspath(__file__)), shape=shape_name, provider=provider,
                       mode=mode, dtype=dtype)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def floor_bytes(s: Shape, mode: str, dtype: str) -> int:
    """The bytes a step must move at least. Forward: read x and the expert weights, write y. Backward: read grad_y,
    x and the weights again, write grad_x and the weight gradients. (Until 2026-11-23 this counted grad_y and y
    once more and no weights: the committed results' % BW for fwd+bwd is 1.2x too high at the adapter shape, and
    the FSMoE rows, whose weights are 80x their activations, showed 0%.)"""
    rows_in = s.experts * s.units if s.per_expert else s.units * s.group
    rows_out = s.units * s.group
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    x, y = rows_in * s.width, rows_out * s.out
    weights = s.experts * (s.width * s.hidden + s.hidden + s.hidden * s.out + s.out)
    forward = x + weights + y
    return size * (forward if mode == "fwd" else forward + y + x + weights + x + weights)


def run_group(benchmark, shape_name: str, provider: str, mode: str, memory: bool = False,
              dtype: str = "float32") -> None:
    s = SHAPES[shape_name]
    form = "per-expert" if s.per_expert else f"N={s.units}x{s.group}"
    suffix = "" if dtype == "float32" else f" {dtype}"
    measure(benchmark, moe_step(shape_name, provider, mode, dtype),
            group=f"moe_mlp {shape_name} {form} {s.width}-{s.hidden}-{s.out} E={s.experts} k={s.k} {mode}{suffix}",
            provider=provider, baseline="loop",
            info={"op": "moe_mlp", "shape": [s.units * s.group, s.width], "experts": s.experts, "k": s.k,
                  "group_size": s.group, "per_expert_input": s.per_expert, "dtype": dtype, "mode": mode,
                  "backend": provider})
    record_bandwidth(benchmark, floor_bytes(s, mode, dtype))
    if memory and not provider.endswith("-graph"):  # a graph's memory is its pool, allocated at capture
        benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(shape_name, provider, mode, dtype)


MODES = ["fwd", "fwd+bwd"]
# bf16 on a GPU only: the CPU kernels compute low precision through fp32 conversions, so it says nothing new there.
DTYPES = ["float32", "bfloat16"] if DEVICE.type == "cuda" else ["float32"]


# torch's fp32 grouped_mm (no CUTLASS kernel; bf16 has one) copies its offsets to the host, which a CUDA graph
# cannot capture: that provider exists in bf16 only.
ADAPTER_CASES = [(dtype, provider) for dtype in DTYPES
                 for provider in ["loop", "grouped_mm", "dense_masked"] + OURS + TRITON_TILES + GRAPHED
                 + (["cpu-blas"] if "cpu" in OURS else [])
                 if (dtype, provider) != ("float32", "grouped_mm-graph")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,provider", ADAPTER_CASES)
def test_moe_adapter_layer(benchmark, dtype, provider, mode):
    run_group(benchmark, "adapter", provider, mode, memory=True, dtype=dtype)


@pytest.mark.parametrize("provider", ["loop", "grouped_mm", "dense_masked"] + OURS + CPU_PATHS)
@pytest.mark.parametrize("shape_name", ["token_e2", "token_e4"] + (["token_e8"] if DEVICE.type == "cuda" else []))
@pytest.mark.parametrize("mode", MODES)
def test_moe_per_token_few_experts(benchmark, shape_name, provider, mode):
    run_group(benchmark, shape_name, provider, mode)


# FSMoE's h = 1536 is wider than the Triton kernels' on-chip hidden row (TRITON_MAX_HIDDEN): triton refuses it.
# On CUDA `cuda` takes its dense-masked path here (the shape rule); `cuda-routed` forces the routed SIMT kernels.
@pytest.mark.parametrize("provider", ["loop", "dense_masked"] + [b for b in OURS if b != "triton"] + CPU_PATHS
                         + (["cuda-routed"] if "cuda" in OURS else []))
@pytest.mark.parametrize("mode", MODES)
def test_fsmoe_layer_experts(benchmark, provider, mode):
    run_group(benchmark, "fsmoe", provider, mode)
