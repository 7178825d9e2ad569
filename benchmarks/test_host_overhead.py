"""Host time of the Triton ops' Python side, every kernel launch stubbed out: what an eager step costs the CPU
before the GPU does anything (autograd, dispatch, argument checks, output allocation, grid and launch arguments).

Why: eager Triton steps on the H100 are host-bound (the adapter layer's bf16 fwd+bwd took 3.93 ms eager against
0.49 ms replayed from a CUDA graph, README), and this part of their cost can be measured on any machine. Small CPU
tensors stand in for the GPU's (the ops' Python does not depend on the device; torch's own small ops cost a few µs
here and 5-40 µs on a GPU host, so absolute times do not carry over, the ratios between routes mostly do).

Providers: `registered` (baseline): the ``torch.ops.fsosr.*_triton`` ops through the dispatcher, with their
``torch.library`` autograd: what torch.compile traces; `eager`: the same launchers as an autograd.Function called
directly (fsosr/ops/_eager.py), the route every eager call takes.
"""
from __future__ import annotations

import sys

import pytest
import torch
import triton.runtime.interpreter
import triton.runtime.jit

import fsosr.ops
from conftest import measure
from fsosr.ops._rng import seed_key_tensor

# The op modules (fsosr.ops re-exports their functions under the modules' names).
TOPK, MOE = (sys.modules[f.__module__] for f in (fsosr.ops.topk_route, fsosr.ops.moe_mlp))
ADAMW, SPARSE = (sys.modules[f.__module__] for f in (fsosr.ops.masked_adamw_, fsosr.ops.sparse_linear))
PROVIDERS = ["registered", "eager"]
ROUNDS = 200   # one step is 0.1-1 ms here: many rounds for a steady median


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Every Triton kernel launch returns at once (compiled or interpreted), so only the host side runs."""
    def no_launch(self, *args, grid, warmup, **kwargs):
        return None
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", no_launch)
    # The ops launch every kernel as kernel[grid](...): interpreted kernels are stubbed there, with the same calls a
    # compiled launch makes to reach the stub (KernelInterface.__getitem__'s). The hook point that every interpreted
    # launch passes in Triton 3.3 to 3.8, GridExecutor.__call__ (fsosr.testing.hook_interpreted_launches), comes
    # after Triton has built the launch's GridExecutor: 6-25 µs a launch here, host time a compiled launch does not
    # spend. (InterpretedFunction.run, stubbed before, is a class attribute only from Triton 3.4.)
    def interpreted_launcher(self, grid):
        return lambda *args, **kwargs: no_launch(self, *args, grid=grid, warmup=False, **kwargs)
    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "__getitem__", interpreted_launcher)


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def moe_layer_step(provider: str):
    """MoE-Adapters4CL's layer, fwd+bwd: topk_route (noisy, per sample) then moe_mlp over the sample's rows
    (E = 22, k = 2, dropout 0.1); 4 samples of 5 tokens, d = 64, h = 16."""
    route, experts = ((TOPK._triton_eager, MOE._triton_eager) if provider == "eager" else
                      (torch.ops.fsosr.topk_route_fwd_triton, torch.ops.fsosr.moe_mlp_fwd_triton))
    units, tokens, n_experts, d, h = 4, 5, 22, 64, 16
    x, logits, noise_std = _leaf(units * tokens, d), _leaf(units, n_experts), _leaf(units, n_experts)
    noise = torch.randn(units, n_experts)
    weights = [_leaf(n_experts, d, h), _leaf(n_experts, h), _leaf(n_experts, h, d), _leaf(n_experts, d)]
    grad_y, key = torch.randn(units * tokens, d), seed_key_tensor(1234)

    def step():
        gates, _importance, _load, indices, _counts, order, offsets, _next = route(logits, 2, True, noise, noise_std)
        y, _hidden_pre = experts(x, indices, gates, order, offsets, *weights, tokens, 0, 0.1, 0.1, key, False)
        y.backward(grad_y)
    return step


def sparse_linear_step(provider: str):
    """MoSA's split up-projection, fwd+bwd: y = x @ W_expert + b with W_expert from (W_own, owner, W_rest)."""
    linear = SPARSE._triton_linear_eager if provider == "eager" else torch.ops.fsosr.sparse_linear_fwd_triton
    x, w_own, bias = _leaf(20, 16), _leaf(64, 16), _leaf(64)          # weights [out, in], as nn.Linear's
    owner = torch.randint(0, 4, (64, 16), dtype=torch.uint8)
    expert, grad_y = torch.tensor(1), torch.randn(20, 64)

    def step():
        linear(x, w_own, None, owner, expert, bias).backward(grad_y)
    return step


def masked_adamw_step(provider: str):
    """One masked AdamW step over 12 blocks' segments (4 per block, as benchmarks/test_masked_adamw.py lays them
    out), 48 entries per segment."""
    segments, experts, per_segment = 48, 4, 48
    n = segments * per_segment
    params, grads, exp_avg, exp_avg_sq = (torch.randn(n) for _ in range(4))
    owner = torch.randint(0, experts, (n,), dtype=torch.uint8)
    offsets = torch.arange(0, n + 1, per_segment, dtype=torch.int64)
    selected = torch.randint(0, experts, (segments,))
    steps = torch.zeros(segments, experts + 1, dtype=torch.int64)
    weight_decay = torch.full((segments,), 0.01, dtype=torch.float64)
    tensors = (params, exp_avg, exp_avg_sq, steps, grads, owner, offsets, selected, weight_decay)
    launch = ADAMW._masked_adamw_triton_impl if provider == "eager" else torch.ops.fsosr.masked_adamw_triton_

    def step():
        launch(*tensors, 1e-3, 0.9, 0.999, 1e-6, 0, True)
    return step


CASES = {"moe layer fwd+bwd (topk_route + moe_mlp)": moe_layer_step,
         "sparse_linear fwd+bwd": sparse_linear_step,
         "masked_adamw_ step": masked_adamw_step}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_host_overhead(benchmark, stubbed_launches, case, provider):
    measure(benchmark, CASES[case](provider), group=f"host overhead, launches stubbed: {case}", provider=provider,
            baseline="registered", info={"op": "host_overhead", "case": case, "tensors": "cpu", "backend": provider},
            rounds=ROUNDS, host_only=True)
