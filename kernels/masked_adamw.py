"""Triton backend of ``fsosr.ops.masked_adamw_`` (semantics: fsosr/ops/masked_adamw.py, docs/ops/masked_adamw.md;
oracle: fsosr/ops/reference.py ``masked_adamw_flat_``).

Two launches, both sized by shapes alone (no host synchronisation, so a CUDA graph can capture the step):

1. ``_rules_kernel`` over the S x (N+1) (segment, owner slot) pairs: decides whether the slot steps this time
   (``mosa``: drawn, or drawn before; ``skip``/``freeze``: drawn), advances HF AdamW's per-tensor step counter,
   and writes the slot's bias-corrected step size, decay and flags, computed in fp64 as the CPU kernel does.
   Python floats reach a Triton kernel as fp32, which would round lr and the betas before the fp64 maths, so
   the hyperparameters travel as the int64 bit patterns of their doubles and are bitcast back in the kernel.
2. ``_step_kernel``: the one pass over the flat buffer. Each entry finds its segment by a binary search over
   ``segment_offsets`` (cached loads of S+1 values), its slot from ``owner`` (255 -> slot N), loads that slot's
   rule, and updates p, m, v in place. Entries whose slot does not step are neither read nor written (their
   bytes never move). The update is elementwise, so results are bitwise reproducible run to run.

With ``FSOSR_MASKED_ADAMW_TRITON_FUSED=1`` (and at most 15 experts) one launch does both: ``_fused_kernel``
computes each program's rules itself from the counters as they were, and the last program to arrive (an acq_rel
atomic count) advances the counters (docs/ops/masked_adamw.md).

Inputs the Python wrapper did not validate (``validate=False`` on CUDA) cannot make the kernels read out of
bounds: an owner value >= N other than 255 leaves its entry untouched, a selected expert outside [0, N) matches
no slot, and the segment search stays inside [0, S).
"""
import math
import os
import struct

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Entries per program of the step kernel. 1024 with 4 warps is 8 entries per thread: enough bytes in flight per
# SM to stream at HBM speed (no register spills in the sm_90 compile, 72-80 registers in fp32; 4096 spills). The
# interpreter runs one program at a time in numpy, so there bigger is faster; tests/ops/triton_aot_compile.py
# compiles the GPU value (its INTERPRETER_BLOCKS).
BLOCK = 4096 if _INTERPRET else 1024
RULES_BLOCK = 256        # (segment, slot) pairs per program of the rules kernel
# One launch instead of two (rules, then step) where each program can hold a segment's N+1 rules in registers:
# opt-in until it has run on a GPU (its correctness across programs rests on the arrival counter's ordering,
# which the interpreter, running programs one after another, cannot exercise).
FUSED_VARIABLE = "FSOSR_MASKED_ADAMW_TRITON_FUSED"
FUSED_MAX_EXPERTS = 15
_ARRIVAL_COUNTERS: dict = {}
# Globals read inside @triton.jit code must be tl.constexpr: the compiler rejects plain ints (the interpreter does
# not, so tests/ops/test_triton_sources.py checks this statically).
SHARED = tl.constexpr(255)        # owner value of entries every expert updates (fsosr.ops.masked_adamw.SHARED)
_FLAG_UPDATE = tl.constexpr(1)    # the slot steps this time
_FLAG_GRAD = tl.constexpr(2)      # the slot reads its gradient (drawn); otherwise its moments see g = 0


