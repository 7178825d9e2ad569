"""MoSA's compact sparse-expert weights: materialise one expert, merge all experts, the seed's gradient masks.

MoSA (Zhang et al. 2023) keeps N dense copies of a split adapter matrix; expert i owns the entries of a fixed disjoint
mask M_i and only those are trained. Because every entry has exactly one owner, the N copies are stored here as

- ``w_own`` [*S]: entry e holds the value of its owner's copy (the only copy that trains it);
- ``owner`` [*S] uint8: the owner of each entry, values 0..N-1;
- ``w_rest`` [*S] (or None for zeros): what the *other* experts hold at that entry. All experts start identical,
  non-owned entries receive no gradient, so the only thing that ever changes them is decoupled weight decay:
  expert i's copy at a non-owned entry is ``rest_scale[i] · w_rest`` with ``rest_scale[i] = Π (1 − lr_t·wd)`` over
  the steps the optimizer took on expert i (a scalar per expert, see :class:`fsosr.nn.SparseAdapter`).
  For a zero-initialised up-projection ``w_rest = 0`` and the scale does not matter.

Expert i's weight is then ``where(owner == i, w_own, rest_scale[i] · w_rest)``; the callers of
:func:`sparse_adapter_weight` pass the already scaled ``w_rest``. Its gradient w.r.t. ``w_own`` is the weight
gradient masked by ``owner == i`` (that is what ``torch.where`` does in backward), which is exactly the seed's
``grad *= mask`` on the selected copy.

The masked gradient is produced where dW is produced. :func:`sparse_linear` (``y = x W_e^T + b``) has a backward
whose weight-gradient GEMM writes ``where(owner == e, grad_y^T x, 0)`` tile by tile (the mask is the GEMM's
epilogue; the complement goes to ``w_rest`` when it requires grad), so no full-size dW is ever masked afterwards.

Backends (``backend=`` / ``FSOSR_BACKEND`` / automatic, see :mod:`fsosr.backends`):

| op                      | reference | cpu (C++) | triton | cuda (CUDA C++) |
|-------------------------|-----------|-----------|--------|-----------------|
| sparse_adapter_weight   | yes       | yes       | yes    | yes             |
| sparse_linear           | yes       | yes       | yes    | yes             |
| merge_experts           | yes       | yes       | yes    | yes             |

Native ops (``torch.library``, with fake implementations and autograd): ``fsosr::sparse_adapter_weight`` /
``_bwd`` and ``fsosr::sparse_linear_fwd`` / ``_bwd`` (C++ CPU and CUDA kernels from ``fsosr._C``), and the same
names with a ``_triton`` suffix (``fsosr._triton.sparse_adapter``). The expert id is a 0-d int64 tensor on the
CPU or on the weights' device, so a CUDA call never reads device memory on the host. ``fsosr::merge_experts`` and
``fsosr::merge_experts_triton`` have fake implementations but no autograd (merging is an eval-time operation):
:func:`merge_experts` runs them only when nothing needs a gradient, and its differentiable reference otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fsosr import _extension, backends
from fsosr.ops import _eager

__all__ = ["MAX_EXPERTS", "masked_gradients_", "merge_experts", "sparse_adapter_weight", "sparse_linear"]

# The owner map is uint8 (a quarter of an int32 map's bytes for the optimizer to stream), so 256 experts at most.
MAX_EXPERTS = 256

_IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
_MERGE_IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
_MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # merge_experts' native backends
_GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # sparse_linear on triton / cuda


def _check_compact(op: str, w_own: torch.Tensor, owner: torch.Tensor, w_rest: torch.Tensor | None) -> None:
    """Shape/dtype/device checks shared by the ops; messages name the argument."""
    if not isinstance(w_own, torch.Tensor) or not w_own.is_floating_point():
        got = w_own.dtype if isinstance(w_own, torch.Tensor) else type(w_own).__name__
        raise TypeError(f"{op}: w_own must be a floating-point tensor, got {got}")
    if not isinstance(owner, torch.Tensor) or owner.dtype != torch.uint8:
        got = owner.dtype if isinstance(owner, torch.Tensor) else type(owner).__name__
        raise TypeError(f"{op}: owner must be a torch.uint8 tensor (expert id per entry), got {got}")
    if owner.shape != w_own.shape:
        raise ValueError(f"{op}: owner must have w_own's shape {tuple(w_own.shape)}, got {tuple(owner.shape)}")
    if owner.device != w_own.device:
        raise ValueError(f"{op}: owner must be on w_own's device {w_own.device}, got {owner.device}")
    if w_rest is not None:
        if not isinstance(w_rest, torch.Tensor):
            raise TypeError(f"{op}: w_rest must be a tensor or None (zeros), got {type(w_rest).__name__}")
        if w_rest.shape != w_own.shape:
            raise ValueError(f"{op}: w_rest must have w_own's shape {tuple(w_own.shape)}, got {tuple(w_rest.shape)}")
        if w_rest.dtype != w_own.dtype:
            raise TypeError(f"{op}: w_rest must have w_own's dtype {w_own.dtype}, got {w_rest.dtype}")
        if w_rest.device != w_own.device:
            raise ValueError(f"{op}: w_rest must be on w_own's device {w_own.device}, got {w_rest.device}")


def _expert_tensor(op: str, expert, device: torch.device) -> torch.Tensor:
    """The expert id as a 0-d int64 tensor on the CPU (from an int) or on ``device`` (a tensor stays where it is
    when it is there or on the CPU: no host read, no copy)."""
    if isinstance(expert, torch.Tensor):
        if expert.dim() != 0 or expert.is_floating_point() or expert.is_complex() or expert.dtype == torch.bool:
            raise TypeError(f"{op}: expert must be an int or a 0-d integer tensor, "
                            f"got {expert.dtype}{tuple(expert.shape)}")
        if expert.device.type != "cpu" and expert.device != device:
            raise ValueError(f"{op}: expert is on {expert.device}; put it on the CPU or on the weights' device "
                             f"{device}")
        if expert.device.type == "cpu" and not torch.compiler.is_compiling():   # a host read costs nothing here
            if not 0 <= int(expert) < MAX_EXPERTS:
                raise ValueError(f"{op}: expert must be in [0, {MAX_EXPERTS - 1}], got {int(expert)}")
        return expert if expert.dtype == torch.int64 else expert.to(torch.int64)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < MAX_EXPERTS:
        raise ValueError(f"{op}: expert must be an int in [0, {MAX_EXPERTS - 1}], got {expert!r}")
    return torch.tensor(expert, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# Reference semantics (plain PyTorch; autograd through torch.where gives exactly the masked gradients)
# ---------------------------------------------------------------------------------------------------------------
def _reference_weight(w_own, owner, w_rest, expert):
    rest = w_rest if w_rest is not None else w_own.new_zeros(())
    # Compared as integers, as the kernels do (uint8 == a 0-d int64 tensor would wrap the expert to uint8).
    return torch.where(owner.long() == expert.to(owner.device), w_own, rest)


def _reference_linear(x, w_own, w_rest, owner, expert, bias):
    return F.linear(x, _reference_weight(w_own, owner, w_rest, expert), bias)


def _merge_coefficients(rest_scale, num_experts: int, device: torch.device) -> torch.Tensor:
    """fp64 [N]: coefficient i multiplies ``w_rest`` where expert i owns the entry, Σ_j rest_scale[j] − rest_scale[i]
    (the N−1 experts that do not own it). Computed once here, on ``device``, and shared by every backend."""
    if rest_scale is None:
        return torch.full((num_experts,), num_experts - 1, dtype=torch.float64, device=device)
    scale = rest_scale.to(device=device, dtype=torch.float64)
    return scale.sum() - scale


def _reference_merge(w_own, owner, w_rest, coefficients, num_experts: int):
    """The native ops' arithmetic in plain torch: product, sum and true division each rounded to the compute type
    (fp32, fp64 for fp64), one rounding to w_own's dtype. Differentiable w.r.t. w_own, w_rest and rest_scale."""
    compute = torch.float64 if w_own.dtype == torch.float64 else torch.float32
    # A 0-d tensor on the weights' device, not a Python number: CUDA divides by a host scalar as a multiplication
    # by its reciprocal, which is not the correctly rounded quotient the native kernels compute.
    divisor = torch.full((), num_experts, dtype=compute, device=w_own.device)
    merged = w_own.to(compute)
    if w_rest is not None:
        # Padded to every uint8 value: an owner no expert has reads 0, as in the native kernels.
        table = F.pad(coefficients, (0, MAX_EXPERTS - num_experts)).to(compute)
        merged = merged + table[owner.long()] * w_rest.to(compute)
    return (merged / divisor).to(w_own.dtype)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: fake implementations and autograd of the native ops
