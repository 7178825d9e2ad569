"""One MoSA optimizer step for ViT-B/16 adapters: 12 blocks, N = 4 experts, d = 768, r = 64, split up projection
(MoSA's SHARE=down: shared down projection and adapter LayerNorm, 4 masked up-projection copies with biases).

Providers:
- `mosa_loop` (baseline): MoSA's trainer and optimizer: a Python loop ``p.grad *= p.mask`` over every parameter,
  then its HF AdamW, a Python loop of per-parameter tensor ops (torch-1.11 semantics: every expert has a grad).
- `torch_adamw_foreach`: the same masking with ``torch._foreach_mul_``, then ``torch.optim.AdamW(foreach=True)``
  (decay before the step, eps after bias correction: not MoSA's maths, but the same bytes moved).
- ours (`cpu`, and on CUDA `cuda` and `triton`): ``masked_adamw_`` over the compact flat buffer (one W_own + uint8
  owner map per up projection). Each provider that can run on the benchmark device is measured in the same run.
- on CUDA also `triton-fused`: the triton step as one launch (FSOSR_MASKED_ADAMW_TRITON_FUSED=1), and
  `cuda-graph` / `triton-graph` / `triton-fused-graph`: the same steps captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE, cuda_graphed, environment, measure, record_bandwidth
from fsosr import backends
from fsosr.ops.masked_adamw import SHARED, masked_adamw_

BLOCKS, N, D, R = 12, 4, 768, 64
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-6, 0.01
OURS = [b for b in ("cpu", "cuda", "triton") if backends.why_unavailable(b, DEVICE) is None]
# On a GPU ours also run captured in a CUDA graph ("-graph"): the step's device time, as a training loop that
# captures its optimizer step would see it (the step has no host synchronisation, so it captures).
# triton-fused: the triton step as one launch (FSOSR_MASKED_ADAMW_TRITON_FUSED=1; rules computed per program, the
# counters advanced by the last program), opt-in until measured here.
FUSED = ["triton-fused"] if "triton" in OURS and DEVICE.type == "cuda" else []
GRAPHED = [f"{b}-graph" for b in OURS + FUSED if b != "cpu"]
PROVIDERS = ["mosa_loop", "torch_adamw_foreach"] + OURS + FUSED + GRAPHED
# ViT-B/16's 12 blocks (36 MB of traffic: fits in an H100's 50 MB L2 and is launch-bound), and on a GPU also 16x as
# many blocks (570 MB), where the step streams from HBM and its bandwidth can be compared with the copy floor.
SIZES = {"vit_b16": BLOCKS} | ({"x16": 16 * BLOCKS} if DEVICE.type == "cuda" else {})
# Bytes per entry the fused step must move at least: params, exp_avg, exp_avg_sq read and written (fp32), the
# gradient read (fp32) and the owner map read (uint8).
FLOOR_BYTES_PER_ENTRY = 3 * 2 * 4 + 4 + 1


def seed_params(g, blocks=BLOCKS):
    """[(param, mask or None, weight decay)] for every trainable adapter tensor, the seed's way."""
    out = []
    for _ in range(blocks):
        out += [(torch.randn(D, generator=g), None, WD), (torch.randn(D, generator=g), None, 0.0),  # adapter_norm
                (torch.randn(R, D, generator=g), None, WD), (torch.randn(R, generator=g), None, 0.0)]  # down
        owner = torch.randperm(D * R, generator=g).reshape(D, R) % N
        for i in range(N):
            out += [(torch.randn(D, R, generator=g), (owner == i).float(), WD),
                    (torch.randn(D, generator=g), torch.ones(D), 0.0)]                      # BIAS=True: ones
    params = []
    for value, mask, wd in out:
        p = torch.nn.Parameter(value.to(DEVICE))
        p.grad = torch.randn(value.shape, generator=g).to(DEVICE)
        p.mask = None if mask is None else mask.to(DEVICE)
        p.weight_decay = wd
        params.append(p)
    return params


