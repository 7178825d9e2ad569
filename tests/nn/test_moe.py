"""fsosr.nn.MoEAdapter and fsosr.nn.LayerExpertMoE against the seeds' loops (MoE-Adapters4CL's SparseDispatcher,
FSMoE's dense-then-mask loop), written out here independently of fsosr.ops, in fp64."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsosr.nn import LayerExpertMoE, MoEAdapter
from fsosr.ops import load_balancing_loss, moe_mlp, reference

WIDTH, EXPERTS, K, RANK, TOKENS, SAMPLES, ROUTERS = 24, 5, 2, 8, 7, 3, 3
f64 = torch.float64
# "reference" must be the seeds' loop exactly; None (automatic) is whatever fused backend runs here, same contract.
BACKENDS = ["reference", None]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def make_adapter(batch_first=False, dropout=0.0, seed=0, **kwargs) -> MoEAdapter:
    """A small fp64 adapter with every weight random (the LoRA/zero init would make outputs and routing trivial)."""
    torch.manual_seed(seed)
    adapter = MoEAdapter(WIDTH, EXPERTS, K, RANK, ROUTERS, dropout=dropout, batch_first=batch_first,
                         dtype=f64, **kwargs)
    with torch.no_grad():
        for i, p in enumerate(adapter.parameters()):
            p.copy_(_randn(*p.shape, seed=100 + seed * 50 + i) * 0.5)
    return adapter


def make_h(batch_first, samples=SAMPLES, seed=1):
    h = _randn(samples, TOKENS, WIDTH, seed=seed)
    return (h if batch_first else h.transpose(0, 1).contiguous()).requires_grad_()


# --- the seed's block (mtil/clip/model.py), rewritten: Shazeer gating + SparseDispatcher + per-expert Adapter ----
def seed_noisy_top_k_gating(x_re, w_gate, w_noise, k, train, noise):
    """Gates [B, E]: noisy logits in training, top-(k+1), softmax over the k kept logits, scattered."""
    clean = x_re @ w_gate
    logits = clean + noise * (F.softplus(x_re @ w_noise) + 1e-2) if train else clean
    top_logits, top_indices = logits.topk(min(k + 1, w_gate.shape[1]), dim=1)
    return torch.zeros_like(logits).scatter(1, top_indices[:, :k], torch.softmax(top_logits[:, :k], dim=1))


def seed_block_adapter(adapter, h_lbd, task, train, noise=None, keep=None):
    """The adapter term of the seed's ResidualAttentionBlock for h [L, B, d]: dispatch whole samples to their
    experts, run each expert (Linear → ReLU → dropout → Linear → ×0.1) on its slice, weight by the non-zero gates,
    index_add back. ``keep`` [B, k, L, r] is the dropout mask of (sample, slot) (the op's mask, to compare)."""
    n_tokens, n_samples, width = h_lbd.shape
    router = adapter.routers[task]
    x_re = h_lbd.permute(1, 0, 2)[:, 0, :]
    gates = seed_noisy_top_k_gating(x_re, router.gate.weight.t(), router.noise.weight.t(), adapter.k, train, noise)
    slots = gates.topk(adapter.k, dim=1).indices  # slot j of each sample's experts, best first
    nonzero = torch.nonzero(gates)
    sorted_experts, index_sorted = nonzero.sort(0)
    expert_index = sorted_experts[:, 1:2]
    batch_index = nonzero[index_sorted[:, 1], 0]
    part_sizes = (gates > 0).sum(0).tolist()
    nonzero_gates = torch.gather(gates[batch_index], 1, expert_index)
    inputs = torch.split(h_lbd.permute(1, 0, 2).reshape(n_samples, -1)[batch_index], part_sizes, dim=0)
    outputs, start = [], 0
    for e in range(adapter.num_experts):
        rows = inputs[e].view(-1, n_tokens, width)
        down = torch.relu(F.linear(rows, adapter.w_down[e].t(), adapter.b_down[e]))
        if keep is not None and rows.shape[0]:
            units = batch_index[start:start + rows.shape[0]]
            slot = (slots[units] == e).long().argmax(1)
            down = down * keep[units, slot] / (1 - adapter.dropout)
        start += rows.shape[0]
        up = F.linear(down, adapter.w_up[e].t(), adapter.b_up[e]) * adapter.scale
        if up.shape[0]:
            outputs.append(up.reshape(up.shape[0], -1))
    stitched = torch.cat(outputs, 0) * nonzero_gates
    combined = torch.zeros(n_samples, n_tokens * width, dtype=h_lbd.dtype).index_add(0, batch_index, stitched)
    return combined.view(n_samples, n_tokens, width).permute(1, 0, 2)


def _grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)


