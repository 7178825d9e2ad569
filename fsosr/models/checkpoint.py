"""Local weight files: reading them in their published formats, checking them against a model, writing them safely.

Nothing here downloads anything. Every error names the file and the model it was expected to hold, because the
usual failure is a checkpoint for a different architecture (ViT-B/32 weights for a ViT-B/16, a timm file for an
open_clip model) and a bare ``size mismatch`` from ``load_state_dict`` does not say which file was wrong.

Formats: ``.safetensors`` (safetensors), and torch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``) loaded with
``weights_only=True``; a pickle holding ``{"state_dict": ...}``, ``{"model": ...}`` or ``{"module": ...}`` is
unwrapped, and a ``module.`` prefix (DataParallel/DDP) is stripped.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointMismatchError", "atomic_path", "load_into", "load_state_dict_file", "require_file", "save_state_dict"]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# "feature_params": DNPG phase-2 files ({"feature_params": backbone, "RPL_params": classifier})
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "feature_params")


class CheckpointMismatchError(ValueError):
    """A weight file that does not fit the model it was loaded into (missing/unexpected keys, wrong shapes)."""


def require_file(path: str | os.PathLike, expected: str) -> Path:
    """``path`` as a Path if it is an existing file; otherwise FileNotFoundError naming it and ``expected``."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = " (it is a directory: pass the weight file inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"weights for {expected}: no file at {path}{hint}. fsosr never downloads weights; "
                                f"put the published checkpoint there or pass its path.")
    return path


def load_state_dict_file(path: str | os.PathLike, expected: str = "the model") -> dict[str, torch.Tensor]:
    """The tensors of a local weight file as a flat ``{name: tensor}`` on the CPU (see the module docstring)."""
    path = require_file(path, expected)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt files
            raise CheckpointMismatchError(f"{path}: not a readable safetensors file for {expected} ({exc})") from exc
    if path.suffix not in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format {path.suffix!r} for {expected}; expected .safetensors or "
                         f"one of {', '.join(_PICKLE_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(
            f"{path}: cannot be read as a torch state dict for {expected} with weights_only=True ({exc}). "
            f"An OpenAI TorchScript archive must be loaded through the model's builder, not as a state dict.") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path}: holds no flat state dict of tensors for {expected}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor], ignore: Iterable[str]) -> list[str]:
    expected = model.state_dict()
    ignore = tuple(ignore)
    skip = lambda k: any(k.startswith(prefix) for prefix in ignore)  # noqa: E731 - a two-use predicate
    missing = [k for k in expected if k not in state and not skip(k)]
    unexpected = [k for k in state if k not in expected and not skip(k)]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and not skip(k) and state[k].shape != expected[k].shape]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:5]) + (f", … ({len(items) - 5} more)" if len(items) > 5 else "")
            lines.append(f"{len(items)} {title}: {shown}")
    return lines


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, path: str | os.PathLike, expected: str,
              ignore: Iterable[str] = ()) -> None:
    """``model.load_state_dict(state)`` after checking every key and shape (keys starting with a prefix in
    ``ignore`` are not required and not loaded); CheckpointMismatchError naming ``path`` and ``expected`` else."""
    ignore = tuple(ignore)
    problems = _mismatch_report(model, state, ignore)
    if problems:
        raise CheckpointMismatchError(f"{path} does not hold weights for {expected}: " + "; ".join(problems))
    kept = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    model.load_state_dict(kept, strict=not ignore)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in ``path``'s folder; on a clean exit it is renamed onto ``path`` (readers never see a
    half-written file), on an error it is removed. The file gets the usual umask permissions, not mkstemp's 0600."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` atomically (:func:`atomic_path`): ``.safetensors`` (with string ``metadata``) or a torch
    pickle for the other suffixes. Tensors are made contiguous and moved to the CPU."""
    path = Path(path).expanduser()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        else:
            torch.save(tensors, tmp)
    return path
