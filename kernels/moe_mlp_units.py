"""Triton moe_mlp kernels tiled by routing unit: forward and the backward's rows pass for a shared input routed per
sample (G consecutive rows follow one unit's k experts), with the k experts combined on chip.

Why. The expert-sorted kernels (kernels/moe_mlp.py) tile routed rows of one expert, so with k >= 2 each slot's
output goes to an fp32 per-slot buffer [N*k*G, d] that a second kernel sums: at MoE-Adapters4CL's shape (64 x 197
tokens, d 768, k 2, bf16) that is 77 MB written and read again in the forward and once more for grad_x, against
about 117 MB that a whole fwd+bwd step must move at least. When all G rows of a unit share their experts, the k
experts of the unit are one MLP whose hidden row is the concatenation of theirs:

    y[n*G + t] = [g_1 s hid_1 | ... | g_k s hid_k] @ [w2[e_1]; ...; w2[e_k]] + s * sum_j g_j b2[e_j]
    hid_j      = drop(act(x[n*G + t] @ w1[e_j] + b1[e_j]))

so a program owns BLOCK_M tokens of one unit and runs two GEMMs of inner width k*h (<= KH_PAD, on chip) on weight
tiles gathered column by column from the k experts: x is read once, y (and grad_x) written once in x's dtype, no
per-slot buffer, no combine pass. The j-sum happens inside the dot's fp32 accumulation (fixed order: the kernel is
deterministic). The weight gradients stay expert-sorted (kernels/moe_mlp.py's weight pass, reading dpre and the
scaled hidden rows by slot row).

Column c of the concatenated hidden row is hidden column hc = c % h of slot j = c // h. Numbering as in
kernels/moe_mlp.py: slot row q = (n*k + j)*G + t (hidden_pre, dpre, dropout counter q*h + hc), output row n*G + t.
Grid (N, cdiv(G, BLOCK_M)): units on axis 0, whose limit is 2^31 - 1.
"""
import triton
import triton.language as tl

from .moe_mlp_device import _activation, _activation_grad, _dropout_multiplier, _hidden, _mma, _num_warps, \
    _pow2_at_least_16, _seed, _upcast, dropout_arguments, launch_options, tuning
from ._launch import cdiv, next_power_of_2

BLOCK_K = 64            # d chunk of the first GEMM / of grad_x
BLOCK_N = 64            # d_out chunk of the second GEMM / of dyW
MAX_WIDTH = 128         # k*h, padded to a power of two, that a program keeps on chip (the [BLOCK_M, k*h] fp32
                        # accumulators; the expert-sorted kernels' H_PAD limit, whose footprint is the same)


def fits(k: int, h: int) -> bool:
    """Whether the concatenated hidden row of k experts of width h fits a program."""
    return h > 0 and k * h <= MAX_WIDTH


def _block_m(G: int) -> int:
    # A tile never spans two units (they route to different experts): short units get short tiles. Up to 64 rows
    # (FSOSR_MOE_MLP_TRITON_TUNE unit_rows: 128 halves the programs that each gather the k experts' weights).
    return _pow2_at_least_16(G, tuning().get("unit_rows", 64))


