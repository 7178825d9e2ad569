"""``fsosr.ops.moe_mlp``: a mixture-of-experts MLP over a :class:`~fsosr.ops.Routing` (docs/ops/moe_mlp.md).

Two input forms: a shared input whose routing units are G consecutive rows (MoE-Adapters4CL: G = tokens per
sample; per-token MoE: G = 1), and FSMoE's per-expert inputs (``moe_mlp_per_expert_input``).

Backends: ``reference`` (the seeds' per-expert loop), ``cpu`` (C++, ``fsosr::moe_mlp_fwd``/``_bwd``; routed or
dense-masked by a shape rule, docs/ops/moe_mlp.md; ``FSOSR_MOE_MLP_PATH=routed|dense`` forces one),
``triton`` (``fsosr::moe_mlp_fwd_triton``/``_bwd_triton``, kernels in ``fsosr._triton.moe_mlp`` and
``moe_mlp_units``: tiled by expert or by unit, ``FSOSR_MOE_MLP_TRITON_TILES``) and ``cuda``
(``fsosr::moe_mlp_fwd``/``_bwd`` on CUDA tensors, csrc/cuda/moe_mlp_*; SIMT kernels, correct on an H100, slower than ``triton`` there
on the device, and the automatic choice for experts wider than ``TRITON_MAX_HIDDEN``; for per-expert inputs with
E <= 4k it runs the dense-masked form on cuBLAS, ``fsosr.ops._moe_dense``).
"""
from __future__ import annotations

import os

import torch

from fsosr import _extension, backends
from fsosr.ops import _eager, _moe_dense, reference
from fsosr.ops._rng import Seed, describe, is_seed, seed_key_tensor
from fsosr.ops.topk_route import Routing

__all__ = ["moe_mlp", "moe_mlp_per_expert_input"]

IMPLEMENTED = ("reference", "cpu", "triton", "cuda")
# The Triton kernels hold a block's whole hidden row ([64, h] fp32 accumulators and [64, h] / [h, 64] weight
# tiles) on chip; h <= 128 compiles and is tested on an H100 (fp32 forward: 176 KiB of shared memory); h = 256
# would need 304 KiB in fp32 (Triton 3.8 compiling for sm_90, over the H100's 227 KiB), FSMoE's h = 1536 3 MiB.
# Wider experts run on the cuda backend (automatically) or raise when triton is asked for by name.
TRITON_MAX_HIDDEN = 128
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "quick_gelu": 2, "identity": 3}


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration of the native op (fake implementation and autograd)
# ---------------------------------------------------------------------------------------------------------------
def _fake_forward(x, indices, gates, order, offsets, w1, b1, w2, b2, group_size, activation, scale, dropout,
                  seed_key, per_expert_input):
    n_units, k = indices.shape
    group = 1 if per_expert_input else group_size
    acc = reference.accumulation_dtype(x.dtype)
    rows = n_units if per_expert_input else n_units * group_size
    return (x.new_empty((rows, w2.shape[2])), x.new_empty((n_units, k, group, w1.shape[2]), dtype=acc))


