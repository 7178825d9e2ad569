"""Building open_clip CLIP models by name from local weight files (never the network).

Names are open_clip's (``ViT-B-16``, ``ViT-B-32``, ``ViT-L-14``, and ``ViT-B-16-quickgelu`` etc. for OpenAI
weights, which were trained with QuickGELU) plus fsosr's own small configs in :data:`FSOSR_CLIP_CONFIGS` (tiny
random-init models for tests, and the embedded digits CLIP).

Accepted checkpoints:

- an open_clip state dict: ``.safetensors``, or a torch pickle (``.bin``/``.pt``/``.pth``) as open_clip publishes;
- an OpenAI TorchScript archive (``ViT-B-16.pt`` from OpenAI's CLIP release), its weights read as
  ``open_clip.load_openai_model`` reads them but loaded into the named architecture (see
  :func:`_torchscript_state_dict`). OpenAI's models use QuickGELU; a name without ``-quickgelu`` is built with it
  anyway (with a warning), because the other activation silently changes every feature; :func:`save_open_clip`
  records the activation, so such a model saved and reloaded under the same name keeps QuickGELU.

The loaded weights are checked key by key and shape by shape against the named architecture; a file for another
model raises :class:`~fsosr.models.checkpoint.CheckpointMismatchError` naming the file and the expected model.

Only configs with open_clip's own ViT image tower and text transformer, tokenised by open_clip's BPE tokenizer, are
supported (:func:`unsupported_clip_reason`): fsosr's taps and adapter slots reach into those modules.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from fsosr.models.checkpoint import (CheckpointMismatchError, load_into, load_state_dict_file, require_file,
                                     save_state_dict)

__all__ = ["FSOSR_CLIP_CONFIGS", "build_open_clip", "clip_config", "is_open_clip_config", "is_torchscript_archive",
           "list_clip_models", "save_open_clip", "unsupported_clip_reason"]

# Small configs in open_clip's config format. Token embeddings (49,408 × text width) dominate their size.
FSOSR_CLIP_CONFIGS: dict[str, dict] = {
    # For tests: random init, builds and runs in well under a second on a CPU.
    "fsosr-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    # The embedded digits CLIP (fsosr.models.tiny_clip): ~3.6M parameters, 32×32 images, patch 4.
    "fsosr-digits": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
_METADATA_KEY = "fsosr_clip_config"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # a declared dependency, but give the fix rather than a bare ImportError
        raise ImportError("fsosr.models needs open_clip: pip install 'open_clip_torch>=3.3'") from exc
    return open_clip


def unsupported_clip_reason(config: dict) -> str | None:
    """Why fsosr cannot build the open_clip ``config``, or None when it can."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "timm_model_name" in vision:
        return "its image tower is a timm model, not open_clip's VisionTransformer"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is a ModifiedResNet, not open_clip's VisionTransformer"
    if "hf_model_name" in text:
        return "its text tower is a Hugging Face model, not open_clip's text transformer"
    if "hf_tokenizer_name" in text:
        # ClipBackbone tokenises with open_clip's BPE SimpleTokenizer: another vocabulary gives wrong token ids
        return f"it needs the Hugging Face tokenizer {text['hf_tokenizer_name']!r}, not open_clip's BPE tokenizer"
    if "multimodal_cfg" in config:
        return "it is a CoCa model (text tower with a class token and a caption decoder)"
    return None


def list_clip_models() -> list[str]:
    """Every name :func:`build_open_clip` can build: fsosr's configs, then open_clip's supported ones."""
    open_clip = _open_clip()
    supported = [name for name in open_clip.list_models()
                 if unsupported_clip_reason(open_clip.get_model_config(name)) is None]
    return sorted(FSOSR_CLIP_CONFIGS) + supported


def is_open_clip_config(name: str) -> bool:
    """True when ``name`` is one of fsosr's or open_clip's CLIP configs, supported or not."""
    return name in FSOSR_CLIP_CONFIGS or _open_clip().get_model_config(name) is not None


def clip_config(name: str) -> dict:
    """The open_clip model config for ``name`` (a copy); ValueError listing close names if unknown."""
    if name in FSOSR_CLIP_CONFIGS:
        return copy.deepcopy(FSOSR_CLIP_CONFIGS[name])
    config = _open_clip().get_model_config(name)
    if config is None:
        known = list_clip_models()
        close = [n for n in known if n.lower().startswith(name.lower()[:5])][:8]
        raise ValueError(f"unknown CLIP model {name!r}; close names: {close or known[:8]}")
    return config


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (``<root>/code/`` or ``<root>/constants.pkl`` entries), False for torch.save zips
    and other files. Only the second path component counts: both formats name the top folder after the file's
    stem, so a state dict saved as ``code.pt`` has entries ``code/data.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            parts = entry.split("/")
            if (len(parts) > 2 and parts[1] == "code") or parts[1:] == ["constants.pkl"]:
                return True
    return False