@triton.jit
def _unit_columns(unit, k, h, indices_ptr, gates_ptr, KH_PAD: tl.constexpr):
    """Columns of the concatenated hidden row: validity, slot j, hidden column within the slot, expert and gate."""
    c = tl.arange(0, KH_PAD)
    c_ok = c < k * h
    slot = tl.where(c_ok, c // h, 0)
    hc = c - slot * h
    flat = unit * k + slot
    expert = tl.load(indices_ptr + flat, mask=c_ok, other=0).to(tl.int64)
    gate = tl.load(gates_ptr + flat, mask=c_ok, other=0.0).to(tl.float32)
    return c_ok, slot, hc, expert, gate


@triton.jit(do_not_specialize=["seed_value"])   # a key divisible by 16 would compile anew
def _unit_forward_kernel(x_ptr, indices_ptr, gates_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pre_ptr, y_ptr,
                         G, d, h, d_out, scale, dropout, keep_scale, seed_value, seed_ptr, K: tl.constexpr,
                         ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                         UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                         KH_PAD: tl.constexpr):
    seed_key = _seed(seed_value, seed_ptr, SEED_FROM_PTR)
    unit = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < G
    row = unit * G + t
    c_ok, slot, hc, expert, gate = _unit_columns(unit, K, h, indices_ptr, gates_ptr, KH_PAD)
    acc = tl.zeros([BLOCK_M, KH_PAD], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kcol = k0 + tl.arange(0, BLOCK_K)
        k_ok = kcol < d
        x_tile = tl.load(x_ptr + row[:, None] * d + kcol[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w1_tile = tl.load(w1_ptr + (expert[None, :] * d + kcol[:, None]) * h + hc[None, :],
                          mask=k_ok[:, None] & c_ok[None, :], other=0.0)               # [BLOCK_K, KH_PAD]
        acc = _mma(x_tile, w1_tile, acc, UPCAST)
    # Padded columns stay 0 (zero weights and bias, act(0) = 0 for every activation, gate 0).
    pre = acc + tl.load(b1_ptr + expert * h + hc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    hmask = t_ok[:, None] & c_ok[None, :]
    slot_row = (unit * K + slot)[None, :] * G + t[:, None]                              # [BLOCK_M, KH_PAD]
    tl.store(pre_ptr + slot_row * h + hc[None, :], pre, mask=hmask)
    hid = _hidden(pre, slot_row * h + hc[None, :], seed_key, dropout, keep_scale, ACT, HAS_DROPOUT)
    hid = (hid * (gate * scale)[None, :]).to(w2_ptr.dtype.element_ty)
    for n0 in range(0, d_out, BLOCK_N):
        ncol = n0 + tl.arange(0, BLOCK_N)
        n_ok = ncol < d_out
        w2_tile = tl.load(w2_ptr + (expert[:, None] * h + hc[:, None]) * d_out + ncol[None, :],
                          mask=c_ok[:, None] & n_ok[None, :], other=0.0)               # [KH_PAD, BLOCK_N]
        out = _mma(hid, w2_tile, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):     # unrolled: a loop nested here would keep Triton from pipelining this one
            e_j = tl.load(indices_ptr + unit * K + j).to(tl.int64)
            g_j = tl.load(gates_ptr + unit * K + j).to(tl.float32)
            bias += g_j * tl.load(b2_ptr + e_j * d_out + ncol, mask=n_ok, other=0.0).to(tl.float32)
        out += (bias * scale)[None, :]
        tl.store(y_ptr + row[:, None] * d_out + ncol[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["seed_value"])   # a key divisible by 16 would compile anew
def _unit_backward_rows_kernel(dy_ptr, indices_ptr, gates_ptr, w1_ptr, w2_ptr, b2_ptr, pre_ptr,
                               dpre_ptr, hid_ptr, gate_part_ptr, dx_ptr,
                               G, d, h, d_out, scale, dropout, keep_scale, seed_value, seed_ptr, K: tl.constexpr,
                               K_PAD: tl.constexpr,
                               ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_N: tl.constexpr, KH_PAD: tl.constexpr):
    seed_key = _seed(seed_value, seed_ptr, SEED_FROM_PTR)
    unit = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < G
    row = unit * G + t
    c_ok, slot, hc, expert, gate = _unit_columns(unit, K, h, indices_ptr, gates_ptr, KH_PAD)
    hmask = t_ok[:, None] & c_ok[None, :]
    slot_row = (unit * K + slot)[None, :] * G + t[:, None]
    # dyW = dy @ [w2[e_1]; ...; w2[e_k]]^T over d_out.
    dyw = tl.zeros([BLOCK_M, KH_PAD], dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        ncol = n0 + tl.arange(0, BLOCK_N)
        n_ok = ncol < d_out
        dy = tl.load(dy_ptr + row[:, None] * d_out + ncol[None, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        w2_t = tl.load(w2_ptr + (expert[None, :] * h + hc[None, :]) * d_out + ncol[:, None],
                       mask=n_ok[:, None] & c_ok[None, :], other=0.0)                  # [BLOCK_N, KH_PAD]
        dyw = _mma(dy, w2_t, dyw, UPCAST)
    # dy . b2[e_j] of every slot (column j), in a loop of its own as in the expert-sorted kernel (Triton 3.6
    # miscompiled a reduction inside the pipelined dot loop there).
    slots = tl.arange(0, K_PAD)
    dy_b2 = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        ncol = n0 + tl.arange(0, BLOCK_N)
        n_ok = ncol < d_out
        dy = tl.load(dy_ptr + row[:, None] * d_out + ncol[None, :], mask=t_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            e_j = tl.load(indices_ptr + unit * K + j).to(tl.int64)
            b2 = tl.load(b2_ptr + e_j * d_out + ncol, mask=n_ok, other=0.0).to(tl.float32)
            dy_b2 += tl.where((slots == j)[None, :], tl.sum(dy * b2[None, :], axis=1)[:, None], 0.0)
    # pre is loaded only now: live through the loops above it would cost registers (spills, per cuobjdump).
    pre = tl.load(pre_ptr + slot_row * h + hc[None, :], mask=hmask, other=0.0)
    act = _activation(pre, ACT)
    dact = _activation_grad(pre, ACT)
    if HAS_DROPOUT:
        keep = _dropout_multiplier(slot_row * h + hc[None, :], seed_key, dropout, keep_scale)
        act = act * keep
        dact = dact * keep
    # grad_gates partials per (slot, token): scale * (hid . dyW + dy . b2); tokens are summed by the launcher.
    contribution = tl.where(hmask, act * dyw, 0.0)
    for j in tl.static_range(K):
        part = tl.sum(tl.where((slot == j)[None, :], contribution, 0.0), axis=1)
        part = scale * (part + tl.sum(tl.where((slots == j)[None, :], dy_b2, 0.0), axis=1))
        tl.store(gate_part_ptr + (unit * K + j) * G + t, part, mask=t_ok)
    # For the weight pass, by slot row: dpre (fp32, it also feeds grad_b1) and the gate-scaled hidden activations.
    gate_scale = gate * scale
    dpre = tl.where(hmask, dyw * gate_scale[None, :] * dact, 0.0)
    tl.store(dpre_ptr + slot_row * h + hc[None, :], dpre, mask=hmask)
    tl.store(hid_ptr + slot_row * h + hc[None, :], (act * gate_scale[None, :]).to(hid_ptr.dtype.element_ty),
             mask=hmask)
    # grad_x = dpre @ [w1[e_1]^T; ...]: the k slots summed inside the dot.
    dpre_op = dpre.to(w1_ptr.dtype.element_ty)
    for k0 in range(0, d, BLOCK_K):
        kcol = k0 + tl.arange(0, BLOCK_K)
        k_ok = kcol < d
        w1_t = tl.load(w1_ptr + (expert[:, None] * d + kcol[None, :]) * h + hc[:, None],
                       mask=c_ok[:, None] & k_ok[None, :], other=0.0)                  # [KH_PAD, BLOCK_K]
        dx = _mma(dpre_op, w1_t, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), UPCAST)
        tl.store(dx_ptr + row[:, None] * d + kcol[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & k_ok[None, :])


def _options(dtype, k, G, d, h, d_out, activation, dropout) -> dict:
    """Constexprs and launch options of both unit-tiled kernels."""
    kh_pad = _pow2_at_least_16(k * h)
    return dict(K=k, ACT=int(activation), HAS_DROPOUT=dropout > 0, UPCAST=_upcast(dtype), BLOCK_M=_block_m(G),
                BLOCK_K=_pow2_at_least_16(d, BLOCK_K), BLOCK_N=_pow2_at_least_16(d_out, BLOCK_N), KH_PAD=kh_pad,
                **launch_options(_num_warps(kh_pad)))


def forward(x, indices, gates, w1, b1, w2, b2, y, hidden_pre, G: int, activation: int, scale: float,
            dropout: float, seed_key):
    """Writes y [N*G, d_out] and hidden_pre [N, k, G, h]."""
    num_units, k = indices.shape
    _, d, h = w1.shape
    d_out = w2.shape[2]
    drop_args, drop_flag = dropout_arguments(dropout, seed_key, indices)
    _unit_forward_kernel[(num_units, cdiv(G, _block_m(G)))](
        x, indices, gates, w1, b1, w2, b2, hidden_pre, y, G, d, h, d_out, float(scale), *drop_args, **drop_flag,
        **_options(x.dtype, k, G, d, h, d_out, activation, dropout))


def backward_rows(grad_y, indices, gates, w1, w2, b2, hidden_pre, dpre, scaled_hidden, gate_part, grad_x, G: int,
                  activation: int, scale: float, dropout: float, seed_key):
    """Writes grad_x [N*G, d], the grad_gates partials [N, k, G] and, by slot row, dpre and the scaled hidden."""
    num_units, k = indices.shape
    _, d, h = w1.shape
    d_out = w2.shape[2]
    drop_args, drop_flag = dropout_arguments(dropout, seed_key, indices)
    _unit_backward_rows_kernel[(num_units, cdiv(G, _block_m(G)))](
        grad_y, indices, gates, w1, w2, b2, hidden_pre, dpre, scaled_hidden, gate_part, grad_x,
        G, d, h, d_out, float(scale), *drop_args, **drop_flag, K_PAD=next_power_of_2(k),
        **_options(grad_y.dtype, k, G, d, h, d_out, activation, dropout))
