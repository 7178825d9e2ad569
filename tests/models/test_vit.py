"""fsosr.models.vit: timm ViT with MoSA adapters, on tiny random-init models and fixture files written here."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fsosr.models.checkpoint import CheckpointMismatchError, save_state_dict
from fsosr.models.params import count_parameters, trainable_parameters
from fsosr.models.vit import TINY_VIT_KWARGS, AdapterViT, build_vit

NAME = "vit_tiny_patch16_224"
CLASSES = 5
PLACEMENT_NAMES = ("adaptformer", "pfeiffer", "houlsby")


def tiny_timm(seed=0, **overrides):
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, num_classes=CLASSES, **dict(TINY_VIT_KWARGS, **overrides)).eval()


def tiny_adapter(placement, **overrides):
    return dict(placement=placement, bottleneck=4, num_experts=3, **overrides)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def timm_file(tmp_path):
    """A tiny timm ViT and its state dict written as a .safetensors file (timm's published layout)."""
    reference = tiny_timm()
    return reference, save_state_dict(reference.state_dict(), tmp_path / "tiny_vit.safetensors")


def randomize_adapters(model: AdapterViT, seed=2):
    """Non-zero adapter weights (the up-projections start at zero), so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters():
            for param in adapter.parameters():
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def test_without_adapters_matches_timm(timm_file, images):
    reference, path = timm_file
    model = build_vit(NAME, path, num_classes=CLASSES, **TINY_VIT_KWARGS).eval()
    assert model.adapters() == []
    assert torch.equal(model(images), reference(images))
    assert torch.equal(model.forward_features(images), reference.forward_features(images))
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.equal(pooled, reference.forward_features(images)[:, 0])  # token pooling: the CLS token


@pytest.mark.parametrize("placement", PLACEMENT_NAMES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_init_adapters_leave_outputs_unchanged(timm_file, images, placement, mode):
    reference, path = timm_file
    model = build_vit(NAME, path, adapter=tiny_adapter(placement), num_classes=CLASSES, **TINY_VIT_KWARGS)
    assert len(model.adapters()) == 2 * (2 if placement == "houlsby" else 1)
    model.train(mode == "train")
    assert torch.equal(model(images), reference(images))
    randomize_adapters(model)
    assert not torch.allclose(model(images), reference(images), atol=1e-3)  # the adapters are in the path


def test_layer_scale_blocks_keep_their_scales(tmp_path, images):
    """A ViT with LayerScale (ls1/ls2 not Identity): the adapter block must still apply them."""
    reference = tiny_timm(init_values=0.3)
    path = save_state_dict(reference.state_dict(), tmp_path / "layer_scale.safetensors")
    model = build_vit(NAME, path, adapter=tiny_adapter("houlsby"), num_classes=CLASSES, init_values=0.3,
                      **TINY_VIT_KWARGS).eval()
    assert torch.equal(model(images), reference(images))


def manual_block(block, adapters, placement, x):
    """One block written out from MoSA's ``MoSABlock`` with the timm block's weights (merged adapters, eval)."""
    h = x + block.attn(block.norm1(x))
    if placement == "adaptformer":
        return h + block.mlp(block.norm2(h)) + adapters[0](h)
    if placement == "pfeiffer":
        z = block.mlp(block.norm2(h))
        return h + z + adapters[0](z)
    h = h + adapters[0](h)
    h = h + block.mlp(block.norm2(h))
    return h + adapters[1](h)


@pytest.mark.parametrize("placement", PLACEMENT_NAMES)
def test_adapted_forward_matches_the_published_formula(images, placement):
    model = build_vit(NAME, adapter=tiny_adapter(placement), num_classes=CLASSES, **TINY_VIT_KWARGS).eval()
    randomize_adapters(model)
    vit = model.vit
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for block in vit.blocks:
            x = manual_block(block, block.adapters, placement, x)
        expected = vit.head(vit.norm(x)[:, 0])
        assert torch.allclose(model(images), expected, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_head_are_trainable(images):
    model = build_vit(NAME, adapter=tiny_adapter("adaptformer"), num_classes=CLASSES, **TINY_VIT_KWARGS).train()
    names = [name for name, _ in trainable_parameters(model)]
    assert names and all(".adapters." in n or n.startswith("vit.head.") for n in names)
    adapter_count = sum(p.numel() for a in model.adapters() for p in a.parameters())
    head_count = CLASSES * 32 + CLASSES
    assert count_parameters(model) == adapter_count + head_count
    # adaptformer, split up, d 32, r 4, N 3: LN 64 + dense down 32*4+4 + up w_own 4*32 + biases 3*32, per block
    assert adapter_count == 2 * (64 + 132 + 128 + 96)

    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    up = model.adapters()[0].up
    assert up.w_own.grad.abs().sum() > 0 and model.vit.head.weight.grad.abs().sum() > 0


def test_freeze_backbone_false_trains_everything():
    model = build_vit(NAME, adapter=tiny_adapter("pfeiffer"), num_classes=CLASSES, freeze_backbone=False,
                      **TINY_VIT_KWARGS)
    assert count_parameters(model) == count_parameters(model, trainable_only=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_round_trip_keeps_adapters(tmp_path, images, suffix):
    config = tiny_adapter("houlsby", split="both")
    model = build_vit(NAME, adapter=config, num_classes=CLASSES, **TINY_VIT_KWARGS)
    randomize_adapters(model)
    path = model.save(tmp_path / f"mosa{suffix}")
    loaded = build_vit(NAME, path, adapter=config, num_classes=CLASSES, **TINY_VIT_KWARGS)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    assert torch.equal(model.eval()(images), loaded.eval()(images))


def test_wrapper_state_dict_loads_too(tmp_path, images):
    model = build_vit(NAME, adapter=tiny_adapter("adaptformer"), num_classes=CLASSES, **TINY_VIT_KWARGS).eval()
    randomize_adapters(model)
    path = save_state_dict(model.state_dict(), tmp_path / "wrapper.pth")  # keys start with "vit."
    loaded = build_vit(NAME, path, adapter=tiny_adapter("adaptformer"), num_classes=CLASSES, **TINY_VIT_KWARGS)
    assert torch.equal(loaded.eval()(images), model(images))


def test_another_head_size_keeps_the_new_head_and_loads_the_body(timm_file):
    reference, path = timm_file
    model = build_vit(NAME, path, num_classes=3, **TINY_VIT_KWARGS)
    assert model.vit.head.weight.shape == (3, 32)
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight)


def write_google_npz(vit, path):
    """A timm ViT in the original Google ViT .npz layout (the format of ViT-B_16.npz): kernels in JAX order
    (conv HWIO, dense [in, out], attention [d, heads, head_dim])."""
    heads = vit.blocks[0].attn.num_heads
    d = vit.embed_dim
    t = lambda p: p.detach().numpy()  # noqa: E731
    arrays = {
        "embedding/kernel": t(vit.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": t(vit.patch_embed.proj.bias), "cls": t(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": t(vit.pos_embed),
        "Transformer/encoder_norm/scale": t(vit.norm.weight), "Transformer/encoder_norm/bias": t(vit.norm.bias),
        "head/kernel": t(vit.head.weight.t()), "head/bias": t(vit.head.bias),
    }
    for i, block in enumerate(vit.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        attention = prefix + "MultiHeadDotProductAttention_1/"
        for j, part in enumerate(("query", "key", "value")):
            weight = block.attn.qkv.weight[j * d:(j + 1) * d]            # [out d, in d]
            arrays[attention + f"{part}/kernel"] = t(weight.t().reshape(d, heads, d // heads))
            arrays[attention + f"{part}/bias"] = t(block.attn.qkv.bias[j * d:(j + 1) * d].reshape(heads, -1))
        arrays[attention + "out/kernel"] = t(block.attn.proj.weight.t().reshape(heads, d // heads, d))
        arrays[attention + "out/bias"] = t(block.attn.proj.bias)
        for norm, name in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            arrays[prefix + f"{name}/scale"], arrays[prefix + f"{name}/bias"] = t(norm.weight), t(norm.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[prefix + f"MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight.t())
            arrays[prefix + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("adapter", [None, tiny_adapter("adaptformer")])
def test_google_npz_loads_through_timm(tmp_path, images, adapter):
    reference = tiny_timm(seed=3)
    path = write_google_npz(reference, tmp_path / "ViT-tiny.npz")
    model = build_vit(NAME, path, adapter=adapter, num_classes=CLASSES, **TINY_VIT_KWARGS).eval()
    assert torch.allclose(model(images), reference(images), atol=1e-6, rtol=1e-6)
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_missing_file_names_path_and_model(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-B_16.npz"
    with pytest.raises(FileNotFoundError) as info:
        build_vit(NAME, missing, num_classes=CLASSES, **TINY_VIT_KWARGS)
    assert str(missing) in str(info.value) and NAME in str(info.value)


def test_wrong_architecture_raises_mismatch_naming_the_file(tmp_path):
    wider = save_state_dict(tiny_timm(embed_dim=48, num_heads=3).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        build_vit(NAME, wider, num_classes=CLASSES, **TINY_VIT_KWARGS)
    assert str(wider) in str(info.value) and "shape mismatch" in str(info.value)


def test_adapter_checkpoint_into_a_model_without_adapters_is_a_mismatch(tmp_path):
    model = build_vit(NAME, adapter=tiny_adapter("pfeiffer"), num_classes=CLASSES, **TINY_VIT_KWARGS)
    path = model.save(tmp_path / "mosa.safetensors")
    with pytest.raises(CheckpointMismatchError, match="unexpected: blocks.0.adapters"):
        build_vit(NAME, path, num_classes=CLASSES, **TINY_VIT_KWARGS)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
@pytest.mark.parametrize("model_patch", [4, 16])
def test_file_of_another_patch_size_raises_mismatch(tmp_path, suffix, model_patch):
    """timm would resample the 8×8 patch kernel to the model's size: ViT-B/32 weights into a ViT-B/16."""
    reference = tiny_timm()  # patch 8
    path = tmp_path / f"patch8{suffix}"
    if suffix == ".npz":
        write_google_npz(reference, path)
    else:
        save_state_dict(reference.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_vit(NAME, path, num_classes=CLASSES, **dict(TINY_VIT_KWARGS, patch_size=model_patch))
    message = str(info.value)
    assert str(path) in message and f"patch size 8×8 in the file vs {model_patch}×{model_patch} in the model" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_another_image_size_still_resamples_position_embeddings(tmp_path, suffix):
    reference = tiny_timm()  # 32×32 images, patch 8: 4×4 grid
    path = tmp_path / f"img32{suffix}"
    if suffix == ".npz":
        write_google_npz(reference, path)
    else:
        save_state_dict(reference.state_dict(), path)
    model = build_vit(NAME, path, num_classes=CLASSES, **dict(TINY_VIT_KWARGS, img_size=48))  # 6×6 grid
    assert model.vit.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(model.vit.patch_embed.proj.weight, reference.patch_embed.proj.weight)


def test_npz_of_another_depth_raises_mismatch(tmp_path):
    path = write_google_npz(tiny_timm(depth=3), tmp_path / "deep.npz")
    with pytest.raises(CheckpointMismatchError) as info:
        build_vit(NAME, path, num_classes=CLASSES, **TINY_VIT_KWARGS)
    assert str(path) in str(info.value) and "3 blocks vs model 2" in str(info.value)


def test_unknown_name_and_bad_adapter_arguments():
    with pytest.raises(ValueError, match="not_a_vit"):
        build_vit("not_a_vit", **TINY_VIT_KWARGS)
    with pytest.raises(ValueError, match="placement"):
        build_vit(NAME, adapter={"placement": "lora"}, **TINY_VIT_KWARGS)
    with pytest.raises(TypeError, match="bad adapter argument"):
        build_vit(NAME, adapter={"bottlenek": 4}, **TINY_VIT_KWARGS)


def test_seeded_generator_repeats_the_expert_draws(images):
    model = build_vit(NAME, adapter=tiny_adapter("houlsby", split="both"), num_classes=CLASSES,
                      **TINY_VIT_KWARGS).train()
    randomize_adapters(model)
    runs = []
    for _ in range(2):
        model.set_generator(torch.Generator().manual_seed(7))
        outputs, draws = [], []
        for _ in range(3):
            outputs.append(model(images))
            draws.append([tuple(a.selected_experts().values()) for a in model.adapters()])
        runs.append((outputs, draws))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    all_draws = [d for step in runs[0][1] for d in step]
    assert len(set(all_draws)) > 1  # the experts do change between adapters/steps
    model.eval()(images)  # eval uses the merged adapters: no draws
    assert all(a.selected_experts() == {"down": None, "up": None} for a in model.adapters())
