"""Triton backend of ``fsosr.ops.moe_mlp`` (contract: docs/ops/moe_mlp.md, "Native op contract"; oracle:
fsosr/ops/reference.py).

Row numbering. Every (unit n, slot j, token t) is one *routed row*. Ordered by expert they form a virtual matrix
of R = N*k*G rows: routed row r is token t = r % G of the slot at position p = r // G of ``order``, so expert e
owns the contiguous routed rows offsets[e]*G .. offsets[e+1]*G - 1, and its input row is x[n*G + t] (shared
input) or x[e, n] (per-expert input). Rows are gathered on load: no permuted copy of x is ever made. Two other
numberings appear: the slot row q = (n*k + j)*G + t (hidden_pre [N, k, G, h], per-slot buffers, dropout counter
q*h + c) and the output row n*G + t.

Two tilings of the forward and the rows pass (``unit_tiles`` picks; FSOSR_MOE_MLP_TRITON_TILES): by expert, the
kernels below, and by unit (kernels/moe_mlp_units.py: for a shared input with k*h <= 128, a unit's k experts as one
MLP of hidden width k*h, so y and grad_x are written once with no per-slot buffer). The weight pass is shared.

Kernels (all launch grids come from shapes alone: no host synchronisation, CUDA-graph safe):
1. ``_forward_kernel``: one program per BLOCK_M routed rows. For each expert present in the block (almost always
   one; a block straddling a segment boundary makes one masked pass per expert, at most E extra passes in all):
   x @ w1[e] with fp32 accumulation, + b1 -> hidden_pre, activation, dropout from the counter hash, then over
   d_out in BLOCK_N chunks (hid @ w2[e] + b2) * gate * scale. Tiling the expert-sorted rows (rather than one
   program per (slot, token block)) keeps the GEMM tiles full for per-token routing (G = 1) too.
2. ``_sum_slots_kernel``: the combine. k == 1: every output row has one contribution and the forward stores it
   directly in x's dtype. k >= 2: slots write fp32 rows to a [N, k, G, d_out] buffer and this kernel sums them
   in ascending j (what the contract asks), then casts. That is deterministic for every k and, at k = 2, moves as
   many bytes as an fp32 atomic combine would (zero fill + 2 atomics + cast pass), so atomics buy nothing here.
3. ``_backward_rows_kernel``: the forward's blocks again. Recomputes act and mask from hidden_pre, dyW = dy @
   w2[e]^T, grad_gates per routed row (summed over tokens afterwards by a fixed-shape torch reduction: no atomics),
   dpre, grad_x = dpre @ w1[e]^T with the forward's combine rule (per-expert input: a direct store, since a unit
   picks an expert at most once). Saves dpre (fp32) and gate*scale*hid (input dtype) in routed-row order (the
   unit-tiled rows pass saves them by slot row; the weight pass reads either, BY_SLOT).
4. ``_backward_weights_kernel``: grid (E, S, d blocks + d_out blocks). Split s of expert e reduces a fixed chunk
   of the expert's routed rows into an fp32 workspace [S, E, ...]; ``_reduce_splits_kernel`` then sums the S
   partials in order (one launch for the four gradients). With S = 1 (enough programs without chunks, e.g. E 22)
   the programs store the gradients directly. Chunk bounds depend on offsets and shapes only, so weight gradients
   are bitwise reproducible (no float atomics).

Precision: fp32 inputs use 3xTF32 dots (fp32-level accuracy). fp16/bf16 use tensor cores with fp32 accumulation;
the hidden activations and dpre are rounded to the input dtype right before the GEMM that consumes them (as
autocast does).
The interpreter computes bf16 tl.dot wrongly, so when TRITON_INTERPRET=1 every dot upcasts its operands to fp32
(after the same rounding, so interpreted numerics track the compiled ones).
"""
import os

import torch
import triton
import triton.language as tl

from . import moe_mlp_units
from .moe_mlp_device import _activation, _activation_grad, _dropout_multiplier, _hidden, _mma, _num_warps, \
    _pow2_at_least_16, _seed, _upcast, dropout_arguments, launch_options, tuning
