"""Prompt learners (fsosr.nn.prompts, fsosr.nn.prompts_conditional) on the tiny random-init CLIP.

The key property: with the context set to the token embeddings of real words, a prompt is the embedding of the
equivalent text, so its features equal ``clip.encode_text(clip.tokenize(text))``. The image-conditioned learners
are checked against per-image loops built independently from the tokenised text, in fp64.
"""
import pytest
import torch
import torch.nn.functional as F

from fsosr.models.clip import create_clip
from fsosr.nn.prompts import CoOpPromptLearner
from fsosr.nn.prompts_conditional import CoCoOpPromptLearner, FSMoEPromptLearner

NAMES = ["cat", "sea_lion", "golden retriever"]
TEXTS = {  # the text each layout spells with context "a photo of a"
    "end": ["a photo of a cat.", "a photo of a sea lion.", "a photo of a golden retriever."],
    "middle": ["a photo cat of a.", "a photo sea lion of a.", "a photo golden retriever of a."],
    "front": ["cat a photo of a.", "sea lion a photo of a.", "golden retriever a photo of a."],
}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip("fsosr-tiny")


@pytest.fixture(scope="module")
def clip64():
    torch.manual_seed(1)
    return create_clip("fsosr-tiny").double()


def word_embeddings(clip, words):
    ids = torch.tensor(clip.tokenizer.encode(words))
    return clip.token_embedding(ids).detach()


