"""``fsosr.ops.masked_adamw_``: MoSA's masked HF-AdamW step, fused over one flat buffer of every adapter parameter.

Layout (compact MoSA storage, as in :mod:`fsosr.ops.sparse_adapter`):

- ``params``, ``grads``, ``exp_avg``, ``exp_avg_sq``: fp32 (or fp64) [P], every trainable adapter entry of a model
  back to back. A split matrix is stored once (``W_own``): entry e belongs to expert ``owner[e]``. N per-expert
  biases are N·d entries, each owned by its expert. Tensors that every forward uses (a shared down projection,
  the adapter LayerNorm) have owner 255 (``SHARED``).
- ``owner``: uint8 [P], values 0..N-1 or 255.
- Segments: ``segment_offsets`` int64 [S+1] cut the buffer into S runs that share one expert draw and one weight
  decay, e.g. per block: {shared weights, shared biases, split up weight, per-expert up biases}.
  ``selected`` int64 [S]: the expert drawn for that segment this step (ignored by shared entries), or
  int64 [S, D]: the D experts drawn since the last step (repeats allowed). MoSA's default recipe runs the model
  twice per step with fresh draws (``ADDITIONAL=True`` in all its scripts), so up to two experts
  per segment receive a gradient: pass both draws, and ``grads`` holding each drawn expert's own entries.
  ``weight_decay``: a float or fp64 [S] (MoSA: 0.01 for weights and the adapter LayerNorm weight, 0 for biases).
- ``grads`` at an entry owned by an expert that was not drawn are never read into the update (the select drops
  them, NaN included): pass the unmasked dW of the drawn expert's weight, the op applies ``owner == selected``
  (with several draws: ``owner`` in the drawn set; entries of different drawn experts are disjoint).

The update is HF AdamW as MoSA uses it (transformers.AdamW, correct_bias=True), per updated entry:
``m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; p −= lr·√(1−β2^t)/(1−β1^t) · m/(√v + eps); p −= lr·wd·p``.

``step``: HF AdamW keeps one ``state["step"]`` per dense tensor, i.e. per (segment, expert) here. Either
- an int64 tensor [S, N+1] of those counters (column N: the shared entries), starting at zeros. The op advances
  it in place exactly as HF AdamW would for the seed's N dense copies, then uses it for bias correction. This is
  the faithful form: an expert's state starts at its first draw (before that its entries never change); or
- an int t >= 1 (with ``num_experts=``): one global count for every entry, as if every expert's state had
  started at step 1; nothing is advanced.

Semantics (what happens to the entries owned by an expert that was not drawn this step, "idle" below):
- ``mosa`` (torch 1.11, the published numbers): ``zero_grad()`` keeps zero gradients, so once an expert has
  been drawn it steps every step: idle entries run the moments with g = 0 (stale momentum keeps moving them),
  weight decay acts on them, and their step counter advances.
- ``skip`` (torch >= 2, ``zero_grad(set_to_none=True)``): idle entries are untouched, params, moments and counter.
- ``freeze``: only entries that receive a gradient change. On this compact buffer it equals ``skip``; the two
  differ on the entries outside an expert's mask (``W_rest``, which is not in the buffer): ``skip`` decays the
  drawn expert's ``W_rest`` by (1 − lr·wd), ``freeze`` never changes it. Keeping ``W_rest`` (a zero matrix for a
  zero-initialised up projection, a decay factor otherwise) is the caller's job under every semantics.

Errors (raised before anything is written, so a bad call leaves every buffer as it was): a dtype or shape
mismatch, an owner value >= N other than 255, a selected expert outside [0, N), segment offsets that do not cut
[0, P], a step < 1. Non-finite gradients are NOT an error: as in torch.optim.AdamW they propagate into m, v and
the parameter of the entries that read them (entries whose gradient is masked out drop them); detecting them
(e.g. with a GradScaler) is the caller's choice, because a check inside an in-place step could only fire after
part of the buffer was written.

On CUDA tensors the value checks need a host synchronisation, so they run only when asked (``validate=True`` or
``FSOSR_CHECK_INPUTS=1``); unchecked bad values cannot make a kernel read out of bounds: an entry whose owner is
>= N (and not 255) is left unchanged, a selected expert outside [0, N) matches no entry.

Backends (all fp32 and fp64; every one is elementwise after a tiny per-(segment, slot) rule table, so results are
bitwise reproducible run to run):
- ``cpu`` (``fsosr::masked_adamw_``, C++): checks everything, then one pass over fixed blocks of entries (bitwise
  identical on any thread count); fp32 runs eight entries at a time with AVX2 where the CPU has it (same
  operations, same bits as the scalar loop).
- ``cuda`` (``fsosr::masked_adamw_`` on CUDA tensors, csrc/cuda/masked_adamw*.cu): a rules kernel, then one
  grid-stride pass; each entry finds its segment by binary search over ``segment_offsets``.
- ``triton`` (``fsosr::masked_adamw_triton_``, kernels/masked_adamw.py): the same two launches in Triton (one with
  ``FSOSR_MASKED_ADAMW_TRITON_FUSED=1``, opt-in until it has run on a GPU).
- ``reference``: plain PyTorch (the oracle).
"""
from __future__ import annotations

