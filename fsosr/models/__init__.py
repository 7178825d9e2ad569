"""Backbones with the taps and adapter slots the methods need, built from local weight files only.

======================  ==========================================  =================================================
kind                    builder                                     used by
======================  ==========================================  =================================================
open_clip CLIP          :func:`create_clip` (``ViT-B-16`` …)         FSMoE, LoCoOp, MoE-Adapters4CL (taps, adapters)
timm ViT                :func:`build_vit` (``vit_base_patch16_224``)  MoSA (sparse adapters in every block)
ResNet-12               :func:`build_resnet12`                      DNPG
AlexNet conv5 features  :func:`build_alexnet_features`              DDAS
======================  ==========================================  =================================================

:func:`create_model` dispatches on the name (timm-style); :func:`list_models` lists what it accepts.
"""
from __future__ import annotations

import os

from torch import nn

from fsosr.models.alexnet import ALEXNET_FEATURE_DIM, AlexNetFeatures, build_alexnet_features
from fsosr.models.checkpoint import CheckpointMismatchError, load_state_dict_file, save_state_dict
from fsosr.models.clip import ClipBackbone, ImageFeatures, create_clip
from fsosr.models.clip_loading import FSOSR_CLIP_CONFIGS, is_open_clip_config, list_clip_models
from fsosr.models.params import count_parameters, freeze, trainable_parameters, trainable_summary, unfreeze
from fsosr.models.resnet12 import ResNet12, build_resnet12, load_resnet12_weights
from fsosr.models.vit import VIT_B16_IN21K, AdapterViT, build_vit

__all__ = ["ALEXNET_FEATURE_DIM", "AdapterViT", "AlexNetFeatures", "CheckpointMismatchError", "ClipBackbone",
           "FSOSR_CLIP_CONFIGS", "ImageFeatures", "ResNet12", "VIT_B16_IN21K", "build_alexnet_features",
           "build_resnet12", "build_vit", "count_parameters", "create_clip", "create_model", "freeze",
           "list_models", "load_resnet12_weights", "load_state_dict_file", "save_state_dict", "trainable_parameters",
           "trainable_summary", "unfreeze"]

_NON_CLIP = ("resnet12", "alexnet")


def list_models() -> list[str]:
    """Names :func:`create_model` accepts: the CLIP configs it can build, ``resnet12``, ``alexnet``; any timm ViT
    name (``vit_*``) is accepted too (see ``timm.list_models("vit_*")``)."""
    return list_clip_models() + list(_NON_CLIP)


def create_model(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a backbone by name from a local weight file (random init when ``checkpoint`` is None).

    ``vit_*`` → :func:`build_vit` (kwargs: adapter, num_classes, …); ``resnet12`` → :func:`build_resnet12`;
    ``alexnet`` → :func:`build_alexnet_features`; any CLIP name → :func:`create_clip` (kwargs: precision, device).
    A ``vit_*`` name that is also an open_clip config (``vit_medium_patch16_gap_256``) is refused: which model
    it means is ambiguous; call :func:`build_vit` or :func:`create_clip` directly.
    """
    if name.startswith("vit_"):
        if is_open_clip_config(name):  # else a CLIP name would silently give a timm classifier
            raise ValueError(f"create_model: {name!r} names both a timm ViT and an open_clip CLIP config; call "
                             f"build_vit({name!r}) for the timm ViT or create_clip({name!r}) for the CLIP")
        return build_vit(name, checkpoint, **kwargs)
    if name == "resnet12":
        return build_resnet12(checkpoint, **kwargs)
    if name == "alexnet":
        if kwargs:
            raise TypeError(f"alexnet takes no options, got {sorted(kwargs)}")
        return build_alexnet_features(checkpoint)
    return create_clip(name, checkpoint, **kwargs)
