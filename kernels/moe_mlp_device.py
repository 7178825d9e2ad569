"""Device helpers shared by the Triton moe_mlp kernels (kernels/moe_mlp.py: expert-sorted tiles,
kernels/moe_mlp_units.py: unit tiles): the dot with its precision policy, activations and their derivatives, and
the counter-hash dropout of fsosr/ops/_rng.py."""
import functools
import os
import types

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2, scalar_argument

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# fp32 dots: 3xTF32 on the GPU (fp32-level error, 5e-7 relative measured on an H100, and 1.3-8x faster than
# "ieee", which Triton runs on FMA units). The interpreter multiplies in fp32 whatever it is told.
FP32_PRECISION = tl.constexpr("ieee" if _INTERPRET else "tf32x3")


def _pow2_at_least_16(n: int, cap: int | None = None) -> int:
    p = max(16, next_power_of_2(max(n, 1)))
    return p if cap is None else min(p, cap)


def _num_warps(h_pad: int) -> int:
    # The [64, H_PAD] fp32 accumulators (two or three live at once) must stay in registers.
    return 4 if h_pad <= 64 else 8


# Launch options a GPU tuning session may override (benchmarks/test_moe_mlp_tuning.py), with their allowed values:
# warps / stages of the forward and rows-pass kernels (either tiling), and of the weight-gradient kernel with its
# row step (the GEMM's K), output block and row chunks per expert (partials summed in a fixed order after); the
# longest row tile of the unit-tiled kernels.
TUNE_VARIABLE = "FSOSR_MOE_MLP_TRITON_TUNE"
TUNABLE = {"warps": (2, 4, 8, 16), "stages": (1, 2, 3, 4, 5, 6),
           "weight_warps": (2, 4, 8, 16), "weight_stages": (1, 2, 3, 4, 5, 6),
           "weight_rows": (16, 32, 64, 128, 256), "weight_block_d": (16, 32, 64, 128, 256),
           "weight_splits": (1, 2, 3, 4, 6, 8, 12, 16), "unit_rows": (16, 32, 64, 128)}


@functools.lru_cache(maxsize=32)
def _parse_tuning(text: str) -> types.MappingProxyType:
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in TUNABLE:
            raise ValueError(f"{TUNE_VARIABLE}: unknown option {key!r}; options: {', '.join(TUNABLE)}")
        if not value.strip().isdigit() or int(value) not in TUNABLE[key]:
            raise ValueError(f"{TUNE_VARIABLE}: {key} must be one of {TUNABLE[key]}, got {value.strip()!r}")
        options[key] = int(value)
    return types.MappingProxyType(options)      # cached: read-only


def tuning() -> types.MappingProxyType:
    """The launch options set by FSOSR_MOE_MLP_TRITON_TUNE, e.g. ``warps=8,weight_rows=64`` (keys: TUNABLE): a
    knob for measuring alternatives on a GPU, not a user setting; unset, every kernel keeps its rule."""
    return _parse_tuning(os.environ.get(TUNE_VARIABLE, ""))


def launch_options(default_warps: int, prefix: str = "") -> dict:
    """num_warps (and num_stages where tuned) of a launch: the tuned ``{prefix}warps`` / ``{prefix}stages`` or the
    kernel's rule (Triton's default stages)."""
    tuned = tuning()
    options = {"num_warps": tuned.get(prefix + "warps", default_warps)}
    if prefix + "stages" in tuned:
        options["num_stages"] = tuned[prefix + "stages"]
    return options


def _upcast(dtype) -> bool:
    """Whether dots cast their operands to fp32: for fp32 data (then tf32x3), and always in the interpreter,
    whose bf16 tl.dot is wrong."""
    return _INTERPRET or dtype == torch.float32


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _activation(pre, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(pre, 0.0)
    elif ACT == 1:
        out = 0.5 * pre * (1.0 + tl.erf(pre * 0.7071067811865476))
    elif ACT == 2:
        out = pre * tl.sigmoid(1.702 * pre)
    else:
        out = pre
    return out


@triton.jit
def _activation_grad(pre, ACT: tl.constexpr):
    if ACT == 0:
        grad = tl.where(pre > 0.0, 1.0, 0.0)          # torch's relu backward: 0 at 0
    elif ACT == 1:
        grad = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476)) + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre)
    elif ACT == 2:
        s = tl.sigmoid(1.702 * pre)
        grad = s + 1.702 * pre * s * (1.0 - s)
    else:
        grad = tl.full(pre.shape, 1.0, tl.float32)
    return grad


def dropout_arguments(dropout: float, seed_key, like: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' dropout arguments: ((dropout, keep_scale, seed value, seed pointer), {SEED_FROM_PTR}).

    The threshold is fp32(p), the value `uniform >= p` compares with on every backend; the scale is 1/fp32(1 - p)
    with 1 - p taken in double, as the cpu and cuda kernels have it. A kernel cannot take 1 - p itself: a compiled
    launch passes Python floats as fp32, and 1 - fp32(p) is 0.14% off at p = 0.99999 (tests/conftest.py rounds
    float arguments the same way under the interpreter, which would otherwise keep the double).

    seed_key: the ops' 0-d int64 key tensor (fsosr.ops._rng.seed_key_tensor), or an int. A key on the CPU for
    tensors elsewhere travels by value (a host read of host memory, no synchronisation); a key on the kernel's
    device is loaded by the kernel, so a CUDA graph that advances it in place draws fresh masks at every replay.
    ``like``: a tensor on the kernel's device, passed as the unused pointer of the by-value form."""
    if dropout <= 0:
        return (0.0, 1.0, 0, like), {"SEED_FROM_PTR": False}
    threshold = float(np.float32(dropout))
    keep_scale = float(np.float32(1.0) / np.float32(1.0 - dropout))
    pointer, value, from_pointer = scalar_argument(seed_key, like)
    return (threshold, keep_scale, value, pointer), {"SEED_FROM_PTR": from_pointer}


@triton.jit
def _seed(seed_value, seed_ptr, FROM_PTR: tl.constexpr):
    """The dropout key: loaded from ``seed_ptr`` or given by value (see dropout_arguments)."""
    if FROM_PTR:
        key = tl.load(seed_ptr).to(tl.int64)
    else:
        key = seed_value.to(tl.int64)
    return key


@triton.jit
def _dropout_multiplier(counter, seed_key, dropout, keep_scale):
    """keep_scale (1/(1-p)) where element `counter` is kept, else 0: SplitMix64(counter ^ seed_key) as in
    fsosr/ops/_rng.py, in uint64 so that products wrap modulo 2^64 and right shifts are logical."""
    z = (counter.to(tl.int64) ^ seed_key).to(tl.uint64, bitcast=True)
    z = z * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    uniform = (z >> 40).to(tl.float32) * (1.0 / 16777216.0)   # exact: 24 bits
    return tl.where(uniform >= dropout, keep_scale, 0.0)


@triton.jit
def _hidden(pre, counter, seed_key, dropout, keep_scale, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    hid = _activation(pre, ACT)
    if HAS_DROPOUT:
        hid = hid * _dropout_multiplier(counter, seed_key, dropout, keep_scale)
    return hid