import math
import os

import torch

from fsosr import _extension, backends
from fsosr.ops import _eager, reference

__all__ = ["SHARED", "SEMANTICS", "masked_adamw_"]

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
SHARED = reference.SHARED_OWNER
SEMANTICS = reference.MASKED_ADAMW_SEMANTICS


def _fake(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, weight_decay, lr, beta1,
          beta2, eps, semantics, advance_steps) -> None:
    return None


if _extension.LOADED:
    torch.library.register_fake("fsosr::masked_adamw_")(_fake)


@torch.library.custom_op("fsosr::masked_adamw_triton_", mutates_args=("params", "exp_avg", "exp_avg_sq", "steps"))
def _masked_adamw_triton(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
                         grads: torch.Tensor, owner: torch.Tensor, segment_offsets: torch.Tensor,
                         selected: torch.Tensor, weight_decay: torch.Tensor, lr: float, beta1: float, beta2: float,
                         eps: float, semantics: int, advance_steps: bool) -> None:
    _masked_adamw_triton_impl(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected,
                              weight_decay, lr, beta1, beta2, eps, semantics, advance_steps)


def _masked_adamw_triton_impl(*args) -> None:
    from fsosr._triton import masked_adamw as kernels  # noqa: PLC0415 - Triton is imported on first use only

    kernels.masked_adamw(*args)


_masked_adamw_triton.register_fake(_fake)


def _segments(params, selected, segment_offsets, weight_decay):
    """(segment_offsets int64 [S+1], selected int64 [S] or [S, D], weight_decay fp64 [S]) from the convenient
    forms."""
    device = params.device
    if segment_offsets is None:
        segment_offsets = torch.tensor([0, params.numel()], dtype=torch.int64, device=device)
    if not isinstance(segment_offsets, torch.Tensor) or segment_offsets.dtype != torch.int64:
        raise TypeError("masked_adamw_: segment_offsets must be an int64 tensor [S+1]")
    n_segments = segment_offsets.numel() - 1
    if segment_offsets.dim() != 1 or n_segments < 0:
        raise ValueError(f"masked_adamw_: segment_offsets must be 1-D [S+1], got {tuple(segment_offsets.shape)}")
    if isinstance(selected, int) and not isinstance(selected, bool):
        selected = torch.full((n_segments,), selected, dtype=torch.int64, device=device)
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.int64:
        raise TypeError("masked_adamw_: selected must be an int or an int64 tensor [S] or [S, D]")
    if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
        weight_decay = torch.full((n_segments,), float(weight_decay), dtype=torch.float64, device=device)
    if not isinstance(weight_decay, torch.Tensor) or not weight_decay.is_floating_point():
        raise TypeError("masked_adamw_: weight_decay must be a float or a floating-point tensor [S]")
    return segment_offsets, selected, weight_decay.to(torch.float64)


