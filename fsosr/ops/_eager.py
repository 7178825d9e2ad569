"""A fast eager path for Python-implemented (Triton) ops: the same forward, setup_context and backward a
``torch.library`` op is registered with, run as a ``torch.autograd.Function`` instead of through the dispatcher.

Why: a ``torch.library.custom_op`` with ``register_autograd`` costs host time on every call (dispatcher, the
autograd kernel's Python wrapper, ``fill_defaults`` re-reading the schema, a redispatch below autograd).
``benchmarks/test_host_overhead.py`` measures both routes with every Triton launch stubbed out: on this project's
2-core CPU an MoE layer's topk_route + moe_mlp forward + backward took 580 µs of host time through the registered
ops and 405 µs eager (benchmarks/results/2026-11-23-cpu-2cores-host-overhead.json); on the H100 host of
2026-11-22 the op's autograd wrapper alone took 390-470 µs per call (benchmarks/results/*kernel-profile.txt).

The registered op stays the one torch.compile traces (``torch.compiler.is_compiling()`` picks it) and the one
``opcheck`` checks; both routes run the same launchers, so they give bitwise-equal results (tested).
"""
from __future__ import annotations

from typing import Callable

import torch


def eager_autograd(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``apply`` of an autograd.Function with these formulas (signatures as for ``torch.library.register_autograd``:
    ``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)`` returning one gradient per input); ``name``:
    the registered op it stands for, for error messages."""
    first_order_backward = _first_order_only(name, backward)

    class EagerOp(torch.autograd.Function):
        # A forward that takes ctx, not forward + setup_context: for a Function that defines setup_context, every
        # apply() binds its arguments through inspect.signature (torch.autograd.function._bind_default_args),
        # 14 µs of the 20-25 µs an apply costs on this project's 2-core CPU (26 -> 11 µs measured with a trivial
        # forward, torch 2.14). What setup_context would buy, torch.func transforms, these ops cannot use anyway:
        # their backward formulas are first-order only.
        @staticmethod
        def forward(ctx, *args):
            ctx.set_materialize_grads(False)   # undefined output gradients arrive as None, as for a custom op
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return first_order_backward(ctx, *grads)

    return EagerOp.apply


def register_autograd(name: str, formulas: tuple[Callable, Callable]) -> None:
    """Register ``formulas`` = (setup_context, backward) as the autograd of the torch.library op ``name``: the
    same pair :func:`eager_autograd` takes, so both routes share one definition."""
    setup_context, backward = formulas

    def setup_without_materialized_grads(ctx, inputs, output):
        # Without this, autograd hands the backward a zero-filled tensor for every output nobody differentiated
        # (topk_route's 7 unused outputs, moe_mlp's saved pre-activations: 8 fills per MoE layer step, each a
        # kernel launch on CUDA); the formulas take None, as on the eager path.
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    torch.library.register_autograd(name, _first_order_only(name, backward),
                                    setup_context=setup_without_materialized_grads)


def _first_order_only(name: str, backward: Callable) -> Callable:
    """The backward ops have no derivative of their own: a backward with create_graph=True (double backward, a
    gradient penalty) raises here instead of returning gradients without a graph (torch only warns, and the
    second-order gradient comes out as None)."""
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            raise RuntimeError(f"{name}: differentiating its gradient (create_graph=True) is not supported by the "
                               "native backends; use backend='reference' for higher-order gradients")
        return backward(ctx, *grads)
    return checked


def use_eager_path() -> bool:
    """Eager calls take the autograd.Function; torch.compile traces the registered op."""
    return not torch.compiler.is_compiling()