# --- MoEAdapter -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_adapter_matches_seed_dispatcher_loop(batch_first, train, backend):
    adapter = make_adapter(batch_first, dropout=0.1, backend=backend).train(train)
    adapter.active_task = 1
    h = make_h(batch_first)
    noise = _randn(SAMPLES, EXPERTS, seed=7)
    out = adapter(h, noise=noise if train else None, dropout_seed=11)
    h_lbd = h if not batch_first else h.transpose(0, 1)
    keep = reference.dropout_keep_mask(11, 0.1, SAMPLES, K, TOKENS, RANK, h.device) if train else None
    expected = seed_block_adapter(adapter, h_lbd, 1, train, noise, keep)
    expected = expected if not batch_first else expected.transpose(0, 1)
    assert out.shape == h.shape
    assert float(expected.detach().abs().max()) > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    router = adapter.routers[1]
    inputs = (h, adapter.w_down, adapter.b_down, adapter.w_up, adapter.b_up, router.gate.weight, router.noise.weight)
    probe = _randn(*out.shape, seed=3)
    got, want = _grads(out, inputs, probe), _grads(expected, inputs, probe)
    for name, g, w in zip(("h", "w_down", "b_down", "w_up", "b_up", "gate", "noise"), got, want):
        if name == "noise" and not train:
            assert g is None and w is None  # no noise in eval: the noise projection is unused
            continue
        assert float(w.abs().max()) > 0, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_adapter_init_replays_seed_adapter_draws_and_outputs_zero():
    """LoRA init: under one manual_seed, the stacked experts equal the seed's 22 Adapter(init_option='lora')
    constructions bitwise; the zero up-projection makes the adapter output exactly zero (noise and dropout on)."""
    width, rank, n_experts = 16, 4, 3
    torch.manual_seed(123)
    seed_experts = []
    for _ in range(n_experts):
        down, up = nn.Linear(width, rank), nn.Linear(rank, width)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for p in (up.weight, down.bias, up.bias):
            nn.init.zeros_(p)
        seed_experts.append((down, up))
    torch.manual_seed(123)
    adapter = MoEAdapter(width, n_experts, 2, rank, 2).train()
    for e, (down, up) in enumerate(seed_experts):
        assert torch.equal(adapter.w_down[e], down.weight.t())
        assert torch.equal(adapter.b_down[e], down.bias) and torch.equal(adapter.b_up[e], up.bias)
        assert torch.equal(adapter.w_up[e], up.weight.t())
    bound = 1 / math.sqrt(width)  # kaiming_uniform(a=√5) on a [r, width] weight: U(-1/√width, 1/√width)
    assert float(adapter.w_down.detach().abs().max()) <= bound and float(adapter.w_down.detach().abs().max()) > 0.5 * bound
    for router in adapter.routers:
        assert float(router.gate.weight.detach().abs().sum()) == 0 and float(router.noise.weight.detach().abs().sum()) == 0
    h = torch.randn(5, 4, width, requires_grad=True)
    out = adapter(h, seed=0)
    assert torch.equal(out, torch.zeros_like(h))
    out.mul(torch.randn_like(out)).sum().backward()
    assert float(adapter.w_up.grad.abs().max()) > 0      # the up-projection still learns from step one
    assert float(adapter.w_down.grad.abs().max()) == 0   # nothing flows back through a zero up-projection


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_frozen_experts_get_no_grad_and_never_move_under_adamw(weight_decay):
    adapter = make_adapter(dropout=0.1).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=weight_decay)
    adapter.attach_to(optimizer)

    def step(i):
        optimizer.zero_grad()
        out = adapter(make_h(False, samples=8, seed=20 + i), seed=i)
        out.mul(_randn(*out.shape, seed=40 + i)).sum().backward()
        optimizer.step()

    for i in range(3):  # unfrozen steps first: AdamW's momentum on the soon-frozen rows is non-zero
        step(i)
    frozen = [1, 3]
    adapter.freeze_experts(frozen)
    assert adapter.frozen_ids == (1, 3) and adapter.frozen_experts.tolist() == [False, True, False, True, False]
    before = {n: getattr(adapter, n).detach().clone() for n in ("w_down", "b_down", "w_up", "b_up")}
    counts_before = adapter.selection_counts.clone()
    for i in range(3, 8):
        step(i)
        for name in before:
            grad = getattr(adapter, name).grad
            assert torch.equal(grad[frozen], torch.zeros_like(grad[frozen])), name
            assert float(grad.abs().max()) > 0, name
    assert int((adapter.selection_counts - counts_before)[frozen].min()) > 0  # the frozen experts were routed to
    masks = adapter.frozen_parameter_mask()
    for name, old in before.items():
        new = getattr(adapter, name).detach()
        assert masks[name].shape == new.shape and masks[name][frozen].all() and not masks[name][[0, 2, 4]].any()
        assert torch.equal(new[frozen], old[frozen]), name                   # bitwise unchanged
        assert not torch.equal(new[[0, 2, 4]], old[[0, 2, 4]]), name       # the others train