def images(n, dtype=torch.float32, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_prompts(clip, names, ctx, n_ctx):
    """Prompt embeddings [C, L, w] from the tokenised "X … X name." text with ctx [n_ctx, w] written over the X's."""
    tokens = clip.tokenize([" ".join(["X"] * n_ctx) + f" {n.replace('_', ' ')}." for n in names])
    emb = clip.token_embedding(tokens).detach().clone()
    emb[:, 1:1 + n_ctx] = ctx
    return emb, clip.pool_index(tokens)


# --- CoOp ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_equals_encode_text_of_the_equivalent_text(clip, position):
    learner = CoOpPromptLearner(clip, NAMES, ctx_init="a photo of a", class_token_position=position, truncate=False)
    tokens = clip.tokenize(TEXTS[position])
    assert learner.n_ctx == 4
    assert torch.equal(learner(), clip.token_embedding(tokens))
    assert torch.equal(learner.pool_index, clip.pool_index(tokens))
    assert torch.equal(learner.text_features(normalize=False), clip.encode_text(tokens))
    assert torch.equal(learner.text_features(), clip.encode_text(tokens, normalize=True))


def test_coop_random_context_set_to_words(clip):
    learner = CoOpPromptLearner(clip, NAMES, n_ctx=4, truncate=False)
    assert not torch.equal(learner.ctx, word_embeddings(clip, "a photo of a"))
    with torch.no_grad():
        learner.ctx.copy_(word_embeddings(clip, "a photo of a"))
    expected = clip.encode_text(clip.tokenize(TEXTS["end"]), normalize=True)
    assert torch.equal(learner.text_features(), expected)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_truncated_prompts_match_full_length(clip64, position):
    learner = CoOpPromptLearner(clip64, NAMES, ctx_init="a photo of a", class_token_position=position)
    tokens = clip64.tokenize(TEXTS[position])
    assert learner.prompt_length == int(clip64.pool_index(tokens).max()) + 1 == 9  # SOT 4 golden retriever . EOT
    torch.testing.assert_close(learner.text_features(normalize=False), clip64.encode_text(tokens),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_coop_learner_copies_whole_with_its_own_clip(clip, how):
    """An EMA / best-checkpoint copy of a learner (copy.deepcopy, whole-model torch.save) carries its CLIP along."""
    import copy
    import io

    learner = CoOpPromptLearner(clip, NAMES, ctx_init="a photo of a")
    if how == "deepcopy":
        duplicate = copy.deepcopy(learner)
    else:
        buffer = io.BytesIO()
        torch.save(learner, buffer)
        buffer.seek(0)
        duplicate = torch.load(buffer, weights_only=False)
    assert duplicate.clip is not clip and duplicate.clip._text.owner is duplicate.clip.clip
    with torch.no_grad():
        assert torch.equal(duplicate.text_features(), learner.text_features())
        feats = clip.encode_image(images(2), normalize=True)
        assert torch.equal(duplicate.logits(feats), learner.logits(feats))


def test_coop_class_specific(clip):
    words = ["a photo of a", "a drawing of the", "itap of my"]
    learner = CoOpPromptLearner(clip, NAMES, n_ctx=4, class_specific=True, truncate=False)
    assert learner.ctx.shape == (3, 4, clip.text_width)
    assert learner().shape == (3, clip.context_length, clip.text_width)
    with torch.no_grad():
        for c, w in enumerate(words[:2] + ["a photo of my"]):
            learner.ctx[c].copy_(word_embeddings(clip, w))
    texts = ["a photo of a cat.", "a drawing of the sea lion.", "a photo of my golden retriever."]
    assert torch.equal(learner.text_features(normalize=False), clip.encode_text(clip.tokenize(texts)))
    # class c's text depends only on its own context
    learner.text_features()[1].sum().backward()
    assert learner.ctx.grad[0].abs().max() == 0 and learner.ctx.grad[2].abs().max() == 0
    assert learner.ctx.grad[1].abs().max() > 0


def test_coop_class_specific_ctx_init_repeats_the_words(clip):
    learner = CoOpPromptLearner(clip, NAMES, ctx_init="a photo of a", class_specific=True)
    assert learner.ctx.shape == (3, 4, clip.text_width)
    for c in range(3):
        assert torch.equal(learner.ctx[c], word_embeddings(clip, "a photo of a"))


def test_random_init_is_seeded_and_leaves_global_rng_alone(clip):
    state = torch.get_rng_state()
    a = CoOpPromptLearner(clip, NAMES, n_ctx=16, generator=torch.Generator().manual_seed(3))
    b = CoOpPromptLearner(clip, NAMES, n_ctx=16, generator=torch.Generator().manual_seed(3))
    c = CoOpPromptLearner(clip, NAMES, n_ctx=16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert a.ctx.shape == (16, clip.text_width)
    assert 0.017 < a.ctx.std().item() < 0.023 and abs(a.ctx.mean().item()) < 0.003
    torch.manual_seed(5)
    d = CoOpPromptLearner(clip, NAMES, n_ctx=16, init_std=0.5)
    torch.manual_seed(5)
    e = CoOpPromptLearner(clip, NAMES, n_ctx=16, init_std=0.5)
    assert torch.equal(d.ctx, e.ctx) and 0.45 < d.ctx.std().item() < 0.55


def test_coop_trains_only_its_context(clip):
    learner = CoOpPromptLearner(clip, NAMES, n_ctx=4)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert list(learner.state_dict()) == ["ctx"]  # prefix/suffix are rebuilt from the CLIP, not saved
    feats = clip.encode_image(images(2), normalize=True)
    logits = learner.logits(feats)
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert learner.ctx.grad.abs().max() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())


def test_coop_local_logits_shape_and_scale(clip):
    learner = CoOpPromptLearner(clip, NAMES, n_ctx=4)
    local = clip.image_features(images(2), local=True, normalize=True).local
    logits = learner.logits(local)
    assert logits.shape == (2, local.shape[1], 3)
    assert logits.abs().max() <= clip.logit_scale + 1e-4


def test_longest_prompt_that_fits(clip):
    # 32 tokens = SOT + 28 ctx + "cat" + "." + EOT
    learner = CoOpPromptLearner(clip, ["cat"], n_ctx=28, truncate=False)
    with torch.no_grad():
        learner.ctx.copy_(word_embeddings(clip, " ".join(["a"] * 28)))
    tokens = clip.tokenize([" ".join(["a"] * 28) + " cat."])
    assert tokens[0, -1] == tokens.max()  # the EOT is the last token
    assert torch.equal(learner.text_features(normalize=False), clip.encode_text(tokens))


# --- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"class_names": []}, "empty"),
    ({"class_names": ["cat", " "]}, "empty name"),
    ({"class_names": "cat"}, "sequence"),
    ({"ctx_init": " ".join(["a"] * 40)}, "ctx_init"),
    ({"ctx_init": " ".join(["a"] * 28)}, "sea lion"),  # fits "cat", not the two-token names
    ({"n_ctx": 40}, "n_ctx=40"),
    ({"n_ctx": 28}, "needs 33 tokens"),
    ({"n_ctx": 0}, "positive"),
    ({"class_token_position": "start"}, "class_token_position"),
])
def test_coop_errors(clip, kwargs, match):
    args = {"class_names": NAMES, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        CoOpPromptLearner(clip, **args)


# --- CoCoOp --------------------------------------------------------------------------------------------------------
def cocoop_reference(clip, learner, feats):
    """Per-image loop (the seed's form): C prompts per image through the text tower, one image at a time."""
    out = []
    for f in feats:
        ctx = learner.ctx + learner.meta_net(f)
        prompts, pool = reference_prompts(clip, NAMES, ctx, learner.n_ctx)
        out.append(clip.encode_text_embeddings(prompts, pool, normalize=True))
    return torch.stack(out)


def test_cocoop_batched_equals_per_image_loop(clip64):
    learner = CoCoOpPromptLearner(clip64, NAMES, generator=torch.Generator().manual_seed(0))
    assert learner.meta_net[0].out_features == max(1, clip64.embed_dim // 16)
    assert learner.meta_net[2].out_features == clip64.text_width and learner.n_ctx == 4
    feats = clip64.encode_image(images(5, torch.float64), normalize=True)
    batched = learner.text_features(feats)
    reference = cocoop_reference(clip64, learner, feats)
    assert batched.shape == (5, 3, clip64.embed_dim)
    torch.testing.assert_close(batched, reference, rtol=1e-12, atol=1e-12)
    logits = learner.logits(feats)
    torch.testing.assert_close(logits, clip64.logit_scale * torch.einsum("bd,bcd->bc", feats, reference),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(learner(images(5, torch.float64)), logits, rtol=0, atol=0)
    # images differ, so their prompts differ
    assert (batched[0] - batched[1]).abs().max() > 1e-6


@pytest.mark.parametrize("chunk_size", [1, 5, 15, 100])
def test_cocoop_chunked_equals_unchunked(clip64, chunk_size):
    learner = CoCoOpPromptLearner(clip64, NAMES, ctx_init=None, n_ctx=3, class_token_position="middle",
                                  generator=torch.Generator().manual_seed(1))
    feats = clip64.encode_image(images(5, torch.float64, seed=2), normalize=True)
    full = learner.text_features(feats)
    torch.testing.assert_close(learner.text_features(feats, chunk_size=chunk_size), full, rtol=1e-12, atol=1e-12)


def test_cocoop_gradients_reach_ctx_and_meta_net_only(clip):
    learner = CoCoOpPromptLearner(clip, NAMES)
    assert {n for n, p in learner.named_parameters() if p.requires_grad} == {
        "ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
    F.cross_entropy(learner(images(4)), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in learner.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_cocoop_errors(clip):
    learner = CoCoOpPromptLearner(clip, NAMES)
    with pytest.raises(ValueError, match="image_features must be"):
        learner.text_features(torch.zeros(2, clip.embed_dim + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        learner.text_features(torch.zeros(2, clip.embed_dim), chunk_size=0)


# --- FSMoE ---------------------------------------------------------------------------------------------------------
def moe_by_hand(moe, layer_feats, f):
    """Σ_{i ∈ top-k} softmax_topk(router(f))_i · expert_i(layer_feats[i]), written out per sample."""
    logits = moe.router.gate(f)
    out = torch.zeros(f.shape[0], moe.out_features, dtype=f.dtype)
    for b in range(f.shape[0]):
        top = torch.topk(logits[b], moe.k)
        gates = torch.softmax(top.values, dim=0)
        for g, i in zip(gates, top.indices.tolist()):
            hidden = torch.relu(layer_feats[i, b] @ moe.w1[i] + moe.b1[i])
            out[b] += g * (hidden @ moe.w2[i] + moe.b2[i])
    return out


@pytest.mark.parametrize("order, n_ctx, layers, top_k", [
    ("moe_first", 8, None, None), ("swapped", 5, None, 1), ("moe_first", 4, [1], 1)])
def test_fsmoe_context_halves_get_moe_and_meta_net(clip64, order, n_ctx, layers, top_k):
    learner = FSMoEPromptLearner(clip64, NAMES, n_ctx=n_ctx, layers=layers, top_k=top_k, order=order,
                                 generator=torch.Generator().manual_seed(0))
    taps = clip64.image_features(images(4, torch.float64), layer_cls=True, normalize=True)
    f, layer_cls = taps.embedding, taps.layer_cls
    ctx, moe_out, meta_out, routing = learner.context(f, layer_cls)
    chosen = layer_cls[[0, 1] if layers is None else layers]
    expected_moe = moe_by_hand(learner.moe, chosen, f)
    expected_meta = torch.relu(f @ learner.meta_net[0].weight.t() + learner.meta_net[0].bias) \
        @ learner.meta_net[2].weight.t() + learner.meta_net[2].bias
    torch.testing.assert_close(moe_out, expected_moe, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(meta_out, expected_meta, rtol=1e-12, atol=1e-12)
    half = n_ctx // 2
    first, second = (expected_moe, expected_meta) if order == "moe_first" else (expected_meta, expected_moe)
    assert ctx.shape == (4, n_ctx, clip64.text_width)
    torch.testing.assert_close(ctx[:, :half], learner.ctx[:half] + first[:, None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ctx[:, half:], learner.ctx[half:] + second[:, None], rtol=1e-12, atol=1e-12)
    assert routing.indices.shape == (4, learner.moe.k)


def test_fsmoe_logits_equal_per_image_reference(clip64):
    learner = FSMoEPromptLearner(clip64, NAMES, generator=torch.Generator().manual_seed(2))
    x = images(3, torch.float64, seed=4)
    out = learner(x, return_parts=True)
    f = clip64.encode_image(x, normalize=True)
    torch.testing.assert_close(out.image_features, f, rtol=0, atol=0)
    ctx, _, _, _ = learner.context(*learner.encode_images(x))
    reference = []
    for b in range(3):
        prompts, pool = reference_prompts(clip64, NAMES, ctx[b], learner.n_ctx)
        reference.append(clip64.encode_text_embeddings(prompts, pool, normalize=True))
    reference = torch.stack(reference)
    torch.testing.assert_close(out.text_features, reference, rtol=1e-12, atol=1e-12)
    expected = clip64.logit_scale * torch.einsum("bd,bcd->bc", f, reference)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert out.logits.abs().max() <= clip64.logit_scale
    assert out.meta_features.shape == out.moe_features.shape == (3, clip64.text_width)
    torch.testing.assert_close(learner(x), out.logits, rtol=0, atol=0)
    learner.chunk_size = 4
    torch.testing.assert_close(learner(x), out.logits, rtol=1e-12, atol=1e-12)


def test_fsmoe_defaults_follow_the_seed_proportions(clip):
    learner = FSMoEPromptLearner(clip, NAMES)
    d, vw, w = clip.embed_dim, clip.vision_width, clip.text_width
    assert learner.n_ctx == 8 and learner.layers.tolist() == [0, 1] and learner.moe.k == 2
    assert learner.moe.w1.shape == (2, vw, 2 * vw) and learner.moe.w2.shape == (2, 2 * vw, w)
    assert learner.moe.router.gate[0].weight.shape == (2 * d, d)
    assert learner.meta_net[0].weight.shape == (2 * d, d) and learner.meta_net[2].weight.shape == (w, 2 * d)
    assert 0.015 < learner.ctx.std().item() < 0.025


def test_fsmoe_gradients_reach_every_trainable_part_and_no_clip_parameter(clip):
    learner = FSMoEPromptLearner(clip, NAMES, generator=torch.Generator().manual_seed(0))
    out = learner(images(4), return_parts=True)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 1])) + out.meta_features.pow(2).mean()
    loss.backward()
    trainable = dict(learner.named_parameters())
    for name in ("ctx", "meta_net.0.weight", "meta_net.2.weight", "moe.router.gate.0.weight",
                 "moe.router.gate.2.weight", "moe.w1", "moe.b1", "moe.w2", "moe.b2"):
        assert trainable[name].grad is not None and trainable[name].grad.abs().max() > 0, name
    assert all(p.requires_grad for p in learner.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_fsmoe_seeded_init_is_reproducible(clip):
    state = torch.get_rng_state()
    a = FSMoEPromptLearner(clip, NAMES, generator=torch.Generator().manual_seed(7))
    b = FSMoEPromptLearner(clip, NAMES, generator=torch.Generator().manual_seed(7))
    c = FSMoEPromptLearner(clip, NAMES, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["moe.w1"], sc["moe.w1"]) and not torch.equal(sa["ctx"], sc["ctx"])


@pytest.mark.parametrize("kwargs, match", [
    ({"n_ctx": 1}, "n_ctx must be >= 2"),
    ({"layers": [2]}, "out of range"),
    ({"layers": []}, "layers is empty"),
    ({"top_k": 3}, "k must be in"),
    ({"order": "reversed"}, "order"),
    ({"class_names": []}, "empty"),
])
def test_fsmoe_errors(clip, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSMoEPromptLearner(clip, **{"class_names": NAMES, **kwargs})


def test_fsmoe_rejects_wrong_taps(clip):
    learner = FSMoEPromptLearner(clip, NAMES)
    f = torch.zeros(2, clip.embed_dim)
    with pytest.raises(ValueError, match="layer_cls must be"):
        learner.forward_features(f, torch.zeros(3, 2, clip.vision_width))
    with pytest.raises(ValueError, match="image_features must be"):
        learner.forward_features(torch.zeros(2, clip.embed_dim + 1), torch.zeros(2, 2, clip.vision_width))


def test_fsmoe_maps_to_the_text_width_when_it_differs_from_the_embedding(clip):
    import open_clip

    from fsosr.models.clip import ClipBackbone
    torch.manual_seed(0)
    config = dict(embed_dim=48, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 3,
                                            "head_width": 32},
                  text_cfg={"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2})
    wide = ClipBackbone(open_clip.CLIP(**config), "test-embed48")
    assert (wide.embed_dim, wide.text_width) == (48, 32)
    learner = FSMoEPromptLearner(wide, NAMES, generator=torch.Generator().manual_seed(0))
    assert learner.meta_net[0].weight.shape == (96, 48) and learner.meta_net[2].weight.shape == (32, 96)
    assert learner.moe.router.gate[0].weight.shape == (96, 48) and learner.moe.w2.shape == (2, 128, 32)
    out = learner(images(2), return_parts=True)
    assert out.logits.shape == (2, 3) and out.text_features.shape == (2, 3, 48)
    assert out.meta_features.shape == out.moe_features.shape == (2, 32)
    torch.testing.assert_close(out.logits, wide.logit_scale * torch.einsum("bd,bcd->bc", out.image_features,
                                                                           out.text_features))
