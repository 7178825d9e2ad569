"""Folder layouts: ImageFolder-style sets (OOD sets included), ImageNet-1k, and the 11 MTIL datasets.

ImageFolder semantics follow torchvision so class indices match published code: classes are the sorted
sub-folder names of ``root``; images are found recursively under each (``os.walk`` sorted, files sorted).
Hidden entries (names starting with ".") are skipped.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from fsosr.data.errors import MalformedDataError, MissingDataError
from fsosr.data.readers.base import ImageDataset, is_image_file

IMAGE_FOLDER_LAYOUT = """  <root>/<class_a>/xxx.png, <root>/<class_b>/yyy.jpg, ...
    (one sub-folder per class, images at any depth below it)
  or a flat folder: <root>/xxx.jpg, <root>/yyy.png, ...     (one class)"""

IMAGENET_LAYOUT = """  <root>/images/train/<wnid>/*.JPEG   (or <root>/train/<wnid>/*.JPEG)
  <root>/images/val/<wnid>/*.JPEG     (validation images re-foldered by class, 50 per class)
  <root>/classnames.txt               (CoOp's file: one "<wnid> <class name>" per line, 1000 lines)"""

# Order I of the MTCL / MTIL benchmark as ZSCL defines it and MoE-Adapters4CL uses it.
MTIL_DATASETS = ("Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
                 "OxfordPet", "StanfordCars", "SUN397")

MTIL_LAYOUT = """  <root>/<Dataset>/train/<class folder>/*.jpg
  <root>/<Dataset>/test/<class folder>/*.jpg
  <root>/<Dataset>/classnames.txt   (optional: one class name per line, in sorted-folder order)
  with <Dataset> one of """ + ", ".join(MTIL_DATASETS)


def _listdir(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if not name.startswith("."))


def _images_below(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in torchvision's order (sorted walk, sorted files)."""
    walked = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        # Pruning works only while the walk runs (sorting the walk first would read it whole, hidden folders such
        # as .ipynb_checkpoints included); the sort below restores torchvision's order.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        walked.append((current, files))
    found = []
    for current, files in sorted(walked):
        found.extend(os.path.join(current, f) for f in sorted(files) if not f.startswith(".") and is_image_file(f))
    return found


def scan_image_folder(root: str | os.PathLike, layout: str = IMAGE_FOLDER_LAYOUT
                      ) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of an ImageFolder-style folder or of a flat folder of images (one class)."""
    root = os.fspath(root)
    if os.path.isfile(root):
        raise MalformedDataError(root, "is a file; expected a folder of images", layout)
    if not os.path.isdir(root):
        raise MissingDataError(root, layout)
    entries = _listdir(root)
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    paths, labels = [], []
    if class_dirs:
        for label, name in enumerate(class_dirs):
            found = _images_below(os.path.join(root, name))
            if not found:
                raise MalformedDataError(os.path.join(root, name), "class folder holds no image files", layout)
            paths.extend(found)
            labels.extend([label] * len(found))
        return paths, labels, class_dirs
    flat = [os.path.join(root, e) for e in entries if is_image_file(e)]
    if not flat:
        raise MalformedDataError(root, "no class sub-folders and no image files", layout)
    return flat, [0] * len(flat), [os.path.basename(os.path.normpath(root))]


class ImageFolderDataset(ImageDataset):
    """Any folder of class sub-folders, or a flat folder of images (LSUN/ImageNet crop/resize, iNaturalist, SUN,
    Places, Texture, ...).

    ``constant_label`` gives every sample the same label (e.g. ``-1`` for an OOD set whose folder names are not
    classes of the task).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 target_transform: Callable | None = None, constant_label: int | None = None, name: str = ""):
        paths, labels, classes = scan_image_folder(root)
        if constant_label is not None:
            labels = [constant_label] * len(paths)
        super().__init__(paths=paths, targets=labels, classes=classes, transform=transform,
                         target_transform=target_transform, name=name or os.path.basename(os.path.normpath(root)))


def read_class_names(path: str, layout: str) -> dict[str, str]:
    """CoOp-style ``classnames.txt``: ``"<folder> <name with spaces>"`` per line -> {folder: name}."""
    if not os.path.isfile(path):
        raise MissingDataError(path, layout)
    names = {}
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            folder, _, name = line.partition(" ")
            if not name.strip():
                raise MalformedDataError(path, f"line {number} is {line!r}; expected '<folder> <class name>'",
                                         layout)
            names[folder] = name.strip()
    return names


class ImageNet(ImageDataset):
    """ImageNet-1k train or val (re-foldered by wnid) with class names from CoOp's ``classnames.txt``.

    Labels are indices into the sorted wnids (ImageFolder / CoOp order); ``.classes`` holds the readable names
    (LoCoOp's results depend on this exact file, issue #2). ``classnames_file`` overrides ``<root>/classnames.txt``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, classnames_file: str | os.PathLike | None = None):
        root = os.fspath(root)
        if split not in ("train", "val"):
            raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
        folder = os.path.join(root, "images", split)
        if not os.path.isdir(folder):
            folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else folder
        if os.path.isdir(folder) and not any(os.path.isdir(os.path.join(folder, e)) for e in _listdir(folder)):
            raise MalformedDataError(folder, "holds images directly: ImageNet's images must be in one sub-folder per "
                                     "wnid (re-folder the released val images with their ground-truth labels)",
                                     IMAGENET_LAYOUT)
        paths, labels, wnids = scan_image_folder(folder, IMAGENET_LAYOUT)
        names_path = os.fspath(classnames_file) if classnames_file else os.path.join(root, "classnames.txt")
        names = read_class_names(names_path, IMAGENET_LAYOUT)
        absent = [w for w in wnids if w not in names]
        if absent:
            raise MalformedDataError(names_path, f"no class name for folders {absent[:5]}", IMAGENET_LAYOUT)
        self.wnids = wnids
        super().__init__(paths=paths, targets=labels, classes=[names[w] for w in wnids], transform=transform,
                         target_transform=target_transform, name=f"imagenet/{split}")


def _class_names_file(path: str, expected: int, layout: str) -> list[str] | None:
    """One name per line, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8-sig") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if len(names) != expected:
        raise MalformedDataError(path, f"{len(names)} class names for {expected} class folders", layout)
    return names


class MTILDataset(ImageDataset):
    """One of the 11 MTIL datasets, stored as ``<root>/<Dataset>/{train,test}/<class folder>/``.

    This is fsosr's own folder layout (ZSCL reads several of these through torchvision's formats; convert once
    with any tool that writes images by class). Class names for prompts come from ``classnames.txt`` when present,
    else from the folder names with ``_`` read as spaces.
    """

    def __init__(self, root: str | os.PathLike, dataset: str, split: str = "train",
                 transform: Callable | None = None, target_transform: Callable | None = None):
        lookup = {name.lower(): name for name in MTIL_DATASETS}
        if dataset.lower() not in lookup:
            raise KeyError(f"unknown MTIL dataset {dataset!r}; expected one of {', '.join(MTIL_DATASETS)}")
        if split not in ("train", "test"):
            raise ValueError(f"MTIL split must be 'train' or 'test', got {split!r}")
        dataset = lookup[dataset.lower()]
        base = os.path.join(os.fspath(root), dataset)
        paths, labels, folders = scan_image_folder(os.path.join(base, split), MTIL_LAYOUT)
        names = _class_names_file(os.path.join(base, "classnames.txt"), len(folders), MTIL_LAYOUT)
        self.folders = folders
        super().__init__(paths=paths, targets=labels, classes=names or [f.replace("_", " ") for f in folders],
                         transform=transform, target_transform=target_transform, name=f"mtil/{dataset}/{split}")

