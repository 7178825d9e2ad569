"""Samplers: K-shot subsets (Dassl rule, cached), open-set few-shot episodes (TANE/DNPG rule), class-incremental
task splits, and the MTCL dataset sequence.

Everything returns **indices into a dataset's samples** (or class ids), so the same sampler serves every reader.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import random
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsosr.data.readers.folders import MTIL_DATASETS

# ----------------------------------------------------------------------------------------------------------------
# K-shot per class (CoOp / LoCoOp through Dassl's DatasetBase.generate_fewshot_dataset)
# ----------------------------------------------------------------------------------------------------------------


def few_shot_indices(labels: Sequence[int] | np.ndarray, num_shots: int, seed: int | random.Random,
                     *, repeat: bool = False) -> np.ndarray:
    """Indices of ``num_shots`` samples per class, drawn by Dassl's rule.

    Classes are visited in order of first appearance; each draws ``random.sample(items, num_shots)`` from a
    Python ``random.Random(seed)``; a class with fewer samples keeps all of them (or, with ``repeat``, draws
    ``random.choices(items, k=num_shots)``). Pass a ``random.Random`` instead of a seed to chain draws the way
    Dassl does for train then val (``val_shots``) from one seeded generator. ``num_shots < 1`` keeps everything.

    With the same sample order this reproduces Dassl's selection for ``cfg.SEED``; note that Dassl lists files
    with ``os.listdir`` (unsorted) where fsosr's readers sort them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_shots < 1:
        return np.arange(labels.size, dtype=np.int64)
    # int(): random.Random refuses numpy integers (Python >= 3.11); Dassl passes an int, whose stream this equals.
    rng = seed if isinstance(seed, random.Random) else random.Random(operator.index(seed))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(index)
    chosen: list[int] = []
    for items in by_class.values():
        if len(items) >= num_shots:
            chosen.extend(rng.sample(items, num_shots))
        elif repeat:
            chosen.extend(rng.choices(items, k=num_shots))
        else:
            chosen.extend(items)
    return np.asarray(chosen, dtype=np.int64)


def val_shots(num_shots: int) -> int:
    """Dassl's validation shots for a K-shot run: ``min(K, 4)``."""
    return min(num_shots, 4)


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def cached_few_shot_indices(labels: Sequence[int] | np.ndarray, num_shots: int, seed: int, cache_dir: str | os.PathLike,
                            *, repeat: bool = False) -> np.ndarray:
    """:func:`few_shot_indices`, stored as ``<cache_dir>/shot_<K>-seed_<S>[-repeat].json``.

    Put ``cache_dir`` next to the dataset (Dassl keeps ``<root>/<dataset>/split_fewshot/``) so every run with the
    same (K, seed) trains on the same images. The file records a SHA-256 of the label vector: a cache written
    for different data is recomputed (with a warning) instead of silently reused. Written atomically.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if isinstance(seed, random.Random) or not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"cached_few_shot_indices needs an int seed (it names the cache file), got {seed!r}")
    seed = int(seed)
    cache_dir = os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"shot_{num_shots}-seed_{seed}{'-repeat' if repeat else ''}.json")
    digest = _labels_digest(labels)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                cached = json.load(handle)
            if not isinstance(cached, dict):
                raise ValueError(f"expected a JSON object, got {type(cached).__name__}")
            if cached.get("labels_sha256") == digest:
                indices = np.asarray(cached["indices"], dtype=np.int64).reshape(-1)
                if indices.size and (indices.min() < 0 or indices.max() >= labels.size):
                    raise ValueError("indices outside the labels")
                return indices
            warnings.warn(f"{path} was made for different labels; recomputing the {num_shots}-shot split",
                          stacklevel=2)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:   # JSONDecodeError is a ValueError
            warnings.warn(f"{path} is unreadable ({error}); recomputing the {num_shots}-shot split", stacklevel=2)
    indices = few_shot_indices(labels, num_shots, seed, repeat=repeat)
    os.makedirs(cache_dir, exist_ok=True)
    record = {"num_shots": num_shots, "seed": seed, "repeat": repeat, "num_samples": int(labels.size),
              "labels_sha256": digest, "rule": "dassl: random.Random(seed).sample per class, first-appearance order",
              "indices": indices.tolist()}
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=".shot-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(record, out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return indices


# ----------------------------------------------------------------------------------------------------------------
# Open-set few-shot episodes (TANE / DNPG: OpenMini.get_episode with fix_seed=True)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot open-set episode, as dataset indices.

    ``support[i]`` / ``query[i]`` hold class ``known_classes[i]`` (episode label ``i``); ``open_support[j]`` /
    ``open_query[j]`` hold class ``open_classes[j]``. Shapes: support [N, K], query [N, Q], open_support
    [N_open, K], open_query [N_open, Q]. Class ids are the dataset's labels.
    """

    index: int
    known_classes: np.ndarray
    open_classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    open_support: np.ndarray
    open_query: np.ndarray

    def support_labels(self) -> np.ndarray:
        """Episode labels 0..N-1 of ``support.reshape(-1)``."""
        return np.repeat(np.arange(self.support.shape[0]), self.support.shape[1])

    def query_labels(self) -> np.ndarray:
        """Episode labels 0..N-1 of ``query.reshape(-1)``."""
        return np.repeat(np.arange(self.query.shape[0]), self.query.shape[1])


