"""FSMoE's per-expert-input MoE in its dense-masked form, for CUDA tensors: every expert on every unit as two
batched GEMMs (cuBLAS, tensor cores), the experts a unit did not pick weighted by a zero gate. It does E/k times
the routed work but, at FSMoE's shape (B 32, E 11, k 5, 768 -> 1536 -> 512), runs forward+backward in 2.4 ms
against 6.1 ms for the routed SIMT cuda kernels on an H100 (benchmarks/results/2026-11-22-h100.json, stock-PyTorch
`dense_masked` provider), and the Triton kernels cannot hold h = 1536 on chip.

Same semantics as :func:`fsosr.ops.reference.moe_mlp_per_expert_input`: the dropout mask of (unit, slot) is the
one every backend hashes from the seed, so the dense form keeps exactly the activations the routed form keeps.
Plain differentiable torch ops: autograd, torch.compile and CUDA graphs handle it as they handle any torch code.
"""
from __future__ import annotations

import os

import torch

from fsosr.ops import reference

MAX_EXPERTS_PER_SLOT = 4   # dense when E <= 4k: at most 4x the routed FLOPs (FSMoE: 11 / 5 = 2.2x)


def use_dense_per_expert(num_experts: int, k: int) -> bool:
    """The cuda backend's shape rule for per-expert inputs; ``FSOSR_MOE_MLP_PATH=routed|dense`` forces a path."""
    forced = os.environ.get("FSOSR_MOE_MLP_PATH")
    if forced in ("routed", "dense"):
        return forced == "dense"
    return num_experts <= MAX_EXPERTS_PER_SLOT * k


def moe_mlp_per_expert_input_dense(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor,
                                   b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str,
                                   scale: float, dropout: float, seed: int) -> torch.Tensor:
    """x [E, B, d], indices/gates [B, k] -> [B, d_out] in x's dtype. fp16/bf16 inputs are computed in fp32 (the
    GEMMs are small at this form's shapes; the routed kernels, too, keep the pre-activations in fp32, and a bf16
    pre-activation measurably worsened the gradients)."""
    out_dtype = x.dtype
    acc = reference.accumulation_dtype(x.dtype)
    x, w1, b1, w2, b2 = (t.to(acc) for t in (x, w1, b1, w2, b2))
    num_experts, num_units, _ = x.shape
    k, hidden_width = indices.shape[1], w1.shape[2]
    slots = indices.long()
    # Few, large kernels: on the H100 host each small torch op costs 25-40 us of host time, which at this form's
    # sizes outweighs its device time (the step is host-bound), so masks and gates are built with one scatter each.
    hidden = reference.ACTIVATIONS[activation](torch.baddbmm(b1[:, None, :], x, w1))       # [E, B, h]
    if dropout > 0:
        keep = reference.dropout_keep_mask(seed, dropout, num_units, k, 1, hidden_width, x.device)[:, :, 0]
        # Expert e of unit b takes the mask of the slot j that picked it; experts no slot picked keep zeros (their
        # gate is 0 too). Top-k indices of a unit are distinct, so the scatter writes each element at most once.
        mask = hidden.new_zeros(num_units, num_experts, hidden_width).scatter_(
            1, slots[:, :, None].expand(num_units, k, hidden_width), keep.to(acc) / (1.0 - dropout))
        hidden = hidden * mask.transpose(0, 1)
    out = torch.baddbmm(b2[:, None, :], hidden, w2)                                       # [E, B, d_out]
    scaled_gates = torch.zeros(num_units, num_experts, dtype=acc, device=x.device).scatter(
        1, slots, gates.to(acc) * scale)
    return torch.einsum("be,ebo->bo", scaled_gates, out).to(out_dtype)