def test_weight_decay_alone_would_move_frozen_rows():
    """Why attach_to exists: zero gradients do not stop AdamW's decoupled weight decay."""
    adapter = make_adapter().train()
    adapter.freeze_experts([0])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    before = adapter.w_down.detach()[0].clone()
    out = adapter(make_h(False, samples=8), seed=0)
    out.sum().backward()
    assert torch.equal(adapter.w_down.grad[0], torch.zeros_like(before))
    optimizer.step()
    assert not torch.equal(adapter.w_down.detach()[0], before)
    handles = adapter.attach_to(optimizer)
    moved = adapter.w_down.detach()[0].clone()
    optimizer.step()
    assert torch.equal(adapter.w_down.detach()[0], moved)
    for handle in handles:
        handle.remove()
    optimizer.step()
    assert not torch.equal(adapter.w_down.detach()[0], moved)


def test_selection_counts_sum_training_routings_and_freeze_in_eval():
    adapter = make_adapter().train()
    adapter.active_task = 2
    expected = torch.zeros(EXPERTS, dtype=torch.int64)
    for i in range(4):
        h = make_h(False, samples=6, seed=i)
        adapter(h, seed=i)
        expected += adapter.routers[2](h[0].detach(), seed=i).counts  # the same noisy routing again
    assert adapter.selection_counts.dtype == torch.int64
    assert torch.equal(adapter.selection_counts, expected) and int(expected.sum()) == 4 * 6 * K
    adapter.eval()
    with torch.no_grad():
        for i in range(3):
            adapter(make_h(False, samples=6, seed=10 + i))
    assert torch.equal(adapter.selection_counts, expected)
    adapter.selection_counts.copy_(torch.tensor([4, 9, 2, 9, 7]))
    assert adapter.most_selected(2) == [1, 3] and adapter.most_selected(3) == [1, 3, 4]  # ties: lower id first
    adapter.reset_selection_counts()
    assert int(adapter.selection_counts.abs().sum()) == 0


def test_active_task_picks_the_router_that_gets_gradients():
    adapter = make_adapter().train()
    for task in (0, 2):
        adapter.zero_grad(set_to_none=True)
        adapter.active_task = task
        adapter(make_h(False), seed=task).mul(_randn(TOKENS, SAMPLES, WIDTH, seed=9)).sum().backward()
        for t, router in enumerate(adapter.routers):
            if t == task:
                assert float(router.gate.weight.grad.abs().max()) > 0
                assert float(router.noise.weight.grad.abs().max()) > 0
            else:
                assert router.gate.weight.grad is None and router.noise.weight.grad is None
    # The task argument overrides active_task for one call, and changes the output.
    adapter.eval()
    h = make_h(False)
    assert torch.equal(adapter(h, task=1), adapter(h, task=1))
    assert not torch.allclose(adapter(h, task=1), adapter(h, task=0))


