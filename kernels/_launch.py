"""Host-side arithmetic of the launchers (grids, padded sizes).

Plain Python on purpose: ``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunctions since Triton 3.5,
whose host calls unwrap their arguments through a generic wrapper, 1.7 µs a call against 0.02 µs here (Triton 3.8,
this project's 2-core CPU); an eager MoE layer step made 21 such calls (benchmarks/test_host_overhead.py).
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
