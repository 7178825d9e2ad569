"""Host-side arithmetic of the launchers (grids, padded sizes).

Plain Python on purpose: ``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunctions since Triton 3.5,
whose host calls unwrap their arguments through a generic wrapper, 1.7 µs a call against 0.02 µs here (Triton 3.8,
this project's 2-core CPU); an eager MoE layer step made 21 such calls (benchmarks/test_host_overhead.py).
"""
import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def scalar_argument(scalar, like: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(pointer tensor, value, FROM_PTR) of an integer scalar a kernel reads (MoSA's expert id, moe_mlp's dropout
    key). An int, or a tensor on the CPU for a kernel elsewhere, travels by value: a host read of host memory, no
    synchronisation. A tensor on the kernel's device is loaded by the kernel, so a CUDA graph sees it change in
    place. ``like``: a tensor on the kernel's device, passed as the by-value form's unused pointer."""
    if not isinstance(scalar, torch.Tensor) or (scalar.device.type == "cpu" and like.device.type != "cpu"):
        return like, int(scalar), False
    return scalar.to(torch.int64).reshape(1), 0, True
