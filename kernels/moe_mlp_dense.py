"""Triton kernel of the dense-masked per-expert-input path (fsosr/ops/_moe_dense.py, the cuda backend's form of
FSMoE's layer experts): the dropout multipliers of every (expert, unit) pair in one launch.

The dense form runs every expert on every unit, so it needs the mask in [E, B, h] layout: expert e of unit b takes
the mask of the slot j that picked it (the routed kernels' counter (b*k + j)*h + c, fsosr/ops/_rng.py's hash), an
expert no slot picked gets zeros. In torch ops that is about twenty elementwise kernels (the SplitMix64 rounds on
int64 tensors, a scatter, a transpose), each a launch whose host cost (25-40 µs on the H100 host of 2026-11-22)
outweighed its device time at FSMoE's sizes; here it is one.
"""
import torch
import triton
import triton.language as tl

from .moe_mlp_device import _dropout_multiplier, _seed, dropout_arguments
from ._launch import cdiv, next_power_of_2

BLOCK_H = 512     # hidden columns per program (FSMoE: h = 1536, three programs per (expert, unit))


@triton.jit(do_not_specialize=["seed_value"])   # a key divisible by 16 would compile anew
def _expert_dropout_kernel(indices_ptr, out_ptr, num_units, k, hidden, dropout, keep_scale, seed_value, seed_ptr,
                           SEED_FROM_PTR: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    seed_key = _seed(seed_value, seed_ptr, SEED_FROM_PTR)
    unit = tl.program_id(0).to(tl.int64)         # axis 0: up to 2^31 - 1 programs (axes 1, 2: 65535)
    expert = tl.program_id(1)
    slots = tl.arange(0, K_PAD)
    picked = tl.load(indices_ptr + unit * k + slots, mask=slots < k, other=-1) == expert
    # A unit's top-k experts are distinct: at most one slot matches.
    hit = tl.max(picked.to(tl.int32), axis=0) > 0
    slot = tl.sum(tl.where(picked, slots, 0), axis=0).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    multiplier = _dropout_multiplier((unit * k + slot) * hidden + cols, seed_key, dropout, keep_scale)
    multiplier = tl.where(hit, multiplier, 0.0)
    tl.store(out_ptr + (expert * num_units + unit) * hidden + cols, multiplier, mask=cols < hidden)


def expert_dropout_multipliers(indices: torch.Tensor, num_experts: int, hidden: int, dropout: float,
                               seed_key) -> torch.Tensor:
    """indices [B, k] (distinct per row) -> fp32 [E, B, h]: 1/fp32(1 - p) where expert e of unit b keeps hidden
    unit c, 0 where it drops it or no slot of b picked e."""
    num_units, k = indices.shape
    out = torch.empty(num_experts, num_units, hidden, dtype=torch.float32, device=indices.device)
    if out.numel() == 0:
        return out
    drop_args, drop_flag = dropout_arguments(dropout, seed_key, indices)
    grid = (num_units, num_experts, cdiv(hidden, BLOCK_H))
    _expert_dropout_kernel[grid](indices.contiguous(), out, num_units, k, hidden, *drop_args, **drop_flag,
                                 K_PAD=next_power_of_2(max(k, 1)), BLOCK_H=BLOCK_H, num_warps=4)
    return out
