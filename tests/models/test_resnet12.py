"""fsosr.models.resnet12: RFS/TANE ResNet-12 with DropBlock, and its checkpoint layouts."""
import re

import pytest
import torch

from fsosr.models.checkpoint import CheckpointMismatchError
from fsosr.models.resnet12 import (DROPBLOCK_RAMP_STEPS, DropBlock, ResNet12, build_resnet12, dropblock_gamma,
                                   dropblock_keep_mask, dropblock_size_for)

SMALL = (4, 6, 8, 10)  # stage widths of the fast test models


def small_resnet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ResNet12(channels=SMALL, **kwargs)


@pytest.fixture
def images():
    return torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))


def test_full_width_gives_640_features_at_84(images):
    model = build_resnet12().eval()
    with torch.no_grad():
        features = model(images)
    assert features.shape == (2, 640) and model.out_dim == 640
    assert torch.isfinite(features).all() and features.abs().sum() > 0
    # per stage (in, p): 9·in·p + 2·9·p² convs, in·p shortcut, 4 BatchNorms of 2p: 12.4 M in all, as RFS reports
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and sum(p.numel() for p in model.parameters()) == 12_424_320


def test_stage_structure_by_hand(images):
    """Stage 1 written out from the description: 3×(conv-BN-LeakyReLU 0.1) with the shortcut added before the
    last activation, then 2×2 max-pool."""
    model = small_resnet(drop_rate=0.0).eval()
    stage = model.layer1
    lrelu = lambda t: torch.where(t > 0, t, 0.1 * t)  # noqa: E731
    with torch.no_grad():
        out = lrelu(stage.bn1(stage.conv1(images)))
        out = lrelu(stage.bn2(stage.conv2(out)))
        out = lrelu(stage.bn3(stage.conv3(out)) + stage.downsample(images))
        expected = torch.nn.functional.max_pool2d(out, 2)
        assert torch.allclose(stage(images), expected, atol=1e-6)
        maps = [images]
        for s in model.stages():
            maps.append(s(maps[-1]))
    assert [m.shape[-1] for m in maps[1:]] == [42, 21, 10, 5]
    assert torch.allclose(model(images), maps[-1].mean(dim=(2, 3)), atol=1e-6)


def test_small_images_run_in_eval_and_fail_clearly_in_training():
    """32×32 images give 4×4 stage-3 maps, smaller than DropBlock's default block 5: fine in eval (DropBlock does
    nothing there), an error naming the sizes in training."""
    small_images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = small_resnet(seed=4).eval()
    plain = small_resnet(seed=4, drop_rate=0.0).eval()  # same weights, no dropout of any kind
    with torch.no_grad():
        assert torch.equal(model(small_images), plain(small_images))
    with pytest.raises(ValueError, match="feature map 4×4 is smaller than the block size 5"):
        model.train()(small_images)


def test_dropblock_size_and_gamma_schedule():
    assert dropblock_size_for("miniImageNet") == 5 and dropblock_size_for("tieredImageNet") == 5
    assert dropblock_size_for("CIFAR-FS") == 2 and dropblock_size_for("FC100") == 2
    # after the ramp: keep = 0.9, γ = 0.1 / 25 · 25 / 1 on a 5×5 map with 5×5 blocks
    assert dropblock_gamma(DROPBLOCK_RAMP_STEPS, 5, 5, 0.1) == pytest.approx(0.1)
    assert dropblock_gamma(10 * DROPBLOCK_RAMP_STEPS, 5, 5, 0.1) == pytest.approx(0.1)
    # half way on a 10×10 map: keep = 0.95, γ = 0.05 / 25 · 100 / 36
    assert dropblock_gamma(DROPBLOCK_RAMP_STEPS // 2, 10, 5, 0.1) == pytest.approx(0.05 / 25 * 100 / 36)
    with pytest.raises(ValueError, match="smaller than the block size"):
        dropblock_gamma(1, 4, 5, 0.1)


def loop_keep_mask(seeds, block_size):
    """Oracle: zero the block_size² square starting at every seed, one seed at a time."""
    batch, channels, h, w = seeds.shape
    mask = torch.ones(batch, channels, h + block_size - 1, w + block_size - 1)
    for b, c, i, j in seeds.nonzero().tolist():
        mask[b, c, i:i + block_size, j:j + block_size] = 0
    return mask


@pytest.mark.parametrize("block_size", [1, 2, 5])
def test_keep_mask_matches_the_loop(block_size):
    seeds = (torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(block_size)) < 0.15).float()
    assert torch.equal(dropblock_keep_mask(seeds, block_size), loop_keep_mask(seeds, block_size))


