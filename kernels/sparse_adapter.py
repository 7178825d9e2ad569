"""Triton backend of MoSA's compact sparse-expert ops (contract: docs/ops/sparse_adapter.md; oracle:
fsosr/ops/reference semantics in fsosr/ops/sparse_adapter.py).

Expert e's weight is ``W_e = where(owner == e, w_own, w_rest or 0)`` ([out, in]). Kernels:

1. ``_select_kernel`` / ``_split_kernel``: materialise W_e, and split a gradient by the mask (own part, rest part)
   in one pass. Selects move values unchanged, so any float dtype works as is.
2. ``_linear_kernel``: ``C = A @ B + bias`` where B's tile is W_e (or W_e^T) selected *while it is loaded* from
   w_own / w_rest / owner: the forward ``y = x W_e^T + b`` and the backward ``grad_x = grad_y W_e`` never
   materialise W_e.
3. ``_weight_grad_kernel``: ``grad_y^T x`` per [BLOCK_O, BLOCK_I] output tile with fp32 accumulation; its epilogue
   loads the owner tile and writes ``where(mine, acc, 0)`` to grad_w_own and (when asked) ``where(mine, 0, acc)``
   to grad_w_rest. The masked gradient is produced where dW is produced; there is no later pass over dW. When the
   output has few tiles (adapter shapes: 768 x 64 is 12 tiles) the M reduction is cut into a fixed number of
   splits that write masked fp32 partials, summed afterwards in a fixed order: deterministic, no atomics.
4. ``_merge_kernel``: MoSA's merge ``(w_own + coefficients[owner] * w_rest) / N`` in fp32 (fp64 for fp64), the
   product, sum and division each rounded to nearest as in the reference (launched with ``enable_fp_fusion=False``
   so no FMA is formed, and ``tl.div_rn`` because ``/`` on fp32 is an approximate division on the GPU).

The expert id comes either from a device tensor (loaded in the kernel: no host read, CUDA-graph safe) or, when it
lives on the CPU while the weights are on the GPU, as a plain integer argument.

Precision: fp32 accumulation; fp32 dots use 3xTF32 on the GPU (fp32-level error), fp16/bf16 the tensor cores.
The interpreter computes bf16 ``tl.dot`` wrongly, so when TRITON_INTERPRET=1 every dot upcasts to fp32 first.
"""
import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, scalar_argument

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP32_PRECISION = tl.constexpr("ieee" if _INTERPRET else "tf32x3")

SELECT_BLOCK = 1024     # entries per program of a select
BLOCK_M = 64            # rows of x per program of the linear kernel
BLOCK_N = 64            # output columns per program of the linear kernel
BLOCK_K = 32            # reduction chunk of the linear kernel
BLOCK_O = 64            # dW tile rows (output features)
BLOCK_I = 64            # dW tile columns (input features)
GRAD_ROWS = 64          # rows of M per step of the weight-gradient reduction
MERGE_BLOCK = 1024      # entries per program of merge_experts
TARGET_PROGRAMS = 264   # ~2 programs per SM of an H100: the weight gradient splits M until it has this many
MAX_SPLITS = 32


