"""CIFAR-10 / CIFAR-100 in the official "python version" pickle batches (no torchvision needed).

Layouts (``root`` may be the folder itself or its parent):

    cifar-10-batches-py/                      cifar-100-python/
      data_batch_1 ... data_batch_5  (train)    train   (50,000 images)
      test_batch                     (test)     test    (10,000 images)
      batches.meta  (label_names)               meta    (fine_label_names, coarse_label_names)

Each batch is a pickled dict with ``data`` (uint8 [N, 3072]: 1024 red, then 1024 green, then 1024 blue values of a
32x32 image, row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100). The official
files were written by Python 2; they are read with ``encoding="latin1"`` and bytes keys are accepted too.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable

import numpy as np

from fsosr.data.errors import MalformedDataError, MissingDataError
from fsosr.data.readers.base import ImageDataset

CIFAR10_LAYOUT = """  <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
  (python-pickle batches: dict with 'data' uint8 [N, 3072] and 'labels'; meta has 'label_names')"""
CIFAR100_LAYOUT = """  <root>/cifar-100-python/train, test, meta
  (python-pickle: dict with 'data' uint8 [N, 3072], 'fine_labels', 'coarse_labels';
   meta has 'fine_label_names' and 'coarse_label_names')"""


def _find_folder(root: str | os.PathLike, folder: str, marker: str, layout: str) -> str:
    """``root/folder`` if it exists, else ``root`` itself when it already holds ``marker``."""
    root = os.fspath(root)
    candidate = os.path.join(root, folder)
    if os.path.isdir(candidate):
        return candidate
    if os.path.exists(os.path.join(root, marker)):
        return root
    raise MissingDataError(candidate, layout)


def read_pickle(path: str, layout: str) -> dict:
    """Load a CIFAR-style pickle into a dict with ``str`` keys; errors name ``path`` and the layout."""
    if not os.path.isfile(path):
        raise MissingDataError(path, layout)
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except Exception as error:  # unpickling can raise almost anything on a damaged file
        raise MalformedDataError(path, f"cannot unpickle ({type(error).__name__}: {error})", layout) from error
    if not isinstance(content, dict):
        raise MalformedDataError(path, f"expected a pickled dict, found {type(content).__name__}", layout)
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _names(values, path: str, key: str, layout: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise MalformedDataError(path, f"{key!r} must be a list of class names, found {type(values).__name__}",
                                 layout)
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def integer_labels(values, path: str, key: str, layout: str) -> np.ndarray:
    """A pickle's label list as int64 [N]; anything but a flat list of integers is a MalformedDataError (a float
    label would otherwise be truncated silently, a string one raise a bare ValueError)."""
    try:
        labels = np.asarray(values)
    except Exception as error:  # ragged nested lists and the like
        raise MalformedDataError(path, f"{key!r} is not an array of labels ({error})", layout) from error
    if labels.dtype.kind not in "iu":
        raise MalformedDataError(path, f"{key!r} must hold integer labels, found {labels.dtype} values", layout)
    if labels.ndim != 1:
        raise MalformedDataError(path, f"{key!r} must be a flat list of labels, found shape {list(labels.shape)}",
                                 layout)
    return labels.astype(np.int64)


def read_cifar_batch(path: str, label_key: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images [N, 32, 32, 3], int64 labels [N])."""
    batch = read_pickle(path, layout)
    for key in ("data", label_key):
        if key not in batch:
            raise MalformedDataError(path, f"missing key {key!r} (found {sorted(batch)})", layout)
    data = np.asarray(batch["data"])
    labels = integer_labels(batch[label_key], path, label_key, layout)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise MalformedDataError(path, f"'data' must be uint8 [N, 3072], found {data.dtype} {list(data.shape)}",
                                 layout)
    if labels.shape != (data.shape[0],):
        raise MalformedDataError(path, f"{label_key!r} has {labels.size} entries for {data.shape[0]} images",
                                 layout)
    # Stored channel-planar (R plane, G plane, B plane); PIL wants height x width x channel.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _check_labels(labels: np.ndarray, num_classes: int, path: str, layout: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise MalformedDataError(path, f"labels must lie in 0..{num_classes - 1}, found "
                                       f"{int(labels.min())}..{int(labels.max())}", layout)


class CIFAR10(ImageDataset):
    """CIFAR-10 ``split`` ("train": data_batch_1..5, 50k; "test": test_batch, 10k); class names from batches.meta."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        folder = _find_folder(root, "cifar-10-batches-py", "batches.meta", CIFAR10_LAYOUT)
        if split == "train":
            files = [f"data_batch_{i}" for i in range(1, 6)]
        elif split == "test":
            files = ["test_batch"]
        else:
            raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
        meta_path = os.path.join(folder, "batches.meta")
        meta = read_pickle(meta_path, CIFAR10_LAYOUT)
        if "label_names" not in meta:
            raise MalformedDataError(meta_path, "missing key 'label_names'", CIFAR10_LAYOUT)
        classes = _names(meta["label_names"], meta_path, "label_names", CIFAR10_LAYOUT)
        images, labels = [], []
        for name in files:
            path = os.path.join(folder, name)
            batch_images, batch_labels = read_cifar_batch(path, "labels", CIFAR10_LAYOUT)
            _check_labels(batch_labels, len(classes), path, CIFAR10_LAYOUT)
            images.append(batch_images)
            labels.append(batch_labels)
        super().__init__(images=np.concatenate(images), targets=np.concatenate(labels), classes=classes,
                         transform=transform, target_transform=target_transform, name=f"cifar10/{split}")


class CIFAR100(ImageDataset):
    """CIFAR-100 ``split`` ("train" or "test") with fine labels (or ``coarse=True`` for the 20 superclasses)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, coarse: bool = False):
        folder = _find_folder(root, "cifar-100-python", "meta", CIFAR100_LAYOUT)
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 split must be 'train' or 'test', got {split!r}")
        kind = "coarse" if coarse else "fine"
        meta_path = os.path.join(folder, "meta")
        meta = read_pickle(meta_path, CIFAR100_LAYOUT)
        if f"{kind}_label_names" not in meta:
            raise MalformedDataError(meta_path, f"missing key '{kind}_label_names'", CIFAR100_LAYOUT)
        classes = _names(meta[f"{kind}_label_names"], meta_path, f"{kind}_label_names", CIFAR100_LAYOUT)
        path = os.path.join(folder, split)
        images, labels = read_cifar_batch(path, f"{kind}_labels", CIFAR100_LAYOUT)
        _check_labels(labels, len(classes), path, CIFAR100_LAYOUT)
        super().__init__(images=images, targets=labels, classes=classes, transform=transform,
                         target_transform=target_transform, name=f"cifar100/{split}")