def test_dropblock_training_only_rescaled_and_seeded():
    x = torch.rand(4, 3, 10, 10) + 0.5
    block = DropBlock(block_size=5)
    assert block.eval()(x, gamma=0.3) is x
    block.train()
    torch.manual_seed(11)
    first = block(x, gamma=0.05)
    torch.manual_seed(11)
    assert torch.equal(block(x, gamma=0.05), first)
    kept = first != 0
    assert 0 < kept.sum() < x.numel()
    scale = x.numel() / kept.sum()
    assert torch.allclose(first[kept], x[kept] * scale)
    assert not torch.equal(block(x, gamma=0.05), first)  # a new draw without reseeding


def test_model_dropout_only_in_training(images):
    model = small_resnet()
    plain = ResNet12(channels=SMALL, drop_rate=0.0)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
        model.train(), plain.train()
        model.schedule_step = DROPBLOCK_RAMP_STEPS  # full strength
        torch.manual_seed(5)
        dropped = model(images)
        torch.manual_seed(5)
        again = model(images)
        assert torch.equal(dropped, again)
        assert not torch.allclose(dropped, plain(images), atol=1e-4)


def test_schedule_counts_every_forward(images):
    model = small_resnet().eval()
    with torch.no_grad():
        for _ in range(3):
            model(images[:1])
    assert model.schedule_step == 3 and all(stage.schedule_step == 3 for stage in model.stages())


def rfs_checkpoint(model):
    """RFS's save format: {'model': DataParallel state dict}, one-block stages as nn.Sequential, a classifier."""
    state = {"module." + re.sub(r"^(layer\d)\.", r"\1.0.", k): v for k, v in model.state_dict().items()}
    state["module.classifier.weight"] = torch.zeros(64, model.out_dim)
    return {"model": state, "epoch": torch.tensor(90)}


def dnpg_checkpoint(model):
    """DNPG's FeatureNet: the backbone under 'feature.' beside the classifier's parameters."""
    state = {f"feature.{k}": v for k, v in model.state_dict().items()}
    state["cls_classifier.weight_base"] = torch.zeros(64, model.out_dim)
    return state


@pytest.mark.parametrize("layout", [lambda m: m.state_dict(), rfs_checkpoint, dnpg_checkpoint],
                         ids=["tane", "rfs", "dnpg"])
def test_checkpoint_round_trip(tmp_path, images, layout):
    source = small_resnet(seed=1).eval()
    with torch.no_grad():  # non-trivial running statistics, so the buffers are checked too
        source.layer2.bn1.running_mean.uniform_()
    path = tmp_path / "resnet12.pth"
    torch.save(layout(source), path)
    loaded = build_resnet12(path, channels=SMALL).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))


def test_missing_checkpoint_names_path_and_model(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_resnet12(tmp_path / "max_acc.pth")
    assert str(tmp_path / "max_acc.pth") in str(info.value) and "ResNet-12" in str(info.value)


def test_wrong_architecture_is_a_mismatch_naming_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(small_resnet().state_dict(), path)  # widths 4-6-8-10 into a 64-160-320-640 model
    with pytest.raises(CheckpointMismatchError) as info:
        build_resnet12(path)
    assert str(path) in str(info.value) and "shape mismatch" in str(info.value)
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        build_resnet12(path, channels=SMALL)