# ---------------------------------------------------------------------------------------------------------------
def _fake_weight(w_own, owner, w_rest, expert):
    return torch.empty_like(w_own, memory_format=torch.contiguous_format)


def _fake_weight_bwd(grad, owner, expert, rest_grad):
    return torch.empty_like(grad), (torch.empty_like(grad) if rest_grad else grad.new_empty(0))


def _fake_linear(x, w_own, w_rest, owner, expert, bias):
    return x.new_empty((x.shape[0], w_own.shape[0]))


def _fake_merge(w_own, owner, w_rest, coefficients, num_experts):
    return torch.empty_like(w_own, memory_format=torch.contiguous_format)


def _fake_linear_bwd(grad_y, x, w_own, w_rest, owner, expert, x_grad, weight_grad, rest_grad, bias_grad):
    empty = lambda: w_own.new_empty(0)  # noqa: E731 - fresh each time: outputs may not alias
    return (torch.empty_like(x) if x_grad else empty(), torch.empty_like(w_own) if weight_grad else empty(),
            torch.empty_like(w_own) if rest_grad else empty(),
            w_own.new_empty(w_own.shape[0]) if bias_grad else empty())


def _weight_formulas(backward_op):
    """(setup_context, backward) of sparse_adapter_weight, its gradients computed by ``backward_op``."""
    def setup_context(ctx, inputs, output):
        _w_own, owner, w_rest, expert = inputs
        ctx.save_for_backward(owner, expert)
        ctx.has_rest = w_rest is not None

    def backward(ctx, grad):
        if grad is None:   # undefined output gradient (not materialised, fsosr/ops/_eager.py)
            return None, None, None, None
        owner, expert = ctx.saved_tensors
        rest_grad = ctx.has_rest and ctx.needs_input_grad[2]
        own, rest = backward_op(grad.contiguous(), owner, expert, rest_grad)
        return (own if ctx.needs_input_grad[0] else None), None, (rest if rest_grad else None), None

    return setup_context, backward


