"""The dataset type every reader returns, image decoding, and class/index views.

A reader parses a published on-disk layout once, into either an in-memory ``uint8`` array (the pickle formats:
CIFAR, RFS/TANE few-shot pickles, the embedded digits) or a list of image paths (the folder formats). Both end
up in :class:`ImageDataset`, so splits, samplers and subsampling work the same way on every dataset.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fsosr.data.errors import CorruptImageError
from fsosr.data.splits import remap_labels

# Lower-case suffixes treated as images when scanning folders (torchvision's IMG_EXTENSIONS plus webp).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Label given to open-set (unknown-class) samples wherever a dataset mixes them with known ones.
UNKNOWN_LABEL = -1


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an RGB ``PIL.Image``; a file that cannot be decoded raises CorruptImageError.

    16-bit greyscale (PNG, TIFF, PGM) keeps its top 8 bits (``convert("RGB")`` alone, as torchvision's loader
    does, clips every value above 255 to white). 32-bit float or integer pixels have no standard 8-bit scale and
    raise CorruptImageError rather than decode to a saturated or black image."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file must fail here, naming the file, not later in a worker
            return _to_rgb(image, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, (FileNotFoundError, CorruptImageError)):
            raise
        raise CorruptImageError(path, f"{type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image, path) -> Image.Image:
    if image.mode.startswith("I"):          # I;16, I;16B, I;16L (16-bit) or I (32-bit, 16-bit data in older Pillow)
        array = np.asarray(image).astype(np.int64)
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if image.mode == "I" and (low < 0 or high > 65535):
            raise CorruptImageError(path, "32-bit integer pixels (PIL mode I) beyond the 16-bit range are not "
                                          "supported: save the image with 8 or 16 bits per channel")
        if image.mode != "I" or high > 255:
            array = array >> 8
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise CorruptImageError(path, "floating-point pixels (PIL mode F) are not supported: save the image with 8 "
                                      "or 16 bits per channel")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> float32 tensor [3, H, W] in [0, 1] (torchvision's ``ToTensor`` without the dependency)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(Dataset):
    """Labelled images: ``dataset[i] -> (image, label)``.

    ``image`` is an RGB ``PIL.Image`` or, when ``transform`` is given, whatever it returns; ``label`` is an ``int``
    (or ``target_transform(label)``). Storage is either ``images`` (uint8 [N, H, W, 3] or [N, H, W]) or ``paths``
    (N image files, decoded on access). ``targets`` is an int64 array aligned with the visible samples;
    ``classes`` names label ``c`` by ``classes[c]``.

    Views made by :meth:`subset` share the storage (no pixel copies) and may repeat indices, which the original
    balanced open-set evaluation needs (it samples with replacement).
    """

    def __init__(self, *, targets: Sequence[int] | np.ndarray, classes: Sequence[str],
                 images: np.ndarray | None = None, paths: Sequence[str] | None = None,
                 transform: Callable[[Image.Image], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None, name: str = "",
                 _index: np.ndarray | None = None):
        if (images is None) == (paths is None):
            raise ValueError("give exactly one of images= (in-memory array) or paths= (image files)")
        self._images = images
        self._paths = list(paths) if paths is not None else None
        stored = len(images) if images is not None else len(self._paths)
        self._index = np.arange(stored, dtype=np.int64) if _index is None else np.asarray(_index, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.shape != self._index.shape:
            raise ValueError(f"targets has {self.targets.shape[0]} entries for {self._index.shape[0]} samples")
        self.classes = list(classes)
        self.transform = transform
        self.target_transform = target_transform
        self.name = name

    def __len__(self) -> int:
        return int(self._index.shape[0])

    def __repr__(self) -> str:
        kind = "in memory" if self._images is not None else "files"
        return f"{type(self).__name__}({self.name!r}, {len(self)} samples, {len(self.classes)} classes, {kind})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> str | None:
        """File of sample ``i`` (None for in-memory datasets)."""
        return None if self._paths is None else self._paths[int(self._index[i])]

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB ``PIL.Image``, before the transform."""
        j = int(self._index[i])
        if self._images is not None:
            array = self._images[j]
            image = Image.fromarray(array, mode="L" if array.ndim == 2 else None)
            return image.convert("RGB")
        return load_image(self._paths[j])

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        image = self.image(i)
        label = int(self.targets[i])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def subset(self, indices: Sequence[int] | np.ndarray, *, targets: Sequence[int] | np.ndarray | None = None,
               classes: Sequence[str] | None = None, name: str | None = None) -> ImageDataset:
        """A view of samples ``indices`` (positions in this dataset; repeats allowed), optionally relabelled."""
        if np.asarray(indices).dtype == np.bool_:
            raise TypeError("subset takes positions, got a boolean mask: pass np.flatnonzero(mask)")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        # A plain ImageDataset: reader subclasses parse files in __init__, which a view must not repeat.
        return ImageDataset(
            targets=self.targets[indices] if targets is None else targets,
            classes=self.classes if classes is None else classes,
            images=self._images, paths=self._paths if self._images is None else None,
            transform=self.transform, target_transform=self.target_transform,
            name=self.name if name is None else name, _index=self._index[indices])


def class_subset(dataset: ImageDataset, classes: Sequence[int], *, remap: bool = True,
                 name: str | None = None) -> ImageDataset:
    """Samples of ``classes`` (original label ids), in dataset order.

    With ``remap`` (the open-set convention), label ``classes[i]`` becomes ``i`` and ``.classes`` lists the names
    in that order, so known classes are 0..K-1 in split-list order. Without it labels and names stay as they are.
    """
    classes = [int(c) for c in classes]
    indices = np.flatnonzero(np.isin(dataset.targets, classes))
    if not remap:
        return dataset.subset(indices, name=name)
    new_targets = remap_labels(dataset.targets[indices], classes)
    names = [dataset.classes[c] if 0 <= c < len(dataset.classes) else str(c) for c in classes]
    return dataset.subset(indices, targets=new_targets, classes=names, name=name)


def relabel(dataset: ImageDataset, label: int, *, name: str | None = None) -> ImageDataset:
    """The same samples with every label set to ``label`` (e.g. :data:`UNKNOWN_LABEL` for an open-set test set)."""
    return dataset.subset(np.arange(len(dataset)), targets=np.full(len(dataset), label, dtype=np.int64), name=name)
