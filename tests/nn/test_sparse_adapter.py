"""``fsosr.nn.SparseAdapter`` (MoSA) and its reference ops, checked against the seed's N-dense-copies form."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsosr import testing
from fsosr.backends import BackendUnavailable
from fsosr.nn.sparse_adapter import PLACEMENTS, SparseAdapter, block_forward, partition_owner
from fsosr.ops.sparse_adapter import masked_gradients_, merge_experts, sparse_adapter_weight


def _adapter(split="both", n=4, width=12, r=6, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    return SparseAdapter(width, r, n, split=split, dtype=dtype, **kw)


@torch.no_grad()
def _trained_looking(adapter, seed=1):
    """Give every expert distinct owned values, biases and (down) decay, as after some training."""
    g = torch.Generator().manual_seed(seed)
    for proj in adapter.split_projections().values():
        proj.w_own.copy_(torch.randn(proj.w_own.shape, generator=g, dtype=proj.w_own.dtype))
        proj.bias.copy_(torch.randn(proj.bias.shape, generator=g, dtype=proj.bias.dtype))
        proj.rest_scale.copy_(1 - 0.01 * torch.rand(proj.num_experts, generator=g, dtype=torch.float64))
    return adapter


def _dense_forward(adapter, x, down, up):
    """The adapter's forward with explicit dense (W, b) pairs, as the seed computes it."""
    h = adapter.norm(x) if adapter.norm is not None else x
    h = F.linear(h, *down)
    h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[adapter.activation](h)
    return adapter.scale * F.linear(h, *up)


def _dense_pair(proj, expert):
    if proj.split:
        weights, biases = proj.to_dense_experts()
        return weights[expert], biases[expert]
    return proj.weight, proj.bias


