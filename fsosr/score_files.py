"""Score files: the ``.npz`` archives ``python -m fsosr.eval`` reads (format: `fsosr.eval`'s module docstring).

`save_scores` writes them (atomically, any key name, torch tensors converted exactly); `read_score_file` reads them
without pickle and turns every way a file can be wrong into a :class:`ScoreFileError` naming the file.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["CHECKPOINT_SUFFIXES", "ScoreFileError", "read_score_file", "save_scores", "scores_from_checkpoint"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


class ScoreFileError(ValueError):
    """A score file is missing, unreadable, or lacks / mis-shapes an array; the message names the file and key."""


def _flatten(arrays: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in arrays.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            for nested_name, array in _flatten(value, name + "/").items():
                _add_once(flat, nested_name, array)
            continue
        if hasattr(value, "detach"):  # a torch tensor; float64 holds every float16/bfloat16/float32 value exactly
            value = value.detach().cpu()
            value = (value.double() if value.is_floating_point() else value).numpy()
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError(f"{name}: object arrays cannot be saved without pickle; pass numbers, bools or strings")
        _add_once(flat, name, array)
    return flat


def _add_once(flat: dict, name: str, array: np.ndarray) -> None:
    # {"ood/x": a} and ood={"x": b} name the same array: refuse rather than keep one of them silently.
    if name in flat:
        raise ValueError(f"save_scores: '{name}' is given twice (a key with '/' and a nested mapping name the same "
                         f"array)")
    flat[name] = array


def save_scores(path, arrays: Mapping | None = None, /, **named) -> Path:
    """Write arrays in the score-file format (see the module docstring) to ``path`` atomically; returns the path.

    Keys may be given as keyword arguments, in a mapping (for keys with ``/``), or nested:
    ``save_scores("s.npz", id_scores=s_id, ood={"inat": s_inat, "sun": s_sun}, id_correct=pred == labels)``.
    numpy arrays, torch tensors and lists are accepted. ``.npz`` is appended when missing.
    """
    repeated = sorted(set(arrays or {}) & set(named))
    if repeated:
        raise ValueError(f"save_scores: {repeated} given both in the mapping and as keyword arguments")
    flat = _flatten({**(arrays or {}), **named})
    if not flat:
        raise ValueError("save_scores needs at least one array")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: a reader never sees half a file, and an interrupted write leaves the old one intact.
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            _write_npz(file, flat)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _write_npz(file, arrays: dict[str, np.ndarray]) -> None:
    """The archive ``np.savez(file, **arrays)`` writes, for any key: savez would take keys named like its own
    parameters as arguments (``file``: a TypeError; ``allow_pickle``: the array silently dropped)."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def scores_from_checkpoint(path: Path, protocol: str) -> dict[str, np.ndarray]:
    """Extension point: run a trained model on its test sets and return score-file arrays for ``protocol``.

    Needs the models, methods and data readers (fsosr.methods / fsosr.engine), which do not exist yet.
    """
    raise ScoreFileError(
        f"{path}: this looks like a checkpoint; evaluating checkpoints is not implemented yet. Compute the scores "
        f"and save them with fsosr.eval.save_scores(...) (format: python -m fsosr.eval --help), then pass the .npz")


def read_score_file(path, protocol: str = "ood") -> dict[str, np.ndarray]:
    """All arrays of a score file (checkpoints go to `scores_from_checkpoint`), loaded without pickle."""
    path = Path(path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return scores_from_checkpoint(path, protocol)
    if path.is_dir():
        raise ScoreFileError(f"{path} is a directory; pass .npz score files (checkpoint folders are not supported "
                             f"yet)")
    if not path.is_file():
        raise ScoreFileError(f"score file not found: {path}")
    with open(path, "rb") as file:
        magic = file.read(6)
    # Checked first because numpy's own errors for these cases talk about pickles and context managers.
    if magic == b"\x93NUMPY":
        raise ScoreFileError(f"{path} is a single .npy array; score files are .npz archives of named arrays "
                             f"(numpy.savez or fsosr.eval.save_scores)")
    if not magic.startswith(b"PK"):
        raise ScoreFileError(f"{path} is not an .npz archive (write score files with numpy.savez or "
                             f"fsosr.eval.save_scores)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # a damaged archive, or object arrays that would need pickle
        raise ScoreFileError(f"cannot read {path} as an .npz score file: {error}") from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a member without the .npy suffix: np.load returns its raw bytes
            raise ScoreFileError(f"{path}: member '{key}' is not a .npy array (score files hold arrays written by "
                                 f"numpy.savez or fsosr.eval.save_scores)")
    return arrays