def _linear_formulas(backward_op):
    """(setup_context, backward) of sparse_linear, its gradients computed by ``backward_op``."""
    def setup_context(ctx, inputs, output):
        x, w_own, w_rest, owner, expert, bias = inputs
        ctx.save_for_backward(x, w_own, w_rest, owner, expert)
        ctx.has_rest, ctx.has_bias = w_rest is not None, bias is not None

    def backward(ctx, grad_y):
        if grad_y is None:   # undefined output gradient (not materialised, fsosr/ops/_eager.py)
            return (None,) * 6
        x, w_own, w_rest, owner, expert = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rest_grad, bias_grad = ctx.has_rest and needs[2], ctx.has_bias and needs[5]
        grad_x, grad_own, grad_rest, grad_bias = backward_op(grad_y.contiguous(), x, w_own, w_rest, owner, expert,
                                                             needs[0], needs[1], rest_grad, bias_grad)
        return (grad_x if needs[0] else None, grad_own if needs[1] else None, grad_rest if rest_grad else None,
                None, None, grad_bias if bias_grad else None)

    return setup_context, backward


if _extension.LOADED:
    torch.library.register_fake("fsosr::sparse_adapter_weight")(_fake_weight)
    torch.library.register_fake("fsosr::sparse_adapter_weight_bwd")(_fake_weight_bwd)
    torch.library.register_fake("fsosr::sparse_linear_fwd")(_fake_linear)
    torch.library.register_fake("fsosr::sparse_linear_bwd")(_fake_linear_bwd)
    torch.library.register_fake("fsosr::merge_experts")(_fake_merge)   # no autograd: see merge_experts
    _eager.register_autograd("fsosr::sparse_adapter_weight",
                            _weight_formulas(torch.ops.fsosr.sparse_adapter_weight_bwd))
    _eager.register_autograd("fsosr::sparse_linear_fwd", _linear_formulas(torch.ops.fsosr.sparse_linear_bwd))


def _kernels():
    from fsosr._triton import sparse_adapter as kernels  # noqa: PLC0415 - Triton is imported on first use only

    return kernels