def _build_random(name: str, config: dict, *, quick_gelu: bool) -> nn.Module:
    """The named architecture with open_clip's random init, on the CPU in fp32."""
    open_clip = _open_clip()
    if name in FSOSR_CLIP_CONFIGS:
        return open_clip.CLIP(**dict(config, quick_gelu=quick_gelu))  # the flag wins over a config's own
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs "No pretrained weights loaded" at WARNING: that is the intent here
    try:
        return open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_text=False,
                                      force_quick_gelu=quick_gelu, device="cpu", precision="fp32")
    finally:
        root.setLevel(level)


def _metadata_config(path: Path) -> dict | None:
    """The model config saved by :func:`save_open_clip` in a safetensors header, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # SafetensorError for a truncated or foreign file
        raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({exc})") from exc
    return json.loads(meta[_METADATA_KEY]) if _METADATA_KEY in meta else None


def _torchscript_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The weights inside an OpenAI TorchScript archive, as open_clip's ``load_openai_model`` reads them, minus the
    three non-weight entries OpenAI stores there. Read directly rather than through ``load_openai_model``: that
    function rebuilds whatever architecture the file holds (assuming 64-wide heads), while here the file is loaded
    into the *named* architecture and checked against it, so a ViT-B/32 file given for ViT-B-16 is an error."""
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointMismatchError(f"{path}: not a loadable TorchScript archive for CLIP {name} ({exc})") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in archive.state_dict().items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    # the causal text mask is rebuilt by the model; some exports (e.g. a traced open_clip model) carry it along
    return {k: v for k, v in state.items() if not k.endswith("attn_mask")}


def _saved_activation(saved: dict, config: dict, path: Path, name: str) -> bool:
    """Check a file's saved config against ``name``'s and return the QuickGELU flag to build with.

    The activation is compared apart from the rest: a model built with QuickGELU under a plain name (an OpenAI
    archive) is saved with ``quick_gelu: true``, and rebuilding it needs QuickGELU again. A name that demands
    QuickGELU (``-quickgelu``) still refuses a file saved from a GELU model."""
    saved_quick_gelu = bool(saved.get("quick_gelu", False))
    same_architecture = ({k: v for k, v in saved.items() if k != "quick_gelu"}
                         == {k: v for k, v in config.items() if k != "quick_gelu"})
    if not same_architecture or (config.get("quick_gelu") and not saved_quick_gelu):
        raise CheckpointMismatchError(f"{path} was saved for another architecture than {name}: "
                                      f"file config {saved} vs {config}")
    return saved_quick_gelu


def _uses_quick_gelu(model: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU
    return any(isinstance(module, QuickGELU) for module in model.modules())


def build_open_clip(name: str, checkpoint: str | os.PathLike | None = None, *,
                    precision: str = "fp32", device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip ``CLIP`` of architecture ``name`` with the weights of ``checkpoint`` (random init if None).

    precision: ``fp32`` | ``bf16`` | ``fp16`` (weights cast; fp32 is what the methods' seeds train with).
    """
    config = clip_config(name)
    reason = unsupported_clip_reason(config)
    if reason is not None:
        raise ValueError(f"{name}: fsosr supports open_clip models with their own ViT and text transformer towers "
                         f"and BPE tokenizer; {reason}")
    quick_gelu = bool(config.get("quick_gelu", False))
    if checkpoint is None:
        model = _build_random(name, config, quick_gelu=quick_gelu)
    else:
        path = require_file(checkpoint, f"CLIP {name}")
        if is_torchscript_archive(path):
            if not quick_gelu:
                # Suggest the -quickgelu name only where such a config exists (open_clip's; not fsosr's own).
                hint = (f" (use the name {name}-quickgelu to say so)" if is_open_clip_config(f"{name}-quickgelu")
                        else "")
                warnings.warn(f"{path} is an OpenAI TorchScript checkpoint: building {name} with QuickGELU as "
                              f"OpenAI trained it{hint}", stacklevel=2)
                quick_gelu = True
            model = _build_random(name, config, quick_gelu=True)
            state = _torchscript_state_dict(path, name)
        else:
            saved = _metadata_config(path)
            if saved is not None:
                quick_gelu = _saved_activation(saved, config, path, name)
            model = _build_random(name, config, quick_gelu=quick_gelu)
            state = load_state_dict_file(path, f"CLIP {name}")
            # open_clip stores logit_scale as a 0-d tensor; some exports store shape [1]
            if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
                state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        load_into(model, state, path=path, expected=f"CLIP {name}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return model.to(device=device, dtype=dtype).eval()


def save_open_clip(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    """Write an open_clip model's weights so that ``build_open_clip(name, path)`` rebuilds it (safetensors with the
    config in its header, so a later load can tell a file for another architecture apart). The config records the
    model's actual activation (``quick_gelu``), which may differ from the name's (see the module docstring)."""
    config = dict(clip_config(name), quick_gelu=_uses_quick_gelu(model))
    metadata = {_METADATA_KEY: json.dumps(config, sort_keys=True), "fsosr_clip_name": name}
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_open_clip writes .safetensors files, got {path}")
    return save_state_dict(model.state_dict(), path, metadata=metadata)
