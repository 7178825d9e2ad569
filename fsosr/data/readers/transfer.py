"""Visual fine-tuning benchmarks used by MoSA: FGVC (VPT's JSON annotations) and VTAB-1k (list files).

FGVC (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars), as prepared for VPT / MoSA:

    <root>/train.json, val.json, test.json    each a JSON object {"<image path relative to the image dir>": label}
    image dir: <root>/images if it exists (CUB, NABirds), else <root>/Images (Stanford Dogs), else <root>

VTAB-1k, as released in folder form (the NOAH / "vtab-1k" archives; MoSA itself reads VTAB through tfds):

    <root>/<task>/images/...                  the task's images
    <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt
        one "<image path relative to <root>/<task>> <integer label>" per line

Labels: FGVC ids are ranked (sorted unique ids -> 0..C-1, as VPT's ``_class_id_cont_id``); VTAB labels are kept,
and a task's class count is the published one (``VTAB_NUM_CLASSES``), the same for every split: a 200-image val
list misses some of SUN397's 397 classes, so counting the labels of one file would size the head wrongly. For a
task folder with another name, the count comes from the labels of all its list files.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np

from fsosr.data.errors import MalformedDataError, MissingDataError
from fsosr.data.readers.base import ImageDataset

FGVC_LAYOUT = """  <root>/train.json, val.json, test.json   ({"<relative image path>": <label>, ...})
  images under <root>/images, <root>/Images or <root>"""
VTAB_LAYOUT = """  <root>/<task>/images/...
  <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt  ("<relative path> <label>" per line)"""

# Split names -> list files; the short names follow VPT's use (train = 800, val = 200, trainval = 1000).
VTAB_SPLIT_FILES = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt",
                    "test": "test.txt", "train800": "train800.txt", "val200": "val200.txt",
                    "train800val200": "train800val200.txt"}

# Classes per VTAB-1k task, under the folder names of the released archives (as in NOAH / SSF / VPT configs).
VTAB_NUM_CLASSES = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}


class FGVCDataset(ImageDataset):
    """One FGVC dataset ``split`` ("train", "val", "test") from VPT-style JSON annotation files."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, image_dir: str | os.PathLike | None = None):
        root = os.fspath(root)
        if split not in ("train", "val", "test"):
            raise ValueError(f"FGVC split must be 'train', 'val' or 'test', got {split!r}")
        path = os.path.join(root, f"{split}.json")
        if not os.path.isfile(path):
            raise MissingDataError(path, FGVC_LAYOUT)
        try:
            with open(path, encoding="utf-8-sig") as handle:
                annotations = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MalformedDataError(path, f"not valid JSON ({error})", FGVC_LAYOUT) from error
        if not isinstance(annotations, dict) or not all(isinstance(v, int) for v in annotations.values()):
            raise MalformedDataError(path, "expected an object mapping image paths to integer labels", FGVC_LAYOUT)
        if image_dir is None:
            image_dir = next((os.path.join(root, d) for d in ("images", "Images")
                              if os.path.isdir(os.path.join(root, d))), root)
        image_dir = os.fspath(image_dir)
        files = sorted(annotations)
        self.label_ids, ranked = np.unique(np.asarray([annotations[f] for f in files], dtype=np.int64),
                                           return_inverse=True)
        paths = [os.path.join(image_dir, f) for f in files]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise MissingDataError(absent[0], FGVC_LAYOUT + f"\n  ({len(absent)} listed images are missing)")
        super().__init__(paths=paths, targets=ranked.reshape(-1), classes=[str(i) for i in self.label_ids],
                         transform=transform, target_transform=target_transform,
                         name=f"fgvc/{os.path.basename(os.path.normpath(root))}/{split}")


def read_list_file(path: str, base: str, layout: str) -> tuple[list[str], list[int]]:
    """``"<relative path> <label>"`` lines -> (absolute paths, labels); errors name the file and line."""
    if not os.path.isfile(path):
        raise MissingDataError(path, layout)
    paths, labels = [], []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            relative, _, label = line.strip().rpartition(" ")
            if not relative or not re.fullmatch(r"[0-9]+", label):
                raise MalformedDataError(path, f"line {number} is {line.strip()!r}; expected '<path> <label>' with "
                                         "a non-negative integer label", layout)
            paths.append(os.path.join(base, relative))
            labels.append(int(label))
    return paths, labels


class VTAB1k(ImageDataset):
    """One VTAB-1k task ``split`` ("train" 800, "val" 200, "trainval" 1000, "test") from its list files.

    ``num_classes``: the task's class count; default: ``VTAB_NUM_CLASSES[task]``, else counted over all the task's
    list files. A label outside [0, num_classes) is an error."""

    def __init__(self, root: str | os.PathLike, task: str, split: str = "trainval",
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 num_classes: int | None = None):
        if split not in VTAB_SPLIT_FILES:
            raise ValueError(f"VTAB-1k split must be one of {list(VTAB_SPLIT_FILES)}, got {split!r}")
        base = os.path.join(os.fspath(root), task)
        if not os.path.isdir(base):
            raise MissingDataError(base, VTAB_LAYOUT)
        paths, labels = read_list_file(os.path.join(base, VTAB_SPLIT_FILES[split]), base, VTAB_LAYOUT)
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise MissingDataError(absent[0], VTAB_LAYOUT + f"\n  ({len(absent)} listed images are missing)")
        if num_classes is None:
            num_classes = VTAB_NUM_CLASSES.get(task)
        list_file = os.path.join(base, VTAB_SPLIT_FILES[split])
        if num_classes is None:   # this split's labels are read already; the other list files add theirs
            other_files = [os.path.join(base, name) for name in sorted(set(VTAB_SPLIT_FILES.values()))
                           if os.path.join(base, name) != list_file and os.path.isfile(os.path.join(base, name))]
            every_label = labels + [label for path in other_files
                                    for label in read_list_file(path, base, VTAB_LAYOUT)[1]]
            num_classes = max(every_label) + 1 if every_label else 0
        outside = [label for label in labels if label >= num_classes]
        if outside:
            raise MalformedDataError(list_file, f"label {outside[0]} is outside the task's {num_classes} classes",
                                     VTAB_LAYOUT)
        super().__init__(paths=paths, targets=labels, classes=[str(i) for i in range(num_classes)],
                         transform=transform, target_transform=target_transform, name=f"vtab/{task}/{split}")
