"""timm Vision Transformers with MoSA's sparse adapters (Zhang et al. 2023), from local weights only.

MoSA fine-tunes the supervised ImageNet-21k ViT-B/16 (:data:`VIT_B16_IN21K`) with one :class:`SparseAdapter` per
block (two for Houlsby) and a new linear head; everything else is frozen.

The adapters do not re-implement timm's block: :class:`AdapterBlock` keeps the timm ``Block``'s own submodules
(``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``) under the same names and only changes the order
in which they are combined, through :func:`fsosr.nn.sparse_adapter.block_forward`. State-dict keys therefore stay
timm's (``blocks.3.attn.qkv.weight``) plus ``blocks.3.adapters.0.*``, so a timm checkpoint loads as it is and a
model saved with :meth:`AdapterViT.save` is a timm checkpoint with extra adapter keys.

Weights: ``.safetensors`` / ``.pth`` / ``.bin`` (timm's state-dict layout, through :mod:`fsosr.models.checkpoint`
and timm's ``checkpoint_filter_fn``, which resamples position embeddings to another image size) or the original
Google ``.npz`` (``ViT-B_16.npz``, read by timm's own ``load_pretrained``, which needs no network). A head whose
shape differs from the file's (another number of classes) keeps its fresh initialisation, as in any fine-tuning.
timm would also resample a patch-embedding kernel of another size (ViT-B/32 weights into a ViT-B/16), so the
patch size is checked before either loader runs: a file for another patch size is a CheckpointMismatchError.

Tiny test model: ``build_vit("vit_tiny_patch16_224", **TINY_VIT_KWARGS, num_classes=5)``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fsosr.models.checkpoint import (CheckpointMismatchError, load_into, load_state_dict_file, require_file,
                                     save_state_dict)
from fsosr.models.params import freeze
from fsosr.nn.sparse_adapter import PLACEMENTS, SparseAdapter, block_forward

__all__ = ["TINY_VIT_KWARGS", "VIT_B16_IN21K", "AdapterBlock", "AdapterViT", "build_vit"]

# MoSA's backbone: Google's supervised IN-21k ViT-B/16 (timm's name for the same weights; the old name
# "vit_base_patch16_224_in21k" is mapped to it by timm).
VIT_B16_IN21K = "vit_base_patch16_224.augreg_in21k"

# A ViT small enough for CPU tests (32k parameters, 17 tokens): pass to build_vit with any ViT name.
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class AdapterBlock(nn.Module):
    """A timm pre-norm ``Block`` with MoSA adapters placed by ``placement`` (see ``fsosr.nn.PLACEMENTS``).

    Holds the block's submodules (not copies) under their timm names and ``adapters`` (a ModuleList of
    ``PLACEMENTS[placement].adapters_per_block`` SparseAdapters). Forward ``x [B, L, d] → [B, L, d]``.
    """

    def __init__(self, block: nn.Module, placement: str, adapters):
        super().__init__()
        missing = [name for name in _BLOCK_PARTS if not hasattr(block, name)]
        if missing:
            raise TypeError(f"AdapterBlock needs a timm pre-norm Block; {type(block).__name__} has no "
                            f"{', '.join(missing)}")
        for name in _BLOCK_PARTS:
            setattr(self, name, getattr(block, name))
        self.placement = placement
        self.adapters = nn.ModuleList(adapters)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # Pass mask arguments only when given: older timm Attention modules take x alone.
        mask_args = {} if attn_mask is None and not is_causal else {"attn_mask": attn_mask, "is_causal": is_causal}

        def attn_branch(y):
            return self.drop_path1(self.ls1(self.attn(y, **mask_args)))

        def mlp_branch(y):
            return self.drop_path2(self.ls2(self.mlp(y)))

        return block_forward(self.placement, x, attn=attn_branch, norm1=self.norm1, mlp=mlp_branch,
                             norm2=self.norm2, adapters=self.adapters)


class AdapterViT(nn.Module):
    """A timm ``VisionTransformer`` (``self.vit``) whose blocks may carry MoSA adapters.

    Forward ``images [B, 3, H, W] → logits [B, num_classes]`` (timm's ``forward``; with ``num_classes=0`` the
    pooled feature [B, d]). In ``eval()`` every adapter uses its merged (mean-of-experts) weights.
    """

    def __init__(self, vit: nn.Module, name: str, adapter_config: Mapping | None = None):
        super().__init__()
        self.vit = vit
        self.name = name
        self.adapter_config = dict(adapter_config) if adapter_config is not None else None

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def describe(self) -> str:
        """What this model is, for error messages and logs."""
        text = f"timm {self.name} (embed_dim {self.embed_dim}, depth {len(self.vit.blocks)}, " \
               f"{self.num_classes} classes"
        if self.adapter_config is not None:
            text += f", {self.adapter_config['placement']} adapters"
        return text + ")"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] → normalised tokens [B, prefix + patches, d] (timm's ``forward_features``)."""
        return self.vit.forward_features(images)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, L, d] → logits [B, num_classes], or the pooled feature [B, d] with ``pre_logits``."""
        return self.vit.forward_head(tokens, pre_logits=pre_logits)

    def named_adapters(self) -> list[tuple[str, SparseAdapter]]:
        """``(name, adapter)`` in block order (Houlsby: the attention-side adapter first), names as in the
        state dict without the ``vit.`` prefix, e.g. ``blocks.0.adapters.0``."""
        return [(name, module) for name, module in self.vit.named_modules() if isinstance(module, SparseAdapter)]

    def adapters(self) -> list[SparseAdapter]:
        """The SparseAdapters in block order (empty without adapters)."""
        return [adapter for _, adapter in self.named_adapters()]

    def set_generator(self, generator: torch.Generator | None) -> None:
        """One generator for every adapter's per-forward expert draws; they draw in block order, so a seeded
        generator gives the same experts on every run."""
        for adapter in self.adapters():
            adapter.set_generator(generator)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the timm-layout state dict (adapters included) atomically; reload with ``build_vit(name, path,
        adapter=<same config>)``."""
        metadata = {"fsosr_model": self.name, "adapter": json.dumps(self.adapter_config)}
        return save_state_dict(self.vit.state_dict(), path, metadata=metadata)


