"""The cpu backend's GEMM engine (csrc/cpu/gemm.h, `fsosr::_cpu_gemm`) against ATen's matmul, fp32, at the GEMM
shapes of the moe_mlp adapter step on the CPU (16 samples x 197 tokens x k 2 = 6304 routed rows, d 768, r 64) and
at FSMoE's expert width (768 -> 1536).

Providers: `torch_mm` (torch.mm: MKL's sgemm on x86), `cpu_gemm` (oneDNN's brgemm ukernel through ATen, in our
blocks), `cpu_gemm_blas` (the same blocks with oneDNN switched off: ATen's brgemm falls back to its BLAS gemm).
GFLOP/s in extra_info. CPU only: on a GPU these rows are skipped.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, measure
from fsosr import _extension

SHAPES = {  # name: (M, N, K)
    "adapter down x@w1": (6304, 64, 768),
    "adapter up hid@w2": (6304, 768, 64),
    "adapter grad_w1 dpre^T@x": (64, 768, 6304),
    "fsmoe expert x@w1": (2048, 1536, 768),
}
PROVIDERS = ["torch_mm", "cpu_gemm", "cpu_gemm_blas"]


@pytest.mark.skipif(DEVICE.type != "cpu" or not _extension.LOADED, reason="the CPU GEMM engine (native, CPU runs)")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_gemm(benchmark, shape, provider):
    m, n, k = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    gemm = torch.ops.fsosr._cpu_gemm

    def run():
        if provider == "torch_mm":
            return torch.mm(a, b, out=out)
        if provider == "cpu_gemm":
            return gemm(a, b, None)
        torch.backends.mkldnn.enabled = False
        try:
            return gemm(a, b, None)
        finally:
            torch.backends.mkldnn.enabled = True

    measure(benchmark, run, group=f"gemm fp32 {shape} M={m} N={n} K={k}", provider=provider, baseline="torch_mm",
            info={"op": "cpu_gemm", "shape": [m, n, k]})
    if benchmark.stats is not None:
        benchmark.extra_info["gflops"] = 2 * m * n * k / benchmark.stats.stats.median / 1e9
