"""The triton backend's eager path (fsosr/ops/_eager.py: the launchers run as a torch.autograd.Function, not
through the torch.library op) gives bitwise the same outputs and gradients as the registered op, and
torch.compile traces the registered op. Under the interpreter on CPU tensors, compiled with FSOSR_TEST_DEVICE=cuda."""
from __future__ import annotations

import pytest
import torch

from fsosr import testing
from fsosr.ops import _eager, masked_adamw_, moe_mlp, topk_route
from fsosr.ops.sparse_adapter import merge_experts, sparse_adapter_weight, sparse_linear

DEVICE = testing.device_under_test()
pytestmark = pytest.mark.skipif("triton" not in testing.backends_under_test(DEVICE, ("triton",)),
                                reason="triton backend not usable here")


def moe_step(x, logits, w1, b1, w2, b2):
    r = topk_route(logits, 2, noise_std=0.5, seed=3, backend="triton", check_finite=False)
    y = moe_mlp(x, r, w1, b1, w2, b2, group_size=20, activation="gelu", scale=0.1, dropout=0.2, seed=4,
                backend="triton")
    return y, r.importance


def sparse_step(x, w_own, w_rest, bias, owner):
    y = sparse_linear(x, w_own, w_rest, owner, 1, bias, backend="triton")
    return y, sparse_adapter_weight(w_own, owner, w_rest, 2, backend="triton")


def moe_inputs():
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * 20, 24), (3, 5), (5, 24, 16), (5, 16), (5, 16, 24), (5, 24)]
    return [(torch.randn(*s, generator=g) * 0.5).to(DEVICE).requires_grad_() for s in shapes]


def sparse_inputs():
    g = torch.Generator().manual_seed(1)
    x, w_own, w_rest, bias = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
                              for s in [(7, 12), (9, 12), (9, 12), (9,)])
    owner = torch.randint(0, 3, (9, 12), generator=g, dtype=torch.uint8).to(DEVICE)
    return [x, w_own, w_rest, bias, owner]


def run(step, inputs, eager: bool, monkeypatch):
    monkeypatch.setattr(_eager, "use_eager_path", lambda: eager)
    outputs = step(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.device)
              for i, o in enumerate(outputs)]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes)), leaves)
    return [o.detach() for o in outputs] + list(grads)


@pytest.mark.parametrize("case", ["moe", "sparse"])
def test_eager_path_is_bitwise_the_registered_op(monkeypatch, case):
    step, inputs = (moe_step, moe_inputs()) if case == "moe" else (sparse_step, sparse_inputs())
    eager = run(step, inputs, True, monkeypatch)
    registered = run(step, inputs, False, monkeypatch)
    assert len(eager) == len(registered) and all(torch.equal(a, b) for a, b in zip(eager, registered))


def test_eager_path_is_bitwise_the_registered_op_for_the_optimizer_and_merge(monkeypatch):
    g = torch.Generator().manual_seed(2)
    p = 1000
    state = [torch.randn(p, generator=g), torch.randn(p, generator=g), torch.rand(p, generator=g),
             torch.randint(0, 4, (p,), generator=g, dtype=torch.uint8)]
    results = []
    for eager in (True, False):
        monkeypatch.setattr(_eager, "use_eager_path", lambda eager=eager: eager)
        params, grads, exp_avg_sq, owner = (t.clone().to(DEVICE) for t in state)
        exp_avg = torch.zeros_like(params)
        steps = torch.zeros(1, 5, dtype=torch.int64, device=DEVICE)
        for _ in range(3):
            masked_adamw_(params, grads, exp_avg, exp_avg_sq, owner, 1, lr=1e-2, weight_decay=0.01, step=steps,
                          backend="triton")
        merged = merge_experts(params.view(100, 10), owner.view(100, 10), grads.view(100, 10), 4, backend="triton")
        results.append([params, exp_avg, exp_avg_sq, steps, merged])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_eager_calls_skip_the_dispatcher_and_compile_traces_the_registered_ops():
    called = []

    def counting_op(original):
        def call(*args, **kwargs):
            called.append(1)
            return original(*args, **kwargs)
        return call

    inputs = moe_inputs()
    from unittest import mock  # noqa: PLC0415
    with mock.patch.object(torch.ops.fsosr, "moe_mlp_fwd_triton", counting_op(torch.ops.fsosr.moe_mlp_fwd_triton)):
        moe_step(*inputs)
    assert called == []            # eager: the autograd.Function, not the op

    torch._dynamo.reset()
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    compiled = torch.compile(moe_step, backend=recording_backend, fullgraph=True)
    y, importance = compiled(*inputs)
    assert any("moe_mlp_fwd_triton" in t for t in targets) and any("topk_route_fwd_triton" in t for t in targets)
    eager_y, eager_importance = moe_step(*inputs)
    assert torch.equal(y, eager_y) and torch.equal(importance, eager_importance)


def test_triton_moe_mlp_opcheck():
    from fsosr.ops._rng import seed_key_tensor  # noqa: PLC0415
    x, logits, w1, b1, w2, b2 = moe_inputs()
    r = topk_route(logits.detach(), 2, backend="triton", check_finite=False)
    args = (x, r.indices, r.gates.detach().requires_grad_(), r.order, r.offsets, w1, b1, w2, b2, 20, 1, 0.1, 0.2,
            seed_key_tensor(4), False)
    torch.library.opcheck(torch.ops.fsosr.moe_mlp_fwd_triton.default, args)
