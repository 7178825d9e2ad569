"""Small driver for compute-sanitizer over every code path of the cuda moe_mlp kernels (not a pytest file).

    compute-sanitizer --tool memcheck  python tests/ops/moe_mlp_cuda_sanitize.py
    compute-sanitizer --tool initcheck python tests/ops/moe_mlp_cuda_sanitize.py   # reads of never-written memory
    compute-sanitizer --tool racecheck python tests/ops/moe_mlp_cuda_sanitize.py   # shared-memory races

Paths covered: k = 1 with y/grad_x written directly; k >= 2 with fp32 slot buffers and the ordered slot sum;
hidden > 128 (several on-chip chunks whose partials are read back); per-expert input (direct and buffered grad_x);
empty experts; fp32/fp16/bf16; dropout on and off; tiles that end mid-block (odd row counts). Each case also
compares with the cpu backend and prints the largest differences, so a run doubles as a quick smoke test.
Exits non-zero when a difference exceeds its tolerance.
"""
from __future__ import annotations

import sys

import torch

from fsosr.ops import moe_mlp, moe_mlp_per_expert_input, topk_route

# (E, k, d, h, d_out, G, N, per_expert, dropout)
CASES = [
    (3, 1, 33, 20, 17, 5, 3, False, 0.0),    # k = 1: direct y / grad_x
    (4, 2, 70, 47, 65, 1, 37, False, 0.3),   # k = 2: slot buffers; 37 units -> partial tiles
    (3, 2, 40, 150, 30, 3, 5, False, 0.1),   # hidden > 128: two chunks
    (5, 1, 16, 130, 8, 1, 9, False, 0.0),    # k = 1 with two chunks: buffered
    (6, 3, 24, 40, 12, 1, 7, True, 0.2),     # per-expert input, one chunk: direct grad_x into zeros
    (6, 2, 24, 200, 12, 1, 7, True, 0.0),    # per-expert input, two chunks: zero-filled fp32 buffer
    (9, 2, 20, 16, 20, 2, 4, False, 0.0),    # 9 experts, 4 units: at least 5 experts empty
]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def run(case, dtype, device):
    e, k, d, h, d_out, g, n, per_expert, p = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*((e, n, d) if per_expert else (n * g, d)), generator=gen)
    logits = torch.randn(n, e, generator=gen)
    weights = [torch.randn(*s, generator=gen) * 0.2 for s in [(e, d, h), (e, h), (e, h, d_out), (e, d_out)]]
    grad = torch.randn(n if per_expert else n * g, d_out, generator=gen)
    x, *weights = (t.to(device, dtype).requires_grad_() for t in [x] + weights)
    routing = topk_route(logits.to(device), k, backend="cuda" if device.type == "cuda" else "cpu")
    gates = routing.gates.detach().requires_grad_()
    routing = routing._replace(gates=gates)
    backend = "cuda" if device.type == "cuda" else "cpu"
    if per_expert:
        y = moe_mlp_per_expert_input(x, routing, *weights, activation="gelu", scale=0.5, dropout=p, seed=1,
                                     backend=backend)
    else:
        y = moe_mlp(x, routing, *weights, group_size=g, activation="gelu", scale=0.5, dropout=p, seed=1,
                    backend=backend)
    grads = torch.autograd.grad(y, [x, gates, *weights], grad.to(device, dtype))
    return [t.detach().float().cpu() for t in (y, *grads)]


def main() -> int:
    device = torch.device("cuda")
    failures = 0
    for case in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cuda_out = run(case, dtype, device)
            torch.cuda.synchronize()
            cpu_out = run(case, torch.float32, torch.device("cpu"))
            worst = max(float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0
                        for a, b in zip(cuda_out, cpu_out))
            ok = worst <= TOLERANCE[dtype]
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case} {str(dtype):15s} max scaled diff {worst:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
