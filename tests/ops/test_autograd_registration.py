"""The ops' autograd (fsosr/ops/_eager.py) does not materialise gradients of outputs nobody differentiated: a MoE
layer step's backward fills no zero tensor for topk_route's unused outputs or moe_mlp's saved pre-activations
(8 fills, each a kernel launch on CUDA, before), on every native backend and on both routes of the triton one.
An undefined gradient of a differentiable output is handled (gradcheck's undefined-gradient check covers that,
tests/ops/test_moe_mlp.py and test_sparse_adapter_ops.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsosr import testing
from fsosr.ops import _eager, moe_mlp, topk_route

DEVICE = testing.device_under_test()
BACKENDS = testing.backends_under_test(DEVICE, ("cpu", "cuda", "triton"))
ZERO_FILLS = {"aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default", "aten.zero_.default",
              "aten.fill_.Scalar", "aten.full.default", "aten.new_full.default", "aten.full_like.default"}


class ZeroFills(TorchDispatchMode):
    """Counts the elements of every zero-filled tensor created while active."""

    def __init__(self):
        super().__init__()
        self.elements = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in ZERO_FILLS:
            self.elements.append(out.numel())
        return out


# Only the triton backend has an eager route (an autograd.Function skipping the dispatcher).
ROUTES = [(b, "registered") for b in BACKENDS] + [("triton", "eager")] * ("triton" in BACKENDS)


@pytest.mark.parametrize("backend,route", ROUTES)
def test_moe_layer_backward_fills_no_unused_gradient(backend, route, monkeypatch):
    monkeypatch.setattr(_eager, "use_eager_path", lambda: route == "eager")
    g = torch.Generator().manual_seed(0)
    n_experts, group = 5, 6
    x = torch.randn(4 * group, 24, generator=g).to(DEVICE).requires_grad_()
    logits = torch.randn(4, n_experts, generator=g).to(DEVICE).requires_grad_()
    weights = [(torch.randn(*s, generator=g) * 0.3).to(DEVICE).requires_grad_()
               for s in [(n_experts, 24, 16), (n_experts, 16), (n_experts, 16, 24), (n_experts, 24)]]
    routing = topk_route(logits, 2, backend=backend, check_finite=False)
    y = moe_mlp(x, routing, *weights, group_size=group, dropout=0.1, seed=1, backend=backend)
    grad_y = torch.randn(y.shape, generator=g).to(DEVICE)
    with ZeroFills() as fills:
        grads = torch.autograd.grad(y, [x, logits, *weights], grad_y)
    # topk_route's native backward takes the importance and load gradients as [E] tensors: two small fills.
    assert sum(fills.elements) <= 2 * n_experts, fills.elements
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[1].abs().sum() > 0          # the gates' gradient reached the logits


@pytest.mark.parametrize("backend,route", ROUTES)
def test_differentiating_a_gradient_raises(backend, route, monkeypatch):
    """create_graph=True through the native ops (a gradient penalty) raises instead of silently dropping the
    second-order terms (torch would return None with a warning); the reference backend differentiates twice."""
    monkeypatch.setattr(_eager, "use_eager_path", lambda: route == "eager")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g).to(DEVICE).requires_grad_()
    logits = torch.randn(3, 5, generator=g).to(DEVICE).requires_grad_()
    weights = [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in [(5, 4, 3), (5, 3), (5, 3, 4), (5, 4)]]
    y = moe_mlp(x, topk_route(logits, 2, backend=backend, check_finite=False), *weights, group_size=2,
                activation="gelu", backend=backend)
    with pytest.raises(RuntimeError, match="differentiating its gradient .create_graph=True. is not supported"):
        torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    grad_x, = torch.autograd.grad(y.square().sum(), [x])        # first order as usual
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
