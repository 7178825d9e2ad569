"""``fsosr.nn.TopKRouter``: MoE-Adapters4CL's noisy linear router and FSMoE's MLP router."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsosr.nn import TopKRouter
from fsosr.ops import cv_squared, normal_from_seed


def _x(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- MoE-Adapters4CL: zero-initialised noisy linear gate ---------------------------------------------------------
def _zero_init_router(backend=None):
    torch.manual_seed(0)
    return TopKRouter(16, 22, 2, noisy=True, zero_init=True, backend=backend)


def test_zero_init_structure():
    router = _zero_init_router()
    assert isinstance(router.gate, nn.Linear) and router.gate.bias is None
    assert isinstance(router.noise, nn.Linear) and router.noise.bias is None
    assert router.noisy
    assert router.gate.weight.shape == (22, 16) and router.noise.weight.shape == (22, 16)
    assert float(router.gate.weight.detach().abs().sum()) == 0.0
    assert float(router.noise.weight.detach().abs().sum()) == 0.0


def test_zero_init_eval_ties_pick_first_experts():
    router = _zero_init_router().eval()
    routing = router(_x(64, 16))
    assert routing.indices.tolist() == [[0, 1]] * 64
    assert torch.equal(routing.gates, torch.full((64, 2), 0.5))
    expected_counts = torch.zeros(22, dtype=torch.int32)
    expected_counts[:2] = 64
    assert torch.equal(routing.counts, expected_counts)
    # Clean routing in eval: load is the counts.
    assert torch.equal(routing.load, expected_counts.float())


def test_zero_init_train_is_noisy_and_reproducible():
    router = _zero_init_router().train()
    x = _x(64, 16)
    first = router(x, seed=5)
    again = router(x, seed=5)
    other = router(x, seed=6)
    first_rows = first.indices.tolist()
    assert sum(row == [0, 1] for row in first_rows) < 64
    # Noisy routing over 22 equally likely experts spreads out.
    assert int((first.counts > 0).sum()) >= 15
    for name, a, b in zip(first._fields, first, again):
        assert torch.equal(a, b), name
    assert not torch.equal(first.indices, other.indices)
    # With zero weights the noise std is softplus(0) + 0.01 everywhere: the routing is that of the seeded draws.
    noise = normal_from_seed((64, 22), 5) * (F.softplus(torch.zeros(())) + 0.01)
    assert torch.equal(first.indices.long(), torch.topk(noise, 2, dim=1).indices)


# --- gradients ---------------------------------------------------------------------------------------------------
def _noisy_router(backend=None):
    torch.manual_seed(1)
    return TopKRouter(16, 8, 2, noisy=True, backend=backend)


def _train_loss(routing):
    w = torch.linspace(-1.0, 2.0, routing.gates.numel()).reshape(routing.gates.shape)
    return (routing.gates * w).sum() + cv_squared(routing.load)


def test_gradients_reach_gate_and_noise_in_training():
    router = _noisy_router().train()
    routing = router(_x(32, 16), seed=3)
    assert routing.load.requires_grad
    _train_loss(routing).backward()
    assert router.gate.weight.grad is not None and float(router.gate.weight.grad.abs().max()) > 0
    assert router.noise.weight.grad is not None and float(router.noise.weight.grad.abs().max()) > 0


def test_load_alone_sends_gradient_to_noise_weight():
    router = _noisy_router().train()
    routing = router(_x(32, 16), seed=3)
    cv_squared(routing.load).backward()
    assert float(router.noise.weight.grad.abs().max()) > 0
    assert float(router.gate.weight.grad.abs().max()) > 0


def test_no_noise_gradient_in_eval():
    router = _noisy_router().eval()
    routing = router(_x(32, 16), seed=3)
    w = torch.linspace(-1.0, 2.0, routing.gates.numel()).reshape(routing.gates.shape)
    (routing.gates * w).sum().backward()
    assert router.gate.weight.grad is not None and float(router.gate.weight.grad.abs().max()) > 0
    assert router.noise.weight.grad is None


def test_eval_ignores_seed_and_is_clean():
    router = _noisy_router().eval()
    x = _x(32, 16)
    a, b = router(x, seed=3), router(x, seed=4)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices.long(), torch.topk(router.gate(x), 2, dim=1).indices)


# --- FSMoE: Linear -> ReLU -> Linear gate ------------------------------------------------------------------------
def test_fsmoe_router_matches_topk_softmax():
    torch.manual_seed(2)
    router = TopKRouter(512, 11, 5, hidden_features=1024)
    assert isinstance(router.gate, nn.Sequential) and len(router.gate) == 3
    assert isinstance(router.gate[0], nn.Linear) and router.gate[0].weight.shape == (1024, 512)
    assert isinstance(router.gate[1], nn.ReLU)
    assert isinstance(router.gate[2], nn.Linear) and router.gate[2].weight.shape == (11, 1024)
    assert router.gate[0].bias is not None and router.gate[2].bias is not None
    assert router.noise is None and not router.noisy

    x = _x(12, 512, seed=3)
    routing = router(x)  # training mode: no noise without a noise projection
    logits = router.gate[2](torch.relu(router.gate[0](x))).detach()
    values, indices = torch.topk(logits, 5, dim=1)
    assert logits.unique().numel() == logits.numel()  # no ties: topk's order is unambiguous
    assert torch.equal(routing.indices.long(), indices)
    torch.testing.assert_close(routing.gates.detach(), torch.softmax(values, dim=1), atol=1e-6, rtol=1e-6)
    counts = torch.bincount(indices.reshape(-1), minlength=11)
    assert torch.equal(routing.counts.long(), counts)
    importance = torch.zeros(11).index_add(0, indices.reshape(-1), torch.softmax(values, 1).reshape(-1))
    torch.testing.assert_close(routing.importance.detach(), importance, atol=1e-5, rtol=1e-5)


def test_renormalize_false_uses_softmax_over_all_experts():
    torch.manual_seed(4)
    router = TopKRouter(16, 6, 2, renormalize=False)
    x = _x(10, 16)
    routing = router(x)
    probs = torch.softmax(router.gate(x).detach(), dim=1)
    values, indices = torch.topk(probs, 2, dim=1)
    assert torch.equal(routing.indices.long(), indices)
    torch.testing.assert_close(routing.gates.detach(), values, atol=1e-6, rtol=1e-6)


# --- backends agree ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [None, 32])
def test_reference_and_cpu_backends_agree(hidden):
    torch.manual_seed(5)
    ref = TopKRouter(16, 8, 3, noisy=True, hidden_features=hidden, backend="reference").train()
    cpu = copy.deepcopy(ref)
    cpu.backend = "cpu"
    x = _x(24, 16, seed=6)
    r_ref, r_cpu = ref(x, seed=9), cpu(x, seed=9)
    for name in ("indices", "counts", "order", "offsets"):
        assert torch.equal(getattr(r_ref, name), getattr(r_cpu, name)), name
    for name in ("gates", "importance", "load"):
        torch.testing.assert_close(getattr(r_cpu, name), getattr(r_ref, name), atol=1e-5, rtol=1e-5, msg=name)
    _train_loss(r_ref).backward()
    _train_loss(r_cpu).backward()
    for (name, p_ref), p_cpu in zip(ref.named_parameters(), cpu.parameters()):
        assert p_ref.grad is not None and float(p_ref.grad.abs().max()) > 0, name
        torch.testing.assert_close(p_cpu.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_backend_is_forwarded():
    router = TopKRouter(8, 4, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        router(_x(3, 8))


# --- validation and the balancing loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 5])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\]"):
        TopKRouter(8, 4, k)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 8), ()])
def test_non_2d_input(shape):
    router = TopKRouter(8, 4, 2)
    with pytest.raises(ValueError, match="x must be \\[N, in_features=8\\]"):
        router(torch.randn(shape))


def test_wrong_width_or_dtype_is_named():
    for router in (TopKRouter(8, 4, 2), TopKRouter(8, 4, 2, hidden_features=6, noisy=True)):
        with pytest.raises(ValueError, match="x must be \\[N, in_features=8\\], got shape \\(3, 7\\)"):
            router(torch.randn(3, 7))
        with pytest.raises(TypeError, match="x is torch.float64 but the router's weights are torch.float32"):
            router(torch.randn(3, 8, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast: Linear casts, no error
            assert router(torch.randn(3, 8, dtype=torch.bfloat16)).indices.shape == (3, 2)


def test_balancing_loss_positive_when_unbalanced():
    router = TopKRouter(16, 6, 2, zero_init=True).eval()  # every unit on experts 0 and 1
    routing = router(_x(20, 16))
    loss = router.balancing_loss(routing).detach()
    assert loss.shape == ()
    assert float(loss) > 0
    importance = torch.tensor([10.0, 10.0, 0, 0, 0, 0])
    load = torch.tensor([20.0, 20.0, 0, 0, 0, 0])
    expected = 1e-2 * (importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(router.balancing_loss(routing, weight=1.0).detach()) == pytest.approx(float(expected) * 100, rel=1e-5)


def test_balancing_loss_zero_when_balanced():
    router = TopKRouter(16, 4, 4, zero_init=True).eval()  # k = E, tied logits: every expert gets 1/4 of each unit
    loss = router.balancing_loss(router(_x(10, 16))).detach()
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