def mosa_loop_step(params, state):
    """MoSA's trainer.py masking loop followed by its HF AdamW (src/solver/optimizer.py), as written there."""
    for p in params:
        if p.grad is not None and p.mask is not None:
            p.grad.data *= p.mask
    for p in params:
        s = state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        s["step"] += 1
        s["exp_avg"].mul_(BETAS[0]).add_(p.grad, alpha=1 - BETAS[0])
        s["exp_avg_sq"].mul_(BETAS[1]).addcmul_(p.grad, p.grad, value=1 - BETAS[1])
        denom = s["exp_avg_sq"].sqrt().add_(EPS)
        step_size = LR * math.sqrt(1 - BETAS[1] ** s["step"]) / (1 - BETAS[0] ** s["step"])
        p.data.addcdiv_(s["exp_avg"], denom, value=-step_size)
        if p.weight_decay > 0:
            p.data.add_(p.data, alpha=-LR * p.weight_decay)


def flat_inputs(g, blocks=BLOCKS):
    """The compact flat buffers: per block 4 segments {shared weights, shared biases, W_own, per-expert biases}."""
    sizes, owners, wds = [], [], []
    for _ in range(blocks):
        sizes += [D + R * D, D + R, D * R, N * D]
        owners += [torch.full((D + R * D + D + R,), SHARED, dtype=torch.uint8),
                   (torch.randperm(D * R, generator=g) % N).to(torch.uint8),
                   torch.arange(N, dtype=torch.uint8).repeat_interleave(D)]
        wds += [WD, 0.0, WD, 0.0]
    n = sum(sizes)
    tensors = [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n),
               torch.cat(owners)]
    params, grads, exp_avg, exp_avg_sq, owner = (t.to(DEVICE) for t in tensors)
    offsets = torch.tensor([0] + sizes).cumsum(0).to(DEVICE)
    selected = torch.randint(0, N, (blocks,), generator=g).repeat_interleave(4).to(DEVICE)
    steps = torch.zeros(len(sizes), N + 1, dtype=torch.int64, device=DEVICE)
    wd = torch.tensor(wds, dtype=torch.float64, device=DEVICE)
    return params, grads, exp_avg, exp_avg_sq, owner, selected, offsets, steps, wd


def flat_step(provider: str, inputs):
    """One fused step over flat_inputs' buffers by `provider` (a backend, or triton-fused: the triton step as one
    launch)."""
    params, grads, exp_avg, exp_avg_sq, owner, selected, offsets, steps, wd = inputs
    backend, _, variant = provider.partition("-")
    variables = {"FSOSR_MASKED_ADAMW_TRITON_FUSED": "1" if variant == "fused" else "0"}

    def step():
        with environment(variables):
            masked_adamw_(params, grads, exp_avg, exp_avg_sq, owner, selected, lr=LR, betas=BETAS, eps=EPS,
                          weight_decay=wd, step=steps, semantics="mosa", segment_offsets=offsets, backend=backend)
    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_masked_adamw(benchmark, size, provider):
    g = torch.Generator().manual_seed(0)
    blocks = SIZES[size]
    if provider == "mosa_loop":
        params, state = seed_params(g, blocks), {}
        fn = lambda: mosa_loop_step(params, state)  # noqa: E731
        n_entries = sum(p.numel() for p in params)
    elif provider == "torch_adamw_foreach":
        params = seed_params(g, blocks)
        masked = [p for p in params if p.mask is not None]
        groups = [{"params": [p for p in params if p.weight_decay > 0], "weight_decay": WD},
                  {"params": [p for p in params if p.weight_decay == 0], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True)

        def fn():
            torch._foreach_mul_([p.grad for p in masked], [p.mask for p in masked])
            opt.step()
        n_entries = sum(p.numel() for p in params)
    else:
        inputs = flat_inputs(g, blocks)
        fn = flat_step(provider.removesuffix("-graph"), inputs)
        if provider.endswith("-graph"):
            fn = cuda_graphed(fn)
        n_entries = inputs[0].numel()
    measure(benchmark, fn, group=f"masked_adamw ViT-B/16 adapters blocks={blocks} N={N} d={D} r={R} split=up",
            provider=provider, baseline="mosa_loop",
            info={"op": "masked_adamw_", "blocks": blocks, "experts": N, "d": D, "r": R, "dtype": "float32",
                  "semantics": "mosa", "entries": n_entries, "backend": provider})
    compact_entries = blocks * (D + R * D + D + R + D * R + N * D)  # = flat_inputs' buffer
    record_bandwidth(benchmark, compact_entries * FLOOR_BYTES_PER_ENTRY)
