"""Few-shot benchmarks in the files used by RFS / TANE / DNPG: miniImageNet, tieredImageNet, CIFAR-FS.

File names expected in ``root`` (the folder passed as ``--data_root`` to TANE/DNPG):

    miniImageNet   miniImageNet_category_split_train_phase_train.pickle   split "train" (64 base classes)
                   miniImageNet_category_split_train_phase_val.pickle     split "train_phase_val"
                   miniImageNet_category_split_train_phase_test.pickle    split "train_phase_test"
                   miniImageNet_category_split_val.pickle                 split "val"  (16 classes)
                   miniImageNet_category_split_test.pickle                split "test" (20 classes)
        pickled dict: 'data' uint8 [N, 84, 84, 3], 'labels' list of N ints (optional 'catname2label')
    CIFAR-FS       train.pickle, val.pickle, test.pickle   (CIFAR_FS_<split>.pickle also accepted)
        pickled dict: 'data' uint8 [N, 32, 32, 3], 'labels' list of N ints
    tieredImageNet few-shot-train.npz, few-shot-val.npz, few-shot-test.npz   (TANE / DNPG's variant)
        npz: 'features' uint8 [N, 84, 84, 3], 'targets' int [N]

Labels become 0..C-1 by rank of the stored label (TANE subtracts the minimum for miniImageNet and ranks for
CIFAR-FS; the two agree on the released files, whose labels are contiguous). ``.label_ids`` keeps the stored ids.
Pickles are read with ``encoding="latin1"`` because the released files were written by Python 2.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable

import numpy as np

from fsosr.data.errors import MalformedDataError, MissingDataError
from fsosr.data.readers.base import ImageDataset
from fsosr.data.readers.cifar import integer_labels, read_pickle

MINI_IMAGENET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "train_phase_val": "miniImageNet_category_split_train_phase_val.pickle",
    "train_phase_test": "miniImageNet_category_split_train_phase_test.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
FEWSHOT_SPLITS = ("train", "val", "test")

MINI_IMAGENET_LAYOUT = "  <root>/" + "\n  <root>/".join(MINI_IMAGENET_FILES.values()) + \
    "\n  (pickled dict: 'data' uint8 [N, 84, 84, 3], 'labels' list of N ints)"
CIFAR_FS_LAYOUT = """  <root>/train.pickle, val.pickle, test.pickle  (or CIFAR_FS_train.pickle, ...)
  (pickled dict: 'data' uint8 [N, 32, 32, 3], 'labels' list of N ints)"""
TIERED_LAYOUT = """  <root>/few-shot-train.npz, few-shot-val.npz, few-shot-test.npz
  (npz: 'features' uint8 [N, 84, 84, 3], 'targets' int [N])"""


def _validate(path: str, images: np.ndarray, labels: np.ndarray, layout: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise MalformedDataError(path, f"images must be uint8 [N, H, W, 3], found {images.dtype} "
                                       f"{list(images.shape)}", layout)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise MalformedDataError(path, f"{labels.size} labels for {images.shape[0]} images", layout)


class _FewShotArrays(ImageDataset):
    """Shared constructor: arrays + stored labels -> ranked labels and class names."""

    def _setup(self, path: str, images: np.ndarray, stored: np.ndarray, names: dict | None, layout: str,
               transform, target_transform, name: str) -> None:
        _validate(path, images, stored, layout)
        self.label_ids, ranked = np.unique(stored, return_inverse=True)
        inverse = {int(v): str(k) for k, v in (names or {}).items()}
        classes = [inverse.get(int(i), str(int(i))) for i in self.label_ids]
        self.source_file = path
        ImageDataset.__init__(self, images=images, targets=ranked.reshape(-1), classes=classes,
                              transform=transform, target_transform=target_transform, name=name)


def _read_pickle_pack(path: str, layout: str) -> tuple[np.ndarray, np.ndarray, dict | None]:
    pack = read_pickle(path, layout)
    for key in ("data", "labels"):
        if key not in pack:
            raise MalformedDataError(path, f"missing key {key!r} (found {sorted(pack)})", layout)
    names = pack.get("catname2label")
    # Optional metadata: a mapping that is not {name: integer label} is ignored (classes are then named by id).
    if not isinstance(names, dict) or not all(isinstance(v, (int, np.integer)) for v in names.values()):
        names = None
    if names:
        names = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in names.items()}
    return np.asarray(pack["data"]), integer_labels(pack["labels"], path, "labels", layout), names


class MiniImageNet(_FewShotArrays):
    """miniImageNet ``split`` from the RFS/TANE pickles (see the module docstring for the file names)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if split not in MINI_IMAGENET_FILES:
            raise ValueError(f"miniImageNet split must be one of {list(MINI_IMAGENET_FILES)}, got {split!r}")
        path = os.path.join(os.fspath(root), MINI_IMAGENET_FILES[split])
        images, labels, names = _read_pickle_pack(path, MINI_IMAGENET_LAYOUT)
        self._setup(path, images, labels, names, MINI_IMAGENET_LAYOUT, transform, target_transform,
                    f"miniimagenet/{split}")


class CIFARFS(_FewShotArrays):
    """CIFAR-FS ``split`` ("train" 64 / "val" 16 / "test" 20 classes) from ``<split>.pickle``."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if split not in FEWSHOT_SPLITS:
            raise ValueError(f"CIFAR-FS split must be one of {FEWSHOT_SPLITS}, got {split!r}")
        root = os.fspath(root)
        path = os.path.join(root, f"{split}.pickle")
        if not os.path.isfile(path) and os.path.isfile(os.path.join(root, f"CIFAR_FS_{split}.pickle")):
            path = os.path.join(root, f"CIFAR_FS_{split}.pickle")
        images, labels, names = _read_pickle_pack(path, CIFAR_FS_LAYOUT)
        self._setup(path, images, labels, names, CIFAR_FS_LAYOUT, transform, target_transform, f"cifar-fs/{split}")


class TieredImageNet(_FewShotArrays):
    """tieredImageNet ``split`` ("train" 351 / "val" 97 / "test" 160 classes) from TANE/DNPG's
    ``few-shot-<split>.npz``."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if split not in FEWSHOT_SPLITS:
            raise ValueError(f"tieredImageNet split must be one of {FEWSHOT_SPLITS}, got {split!r}")
        path = os.path.join(os.fspath(root), f"few-shot-{split}.npz")
        if not os.path.isfile(path):
            raise MissingDataError(path, TIERED_LAYOUT)
        try:
            with np.load(path, allow_pickle=False) as pack:
                missing = [k for k in ("features", "targets") if k not in pack.files]
                if missing:
                    raise MalformedDataError(path, f"missing arrays {missing} (found {pack.files})", TIERED_LAYOUT)
                images = pack["features"]
                labels = integer_labels(pack["targets"].reshape(-1), path, "targets", TIERED_LAYOUT)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            if isinstance(error, MalformedDataError):
                raise
            raise MalformedDataError(path, f"cannot read npz ({type(error).__name__}: {error})",
                                     TIERED_LAYOUT) from error
        self._setup(path, images, labels, None, TIERED_LAYOUT, transform, target_transform,
                    f"tieredimagenet/{split}")