def test_bypass_and_task_minus_one_return_zeros():
    adapter = make_adapter(balance_loss=True).train()
    h = make_h(True)
    for kwargs, flag in (({"task": -1}, False), ({}, True)):
        adapter.bypass = flag
        out = adapter(h, **kwargs)
        assert torch.equal(out, torch.zeros_like(h)) and not out.requires_grad
        assert adapter.aux_loss is None
    assert int(adapter.selection_counts.sum()) == 0
    adapter.bypass = False
    with pytest.raises(IndexError):
        adapter(h, task=ROUTERS)
    with pytest.raises(ValueError):
        adapter(h[..., :5])
    with pytest.raises(TypeError, match="task must be an int, got True"):
        adapter(h, task=True)
    with pytest.raises(TypeError, match="x is torch.float32 but the router's weights are torch.float64"):
        adapter(h.float())
    with pytest.raises(ValueError, match="h has no tokens"):
        adapter(h[:0])                                     # [L, B, width]: L = 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_eval_has_no_noise_and_no_dropout(batch_first):
    adapter = make_adapter(batch_first, dropout=0.5).eval()
    h = make_h(batch_first)
    torch.manual_seed(0)
    first = adapter(h)
    torch.manual_seed(1)
    second = adapter(h, seed=5)
    assert torch.equal(first, second)
    # = the op on clean routing with dropout 0.
    samples = h if batch_first else h.transpose(0, 1)
    routing = adapter.routers[0](samples[:, 0])
    expected = moe_mlp(samples.reshape(-1, WIDTH), routing, adapter.w_down, adapter.b_down, adapter.w_up,
                       adapter.b_up, group_size=TOKENS, scale=0.1).view(SAMPLES, TOKENS, WIDTH)
    expected = expected if batch_first else expected.transpose(0, 1)
    assert torch.equal(first, expected)
    # Training with the same seed differs (noise and dropout), and is reproducible.
    adapter.train()
    assert torch.equal(adapter(h, seed=5), adapter(h, seed=5))
    assert not torch.allclose(adapter(h, seed=5), first)


def test_balance_loss_off_by_default_and_cv_squared_when_on():
    adapter = make_adapter().train()
    h = make_h(False, samples=6)
    adapter(h, seed=3)
    assert adapter.aux_loss is None
    adapter.balance_loss = True
    adapter(h, seed=3)
    expected = load_balancing_loss(adapter.routers[0](h[0], seed=3), 1e-2)
    assert adapter.aux_loss.requires_grad and float(adapter.aux_loss.detach()) > 0
    torch.testing.assert_close(adapter.aux_loss, expected, rtol=0, atol=0)


def test_adapter_state_dict_round_trip_keeps_freezing():
    # balance_loss: after a forward, aux_loss holds a graph-attached loss, which deepcopy refused until 2026-11-23.
    adapter = make_adapter(dropout=0.1, balance_loss=True).train()
    adapter(make_h(False), seed=0)
    assert adapter.aux_loss is not None and adapter.aux_loss.grad_fn is not None
    adapter.freeze_experts(torch.tensor(0))                # a 0-d tensor (e.g. counts.argmax()) or an int
    adapter.freeze_experts(2)
    assert adapter.frozen_ids == (0, 2)
    state = adapter.state_dict()
    assert {"selection_counts", "frozen_experts", "w_down", "routers.2.noise.weight"} <= set(state)
    loaded = make_adapter(dropout=0.1, seed=5)
    loaded.load_state_dict(state)
    assert loaded.frozen_ids == (0, 2)
    for name, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    buffer = io.BytesIO()
    torch.save(adapter, buffer)  # whole-module save, as the seed saves its models
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)
    h = make_h(False)
    for other in (loaded, copy.deepcopy(adapter), pickled):  # freezing survives every way of copying
        assert torch.equal(other(h, seed=1, dropout_seed=2), adapter(h, seed=1, dropout_seed=2))
        other(h, seed=1).sum().backward()
        assert float(other.w_up.grad[[0, 2]].abs().max()) == 0 and float(other.w_up.grad.abs().max()) > 0


# --- LayerExpertMoE ---------------------------------------------------------------------------------------------
LAYERS, IN, HIDDEN, OUT, R_IN, R_HIDDEN, TOP = 4, 6, 12, 5, 7, 14, 2


def seed_sparse_moe(moe, layer_features, f):
    """FSMoE's SparseMoE.forward: top-k logits, -inf elsewhere, softmax; every selected expert runs densely on the
    whole batch and is masked by its (zero off the top-k) gate column."""
    logits = moe.router.gate(f)
    _, indices = logits.topk(moe.k, dim=-1)
    sparse_logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, logits.gather(-1, indices))
    gates = torch.softmax(sparse_logits, dim=-1)
    out = torch.zeros(f.shape[0], moe.out_features, dtype=f.dtype)
    for i in range(moe.num_experts):
        if (indices == i).any(dim=-1).any():
            y = F.linear(torch.relu(F.linear(layer_features[i], moe.w1[i].t(), moe.b1[i])), moe.w2[i].t(), moe.b2[i])
            out = out + y * gates[:, i].unsqueeze(1)
    return out


