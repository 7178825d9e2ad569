"""Published open-set splits, label remapping and balanced evaluation subsampling."""
import numpy as np
import pytest

from fsosr.data import balanced_eval_indices, osr_split, remap_labels
from fsosr.data.splits import CIFAR_PLUS_10_UNKNOWN, CIFAR_PLUS_50_UNKNOWN, DIGITS_KNOWN


def test_cifar10_split_values_match_the_published_lists():
    assert osr_split("cifar10", 0) == ([0, 6, 4, 9, 1, 7], [2, 3, 5, 8])
    assert osr_split("cifar10", 1) == ([7, 6, 4, 9, 0, 1], [2, 3, 5, 8])
    assert osr_split("cifar10", 4) == ([2, 4, 1, 7, 9, 6], [0, 3, 5, 8])


@pytest.mark.parametrize("name, classes, known_size", [("cifar10", 10, 6), ("tinyimagenet", 200, 20),
                                                        ("digits", 10, 6)])
@pytest.mark.parametrize("split", range(5))
def test_complement_splits_partition_the_classes(name, classes, known_size, split):
    known, unknown = osr_split(name, split)
    assert len(known) == len(set(known)) == known_size
    assert unknown == sorted(set(range(classes)) - set(known))
    assert set(known).isdisjoint(unknown)


@pytest.mark.parametrize("split", range(5))
def test_cifar_plus_n_unknowns_are_cifar100_lists(split):
    known10, unknown10 = osr_split("cifar+10", split)
    known50, unknown50 = osr_split("cifar+50", split)
    assert known10 == known50 == [[4, 7, 9, 1], [6, 7, 1, 9], [9, 6, 1, 7], [6, 4, 9, 1], [1, 0, 9, 8]][split]
    assert len(set(unknown10)) == 10 and len(set(unknown50)) == 50
    assert all(0 <= c < 100 for c in unknown50)
    assert unknown10 == list(CIFAR_PLUS_10_UNKNOWN[split])
    # The published +50 rows end with the same ten classes as the +10 row of that split.
    assert set(unknown50[-10:]) == set(unknown10)


def test_tinyimagenet_and_cifar_plus_first_rows():
    known, unknown = osr_split("tinyimagenet", 0)
    assert known[:5] == [108, 147, 17, 58, 193] and known[-1] == 133 and len(unknown) == 180
    assert osr_split("cifar+10", 0)[1] == [30, 25, 1, 9, 8, 0, 46, 52, 49, 71]
    assert CIFAR_PLUS_50_UNKNOWN[4][:3] == (47, 6, 19)


def test_digits_splits_follow_their_documented_rule():
    for split, known in enumerate(DIGITS_KNOWN):
        assert list(known) == np.random.RandomState(split).permutation(10)[:6].tolist()
    assert len({tuple(sorted(k)) for k in DIGITS_KNOWN}) == 5  # five different known sets


def test_aliases_determinism_and_errors():
    assert osr_split("cifar-10-10", 2) == osr_split("CIFAR10", 2)
    assert osr_split("cifar-10-100-50", 3) == osr_split("cifar+50", 3)
    first = osr_split("tinyimagenet", 1)
    first[0].append(999)  # callers get fresh lists; the tables cannot be mutated through them
    assert osr_split("tinyimagenet", 1)[0][-1] == 67
    with pytest.raises(ValueError, match="0..4"):
        osr_split("cifar10", 5)
    with pytest.raises(KeyError, match="svhn"):
        osr_split("svhn", 0)


def test_remap_labels_follows_split_order():
    known, _ = osr_split("cifar10", 1)  # [7, 6, 4, 9, 0, 1]
    np.testing.assert_array_equal(remap_labels([7, 1, 0, 9, 6, 4, 7], known), [0, 5, 4, 3, 1, 2, 0])
    np.testing.assert_array_equal(remap_labels([2, 7, 8], known, missing=-1), [-1, 0, -1])
    with pytest.raises(ValueError, match="not in class_order"):
        remap_labels([2], known)
    with pytest.raises(ValueError, match="repeated"):
        remap_labels([1], [1, 1])
    assert remap_labels([], known).shape == (0,)


def test_vaze_balancing_keeps_duplicates_and_equal_sizes():
    known_idx, unknown_idx = balanced_eval_indices(6000, 4000, variant="vaze", seed=3)
    np.testing.assert_array_equal(unknown_idx, np.arange(4000))
    assert known_idx.shape == (4000,)
    np.random.seed(3)  # the original draws from numpy's global generator
    np.testing.assert_array_equal(known_idx, np.random.choice(range(6000), size=(4000,)))
    assert len(np.unique(known_idx)) < 4000  # with replacement: duplicates are kept


def test_fsmoe_balancing_deduplicates():
    vaze_known, _ = balanced_eval_indices(6000, 4000, variant="vaze", seed=0)
    known_idx, unknown_idx = balanced_eval_indices(6000, 4000, variant="fsmoe", seed=0)
    np.testing.assert_array_equal(known_idx, np.unique(vaze_known))
    assert len(unknown_idx) == 4000
    expected = 6000 * (1 - np.exp(-4000 / 6000))  # ~2920 unique of 6000 (FSMoE on CIFAR-10 6/4: ~2.9k)
    assert abs(len(known_idx) - expected) < 60
    # Unknown side larger (CIFAR+50: 5k unknowns vs 4k knowns) shrinks the unknowns instead.
    known_idx, unknown_idx = balanced_eval_indices(4000, 5000, variant="fsmoe", seed=0)
    assert len(known_idx) == 4000 and abs(len(unknown_idx) - 5000 * (1 - np.exp(-0.8))) < 60


def test_balancing_edge_cases():
    known_idx, unknown_idx = balanced_eval_indices(5, 5, variant="fsmoe")
    np.testing.assert_array_equal(known_idx, np.arange(5))
    np.testing.assert_array_equal(unknown_idx, np.arange(5))
    with pytest.raises(ValueError, match="variant"):
        balanced_eval_indices(3, 2, variant="other")