def _fake_backward(grad_y, x, indices, gates, order, offsets, w1, b1, w2, b2, hidden_pre, group_size, activation,
                   scale, dropout, seed_key, per_expert_input):
    return (torch.empty_like(x), torch.empty_like(gates), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _autograd_formulas(backward_op):
    """(setup_context, backward) of the forward op, its gradients computed by ``backward_op``."""
    def setup_context(ctx, inputs, output):
        x, indices, gates, order, offsets, w1, b1, w2, b2, group_size, activation, scale, dropout, seed_key, \
            per_expert_input = inputs
        ctx.save_for_backward(x, indices, gates, order, offsets, w1, b1, w2, b2, output[1], seed_key)
        ctx.options = (group_size, activation, scale, dropout)
        ctx.per_expert_input = per_expert_input

    def backward(ctx, grad_y, _grad_hidden_pre):
        if grad_y is None:   # undefined: nothing differentiated y (gradients are not materialised, _eager.py)
            return (None,) * 15
        x, indices, gates, order, offsets, w1, b1, w2, b2, hidden_pre, seed_key = ctx.saved_tensors
        grads = backward_op(grad_y.contiguous(), x, indices, gates, order, offsets, w1, b1, w2, b2, hidden_pre,
                            *ctx.options, seed_key, ctx.per_expert_input)
        grad_x, grad_gates, grad_w1, grad_b1, grad_w2, grad_b2 = grads
        return (grad_x, None, grad_gates, None, None, grad_w1, grad_b1, grad_w2, grad_b2,
                None, None, None, None, None, None)

    return setup_context, backward


if _extension.LOADED:
    torch.library.register_fake("fsosr::moe_mlp_fwd")(_fake_forward)
    torch.library.register_fake("fsosr::moe_mlp_bwd")(_fake_backward)
    _eager.register_autograd("fsosr::moe_mlp_fwd", _autograd_formulas(torch.ops.fsosr.moe_mlp_bwd))


def _triton_kernels():
    from fsosr._triton import moe_mlp as kernels  # noqa: PLC0415 - Triton is imported on first use only
    return kernels


def _triton_forward_impl(*args):
    return _triton_kernels().moe_mlp_forward(*args)


def _triton_backward_impl(*args):
    return _triton_kernels().moe_mlp_backward(*args)


@torch.library.custom_op("fsosr::moe_mlp_fwd_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, order: torch.Tensor,
                    offsets: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    group_size: int, activation: int, scale: float, dropout: float, seed_key: torch.Tensor,
                    per_expert_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_forward_impl(x, indices, gates, order, offsets, w1, b1, w2, b2, group_size, activation, scale,
                                dropout, seed_key, per_expert_input)


@torch.library.custom_op("fsosr::moe_mlp_bwd_triton", mutates_args=())
def _triton_backward(grad_y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                     order: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                     w2: torch.Tensor, b2: torch.Tensor, hidden_pre: torch.Tensor, group_size: int, activation: int,
                     scale: float, dropout: float, seed_key: torch.Tensor, per_expert_input: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward_impl(grad_y, x, indices, gates, order, offsets, w1, b1, w2, b2, hidden_pre, group_size,
                                 activation, scale, dropout, seed_key, per_expert_input)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_eager.register_autograd("fsosr::moe_mlp_fwd_triton", _autograd_formulas(torch.ops.fsosr.moe_mlp_bwd_triton))
# Eager calls: the same launchers and formulas without the dispatcher (fsosr/ops/_eager.py).
_triton_eager = _eager.eager_autograd("fsosr::moe_mlp_fwd_triton", _triton_forward_impl,
                                      *_autograd_formulas(_triton_backward_impl))
_NATIVE_OPS = {"cpu": lambda: torch.ops.fsosr.moe_mlp_fwd, "triton": lambda: torch.ops.fsosr.moe_mlp_fwd_triton,
               # The same native op as cpu: CUDA tensors reach csrc/cuda/moe_mlp_glue.cpp through the CUDA key.
               "cuda": lambda: torch.ops.fsosr.moe_mlp_fwd}


def _run_native(x, routing, w1, b1, w2, b2, group_size, activation, scale, dropout, seed, per_expert_input,
                backend_name):
    op = _triton_eager if backend_name == "triton" and _eager.use_eager_path() else _NATIVE_OPS[backend_name]()
    y, _hidden_pre = op(
        x.contiguous(), routing.indices, routing.gates, routing.order, routing.offsets, w1.contiguous(),
        b1.contiguous(), w2.contiguous(), b2.contiguous(), group_size, ACTIVATION_CODES[activation], float(scale),
        float(dropout), _op_key(seed, dropout, x.device), per_expert_input)
    return y


# The key the ops take when nothing is dropped (never read): one CPU tensor rather than a new one per call.
_NO_DROPOUT_KEY = torch.tensor(0, dtype=torch.int64)


def _op_key(seed: Seed, dropout: float, device: torch.device) -> torch.Tensor:
    """The native ops' 0-d int64 key tensor: a tensor seed's key on the seed's device (read by value from the CPU,
    loaded by the kernels on the GPU); an int's on the CPU in eager calls (no transfer) and on ``device`` inside
    torch.compile (a CPU tensor in the graph would keep Inductor from capturing it in a CUDA graph)."""
    if dropout == 0 and not torch.compiler.is_compiling():
        return _NO_DROPOUT_KEY
    return seed_key_tensor(seed, device)


def _check(condition: bool, message: str, error=ValueError) -> None:
    if not condition:
        raise error(f"moe_mlp: {message}")


def _validate_experts(x, routing, w1, b1, w2, b2, activation, scale, dropout, seed, d_in):
    _check(isinstance(routing, Routing) or (isinstance(routing, tuple) and len(routing) == 7),
           f"routing must be a fsosr.ops.Routing, got {type(routing).__name__}", TypeError)
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check(isinstance(t, torch.Tensor) and t.is_floating_point(), f"{name} must be a floating tensor", TypeError)
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
    _check(w1.dim() == 3, f"w1 must be [E, d, h], got shape {tuple(w1.shape)}")
    n_experts, _, hidden = w1.shape
    _check(w1.shape[1] == d_in, f"w1 is [E, {w1.shape[1]}, h] but the input width is {d_in}")
    _check(tuple(b1.shape) == (n_experts, hidden), f"b1 must be [E={n_experts}, h={hidden}], got {tuple(b1.shape)}")
    _check(w2.dim() == 3 and tuple(w2.shape[:2]) == (n_experts, hidden),
           f"w2 must be [E={n_experts}, h={hidden}, d_out], got {tuple(w2.shape)}")
    _check(tuple(b2.shape) == (n_experts, w2.shape[2]),
           f"b2 must be [E={n_experts}, d_out={w2.shape[2]}], got {tuple(b2.shape)}")
    _validate_routing(routing, n_experts, x.device)
    _check(isinstance(activation, str), f"activation must be a string, got {activation!r}", TypeError)
    _check(activation in reference.ACTIVATIONS,
           f"activation must be one of {', '.join(reference.ACTIVATIONS)}, got {activation!r}")
    _check(isinstance(scale, (int, float)) and not isinstance(scale, bool), f"scale must be a number, got {scale!r}",
           TypeError)
    _check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool), f"dropout must be a number, got "
           f"{dropout!r}", TypeError)
    _check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout!r}")
    if not (seed is None or is_seed(seed)):    # (formatted only here: repr of a tensor would break a trace)
        _check(False, f"seed must be an int, a 0-d integer tensor or None, got {describe(seed)}", TypeError)
    if isinstance(seed, torch.Tensor) and not (seed.device.type == "cpu" or seed.device == x.device):
        _check(False, f"seed is on {seed.device}; put it on the CPU or on x's device {x.device}")


