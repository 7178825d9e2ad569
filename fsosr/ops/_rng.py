"""Seeded standard-normal draws that are the same on every device and backend.

``torch.randn`` with a generator differs between CPU and CUDA and breaks ``torch.compile`` graphs; routing noise
"from a seed" must instead be reproducible anywhere, so it comes from a counter-based hash (each element's value
depends only on (seed, element index)) followed by Box-Muller. Only integer tensor ops are used, so it traces
under ``torch.compile`` and captures in CUDA graphs.

The hash is SplitMix64 on int64 tensors. It relies on int64 multiplication wrapping modulo 2**64, which is what
PyTorch's integer kernels do on every device; right shifts are arithmetic in PyTorch, so their sign-extended
high bits are masked off to get logical shifts.
"""
from __future__ import annotations

import math
from typing import Union

import torch

_U64 = (1 << 64) - 1


def _signed(u: int) -> int:
    """The int64 value with the same 64 bits as the unsigned integer u."""
    u &= _U64
    return u - (1 << 64) if u >= (1 << 63) else u


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    z = x * _GOLDEN + _GOLDEN  # the counter's step; x*golden spreads consecutive counters apart
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


_KEY_MUL = _signed(0xD1B54A32D192ED03)
_KEY_ADD = _signed(0x8CB92BA72F3D8DD7)


def _seed_key(seed: int) -> int:
    """A 64-bit key mixed into every counter, computed with Python ints (no tensor -> int conversion, so
    nothing here breaks a compiled graph)."""
    return _signed((seed & _U64) * _KEY_MUL + _KEY_ADD)


Seed = Union[int, torch.SymInt, torch.Tensor]


def is_seed(seed) -> bool:
    """An int, or a 0-d integer tensor (not bool): the seeds the ops take."""
    if isinstance(seed, torch.Tensor):
        return seed.dim() == 0 and not seed.is_floating_point() and not seed.is_complex() and seed.dtype != torch.bool
    return isinstance(seed, (int, torch.SymInt)) and not isinstance(seed, bool)


def seed_key_tensor(seed: Seed, device: torch.device | str = "cpu") -> torch.Tensor:
    """The key of :func:`_seed_key` as a 0-d int64 tensor: what the native ops take.

    - an int: computed with Python ints, in a new CPU tensor (the kernels read it on the host: no transfer, where
      a new tensor on the GPU would be a synchronising copy);
    - a 0-d integer tensor: ``seed * MUL + ADD`` in int64 tensor arithmetic, which wraps modulo 2**64 and so
      gives the same bits as the int form, on the seed's device. A seed tensor on the GPU keeps the key there: a
      CUDA graph that advances the seed in place draws fresh masks at every replay (an int is baked in at capture);
    - an int inside torch.compile: with tensor arithmetic too, on ``device``, since dynamo turns an int that
      changes between calls into a symbolic one, on which Python's 64-bit arithmetic would be traced into index
      expressions that Inductor cannot print (the seed must then fit int64); made on the ops' device, because a
      CPU tensor in a graph keeps Inductor from capturing it in a CUDA graph.
    """
    if isinstance(seed, torch.Tensor):
        return seed.to(torch.int64) * _KEY_MUL + _KEY_ADD
    if isinstance(seed, torch.SymInt) or torch.compiler.is_compiling():
        return torch.scalar_tensor(seed, dtype=torch.int64, device=device) * _KEY_MUL + _KEY_ADD
    return torch.tensor(_seed_key(seed), dtype=torch.int64)


def _key_like(seed: Seed, device: torch.device) -> int | torch.Tensor:
    """The key to XOR into counters on ``device``: an int, or a 0-d tensor there."""
    if isinstance(seed, torch.Tensor):
        if seed.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
            return _seed_key(int(seed))     # a host read of host memory; a copy to the device would synchronise
        return seed_key_tensor(seed).to(device)
    if isinstance(seed, torch.SymInt) or torch.compiler.is_compiling():
        return seed_key_tensor(seed, device)
    return _seed_key(seed)


def normal_from_seed(shape: tuple[int, ...], seed: Seed, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal draws of ``shape``, a pure function of ``seed`` and the element index. ``seed``: an int, or
    a 0-d integer tensor (the same draws as its value; on the GPU nothing is read back to the host)."""
    if not is_seed(seed):
        raise TypeError(f"seed must be an int or a 0-d integer tensor, got {describe(seed)}")
    numel = math.prod(shape)
    # Mix the counter with a hash of the seed (computed with Python ints for an int: no tensor -> int conversion,
    # so nothing here breaks a compiled graph). XOR rather than +: Inductor folds arange + constant (and products
    # of it) into exact index arithmetic that no longer wraps modulo 2**64, and fails to print the result as int64.
    bits = _splitmix64(torch.arange(numel, dtype=torch.int64, device=device) ^ _key_like(seed, torch.device(device)))
    # Two 32-bit uniforms per element from the low and high halves of one 64-bit hash.
    u1 = ((bits & 0xFFFFFFFF).to(torch.float64) + 1.0) * (1.0 / 4294967296.0)  # (0, 1]: log is finite
    u2 = _shr(bits, 32).to(torch.float64) * (1.0 / 4294967296.0)                # [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype).reshape(shape)


def uniform_from_seed(counters: torch.Tensor, seed: Seed) -> torch.Tensor:
    """Uniform draws in [0, 1) (fp32, 24 random bits) for the given int64 element counters and seed.

    Dropout masks are ``uniform_from_seed(counter, seed) >= p``; kernels evaluate the same integer hash of the
    same counter, so every backend draws the same mask and the backward recomputes it instead of storing it.
    """
    if not is_seed(seed):
        raise TypeError(f"seed must be an int or a 0-d integer tensor, got {describe(seed)}")
    bits = _splitmix64(counters.to(torch.int64) ^ _key_like(seed, counters.device))
    return _shr(bits, 40).to(torch.float32) * (1.0 / 16777216.0)


def describe(value) -> str:
    """A bad seed for an error message: a tensor by dtype and shape (its repr would break a torch.compile trace),
    anything else by repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)
