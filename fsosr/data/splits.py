"""Open-set splits exactly as published, label remapping, and balanced open-set evaluation subsampling.

Source of the tables: ``data/open_set_splits/osr_splits.py`` of sgvaze/osr_closed_set_all_you_need (Vaze et al.,
"Open-Set Recognition: a Good Closed-Set Classifier is All You Need", ICLR'22), which descends from ARPL's
``split.py`` and is vendored unchanged by FSMoE. The lists below are copied from that file and cross-checked
against FSMoE's copy.

Conventions (Vaze's ``get_class_splits``):
- each list gives the **known** classes, in the order that defines their remapped labels 0..K-1;
- CIFAR-10 and TinyImageNet unknowns are the complement, in ascending order;
- CIFAR+N: the knowns are 4 CIFAR-10 classes, the unknowns the listed CIFAR-100 classes (their images come from the
  CIFAR-100 **test** set), in list order;
- TinyImageNet ids index the sorted wnid folders of ``tiny-imagenet-200/train`` (ImageFolder order).

"digits" is fsosr's embedded benchmark (scikit-learn's 8x8 digits, see :mod:`fsosr.data.digits`): 6 known /
4 unknown digits, five splits drawn once as ``numpy.random.RandomState(s).permutation(10)`` (known = the first six
in that order, unknown = the other four ascending) and frozen here as literals so they never move with numpy.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_SPLITS = 5

# 'cifar-10-10': 6 known CIFAR-10 classes per split.
CIFAR10_KNOWN = (
    (0, 6, 4, 9, 1, 7),
    (7, 6, 4, 9, 0, 1),
    (1, 5, 7, 3, 9, 4),
    (8, 6, 1, 9, 0, 7),
    (2, 4, 1, 7, 9, 6),
)

# 'cifar-10-100': 4 known CIFAR-10 classes per split, shared by CIFAR+10 and CIFAR+50.
CIFAR_PLUS_KNOWN = (
    (4, 7, 9, 1),
    (6, 7, 1, 9),
    (9, 6, 1, 7),
    (6, 4, 9, 1),
    (1, 0, 9, 8),
)

# 'cifar-10-100-10': 10 unknown CIFAR-100 classes per split.
CIFAR_PLUS_10_UNKNOWN = (
    (30, 25, 1, 9, 8, 0, 46, 52, 49, 71),
    (41, 9, 49, 40, 73, 60, 48, 30, 95, 71),
    (8, 9, 49, 40, 73, 60, 48, 95, 30, 71),
    (95, 60, 30, 73, 46, 49, 68, 99, 8, 71),
    (33, 2, 3, 97, 46, 21, 64, 63, 88, 43),
)

# 'cifar-10-100-50': 50 unknown CIFAR-100 classes per split (each row ends with that split's +10 list).
CIFAR_PLUS_50_UNKNOWN = (
    (27, 94, 29, 77, 88, 26, 69, 48, 75, 5, 59, 93, 39, 57, 45, 40, 78, 20, 98, 47, 66, 70, 91, 76, 41, 83, 99, 32,
     53, 72, 2, 95, 21, 73, 84, 68, 35, 11, 55, 60, 30, 25, 1, 9, 8, 0, 46, 52, 49, 71),
    (65, 97, 86, 24, 45, 67, 2, 3, 91, 98, 79, 29, 62, 82, 33, 76, 0, 35, 5, 16, 54, 11, 99, 52, 85, 1, 25, 66, 28,
     84, 23, 56, 75, 46, 21, 72, 55, 68, 8, 69, 41, 9, 49, 40, 73, 60, 48, 30, 95, 71),
    (20, 83, 65, 97, 94, 2, 93, 16, 67, 29, 62, 33, 24, 98, 5, 86, 35, 54, 0, 91, 52, 66, 85, 84, 56, 11, 1, 76, 25,
     55, 21, 99, 72, 41, 23, 75, 28, 68, 69, 46, 8, 9, 49, 40, 73, 60, 48, 95, 30, 71),
    (92, 82, 77, 64, 5, 33, 62, 56, 70, 0, 20, 28, 67, 14, 84, 53, 91, 29, 85, 2, 52, 83, 75, 35, 11, 21, 72, 98, 55,
     1, 41, 76, 25, 66, 69, 9, 48, 54, 40, 23, 95, 60, 30, 73, 46, 49, 68, 99, 8, 71),
    (47, 6, 19, 0, 62, 93, 59, 65, 54, 70, 34, 55, 23, 38, 72, 76, 53, 31, 78, 96, 77, 27, 92, 18, 82, 50, 98, 32, 1,
     75, 83, 4, 51, 35, 80, 11, 74, 66, 36, 42, 33, 2, 3, 97, 46, 21, 64, 63, 88, 43),
)

# 'tinyimagenet': 20 known of 200 (indices into the sorted wnids).
TINYIMAGENET_KNOWN = (
    (108, 147, 17, 58, 193, 123, 72, 144, 75, 167, 134, 14, 81, 171, 44, 197, 152, 66, 1, 133),
    (198, 161, 91, 59, 57, 134, 61, 184, 90, 35, 29, 23, 199, 38, 133, 19, 186, 18, 85, 67),
    (177, 0, 119, 26, 78, 80, 191, 46, 134, 92, 31, 152, 27, 60, 114, 50, 51, 133, 162, 93),
    (98, 36, 158, 177, 189, 157, 170, 191, 82, 196, 138, 166, 43, 13, 152, 11, 75, 174, 193, 190),
    (95, 6, 145, 153, 0, 143, 31, 23, 189, 81, 20, 21, 89, 26, 36, 170, 102, 177, 108, 169),
)

# fsosr's digits benchmark: RandomState(s).permutation(10)[:6] for s = 0..4 (see module docstring).
DIGITS_KNOWN = (
    (2, 8, 4, 9, 1, 6),
    (2, 9, 6, 4, 0, 3),
    (4, 1, 5, 0, 7, 2),
    (5, 4, 1, 2, 9, 6),
    (3, 8, 4, 9, 2, 6),
)

# Accepted spellings -> canonical name. The Vaze/FSMoE dataset keys are accepted too.
_ALIASES = {
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar-10-10": "cifar10",
    "cifar+10": "cifar+10", "cifar-10-100-10": "cifar+10",
    "cifar+50": "cifar+50", "cifar-10-100-50": "cifar+50",
    "tinyimagenet": "tinyimagenet", "tiny-imagenet": "tinyimagenet", "tinyimagenet-200": "tinyimagenet",
    "digits": "digits", "digits-osr": "digits",
}

# Number of classes of the dataset each name's class ids index (unknowns of CIFAR+N index CIFAR-100).
_NUM_CLASSES = {"cifar10": 10, "tinyimagenet": 200, "digits": 10}

OSR_SPLIT_NAMES = ("cifar10", "cifar+10", "cifar+50", "tinyimagenet", "digits")


def canonical_osr_name(name: str) -> str:
    key = name.strip().lower()
    if key not in _ALIASES:
        raise KeyError(f"unknown open-set benchmark {name!r}; expected one of {', '.join(OSR_SPLIT_NAMES)}")
    return _ALIASES[key]


def osr_split(name: str, split: int) -> tuple[list[int], list[int]]:
    """``(known_classes, unknown_classes)`` of open-set split ``split`` (0..4) of benchmark ``name``.

    Known classes come in the published order (known label ``i`` is ``known_classes[i]`` after remapping).
    For "cifar+10" / "cifar+50" the known ids are CIFAR-10 classes and the unknown ids CIFAR-100 classes;
    elsewhere both index the same dataset and the unknowns are the ascending complement.
    """
    canonical = canonical_osr_name(name)
    if not isinstance(split, (int, np.integer)) or not 0 <= split < NUM_SPLITS:
        raise ValueError(f"split must be an integer in 0..{NUM_SPLITS - 1}, got {split!r}")
    split = int(split)
    if canonical == "cifar+10":
        return list(CIFAR_PLUS_KNOWN[split]), list(CIFAR_PLUS_10_UNKNOWN[split])
    if canonical == "cifar+50":
        return list(CIFAR_PLUS_KNOWN[split]), list(CIFAR_PLUS_50_UNKNOWN[split])
    known = {"cifar10": CIFAR10_KNOWN, "tinyimagenet": TINYIMAGENET_KNOWN, "digits": DIGITS_KNOWN}[canonical][split]
    unknown = [c for c in range(_NUM_CLASSES[canonical]) if c not in known]
    return list(known), unknown


def remap_labels(labels: Sequence[int] | np.ndarray, class_order: Sequence[int], *,
                 missing: int | None = None) -> np.ndarray:
    """Map each label to its position in ``class_order`` (``class_order[i] -> i``), as int64.

    Labels not in ``class_order`` raise a ValueError, or become ``missing`` when it is given
    (e.g. ``missing=-1`` to mark unknowns in a mixed test set).
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = np.asarray(class_order, dtype=np.int64).reshape(-1)
    if len(np.unique(order)) != len(order):
        raise ValueError(f"class_order has repeated classes: {order.tolist()}")
    # A binary search over the sorted order, not a lookup table: any int64 id works (-1 for unknowns, large
    # sparse ids), and memory does not grow with the largest id.
    sorter = np.argsort(order, kind="stable")
    position = np.minimum(np.searchsorted(order[sorter], labels), max(len(order) - 1, 0))
    found = order[sorter][position] == labels if order.size else np.zeros(labels.shape, dtype=bool)
    mapped = np.where(found, sorter[position] if order.size else 0, -1).astype(np.int64)
    absent = ~found
    if absent.any():
        if missing is None:
            raise ValueError(f"labels {sorted(set(labels[absent].tolist()))[:10]} are not in class_order")
        mapped[absent] = missing
    return mapped


