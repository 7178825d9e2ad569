"""ClipBackbone: equality with open_clip, the FSMoE/LoCoOp taps, MoE adapter slots, freezing, local-checkpoint
loading (open_clip state dicts, OpenAI TorchScript) and its errors. Tiny random-init models only."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsosr.models.checkpoint import CheckpointMismatchError
from fsosr.models.clip import ClipBackbone, create_clip
from fsosr.models.clip_loading import (FSOSR_CLIP_CONFIGS, build_open_clip, clip_config, is_torchscript_archive,
                                       list_clip_models)
from fsosr.nn import MoEAdapter

PROMPTS = ["a photo of a cat.", "seven", "a photo of the digit nine.", ""]


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    torch.manual_seed(0)
    return create_clip("fsosr-tiny")


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _fresh_tiny(seed: int = 0) -> ClipBackbone:
    torch.manual_seed(seed)
    return create_clip("fsosr-tiny")


# --- equality with open_clip -----------------------------------------------------------------------------------------
def test_plain_outputs_equal_open_clip(tiny, images):
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(tiny.encode_image(images), tiny.clip.encode_image(images))
        assert torch.equal(tiny.encode_text(tokens), tiny.clip.encode_text(tokens))
        assert torch.equal(tiny.encode_image(images, normalize=True), tiny.clip.encode_image(images, normalize=True))
        feats = tiny.image_features(images, layer_cls=True, local=True, patch_tokens=True)
        # the taps do not disturb the global path
        assert torch.equal(feats.embedding, tiny.clip.encode_image(images))


def test_patch_tokens_equal_open_clip_output_tokens(tiny, images):
    visual = tiny.clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    with torch.no_grad():
        assert torch.equal(tiny.image_features(images, patch_tokens=True).patch_tokens, tokens)


def test_layer_cls_are_raw_residual_after_blocks_1_to_L_minus_1(tiny, images):
    with torch.no_grad():
        ours = tiny.image_features(images, layer_cls=True).layer_cls
        ref = tiny.clip.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True,
                                                     intermediates_only=True)["image_intermediates_prefix"]
    blocks = tiny.num_vision_blocks
    assert ours.shape == (blocks - 1, 3, tiny.vision_width)
    for i in range(blocks - 1):
        torch.testing.assert_close(ours[i], ref[i][:, 0], rtol=0, atol=0)


def _local_features_by_hand(model: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
    """LoCoOp's value path written from the block weights (the seed's ``clip_w_local/model.py``)."""
    visual = model.clip.visual
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    d = x.shape[-1]
    ln1 = F.layer_norm(x, (d,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
    v = ln1 @ last.attn.in_proj_weight[2 * d:].t() + last.attn.in_proj_bias[2 * d:]
    v = x + v @ last.attn.out_proj.weight.t() + last.attn.out_proj.bias
    ln2 = F.layer_norm(v, (d,), last.ln_2.weight, last.ln_2.bias, last.ln_2.eps)
    hidden = F.gelu(ln2 @ last.mlp.c_fc.weight.t() + last.mlp.c_fc.bias)
    v = v + hidden @ last.mlp.c_proj.weight.t() + last.mlp.c_proj.bias
    post = F.layer_norm(v, (d,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
    return post[:, 1:] @ visual.proj


def test_local_features_match_a_direct_computation(tiny, images):
    with torch.no_grad():
        feats = tiny.image_features(images, local=True, normalize=True)
        expected = _local_features_by_hand(tiny, images)
    grid = (tiny.image_size // tiny.clip.visual.patch_size[0]) ** 2
    assert feats.local.shape == (3, grid, tiny.embed_dim)
    torch.testing.assert_close(feats.local, F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)
    # local features differ from the patch tokens' path (no attention mixing), so the test can tell them apart
    assert not torch.allclose(expected[:, 0], feats.embedding, atol=1e-3)


def test_text_from_embeddings_shorter_than_context(tiny):
    tokens = tiny.tokenize(["a photo of a cat."])
    n = int(tiny.pool_index(tokens)) + 1
    with torch.no_grad():
        full = tiny.encode_text(tokens)
        short = tiny.encode_text_embeddings(tiny.token_embedding(tokens[:, :n]), tiny.pool_index(tokens))
    # causal attention: positions after EOT never influence it
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_wrong_image_size_names_the_expected_size(tiny):
    with pytest.raises(ValueError, match=r"fsosr-tiny takes images \[B, 3, 32, 32\].*\(2, 3, 28, 28\).*32×32"):
        tiny.encode_image(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*\(2, 1, 32, 32\)"):
        tiny.image_features(torch.randn(2, 1, 32, 32))


# --- adapter slots ---------------------------------------------------------------------------------------------------
def test_zero_init_adapters_leave_outputs_unchanged(images):
    model = _fresh_tiny()
    tokens = model.tokenize(PROMPTS)
    adapters = model.add_moe_adapters(num_experts=4, k=2, bottleneck=8, num_routers=2)
    assert len(adapters) == model.num_vision_blocks + len(model.clip.transformer.resblocks)
    assert all(isinstance(a, MoEAdapter) for a in adapters)
    # compared mode by mode: eval-mode attention may take torch's fused fast path, which rounds differently
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), model.clip.encode_image(images))
            assert torch.equal(model.encode_text(tokens), model.clip.encode_text(tokens))
        # with autograd on (adapters trainable) the values stay within float rounding of plain CLIP
        torch.testing.assert_close(model.encode_image(images), model.clip.encode_image(images), rtol=1e-5, atol=1e-5)


def _perturb_adapters(model: ClipBackbone, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters():
            adapter.w_up.copy_(torch.randn(adapter.w_up.shape, generator=g) * 0.5)
            for router in adapter.routers:
                for p in router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


def test_active_adapter_is_parallel_to_the_mlp_on_h(images):
    model = _fresh_tiny()
    model.add_moe_adapters(towers=("vision",), num_experts=3, k=2, bottleneck=8, num_routers=1, noisy=False,
                           backend="reference")
    _perturb_adapters(model)
    model.eval()
    visual = model.clip.visual
    with torch.no_grad():
        x = visual._embeds(images)
        for block, adapter in zip(visual.transformer.resblocks, model.vision_adapters):
            h = x + block.attention(block.ln_1(x))
            logits = h[:, 0] @ adapter.routers[0].gate.weight.t() if hasattr(adapter.routers[0].gate, "weight") \
                else None
            out = torch.zeros_like(h)
            top = adapter.routers[0](h[:, 0])
            for b in range(h.shape[0]):
                for j in range(adapter.k):
                    e, g = int(top.indices[b, j]), top.gates[b, j]
                    hidden = F.relu(h[b] @ adapter.w_down[e] + adapter.b_down[e])
                    out[b] += g * (hidden @ adapter.w_up[e] + adapter.b_up[e]) * adapter.scale
            x = h + block.mlp(block.ln_2(h)) + out
            del logits
        pooled, _ = visual._pool(x)
        expected = pooled @ visual.proj
        got = model.encode_image(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model.clip.encode_image(images), atol=1e-3)  # the adapters do act


def test_task_minus_one_and_bypass_give_plain_clip(images):
    model = _fresh_tiny()
    tokens = model.tokenize(PROMPTS)
    model.add_moe_adapters(num_experts=4, k=2, bottleneck=8, num_routers=2)
    _perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        plain_image, plain_text = model.clip.encode_image(images), model.clip.encode_text(tokens)
        adapted = model.encode_image(images)
        assert not torch.allclose(adapted, plain_image, atol=1e-4)
        with model.adapters_bypassed():
            assert torch.equal(model.encode_image(images), plain_image)
            assert torch.equal(model.encode_text(tokens), plain_text)
        assert torch.equal(model.encode_image(images), adapted)   # the context restores the adapters
        model.set_task(-1)
        assert torch.equal(model.encode_image(images), plain_image)
        model.set_task(1)
        assert not torch.allclose(model.encode_image(images), adapted, atol=1e-5)  # router 1 ≠ router 0


def test_frozen_clip_gets_no_gradient_adapters_do(images):
    model = _fresh_tiny()
    model.add_moe_adapters(num_experts=4, k=2, bottleneck=8, num_routers=2)
    model.train()
    tokens = model.tokenize(PROMPTS[:2])
    logits = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).t()
    F.cross_entropy(logits, torch.tensor([0, 1, 0])).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(not p.requires_grad for p in model.clip.parameters())
    grads = [a.w_up.grad for a in model.adapters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    summary = model.trainable_summary()
    assert "vision_adapters.0" in summary and "clip." not in summary


def test_adapters_reject_unsupported_tower(tiny):
    with pytest.raises(ValueError, match="towers"):
        tiny.add_moe_adapters(towers=("audio",))


# --- whole-model copies (EMA / best-checkpoint copies, whole-model torch.save) -----------------------------------------
def _torch_save_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
           "torch.save": _torch_save_round_trip}


@pytest.mark.parametrize("how", sorted(COPIERS))
def test_whole_model_copies_give_equal_outputs_and_own_text_tower(images, how):
    model = _fresh_tiny()
    model.add_moe_adapters(num_experts=3, k=2, bottleneck=8, num_routers=1, noisy=False)
    _perturb_adapters(model)
    model.eval()
    tokens = model.tokenize(PROMPTS)
    duplicate = COPIERS[how](model)
    with torch.no_grad():
        assert torch.equal(duplicate.encode_image(images), model.encode_image(images))
        assert torch.equal(duplicate.encode_text(tokens), model.encode_text(tokens))
        # the copy's text tower is the copy's own CLIP: changing it leaves the original alone
        assert duplicate._text.owner is duplicate.clip and duplicate._text.owner is not model.clip
        before = model.encode_text(tokens)
        duplicate.token_embedding.weight.add_(1.0)
        assert torch.equal(model.encode_text(tokens), before)
        assert not torch.allclose(duplicate.encode_text(tokens), before, atol=1e-3)


def test_text_tower_attribute_errors_stay_attribute_errors(tiny):
    assert not hasattr(tiny._text, "no_such_attribute")
    assert tiny._text.ln_final is tiny.clip.ln_final


# --- loading and saving ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_safetensors_and_pickles(tmp_path, images):
    source = _fresh_tiny(seed=5)
    path = source.save(tmp_path / "tiny.safetensors")
    loaded = create_clip("fsosr-tiny", path)
    tokens = source.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), source.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))
    # open_clip's pickle layouts: a bare state dict, {"state_dict": ...} with DDP's module. prefix
    torch.save(source.clip.state_dict(), tmp_path / "bare.bin")
    torch.save({"state_dict": {"module." + k: v for k, v in source.clip.state_dict().items()}, "epoch": 3},
               tmp_path / "wrapped.pt")
    for name in ("bare.bin", "wrapped.pt"):
        again = create_clip("fsosr-tiny", tmp_path / name)
        with torch.no_grad():
            assert torch.equal(again.encode_image(images), source.encode_image(images))


class _FlatClip(nn.Module):
    """Holds an open_clip model's parameters under their own names, for a TorchScript archive laid out as OpenAI's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            setattr(self, name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.register_buffer("input_resolution", torch.tensor(32))  # OpenAI's archives carry these three entries
        self.register_buffer("context_length", torch.tensor(32))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_archive(tmp_path, images):
    source = build_open_clip("fsosr-tiny")
    torch.manual_seed(7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(_FlatClip(source).half(), torch.ones(2, dtype=torch.half)).save(str(path))  # OpenAI ships fp16
    assert is_torchscript_archive(path)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    assert not is_torchscript_archive(tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match="QuickGELU") as caught:
        model = create_clip("fsosr-tiny", path)
    assert not any("-quickgelu" in str(w.message) for w in caught)   # fsosr-tiny has no -quickgelu config to suggest
    assert type(model.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    # same weights (to fp16 precision) in the named architecture
    for name, p in model.clip.state_dict().items():
        torch.testing.assert_close(p, source.state_dict()[name].half().float(), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_model_saved_and_reloaded_keeps_quick_gelu(tmp_path, images):
    """An OpenAI archive under a plain name is built with QuickGELU; save() + create_clip(name, path) must give the
    same model back, not a GELU one."""
    torch.manual_seed(3)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(_FlatClip(build_open_clip("fsosr-tiny")).half(), torch.ones(2, dtype=torch.half)).save(str(path))
    with pytest.warns(UserWarning, match="QuickGELU"):
        model = create_clip("fsosr-tiny", path)
    resaved = model.save(tmp_path / "resaved.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file says QuickGELU: nothing to warn about
        reloaded = create_clip(model.name, resaved)
    assert type(reloaded.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), model.encode_image(images))
        assert torch.equal(reloaded.encode_text(tokens), model.encode_text(tokens))


def test_quickgelu_name_refuses_a_file_saved_from_a_gelu_model(tmp_path, monkeypatch):
    monkeypatch.setitem(FSOSR_CLIP_CONFIGS, "fsosr-tiny-quickgelu", dict(clip_config("fsosr-tiny"), quick_gelu=True))
    gelu_file = _fresh_tiny().save(tmp_path / "gelu.safetensors")
    with pytest.raises(CheckpointMismatchError, match="another architecture than fsosr-tiny-quickgelu"):
        create_clip("fsosr-tiny-quickgelu", gelu_file)
    quick = create_clip("fsosr-tiny-quickgelu")
    reloaded = create_clip("fsosr-tiny-quickgelu", quick.save(tmp_path / "quick.safetensors"))
    assert type(reloaded.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_state_dict_named_code_pt_is_not_torchscript(tmp_path, images):
    """torch.save names the zip's top folder after the file stem: code.pt holds code/data.pkl, not TorchScript."""
    source = _fresh_tiny(seed=4)
    torch.save(source.clip.state_dict(), tmp_path / "code.pt")
    assert not is_torchscript_archive(tmp_path / "code.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TorchScript guess would warn about QuickGELU
        loaded = create_clip("fsosr-tiny", tmp_path / "code.pt")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), source.encode_image(images))
    (tmp_path / "archive").mkdir()
    scripted = tmp_path / "archive" / "code.pt"
    torch.jit.trace(_FlatClip(source.clip), torch.ones(2)).save(str(scripted))
    assert is_torchscript_archive(scripted)


def test_missing_file_names_path_and_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CLIP fsosr-tiny.*nowhere\.safetensors"):
        create_clip("fsosr-tiny", tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="directory"):
        create_clip("fsosr-tiny", tmp_path)


def test_wrong_architecture_names_file_and_model(tmp_path):
    digits = build_open_clip("fsosr-digits")
    torch.save(digits.state_dict(), tmp_path / "digits.bin")
    with pytest.raises(CheckpointMismatchError, match=r"digits\.bin does not hold weights for CLIP fsosr-tiny.*shape"):
        create_clip("fsosr-tiny", tmp_path / "digits.bin")
    create_clip("fsosr-digits").save(tmp_path / "digits.safetensors")
    with pytest.raises(CheckpointMismatchError, match="another architecture than fsosr-tiny"):
        create_clip("fsosr-tiny", tmp_path / "digits.safetensors")
    truncated = dict(_fresh_tiny().clip.state_dict())
    truncated.pop("visual.proj")
    torch.save(truncated, tmp_path / "truncated.pt")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: visual\.proj"):
        create_clip("fsosr-tiny", tmp_path / "truncated.pt")


def test_bad_files_and_names(tmp_path):
    (tmp_path / "w.npy").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="unknown weight format"):
        create_clip("fsosr-tiny", tmp_path / "w.npy")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match="garbage.safetensors"):
        create_clip("fsosr-tiny", tmp_path / "garbage.safetensors")
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-Q-99'"):
        create_clip("ViT-Q-99")
    with pytest.raises(ValueError, match="precision"):
        create_clip("fsosr-tiny", precision="fp8")


def test_names_and_configs():
    names = list_clip_models()
    for name in ("fsosr-tiny", "fsosr-digits", "ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-B-16-quickgelu"):
        assert name in names
    assert clip_config("ViT-B-16-quickgelu").get("quick_gelu") is True
    assert clip_config("ViT-B-16")["vision_cfg"]["patch_size"] == 16


@pytest.mark.parametrize("name, reason", [
    ("ViT-L-14-CLIPA", "Hugging Face tokenizer 'bert-base-uncased'"),
    ("ViT-H-14-worldwide", "Hugging Face tokenizer 'facebook/xlm-v-base'"),
    ("ViT-B-16-SigLIP", "timm model"),
    ("RN50", "ModifiedResNet"),
    ("xlm-roberta-base-ViT-B-32", "Hugging Face model"),
    ("coca_ViT-B-32", "CoCa"),
])
def test_unsupported_configs_are_refused_before_building(name, reason):
    """fsosr tokenises with open_clip's BPE tokenizer and taps open_clip's own towers: other configs would fail
    later (CLIPA: IndexError) or silently pool the wrong token (worldwide)."""
    with pytest.raises(ValueError, match=rf"{name}: fsosr supports .*{reason}"):
        create_clip(name)
    assert name not in list_clip_models()


def test_vit_b16_architecture_builds_offline():
    """The real ViT-B/16 shape (random init): 12 blocks per tower, 768/512 widths, 197 tokens, local features."""
    model = create_clip("ViT-B-16-quickgelu")
    assert (model.num_vision_blocks, model.vision_width, model.text_width, model.embed_dim) == (12, 768, 512, 512)
    assert type(model.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with torch.no_grad():
        feats = model.image_features(torch.randn(1, 3, 224, 224), layer_cls=True, local=True)
    assert feats.layer_cls.shape == (11, 1, 768) and feats.local.shape == (1, 196, 512)


def test_bf16_precision(images):
    model = create_clip("fsosr-tiny", precision="bf16")
    assert next(model.clip.parameters()).dtype == torch.bfloat16
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.encode_image(images)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