@torch.library.custom_op("fsosr::sparse_adapter_weight_triton", mutates_args=())
def _triton_weight(w_own: torch.Tensor, owner: torch.Tensor, w_rest: torch.Tensor | None,
                   expert: torch.Tensor) -> torch.Tensor:
    return _kernels().sparse_adapter_weight(w_own, owner, w_rest, expert)


@torch.library.custom_op("fsosr::sparse_adapter_weight_bwd_triton", mutates_args=())
def _triton_weight_bwd(grad: torch.Tensor, owner: torch.Tensor, expert: torch.Tensor,
                       rest_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().sparse_adapter_weight_backward(grad, owner, expert, rest_grad)


@torch.library.custom_op("fsosr::sparse_linear_fwd_triton", mutates_args=())
def _triton_linear(x: torch.Tensor, w_own: torch.Tensor, w_rest: torch.Tensor | None, owner: torch.Tensor,
                   expert: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _kernels().sparse_linear_forward(x, w_own, w_rest, owner, expert, bias)


@torch.library.custom_op("fsosr::sparse_linear_bwd_triton", mutates_args=())
def _triton_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, w_own: torch.Tensor, w_rest: torch.Tensor | None,
                       owner: torch.Tensor, expert: torch.Tensor, x_grad: bool, weight_grad: bool, rest_grad: bool,
                       bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().sparse_linear_backward(grad_y, x, w_own, w_rest, owner, expert, x_grad, weight_grad,
                                             rest_grad, bias_grad)


@torch.library.custom_op("fsosr::merge_experts_triton", mutates_args=())
def _triton_merge(w_own: torch.Tensor, owner: torch.Tensor, w_rest: torch.Tensor | None, coefficients: torch.Tensor,
                  num_experts: int) -> torch.Tensor:
    return _kernels().merge_experts(w_own, owner, w_rest, coefficients, num_experts)


_triton_weight.register_fake(_fake_weight)
_triton_weight_bwd.register_fake(_fake_weight_bwd)
_triton_linear.register_fake(_fake_linear)
_triton_linear_bwd.register_fake(_fake_linear_bwd)
_triton_merge.register_fake(_fake_merge)
_eager.register_autograd("fsosr::sparse_adapter_weight_triton",
                        _weight_formulas(torch.ops.fsosr.sparse_adapter_weight_bwd_triton))
_eager.register_autograd("fsosr::sparse_linear_fwd_triton", _linear_formulas(torch.ops.fsosr.sparse_linear_bwd_triton))
# Eager calls: the same launchers and formulas without the dispatcher (fsosr/ops/_eager.py).
_triton_weight_eager = _eager.eager_autograd(
    "fsosr::sparse_adapter_weight_triton",
    lambda *args: _kernels().sparse_adapter_weight(*args),
    *_weight_formulas(lambda *args: _kernels().sparse_adapter_weight_backward(*args)))
_triton_linear_eager = _eager.eager_autograd(
    "fsosr::sparse_linear_fwd_triton",
    lambda *args: _kernels().sparse_linear_forward(*args),
    *_linear_formulas(lambda *args: _kernels().sparse_linear_backward(*args)))


def _weight_op(backend_name: str):
    if backend_name == "triton":
        return _triton_weight_eager if _eager.use_eager_path() else torch.ops.fsosr.sparse_adapter_weight_triton
    return torch.ops.fsosr.sparse_adapter_weight


def _linear_op(backend_name: str):
    if backend_name == "triton":
        return _triton_linear_eager if _eager.use_eager_path() else torch.ops.fsosr.sparse_linear_fwd_triton
    return torch.ops.fsosr.sparse_linear_fwd


def _merge_op(backend_name: str):
    if backend_name == "triton" and _eager.use_eager_path():
        return _kernels().merge_experts          # no autograd: the launcher itself
    if backend_name == "triton":
        return torch.ops.fsosr.merge_experts_triton
    return torch.ops.fsosr.merge_experts


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------
def sparse_adapter_weight(w_own: torch.Tensor, owner: torch.Tensor, w_rest: torch.Tensor | None, expert,
                          *, backend: str | None = None) -> torch.Tensor:
    """Expert ``expert``'s dense weight ``where(owner == expert, w_own, w_rest)``; differentiable w.r.t. ``w_own``
    (gradient masked to ``owner == expert``) and ``w_rest`` (the complement).

    Args:
        w_own: [*S] float, the owned values.  owner: [*S] uint8, expert id per entry.
        w_rest: [*S] with w_own's dtype/device, the value of non-owned entries for this expert (already scaled by
            the expert's decay), or None for zeros (zero-initialised up-projection).
        expert: int in [0, 255], or a 0-d integer tensor on the CPU or on w_own's device (no host read on CUDA).
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default ``FSOSR_BACKEND`` or automatic.
    Returns: [*S] contiguous tensor of w_own's dtype. Out-of-range ``owner`` values cannot be detected here
    without a host sync (an entry no expert owns reads ``w_rest`` for every expert); :class:`fsosr.nn.SparseAdapter`
    validates its maps when they are set.
    """
    op = "sparse_adapter_weight"
    _check_compact(op, w_own, owner, w_rest)
    expert = _expert_tensor(op, expert, w_own.device)
    chosen = backends.resolve(op, backend, w_own.device, implemented=_IMPLEMENTED)
    if chosen == "reference":
        return _reference_weight(w_own, owner, w_rest, expert).contiguous()
    return _weight_op(chosen)(w_own.contiguous(), owner.contiguous(),
                              None if w_rest is None else w_rest.contiguous(), expert)


def sparse_linear(x: torch.Tensor, w_own: torch.Tensor, w_rest: torch.Tensor | None, owner: torch.Tensor, expert,
                  bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``F.linear(x, sparse_adapter_weight(w_own, owner, w_rest, expert), bias)`` without materialising the mask
    step in backward: the weight gradient is masked inside the GEMM that produces it.

    Args:
        x: [..., in].  w_own, owner, w_rest, expert: as in :func:`sparse_adapter_weight`, with [out, in] weights.
        bias: [out] or None.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``. Native backends take x, weights and bias in one
            dtype (fp32/fp16/bf16; fp64 on ``cpu``); ``reference`` takes anything ``F.linear`` takes.
    Returns: [..., out]. Gradients: x, w_own (masked to ``owner == expert``), w_rest (the complement), bias.
    """
    op = "sparse_linear"
    _check_compact(op, w_own, owner, w_rest)
    if w_own.dim() != 2:
        raise ValueError(f"{op}: w_own must be 2-D [out, in], got shape {tuple(w_own.shape)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != w_own.shape[1]:
        raise ValueError(f"{op}: x must be [..., in = {w_own.shape[1]}], got shape {tuple(x.shape)}")
    if x.device != w_own.device:
        raise ValueError(f"{op}: x is on {x.device} but w_own is on {w_own.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w_own.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{op}: bias must be [out = {w_own.shape[0]}] or None, got {got}")
        if bias.device != w_own.device:
            raise ValueError(f"{op}: bias is on {bias.device} but w_own is on {w_own.device}")
    expert = _expert_tensor(op, expert, w_own.device)
    chosen = backends.resolve(op, backend, w_own.device, implemented=_IMPLEMENTED)
    if chosen == "reference":
        return _reference_linear(x, w_own, w_rest, owner, expert, bias)
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != w_own.dtype:
            raise TypeError(f"{op}: the {chosen} backend takes {name} in w_own's dtype {w_own.dtype}, got {t.dtype}")
    if chosen != "cpu" and w_own.dtype not in _GEMM_DTYPES:
        raise TypeError(f"{op}: the {chosen} backend runs fp32, fp16 and bf16, got {w_own.dtype} (fp64: cpu or "
                        "reference)")
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()   # not -1: in_features may be 0
    y = _linear_op(chosen)(x2, w_own.contiguous(), None if w_rest is None else w_rest.contiguous(),
                           owner.contiguous(), expert, None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], w_own.shape[0])


def merge_experts(w_own: torch.Tensor, owner: torch.Tensor, w_rest: torch.Tensor | None, num_experts: int, *,
                  rest_scale: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """MoSA's ``add`` merge: the mean over the N experts' dense weights, computed from the compact form.

    Mean_i where(owner==i, w_own, rest_scale[i]·w_rest)
        = (w_own + (Σ_j rest_scale[j] − rest_scale[owner])·w_rest) / N,
    one elementwise pass instead of N materialised copies. The coefficients ``Σ_j rest_scale[j] − rest_scale[i]``
    are computed in fp64 once per expert and cast to the compute type (fp32 for fp16/bf16/fp32, fp64 for fp64);
    the product, the sum and the division by N are each rounded to the compute type and the result is rounded
    once to w_own's dtype. Every backend does exactly this, so on one device they agree bit for bit (tested). With
    ``w_rest`` None (zeros) this is ``w_own / N``, bitwise the mean of the dense copies.

    No autograd on the native backends (merging is an eval-time operation): when grad mode is on and ``w_own``,
    ``w_rest`` or ``rest_scale`` requires grad, the same arithmetic runs as plain torch (the ``reference``
    backend, differentiable; the chosen backend is still validated) and returns identical values.

    Args:
        w_own, owner, w_rest: as in :func:`sparse_adapter_weight` (``w_rest`` unscaled here). Native backends take
            fp32, fp16, bf16 and fp64; non-contiguous inputs are copied.
        num_experts: N, 1..256. On CPU tensors ``owner`` must be < N (checked; it needs a host read, which a CUDA
            tensor would synchronise for, so there an owner >= N is not checked and reads coefficient 0).
        rest_scale: [N] per-expert multiplier of ``w_rest`` (None: all ones); computed in fp64.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default ``FSOSR_BACKEND`` or automatic.
    Returns: [*S] merged weight, w_own's dtype (contiguous from the native backends).
    """
    op = "merge_experts"
    _check_compact(op, w_own, owner, w_rest)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{op}: num_experts must be an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
    if rest_scale is not None:
        if not isinstance(rest_scale, torch.Tensor) or rest_scale.shape != (num_experts,):
            got = tuple(rest_scale.shape) if isinstance(rest_scale, torch.Tensor) else type(rest_scale).__name__
            raise ValueError(f"{op}: rest_scale must be a tensor of shape ({num_experts},), got {got}")
        if not rest_scale.is_floating_point():
            raise TypeError(f"{op}: rest_scale must be floating-point, got {rest_scale.dtype}")
    chosen = backends.resolve(op, backend, w_own.device, implemented=_MERGE_IMPLEMENTED)
    if owner.device.type == "cpu" and owner.numel() and not torch.compiler.is_compiling():
        top = int(owner.max())
        if top >= num_experts:
            raise ValueError(f"{op}: owner values must be < num_experts = {num_experts}, got {top}")
    coefficients = _merge_coefficients(rest_scale, num_experts, w_own.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (w_own, w_rest, rest_scale))
    if chosen == "reference" or needs_grad:
        return _reference_merge(w_own, owner, w_rest, coefficients, num_experts)
    if w_own.dtype not in _MERGE_DTYPES:
        raise TypeError(f"{op}: the {chosen} backend runs fp32, fp16, bf16 and fp64, got {w_own.dtype}")
    return _merge_op(chosen)(w_own.contiguous(), owner.contiguous(),
                             None if w_rest is None else w_rest.contiguous(), coefficients, num_experts)


def masked_gradients_(expert_grads: torch.Tensor | Sequence[torch.Tensor | None], owner: torch.Tensor) -> None:
    """The seed's gradient masking on N dense copies (trainer.py: ``p.grad *= p.mask`` for every expert), in place.

    Args:
        expert_grads: [N, *S] tensor, or a sequence of N gradients [*S] (None entries, i.e. experts that took no
            part in the forward, are skipped as in the seed).
        owner: [*S] uint8, expert i keeps its gradient where ``owner == i``.

    This is the oracle for the compact form, where the mask is implicit in :func:`sparse_adapter_weight`'s backward.
    """
    op = "masked_gradients_"
    if not isinstance(owner, torch.Tensor) or owner.dtype != torch.uint8:
        got = owner.dtype if isinstance(owner, torch.Tensor) else type(owner).__name__
        raise TypeError(f"{op}: owner must be a torch.uint8 tensor, got {got}")
    for i, grad in enumerate(expert_grads):
        if grad is None:
            continue
        if grad.shape != owner.shape:
            raise ValueError(f"{op}: expert_grads[{i}] must have owner's shape {tuple(owner.shape)}, "
                             f"got {tuple(grad.shape)}")
        grad.mul_((owner.to(grad.device) == i).to(grad.dtype))
