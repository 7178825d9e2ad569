"""moe_mlp at the MoE-Adapters4CL shape (per-sample routing, 197 tokens, d 768, r 64, E 22, k 2) and FSMoE's
per-expert-input shape (B 32, E 11, k 5, 768 -> 1536 -> 512), forward and forward+backward, fp32.

Providers side by side:
- `loop`: the seeds' per-expert loop (MoE-Adapters4CL's dispatcher; fsosr's `reference` backend);
- `grouped_mm`: what a user would assemble from stock PyTorch: index_select the routed rows into expert order,
  `torch.nn.functional.grouped_mm` for both GEMMs, index_add the gated results back;
- `dense_masked`: every expert on every row as one wide GEMM, the non-selected experts' hidden units masked by
  zero gates (FSMoE's own formulation, and the natural choice when E/k is small);
- ours: `cpu`, and on a GPU `triton` and `cuda` (each listed only where `backends.why_unavailable` allows it).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, measure
from fsosr import backends
from fsosr.ops import moe_mlp, moe_mlp_per_expert_input, topk_route
from fsosr.ops.moe_mlp import IMPLEMENTED

OURS = [b for b in IMPLEMENTED if b != "reference" and backends.why_unavailable(b, DEVICE) is None]
UNITS = 64 if DEVICE.type == "cuda" else 16
TOKENS, WIDTH, BOTTLENECK, EXPERTS, K = 197, 768, 64, 22, 2
DROPOUT, SCALE = 0.1, 0.1


def adapter_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(UNITS * TOKENS, WIDTH, generator=g).to(DEVICE).requires_grad_()
    logits = torch.randn(UNITS, EXPERTS, generator=g).to(DEVICE).requires_grad_()
    shapes = [(EXPERTS, WIDTH, BOTTLENECK), (EXPERTS, BOTTLENECK), (EXPERTS, BOTTLENECK, WIDTH), (EXPERTS, WIDTH)]
    weights = [(torch.randn(*s, generator=g) * 0.05).to(DEVICE).requires_grad_() for s in shapes]
    return x, logits, weights


def grouped_mm_adapter(x, routing, w1, b1, w2, b2):
    """index_select -> grouped_mm -> act/dropout -> grouped_mm -> gate -> index_add (stock PyTorch)."""
    order = routing.order.long()
    units = order // K                                                     # unit of each routed (unit, slot)
    rows = (units[:, None] * TOKENS + torch.arange(TOKENS, device=x.device)).reshape(-1)
    experts = routing.indices.reshape(-1).long()[order]
    expert_of_row = experts.repeat_interleave(TOKENS)
    ends = (routing.offsets[1:] * TOKENS).to(torch.int32)
    gathered = x.index_select(0, rows)
    hidden = F.grouped_mm(gathered, w1, offs=ends) + b1[expert_of_row]
    hidden = F.dropout(F.relu(hidden), DROPOUT, training=True)
    out = F.grouped_mm(hidden, w2, offs=ends) + b2[expert_of_row]
    gate = routing.gates.reshape(-1)[order].repeat_interleave(TOKENS)
    return torch.zeros_like(x).index_add(0, rows, out * (gate * SCALE)[:, None])


def dense_masked_adapter(x, routing, w1, b1, w2, b2):
    """All E experts as one [d, E*r] GEMM; hidden units of unselected experts get gate 0."""
    dense_gates = torch.zeros(UNITS, EXPERTS, device=x.device, dtype=x.dtype).scatter(
        1, routing.indices.long(), routing.gates)
    hidden = x @ w1.permute(1, 0, 2).reshape(WIDTH, -1) + b1.reshape(-1)    # [rows, E*r]
    hidden = F.dropout(F.relu(hidden), DROPOUT, training=True)
    per_row_gate = (dense_gates * SCALE).repeat_interleave(TOKENS, dim=0)   # [rows, E]
    hidden = (hidden.reshape(-1, EXPERTS, BOTTLENECK) * per_row_gate[:, :, None]).reshape(-1, EXPERTS * BOTTLENECK)
    return hidden @ w2.reshape(-1, WIDTH) + per_row_gate @ b2


ADAPTER_PROVIDERS = ["loop", "grouped_mm", "dense_masked"] + OURS


def adapter_step(provider: str, mode: str):
    """The timed callable of one provider at the MoE-Adapters shape (inputs built once, outside it)."""
    x, logits, weights = adapter_inputs()

    def fn():
        routing = topk_route(logits, K, check_finite=False)
        if provider == "grouped_mm":
            y = grouped_mm_adapter(x, routing, *weights)
        elif provider == "dense_masked":
            y = dense_masked_adapter(x, routing, *weights)
        else:
            y = moe_mlp(x, routing, *weights, group_size=TOKENS, scale=SCALE, dropout=DROPOUT, seed=0,
                        backend="reference" if provider == "loop" else provider)
        if mode == "fwd+bwd":
            y.sum().backward()
        return y
    return fn


def peak_memory_mib(provider: str, mode: str) -> float:
    """Extra peak memory of one step, measured in a fresh process: on the GPU from the CUDA allocator; on the
    CPU as the peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus the
    resident set at that point."""
    script = (
        "import sys, torch; sys.path.insert(0, {here!r}); import test_moe_mlp as t\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))\n"
        "fn = t.adapter_step({provider!r}, {mode!r})\n"
        "cuda = t.DEVICE.type == 'cuda'\n"
        "if not cuda: open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = torch.cuda.memory_allocated() if cuda else status('VmRSS:')\n"
        "fn(); fn()\n"
        "after = torch.cuda.max_memory_allocated() if cuda else status('VmHWM:')\n"
        "print((after - before) / 2**20)\n"
    ).format(here=os.path.dirname(os.path.abspath(__file__)), provider=provider, mode=mode)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", ADAPTER_PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_moe_adapter_layer(benchmark, provider, mode):
    measure(benchmark, adapter_step(provider, mode),
            group=f"moe_mlp MoE-Adapters N={UNITS}x{TOKENS} d={WIDTH} r={BOTTLENECK} E={EXPERTS} k={K} {mode}",
            provider=provider, baseline="loop",
            info={"op": "moe_mlp", "shape": [UNITS * TOKENS, WIDTH], "experts": EXPERTS, "k": K,
                  "dtype": "float32", "mode": mode, "backend": provider})
    benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(provider, mode)


FS_BATCH, FS_EXPERTS, FS_K, FS_IN, FS_HIDDEN, FS_OUT = 32, 11, 5, 768, 1536, 512


@pytest.mark.parametrize("provider", ["loop", "dense_masked"] + OURS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_fsmoe_layer_experts(benchmark, provider, mode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(FS_EXPERTS, FS_BATCH, FS_IN, generator=g).to(DEVICE).requires_grad_()
    logits = torch.randn(FS_BATCH, FS_EXPERTS, generator=g).to(DEVICE).requires_grad_()
    shapes = [(FS_EXPERTS, FS_IN, FS_HIDDEN), (FS_EXPERTS, FS_HIDDEN), (FS_EXPERTS, FS_HIDDEN, FS_OUT),
              (FS_EXPERTS, FS_OUT)]
    w1, b1, w2, b2 = [(torch.randn(*s, generator=g) * 0.03).to(DEVICE).requires_grad_() for s in shapes]

    def fn():
        routing = topk_route(logits, FS_K, check_finite=False)
        if provider == "dense_masked":  # FSMoE's code: every expert densely (batched), masked by zero gates
            dense = torch.zeros(FS_BATCH, FS_EXPERTS, device=x.device).scatter(1, routing.indices.long(),
                                                                               routing.gates)
            out = torch.baddbmm(b2[:, None], F.relu(torch.baddbmm(b1[:, None], x, w1)), w2)   # [E, B, out]
            y = (out * dense.t()[:, :, None]).sum(0)
        else:
            y = moe_mlp_per_expert_input(x, routing, w1, b1, w2, b2,
                                         backend="reference" if provider == "loop" else provider)
        if mode == "fwd+bwd":
            y.sum().backward()
        return y

    measure(benchmark, fn, group=f"moe_mlp FSMoE B={FS_BATCH} E={FS_EXPERTS} k={FS_K} "
                                 f"{FS_IN}-{FS_HIDDEN}-{FS_OUT} {mode}",
            provider=provider, baseline="loop",
            info={"op": "moe_mlp", "shape": [FS_EXPERTS, FS_BATCH, FS_IN], "experts": FS_EXPERTS, "k": FS_K,
                  "dtype": "float32", "mode": mode, "backend": provider})