# ----------------------------------------------------------------------------------------------------------------
# Balanced open-set evaluation: the larger of (known test set, unknown test set) is subsampled to the smaller's size.
# ----------------------------------------------------------------------------------------------------------------

BALANCE_VARIANTS = ("vaze", "fsmoe")


def balanced_eval_indices(num_known: int, num_unknown: int, *, variant: str = "vaze",
                          seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(known_idx, unknown_idx)`` that balance a known and an unknown test set.

    Both variants draw ``rng.choice(n_larger, size=n_smaller)`` **with replacement** from the larger set, as Vaze's
    ``get_equal_len_datasets`` does with numpy's global generator (``seed`` seeds a ``RandomState`` that produces
    the same draws as ``np.random.seed(seed)``); the smaller set is kept whole.

    - ``"vaze"`` (osr_closed_set_all_you_need, ``data/cifar.py``): ``subsample_dataset`` does ``data[idxs]``, so
      the draws are kept as drawn, duplicates included, and the two sets have equal length. (Its
      ``data/tinyimagenet.py`` subsamples images with ``if i in idxs``, which de-duplicates like ``"fsmoe"``, while
      its targets keep the duplicates: Vaze's TinyImageNet numbers come from the de-duplicated images.)
    - ``"fsmoe"``: FSMoE's rewritten ``subsample_dataset`` keeps sample ``i`` ``if i in idxs``, which de-duplicates
      (and sorts); the larger set shrinks to about ``n (1 - exp(-m / n))`` unique samples, so the sets are *not*
      equal in size. Use it only to reproduce FSMoE's numbers, and say so.
    """
    if variant not in BALANCE_VARIANTS:
        raise ValueError(f"variant must be one of {BALANCE_VARIANTS}, got {variant!r}")
    if num_known < 0 or num_unknown < 0:
        raise ValueError("set sizes must be non-negative")
    known_idx, unknown_idx = np.arange(num_known, dtype=np.int64), np.arange(num_unknown, dtype=np.int64)
    if num_known == num_unknown:
        return known_idx, unknown_idx
    rng = np.random.RandomState(seed)
    larger, smaller = max(num_known, num_unknown), min(num_known, num_unknown)
    drawn = rng.choice(larger, size=smaller).astype(np.int64)
    if variant == "fsmoe":
        drawn = np.unique(drawn)
    return (drawn, unknown_idx) if num_known > num_unknown else (known_idx, drawn)
