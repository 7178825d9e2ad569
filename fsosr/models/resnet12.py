"""The RFS/TANE ResNet-12 with DropBlock: DNPG's backbone (its ``architectures/ResNetFeat.py``).

Four residual stages of widths 64-160-320-640. Each stage: three conv3×3 (no bias) + BatchNorm, LeakyReLU(0.1)
after the first two, a conv1×1 + BatchNorm shortcut added before the third LeakyReLU, then a 2×2 max-pool. After
the pool, stages 1-2 apply ordinary dropout and stages 3-4 DropBlock, both at ``drop_rate`` 0.1 and only in
training. The output is the global average of the last map: 640-d; at 84×84 input the maps are 42, 21, 10, 5.

DropBlock as RFS does it. A seed grid of size (H − bs + 1)² is drawn with Bernoulli(γ); each seed zeroes the
bs×bs block whose top-left corner it is; the kept activations are rescaled by (number of entries / number kept).
γ follows a linear ramp in the number of forward passes n the block has seen (train *and* eval passes, as the
seed counts them; the count is not saved in checkpoints, as in the seed):

    keep = max(1 − drop_rate · n / 40000, 1 − drop_rate)
    γ    = (1 − keep) / bs² · H² / (H − bs + 1)²

Block size 5 on ImageNet-like data (miniImageNet, tieredImageNet), 2 otherwise (CIFAR-FS, FC100):
:func:`dropblock_size_for`. Masks come from torch's global generator, so ``torch.manual_seed`` fixes them.

Checkpoints: parameter names follow TANE/DNPG (``layer1.conv1.weight``, ``layer1.downsample.0.weight``).
:func:`load_resnet12_weights` also accepts RFS's ``layer1.0.conv1.weight`` names, a ``{"model": ...}`` wrapper with
``module.`` prefixes, and DNPG's whole-network checkpoints (backbone under ``feature.``; the rest is dropped).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from fsosr.models.checkpoint import load_into, load_state_dict_file

__all__ = ["DROPBLOCK_RAMP_STEPS", "RESNET12_CHANNELS", "DropBlock", "ResNet12", "ResNet12Block",
           "build_resnet12", "dropblock_gamma", "dropblock_keep_mask", "dropblock_size_for", "load_resnet12_weights"]

RESNET12_CHANNELS = (64, 160, 320, 640)
# RFS ramps the drop probability over 20 × 2000 forward passes.
DROPBLOCK_RAMP_STEPS = 40_000
# Keys of classification heads that sit beside the backbone in RFS/TANE/DNPG checkpoints.
_HEAD_PREFIXES = ("classifier.", "rot_classifier.", "cls_classifier.", "fc.")


def dropblock_size_for(dataset: str) -> int:
    """DropBlock size of the seeds: 5 for ImageNet-derived few-shot sets, 2 for the CIFAR-derived ones."""
    return 5 if "imagenet" in dataset.lower() else 2


def dropblock_gamma(step: int, feat_size: int, block_size: int, drop_rate: float,
                    ramp_steps: int = DROPBLOCK_RAMP_STEPS) -> float:
    """Seed probability γ after ``step`` forward passes on a ``feat_size``² map (see the module docstring)."""
    if feat_size < block_size:
        raise ValueError(f"DropBlock: feature map {feat_size}×{feat_size} is smaller than the block size "
                         f"{block_size}; use a smaller block (dropblock_size_for) or larger images")
    keep_rate = max(1.0 - drop_rate * step / ramp_steps, 1.0 - drop_rate)
    return (1.0 - keep_rate) / block_size ** 2 * feat_size ** 2 / (feat_size - block_size + 1) ** 2


def dropblock_keep_mask(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    """seeds [B, C, H − bs + 1, W − bs + 1] of 0/1 → keep mask [B, C, H, W]: 0 on every bs×bs block whose
    top-left corner is a seed, 1 elsewhere."""
    # Output (i, j) is dropped iff a seed lies in [i − bs + 1, i] × [j − bs + 1, j]: a max over that window,
    # i.e. a stride-1 max-pool of the seeds padded by bs − 1 on every side.
    padded = F.pad(seeds, (block_size - 1,) * 4)
    return 1.0 - F.max_pool2d(padded, kernel_size=block_size, stride=1)


class DropBlock(nn.Module):
    """Structured dropout on [B, C, H, W] maps (identity in eval or when γ is 0)."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        if not self.training or gamma <= 0.0:
            return x
        batch, channels, height, width = x.shape
        seed_shape = (batch, channels, height - self.block_size + 1, width - self.block_size + 1)
        seeds = torch.bernoulli(torch.full(seed_shape, gamma, dtype=x.dtype, device=x.device))
        mask = dropblock_keep_mask(seeds, self.block_size)
        # Rescale by entries / kept entries (a tensor: no host sync). The clamp only matters when every entry
        # is dropped, where the seed would divide by zero; the output is zero either way.
        return x * mask * (mask.numel() / mask.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


class ResNet12Block(nn.Module):
    """One ResNet-12 stage: [B, C_in, H, W] → [B, planes, H // 2, W // 2]. Submodule names are TANE's."""

    def __init__(self, in_planes: int, planes: int, *, drop_rate: float, drop_block: bool, block_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.maxpool = nn.MaxPool2d(2)
        self.drop_rate, self.drop_block = drop_rate, drop_block
        self.dropblock = DropBlock(block_size)
        self.schedule_step = 0  # forward passes seen: drives the DropBlock ramp (not in the state dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.schedule_step += 1
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if self.drop_rate <= 0.0:
            return out
        if self.drop_block:
            if not self.training:  # DropBlock is the identity in eval: no γ, so no minimum map size either
                return out
            gamma = dropblock_gamma(self.schedule_step, out.shape[2], self.dropblock.block_size, self.drop_rate)
            return self.dropblock(out, gamma)
        return F.dropout(out, p=self.drop_rate, training=self.training)


class ResNet12(nn.Module):
    """RFS/TANE ResNet-12: images [B, 3, H, W] → features [B, channels[-1]] (640 by default).

    Args:
        drop_rate: dropout (stages 1-2) and DropBlock (stages 3-4) rate; 0.1 in RFS/TANE/DNPG.
        dropblock_size: 5 for ImageNet-like data, 2 otherwise (:func:`dropblock_size_for`).
        channels: stage widths; smaller ones make test models.
    """

    def __init__(self, *, drop_rate: float = 0.1, dropblock_size: int = 5, channels=RESNET12_CHANNELS):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"ResNet12: channels must list 4 stage widths, got {tuple(channels)}")
        self.channels, self.drop_rate, self.dropblock_size = tuple(channels), drop_rate, dropblock_size
        widths = (3, *channels)
        for stage in range(4):
            block = ResNet12Block(widths[stage], widths[stage + 1], drop_rate=drop_rate, drop_block=stage >= 2,
                                  block_size=dropblock_size)
            self.add_module(f"layer{stage + 1}", block)
        self.out_dim = channels[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[ResNet12Block]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def schedule_step(self) -> int:
        """Forward passes seen by the DropBlock ramp (set it when resuming a run: the seed does not save it)."""
        return self.layer4.schedule_step

    @schedule_step.setter
    def schedule_step(self, step: int) -> None:
        for stage in self.stages():
            stage.schedule_step = int(step)

    def describe(self) -> str:
        widths = "-".join(str(c) for c in self.channels)
        return f"RFS/TANE ResNet-12 (channels {widths})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in self.stages():
            x = stage(x)
        return x.mean(dim=(2, 3))  # global average pool: the seed's AvgPool2d(5) on the 5×5 map at 84×84


def build_resnet12(checkpoint: str | os.PathLike | None = None, *, dropblock_size: int = 5,
                   drop_rate: float = 0.1, channels=RESNET12_CHANNELS) -> ResNet12:
    """A ResNet12, with weights from a local RFS/TANE/DNPG checkpoint when ``checkpoint`` is given."""
    model = ResNet12(drop_rate=drop_rate, dropblock_size=dropblock_size, channels=channels)
    if checkpoint is not None:
        load_resnet12_weights(model, checkpoint)
    return model


def _to_tane_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors of an RFS/TANE/DNPG state dict under this module's names."""
    if any(key.startswith("feature.") for key in state):  # DNPG/TANE FeatureNet: backbone + classifier
        state = {key[len("feature."):]: value for key, value in state.items() if key.startswith("feature.")}
    state = {key: value for key, value in state.items() if not key.startswith(_HEAD_PREFIXES)}
    # RFS wraps each one-block stage in nn.Sequential: layer1.0.conv1 → layer1.conv1.
    return {re.sub(r"^(layer[1-4])\.0\.", r"\1.", key): value for key, value in state.items()}


def load_resnet12_weights(model: ResNet12, path: str | os.PathLike) -> ResNet12:
    """Load a local checkpoint into ``model`` (layouts in the module docstring); FileNotFoundError or
    CheckpointMismatchError naming ``path`` and the architecture otherwise."""
    expected = model.describe()
    state = _to_tane_layout(load_state_dict_file(path, expected))
    load_into(model, state, path=path, expected=expected)
    return model