def build_vit(name: str = VIT_B16_IN21K, checkpoint: str | os.PathLike | None = None, *,
              adapter: Mapping | None = None, num_classes: int | None = None, freeze_backbone: bool = True,
              **timm_kwargs) -> AdapterViT:
    """A timm ViT built with ``pretrained=False``, optionally with MoSA adapters, weights from ``checkpoint``.

    Args:
        name: a timm model name (``vit_base_patch16_224.augreg_in21k``; tests: any ViT + :data:`TINY_VIT_KWARGS`).
        checkpoint: a local ``.safetensors``/``.pth``/``.bin``/``.npz`` file, or None (random init).
        adapter: None, or SparseAdapter arguments with ``placement`` (default ``adaptformer``), e.g.
            ``dict(placement="adaptformer", bottleneck=64, num_experts=4, split="up")``. ``partition_seed``
            (default 3407) is offset by the adapter's index so every adapter gets its own owner map.
        num_classes: classes of the new head (None: timm's default for ``name``; 0: no head).
        freeze_backbone: freeze everything except the adapters and the head (MoSA); False trains all.
        timm_kwargs: passed to ``timm.create_model`` (img_size, drop_path_rate, embed_dim, ...).
    """
    vit = _create_timm_vit(name, num_classes, timm_kwargs)
    config = None
    if adapter is not None:
        config = _adapter_config(adapter)
        _insert_adapters(vit, config)
    model = AdapterViT(vit, name, config)
    if checkpoint is not None:
        _load_vit_weights(model, checkpoint)
    if freeze_backbone:
        freeze(vit)
        for adapter_module in model.adapters():
            adapter_module.requires_grad_(True)
        vit.get_classifier().requires_grad_(True)
    return model


def _create_timm_vit(name: str, num_classes: int | None, timm_kwargs: dict) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if num_classes is not None:
        timm_kwargs = dict(timm_kwargs, num_classes=num_classes)
    try:
        vit = timm.create_model(name, pretrained=False, **timm_kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"build_vit: {exc}; see timm.list_models('vit_*')") from exc
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"build_vit: {name} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def _adapter_config(adapter: Mapping) -> dict:
    if not isinstance(adapter, Mapping):
        raise TypeError(f"build_vit: adapter must be None or a dict of SparseAdapter arguments, got "
                        f"{type(adapter).__name__}")
    config = {"placement": "adaptformer", "partition_seed": 3407, **adapter}
    if config["placement"] not in PLACEMENTS:
        raise ValueError(f"build_vit: adapter placement must be one of {tuple(PLACEMENTS)}, "
                         f"got {config['placement']!r}")
    if "width" in config:
        raise ValueError("build_vit: adapter width is the ViT's embed_dim; do not pass it")
    return config