def _steps(step, n_segments, num_experts, device):
    """(steps int64 [S, N+1], advance) from an int or a counter tensor."""
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 2 or step.shape[0] != n_segments or step.shape[1] < 2:
            raise ValueError(f"masked_adamw_: a step tensor must be int64 [S, N+1] = [{n_segments}, N+1], got "
                             f"{step.dtype} {tuple(step.shape)}")
        if num_experts is not None and step.shape[1] != num_experts + 1:
            raise ValueError(f"masked_adamw_: step has {step.shape[1] - 1} expert columns but num_experts is "
                             f"{num_experts}")
        return step, True
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"masked_adamw_: step must be an int >= 1 or an int64 tensor [S, N+1], got {step!r}")
    if not isinstance(num_experts, int) or not 1 <= num_experts <= 254:
        raise ValueError(f"masked_adamw_: an int step needs num_experts in [1, 254], got {num_experts!r}")
    return torch.full((n_segments, num_experts + 1), step, dtype=torch.int64, device=device), False


def _check_hyperparameters(lr, betas, eps) -> tuple[float, float, float, float]:
    """(lr, beta1, beta2, eps) as floats; the ranges HF's and torch's AdamW accept (their messages' sense)."""
    lr, eps = float(lr), float(eps)
    if len(betas) != 2:
        raise ValueError(f"masked_adamw_: betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (float(b) for b in betas)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"masked_adamw_: lr must be finite and >= 0, got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"masked_adamw_: {name} must be in [0, 1), got {beta}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"masked_adamw_: eps must be finite and >= 0, got {eps}")
    return lr, beta1, beta2, eps


def _check_layout(params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected,
                  weight_decay) -> None:
    """Dtype, shape and device checks (the C++ kernel's messages); they read no tensor data, so no sync."""
    if params.dtype not in (torch.float32, torch.float64) or params.dim() != 1:
        raise TypeError(f"masked_adamw_: params must be a flat float32 or float64 buffer [P], got {params.dtype} "
                        f"{tuple(params.shape)}")
    for name, t in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != params.dtype:
            raise TypeError(f"masked_adamw_: {name} must be {params.dtype} like params, got {t.dtype}")
        if t.shape != params.shape:
            raise ValueError(f"masked_adamw_: {name} must have params' shape {tuple(params.shape)}, got "
                             f"{tuple(t.shape)}")
    if owner.dtype != torch.uint8:
        raise TypeError(f"masked_adamw_: owner must be uint8, got {owner.dtype}")
    if owner.shape != params.shape:
        raise ValueError(f"masked_adamw_: owner must have params' shape {tuple(params.shape)}, got "
                         f"{tuple(owner.shape)}")
    n_segments = segment_offsets.numel() - 1
    if segment_offsets.dim() != 1 or n_segments < 0:
        raise ValueError(f"masked_adamw_: segment_offsets must be 1-D [S+1], got {tuple(segment_offsets.shape)}")
    if weight_decay.shape != (n_segments,):
        raise ValueError(f"masked_adamw_: weight_decay must be [S] = [{n_segments}], got {tuple(weight_decay.shape)}")
    if not (selected.shape == (n_segments,) or (selected.dim() == 2 and selected.shape[0] == n_segments
                                                and selected.shape[1] >= 1)):
        raise ValueError(f"masked_adamw_: selected must be [S] or [S, D] with D >= 1 draws, S = {n_segments}, got "
                         f"{tuple(selected.shape)}")
    if steps.shape[1] - 1 > 254:
        raise ValueError(f"masked_adamw_: at most 254 experts (owner 255 means shared), got {steps.shape[1] - 1}")
    names = ("exp_avg", "exp_avg_sq", "step", "grads", "owner", "segment_offsets", "selected", "weight_decay")
    for name, t in zip(names, (exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, weight_decay)):
        if t.device != params.device:
            raise ValueError(f"masked_adamw_: {name} is on {t.device} but params are on {params.device}")


def _check_values(params, steps, owner, segment_offsets, selected) -> None:
    """The checks that read data (one host synchronisation on CUDA), all before any write."""
    n_experts = steps.shape[1] - 1
    offsets = segment_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != params.numel() or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"masked_adamw_: segment_offsets must run non-decreasing from 0 to P = {params.numel()}")
    if bool((steps < 0).any()):
        raise ValueError("masked_adamw_: steps must be >= 0")
    if bool(((selected < 0) | (selected >= n_experts)).any()):
        raise ValueError(f"masked_adamw_: selected has an expert outside [0, {n_experts})")
    if bool(((owner >= n_experts) & (owner != SHARED)).any()):
        raise ValueError(f"masked_adamw_: owner has a value >= N = {n_experts} other than 255 (shared)")


