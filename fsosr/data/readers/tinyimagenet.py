"""TinyImageNet-200 as released (``tiny-imagenet-200.zip``), with or without the re-foldered ``val/``.

Layout (``root`` may be the ``tiny-imagenet-200`` folder itself or its parent):

    tiny-imagenet-200/
      wnids.txt                          200 wnids, one per line (optional here; checked when present)
      words.txt                          "<wnid>\\t<names>" for every WordNet id (optional; class names)
      train/<wnid>/images/*.JPEG         500 per class
      val/images/*.JPEG                  10,000 images, flat as released ...
      val/val_annotations.txt            "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per line
      val/images/<wnid>/*.JPEG           ... or re-foldered by ``refolder_val`` (Vaze's ``create_val_img_folder``)

Class ids index the sorted wnid folders of ``train/`` (ImageFolder order), which is what the published
TinyImageNet open-set splits refer to. Samples are ordered by (class id, file name) in both layouts, matching
ImageFolder over the re-foldered ``val/images``.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from fsosr.data.errors import MalformedDataError, MissingDataError
from fsosr.data.readers.base import ImageDataset
from fsosr.data.readers.folders import _images_below, _listdir

TINYIMAGENET_LAYOUT = """  <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG
  <root>/tiny-imagenet-200/val/images/*.JPEG + val/val_annotations.txt ("<file>\\t<wnid>\\t..." per line)
    (or val/images/<wnid>/*.JPEG after re-foldering)
  <root>/tiny-imagenet-200/words.txt, wnids.txt (optional)"""


def find_tinyimagenet_root(root: str | os.PathLike) -> str:
    root = os.fspath(root)
    nested = os.path.join(root, "tiny-imagenet-200")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(os.path.join(root, "train")):
        return root
    raise MissingDataError(nested, TINYIMAGENET_LAYOUT)


def read_val_annotations(path: str) -> list[tuple[str, str]]:
    """``val_annotations.txt`` -> [(file name, wnid)] in file order."""
    if not os.path.isfile(path):
        raise MissingDataError(path, TINYIMAGENET_LAYOUT)
    pairs = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise MalformedDataError(path, f"line {number} is {line.strip()!r}; expected tab-separated "
                                               "'<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>'", TINYIMAGENET_LAYOUT)
            pairs.append((fields[0], fields[1]))
    return pairs


def refolder_val(root: str | os.PathLike) -> int:
    """Move ``val/images/<file>`` to ``val/images/<wnid>/<file>`` as Vaze's ``create_val_img_folder`` does.

    Idempotent (files already moved are skipped); returns the number of files moved. Reading does not need
    this: :class:`TinyImageNet` reads either layout. It exists for tools that expect an ImageFolder.
    """
    base = find_tinyimagenet_root(root)
    images = os.path.join(base, "val", "images")
    moved = 0
    for file_name, wnid in read_val_annotations(os.path.join(base, "val", "val_annotations.txt")):
        source = os.path.join(images, file_name)
        if os.path.exists(source):
            os.makedirs(os.path.join(images, wnid), exist_ok=True)
            os.replace(source, os.path.join(images, wnid, file_name))
            moved += 1
    return moved


def _read_words(path: str) -> dict[str, str]:
    words = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                wnid, _, names = line.rstrip("\n").partition("\t")
                if wnid:
                    words[wnid] = names.strip()
    return words


class TinyImageNet(ImageDataset):
    """TinyImageNet-200 ``split`` ("train", or "val" / "test": the labelled validation set used as test set).

    ``.wnids`` lists the class folders; ``.classes`` the full ``words.txt`` strings (e.g. "goldfish, Carassius
    auratus"), which FSMoE uses as prompt class names; wnids are used when ``words.txt`` is absent.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        base = find_tinyimagenet_root(root)
        train_dir = os.path.join(base, "train")
        if not os.path.isdir(train_dir):
            raise MissingDataError(train_dir, TINYIMAGENET_LAYOUT)
        wnids = [d for d in _listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d))]
        if not wnids:
            raise MalformedDataError(train_dir, "no class folders", TINYIMAGENET_LAYOUT)
        self._check_wnids_file(base, wnids)
        index = {w: i for i, w in enumerate(wnids)}
        if split == "train":
            samples = self._train_samples(train_dir, wnids)
        elif split in ("val", "test"):
            samples = self._val_samples(os.path.join(base, "val"), index)
        else:
            raise ValueError(f"TinyImageNet split must be 'train', 'val' or 'test', got {split!r}")
        samples.sort(key=lambda item: (item[1], os.path.basename(item[0])))
        words = _read_words(os.path.join(base, "words.txt"))
        self.wnids = wnids
        super().__init__(paths=[p for p, _ in samples], targets=[c for _, c in samples],
                         classes=[words.get(w, w) for w in wnids], transform=transform,
                         target_transform=target_transform, name=f"tinyimagenet/{split}")

    @staticmethod
    def _check_wnids_file(base: str, wnids: list[str]) -> None:
        path = os.path.join(base, "wnids.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8-sig") as handle:
                listed = sorted(line.strip() for line in handle if line.strip())
            if listed != wnids:
                raise MalformedDataError(path, f"lists {len(listed)} wnids that differ from the {len(wnids)} "
                                               "folders of train/", TINYIMAGENET_LAYOUT)

    @staticmethod
    def _train_samples(train_dir: str, wnids: list[str]) -> list[tuple[str, int]]:
        samples = []
        for label, wnid in enumerate(wnids):
            found = _images_below(os.path.join(train_dir, wnid))
            if not found:
                raise MalformedDataError(os.path.join(train_dir, wnid), "class folder holds no images",
                                         TINYIMAGENET_LAYOUT)
            samples.extend((path, label) for path in found)
        return samples

    @staticmethod
    def _val_samples(val_dir: str, index: dict[str, int]) -> list[tuple[str, int]]:
        images = os.path.join(val_dir, "images")
        if not os.path.isdir(images):
            raise MissingDataError(images, TINYIMAGENET_LAYOUT)
        annotations = os.path.join(val_dir, "val_annotations.txt")
        if not os.path.isfile(annotations):  # re-foldered and the annotation file removed: read the folders
            samples = []
            for wnid in _listdir(images):
                if os.path.isdir(os.path.join(images, wnid)):
                    if wnid not in index:
                        raise MalformedDataError(os.path.join(images, wnid), "wnid not among train/ classes",
                                                 TINYIMAGENET_LAYOUT)
                    samples.extend((p, index[wnid]) for p in _images_below(os.path.join(images, wnid)))
            if not samples:
                raise MissingDataError(annotations, TINYIMAGENET_LAYOUT)
            return samples
        samples = []
        for file_name, wnid in read_val_annotations(annotations):
            if wnid not in index:
                raise MalformedDataError(annotations, f"{file_name} has wnid {wnid}, which is not a train/ class",
                                         TINYIMAGENET_LAYOUT)
            flat, foldered = os.path.join(images, file_name), os.path.join(images, wnid, file_name)
            path = flat if os.path.isfile(flat) else foldered
            if not os.path.isfile(path):
                raise MissingDataError(flat, TINYIMAGENET_LAYOUT)
            samples.append((path, index[wnid]))
        return samples
