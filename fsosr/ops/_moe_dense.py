"""FSMoE's per-expert-input MoE in its dense-masked form, for CUDA tensors: every expert on every unit as two
batched GEMMs (cuBLAS, tensor cores), the experts a unit did not pick weighted by a zero gate. It does E/k times
the routed work but, at FSMoE's shape (B 32, E 11, k 5, 768 -> 1536 -> 512), runs forward+backward in 1.9 ms
against 5.8 ms for the routed SIMT cuda kernels on an H100 (benchmarks/results/2026-11-22-h100-c.json: ``cuda``
vs ``cuda-routed``; stock-PyTorch ``dense_masked`` 1.1 ms), and the Triton kernels cannot hold h = 1536 on chip.

Same semantics as :func:`fsosr.ops.reference.moe_mlp_per_expert_input`: the dropout mask of (unit, slot) is the
one every backend hashes from the seed, so the dense form keeps exactly the activations the routed form keeps.
Differentiable torch ops, plus (fp32 accumulation, Triton usable) one Triton kernel for the [E, B, h] dropout
multipliers (kernels/moe_mlp_dense.py), registered as a torch.library op: autograd, torch.compile and CUDA graphs
handle it as they handle any torch code.
"""
from __future__ import annotations

import os

import torch

from fsosr import backends
from fsosr.ops import _eager, reference
from fsosr.ops._rng import Seed, seed_key_tensor

MAX_EXPERTS_PER_SLOT = 4   # dense when E <= 4k: at most 4x the routed FLOPs (FSMoE: 11 / 5 = 2.2x)


PATH_VALUES = ("auto", "routed", "dense")


def forced_path() -> str | None:
    """``FSOSR_MOE_MLP_PATH``: ``routed`` or ``dense`` forces the cpu / cuda moe_mlp path (read here and by
    csrc/cpu/moe_mlp_dense.cpp); unset, empty or ``auto`` leaves it to the shape rule (None). Any other value
    raises, so that a typo ("Dense") is not silently ignored."""
    value = os.environ.get("FSOSR_MOE_MLP_PATH", "")
    if value not in ("",) + PATH_VALUES:
        raise ValueError(f"FSOSR_MOE_MLP_PATH must be routed, dense or auto (or unset), got {value!r}")
    return value if value in ("routed", "dense") else None


def use_dense_per_expert(num_experts: int, k: int) -> bool:
    """The cuda backend's shape rule for per-expert inputs; ``FSOSR_MOE_MLP_PATH=routed|dense`` forces a path."""
    forced = forced_path()
    if forced is not None:
        return forced == "dense"
    return num_experts <= MAX_EXPERTS_PER_SLOT * k


@torch.library.custom_op("fsosr::expert_dropout_multipliers_triton", mutates_args=())
def _triton_multipliers(indices: torch.Tensor, num_experts: int, hidden: int, dropout: float,
                        seed_key: torch.Tensor) -> torch.Tensor:
    return _triton_multipliers_impl(indices, num_experts, hidden, dropout, seed_key)


def _triton_multipliers_impl(indices, num_experts, hidden, dropout, seed_key):
    from fsosr._triton import moe_mlp_dense as kernels  # noqa: PLC0415 - Triton is imported on first use only

    return kernels.expert_dropout_multipliers(indices, num_experts, hidden, dropout, seed_key)


@_triton_multipliers.register_fake
def _fake_multipliers(indices, num_experts, hidden, dropout, seed_key):
    return indices.new_empty((num_experts, indices.shape[0], hidden), dtype=torch.float32)


def expert_dropout_multipliers(indices: torch.Tensor, num_experts: int, hidden: int, dropout: float, seed: Seed,
                               dtype: torch.dtype, use_triton: bool | None = None) -> torch.Tensor:
    """[E, B, h] in ``dtype``: keep/(1 - p) where expert e of unit b keeps hidden unit c under the mask of the slot
    that picked it, 0 for the experts no slot picked (their gate is 0 too). ``use_triton`` (default: for fp32
    where Triton runs) takes the one-launch kernel; else torch ops (fp64: 1/(1 - p) in double, as the reference)."""
    if use_triton is None:
        use_triton = dtype == torch.float32 and backends.why_unavailable("triton", indices.device) is None
    if use_triton:
        if dtype != torch.float32:
            raise ValueError(f"the Triton dropout multipliers are fp32, asked for {dtype}")
        run = _triton_multipliers_impl if _eager.use_eager_path() else _triton_multipliers
        return run(indices, num_experts, hidden, float(dropout), seed_key_tensor(seed, indices.device))
    num_units, k = indices.shape
    keep = reference.dropout_keep_mask(seed, dropout, num_units, k, 1, hidden, indices.device)[:, :, 0]
    # Expert e of unit b takes the mask of the slot j that picked it; experts no slot picked keep zeros. Top-k
    # indices of a unit are distinct, so the scatter writes each element at most once.
    mask = torch.zeros(num_units, num_experts, hidden, dtype=dtype, device=indices.device).scatter_(
        1, indices.long()[:, :, None].expand(num_units, k, hidden), keep.to(dtype) / (1.0 - dropout))
    return mask.transpose(0, 1)


def moe_mlp_per_expert_input_dense(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor,
                                   b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str,
                                   scale: float, dropout: float, seed: Seed) -> torch.Tensor:
    """x [E, B, d], indices/gates [B, k] -> [B, d_out] in x's dtype. fp16/bf16 inputs are computed in fp32 (the
    GEMMs are small at this form's shapes; the routed kernels, too, keep the pre-activations in fp32, and a bf16
    pre-activation measurably worsened the gradients)."""
    out_dtype = x.dtype
    acc = reference.accumulation_dtype(x.dtype)
    x, w1, b1, w2, b2 = (t.to(acc) for t in (x, w1, b1, w2, b2))
    num_experts, num_units, _ = x.shape
    hidden_width = w1.shape[2]
    slots = indices.long()
    # Few, large kernels: on the H100 host each small torch op costs 25-40 us of host time, which at this form's
    # sizes outweighs its device time (the step is host-bound), so the dropout multipliers are one launch and the
    # gates one scatter.
    hidden = reference.ACTIVATIONS[activation](torch.baddbmm(b1[:, None, :], x, w1))       # [E, B, h]
    if dropout > 0:
        hidden = hidden * expert_dropout_multipliers(indices, num_experts, hidden_width, dropout, seed, acc)
    out = torch.baddbmm(b2[:, None, :], hidden, w2)                                       # [E, B, d_out]
    scaled_gates = torch.zeros(num_units, num_experts, dtype=acc, device=x.device).scatter(
        1, slots, gates.to(acc) * scale)
    return torch.einsum("be,ebo->bo", scaled_gates, out).to(out_dtype)