from ._launch import cdiv

# Fixed configs (multi-config autotune does not run in the interpreter). tl.dot needs every dim >= 16 compiled,
# so the hidden width and the chunk widths are padded up to at least 16.
BLOCK_M = 64            # routed rows per program
BLOCK_K = 64            # d chunk of the first GEMM / of grad_x
BLOCK_N = 64            # d_out chunk of the second GEMM / of dyW
BLOCK_D = 64            # output block (rows of dw1 / columns of dw2) of a weight-gradient program
WEIGHT_ROWS = 128       # rows per step (the GEMM's K) of a weight-gradient program. Whole backward on an H100,
                        # bf16, T = 50k, d = 768, h = 64, by (WEIGHT_ROWS, BLOCK_D): (128, 64) 835 us,
                        # (64, 64) 928 us, (64, 128) 982 us
SUM_BLOCK = 1024        # elements per program of the slot combine
MAX_SPLITS = 16         # row chunks per expert for the weight gradients
FILL_PROGRAMS = 512     # (expert, output block) programs that fill an H100 (132 SMs) without row chunks
WORKSPACE_ELEMENTS = 1 << 24   # cap on the fp32 weight-gradient workspace (64 MiB)
# Tiling of the forward and the rows pass (unit_tiles). Unit tiles (kernels/moe_mlp_units.py) drop the per-slot
# buffer and its combine pass; they are checked against the reference under the interpreter and compiled for sm_90,
# but have not run on a GPU yet, so the default stays on the expert tiles that have, until a GPU run measures both
# (benchmark provider triton-units) and the GPU tests pass with FSOSR_MOE_MLP_TRITON_TILES=units.
DEFAULT_TILING = "experts"
UNIT_MIN_GROUP = 32     # auto: shorter units leave most of a 16..64-row tile empty


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _routed_rows(start, limit, order_ptr, indices_ptr, gates_ptr, num_units, k, G, num_experts,
                 PER_EXPERT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Routed rows start .. start+BLOCK_M-1 (int64): validity (< limit), expert, gate, slot row, output row and
    input row of each. Invalid rows get expert = num_experts, gate 0."""
    r = start + tl.arange(0, BLOCK_M).to(tl.int64)
    valid = r < limit
    position = r // G
    token = r - position * G
    flat = tl.load(order_ptr + position, mask=valid, other=0).to(tl.int64)      # n*k + j
    expert = tl.load(indices_ptr + flat, mask=valid, other=num_experts)
    gate = tl.load(gates_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    unit = flat // k
    slot_row = flat * G + token
    out_row = unit * G + token
    if PER_EXPERT:
        in_row = expert.to(tl.int64) * num_units + unit
    else:
        in_row = out_row
    return r, valid, expert, gate, slot_row, out_row, in_row


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed_value"])   # a key divisible by 16 would compile anew
def _forward_kernel(x_ptr, indices_ptr, gates_ptr, order_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pre_ptr, out_ptr,
                    num_rows, num_units, k, G, d, h, d_out, num_experts, scale, dropout, keep_scale, seed_value,
                    seed_ptr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                    PER_EXPERT: tl.constexpr, PER_SLOT_OUT: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr):
    seed_key = _seed(seed_value, seed_ptr, SEED_FROM_PTR)
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    r, valid, expert, gate, slot_row, out_row, in_row = _routed_rows(
        start, num_rows, order_ptr, indices_ptr, gates_ptr, num_units, k, G, num_experts, PER_EXPERT, BLOCK_M)
    hcol = tl.arange(0, H_PAD)
    h_ok = hcol < h
    dest_row = slot_row if PER_SLOT_OUT else out_row
    out_scale = gate * scale
    first = tl.min(tl.where(valid, expert, num_experts), axis=0)
    last = tl.max(tl.where(valid, expert, -1), axis=0)
    for e in range(first.to(tl.int64), last.to(tl.int64) + 1):     # int64: weight offsets e*d*h cannot wrap
        rows = valid & (expert == e)
        if tl.max(rows.to(tl.int32), axis=0) > 0:       # skips experts with no rows here (empty ones)
            acc = tl.zeros([BLOCK_M, H_PAD], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                kcol = k0 + tl.arange(0, BLOCK_K)
                k_ok = kcol < d
                x_tile = tl.load(x_ptr + in_row[:, None] * d + kcol[None, :],
                                 mask=rows[:, None] & k_ok[None, :], other=0.0)
                w1_tile = tl.load(w1_ptr + (e * d + kcol[:, None]) * h + hcol[None, :],
                                  mask=k_ok[:, None] & h_ok[None, :], other=0.0)
                acc = _mma(x_tile, w1_tile, acc, UPCAST)
            # Padded hidden columns stay 0 (zero weights and bias; act(0) = 0 for every activation).
            pre = acc + tl.load(b1_ptr + e * h + hcol, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(pre_ptr + slot_row[:, None] * h + hcol[None, :], pre, mask=rows[:, None] & h_ok[None, :])
            hid = _hidden(pre, slot_row[:, None] * h + hcol[None, :], seed_key, dropout, keep_scale, ACT,
                          HAS_DROPOUT)
            hid = hid.to(w2_ptr.dtype.element_ty)
            for n0 in range(0, d_out, BLOCK_N):
                ncol = n0 + tl.arange(0, BLOCK_N)
                n_ok = ncol < d_out
                w2_tile = tl.load(w2_ptr + (e * h + hcol[:, None]) * d_out + ncol[None, :],
                                  mask=h_ok[:, None] & n_ok[None, :], other=0.0)
                out = _mma(hid, w2_tile, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
                out += tl.load(b2_ptr + e * d_out + ncol, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                out = out * out_scale[:, None]
                tl.store(out_ptr + dest_row[:, None] * d_out + ncol[None, :], out.to(out_ptr.dtype.element_ty),
                         mask=rows[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots_kernel(slots_ptr, out_ptr, num_elements, k, G, width, BLOCK: tl.constexpr):
    """out[n*G + t, c] = sum over j = 0, 1, ... of slots[n, j, t, c] (fp32, left to right), cast to out's dtype."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < num_elements
    row = idx // width
    col = idx - row * width
    unit = row // G
    token = row - unit * G
    src = (unit * k * G + token) * width + col
    acc = tl.load(slots_ptr + src, mask=ok, other=0.0)
    for j in range(1, k):
        acc += tl.load(slots_ptr + src + j * G * width, mask=ok, other=0.0)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed_value"])   # a key divisible by 16 would compile anew
def _backward_rows_kernel(dy_ptr, indices_ptr, gates_ptr, order_ptr, w1_ptr, w2_ptr, b2_ptr, pre_ptr,
                          dpre_ptr, hid_ptr, gate_part_ptr, dx_ptr,
                          num_rows, num_units, k, G, d, h, d_out, num_experts, scale, dropout, keep_scale,
                          seed_value, seed_ptr,
                          ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                          PER_EXPERT: tl.constexpr, PER_SLOT_OUT: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                          H_PAD: tl.constexpr):
    seed_key = _seed(seed_value, seed_ptr, SEED_FROM_PTR)
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    r, valid, expert, gate, slot_row, out_row, in_row = _routed_rows(
        start, num_rows, order_ptr, indices_ptr, gates_ptr, num_units, k, G, num_experts, PER_EXPERT, BLOCK_M)
    hcol = tl.arange(0, H_PAD)
    h_ok = hcol < h
    dest_row = slot_row if PER_SLOT_OUT else in_row
    first = tl.min(tl.where(valid, expert, num_experts), axis=0)
    last = tl.max(tl.where(valid, expert, -1), axis=0)
    for e in range(first.to(tl.int64), last.to(tl.int64) + 1):     # int64: weight offsets e*d*h cannot wrap
        rows = valid & (expert == e)
        if tl.max(rows.to(tl.int32), axis=0) > 0:
            hmask = rows[:, None] & h_ok[None, :]
            pre = tl.load(pre_ptr + slot_row[:, None] * h + hcol[None, :], mask=hmask, other=0.0)
            # dyW = dy @ w2[e]^T over d_out.
            dyw = tl.zeros([BLOCK_M, H_PAD], dtype=tl.float32)
            for n0 in range(0, d_out, BLOCK_N):
                ncol = n0 + tl.arange(0, BLOCK_N)
                n_ok = ncol < d_out
                dy = tl.load(dy_ptr + out_row[:, None] * d_out + ncol[None, :],
                             mask=rows[:, None] & n_ok[None, :], other=0.0)
                w2_t = tl.load(w2_ptr + (e * h + hcol[None, :]) * d_out + ncol[:, None],
                               mask=n_ok[:, None] & h_ok[None, :], other=0.0)          # [BLOCK_N, H_PAD]
                dyw = _mma(dy, w2_t, dyw, UPCAST)
            # dy . b2[e] in a loop of its own (dy re-read from L2): with the sum inside the loop above, Triton 3.6
            # on an H100 miscompiled the pipelined bf16 loop (wrong and run-to-run different dyW on a few rows).
            dy_b2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, d_out, BLOCK_N):
                ncol = n0 + tl.arange(0, BLOCK_N)
                n_ok = ncol < d_out
                dy = tl.load(dy_ptr + out_row[:, None] * d_out + ncol[None, :],
                             mask=rows[:, None] & n_ok[None, :], other=0.0)
                b2 = tl.load(b2_ptr + e * d_out + ncol, mask=n_ok, other=0.0).to(tl.float32)
                dy_b2 += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
            act = _activation(pre, ACT)
            dact = _activation_grad(pre, ACT)
            if HAS_DROPOUT:
                keep = _dropout_multiplier(slot_row[:, None] * h + hcol[None, :], seed_key, dropout,
                                           keep_scale)
                act = act * keep
                dact = dact * keep
            # grad_gates partial of this routed row: scale * (hid . dyW + dy . b2); tokens are summed on the host.
            gate_part = scale * (tl.sum(act * dyw, axis=1) + dy_b2)
            tl.store(gate_part_ptr + slot_row, gate_part, mask=rows)
            # For the weight pass, in routed-row order: dpre (fp32, it also feeds grad_b1) and the gate-scaled
            # hidden activations in the weights' dtype (the operand grad_w2's GEMM takes anyway).
            gate_scale = gate * scale
            dpre = tl.where(hmask, dyw * gate_scale[:, None] * dact, 0.0)
            tl.store(dpre_ptr + r[:, None] * h + hcol[None, :], dpre, mask=hmask)
            tl.store(hid_ptr + r[:, None] * h + hcol[None, :], (act * gate_scale[:, None]).to(hid_ptr.dtype.element_ty),
                     mask=hmask)
            dpre_op = dpre.to(w1_ptr.dtype.element_ty)
            for k0 in range(0, d, BLOCK_K):
                kcol = k0 + tl.arange(0, BLOCK_K)
                k_ok = kcol < d
                w1_t = tl.load(w1_ptr + (e * d + kcol[None, :]) * h + hcol[:, None],
                               mask=h_ok[:, None] & k_ok[None, :], other=0.0)          # [H_PAD, BLOCK_K]
                dx = _mma(dpre_op, w1_t, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), UPCAST)
                tl.store(dx_ptr + dest_row[:, None] * d + kcol[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=rows[:, None] & k_ok[None, :])


@triton.jit
def _backward_weights_kernel(x_ptr, dy_ptr, dpre_ptr, hid_ptr, indices_ptr, gates_ptr, order_ptr, offsets_ptr,
                             dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                             num_units, k, G, d, h, d_out, num_experts, num_splits, scale,
                             PER_EXPERT: tl.constexpr, BY_SLOT: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, H_PAD: tl.constexpr):
    e = tl.program_id(0)
    split = tl.program_id(1)
    block = tl.program_id(2)
    # This split's chunk of expert e's routed rows: a function of offsets and shapes only (deterministic).
    seg_start = tl.load(offsets_ptr + e).to(tl.int64) * G
    seg_end = tl.load(offsets_ptr + e + 1).to(tl.int64) * G
    chunk = tl.cdiv(tl.cdiv(seg_end - seg_start, num_splits), BLOCK_M) * BLOCK_M
    lo = seg_start + split * chunk
    hi = tl.minimum(lo + chunk, seg_end)
    workspace = (split * num_experts + e).to(tl.int64)
    hcol = tl.arange(0, H_PAD)
    h_ok = hcol < h
    num_d_blocks = tl.maximum(tl.cdiv(d, BLOCK_D), 1)    # one even when d = 0: it writes grad_b1
    if block < num_d_blocks:
        # grad_w1[e][rows dcol] = sum x_rows^T dpre; grad_b1[e] = sum dpre (block 0 only).
        dcol = block * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dcol < d
        dw1_acc = tl.zeros([BLOCK_D, H_PAD], dtype=tl.float32)
        db1_acc = tl.zeros([H_PAD], dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_M):
            r, valid, expert, gate, slot_row, out_row, in_row = _routed_rows(
                r0, hi, order_ptr, indices_ptr, gates_ptr, num_units, k, G, num_experts, PER_EXPERT, BLOCK_M)
            x_t = tl.load(x_ptr + in_row[None, :] * d + dcol[:, None],
                          mask=d_ok[:, None] & valid[None, :], other=0.0)               # [BLOCK_D, BLOCK_M]
            saved = slot_row if BY_SLOT else r            # where the rows pass stored dpre and the scaled hidden
            dpre = tl.load(dpre_ptr + saved[:, None] * h + hcol[None, :],
                           mask=valid[:, None] & h_ok[None, :], other=0.0)
            dw1_acc = _mma(x_t, dpre.to(x_ptr.dtype.element_ty), dw1_acc, UPCAST)
            db1_acc += tl.sum(dpre, axis=0)
        tl.store(dw1_ptr + (workspace * d + dcol[:, None]) * h + hcol[None, :], dw1_acc.to(dw1_ptr.dtype.element_ty),
                 mask=d_ok[:, None] & h_ok[None, :])
        if block == 0:
            tl.store(db1_ptr + workspace * h + hcol, db1_acc.to(db1_ptr.dtype.element_ty), mask=h_ok)
    else:
        # grad_w2[e][:, ncol] = sum (scale*g*hid)^T dy; grad_b2[e][ncol] = sum scale*g*dy.
        ncol = (block - num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
        n_ok = ncol < d_out
        dw2_acc = tl.zeros([H_PAD, BLOCK_D], dtype=tl.float32)
        db2_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_M):
            r, valid, expert, gate, slot_row, out_row, in_row = _routed_rows(
                r0, hi, order_ptr, indices_ptr, gates_ptr, num_units, k, G, num_experts, PER_EXPERT, BLOCK_M)
            saved = slot_row if BY_SLOT else r
            hid_t = tl.load(hid_ptr + saved[None, :] * h + hcol[:, None],
                            mask=h_ok[:, None] & valid[None, :], other=0.0)                   # [H_PAD, BLOCK_M]
            dy = tl.load(dy_ptr + out_row[:, None] * d_out + ncol[None, :],
                         mask=valid[:, None] & n_ok[None, :], other=0.0)
            dw2_acc = _mma(hid_t, dy, dw2_acc, UPCAST)
            db2_acc += tl.sum(dy.to(tl.float32) * (gate * scale)[:, None], axis=0)
        tl.store(dw2_ptr + (workspace * h + hcol[:, None]) * d_out + ncol[None, :],
                 dw2_acc.to(dw2_ptr.dtype.element_ty), mask=h_ok[:, None] & n_ok[None, :])
        tl.store(db2_ptr + workspace * d_out + ncol, db2_acc.to(db2_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_splits(ws_ptr, out_ptr, n, num_splits, j):
    ok = j < n
    acc = tl.load(ws_ptr + j, mask=ok, other=0.0)
    for s in range(1, num_splits):                      # splits in order: a fixed summation order
        acc += tl.load(ws_ptr + s * n + j, mask=ok, other=0.0)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _reduce_splits_kernel(dw1_ws, db1_ws, dw2_ws, db2_ws, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                          n_w1, n_b1, n_w2, n_b2, num_splits, BLOCK: tl.constexpr):
    """grad = sum over the S row chunks of the fp32 workspace [S, n], cast to the weights' dtype; axis 1 picks
    the tensor. One launch for the four weight gradients (it replaced eight torch ops: host time, not work)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    which = tl.program_id(1)
    if which == 0:
        _sum_splits(dw1_ws, dw1_ptr, n_w1, num_splits, j)
    elif which == 1:
        _sum_splits(db1_ws, db1_ptr, n_b1, num_splits, j)
    elif which == 2:
        _sum_splits(dw2_ws, dw2_ptr, n_w2, num_splits, j)
    else:
        _sum_splits(db2_ws, db2_ptr, n_b2, num_splits, j)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _shapes(x, indices, w1, w2, group_size, per_expert_input):
    num_units, k = indices.shape
    num_experts, d, h = w1.shape
    G = 1 if per_expert_input else group_size
    return num_units, k, num_experts, d, h, w2.shape[2], G


def _weight_block(dtype, h_pad: int) -> int:
    # Shared memory of the weight-gradient program compiled for sm_90 by Triton 3.8 (its pipelined [BLOCK_M, .]
    # operand tiles): fp32 data at H_PAD 128 needs 257 KiB with BLOCK_D 64, more than an H100's 227 KiB, and
    # 177 KiB with 32; 16-bit data 176 KiB with 64 (tests/ops/test_triton_compiles.py compiles every launch).
    return BLOCK_D // 2 if dtype == torch.float32 and h_pad > 64 else BLOCK_D


def _rows_options(dtype, d, h, d_out, activation, dropout, per_expert_input, per_slot) -> dict:
    """Constexprs and launch options of the expert-tiled forward and rows-pass kernels."""
    h_pad = _pow2_at_least_16(h)
    return dict(ACT=int(activation), HAS_DROPOUT=dropout > 0, PER_EXPERT=bool(per_expert_input),
                PER_SLOT_OUT=per_slot, UPCAST=_upcast(dtype), BLOCK_M=BLOCK_M, BLOCK_K=_pow2_at_least_16(d, BLOCK_K),
                BLOCK_N=_pow2_at_least_16(d_out, BLOCK_N), H_PAD=h_pad, **launch_options(_num_warps(h_pad)))


def _sum_slots(slots, out, k, G, width):
    num_elements = out.numel()
    if num_elements:
        _sum_slots_kernel[(cdiv(num_elements, SUM_BLOCK),)](slots, out, num_elements, k, G, width,
                                                                   BLOCK=SUM_BLOCK, num_warps=4)


def unit_tiles(k: int, G: int, h: int, per_expert_input: bool) -> bool:
    """Whether the forward and the backward's rows pass run tiled by unit (kernels/moe_mlp_units.py) rather than
    by expert. ``FSOSR_MOE_MLP_TRITON_TILES`` = ``experts`` | ``units`` (wherever they apply: a shared input and
    k*h within their on-chip width) | ``auto`` (units where they save the per-slot buffer: k >= 2, G >= 32);
    unset: DEFAULT_TILING."""
    tiling = os.environ.get("FSOSR_MOE_MLP_TRITON_TILES", DEFAULT_TILING)
    if tiling not in ("experts", "units", "auto"):
        raise ValueError(f"FSOSR_MOE_MLP_TRITON_TILES must be experts, units or auto, got {tiling!r}")
    applies = not per_expert_input and moe_mlp_units.fits(k, h)
    if tiling == "units":
        return applies
    return tiling == "auto" and applies and k >= 2 and G >= UNIT_MIN_GROUP


def moe_mlp_forward(x, indices, gates, order, offsets, w1, b1, w2, b2, group_size: int, activation: int,
                    scale: float, dropout: float, seed_key, per_expert_input: bool):
    """Returns (y [N*G, d_out] (or [N, d_out]) in x's dtype, hidden_pre [N, k, G, h] fp32)."""
    num_units, k, num_experts, d, h, d_out, G = _shapes(x, indices, w1, w2, group_size, per_expert_input)
    num_rows = num_units * k * G
    hidden_pre = torch.empty((num_units, k, G, h), dtype=torch.float32, device=x.device)
    y = torch.empty((num_units * G, d_out), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return y, hidden_pre
    if unit_tiles(k, G, h, per_expert_input):
        moe_mlp_units.forward(x, indices, gates, w1, b1, w2, b2, y, hidden_pre, G, activation, scale, dropout,
                              seed_key)
        return y, hidden_pre
    per_slot = k > 1
    out = torch.empty((num_rows, d_out), dtype=torch.float32, device=x.device) if per_slot else y
    drop_args, drop_flag = dropout_arguments(dropout, seed_key, indices)
    _forward_kernel[(cdiv(num_rows, BLOCK_M),)](
        x, indices, gates, order, w1, b1, w2, b2, hidden_pre, out,
        num_rows, num_units, k, G, d, h, d_out, num_experts, float(scale), *drop_args, **drop_flag,
        **_rows_options(x.dtype, d, h, d_out, activation, dropout, per_expert_input, per_slot))
    if per_slot:
        _sum_slots(out, y, k, G, d_out)
    return y, hidden_pre


def _backward_rows_by_expert(grad_y, x, indices, gates, order, w1, w2, b2, hidden_pre, dpre, scaled_hidden,
                             gate_part, G, activation, scale, dropout, seed_key, per_expert_input):
    """The expert-sorted rows pass; returns grad_x."""
    num_units, k, num_experts, d, h, d_out, G = _shapes(x, indices, w1, w2, G, per_expert_input)
    num_rows = num_units * k * G
    per_slot = k > 1 and not per_expert_input
    if per_expert_input:
        grad_x = torch.zeros_like(x)        # rows (e, n) that unit n did not route to e get no gradient
        dx_out = grad_x
    else:
        grad_x = torch.empty_like(x)
        dx_out = torch.empty((num_rows, d), dtype=torch.float32, device=x.device) if per_slot else grad_x
    drop_args, drop_flag = dropout_arguments(dropout, seed_key, indices)
    _backward_rows_kernel[(cdiv(num_rows, BLOCK_M),)](
        grad_y, indices, gates, order, w1, w2, b2, hidden_pre, dpre, scaled_hidden, gate_part, dx_out,
        num_rows, num_units, k, G, d, h, d_out, num_experts, float(scale), *drop_args, **drop_flag,
        **_rows_options(x.dtype, d, h, d_out, activation, dropout, per_expert_input, per_slot))
    if per_slot:
        _sum_slots(dx_out, grad_x, k, G, d)
    return grad_x


def _num_splits(num_rows, num_experts, d, h, d_out, num_blocks) -> int:
    """Row chunks per expert for the weight gradients. None (1) where the (expert, output block) programs alone
    are enough to fill a GPU: then each program stores its block straight into the gradient, with no fp32
    workspace round trip (at the GPU adapter shape, E 22 x 24 blocks, the 3 splits of the rule below wrote and read
    back 26 MB per step) and no second kernel. Otherwise about 4 blocks of rows per program on average and a bounded
    workspace. Depends on shapes only, which keeps the sums reproducible."""
    if num_experts * num_blocks >= FILL_PROGRAMS:
        return 1
    wanted = cdiv(num_rows, num_experts * WEIGHT_ROWS * 4)
    fits = WORKSPACE_ELEMENTS // max(1, num_experts * (d * h + h * d_out + h + d_out))
    return max(1, min(wanted, MAX_SPLITS, fits))


def moe_mlp_backward(grad_y, x, indices, gates, order, offsets, w1, b1, w2, b2, hidden_pre, group_size: int,
                     activation: int, scale: float, dropout: float, seed_key, per_expert_input: bool):
    """Returns (grad_x, grad_gates, grad_w1, grad_b1, grad_w2, grad_b2), each in its input's dtype."""
    num_units, k, num_experts, d, h, d_out, G = _shapes(x, indices, w1, w2, group_size, per_expert_input)
    num_rows = num_units * k * G
    device = x.device
    f32 = torch.float32
    if num_rows == 0:
        return (torch.zeros_like(x), torch.zeros_like(gates), torch.zeros_like(w1), torch.zeros_like(b1),
                torch.zeros_like(w2), torch.zeros_like(b2))
    h_pad = _pow2_at_least_16(h)
    upcast = _upcast(x.dtype)

    # Rows pass: per-row grad_gates partials, grad_x, and for the weight pass dpre and the scaled hidden (in
    # routed-row order, or by slot row when tiled by unit).
    by_unit = unit_tiles(k, G, h, per_expert_input)
    dpre = torch.empty((num_rows, h), dtype=f32, device=device)
    scaled_hidden = torch.empty((num_rows, h), dtype=x.dtype, device=device)
    gate_part = torch.empty((num_units, k, G), dtype=f32, device=device)
    if by_unit:
        grad_x = torch.empty_like(x)
        moe_mlp_units.backward_rows(grad_y, indices, gates, w1, w2, b2, hidden_pre, dpre, scaled_hidden, gate_part,
                                    grad_x, G, activation, scale, dropout, seed_key)
    else:
        grad_x = _backward_rows_by_expert(grad_y, x, indices, gates, order, w1, w2, b2, hidden_pre, dpre,
                                          scaled_hidden, gate_part, G, activation, scale, dropout, seed_key,
                                          per_expert_input)
    grad_gates = gate_part.sum(dim=2).to(gates.dtype)       # fixed-shape reduction over tokens: deterministic

    # Weight pass: S fixed row chunks per expert into an fp32 workspace, then a fixed-order sum over S; with S = 1
    # the programs write the gradients themselves.
    tuned = tuning()
    block_d = _pow2_at_least_16(max(d, d_out), tuned.get("weight_block_d", _weight_block(x.dtype, h_pad)))
    # d blocks (at least one, which writes grad_b1 even when d = 0), then d_out blocks.
    num_blocks = max(1, cdiv(d, block_d)) + cdiv(d_out, block_d)
    splits = tuned.get("weight_splits") or _num_splits(num_rows, num_experts, d, h, d_out, num_blocks)
    grads = [torch.empty_like(w) for w in (w1, b1, w2, b2)]
    partials = grads if splits == 1 else [torch.empty((splits, *g.shape), dtype=f32, device=device) for g in grads]
    _backward_weights_kernel[(num_experts, splits, num_blocks)](
        x, grad_y, dpre, scaled_hidden, indices, gates, order, offsets, *partials,
        num_units, k, G, d, h, d_out, num_experts, splits, float(scale),
        PER_EXPERT=bool(per_expert_input), BY_SLOT=by_unit, UPCAST=upcast,
        BLOCK_M=tuned.get("weight_rows", WEIGHT_ROWS), BLOCK_D=block_d, H_PAD=h_pad,
        **launch_options(_num_warps(h_pad * block_d // 64), "weight_"))   # its accumulator is [BLOCK_D, H_PAD]
    largest = max(g.numel() for g in grads)
    if splits > 1 and largest:
        _reduce_splits_kernel[(cdiv(largest, SUM_BLOCK), 4)](
            *partials, *grads, *(g.numel() for g in grads), splits, BLOCK=SUM_BLOCK, num_warps=4)
    return (grad_x, grad_gates, *grads)