def _insert_adapters(vit: nn.Module, config: dict) -> None:
    """Replace every block of ``vit`` by an AdapterBlock around it (same submodules, new adapters)."""
    per_block = PLACEMENTS[config["placement"]].adapters_per_block
    base_seed = config["partition_seed"]
    index = 0
    for i, block in enumerate(vit.blocks):
        adapters = []
        for _ in range(per_block):
            arguments = dict(config, partition_seed=base_seed + index)
            try:
                adapters.append(SparseAdapter(vit.embed_dim, **arguments))
            except TypeError as exc:
                raise TypeError(f"build_vit: bad adapter argument ({exc})") from exc
            index += 1
        vit.blocks[i] = AdapterBlock(block, config["placement"], adapters)


def _load_vit_weights(model: AdapterViT, path: str | os.PathLike) -> None:
    expected = model.describe()
    path = require_file(path, expected)
    if path.suffix == ".npz":
        _load_google_npz(model, path, expected)
        return
    state = load_state_dict_file(path, expected)
    if state and all(key.startswith("vit.") for key in state):  # AdapterViT.state_dict() rather than save()
        state = {key[len("vit."):]: value for key, value in state.items()}
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.dim() == 4:  # [d, 3, ph, pw]; older linear layouts are timm's to convert
        _check_patch_size(model, tuple(kernel.shape[2:]), path, expected)
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:  # timm's own conversions: pos-embed resampling for another image size, old patch-embed layouts
        state = checkpoint_filter_fn(state, model.vit)
    except Exception as exc:
        raise CheckpointMismatchError(f"{path} does not hold weights for {expected}: timm could not convert "
                                      f"it ({type(exc).__name__}: {exc})") from exc
    ignore = []
    if not any(".adapters." in key for key in state):  # a plain timm checkpoint: adapters keep their init
        ignore += [f"{name}." for name, _ in model.named_adapters()]
    model_head = {k: v.shape for k, v in model.vit.get_classifier().state_dict().items()}
    file_head = {k[len("head."):]: v.shape for k, v in state.items() if k.startswith("head.")}
    if file_head != model_head:  # another number of classes (or no head): the new head keeps its init
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        ignore.append("head.")
    load_into(model.vit, state, path=path, expected=expected, ignore=ignore)


def _check_patch_size(model: AdapterViT, file_kernel: tuple[int, ...], path: Path, expected: str) -> None:
    """CheckpointMismatchError when the file's patch-embedding kernel differs from the model's: timm would resample
    it, silently turning e.g. ViT-B/32 weights into a ViT-B/16 that was never trained."""
    model_kernel = tuple(model.vit.patch_embed.proj.weight.shape[2:])
    if tuple(file_kernel) != model_kernel:
        raise CheckpointMismatchError(
            f"{path} does not hold weights for {expected}: patch size {'×'.join(map(str, file_kernel))} in the file "
            f"vs {'×'.join(map(str, model_kernel))} in the model (another ViT variant)")


def _load_google_npz(model: AdapterViT, path: Path, expected: str) -> None:
    """Google's original ViT ``.npz`` through timm's ``load_pretrained`` (numpy only, no network).

    timm skips blocks beyond the model's depth and resamples position embeddings and the patch kernel silently,
    so the depth, width and patch size are checked here first.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            # kernel in JAX's HWIO layout: [ph, pw, 3, d]
            kernel_shape = archive["embedding/kernel"].shape if "embedding/kernel" in keys else None
    except (OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path}: not a readable .npz archive for {expected} ({exc})") from exc
    width = kernel_shape[-1] if kernel_shape is not None else None
    depth = len({key.split("/")[1] for key in keys if key.startswith("Transformer/encoderblock_")})
    problems = []
    if width is None:
        problems.append("no 'embedding/kernel' (not a Google ViT checkpoint)")
    elif width != model.embed_dim:
        problems.append(f"width {width} vs model {model.embed_dim}")
    if width is not None and depth and depth != len(model.vit.blocks):  # depth 0: big_vision's stacked layout
        problems.append(f"{depth} blocks vs model {len(model.vit.blocks)}")
    if problems:
        raise CheckpointMismatchError(f"{path} does not hold weights for {expected}: " + "; ".join(problems))
    if len(kernel_shape) == 4:
        _check_patch_size(model, kernel_shape[:2], path, expected)
    try:
        model.vit.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path} does not hold weights for {expected}: {exc}") from exc