class OpenSetEpisodes:
    """N-way K-shot open-set episodes with a fixed seed per episode: episode ``i`` is the same in every run.

    Default shape is DNPG's evaluation: 5 known classes x (K support + 15 queries) and 5 open classes x
    (K "suppopen" + 15 open queries), all from ``labels``' classes. Episode ``i`` reproduces TANE's draw sequence
    under ``np.random.seed(i + seed_offset)``: known classes, then per class support and disjoint queries, then
    open classes among the rest, then per open class its support and queries.

    ``open_queries="tane"`` draws open queries from all of the class's images, as the original does (they may
    repeat the open support: DNPG's loader draws ``np.random.choice(range(len(imgs)), 15)``); ``"disjoint"``
    excludes the open support.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, n_ways: int = 5, n_open_ways: int = 5,
                 n_shots: int = 1, n_queries: int = 15, n_episodes: int = 3000, seed_offset: int = 0,
                 open_queries: str = "tane"):
        if open_queries not in ("tane", "disjoint"):
            raise ValueError(f"open_queries must be 'tane' or 'disjoint', got {open_queries!r}")
        labels = np.asarray(labels, dtype=np.int64)
        self.class_ids, ranked = np.unique(labels, return_inverse=True)
        if n_ways + n_open_ways > len(self.class_ids):
            raise ValueError(f"{n_ways} known + {n_open_ways} open classes need more than the "
                             f"{len(self.class_ids)} classes present")
        # Per-class sample positions in dataset order; classes in order of first appearance (TANE's dict order).
        first_seen = np.unique(ranked, return_index=True)[1]
        self._order = ranked[np.sort(first_seen)]
        self._members = [np.flatnonzero(ranked == c) for c in range(len(self.class_ids))]
        smallest = min(len(m) for m in self._members)
        if smallest < n_shots + n_queries:
            raise ValueError(f"a class has only {smallest} samples; an episode needs {n_shots} + {n_queries}")
        self.n_ways, self.n_open_ways, self.n_shots, self.n_queries = n_ways, n_open_ways, n_shots, n_queries
        self.n_episodes, self.seed_offset, self.open_queries = n_episodes, seed_offset, open_queries

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self):
        return (self[i] for i in range(self.n_episodes))

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self.n_episodes:
            raise IndexError(f"episode {index} out of range for {self.n_episodes} episodes")
        rng = np.random.RandomState(index + self.seed_offset)  # same stream as np.random.seed(index)
        known = rng.choice(self._order, self.n_ways, False)
        support, query = [], []
        for c in known:
            size = len(self._members[c])
            shots = rng.choice(size, self.n_shots, False)
            queries = rng.choice(np.setxor1d(np.arange(size), shots), self.n_queries, False)
            support.append(self._members[c][shots])
            query.append(self._members[c][queries])
        rest = np.setxor1d(np.arange(len(self.class_ids)), known)
        open_classes = rng.choice(rest, self.n_open_ways, False)
        open_support, open_query = [], []
        for c in open_classes:
            size = len(self._members[c])
            shots = rng.choice(size, self.n_shots, False)
            pool = np.arange(size) if self.open_queries == "tane" else np.setxor1d(np.arange(size), shots)
            queries = rng.choice(pool, self.n_queries, False)
            open_support.append(self._members[c][shots])
            open_query.append(self._members[c][queries])
        def grid(rows: list, rows_expected: int, columns: int) -> np.ndarray:  # also right for 0 open classes
            return np.asarray(rows, dtype=np.int64).reshape(rows_expected, columns)

        return Episode(index=index, known_classes=self.class_ids[known], open_classes=self.class_ids[open_classes],
                       support=grid(support, self.n_ways, self.n_shots), query=grid(query, self.n_ways, self.n_queries),
                       open_support=grid(open_support, self.n_open_ways, self.n_shots),
                       open_query=grid(open_query, self.n_open_ways, self.n_queries))


# ----------------------------------------------------------------------------------------------------------------
# Class-incremental task splits (MoE-Adapters4CL CIL on continuum) and the MTCL sequence
# ----------------------------------------------------------------------------------------------------------------

# CIFAR-100 class order of the class-incremental benchmarks: iCaRL's order (its "seed 1993" shuffle), as shipped in
# MoE-Adapters4CL's cil/class_orders/cifar100.yaml (also used by DER, PODNet and continuum-based code).
CIFAR100_CLASS_ORDER = (
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
    67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
    31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
    48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
)

# "<initial>-<increment>" scenarios of MoE-Adapters4CL's CIFAR-100 configs.
CIFAR100_SCENARIOS = {"10-10": (10, 10), "5-5": (5, 5), "2-2": (2, 2)}


def class_incremental_tasks(class_order: Sequence[int], initial_increment: int, increment: int) -> list[list[int]]:
    """Split ``class_order`` into tasks: the first ``initial_increment`` classes, then ``increment`` at a time."""
    order = [int(c) for c in class_order]
    if len(set(order)) != len(order):
        raise ValueError("class_order repeats a class")
    if (initial_increment < 1 or increment < 1 or initial_increment > len(order)
            or (len(order) - initial_increment) % increment):
        raise ValueError(f"{len(order)} classes do not split into {initial_increment} + k x {increment}")
    tasks = [order[:initial_increment]]
    tasks += [order[i:i + increment] for i in range(initial_increment, len(order), increment)]
    return tasks


def cifar100_tasks(scenario: str = "10-10") -> list[list[int]]:
    """CIFAR-100 class-incremental tasks ("10-10": 10 tasks, "5-5": 20, "2-2": 50) in the iCaRL class order."""
    if scenario not in CIFAR100_SCENARIOS:
        raise KeyError(f"unknown CIFAR-100 scenario {scenario!r}; expected one of {list(CIFAR100_SCENARIOS)}")
    return class_incremental_tasks(CIFAR100_CLASS_ORDER, *CIFAR100_SCENARIOS[scenario])


def task_indices(labels: Sequence[int] | np.ndarray, tasks: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Dataset indices of each task's classes (dataset order). Labels stay the dataset's; map them to
    incremental labels (``class_order[i] -> i``, as continuum does) with ``splits.remap_labels(labels, order)``."""
    labels = np.asarray(labels, dtype=np.int64)
    return [np.flatnonzero(np.isin(labels, list(task))) for task in tasks]