def _validate_routing(routing, n_experts: int, device: torch.device) -> None:
    """The dispatch tables the kernels index with: shapes and dtypes always; on CPU tensors (a read there costs
    nothing) or with FSOSR_CHECK_INPUTS=1 also the values, so that a hand-built Routing cannot make a kernel read
    out of bounds. topk_route's own output always passes."""
    # Indexed one by one: torch 2.7's dynamo fails on a slice of a NamedTuple (InternalTorchDynamoError).
    indices, gates, counts, order, offsets = routing[0], routing[1], routing[2], routing[3], routing[4]
    _check(indices.dim() == 2 and gates.shape == indices.shape, "routing.indices and gates must be [N, k]")
    n_slots = indices.numel()
    _check(isinstance(counts, torch.Tensor) and counts.dim() == 1 and counts.shape[0] == n_experts,
           f"routing is over {counts.shape[0] if isinstance(counts, torch.Tensor) else '?'} experts but the weights "
           f"hold {n_experts}")
    for name, t, shape in (("indices", indices, tuple(indices.shape)), ("order", order, (n_slots,)),
                           ("offsets", offsets, (n_experts + 1,))):          # what the kernels index with
        _check(isinstance(t, torch.Tensor) and t.dtype == torch.int32,
               f"routing.{name} must be an int32 tensor (as topk_route makes it)", TypeError)
        _check(t.device == device, f"routing.{name} is on {t.device} but x is on {device}")
        _check(tuple(t.shape) == shape, f"routing.{name} must be {list(shape)} for {n_experts} experts and "
                                        f"{n_slots} (unit, slot) pairs, got {list(t.shape)}")
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    if device.type != "cpu" and os.environ.get("FSOSR_CHECK_INPUTS") != "1":
        return
    _check(n_slots == 0 or bool(((indices >= 0) & (indices < n_experts)).all()),
           f"routing.indices has an expert outside [0, {n_experts})")
    _check(n_slots == 0 or bool(((order >= 0) & (order < n_slots)).all()),
           f"routing.order has an entry outside [0, {n_slots})")
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == n_slots and bool((offsets[1:] >= offsets[:-1]).all()),
           f"routing.offsets must run non-decreasing from 0 to N*k = {n_slots}")


