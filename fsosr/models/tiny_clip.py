"""The embedded tiny CLIP: an ``fsosr-digits`` open_clip model pretrained on the embedded digits benchmark, cached.

``python -m fsosr.train`` must run end to end on a fresh machine with no data and no weights, so the default
backbone is built here: a ~3.6M-parameter CLIP (:data:`~fsosr.models.clip_loading.FSOSR_CLIP_CONFIGS`
``"fsosr-digits"``) trained contrastively on scikit-learn's digits with captions from the class names
(recipe and loss in :mod:`fsosr.models.tiny_clip_train`). By default it sees only the **known** digits of the
open-set split, so the unknown digits stay unseen — the honest open-set setting; ``classes="all"`` trains on ten.

- :func:`pretrain_digits_clip` trains one and evaluates it (zero-shot accuracy on the known test digits, max-logit
  and MSP AUROC known-vs-unknown).
- :func:`load_digits_clip` returns it as a frozen :class:`~fsosr.models.clip.ClipBackbone`, training it once per
  machine: the weights go to ``<cache>/fsosr-digits-<classes>-split<s>-<hash>.safetensors`` (+ ``.json`` report),
  where the hash covers everything that determines the weights; ``<cache>`` is ``$FSOSR_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/fsosr``, else ``~/.cache/fsosr``. A lock file makes concurrent callers train once (the others
  wait, then load); the file is read back through ``create_clip("fsosr-digits", path)``, the same local-checkpoint
  path real weights take. A cache entry that cannot be read is rebuilt with a warning.
- ``python -m fsosr.models.tiny_clip`` builds or loads it and prints the report and the cache path.

Inputs to the model are [0, 1] images normalised with :func:`~fsosr.models.tiny_clip_train.normalize_digits`
(OpenAI CLIP's mean/std); :func:`~fsosr.models.tiny_clip_train.digits_clip_transform` does it for datasets.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from fsosr.models.checkpoint import atomic_path
from fsosr.models.clip import ClipBackbone, create_clip
from fsosr.models.clip_loading import clip_config, save_open_clip
from fsosr.models.tiny_clip_train import (DIGITS_CLIP_NAME, DigitsClipRecipe, digits_clip_transform,
                                          evaluate_digits_clip, normalize_digits, train_digits_clip)

__all__ = ["DIGITS_CLIP_NAME", "FORMAT_VERSION", "DigitsClipRecipe", "default_cache_dir", "digits_clip_path",
           "digits_clip_transform", "format_report", "load_digits_clip", "normalize_digits", "pretrain_digits_clip",
           "recipe_hash"]

# Bump when the training code changes what a given recipe produces, so old cache files are not reused.
FORMAT_VERSION = 1
_DEFAULT = DigitsClipRecipe()


def default_cache_dir() -> Path:
    """``$FSOSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/fsosr``, else ``~/.cache/fsosr`` (not created here)."""
    if os.environ.get("FSOSR_CACHE_DIR"):
        return Path(os.environ["FSOSR_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fsosr"
    return Path.home() / ".cache" / "fsosr"


def recipe_hash(recipe: DigitsClipRecipe) -> str:
    """12 hex digits of the SHA-256 of (format version, model name and config, every recipe field)."""
    key = {"format": FORMAT_VERSION, "model": DIGITS_CLIP_NAME, "config": clip_config(DIGITS_CLIP_NAME),
           "recipe": dataclasses.asdict(recipe)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def digits_clip_path(recipe: DigitsClipRecipe, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`load_digits_clip` keeps the weights for ``recipe`` (the report sits beside it as ``.json``)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"{DIGITS_CLIP_NAME}-{recipe.classes}-split{recipe.osr_split_index}-{recipe_hash(recipe)}.safetensors"
    return folder / name


def _recipe(classes, osr_split_index, epochs, batch_size, lr, seed, options) -> DigitsClipRecipe:
    return DigitsClipRecipe(classes=classes, osr_split_index=osr_split_index, epochs=epochs, batch_size=batch_size,
                            lr=lr, seed=seed, **options)


def format_report(report: dict) -> str:
    """A few human-readable lines from a :func:`pretrain_digits_clip` report."""
    recipe, evaluation, training = report["recipe"], report["evaluation"], report["training"]
    return "\n".join([
        f"digits CLIP ({DIGITS_CLIP_NAME}), trained on {recipe['classes']} digits of split "
        f"{recipe['osr_split_index']}: {training['train_images']} images, {recipe['epochs']} epochs, "
        f"{training['steps']} steps, {training['train_seconds']:.1f} s; final loss {training['epoch_losses'][-1]:.4f}",
        f"zero-shot accuracy on the known test digits {evaluation['known_digits']}: "
        f"{evaluation['zero_shot_accuracy']:.4f} ({evaluation['test_known']} images)",
        f"known vs unknown {evaluation['unknown_digits']} ({evaluation['test_unknown']} images): AUROC max-logit "
        f"{evaluation['auroc_max_logit']:.4f}, MSP {evaluation['auroc_msp']:.4f}; "
        f"FPR@95 max-logit {evaluation['fpr95_max_logit']:.4f}",
    ])


def _pretrain(recipe: DigitsClipRecipe, progress: bool) -> tuple[nn.Module, dict]:
    model, training = train_digits_clip(recipe, progress=progress)
    evaluation = evaluate_digits_clip(model, recipe.osr_split_index)
    report = {"format_version": FORMAT_VERSION, "hash": recipe_hash(recipe), "recipe": dataclasses.asdict(recipe),
              "training": training, "evaluation": evaluation, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if progress:
        print(format_report(report), flush=True)
    return model, report


def pretrain_digits_clip(*, classes: str = "known", osr_split_index: int = 0, epochs: int = _DEFAULT.epochs,
                         batch_size: int = _DEFAULT.batch_size, lr: float = _DEFAULT.lr, seed: int = 0,
                         progress: bool = True, **options) -> tuple[nn.Module, dict]:
    """Train a fresh digits CLIP; returns (open_clip model in eval mode, report).

    ``options``: the other :class:`DigitsClipRecipe` fields (weight_decay, warmup_steps, augment, templates,
    max_train_samples). The report holds ``recipe``, ``training`` (per-epoch losses, images seen per digit, time),
    ``evaluation`` (see :func:`~fsosr.models.tiny_clip_train.evaluate_digits_clip`) and the hash; it is printed
    when ``progress``. Nothing is cached: see :func:`load_digits_clip`.
    """
    return _pretrain(_recipe(classes, osr_split_index, epochs, batch_size, lr, seed, options), progress)


# --- cache ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing; left in place, because deleting a lock file
    that another process has just opened would let a third one lock a different file)."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_json_atomic(data: dict, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)


def _read_entry(path: Path, expected_hash: str) -> tuple[ClipBackbone | None, str | None]:
    """(backbone with ``.pretrain_report``, None) for a readable cache entry; (None, why) otherwise —
    why is None when there is simply no entry yet."""
    if not path.exists():
        return None, None
    try:
        report = json.loads(path.with_suffix(".json").read_text())
        if report.get("hash") != expected_hash:
            return None, f"its report is for settings {report.get('hash')!r}, not {expected_hash!r}"
        backbone = create_clip(DIGITS_CLIP_NAME, path)
    except Exception as exc:  # any unreadable part (truncated safetensors, bad JSON, wrong tensors) means rebuild
        return None, f"{type(exc).__name__}: {exc}"
    backbone.pretrain_report = report
    backbone.checkpoint_path = path
    return backbone, None


def load_digits_clip(*, cache_dir: str | os.PathLike | None = None, classes: str = "known", osr_split_index: int = 0,
                     rebuild: bool = False, progress: bool = True, epochs: int = _DEFAULT.epochs,
                     batch_size: int = _DEFAULT.batch_size, lr: float = _DEFAULT.lr, seed: int = 0,
                     **options) -> ClipBackbone:
    """The pretrained digits CLIP as a frozen :class:`ClipBackbone`, trained on first use and cached.

    Settings as :func:`pretrain_digits_clip`; ``rebuild`` retrains even if a cache entry exists. The result carries
    ``pretrain_report`` (the stored report), ``checkpoint_path`` and ``cache_status`` ("loaded" or "built").
    """
    recipe = _recipe(classes, osr_split_index, epochs, batch_size, lr, seed, options)
    path, expected = digits_clip_path(recipe, cache_dir), recipe_hash(recipe)
    if not rebuild:
        backbone, _ = _read_entry(path, expected)
        if backbone is not None:
            backbone.cache_status = "loaded"
            return backbone
    with _exclusive_lock(path.with_suffix(".lock")):
        if not rebuild:  # another process may have built it while this one waited for the lock
            backbone, problem = _read_entry(path, expected)
            if backbone is not None:
                backbone.cache_status = "loaded"
                return backbone
            if problem is not None:
                warnings.warn(f"cached digits CLIP {path} is unreadable ({problem}); rebuilding it", stacklevel=2)
        model, report = _pretrain(recipe, progress)
        # Report first, weights last: the weights file appearing (atomically) is what marks the entry complete.
        _write_json_atomic(report, path.with_suffix(".json"))
        save_open_clip(model, DIGITS_CLIP_NAME, path)
        backbone, problem = _read_entry(path, expected)
    if backbone is None:
        raise RuntimeError(f"the digits CLIP just written to {path} cannot be read back: {problem}")
    backbone.cache_status = "built"
    return backbone


# --- command line -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsosr.models.tiny_clip",
                                     description="Build (or load from the cache) the embedded digits CLIP and print "
                                                 "its zero-shot report and cache path.")
    parser.add_argument("--classes", choices=("known", "all"), default="known",
                        help="pretrain on the known digits of the split (default) or on all ten")
    parser.add_argument("--split", type=int, default=0, help="digits open-set split 0..4 (default 0)")
    parser.add_argument("--epochs", type=int, default=_DEFAULT.epochs)
    parser.add_argument("--rebuild", action="store_true", help="retrain even if a cached model exists")
    parser.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    args = parser.parse_args(argv)
    backbone = load_digits_clip(cache_dir=args.cache_dir, classes=args.classes, osr_split_index=args.split,
                                epochs=args.epochs, rebuild=args.rebuild, progress=not args.quiet)
    if backbone.cache_status == "loaded" or args.quiet:  # a fresh build already printed it
        print(format_report(backbone.pretrain_report))
    print(f"cache ({backbone.cache_status}): {backbone.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
