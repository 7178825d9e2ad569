"""``fsosr::_cpu_gemm``, internal: the cpu backend's GEMM engine (csrc/cpu/gemm.h) on its own, for its tests and
benchmark. fp32 runs on oneDNN's AVX-512 batch-reduce GEMM ukernel through ATen (BLAS where that is unavailable),
fp64 and strided operands on ATen's BLAS. Not differentiable: the ops built on it compute their own gradients."""
from __future__ import annotations

import torch

from fsosr import _extension


def cpu_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``(c if given else 0) + a @ b`` for CPU tensors a [M, K], b [K, N], c [M, N], all fp32 or all fp64."""
    return torch.ops.fsosr._cpu_gemm(a, b, c)


if _extension.LOADED:
    @torch.library.register_fake("fsosr::_cpu_gemm")
    def _fake(a, b, c):
        return a.new_empty((a.shape[0], b.shape[1]))