def _check_dtypes(x, routing, w1, b1, w2, b2, backend_name):
    """Native kernels take one dtype for x and the weights (the reference upcasts whatever it gets)."""
    if backend_name == "reference":
        return
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check(t.dtype == x.dtype, f"{name} is {t.dtype} but x is {x.dtype} (the {backend_name} backend takes "
                                   "one dtype for x and the expert weights)", TypeError)
    _check(x.dtype != torch.float64 or backend_name == "cpu", "fp64 runs on the reference and cpu backends only",
           TypeError)
    _check(routing.gates.dtype in (torch.float32, torch.float64), "routing.gates must be fp32 (fp64 with fp64 x)",
           TypeError)


def _shape_limits(w1: torch.Tensor) -> dict[str, str]:
    hidden = w1.shape[2]
    if hidden > TRITON_MAX_HIDDEN:
        return {"triton": f"its kernels keep the hidden row on chip (h <= {TRITON_MAX_HIDDEN}), got h = {hidden}; "
                          "use backend='cuda' (or leave the choice automatic)"}
    return {}


def _resolve_seed(seed: Seed | None, dropout: float, device: torch.device) -> Seed:
    """The dropout seed: as given, else drawn from torch's CPU generator (no device synchronisation). Inside
    torch.compile or a CUDA-graph capture a drawn seed would be fixed into the graph (every replay the same mask):
    there it must be given."""
    if dropout == 0.0:
        return 0
    if seed is None and torch.compiler.is_compiling():
        # A seed drawn here would be a data-dependent int in the graph (dynamo fails on it with a message about
        # guards on bitwise expressions); a seed fixed at trace time would repeat one dropout mask every call.
        raise ValueError("moe_mlp: inside torch.compile, dropout > 0 needs an explicit seed= (MoEAdapter: seed= "
                         "or dropout_seed=), a new one per step: an int, or a 0-d int64 tensor on x's device "
                         "advanced in place (fresh masks in a CUDA graph's replays too)")
    if seed is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("moe_mlp: capturing a CUDA graph with dropout > 0 needs seed= as a 0-d int64 tensor on the "
                         "GPU, advanced in place between replays (MoEAdapter: seed= or dropout_seed=); a seed "
                         "drawn now would give every replay the same dropout mask")
    return seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())