@triton.jit
def _expert(expert_ptr, expert_value, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        return tl.load(expert_ptr).to(tl.int32)
    else:
        return expert_value


@triton.jit(do_not_specialize=["expert_value"])
def _select_kernel(own_ptr, rest_ptr, owner_ptr, expert_ptr, expert_value, out_ptr, n,
                   HAS_REST: tl.constexpr, FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    owner = tl.load(owner_ptr + idx, mask=ok, other=0).to(tl.int32)
    expert = _expert(expert_ptr, expert_value, FROM_PTR)
    mine = owner == expert
    own = tl.load(own_ptr + idx, mask=ok & mine, other=0.0)
    if HAS_REST:
        # owner != expert rather than ~mine: Triton 3.3's interpreter cannot invert a boolean block.
        value = tl.where(mine, own, tl.load(rest_ptr + idx, mask=ok & (owner != expert), other=0.0))
    else:
        value = tl.where(mine, own, 0.0)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["expert_value"])
def _split_kernel(grad_ptr, owner_ptr, expert_ptr, expert_value, own_ptr, rest_ptr, n,
                  REST_OUT: tl.constexpr, FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    mine = tl.load(owner_ptr + idx, mask=ok, other=0).to(tl.int32) == _expert(expert_ptr, expert_value, FROM_PTR)
    grad = tl.load(grad_ptr + idx, mask=ok, other=0.0)
    tl.store(own_ptr + idx, tl.where(mine, grad, 0.0).to(own_ptr.dtype.element_ty), mask=ok)
    if REST_OUT:
        tl.store(rest_ptr + idx, tl.where(mine, 0.0, grad).to(rest_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["expert_value"])
def _linear_kernel(a_ptr, own_ptr, rest_ptr, owner_ptr, expert_ptr, expert_value, bias_ptr, c_ptr,
                   M, N, K, stride_wk, stride_wn,
                   HAS_REST: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_PTR: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]); B[k, n] = W_e at offset k*stride_wk + n*stride_wn of the [out, in]
    weight buffers (forward: stride_wk = 1, stride_wn = in; grad_x: stride_wk = in, stride_wn = 1)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    expert = _expert(expert_ptr, expert_value, FROM_PTR)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_offsets = ks[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn
        w_ok = k_ok[:, None] & col_ok[None, :]
        owner = tl.load(owner_ptr + w_offsets, mask=w_ok, other=0).to(tl.int32)
        mine = owner == expert
        b = tl.load(own_ptr + w_offsets, mask=w_ok & mine, other=0.0)
        if HAS_REST:
            b = tl.where(mine, b, tl.load(rest_ptr + w_offsets, mask=w_ok & (owner != expert), other=0.0))
        acc = _mma(a, b, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["expert_value"])
def _weight_grad_kernel(dy_ptr, x_ptr, owner_ptr, expert_ptr, expert_value, own_ptr, rest_ptr,
                        M, OUT, IN, rows_per_split,
                        REST_OUT: tl.constexpr, FROM_PTR: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split s of tile (o, i): masked sum over rows [s*rows_per_split, (s+1)*rows_per_split) of dy^T x, written to
    own_ptr/rest_ptr + s*OUT*IN (one split: the outputs themselves)."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = outs < OUT
    i_ok = ins < IN
    lo = split.to(tl.int64) * rows_per_split
    hi = tl.minimum(lo + rows_per_split, M)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < hi
        dy_t = tl.load(dy_ptr + ms[None, :] * OUT + outs[:, None], mask=o_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ms[:, None] * IN + ins[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        acc = _mma(dy_t, x, acc, UPCAST)
    # Epilogue: the owner mask, applied to the tile as it is written.
    tile_ok = o_ok[:, None] & i_ok[None, :]
    w_offsets = outs[:, None].to(tl.int64) * IN + ins[None, :]
    mine = tl.load(owner_ptr + w_offsets, mask=tile_ok, other=0).to(tl.int32) == \
        _expert(expert_ptr, expert_value, FROM_PTR)
    out_offsets = split.to(tl.int64) * OUT * IN + w_offsets
    tl.store(own_ptr + out_offsets, tl.where(mine, acc, 0.0).to(own_ptr.dtype.element_ty), mask=tile_ok)
    if REST_OUT:
        tl.store(rest_ptr + out_offsets, tl.where(mine, 0.0, acc).to(rest_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _merge_kernel(own_ptr, rest_ptr, owner_ptr, coef_ptr, num_experts, out_ptr, n,
                  HAS_REST: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    if FP64:
        total = tl.load(own_ptr + idx, mask=ok, other=0.0).to(tl.float64)
    else:
        total = tl.load(own_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_REST:
        owner = tl.load(owner_ptr + idx, mask=ok, other=0).to(tl.int32)
        # fp64 coefficient of the entry's owner, cast to the compute type; an owner >= N reads 0 (no OOB read)
        coef = tl.load(coef_ptr + owner, mask=ok & (owner < num_experts), other=0.0).to(total.dtype)
        total = total + coef * tl.load(rest_ptr + idx, mask=ok, other=0.0).to(total.dtype)
    divisor = tl.zeros_like(total) + num_experts  # exact: num_experts <= 256
    if FP64:
        merged = total / divisor  # div.rn.f64
    else:
        merged = tl.div_rn(total, divisor)
    tl.store(out_ptr + idx, merged.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (contiguous inputs; shapes already validated by fsosr.ops.sparse_adapter)
# ---------------------------------------------------------------------------------------------------------------
def _upcast(dtype) -> bool:
    return _INTERPRET or dtype == torch.float32


def sparse_adapter_weight(w_own, owner, w_rest, expert):
    out = torch.empty_like(w_own, memory_format=torch.contiguous_format)
    n = w_own.numel()
    if n:
        ptr, value, from_ptr = scalar_argument(expert, owner)
        _select_kernel[(cdiv(n, SELECT_BLOCK),)](
            w_own, w_rest if w_rest is not None else w_own, owner, ptr, value, out, n,
            HAS_REST=w_rest is not None, FROM_PTR=from_ptr, BLOCK=SELECT_BLOCK, num_warps=4)
    return out


def sparse_adapter_weight_backward(grad, owner, expert, rest_grad: bool):
    own = torch.empty_like(grad)
    rest = torch.empty_like(grad) if rest_grad else grad.new_empty(0)
    n = grad.numel()
    if n:
        ptr, value, from_ptr = scalar_argument(expert, owner)
        _split_kernel[(cdiv(n, SELECT_BLOCK),)](
            grad, owner, ptr, value, own, rest if rest_grad else own, n,
            REST_OUT=rest_grad, FROM_PTR=from_ptr, BLOCK=SELECT_BLOCK, num_warps=4)
    return own, rest


def _selected_matmul(a, w_own, w_rest, owner, expert, bias, transpose_w: bool):
    """a [M, K] @ (W_e^T if transpose_w else W_e) (+ bias), W_e [out, in] selected on load."""
    out_features, in_features = w_own.shape
    M, K = a.shape
    N = out_features if transpose_w else in_features
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.copy_(bias.expand(M, N)) if bias is not None else c.zero_()
    stride_wk, stride_wn = (1, in_features) if transpose_w else (in_features, 1)
    ptr, value, from_ptr = scalar_argument(expert, owner)
    _linear_kernel[(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))](
        a, w_own, w_rest if w_rest is not None else w_own, owner, ptr, value, bias if bias is not None else a, c,
        M, N, K, stride_wk, stride_wn,
        HAS_REST=w_rest is not None, HAS_BIAS=bias is not None, FROM_PTR=from_ptr, UPCAST=_upcast(a.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return c


def sparse_linear_forward(x, w_own, w_rest, owner, expert, bias):
    """y [M, out] = x [M, in] @ W_e^T + bias."""
    return _selected_matmul(x, w_own, w_rest, owner, expert, bias, transpose_w=True)


def num_splits(M: int, out_features: int, in_features: int) -> int:
    """Row splits of the weight-gradient reduction: enough programs to fill a GPU, each split at least
    GRAD_ROWS * 4 rows. A function of shapes only, so the summation order (and the bits) never change."""
    tiles = cdiv(out_features, BLOCK_O) * cdiv(in_features, BLOCK_I)
    wanted = cdiv(TARGET_PROGRAMS, max(tiles, 1))
    return max(1, min(wanted, MAX_SPLITS, cdiv(M, GRAD_ROWS * 4)))


def sparse_linear_backward(grad_y, x, w_own, w_rest, owner, expert, x_grad: bool, weight_grad: bool,
                           rest_grad: bool, bias_grad: bool, splits: int | None = None):
    """(grad_x, grad_w_own masked, grad_w_rest masked, grad_bias), each empty unless its flag is set.
    ``splits`` overrides :func:`num_splits` (tests use it to reach the split path at small sizes)."""
    out_features, in_features = w_own.shape
    M = x.shape[0]
    device, dtype = x.device, w_own.dtype
    empty = lambda: w_own.new_empty(0)  # noqa: E731 - a fresh one each time: outputs of an op may not alias
    grad_x = _selected_matmul(grad_y, w_own, w_rest, owner, expert, None, transpose_w=False) if x_grad else empty()
    grad_bias = grad_y.sum(0, dtype=torch.float32).to(dtype) if bias_grad else empty()
    if not (weight_grad or rest_grad):
        return grad_x, empty(), empty(), grad_bias
    splits = num_splits(M, out_features, in_features) if splits is None else splits
    if w_own.numel() == 0 or M == 0:
        return (grad_x, torch.zeros_like(w_own) if weight_grad else empty(),
                torch.zeros_like(w_own) if rest_grad else empty(), grad_bias)
    rows_per_split = cdiv(cdiv(M, splits), GRAD_ROWS) * GRAD_ROWS
    splits = cdiv(M, rows_per_split)
    shape = (splits, out_features, in_features)
    own = torch.empty(shape, dtype=torch.float32 if splits > 1 else dtype, device=device)
    rest = torch.empty(shape, dtype=own.dtype, device=device) if rest_grad else own
    ptr, value, from_ptr = scalar_argument(expert, owner)
    _weight_grad_kernel[(cdiv(out_features, BLOCK_O), cdiv(in_features, BLOCK_I), splits)](
        grad_y, x, owner, ptr, value, own, rest, M, out_features, in_features, rows_per_split,
        REST_OUT=rest_grad, FROM_PTR=from_ptr, UPCAST=_upcast(dtype),
        BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_M=GRAD_ROWS, num_warps=4)

    def reduce(partials):
        return partials[0] if splits == 1 else partials.sum(dim=0).to(dtype)   # fixed-order sum over splits

    return grad_x, (reduce(own) if weight_grad else empty()), (reduce(rest) if rest_grad else empty()), grad_bias


def merge_experts(w_own, owner, w_rest, coefficients, num_experts: int):
    """(w_own + coefficients[owner] * w_rest) / num_experts, rounded once to w_own's dtype (contiguous inputs;
    coefficients fp64 [num_experts] on w_own's device)."""
    # The interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even): there the kernel
    # stores its fp32 result and torch rounds it, so the interpreter gives the GPU's bits.
    staged = _INTERPRET and w_own.dtype == torch.bfloat16
    out = torch.empty(w_own.shape, dtype=torch.float32 if staged else w_own.dtype, device=w_own.device)
    n = w_own.numel()
    if n:
        _merge_kernel[(cdiv(n, MERGE_BLOCK),)](
            w_own, w_rest if w_rest is not None else w_own, owner, coefficients, num_experts, out, n,
            HAS_REST=w_rest is not None, FP64=w_own.dtype == torch.float64, BLOCK=MERGE_BLOCK, num_warps=4,
            enable_fp_fusion=False)
    return out.to(w_own.dtype) if staged else out
