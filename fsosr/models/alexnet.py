"""DDAS's image feature: sigmoid of torchvision AlexNet's conv5 activations (MoE-Adapters4CL's ``AutoEncoder.py``).

``u = sigmoid(alexnet.features[:-2](image)).flatten(1)``. ``features[:-2]`` drops the last two modules of
torchvision's ``features`` — the ReLU after conv5 *and* the final max-pool — so the sigmoid acts on conv5's raw
(signed) output: a 224×224 image gives 256 × 13 × 13 = 43,264 values in (0, 1). DDAS feeds u to one small
autoencoder per task and picks the task whose reconstruction error is lowest.

Weights: torchvision's published ImageNet state dict (``alexnet-owt-7be5be79.pth``, keys ``features.*`` and
``classifier.*``), read from a local file; the classifier keys may be absent. The extractor is frozen and stays in
eval mode even when a parent module calls ``.train()``: DDAS never trains it.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from fsosr.models.checkpoint import load_into, load_state_dict_file

__all__ = ["ALEXNET_FEATURE_DIM", "ALEXNET_WEIGHTS_FILE", "AlexNetFeatures", "build_alexnet_features"]

ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's file name for AlexNet_Weights.IMAGENET1K_V1
ALEXNET_FEATURE_DIM = 256 * 13 * 13  # at 224×224 input


class AlexNetFeatures(nn.Module):
    """images [B, 3, H, W] (ImageNet-normalised; DDAS passes CLIP-preprocessed 224×224) → [B, 256·h·w] in (0, 1):
    43,264 values at 224×224. Frozen; always in eval mode."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "AlexNetFeatures":
        # A frozen extractor: a parent's .train() must not switch it (DDAS computes u under eval semantics).
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(images)).flatten(1)


def build_alexnet_features(checkpoint: str | os.PathLike | None = None) -> AlexNetFeatures:
    """DDAS's AlexNet feature extractor; weights from a local torchvision AlexNet state dict (random init when
    ``checkpoint`` is None, for tests). FileNotFoundError / CheckpointMismatchError name the file and model."""
    from torchvision.models import alexnet

    model = alexnet(weights=None)
    if checkpoint is not None:
        expected = f"torchvision AlexNet (ImageNet weights, {ALEXNET_WEIGHTS_FILE})"
        state = load_state_dict_file(checkpoint, expected)
        load_into(model, state, path=checkpoint, expected=expected, ignore=("classifier.",))
    # DDAS's slice, kept exactly: conv5's output before its ReLU, [B, 256, 13, 13] at 224.
    return AlexNetFeatures(model.features[:-2])
