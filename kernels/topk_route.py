"""Triton backend of ``fsosr.ops.topk_route`` (semantics: docs/ops/topk_route.md, oracle: fsosr/ops/reference.py).

Forward = three kernels, backward = one kernel:

1. ``_route_rows_kernel`` (one program per block of BLOCK_N rows): ranks each row's E experts with k (+1) rounds
   of an integer ``tl.max``, writes indices / gates / next_index, and the block's partial counts, importance and
   smooth load into [num_programs, E] buffers (no float atomics, so the result is bitwise reproducible).
2. ``_finish_kernel`` (one program): fixed-order sums and prefix sums of the partial buffers give counts,
   offsets, importance, load and, per (program, expert), where the program's first routed unit goes in ``order``.
   (It replaced a dozen small torch ops whose host cost, 25-40 us each on the H100 machine, made the Triton
   forward 356 us against 49 us for the cuda backend's.)
3. ``_write_order_kernel`` (same blocks): scatters the flat ids into ``order``. A row picks an expert at most once,
   so within one program and one expert "ascending flat id" is "ascending row": an exclusive cumsum down the
   rows of the [BLOCK_N, E_PAD] selection mask is the rank inside the program, which keeps the sort stable.
4. ``_route_backward_kernel`` (one program per block of rows): the doc's closed-form backward; rows are
   independent, so every output element is written by exactly one program.

All arithmetic is fp32. Kernels are launched with ``enable_fp_fusion=False`` so ``clean + noise * std`` is rounded
exactly like eager PyTorch (no FMA): the ranking of near-ties then agrees with the reference bit for bit.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2

# Elements of one [BLOCK_N, E_PAD] tile. The forward keeps about five such tiles live (int64 rank keys, noisy and
# clean logits, the rank of each expert, the gates); 2048 elements over 4 warps is 16 per thread and tile, which
# stays in registers. E = 64 gives 32 rows per program; very large E falls back to a few rows per program and
# spills, which is slower but still correct.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_N = 64       # for small E: bigger blocks would leave moderate N with too few programs to fill the GPU
_MIN_BLOCK_N = 2        # keeps the row axis a real axis for tl.cumsum / reductions
_NUM_WARPS = 4

# Ordered key of padded and already-picked lanes: below the key of every real value (the lowest real key is
# -inf's, -2139095041) so they never win while a real expert is left.
_SENTINEL_KEY = tl.constexpr(-2147483647)


def _padded_experts(num_experts: int) -> int:
    return max(2, next_power_of_2(num_experts))


def _pick_block_n(num_experts: int) -> int:
    """Rows per program for E experts (a power of 2, see _TILE_ELEMENTS)."""
    rows = _TILE_ELEMENTS // _padded_experts(num_experts)
    return max(_MIN_BLOCK_N, min(_MAX_BLOCK_N, rows))


@triton.jit
def _load_noisy_tile(logits_ptr, noise_ptr, std_ptr, tile_offsets, valid, HAS_NOISE: tl.constexpr):
    """clean, noisy, noise and std as fp32 [BLOCK_N, E_PAD] tiles (padding: 0, 0, 0, 1)."""
    clean = tl.load(logits_ptr + tile_offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_NOISE:
        noise = tl.load(noise_ptr + tile_offsets, mask=valid, other=0.0).to(tl.float32)
        std = tl.load(std_ptr + tile_offsets, mask=valid, other=1.0).to(tl.float32)
        noisy = clean + noise * std
    else:
        noise = clean
        std = clean
        noisy = clean
    return clean, noisy, noise, std


@triton.jit
def _normal_cdf(z):
    # Phi(z) = 0.5 * erfc(-z / sqrt2); tl.erf (unlike libdevice erfc) also runs in the interpreter. The 1 + erf
    # form loses relative accuracy only in the far lower tail, where Phi itself is below fp32 noise of a sum.
    return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _load_margin(clean, threshold, std):
    """(clean - threshold) / std, and -inf for a disabled expert (clean = -inf) even against a -inf threshold,
    which would give NaN. (x - x == 0 is the finiteness test: it is NaN for +-inf.)"""
    return tl.where(clean - clean == 0.0, (clean - threshold) / std, clean)


@triton.jit
def _route_rows_kernel(logits_ptr, noise_ptr, std_ptr,
                       indices_ptr, gates_ptr, next_index_ptr,
                       part_counts_ptr, part_importance_ptr, part_load_ptr,
                       num_units, num_experts, k,
                       RENORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_NEXT: tl.constexpr,
                       BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < num_units
    col_ok = cols < num_experts
    valid = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    tile_offsets = rows64[:, None] * num_experts + cols[None, :]
    clean, noisy, noise, std = _load_noisy_tile(logits_ptr, noise_ptr, std_ptr, tile_offsets, valid, HAS_NOISE)

    # Order-preserving integer key of the noisy logit: -0.0 -> +0.0 (so they tie), every NaN -> the largest int32
    # (above +inf), negative floats get their magnitude bits flipped so that signed comparison matches float
    # order. The low 32 bits of the packed int64 hold E_PAD-1-col, so a tie on the key goes to the lower column.
    canonical = tl.where(noisy == 0.0, 0.0, noisy)
    bits = canonical.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(noisy != noisy, 0x7FFFFFFF, key)
    sentinel = tl.full([BLOCK_N, E_PAD], _SENTINEL_KEY, tl.int32).to(tl.int64) << 32
    packed = (key.to(tl.int64) << 32) | (E_PAD - 1 - cols)[None, :].to(tl.int64)
    packed = tl.where(col_ok[None, :], packed, sentinel)

    # rank[n, e] = position of expert e in row n's top k, -1 if not picked. One tl.max per round; the winner is
    # replaced by the sentinel so the next round finds the next one.
    rank = tl.full([BLOCK_N, E_PAD], -1, tl.int32)
    for j in range(0, k):
        best = tl.max(packed, axis=1)
        winner = (E_PAD - 1 - (best & (E_PAD - 1))).to(tl.int32)
        hit = cols[None, :] == winner[:, None]
        rank = tl.where(hit, j, rank)
        packed = tl.where(hit, sentinel, packed)
    if HAS_NEXT:
        best = tl.max(packed, axis=1)
        next_index = (E_PAD - 1 - (best & (E_PAD - 1))).to(tl.int32)
    else:
        next_index = tl.full([BLOCK_N], -1, tl.int32)
    tl.store(next_index_ptr + rows, next_index, mask=row_ok)

    selected = (rank >= 0) & valid
    # The softmax shift is the rank-0 value: it is the row maximum, and NaN when the row has a NaN (NaN ranks
    # first), so a bad row yields NaN gates exactly like torch.softmax.
    top_value = tl.sum(tl.where(rank == 0, noisy, 0.0), axis=1)
    if RENORMALIZE:
        weights = tl.where(selected, tl.exp(noisy - top_value[:, None]), 0.0)
    else:
        weights = tl.where(valid, tl.exp(noisy - top_value[:, None]), 0.0)
    # Rows past N have no weights: divide them by 1 (not 0/0) and the mask keeps them out of the partials.
    denominator = tl.where(row_ok, tl.sum(weights, axis=1), 1.0)
    gates = tl.where(selected, weights / denominator[:, None], 0.0)

    # Scatter by rank: flat slot n*k + rank[n, e] gets expert e (each slot is written exactly once).
    slot = rows64[:, None] * k + rank
    tl.store(indices_ptr + slot, tl.broadcast_to(cols[None, :], [BLOCK_N, E_PAD]), mask=selected)
    tl.store(gates_ptr + slot, gates, mask=selected)

    part_offsets = pid * num_experts + cols
    tl.store(part_counts_ptr + part_offsets, tl.sum(selected.to(tl.int32), axis=0), mask=col_ok)
    tl.store(part_importance_ptr + part_offsets, tl.sum(gates, axis=0), mask=col_ok)
    if HAS_NOISE and HAS_NEXT:
        # Shazeer's smooth load: threshold = (k+1)-th noisy logit for picked experts, k-th for the others.
        threshold_in = tl.sum(tl.where(cols[None, :] == next_index[:, None], noisy, 0.0), axis=1)
        threshold_out = tl.sum(tl.where(rank == k - 1, noisy, 0.0), axis=1)
        threshold = tl.where(rank >= 0, threshold_in[:, None], threshold_out[:, None])
        prob_in = tl.where(valid, _normal_cdf(_load_margin(clean, threshold, std)), 0.0)
        tl.store(part_load_ptr + part_offsets, tl.sum(prob_in, axis=0), mask=col_ok)


@triton.jit
def _gather_rank_tile(indices_ptr, rows64, row_ok, cols, k, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    """rank[n, e] = j where indices[n, j] == e, else -1 (rows past N stay all -1)."""
    rank = tl.full([BLOCK_N, E_PAD], -1, tl.int32)
    for j in range(0, k):
        expert = tl.load(indices_ptr + rows64 * k + j, mask=row_ok, other=-1)
        rank = tl.where(cols[None, :] == expert[:, None], j, rank)
    return rank


@triton.jit
def _finish_kernel(part_counts_ptr, part_importance_ptr, part_load_ptr, base_ptr, counts_ptr, offsets_ptr,
                   importance_ptr, load_ptr, num_programs, num_experts,
                   SMOOTH_LOAD: tl.constexpr, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr):
    cols = tl.arange(0, E_PAD)
    col_ok = cols < num_experts
    total = tl.zeros([E_PAD], dtype=tl.int32)
    importance = tl.zeros([E_PAD], dtype=tl.float32)
    load = tl.zeros([E_PAD], dtype=tl.float32)
    for p0 in range(0, num_programs, BLOCK_P):        # blocks of programs in order: a fixed summation order
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < num_programs)[:, None] & col_ok[None, :]
        at = p[:, None] * num_experts + cols[None, :]
        total += tl.sum(tl.load(part_counts_ptr + at, mask=ok, other=0), axis=0)
        importance += tl.sum(tl.load(part_importance_ptr + at, mask=ok, other=0.0), axis=0)
        if SMOOTH_LOAD:
            load += tl.sum(tl.load(part_load_ptr + at, mask=ok, other=0.0), axis=0)
    starts = tl.cumsum(total, axis=0) - total           # padded experts count 0, so they do not shift anything
    tl.store(counts_ptr + cols, total, mask=col_ok)
    tl.store(offsets_ptr + cols, starts, mask=col_ok)
    tl.store(offsets_ptr + num_experts, tl.sum(total, axis=0))
    tl.store(importance_ptr + cols, importance, mask=col_ok)
    if SMOOTH_LOAD:
        tl.store(load_ptr + cols, load, mask=col_ok)
    else:
        tl.store(load_ptr + cols, total.to(tl.float32), mask=col_ok)
    # base[p, e] = offsets[e] + units routed to e by programs before p.
    carry = starts
    for p0 in range(0, num_programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < num_programs)[:, None] & col_ok[None, :]
        at = p[:, None] * num_experts + cols[None, :]
        tile = tl.load(part_counts_ptr + at, mask=ok, other=0)
        tl.store(base_ptr + at, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=ok)
        carry += tl.sum(tile, axis=0)


@triton.jit
def _write_order_kernel(indices_ptr, base_ptr, order_ptr, num_units, num_experts, k,
                        BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < num_units
    col_ok = cols < num_experts
    rows64 = rows.to(tl.int64)
    rank = _gather_rank_tile(indices_ptr, rows64, row_ok, cols, k, BLOCK_N, E_PAD)
    picked = (rank >= 0).to(tl.int32)
    # Exclusive cumsum down the rows = how many earlier rows of this program went to the same expert.
    rank_in_program = tl.cumsum(picked, axis=0) - picked
    base = tl.load(base_ptr + pid * num_experts + cols, mask=col_ok, other=0)
    destination = base[None, :] + rank_in_program
    flat_id = (rows64[:, None] * k + rank).to(tl.int32)
    tl.store(order_ptr + destination, flat_id, mask=rank >= 0)


@triton.jit
def _route_backward_kernel(grad_gates_ptr, grad_importance_ptr, grad_load_ptr,
                           logits_ptr, noise_ptr, std_ptr, indices_ptr, gates_ptr, next_index_ptr,
                           grad_logits_ptr, grad_std_ptr,
                           num_units, num_experts, k,
                           RENORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_NEXT: tl.constexpr,
                           BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < num_units
    col_ok = cols < num_experts
    valid = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    tile_offsets = rows64[:, None] * num_experts + cols[None, :]
    clean, noisy, noise, std = _load_noisy_tile(logits_ptr, noise_ptr, std_ptr, tile_offsets, valid, HAS_NOISE)

    # Spread the [N, k] inputs over experts: rank, gate and grad_gate of each picked expert (0 elsewhere).
    rank = tl.full([BLOCK_N, E_PAD], -1, tl.int32)
    gate = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    grad_gate = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    for j in range(0, k):
        flat = rows64 * k + j
        expert = tl.load(indices_ptr + flat, mask=row_ok, other=-1)
        hit = cols[None, :] == expert[:, None]
        rank = tl.where(hit, j, rank)
        gate = tl.where(hit, tl.load(gates_ptr + flat, mask=row_ok, other=0.0)[:, None], gate)
        grad_gate = tl.where(hit, tl.load(grad_gates_ptr + flat, mask=row_ok, other=0.0)[:, None], grad_gate)
    selected = rank >= 0
    grad_importance = tl.load(grad_importance_ptr + cols, mask=col_ok, other=0.0)
    # dg = gg + gi[e] on picked experts; it is exactly dp of the unrenormalised form (0 off the top k).
    dg = tl.where(selected, grad_gate + grad_importance[None, :], 0.0)
    s = tl.sum(tl.where(selected, gate * dg, 0.0), axis=1)

    if RENORMALIZE:
        d_noisy = tl.where(selected, gate * (dg - s[:, None]), 0.0)
    else:
        # Recompute p = softmax(noisy) with the same shift as the forward (the rank-0 value).
        top_value = tl.sum(tl.where(rank == 0, noisy, 0.0), axis=1)
        weights = tl.where(valid, tl.exp(noisy - top_value[:, None]), 0.0)
        p = weights / tl.where(row_ok, tl.sum(weights, axis=1), 1.0)[:, None]
        d_noisy = tl.where(valid, p * (dg - s[:, None]), 0.0)

    if HAS_NOISE:
        d_clean = tl.zeros([BLOCK_N, E_PAD], tl.float32)
        d_std = tl.zeros([BLOCK_N, E_PAD], tl.float32)
        if HAS_NEXT:
            next_index = tl.load(next_index_ptr + rows, mask=row_ok, other=-1)
            is_next = cols[None, :] == next_index[:, None]
            is_kth = rank == k - 1
            threshold_in = tl.sum(tl.where(is_next, noisy, 0.0), axis=1)
            threshold_out = tl.sum(tl.where(is_kth, noisy, 0.0), axis=1)
            threshold = tl.where(selected, threshold_in[:, None], threshold_out[:, None])
            z = _load_margin(clean, threshold, std)
            live = valid & (z - z == 0.0)          # finite margin: elsewhere Phi is flat, no gradient
            grad_load = tl.load(grad_load_ptr + cols, mask=col_ok, other=0.0)
            a = tl.where(live, grad_load[None, :] * (tl.exp(-0.5 * z * z) * 0.3989422804014327), 0.0)
            a_over_std = tl.where(live, a / std, 0.0)
            d_clean = a_over_std
            d_std = tl.where(live, -a * z / std, 0.0)
            # Each threshold is itself a noisy logit: picked experts pull on the (k+1)-th, the rest on the k-th.
            pull_in = tl.sum(tl.where(selected, a_over_std, 0.0), axis=1)
            pull_out = tl.sum(tl.where(selected, 0.0, a_over_std), axis=1)
            d_noisy = d_noisy - tl.where(is_next, pull_in[:, None], 0.0) - tl.where(is_kth, pull_out[:, None], 0.0)
        grad_logits = d_noisy + d_clean
        grad_std = d_noisy * noise + d_std
        tl.store(grad_std_ptr + tile_offsets, grad_std.to(grad_std_ptr.dtype.element_ty), mask=valid)
    else:
        grad_logits = d_noisy
    tl.store(grad_logits_ptr + tile_offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=valid)


def topk_route_forward(logits, k: int, renormalize: bool, noise=None, noise_std=None):
    """Returns (indices, gates, counts, order, offsets, importance, load, next_index); see reference.topk_route."""
    num_units, num_experts = logits.shape
    device = logits.device
    has_noise = noise is not None
    has_next = k < num_experts
    indices = torch.empty((num_units, k), dtype=torch.int32, device=device)
    gates = torch.empty((num_units, k), dtype=torch.float32, device=device)
    order = torch.empty((num_units * k,), dtype=torch.int32, device=device)
    next_index = torch.empty((num_units,), dtype=torch.int32, device=device)
    if num_units == 0:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
        importance = torch.zeros(num_experts, dtype=torch.float32, device=device)
        load = torch.zeros(num_experts, dtype=torch.float32, device=device)
        return indices, gates, counts, order, offsets, importance, load, next_index

    block_n = _pick_block_n(num_experts)
    e_pad = _padded_experts(num_experts)
    num_programs = cdiv(num_units, block_n)
    part_counts = torch.empty((num_programs, num_experts), dtype=torch.int32, device=device)
    part_importance = torch.empty((num_programs, num_experts), dtype=torch.float32, device=device)
    smooth_load = has_noise and has_next
    # Only the smooth load needs per-program partials; otherwise load = counts and the buffer is a dummy.
    part_load = torch.empty((num_programs if smooth_load else 1, num_experts), dtype=torch.float32, device=device)
    _route_rows_kernel[(num_programs,)](
        logits, noise if has_noise else logits, noise_std if has_noise else logits,
        indices, gates, next_index, part_counts, part_importance, part_load,
        num_units, num_experts, k,
        RENORMALIZE=bool(renormalize), HAS_NOISE=has_noise, HAS_NEXT=has_next,
        BLOCK_N=block_n, E_PAD=e_pad, num_warps=_NUM_WARPS, enable_fp_fusion=False)

    counts = torch.empty((num_experts,), dtype=torch.int32, device=device)
    offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=device)
    importance = torch.empty((num_experts,), dtype=torch.float32, device=device)
    load = torch.empty((num_experts,), dtype=torch.float32, device=device)
    base = torch.empty((num_programs, num_experts), dtype=torch.int32, device=device)
    _finish_kernel[(1,)](part_counts, part_importance, part_load, base, counts, offsets, importance, load,
                         num_programs, num_experts, SMOOTH_LOAD=smooth_load, BLOCK_P=block_n, E_PAD=e_pad,
                         num_warps=_NUM_WARPS)
    _write_order_kernel[(num_programs,)](
        indices, base, order, num_units, num_experts, k,
        BLOCK_N=block_n, E_PAD=e_pad, num_warps=_NUM_WARPS)
    return indices, gates, counts, order, offsets, importance, load, next_index


def topk_route_backward(grad_gates, grad_importance, grad_load, logits, noise, noise_std, indices, gates,
                        next_index, k: int, renormalize: bool):
    """Returns (grad_logits, grad_noise_std) in the logits dtype; grad_noise_std is empty for clean routing."""
    num_units, num_experts = logits.shape
    has_noise = noise is not None
    grad_logits = torch.empty_like(logits)
    grad_std = torch.empty_like(logits) if has_noise else torch.empty(0, dtype=logits.dtype, device=logits.device)
    if num_units == 0:
        return grad_logits, grad_std
    block_n = _pick_block_n(num_experts)
    num_programs = cdiv(num_units, block_n)
    _route_backward_kernel[(num_programs,)](
        grad_gates, grad_importance, grad_load,
        logits, noise if has_noise else logits, noise_std if has_noise else logits,
        indices, gates, next_index,
        grad_logits, grad_std if has_noise else grad_logits,
        num_units, num_experts, k,
        RENORMALIZE=bool(renormalize), HAS_NOISE=has_noise, HAS_NEXT=k < num_experts,
        BLOCK_N=block_n, E_PAD=_padded_experts(num_experts), num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return grad_logits, grad_std
