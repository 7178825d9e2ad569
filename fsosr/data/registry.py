"""Datasets by name: ``build_dataset(name, root=None, split="train", ...)`` and ``list_datasets()``.

Names (case-insensitive), with their splits and what ``root`` is:

- ``digits`` (train, test, all) and ``digits-osr`` (train, test, test_known, test_unknown; ``osr_split=0..4``):
  the embedded benchmark, no root needed;
- ``cifar10``, ``cifar100`` (train, test): the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``;
- ``tinyimagenet`` (train, val = test): the folder holding ``tiny-imagenet-200``;
- ``imagenet`` (train, val): the ImageNet folder with CoOp's ``classnames.txt``;
- ``miniimagenet``, ``tieredimagenet``, ``cifar-fs`` (train, val, test): the folder of the RFS/TANE files;
- ``imagefolder``: any class-folder tree or flat folder (split ignored);
- ``lsun_crop``, ``lsun_resize``, ``imagenet_crop``, ``imagenet_resize``, ``inaturalist``, ``sun``, ``places``,
  ``texture``: that OOD set's image folder, every label -1 (split ignored);
- ``mtil-<dataset>`` (``mtil-aircraft`` ... ``mtil-sun397``; train, test): the folder holding the 11 datasets;
- ``fgvc`` (train, val, test): one FGVC dataset's folder with VPT's JSON files;
- ``vtab-1k`` (train, val, trainval, test; ``task=...``): the folder holding the VTAB-1k tasks.

Extra keyword arguments go to the reader (e.g. ``image_size`` for digits, ``classnames_file`` for imagenet).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from fsosr.data.digits import DigitsDataset, digits_osr
from fsosr.data.readers.base import UNKNOWN_LABEL, ImageDataset
from fsosr.data.readers.cifar import CIFAR10, CIFAR100
from fsosr.data.readers.fewshot import CIFARFS, MiniImageNet, TieredImageNet
from fsosr.data.readers.folders import MTIL_DATASETS, ImageFolderDataset, ImageNet, MTILDataset
from fsosr.data.readers.tinyimagenet import TinyImageNet
from fsosr.data.readers.transfer import VTAB_NUM_CLASSES, FGVCDataset, VTAB1k

# The OOD sets of the FSMoE (LSUN/ImageNet crop/resize, ODIN release) and LoCoOp (MOS release) protocols.
OOD_FOLDER_SETS = ("lsun_crop", "lsun_resize", "imagenet_crop", "imagenet_resize", "inaturalist", "sun", "places",
                   "texture")

_Builder = Callable[..., ImageDataset]
_REGISTRY: dict[str, tuple[_Builder, bool]] = {}  # name -> (builder(root, split, **kw), needs root)


def register_dataset(name: str, builder: _Builder, *, needs_root: bool = True) -> None:
    """Register ``builder(root, split, transform=..., target_transform=..., **kwargs) -> ImageDataset``."""
    key = name.lower()
    if key in _REGISTRY:
        raise KeyError(f"dataset {name!r} is already registered")
    _REGISTRY[key] = (builder, needs_root)


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", *,
                  transform: Callable | None = None, target_transform: Callable | None = None,
                  **kwargs) -> ImageDataset:
    """The dataset called ``name`` (see the module docstring), read from ``root`` in its published layout."""
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    builder, needs_root = _REGISTRY[key]
    if needs_root and root is None:
        raise ValueError(f"dataset {name!r} is read from disk: pass root=<folder holding it> (nothing is downloaded)")
    return builder(root, split, transform=transform, target_transform=target_transform, **kwargs)


def _vtab(root, split, *, task: str | None = None, **kwargs):
    if task is None:
        raise ValueError(f"dataset 'vtab-1k' needs task=<task folder>, e.g. one of {', '.join(VTAB_NUM_CLASSES)}")
    return VTAB1k(root, task, split, **kwargs)


def _digits_osr(root, split, *, osr_split: int = 0, **kwargs):
    return digits_osr(split, osr_split, **kwargs)


def _ood_folder(root, split, **kwargs):
    return ImageFolderDataset(root, constant_label=UNKNOWN_LABEL, **kwargs)


def _mtil(dataset: str) -> _Builder:
    return lambda root, split, **kwargs: MTILDataset(root, dataset, split, **kwargs)


def _register_builtin() -> None:
    register_dataset("digits", lambda root, split, **kw: DigitsDataset(split, **kw), needs_root=False)
    register_dataset("digits-osr", _digits_osr, needs_root=False)
    register_dataset("cifar10", lambda root, split, **kw: CIFAR10(root, split, **kw))
    register_dataset("cifar100", lambda root, split, **kw: CIFAR100(root, split, **kw))
    register_dataset("tinyimagenet", lambda root, split, **kw: TinyImageNet(root, split, **kw))
    register_dataset("imagenet", lambda root, split, **kw: ImageNet(root, split, **kw))
    register_dataset("miniimagenet", lambda root, split, **kw: MiniImageNet(root, split, **kw))
    register_dataset("tieredimagenet", lambda root, split, **kw: TieredImageNet(root, split, **kw))
    register_dataset("cifar-fs", lambda root, split, **kw: CIFARFS(root, split, **kw))
    register_dataset("imagefolder", lambda root, split, **kw: ImageFolderDataset(root, **kw))
    for name in OOD_FOLDER_SETS:
        register_dataset(name, _ood_folder)
    for dataset in MTIL_DATASETS:
        register_dataset(f"mtil-{dataset.lower()}", _mtil(dataset))
    register_dataset("fgvc", lambda root, split, **kw: FGVCDataset(root, split, **kw))
    register_dataset("vtab-1k", _vtab)


_register_builtin()
