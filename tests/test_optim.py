"""fsosr.optim.MaskedAdamW against MoSA's own training step, written the seed's way: N dense copies per split
projection, one dense copy per shared tensor, ``p.grad *= p.mask`` and HF AdamW with torch-1.11 / torch-2
gradient semantics (fsosr.ops.reference.seed_masked_adamw_step_), in fp64, over several steps of one or two
stochastic passes each."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsosr import testing
from fsosr.nn import SparseAdapter
from fsosr.ops import reference
from fsosr.optim import MaskedAdamW

LR, BETAS, EPS, WD = 3e-2, (0.9, 0.999), 1e-6, 0.01
BACKENDS = ["reference"] + testing.backends_under_test(torch.device("cpu"), ("cpu", "triton"))
GROUPS = {"down": 0, "up": 1}


def _adapter(split: str, n: int = 3, seed: int = 0) -> SparseAdapter:
    torch.manual_seed(seed)
    adapter = SparseAdapter(10, 4, n, split=split, dropout=0.0, dtype=torch.float64)
    adapter.set_generator(torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # a non-zero start for the up projection, so every tensor gets gradients at once
        for proj in (adapter.down, adapter.up):
            if proj.split:
                proj.bias.normal_(0, 0.1)
                if proj is adapter.up:
                    proj.w_own.normal_(0, 0.1)   # owned entries only: w_rest stays zero (None)
            else:
                proj.weight.normal_(0, 0.3)
    return adapter


def _seed_model(adapter: SparseAdapter):
    """SeedParams mirroring the adapter the seed's way, and a dense forward over them."""
    params = {}
    if adapter.norm is not None:
        params["norm.weight"] = reference.SeedParam(adapter.norm.weight.detach().clone(), group=0, weight_decay=WD)
        params["norm.bias"] = reference.SeedParam(adapter.norm.bias.detach().clone(), group=0)
    for name in ("down", "up"):
        proj = getattr(adapter, name)
        if proj.split:
            weights, biases = proj.to_dense_experts()
            for i in range(adapter.num_experts):
                mask = (proj.owner == i).double()
                params[f"{name}.w{i}"] = reference.SeedParam(weights[i].clone(), group=GROUPS[name], expert=i,
                                                             mask=mask, weight_decay=WD)
                params[f"{name}.b{i}"] = reference.SeedParam(biases[i].clone(), group=GROUPS[name], expert=i,
                                                             mask=torch.ones_like(biases[i]))
        else:
            params[f"{name}.w"] = reference.SeedParam(proj.weight.detach().clone(), group=GROUPS[name],
                                                      weight_decay=WD)
            params[f"{name}.b"] = reference.SeedParam(proj.bias.detach().clone(), group=GROUPS[name])
    return params


def _seed_forward(adapter, leaves, x, down_id, up_id):
    h = F.layer_norm(x, (x.shape[-1],), leaves["norm.weight"], leaves["norm.bias"], eps=1e-6) \
        if adapter.norm is not None else x
    pick = lambda name, e: (leaves[f"{name}.w{e}"], leaves[f"{name}.b{e}"]) if getattr(adapter, name).split \
        else (leaves[f"{name}.w"], leaves[f"{name}.b"])  # noqa: E731
    h = F.gelu(F.linear(h, *pick("down", down_id)))
    return adapter.scale * F.linear(h, *pick("up", up_id))


def _train(split: str, semantics: str, passes: int, backend: str, steps: int = 8):
    adapter = _adapter(split)
    seed = _seed_model(adapter)
    optimizer = MaskedAdamW([adapter], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, semantics=semantics,
                            backend=backend)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        xs = [torch.randn(3, 5, 10, generator=g, dtype=torch.float64) for _ in range(passes)]
        targets = [torch.randn(3, 5, 10, generator=g, dtype=torch.float64) for _ in range(passes)]
        optimizer.zero_grad(set_to_none=True)
        loss, drawn = 0.0, {"down": [], "up": []}
        for x, t in zip(xs, targets):
            loss = loss + (adapter(x) - t).square().mean()
            drawn["down"].append(adapter.selected["down"] if adapter.down.split else 0)
            drawn["up"].append(adapter.selected["up"] if adapter.up.split else 0)
        loss.backward()
        optimizer.step()
        # the seed: the same passes on dense copies, then its masking and HF AdamW
        leaves = {k: p.value.clone().requires_grad_() for k, p in seed.items()}
        seed_loss = sum((_seed_forward(adapter, leaves, x, d, u) - t).square().mean()
                        for x, t, d, u in zip(xs, targets, drawn["down"], drawn["up"]))
        seed_loss.backward()
        grads = [leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(p.value)
                 for k, p in seed.items()]
        reference.seed_masked_adamw_step_(list(seed.values()), grads, {0: drawn["down"], 1: drawn["up"]}, lr=LR,
                                          betas=BETAS, eps=EPS, semantics=semantics)
    return adapter, seed, optimizer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("semantics", ["mosa", "skip", "freeze"])