def _bits(value: float) -> int:
    """The IEEE-754 bit pattern of ``value`` as a signed int64 (decoded by ``_as_f64`` in a kernel)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def _as_f64(bits):
    # bits arrives as i32 (small non-negative patterns, e.g. 0.0) or i64; widen, then reinterpret.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _sqrt(x):
    # Correctly rounded in both dtypes (std::sqrt's result): sqrt_rn exists for fp32 only, and fp64 sqrt is
    # always the IEEE one.
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _div(x, y):
    # IEEE division in both dtypes (Triton's plain fp32 `/` may be the approximate one on GPUs).
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _pow_int(base, exponent):
    """base ** exponent for fp64 base and int64 exponent >= 0, by binary exponentiation (multiplies only: no
    fp64 exp/log, which not every Triton backend lowers)."""
    result = tl.full(exponent.shape, 1.0, tl.float64)
    power = base + tl.zeros(exponent.shape, tl.float64)
    e = exponent
    for _ in range(63):
        result = tl.where((e & 1) != 0, result * power, result)
        power = power * power
        e = e >> 1
    return result


@triton.jit
def _counter(steps_ptr, selected_ptr, segment, slot, mask, num_experts, draws, MOSA: tl.constexpr,
             ADVANCE: tl.constexpr):
    """(counter after this step (advanced where the slot steps, when ADVANCE), whether the slot steps, whether it
    was drawn) of (segment, slot) pairs."""
    t = tl.load(steps_ptr + segment * (num_experts + 1) + slot, mask=mask, other=0)
    drawn = slot == num_experts        # the shared slot, and every expert drawn since the last step
    for d in range(0, draws):
        chosen = tl.load(selected_ptr + segment * draws + d, mask=mask, other=-1)
        drawn = drawn | (slot == chosen)
    if MOSA:
        update = drawn | (t > 0)       # torch 1.11 zero_grad keeps zero grads: once drawn, always stepped
    else:
        update = drawn                 # set_to_none: only the drawn expert steps
    if ADVANCE:
        t = t + update.to(tl.int64)
    return t, update, drawn


@triton.jit
def _rule(steps_ptr, selected_ptr, weight_decay_ptr, segment, slot, mask, num_experts, draws, lr, beta1, beta2,
          MOSA: tl.constexpr, ADVANCE: tl.constexpr):
    """The rule of (segment, slot) pairs: their counters after this step, whether they step, the bias-corrected
    step size and the decay (fp64), and the flags (int32)."""
    t, update, drawn = _counter(steps_ptr, selected_ptr, segment, slot, mask, num_experts, draws, MOSA, ADVANCE)
    tt = tl.maximum(t, 1)              # t only matters where the slot steps, and there it is >= 1
    correction1 = 1.0 - _pow_int(beta1, tt)
    correction2 = 1.0 - _pow_int(beta2, tt)
    step_size = tl.where(update, lr * _sqrt(correction2) / correction1, 0.0)
    decay = lr * tl.load(weight_decay_ptr + segment, mask=mask, other=0.0)
    flags = update.to(tl.int32) * _FLAG_UPDATE + drawn.to(tl.int32) * _FLAG_GRAD
    return t, update, step_size, decay, flags


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "eps_bits"])
def _rules_kernel(steps_ptr, selected_ptr, weight_decay_ptr, step_size_ptr, decay_ptr, flags_ptr, consts_ptr,
                  num_pairs, num_experts, draws, lr_bits, beta1_bits, beta2_bits, eps_bits,
                  MOSA: tl.constexpr, ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lr = _as_f64(lr_bits)
    beta1 = _as_f64(beta1_bits)
    beta2 = _as_f64(beta2_bits)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < num_pairs
    slots = num_experts + 1
    t, update, step_size, decay, flags = _rule(steps_ptr, selected_ptr, weight_decay_ptr, idx // slots, idx % slots,
                                               ok, num_experts, draws, lr, beta1, beta2, MOSA, ADVANCE)
    if ADVANCE:
        tl.store(steps_ptr + idx, t, mask=ok & update)
    out_ty = step_size_ptr.dtype.element_ty
    tl.store(step_size_ptr + idx, step_size.to(out_ty), mask=ok)
    tl.store(decay_ptr + idx, decay.to(out_ty), mask=ok)
    tl.store(flags_ptr + idx, flags.to(tl.int8), mask=ok)
    if pid == 0:
        # beta1, beta2, 1 - beta1, 1 - beta2, eps rounded once to the parameter dtype, like eager PyTorch's
        # python-scalar arithmetic in the reference. Written as a 5-lane vector store (lanes 0..4).
        lane = tl.arange(0, 8)
        eps = _as_f64(eps_bits)
        consts = tl.where(lane == 0, beta1, tl.where(lane == 1, beta2, tl.where(lane == 2, 1.0 - beta1,
                          tl.where(lane == 3, 1.0 - beta2, eps))))
        tl.store(consts_ptr + lane, consts.to(out_ty), mask=lane < 5)


@triton.jit
def _entries(idx, ok, owner_ptr, offsets_ptr, num_segments, num_experts, SEARCH_STEPS: tl.constexpr):
    """Segment (int32) and owner slot of each entry, and whether its owner is known (< N or 255)."""
    # The last s with offsets[s] <= idx. Invariant offsets[lo] <= idx < offsets[hi]; SEARCH_STEPS = ceil(log2 S)
    # halvings leave hi = lo + 1 (once there, mid = lo and nothing changes).
    lo = tl.zeros(idx.shape, tl.int32)
    hi = tl.full(idx.shape, 0, tl.int32) + num_segments
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        start = tl.load(offsets_ptr + mid, mask=ok, other=0)
        right = start <= idx
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    owner = tl.load(owner_ptr + idx, mask=ok, other=SHARED).to(tl.int32)
    known = (owner < num_experts) | (owner == SHARED)
    slot = tl.where(owner == SHARED, num_experts, owner)
    return lo, slot, known


@triton.jit
def _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, idx, update, read_grad, step_size, decay, beta1, beta2,
                 one_minus_beta1, one_minus_beta2, eps):
    """HF AdamW on the entries that step, in place; the others are neither read nor written."""
    # A masked-out gradient is never loaded: the select drops NaN/inf exactly like a copy that never saw it.
    grad = tl.load(g_ptr + idx, mask=read_grad, other=0.0)
    p = tl.load(p_ptr + idx, mask=update, other=0.0)
    m = tl.load(m_ptr + idx, mask=update, other=0.0)
    v = tl.load(v_ptr + idx, mask=update, other=0.0)
    m_new = beta1 * m + one_minus_beta1 * grad
    v_new = beta2 * v + one_minus_beta2 * (grad * grad)
    stepped = p - step_size * _div(m_new, _sqrt(v_new) + eps)
    p_new = stepped - decay * stepped
    tl.store(p_ptr + idx, p_new, mask=update)
    tl.store(m_ptr + idx, m_new, mask=update)
    tl.store(v_ptr + idx, v_new, mask=update)


@triton.jit
def _step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, owner_ptr, offsets_ptr, step_size_ptr, decay_ptr, flags_ptr,
                 consts_ptr, numel, num_segments, num_experts,
                 SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    segment, slot, known = _entries(idx, ok, owner_ptr, offsets_ptr, num_segments, num_experts, SEARCH_STEPS)
    rule = segment * (num_experts + 1) + slot
    live = ok & known
    flags = tl.load(flags_ptr + rule, mask=live, other=0).to(tl.int32)
    update = live & ((flags & _FLAG_UPDATE) != 0)
    read_grad = update & ((flags & _FLAG_GRAD) != 0)
    step_size = tl.load(step_size_ptr + rule, mask=update, other=0.0)
    decay = tl.load(decay_ptr + rule, mask=update, other=0.0)
    _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, idx, update, read_grad, step_size, decay, tl.load(consts_ptr + 0),
                 tl.load(consts_ptr + 1), tl.load(consts_ptr + 2), tl.load(consts_ptr + 3), tl.load(consts_ptr + 4))


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "eps_bits"])
def _fused_kernel(p_ptr, g_ptr, m_ptr, v_ptr, owner_ptr, offsets_ptr, steps_ptr, selected_ptr, weight_decay_ptr,
                  arrived_ptr, numel, num_segments, num_experts, draws, num_programs,
                  lr_bits, beta1_bits, beta2_bits, eps_bits, MOSA: tl.constexpr, ADVANCE: tl.constexpr,
                  SEARCH_STEPS: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr, RULES_BLOCK: tl.constexpr):
    """The whole step in one launch (FSOSR_MASKED_ADAMW_TRITON_FUSED=1): each program computes the rules it needs
    from the counters as they were before the step, and the last program to finish advances the counters."""
    pid = tl.program_id(0)
    lr = _as_f64(lr_bits)
    beta1 = _as_f64(beta1_bits)
    beta2 = _as_f64(beta2_bits)
    eps = _as_f64(eps_bits)
    out_ty = p_ptr.dtype.element_ty
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    segment, slot, known = _entries(idx, ok, owner_ptr, offsets_ptr, num_segments, num_experts, SEARCH_STEPS)
    live = ok & known
    # The rules of this program's first segment, one lane per slot, picked per entry (one-hot over SLOTS lanes).
    first = tl.min(tl.where(live, segment, num_segments), axis=0)
    lane = tl.arange(0, SLOTS)
    lane_ok = (lane <= num_experts) & (first < num_segments)
    lane_t, lane_update, lane_size, lane_decay, lane_flags = _rule(steps_ptr, selected_ptr, weight_decay_ptr,
                                                                   tl.zeros([SLOTS], tl.int32) + first, lane, lane_ok,
                                                                   num_experts, draws, lr, beta1, beta2, MOSA, ADVANCE)
    pick = (live & (segment == first))[:, None] & (slot[:, None] == lane[None, :])
    step_size = tl.sum(tl.where(pick, lane_size.to(out_ty)[None, :], 0.0), axis=1)
    decay = tl.sum(tl.where(pick, lane_decay.to(out_ty)[None, :], 0.0), axis=1)
    flags = tl.sum(tl.where(pick, lane_flags[None, :], 0), axis=1)
    # Entries past the first segment (a program that straddles segment boundaries): rules of their own.
    later = live & (segment != first)
    if tl.max(later.to(tl.int32), axis=0) > 0:
        # (Triton types a name across both sides of an `if`: the unused results get names of their own.)
        own_t, own_update, own_size, own_decay, own_flags = _rule(steps_ptr, selected_ptr, weight_decay_ptr, segment,
                                                                  slot, later, num_experts, draws, lr, beta1, beta2,
                                                                  MOSA, ADVANCE)
        step_size = tl.where(later, own_size.to(out_ty), step_size)
        decay = tl.where(later, own_decay.to(out_ty), decay)
        flags = tl.where(later, own_flags, flags)
    update = live & ((flags & _FLAG_UPDATE) != 0)
    read_grad = update & ((flags & _FLAG_GRAD) != 0)
    # beta1, beta2, 1 - beta1, 1 - beta2, eps rounded once to the parameter dtype, as the rules kernel does.
    _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, idx, update, read_grad, step_size, decay, beta1.to(out_ty),
                 beta2.to(out_ty), (1.0 - beta1).to(out_ty), (1.0 - beta2).to(out_ty), eps.to(out_ty))
    if ADVANCE:
        # Every program read the counters it needed above. The acq_rel increment orders those reads before it, so
        # the last program to arrive (which has seen every other increment) writes the advanced counters after
        # all of them, then re-arms the count for the next launch.
        arrived = tl.atomic_add(arrived_ptr, 1, sem="acq_rel")
        if arrived == num_programs - 1:
            slots = num_experts + 1
            num_pairs = num_segments * slots
            for start in range(0, num_pairs, RULES_BLOCK):
                pair = start + tl.arange(0, RULES_BLOCK)
                pair_ok = pair < num_pairs
                t, pair_update, pair_drawn = _counter(steps_ptr, selected_ptr, pair // slots, pair % slots, pair_ok,
                                                      num_experts, draws, MOSA, ADVANCE)
                tl.store(steps_ptr + pair, t, mask=pair_ok & pair_update)
            tl.atomic_xchg(arrived_ptr, 0, sem="relaxed")


def fused(num_experts: int) -> bool:
    """Whether the step runs as one launch (``_fused_kernel``): ``FSOSR_MASKED_ADAMW_TRITON_FUSED=1`` (default 0
    until it has run on a GPU), for at most FUSED_MAX_EXPERTS experts."""
    setting = os.environ.get(FUSED_VARIABLE, "0")
    if setting not in ("0", "1"):
        raise ValueError(f"{FUSED_VARIABLE} must be 0 or 1, got {setting!r}")
    return setting == "1" and num_experts <= FUSED_MAX_EXPERTS


def _arrival_counter(device: torch.device) -> torch.Tensor:
    """The fused kernel's arrival count on this device: int32, zero between launches (the last program re-arms
    it). One per device, so two fused steps must not run concurrently on one device (on two streams)."""
    counter = _ARRIVAL_COUNTERS.get(device)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("masked_adamw_ (fused triton step): run one step before capturing it in a CUDA graph, "
                               "so that its arrival counter is allocated outside the capture")
        counter = _ARRIVAL_COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def masked_adamw(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, weight_decay,
                 lr: float, beta1: float, beta2: float, eps: float, semantics: int, advance_steps: bool) -> None:
    """In place on params, exp_avg, exp_avg_sq (fp32 or fp64 [P]) and, when advance_steps, steps (int64 [S, N+1]).

    Arguments are those of ``fsosr::masked_adamw_`` and are assumed validated (see the module docstring for
    what unvalidated values do).
    """
    num_segments = segment_offsets.numel() - 1
    num_experts = steps.shape[1] - 1
    num_pairs = steps.numel()
    draws = selected.shape[1] if selected.dim() == 2 else 1
    device, dtype = params.device, params.dtype
    numel = params.numel()
    search_steps = math.ceil(math.log2(num_segments)) if num_segments > 1 else 0
    if num_pairs and fused(num_experts):
        programs = max(1, cdiv(numel, BLOCK))       # one even without entries: it advances the counters
        _fused_kernel[(programs,)](
            params, grads, exp_avg, exp_avg_sq, owner, segment_offsets, steps, selected, weight_decay,
            _arrival_counter(device) if advance_steps else steps, numel, num_segments, num_experts, draws, programs,
            _bits(lr), _bits(beta1), _bits(beta2), _bits(eps), MOSA=semantics == 0, ADVANCE=bool(advance_steps),
            SEARCH_STEPS=search_steps, SLOTS=next_power_of_2(num_experts + 1), BLOCK=BLOCK,
            RULES_BLOCK=RULES_BLOCK, num_warps=4)
        return
    step_size = torch.empty(num_pairs, dtype=dtype, device=device)
    decay = torch.empty(num_pairs, dtype=dtype, device=device)
    flags = torch.empty(num_pairs, dtype=torch.int8, device=device)
    consts = torch.empty(5, dtype=dtype, device=device)
    if num_pairs == 0:
        return
    _rules_kernel[(cdiv(num_pairs, RULES_BLOCK),)](
        steps, selected, weight_decay, step_size, decay, flags, consts, num_pairs, num_experts, draws,
        _bits(lr), _bits(beta1), _bits(beta2), _bits(eps),
        MOSA=semantics == 0, ADVANCE=bool(advance_steps), BLOCK=RULES_BLOCK, num_warps=4)
    if numel == 0:
        return
    _step_kernel[(cdiv(numel, BLOCK),)](
        params, grads, exp_avg, exp_avg_sq, owner, segment_offsets, step_size, decay, flags, consts,
        numel, num_segments, num_experts, SEARCH_STEPS=search_steps, BLOCK=BLOCK, num_warps=4)
