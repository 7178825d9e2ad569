"""``fsosr.ops.topk_route``: fused top-k routing (forward and backward) on four backends.

Semantics: ``docs/ops/topk_route.md`` and :func:`fsosr.ops.reference.topk_route`. The native backends are
``torch.library`` ops with fake implementations and autograd formulas, so ``torch.compile(fullgraph=True)``
traces them and ``torch.library.opcheck`` passes:

- ``fsosr::topk_route_fwd`` / ``fsosr::topk_route_bwd``: C++ (CPU) and CUDA C++ (CUDA), from ``fsosr._C``;
- ``fsosr::topk_route_fwd_triton`` / ``fsosr::topk_route_bwd_triton``: Triton (``fsosr._triton.topk_route``).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fsosr import _extension, backends
from fsosr.ops import _eager, reference
from fsosr.ops._rng import normal_from_seed

__all__ = ["Routing", "topk_route"]


class Routing(NamedTuple):
    """What a grouped expert GEMM needs to dispatch N routing units to their k experts.

    indices [N, k] int32 (best first), gates [N, k] fp32 (fp64 for fp64 logits), counts [E] int32,
    order [N*k] int32 (flat ids n*k+j grouped by expert, stable), offsets [E+1] int32 (offsets of each expert's
    segment of ``order``), importance [E] (sum of gates per expert), load [E] (Shazeer's smooth load when noisy,
    else counts). ``gates``, ``importance`` and ``load`` are differentiable.
    """
    indices: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    importance: torch.Tensor
    load: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration
#
# The native ops return the differentiable outputs first: (gates, importance, load, indices, counts, order,
# offsets, next_index). (opcheck's autograd test sums every output into the type of the first one, which must
# therefore be floating point.)
# ---------------------------------------------------------------------------------------------------------------
def _reference_to_native(outputs):
    indices, gates, counts, order, offsets, importance, load, next_index = outputs
    return gates, importance, load, indices, counts, order, offsets, next_index


def _native_to_routing(outputs) -> Routing:
    gates, importance, load, indices, counts, order, offsets, _next_index = outputs
    return Routing(indices, gates, counts, order, offsets, importance, load)


def _fake_forward(logits, k, renormalize, noise, noise_std):
    n_units, n_experts = logits.shape
    acc = reference.accumulation_dtype(logits.dtype)
    i32 = torch.int32
    return (logits.new_empty((n_units, k), dtype=acc), logits.new_empty((n_experts,), dtype=acc),
            logits.new_empty((n_experts,), dtype=acc), logits.new_empty((n_units, k), dtype=i32),
            logits.new_empty((n_experts,), dtype=i32), logits.new_empty((n_units * k,), dtype=i32),
            logits.new_empty((n_experts + 1,), dtype=i32), logits.new_empty((n_units,), dtype=i32))


def _fake_backward(grad_gates, grad_importance, grad_load, logits, noise, noise_std, indices, gates, next_index,
                   renormalize):
    return torch.empty_like(logits), (torch.empty_like(logits) if noise_std is not None else logits.new_empty(0))


def _autograd_formulas(backward_op):
    """(setup_context, backward) of the forward op, its gradients computed by ``backward_op``."""
    def setup_context(ctx, inputs, output):
        logits, _k, renormalize, noise, noise_std = inputs
        ctx.save_for_backward(logits, noise, noise_std, output[3], output[0], output[7])
        ctx.renormalize = renormalize

    def backward(ctx, *grads):
        logits, noise, noise_std, indices, gates, next_index = ctx.saved_tensors
        n_experts = logits.shape[1]
        grad_gates, grad_importance, grad_load = grads[0], grads[1], grads[2]
        if grad_gates is None:
            grad_gates = torch.zeros_like(gates)
        if grad_importance is None:
            grad_importance = gates.new_zeros(n_experts)
        if grad_load is None:
            grad_load = gates.new_zeros(n_experts)
        grad_logits, grad_noise_std = backward_op(grad_gates, grad_importance, grad_load, logits, noise, noise_std,
                                                  indices, gates, next_index, ctx.renormalize)
        return grad_logits, None, None, None, (grad_noise_std if noise_std is not None else None)

    return setup_context, backward


if _extension.LOADED:
    torch.library.register_fake("fsosr::topk_route_fwd")(_fake_forward)
    torch.library.register_fake("fsosr::topk_route_bwd")(_fake_backward)
    _eager.register_autograd("fsosr::topk_route_fwd", _autograd_formulas(torch.ops.fsosr.topk_route_bwd))


def _triton_kernels():
    from fsosr._triton import topk_route as kernels  # noqa: PLC0415 - Triton is imported on first use only
    return kernels


def _triton_forward_impl(logits, k, renormalize, noise, noise_std):
    return _reference_to_native(_triton_kernels().topk_route_forward(logits, k, renormalize, noise, noise_std))


def _triton_backward_impl(grad_gates, grad_importance, grad_load, logits, noise, noise_std, indices, gates,
                          next_index, renormalize):
    return _triton_kernels().topk_route_backward(grad_gates.contiguous(), grad_importance.contiguous(),
                                                 grad_load.contiguous(), logits, noise, noise_std, indices, gates,
                                                 next_index, indices.shape[1], renormalize)


@torch.library.custom_op("fsosr::topk_route_fwd_triton", mutates_args=())
def _triton_forward(logits: torch.Tensor, k: int, renormalize: bool, noise: torch.Tensor | None,
                    noise_std: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    return _triton_forward_impl(logits, k, renormalize, noise, noise_std)


@torch.library.custom_op("fsosr::topk_route_bwd_triton", mutates_args=())
def _triton_backward(grad_gates: torch.Tensor, grad_importance: torch.Tensor, grad_load: torch.Tensor,
                     logits: torch.Tensor, noise: torch.Tensor | None, noise_std: torch.Tensor | None,
                     indices: torch.Tensor, gates: torch.Tensor, next_index: torch.Tensor, renormalize: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_backward_impl(grad_gates, grad_importance, grad_load, logits, noise, noise_std, indices, gates,
                                 next_index, renormalize)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_eager.register_autograd("fsosr::topk_route_fwd_triton", _autograd_formulas(torch.ops.fsosr.topk_route_bwd_triton))
# Eager calls: the same launchers and formulas without the dispatcher (fsosr/ops/_eager.py).
_triton_eager = _eager.eager_autograd("fsosr::topk_route_fwd_triton", _triton_forward_impl,
                                      *_autograd_formulas(_triton_backward_impl))


def _run_reference(logits, k, renormalize, noise, noise_std):
    return _reference_to_native(reference.topk_route(logits, k, renormalize, noise, noise_std))


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": lambda *args: torch.ops.fsosr.topk_route_fwd(*args),
    "cuda": lambda *args: torch.ops.fsosr.topk_route_fwd(*args),
    "triton": lambda *args: (_triton_eager if _eager.use_eager_path() else torch.ops.fsosr.topk_route_fwd_triton)(
        *args),
}


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------
def _as_noise_tensor(name: str, value, logits: torch.Tensor) -> torch.Tensor:
    """A [N, E] tensor of logits' dtype and device from a tensor broadcastable to [N, E] (or a number)."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.full_like(logits, float(value))
        raise TypeError(f"topk_route: {name} must be a tensor or a number, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"topk_route: {name} must be floating point, got {value.dtype}")
    if value.device != logits.device:
        raise ValueError(f"topk_route: {name} is on {value.device} but logits are on {logits.device}")
    try:
        expanded = value.expand(logits.shape)
    except RuntimeError:
        raise ValueError(f"topk_route: {name} of shape {tuple(value.shape)} does not broadcast to logits' "
                         f"shape {tuple(logits.shape)}") from None
    return expanded.to(logits.dtype).contiguous()


def _validate(logits, k, renormalize, backend_name):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"topk_route: logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"topk_route: logits must be 2-D [N, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"topk_route: logits must be fp32, fp16, bf16 or fp64, got {logits.dtype}")
    if logits.dtype == torch.float64 and backend_name in ("cuda", "triton"):
        raise TypeError(f"topk_route: fp64 logits run on the reference and cpu backends only, not {backend_name}")
    if logits.shape[1] < 1:
        raise ValueError("topk_route: logits must have at least one expert column (E >= 1)")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_route: k must be an int in [1, E={logits.shape[1]}], got {k!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"topk_route: renormalize must be a bool, got {type(renormalize).__name__}")


def _should_check_finite(check_finite: bool | None, logits: torch.Tensor, backend_name: str) -> bool:
    if torch.compiler.is_compiling():
        return False  # a data-dependent raise cannot be traced; the C++ cpu kernel still checks inline
    if logits.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if check_finite is None:
        check_finite = logits.device.type == "cpu" or os.environ.get("FSOSR_CHECK_FINITE") == "1"
    return check_finite and backend_name != "cpu"  # the C++ kernel checks while it reads, at no extra cost


def _check_finite(logits: torch.Tensor, noise_std: torch.Tensor | None) -> None:
    # One pass and one synchronisation: `x < inf` is False exactly for NaN and +inf (-inf is allowed).
    if not bool((logits < float("inf")).all()):
        raise ValueError("topk_route: logits contain NaN or +inf; -inf is allowed")
    if noise_std is not None and not bool((torch.isfinite(noise_std) & (noise_std > 0)).all()):
        raise ValueError("topk_route: noise_std must be positive and finite (it divides in the smooth load)")


def topk_route(logits: torch.Tensor, k: int, *, renormalize: bool = True, noise_std=None,
               noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
               backend: str | None = None, check_finite: bool | None = None) -> Routing:
    """Route N units to the top-k of E experts; see :class:`Routing` for the outputs.

    Args:
        logits: [N, E] router logits, fp32/fp16/bf16 (fp64 on ``reference`` and ``cpu``).
        k: experts per unit, 1 <= k <= E.
        renormalize: True: gates = softmax over the k kept logits (FSMoE, MoE-Adapters4CL); False: softmax over
            all E logits, then the k largest (not renormalised).
        noise_std: None for clean routing, else the noise scale (a tensor broadcastable to [N, E] or a number),
            e.g. ``softplus(x @ W_noise) + 0.01`` in Shazeer's noisy top-k. Differentiable.
        noise: [N, E] standard-normal draws used as given (so backends can be compared exactly). When
            ``noise_std`` is given without ``noise``: drawn from ``seed`` (identical on every device and backend;
            an int or a 0-d integer tensor, the same draws as its value) or, without a seed, from torch's global
            generator.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default ``FSOSR_BACKEND`` or automatic.
        check_finite: reject NaN/+inf logits and bad noise_std with an error. Default: on for CPU tensors (free),
            off for CUDA tensors (it would synchronise) unless ``FSOSR_CHECK_FINITE=1``. Never inside
            ``torch.compile`` or CUDA-graph capture, where NaN ranks first and propagates into the gates. No
            effect on the ``cpu`` backend: its kernel always checks while it reads (``check_finite=False`` does
            not turn that off).

    Ties go to the lower expert index on every backend. Noisy noise-free routing is deterministic: two calls on
    the same input give bitwise-equal outputs and gradients.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"topk_route: logits must be a tensor, got {type(logits).__name__}")
    backend_name = backends.resolve("topk_route", backend, logits.device)
    _validate(logits, k, renormalize, backend_name)
    if noise is not None and noise_std is None:
        raise ValueError("topk_route: noise was given without noise_std (the noisy logits are logits + noise * "
                         "noise_std)")
    if seed is not None and noise_std is None:
        raise ValueError("topk_route: seed was given without noise_std (it seeds the routing noise; clean routing "
                         "draws none)")
    if noise is not None and seed is not None:
        raise ValueError("topk_route: give either noise or seed, not both")
    if noise_std is not None:
        noise_std = _as_noise_tensor("noise_std", noise_std, logits)
        if noise is not None:
            noise = _as_noise_tensor("noise", noise, logits)
        elif seed is not None:
            noise = normal_from_seed(tuple(logits.shape), seed, logits.device, logits.dtype)
        else:
            noise = torch.randn_like(logits)
    if _should_check_finite(check_finite, logits, backend_name):
        _check_finite(logits, noise_std)
    logits = logits.contiguous()
    return _native_to_routing(_IMPLEMENTATIONS[backend_name](logits, k, renormalize, noise, noise_std))