@pytest.mark.parametrize("split", ["up", "down", "both"])
def test_matches_the_seeds_dense_copies(split, semantics, passes, backend):
    adapter, seed, _ = _train(split, semantics, passes, backend)
    close = dict(rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(adapter.norm.weight.detach(), seed["norm.weight"].value, **close)
    torch.testing.assert_close(adapter.norm.bias.detach(), seed["norm.bias"].value, **close)
    for name in ("down", "up"):
        proj = getattr(adapter, name)
        if proj.split:
            weights, biases = proj.to_dense_experts()
            for i in range(adapter.num_experts):
                torch.testing.assert_close(weights[i], seed[f"{name}.w{i}"].value, **close)
                torch.testing.assert_close(biases[i], seed[f"{name}.b{i}"].value, **close)
        else:
            torch.testing.assert_close(proj.weight.detach(), seed[f"{name}.w"].value, **close)
    # something was learnt, and the down projection's non-owned entries decayed unless frozen
    assert not torch.equal(adapter.up.bias.detach(), _adapter(split).up.bias.detach())
    if adapter.down.split:
        assert bool((adapter.down.rest_scale < 1).any()) == (semantics != "freeze")


def test_parameters_are_views_of_one_flat_buffer_and_state_round_trips():
    adapter = _adapter("up")
    optimizer = MaskedAdamW([adapter], lr=LR)
    flat = optimizer._flat
    for p in adapter.parameters():
        assert p.data_ptr() >= flat.data_ptr()
        assert p.data_ptr() + p.numel() * p.element_size() <= flat.data_ptr() + flat.numel() * flat.element_size()
    adapter(torch.randn(2, 3, 10, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    other = MaskedAdamW([_adapter("up")], lr=LR)
    other.load_state_dict(state)
    assert torch.equal(other._exp_avg, optimizer._exp_avg) and torch.equal(other._steps, optimizer._steps)
    with pytest.raises(ValueError, match="different adapters"):
        MaskedAdamW([_adapter("both")], lr=LR).load_state_dict(state)


def test_errors_say_what_is_wrong():
    with pytest.raises(TypeError, match="SparseAdapter"):
        MaskedAdamW([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="semantics"):
        MaskedAdamW([_adapter("up")], semantics="sgd")
    adapter = _adapter("up")
    optimizer = MaskedAdamW([adapter])
    with pytest.raises(RuntimeError, match="no training forward"):
        optimizer.step()
    frozen = _adapter("up")
    frozen.norm.requires_grad_(False)
    with pytest.raises(ValueError, match="must require grad"):
        MaskedAdamW([frozen])
    with pytest.raises(ValueError, match="appears twice"):
        shared = _adapter("up")
        MaskedAdamW([shared], other_params=[("norm.weight", shared.norm.weight)])


def test_several_adapters_in_one_buffer_equal_one_optimizer_each():
    together = [_adapter("down", seed=0), _adapter("both", seed=3)]
    alone = [_adapter("down", seed=0), _adapter("both", seed=3)]
    joint = MaskedAdamW(together, lr=LR)
    single = [MaskedAdamW([a], lr=LR) for a in alone]
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
        joint.zero_grad()
        (together[0](x).square().sum() + together[1](x).sum()).backward()
        joint.step()
        for opt in single:
            opt.zero_grad()
        (alone[0](x).square().sum() + alone[1](x).sum()).backward()
        for opt in single:
            opt.step()
    for a, b in zip(together, alone):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
        assert torch.equal(a.down.rest_scale, b.down.rest_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_training_matches_the_cpu(backend):
    """The same 4 steps (two passes each) on CUDA and on the CPU, fp32: the fused step on either GPU backend."""
    results = []
    for device, opt_backend in (("cpu", "cpu"), ("cuda", backend)):
        adapter = _adapter("both").float().to(device)
        optimizer = MaskedAdamW([adapter], lr=LR, backend=opt_backend)
        g = torch.Generator().manual_seed(9)
        for _ in range(4):
            optimizer.zero_grad()
            loss = sum(adapter(torch.randn(2, 3, 10, generator=g).to(device)).square().mean() for _ in range(2))
            loss.backward()
            optimizer.step()
        results.append({k: v.detach().cpu() for k, v in adapter.state_dict().items()})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_mosa_vit_trains_with_two_passes_and_only_adapters_and_head_move():
    """MoSA's recipe on a tiny timm ViT: two stochastic passes per step, CE on the first plus the symmetric KL
    consistency between the passes (MoSA's scripts: ADD_WEIGHT 0, REG_WEIGHT 1), one MaskedAdamW for the sparse
    adapters and the head."""
    from fsosr.models.vit import TINY_VIT_KWARGS, build_vit  # noqa: PLC0415

    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", adapter=dict(placement="adaptformer", bottleneck=4, num_experts=3),
                      num_classes=3, **TINY_VIT_KWARGS).train()
    model.set_generator(torch.Generator().manual_seed(1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = MaskedAdamW(model.adapters(), lr=1e-2, other_params=model.vit.head.named_parameters(prefix="head"))
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(12) % 3
    patterns = torch.randn(3, 3, 32, 32, generator=g)            # a learnable signal per class
    images = patterns[labels] + 0.5 * torch.randn(12, 3, 32, 32, generator=g)
    losses = []
    for _ in range(30):
        z1, z2 = model(images), model(images)
        p1, p2 = z1.softmax(-1), z2.softmax(-1)
        kl = 0.5 * (F.kl_div(p1.log(), p2.detach(), reduction="batchmean")
                    + F.kl_div(p2.log(), p1.detach(), reduction="batchmean"))
        ce = F.cross_entropy(z1, labels)
        optimizer.zero_grad(set_to_none=True)
        (ce + kl).backward()
        optimizer.step()
        losses.append(float(ce.detach()))
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses   # the draws make single steps noisy
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert int(optimizer._steps[:, :-1].sum()) > 0          # the experts' own counters advanced