def moe_mlp(x: torch.Tensor, routing: Routing, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, *, group_size: int = 1, activation: str = "relu", scale: float = 1.0,
            dropout: float = 0.0, seed: Seed | None = None, backend: str | None = None) -> torch.Tensor:
    """y = scale * sum_j gates[n, j] * expert_{indices[n, j]}(x rows of unit n); see docs/ops/moe_mlp.md.

    Args:
        x: [N*G, d] rows; unit n owns rows n*G .. n*G+G-1.
        routing: :func:`fsosr.ops.topk_route` over the N units.
        w1 [E, d, h], b1 [E, h], w2 [E, h, d_out], b2 [E, d_out]: stacked expert weights.
        group_size: G (197 for ViT-B/16 per-sample routing, 1 for per-token routing).
        activation: relu | gelu | quick_gelu | identity.  scale: output multiplier.
        dropout: probability on the hidden activations (pass 0 in eval); seed: fixes the mask: an int, or a 0-d
            integer tensor on the CPU or x's device (same mask as its value; see docs/ops/moe_mlp.md, Seeds).
    Returns: [N*G, d_out] in x's dtype.
    """
    _check(isinstance(x, torch.Tensor) and x.is_floating_point(), "x must be a floating tensor", TypeError)
    _check(x.dim() == 2, f"x must be [N*G, d], got shape {tuple(x.shape)}")
    _check(isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1,
           f"group_size must be a positive int, got {group_size!r}")
    _validate_experts(x, routing, w1, b1, w2, b2, activation, scale, dropout, seed, x.shape[1])
    n_units = routing.indices.shape[0]
    _check(x.shape[0] == n_units * group_size,
           f"x has {x.shape[0]} rows but routing has {n_units} units of group_size={group_size}")
    _moe_dense.forced_path()   # a mistyped FSOSR_MOE_MLP_PATH raises here, before the C++ kernels would ignore it
    chosen = backends.resolve("moe_mlp", backend, x.device, IMPLEMENTED, _shape_limits(w1))
    _check_dtypes(x, routing, w1, b1, w2, b2, chosen)
    seed = _resolve_seed(seed, dropout, x.device)
    if chosen == "reference":
        return reference.moe_mlp(x, routing.indices, routing.gates, w1, b1, w2, b2, group_size, activation,
                                 float(scale), float(dropout), seed)
    return _run_native(x, routing, w1, b1, w2, b2, group_size, activation, scale, dropout, seed, False, chosen)


def moe_mlp_per_expert_input(x: torch.Tensor, routing: Routing, w1: torch.Tensor, b1: torch.Tensor,
                             w2: torch.Tensor, b2: torch.Tensor, *, activation: str = "relu", scale: float = 1.0,
                             dropout: float = 0.0, seed: Seed | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """FSMoE's MoE: expert e reads x[e] ([E, B, d]); routing over the B units. Returns [B, d_out]."""
    _check(isinstance(x, torch.Tensor) and x.is_floating_point(), "x must be a floating tensor", TypeError)
    _check(x.dim() == 3, f"x must be [E, B, d], got shape {tuple(x.shape)}")
    _validate_experts(x, routing, w1, b1, w2, b2, activation, scale, dropout, seed, x.shape[2])
    _check(x.shape[0] == w1.shape[0], f"x holds inputs for {x.shape[0]} experts but the weights hold {w1.shape[0]}")
    _check(x.shape[1] == routing.indices.shape[0],
           f"x has {x.shape[1]} units per expert but routing has {routing.indices.shape[0]}")
    _moe_dense.forced_path()   # a mistyped FSOSR_MOE_MLP_PATH raises here, before the C++ kernels would ignore it
    chosen = backends.resolve("moe_mlp", backend, x.device, IMPLEMENTED, _shape_limits(w1))
    _check_dtypes(x, routing, w1, b1, w2, b2, chosen)
    seed = _resolve_seed(seed, dropout, x.device)
    if chosen == "reference":
        return reference.moe_mlp_per_expert_input(x, routing.indices, routing.gates, w1, b1, w2, b2, activation,
                                                  float(scale), float(dropout), seed)
    if chosen == "cuda" and _moe_dense.use_dense_per_expert(w1.shape[0], routing.indices.shape[1]):
        return _moe_dense.moe_mlp_per_expert_input_dense(x, routing.indices, routing.gates, w1, b1, w2, b2,
                                                         activation, float(scale), float(dropout), seed)
    return _run_native(x, routing, w1, b1, w2, b2, 1, activation, scale, dropout, seed, True, chosen)