def _should_validate(validate: bool | None, params: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or (params.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False  # a data-dependent raise can be neither traced nor captured
    if validate is None:
        return params.device.type == "cpu" or os.environ.get("FSOSR_CHECK_INPUTS") == "1"
    return validate


def masked_adamw_(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  owner: torch.Tensor, selected, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-6, weight_decay=0.0, step, semantics: str = "mosa",
                  segment_offsets: torch.Tensor | None = None, num_experts: int | None = None,
                  backend: str | None = None, validate: bool | None = None) -> None:
    """One masked HF-AdamW step, in place on ``params``, ``exp_avg``, ``exp_avg_sq`` (and a ``step`` tensor).

    Args:
        params, grads, exp_avg, exp_avg_sq: flat fp32/fp64 [P] buffers (contiguous).
        owner: uint8 [P], the expert owning each entry, 255 (:data:`SHARED`) for entries every expert updates.
        selected: int64 [S] (or an int for every segment): the expert drawn per segment this step; or int64
            [S, D]: the D experts drawn per segment since the last step (MoSA's two stochastic passes: D = 2).
        lr, betas, eps: HF AdamW's (MoSA: eps 1e-6).
        weight_decay: a float or a [S] tensor, decoupled, applied after the Adam step.
        step: an int64 [S, N+1] counter tensor (advanced in place) or an int >= 1; see the module docstring.
        semantics: ``mosa`` | ``skip`` | ``freeze``; see the module docstring.
        segment_offsets: int64 [S+1]; default one segment over the whole buffer.
        num_experts: N; required with an int ``step``, else read from the step tensor.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default ``FSOSR_BACKEND`` or automatic.
        validate: check the values that need a data read (owner < N or 255, selected in [0, N), offsets, steps
            >= 0) before anything is written. Default: on for CPU tensors (the ``cpu`` kernel always checks),
            off for CUDA tensors (it would synchronise) unless ``FSOSR_CHECK_INPUTS=1``; never while compiling or
            capturing a CUDA graph. Dtypes, shapes and devices are always checked.
    """
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"masked_adamw_: params must be a tensor, got {type(params).__name__}")
    if semantics not in SEMANTICS:
        raise ValueError(f"masked_adamw_: semantics must be one of {', '.join(SEMANTICS)}, got {semantics!r}")
    for name, t in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("owner", owner)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_adamw_: {name} must be a tensor, got {type(t).__name__}")
    lr, beta1, beta2, eps = _check_hyperparameters(lr, betas, eps)
    chosen = backends.resolve("masked_adamw_", backend, params.device, IMPLEMENTED)
    segment_offsets, selected, weight_decay = _segments(params, selected, segment_offsets, weight_decay)
    steps, advance = _steps(step, segment_offsets.numel() - 1, num_experts, params.device)
    tensors = (params, exp_avg, exp_avg_sq, steps, grads, owner, segment_offsets, selected, weight_decay)
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("masked_adamw_: every buffer must be contiguous (it is updated in place)")
    scalars = (lr, beta1, beta2, eps, SEMANTICS.index(semantics), advance)
    # Also for cpu, whose C++ kernel checks everything again: a buffer on another device (meta, say) would route
    # the call past it to the fake kernel, a silent no-op.
    _check_layout(*tensors)
    if chosen == "cpu":
        torch.ops.fsosr.masked_adamw_(*tensors, *scalars)  # the C++ kernel checks the values as it reads them
        return
    if chosen == "reference" or _should_validate(validate, params):
        _check_values(params, steps, owner, segment_offsets, selected)
    if chosen == "cuda":
        torch.ops.fsosr.masked_adamw_(*tensors, *scalars)
    elif chosen == "triton" and _eager.use_eager_path():
        _masked_adamw_triton_impl(*tensors, *scalars)     # the launchers without the dispatcher (ops/_eager.py)
    elif chosen == "triton":
        torch.ops.fsosr.masked_adamw_triton_(*tensors, *scalars)
    else:
        reference.masked_adamw_flat_(*tensors, *scalars)