def seen_classes(tasks: Sequence[Sequence[int]], task: int) -> list[int]:
    """Classes learned up to and including ``task`` (class-incremental evaluation covers all of them)."""
    if not 0 <= task < len(tasks):
        raise IndexError(f"task {task} does not exist: there are {len(tasks)} tasks (0..{len(tasks) - 1})")
    return [c for t in tasks[:task + 1] for c in t]


# MTCL / MTIL order I (ZSCL's, as MoE-Adapters4CL runs it). Order II was not checked against a source: left out.
MTCL_ORDER_I = MTIL_DATASETS


def mtcl_sequence(order: str | Sequence[str] = "I") -> list[str]:
    """The MTCL task sequence: ``"I"`` (Aircraft ... SUN397) or an explicit list of MTIL dataset names."""
    if isinstance(order, str):
        if order != "I":
            raise KeyError(f"unknown MTCL order {order!r}; only order 'I' is defined (or pass a list of names)")
        return list(MTCL_ORDER_I)
    lookup = {name.lower(): name for name in MTIL_DATASETS}
    unknown = [name for name in order if name.lower() not in lookup]
    if unknown:
        raise KeyError(f"unknown MTIL datasets {unknown}; expected names from {', '.join(MTIL_DATASETS)}")
    return [lookup[name.lower()] for name in order]