# --- partition ---------------------------------------------------------------------------------------------------
def test_element_partition_is_a_quantile_split_of_seeded_scores():
    owner = partition_owner((6, 10), 4, generator=torch.Generator().manual_seed(7))
    scores = torch.rand((6, 10), generator=torch.Generator().manual_seed(7))
    assert owner.dtype == torch.uint8 and owner.shape == (6, 10)
    assert torch.bincount(owner.flatten().long(), minlength=4).tolist() == [15, 15, 15, 15]  # disjoint, union, n/N
    for i in range(3):  # expert i holds the i-th quantile band of the scores
        assert scores[owner == i].max() < scores[owner == i + 1].min()
    assert torch.equal(owner, partition_owner((6, 10), 4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(owner, partition_owner((6, 10), 4, generator=torch.Generator().manual_seed(8)))
    uneven = partition_owner((61,), 3, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(uneven.long(), minlength=3).tolist() == [20, 20, 21]  # floor(i·n/N) bounds


@pytest.mark.parametrize("mode, dim", [("row", 1), ("column", 0)])
def test_row_and_column_partitions_split_each_line_evenly(mode, dim):
    owner = partition_owner((8, 12), 4, mode=mode, generator=torch.Generator().manual_seed(3))
    counts = F.one_hot(owner.long(), 4).sum(dim)  # [lines, N]
    per_line = owner.shape[dim] // 4
    assert owner.is_contiguous()     # the native ops would copy a strided map on every call
    assert torch.equal(counts, torch.full_like(counts, per_line))
    scores = torch.rand((8, 12), generator=torch.Generator().manual_seed(3))
    lines = zip(scores, owner) if mode == "row" else zip(scores.t(), owner.t())
    for line_scores, line_owner in lines:
        assert line_scores[line_owner == 1].max() < line_scores[line_owner == 2].min()


def test_adapter_partition_is_reproducible_from_its_seed():
    a, b = _adapter(partition_seed=11), _adapter(partition_seed=11)
    c = _adapter(partition_seed=12)
    assert torch.equal(a.down.owner, b.down.owner) and torch.equal(a.up.owner, b.up.owner)
    assert not torch.equal(a.up.owner, c.up.owner)


# --- storage: compact vs dense copies ----------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["up", "down", "both"])
def test_compact_forward_equals_dense_copies_for_every_expert(split):
    adapter = _trained_looking(_adapter(split))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            compact = adapter.scale * adapter.up(
                F.gelu(adapter.down(adapter.norm(x), i if adapter.down.split else None)),
                j if adapter.up.split else None)
            dense = _dense_forward(adapter, x, _dense_pair(adapter.down, i), _dense_pair(adapter.up, j))
            assert torch.equal(compact, dense)
    # non-owned down entries are the decayed initial values; non-owned up entries are exactly zero
    if adapter.down.split:
        weights, _ = adapter.down.to_dense_experts()
        for i in range(4):
            rest = adapter.down.owner != i
            expected = adapter.down.w_rest * adapter.down.rest_scale[i]
            assert torch.equal(weights[i][rest], expected[rest])
    if adapter.up.split:
        weights, _ = adapter.up.to_dense_experts()
        assert adapter.up.w_rest is None
        assert all(float(weights[i][adapter.up.owner != i].abs().sum()) == 0.0 for i in range(4))


def test_dense_round_trip_is_lossless_and_rejects_foreign_copies():
    source = _trained_looking(_adapter("both"))
    target = _adapter("both", seed=5, partition_seed=99)
    for name in ("down", "up"):
        src, dst = getattr(source, name), getattr(target, name)
        weights, biases = src.to_dense_experts()
        dst.from_dense_experts(weights, biases, owner=src.owner, rest_scale=src.rest_scale)
        again_w, again_b = dst.to_dense_experts()
        assert torch.allclose(again_w, weights, rtol=1e-12, atol=0) and torch.equal(again_b, biases)
        assert torch.equal(dst.owner, src.owner)
    plain = _adapter("down")
    weights, biases = plain.down.to_dense_experts()
    plain.down.from_dense_experts(weights.clone(), biases)  # rest_scale 1: bitwise round trip
    assert torch.equal(plain.down.to_dense_experts()[0], weights)
    with torch.no_grad():                                   # a diverged expert: NaN in entries it owns
        diverged = _adapter("down")
        diverged.down.w_own[diverged.down.owner == 0] = float("nan")
    nan_weights, nan_biases = diverged.down.to_dense_experts()
    plain.down.from_dense_experts(nan_weights, nan_biases, owner=diverged.down.owner)   # NaN matches NaN
    assert torch.equal(plain.down.w_own.isnan(), diverged.down.owner == 0)
    plain.down.from_dense_experts(weights.clone(), biases)
    weights[2][plain.down.owner != 2] += 1.0  # expert 2 strays on entries it does not own
    with pytest.raises(ValueError, match="weights"):
        plain.down.from_dense_experts(weights, biases)


def test_decay_rest_scales_only_the_stepped_experts_non_owned_entries():
    adapter = _adapter("down", n=3)
    proj = adapter.down
    before, _ = proj.to_dense_experts()
    proj.decay_rest_(0.9, [1])
    proj.decay_rest_(0.5, torch.tensor([True, False, True]))
    after, _ = proj.to_dense_experts()
    assert proj.rest_scale.tolist() == [0.5, 0.9, 0.5]
    for i, factor in enumerate([0.5, 0.9, 0.5]):
        mine = proj.owner == i
        assert torch.equal(after[i][mine], before[i][mine])  # owned entries belong to the optimizer, not to decay
        assert torch.allclose(after[i][~mine], before[i][~mine] * factor, rtol=1e-15, atol=0)
    as_tensor = sparse_adapter_weight(proj.w_own, proj.owner, proj.w_rest * 0.9, torch.tensor(1))
    assert torch.equal(as_tensor, after[1])  # a 0-d tensor expert id selects like the int


# --- merge and eval ----------------------------------------------------------------------------------------------
def test_merge_is_the_mean_of_the_dense_copies_and_eval_uses_it():
    adapter = _trained_looking(_adapter("both"))
    merged = adapter.merge()
    up_w, up_b = adapter.up.to_dense_experts()
    assert torch.equal(merged["up"][0], up_w.mean(0))  # zero rest: w_own / N exactly
    down_w, down_b = adapter.down.to_dense_experts()
    assert torch.allclose(merged["down"][0], down_w.mean(0), rtol=1e-14, atol=1e-15)
    assert torch.allclose(merged["down"][1], down_b.mean(0), rtol=1e-14, atol=1e-15)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    expected = _dense_forward(adapter, x, (down_w.mean(0), down_b.mean(0)), (up_w.mean(0), up_b.mean(0)))
    adapter.eval()
    assert torch.allclose(adapter(x), expected, rtol=1e-12, atol=1e-14)
    assert adapter.selected == {"down": None, "up": None}


def test_merge_experts_op_matches_explicit_mean_in_fp32():
    g = torch.Generator().manual_seed(0)
    w_own, w_rest = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    owner = torch.randint(3, (5, 7), generator=g, dtype=torch.uint8)
    scale = torch.tensor([1.0, 0.99, 0.98], dtype=torch.float64)
    dense = torch.stack([sparse_adapter_weight(w_own, owner, w_rest * float(scale[i]), i) for i in range(3)])
    merged = merge_experts(w_own, owner, w_rest, 3, rest_scale=scale)
    assert merged.dtype == torch.float32
    assert torch.allclose(merged, dense.mean(0), rtol=1e-6, atol=1e-7)


# --- expert draws ------------------------------------------------------------------------------------------------
def test_expert_draws_follow_the_seeded_generator_independently_for_down_and_up():
    adapter = _adapter("both")
    adapter.set_generator(torch.Generator().manual_seed(42))
    x = torch.randn(1, 2, 12, dtype=torch.float64)
    seen = []
    for _ in range(200):
        adapter(x)
        seen.append((adapter.selected["down"], adapter.selected["up"]))
    replay = torch.Generator().manual_seed(42)
    expected = [tuple(int(torch.randint(4, (1,), generator=replay)) for _ in range(2)) for _ in range(200)]
    assert seen == expected
    assert len(set(seen)) == 16  # every (down, up) pair occurs: the two draws are not tied
    other = _adapter("both")
    other(x, generator=torch.Generator().manual_seed(42))  # forward argument works like set_generator
    assert (other.selected["down"], other.selected["up"]) == expected[0]
    up_only = _adapter("up")
    up_only(x, generator=torch.Generator().manual_seed(42))
    assert up_only.selected_experts() == {"up": expected[0][1]}  # a dense down still consumes its draw


def test_pop_draws_returns_every_training_forward_since_the_last_step():
    """MoSA's two stochastic passes per step: both passes' draws reach the optimizer, eval forwards add none."""
    adapter = _adapter("both")
    adapter.set_generator(torch.Generator().manual_seed(7))
    x = torch.randn(1, 2, 12, dtype=torch.float64)
    adapter(x)
    first = dict(adapter.selected)
    adapter(x)
    second = dict(adapter.selected)
    adapter.eval()
    adapter(x)
    adapter.train()
    assert adapter.pop_draws() == {"down": [first["down"], second["down"]], "up": [first["up"], second["up"]]}
    assert adapter.pop_draws() == {"down": [], "up": []}
    up_only = _adapter("up")
    up_only(x)
    assert list(up_only.pop_draws()) == ["up"]


# --- placements --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["up", "down", "both"])
def test_zero_initialised_up_makes_the_adapter_output_zero(split):
    adapter = _adapter(split, dropout=None)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    assert float(adapter(x).detach().abs().max()) == 0.0
    assert float(adapter.eval()(x).detach().abs().max()) == 0.0


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_block_forward_places_adapters_and_is_the_plain_block_at_init(placement):
    spec = PLACEMENTS[placement]
    torch.manual_seed(0)
    adapters = [SparseAdapter(8, 4, 2, placement=placement) for _ in range(spec.adapters_per_block)]
    assert adapters[0].scale == spec.scale and adapters[0].dropout.p == spec.dropout
    assert (adapters[0].norm is not None) == spec.layer_norm and adapters[0].activation == spec.activation
    parts = dict(attn=nn.Linear(8, 8), norm1=nn.LayerNorm(8), mlp=nn.Linear(8, 8), norm2=nn.LayerNorm(8))
    x = torch.randn(2, 3, 8)
    h = x + parts["attn"](parts["norm1"](x))
    plain = h + parts["mlp"](parts["norm2"](h))
    assert torch.allclose(block_forward(placement, x, adapters=adapters, **parts), plain, atol=1e-6)
    with torch.no_grad():  # a non-zero up makes the adapter visible: the block output changes
        for a in adapters:
            a.up.w_own.fill_(0.5)
    assert not torch.allclose(block_forward(placement, x, adapters=adapters, **parts), plain, atol=1e-3)


# --- gradients and training --------------------------------------------------------------------------------------
def test_compact_gradient_equals_the_seeds_masked_dense_gradients():
    adapter = _trained_looking(_adapter("both"))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    adapter(x, generator=torch.Generator().manual_seed(3)).square().sum().backward()
    down_id, up_id = adapter.selected["down"], adapter.selected["up"]
    copies = {n: [nn.Parameter(w) for w in getattr(adapter, n).to_dense_experts()[0]] for n in ("down", "up")}
    biases = {n: getattr(adapter, n).to_dense_experts()[1] for n in ("down", "up")}
    out = _dense_forward(adapter, x, (copies["down"][down_id], biases["down"][down_id]),
                         (copies["up"][up_id], biases["up"][up_id]))
    out.square().sum().backward()
    for name, chosen in (("down", down_id), ("up", up_id)):
        grads = [p.grad for p in copies[name]]
        assert sum(g is not None for g in grads) == 1 and grads[chosen] is not None
        unmasked = grads[chosen].clone()
        masked_gradients_(grads, getattr(adapter, name).owner)
        mine = getattr(adapter, name).owner == chosen
        assert torch.allclose(getattr(adapter, name).w_own.grad, grads[chosen], rtol=1e-12, atol=1e-14)
        assert float(grads[chosen][~mine].abs().sum()) == 0.0 and torch.equal(grads[chosen][mine], unmasked[mine])


@pytest.mark.parametrize("backend", testing.backends_under_test(torch.device("cpu"), ("cpu", "triton")))
@pytest.mark.parametrize("split", ["up", "down", "both"])
def test_native_backends_train_like_the_reference(backend, split):
    """SparseLinear runs fsosr.ops.sparse_linear (mask in the weight-gradient GEMM): same outputs and gradients
    as the reference path, and w_own's gradient is zero off the selected expert's entries."""
    results = []
    for name in ("reference", backend):
        adapter = _trained_looking(_adapter(split, dtype=torch.float32, backend=name))
        x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = adapter(x, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(out.square().sum(), [x] + [p for p in adapter.parameters()])
        results.append((out, grads, dict(adapter.selected)))
    (ref_out, ref_grads, ref_sel), (out, grads, sel) = results
    assert sel == ref_sel
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5)
    for name, proj in adapter.split_projections().items():
        w_grad = grads[1 + [n for n, _ in adapter.named_parameters()].index(f"{name}.w_own")]
        assert torch.all(w_grad[proj.owner != sel[name]] == 0)


class _TinyBlock(nn.Module):
    """A ViT-like block (pre-norm attention + MLP) with a frozen backbone and an AdaptFormer SparseAdapter."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))
        for p in self.parameters():
            p.requires_grad_(False)
        self.adapter = SparseAdapter(width, 8, 4, split="up", generator=torch.Generator().manual_seed(0))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        attn = lambda t: self.attn(t, t, t, need_weights=False)[0]  # noqa: E731
        out = block_forward("adaptformer", x, attn=attn, norm1=self.norm1, mlp=self.mlp, norm2=self.norm2,
                            adapters=[self.adapter])
        return self.head(out.mean(1))


def _train_tiny_block(train_adapter: bool):
    torch.manual_seed(0)
    model = _TinyBlock()
    model.adapter.requires_grad_(train_adapter)
    x = torch.randn(64, 5, 16)
    y = (x[:, 0, :3] * 3).argmax(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, eps=1e-6)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        return model, losses, F.cross_entropy(model(x), y).item()


def test_sparse_adapter_in_a_tiny_vit_block_trains():
    model, losses, eval_loss = _train_tiny_block(train_adapter=True)
    _, head_only_losses, _ = _train_tiny_block(train_adapter=False)
    assert losses[-1] < 0.6 * losses[0]
    assert float(model.adapter.up.w_own.detach().abs().sum()) > 0
    # the adapter itself helps: the merged (eval) model beats the same run that trains only the head
    assert eval_loss < 0.9 * head_only_losses[-1]


@pytest.mark.parametrize("split", ["up", "down"])
def test_seed_loop_under_skip_moves_only_owned_entries_of_the_selected_expert(split):
    """The seed's way (N dense copies, grad *= mask, torch AdamW with set_to_none): per step only the selected
    expert moves, only on entries it owns (plus decay of its rest, zero for up), and the result is compact."""
    adapter = _adapter(split, n=3, dtype=torch.float32)
    proj = getattr(adapter, split)
    weights, biases = proj.to_dense_experts()
    copies = [nn.Parameter(w.clone()) for w in weights]
    lr, wd = 1e-2, 0.01
    optimizer = torch.optim.AdamW(copies, lr=lr, eps=1e-6, weight_decay=wd)
    generator, x = torch.Generator().manual_seed(5), torch.randn(4, 3, 12)
    steps_taken = torch.zeros(3, dtype=torch.int64)
    for _ in range(12):
        chosen = int(torch.randint(3, (1,), generator=generator))
        other = adapter.down if split == "up" else adapter.up
        pairs = {split: (copies[chosen], biases[chosen]), ("down" if split == "up" else "up"): _dense_pair(other, 0)}
        if split == "down":
            pairs["up"] = (torch.randn(12, 6), pairs["up"][1])  # a non-zero up so the down copy gets gradients
        before = [c.detach().clone() for c in copies]
        optimizer.zero_grad(set_to_none=True)
        (_dense_forward(adapter, x, pairs["down"], pairs["up"]) - 1).square().sum().backward()
        masked_gradients_([c.grad for c in copies], proj.owner)
        optimizer.step()
        steps_taken[chosen] += 1
        mine = proj.owner == chosen
        for i, (c, b) in enumerate(zip(copies, before)):
            if i != chosen:
                assert torch.equal(c.detach(), b)  # skipped: untouched
        moved = copies[chosen].detach() != before[chosen]
        assert bool(moved[mine].all())
        if split == "up":
            assert not bool(moved[~mine].any())  # zero rest stays exactly zero under decay
        else:
            assert torch.equal(copies[chosen].detach()[~mine], before[chosen][~mine] * (1 - lr * wd))
    dense = torch.stack([c.detach() for c in copies])
    rest_scale = (1 - lr * wd) ** steps_taken.double()
    proj.from_dense_experts(dense, biases, rest_scale=rest_scale if split == "down" else None)
    assert torch.allclose(proj.to_dense_experts()[0], dense, rtol=1e-6, atol=0)
    assert (proj.w_rest is None) == (split == "up")


# --- errors ------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_errors_naming_the_argument():
    w = torch.randn(4, 5)
    owner = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(TypeError, match="owner"):
        sparse_adapter_weight(w, owner.long(), None, 0)
    with pytest.raises(ValueError, match="owner"):
        sparse_adapter_weight(w, owner[:3], None, 0)
    with pytest.raises(ValueError, match="w_rest"):
        sparse_adapter_weight(w, owner, torch.zeros(5, 4), 0)
    with pytest.raises(TypeError, match="w_rest"):
        sparse_adapter_weight(w, owner, torch.zeros(4, 5, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="expert"):
        sparse_adapter_weight(w, owner, None, -1)
    with pytest.raises(ValueError, match="rest_scale"):
        merge_experts(w, owner, w, 3, rest_scale=torch.ones(2))
    with pytest.raises(BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        sparse_adapter_weight(w, owner, None, 0, backend="cuda")
    with pytest.raises(BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        merge_experts(w, owner, None, 2, backend="cuda")
    adapter = _adapter("up", n=2)
    weights, biases = adapter.up.to_dense_experts()
    with pytest.raises(ValueError, match="owner"):
        adapter.up.from_dense_experts(weights, biases, owner=torch.full_like(adapter.up.owner, 2))
    with pytest.raises(ValueError, match="weights"):
        adapter.up.from_dense_experts(weights[:1], biases)
    with pytest.raises(TypeError, match="weights"):
        adapter.up.from_dense_experts(weights.float(), biases)
    with pytest.raises(ValueError, match="biases"):
        adapter.up.from_dense_experts(weights, biases[:, :3])
    with pytest.raises(ValueError, match="split"):
        SparseAdapter(8, 4, 2, split="none")
    with pytest.raises(ValueError, match="num_experts"):
        SparseAdapter(8, 4, 300)
    with pytest.raises(ValueError, match="x must have last dim 12"):
        adapter(torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="expert"):
        adapter.up.expert_weight(2)