def make_layer_moe(seed=0, backend=None):
    torch.manual_seed(seed)
    return LayerExpertMoE(LAYERS, IN, HIDDEN, OUT, R_IN, R_HIDDEN, TOP, backend=backend, dtype=f64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_list", [False, True])
def test_layer_expert_moe_matches_dense_then_mask_loop(as_list, backend):
    moe = make_layer_moe(backend=backend)
    batch = 6
    x = _randn(LAYERS, batch, IN, seed=1).requires_grad_()
    f = F.normalize(_randn(batch, R_IN, seed=2), dim=-1).requires_grad_()
    out, routing = moe(list(x.unbind(0)) if as_list else x, f, return_routing=True)
    expected = seed_sparse_moe(moe, x, f)
    assert out.shape == (batch, OUT) and routing.indices.shape == (batch, TOP)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = (x, f, moe.w1, moe.b1, moe.w2, moe.b2, *moe.router.parameters())
    probe = _randn(batch, OUT, seed=3)
    for g, w in zip(_grads(out, inputs, probe), _grads(expected, inputs, probe)):
        assert float(w.abs().max()) > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_layer_expert_moe_init_replays_seed_draws():
    """Under one manual_seed: the seed's TopkRouter (Linear → ReLU → Linear) then E Expert modules (Linear →
    ReLU → Linear, nn.Linear defaults) give bitwise the module's router and stacked experts."""
    torch.manual_seed(7)
    router = nn.Sequential(nn.Linear(R_IN, R_HIDDEN), nn.ReLU(), nn.Linear(R_HIDDEN, LAYERS))
    experts = [nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT)) for _ in range(LAYERS)]
    torch.manual_seed(7)
    moe = LayerExpertMoE(LAYERS, IN, HIDDEN, OUT, R_IN, R_HIDDEN, TOP)
    for ours, theirs in zip(moe.router.gate.parameters(), router.parameters()):
        assert torch.equal(ours, theirs)
    for e, expert in enumerate(experts):
        assert torch.equal(moe.w1[e], expert[0].weight.t()) and torch.equal(moe.b1[e], expert[0].bias)
        assert torch.equal(moe.w2[e], expert[2].weight.t()) and torch.equal(moe.b2[e], expert[2].bias)
    assert float(moe.b2.detach().abs().max()) <= 1 / math.sqrt(HIDDEN)


def test_layer_expert_moe_state_dict_round_trip_and_errors():
    moe, other = make_layer_moe(0), make_layer_moe(1)
    x, f = _randn(LAYERS, 3, IN, seed=4), _randn(3, R_IN, seed=5)
    assert not torch.equal(moe(x, f), other(x, f))
    other.load_state_dict(moe.state_dict())
    assert set(moe.state_dict()) == {"w1", "b1", "w2", "b2", "router.gate.0.weight", "router.gate.0.bias",
                                     "router.gate.2.weight", "router.gate.2.bias"}
    assert torch.equal(moe(x, f), other(x, f))
    with pytest.raises(ValueError):
        moe(x[:-1], f)
    with pytest.raises(ValueError):
        moe(x, f[:2])
    with pytest.raises(ValueError, match=f"f must be \\[B=3, router_in={R_IN}\\]"):
        moe(x, f[:, :-1])
    with pytest.raises(ValueError):
        LayerExpertMoE(3, k=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_under_autocast_runs_in_the_activations_dtype(backend):
    """Mixed precision: fp32 experts, bf16 activations under torch.autocast (as Linear layers produce them); the
    experts run in bf16 and their fp32 parameters get gradients."""
    adapter = make_adapter(backend=backend).float().train()
    h = make_h(False).detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(h, seed=0)
    assert out.dtype == torch.bfloat16
    expected = make_adapter(backend="reference").to(torch.bfloat16).train()(h.detach(), seed=0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert adapter.w_down.grad.dtype == torch.float32 and adapter.w_down.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_expert_moe_under_autocast(backend):
    moe = make_layer_moe(0, backend=backend).float()
    x, f = _randn(LAYERS, 3, IN, seed=4).to(torch.bfloat16), _randn(3, R_IN, seed=5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, f)
    expected = make_layer_moe(0, backend="reference").to(torch.bfloat16)(x, f)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
