"""fsosr.metrics: hand-computed cases, parity with scikit-learn, and parity with slow textbook / original-code
definitions (written out here) on random scores with many ties."""
import math
import sys

import numpy as np
import pytest
import torch

from fsosr import metrics
from fsosr._student_t import t_quantile

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def tied_scores(rng, n_known, n_unknown, decimals):
    """Known scores a bit higher than unknown ones, rounded so that many values repeat (within and across sets)."""
    known = np.round(rng.normal(0.8, 1.0, n_known), decimals)
    unknown = np.round(rng.normal(0.0, 1.0, n_unknown), decimals)
    return known, unknown


def random_cases(seed, count=150):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n_known, n_unknown = (int(n) for n in rng.integers(1, 80, size=2))
        yield rng, *tied_scores(rng, n_known, n_unknown, int(rng.integers(0, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Slow definitions used as oracles
# ---------------------------------------------------------------------------------------------------------------
def hendrycks_fpr_original_structure(known, unknown, tpr):
    """The structure of Hendrycks' fpr_and_fdr_at_recall: descending sort, cumulative counts at distinct scores,
    slice from the first full-recall index back to the top, first argmin of |recall - tpr|."""
    scores = np.concatenate([known, unknown])
    is_known = np.concatenate([np.ones(len(known)), np.zeros(len(unknown))])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_known = scores[order], is_known[order]
    last_of_group = np.r_[np.where(np.diff(scores))[0], len(scores) - 1]
    true_pos = np.cumsum(is_known)[last_of_group]
    false_pos = 1 + last_of_group - true_pos
    recall = true_pos / true_pos[-1]
    full = true_pos.searchsorted(true_pos[-1])
    recall, false_pos = np.r_[recall[full::-1], 1], np.r_[false_pos[full::-1], 0]
    return false_pos[np.argmin(np.abs(recall - tpr))] / len(unknown)


def fpr_by_threshold_sweep(known, unknown, tpr):
    """Every distinct score as a threshold, counted by direct comparison (O(n^2))."""
    candidates = sorted(set(known) | set(unknown), reverse=True)
    recalls = [np.sum(known >= theta) / len(known) for theta in candidates]
    stop = recalls.index(1.0)  # thresholds past full recall are not candidates
    best = min(range(stop + 1), key=lambda i: (abs(recalls[i] - tpr), -i))  # closest; the lowest on ties
    return np.sum(unknown >= candidates[best]) / len(unknown), candidates[best]


def arpl_curve_loop(known, unknown):
    """ARPL's get_curve_online as a merge loop: remove the lowest remaining sample, the known one on ties."""
    known, unknown = np.sort(known), np.sort(unknown)
    tp, fp = [len(known)], [len(unknown)]
    k = u = 0
    while k < len(known) or u < len(unknown):
        if k < len(known) and (u == len(unknown) or not unknown[u] < known[k]):
            k += 1
        else:
            u += 1
        tp.append(len(known) - k)
        fp.append(len(unknown) - u)
    return np.array(tp), np.array(fp)


def arpl_oscr_loop(known, known_correct, unknown):
    """ARPL's compute_oscr: O(n^2) cuts over the ascending order, CC from k+1, FP from k, then sorted trapezoid."""
    scores = np.concatenate([known, unknown])
    correct = np.concatenate([known_correct.astype(float), np.zeros(len(unknown))])
    is_unknown = np.concatenate([np.zeros(len(known)), np.ones(len(unknown))])
    order = np.argsort(scores, kind="stable")
    correct, is_unknown = correct[order], is_unknown[order]
    n = len(scores)
    ccr, fpr = [0.0] * (n + 2), [0.0] * (n + 2)
    for k in range(n - 1):
        ccr[k] = correct[k + 1:].sum() / len(known)
        fpr[k] = is_unknown[k:].sum() / len(unknown)
    ccr[n + 1] = fpr[n + 1] = 1.0
    points = sorted(zip(fpr, ccr), reverse=True)
    return sum((points[j][0] - points[j + 1][0]) * (points[j][1] + points[j + 1][1]) / 2 for j in range(n + 1))


def oscr_by_threshold_sweep(known, known_correct, unknown):
    """CCR(θ) = #{correct known > θ}/Nk, FPR(θ) = #{unknown >= θ}/Nu over every distinct θ, by comparison."""
    points = [(np.sum(unknown >= theta) / len(unknown), np.sum((known > theta) & known_correct) / len(known))
              for theta in sorted(set(known) | set(unknown))] + [(0.0, 0.0)]
    return sum((f0 - f1) * (c0 + c1) / 2 for (f0, c0), (f1, c1) in zip(points, points[1:]))


# ---------------------------------------------------------------------------------------------------------------
# OOD metrics
# ---------------------------------------------------------------------------------------------------------------
def test_auroc_by_hand_counts_ties_half_or_zero():
    known, unknown = [3.0, 2.0, 1.0], [0.0, 2.0]
    # pairs: 3>0, 3>2, 2>0, 2=2 (tie), 1>0, 1<2  -> 4 wins + 1 tie out of 6
    assert metrics.auroc(known, unknown) == pytest.approx(4.5 / 6)
    assert metrics.auroc(known, unknown, convention="arpl") == pytest.approx(4 / 6)
    assert metrics.auroc([1.0, 2.0], [3.0]) == 0.0 and metrics.auroc([3.0], [1.0, 2.0]) == 1.0


def test_aupr_in_and_out_by_hand():
    # ranked by score: 0.9 known, 0.6 unknown, 0.4 known -> AP_in = 0.5 * 1 + 0.5 * 2/3
    assert metrics.aupr_in([0.9, 0.4], [0.6]) == pytest.approx(0.5 + 1 / 3)
    # ranked by -score: 0.4 known, 0.6 unknown, 0.9 known -> the unknown is found at precision 1/2
    assert metrics.aupr_out([0.9, 0.4], [0.6]) == pytest.approx(0.5)


def test_fpr_at_tpr_by_hand_takes_the_lowest_of_equally_close_thresholds():
    known = np.arange(1.0, 21.0)          # 20 knowns: recall 19/20 = 0.95 at θ = 2, and also at θ = 1.5
    unknown = np.array([0.5, 1.5, 2.5, 25.0])
    assert metrics.threshold_at_tpr(known, unknown) == 1.5
    assert metrics.fpr_at_tpr(known, unknown) == 0.75       # 1.5, 2.5 and 25 are accepted
    assert metrics.tnr_at_tpr(known, unknown) == 0.25
    # recall is never exactly 0.9 here with 3 knowns: 2/3 and 1 are candidates, 1 is closer
    assert metrics.fpr_at_tpr([1.0, 2.0, 3.0], [0.0, 1.5], tpr=0.9) == 0.5


def test_openood_fpr_by_hand_including_a_dropped_roc_point():
    known, unknown = [1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 2.5]
    assert metrics.openood_fpr_at_tpr(known, unknown, tpr=2 / 3) == 0.0   # 0 and 0.5 rejected, no known
    assert metrics.openood_fpr_at_tpr(known, unknown, tpr=1.0) == 0.5     # rejecting 2.5 rejects 1 and 2
    # Five tie groups of one known + one unknown lie on a line; roc_curve keeps only the ends, so OpenOOD
    # reports 1.0 where the first point reaching 40% (two groups) would give 0.4.
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert metrics.openood_fpr_at_tpr(scores, scores, tpr=0.4) == 1.0


def test_ood_metrics_match_sklearn_on_tied_scores():
    for _, known, unknown in random_cases(seed=1):
        is_known = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        scores = np.r_[known, unknown]
        assert metrics.auroc(known, unknown) == pytest.approx(sklearn_metrics.roc_auc_score(is_known, scores),
                                                             abs=1e-12)
        assert metrics.aupr_in(known, unknown) == pytest.approx(
            sklearn_metrics.average_precision_score(is_known, scores), abs=1e-12)
        assert metrics.aupr_out(known, unknown) == pytest.approx(
            sklearn_metrics.average_precision_score(1 - is_known, -scores), abs=1e-12)
        fpr, tpr, _ = sklearn_metrics.roc_curve(1 - is_known, -scores)  # OpenOOD's call, default arguments
        for level in (0.95, 0.8):
            assert metrics.openood_fpr_at_tpr(known, unknown, level) == fpr[np.argmax(tpr >= level)]
        ours = metrics.roc_curve(known, unknown)
        theirs = sklearn_metrics.roc_curve(is_known, scores, drop_intermediate=False)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


def test_fpr_at_tpr_matches_hendrycks_and_a_threshold_sweep_on_tied_scores():
    for _, known, unknown in random_cases(seed=2):
        for level in (0.95, 0.5):
            expected, theta = fpr_by_threshold_sweep(known, unknown, level)
            assert metrics.fpr_at_tpr(known, unknown, level) == expected
            assert metrics.fpr_at_tpr(known, unknown, level) == hendrycks_fpr_original_structure(
                known, unknown, level)
            assert metrics.threshold_at_tpr(known, unknown, level) == theta
            assert metrics.tnr_at_tpr(known, unknown, level) == 1 - expected


def test_arpl_conventions_match_the_arpl_sweep_on_tied_scores():
    for _, known, unknown in random_cases(seed=3):
        tp, fp = arpl_curve_loop(known, unknown)
        tnr = 1.0 - fp[np.abs(tp / len(known) - 0.95).argmin()] / len(unknown)
        assert metrics.tnr_at_tpr(known, unknown, convention="arpl") == tnr
        tpr_points = np.r_[1.0, tp / tp[0], 0.0]
        tnr_points = 1.0 - np.r_[1.0, fp / fp[0], 0.0]
        arpl_auroc = -np.sum(np.diff(tpr_points) * (tnr_points[1:] + tnr_points[:-1]) / 2)
        assert metrics.auroc(known, unknown, convention="arpl") == pytest.approx(arpl_auroc, abs=1e-12)


def test_score_direction_and_input_types():
    rng = np.random.default_rng(4)
    known, unknown = rng.normal(2, 1, 300), rng.normal(0, 1, 300)
    assert metrics.auroc(known, unknown) > 0.85 and metrics.auroc(unknown, known) < 0.15
    assert metrics.fpr_at_tpr(known, unknown) < 0.6 < metrics.fpr_at_tpr(unknown, known)
    assert metrics.aupr_in(known, unknown) > 0.85 and metrics.aupr_out(known, unknown) > 0.85
    as_tensor = metrics.auroc(torch.tensor(known, dtype=torch.bfloat16), torch.tensor(unknown).half())
    as_numpy = metrics.auroc(torch.tensor(known, dtype=torch.bfloat16).double().numpy(),
                             torch.tensor(unknown).half().double().numpy())
    assert as_tensor == as_numpy
    assert metrics.auroc(list(known), unknown.astype(np.float32)) == pytest.approx(metrics.auroc(known, unknown),
                                                                                   abs=1e-3)


def test_scores_are_compared_as_float64_and_infinite_ties_are_ties():
    # Documented in the module and fpr_at_tpr docstrings: integers beyond 2**53 round to the same float64 ...
    assert metrics.auroc([2**53 + 1], [2**53]) == 0.5 and metrics.auroc([2**53 + 2], [2**53]) == 1.0
    assert "2**53" in metrics.__doc__ and "infinite scores" in metrics.fpr_at_tpr.__doc__
    # ... and tied -inf scores form one threshold here, where the original's np.diff (-inf - -inf = NaN) splits
    # them: its extra point (recall 19/20 with the unknown -inf accepted) is the lowest at distance 0 from 0.95.
    known, unknown = np.r_[np.arange(1.0, 20.0), -np.inf], np.array([-np.inf, 0.5])
    assert fpr_by_threshold_sweep(known, unknown, 0.95) == (0.5, 0.5)
    assert (metrics.fpr_at_tpr(known, unknown), metrics.threshold_at_tpr(known, unknown)) == (0.5, 0.5)
    with np.errstate(invalid="ignore"):
        assert hendrycks_fpr_original_structure(known, unknown, 0.95) == 1.0


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_tpr,
                                metrics.openood_fpr_at_tpr, metrics.tnr_at_tpr])
def test_ood_metrics_reject_bad_inputs(fn):
    with pytest.raises(ValueError, match="known is empty"):
        fn([], [1.0])
    with pytest.raises(ValueError, match="unknown contains NaN"):
        fn([1.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match="known must be 1-D"):
        fn(np.zeros((2, 2)), [1.0])


def test_rate_arguments_are_checked():
    with pytest.raises(ValueError, match="tpr must be in"):
        metrics.fpr_at_tpr([1.0], [0.0], tpr=0.0)
    with pytest.raises(ValueError, match="convention"):
        metrics.auroc([1.0], [0.0], convention="openood")


# ---------------------------------------------------------------------------------------------------------------
# Open-set recognition
# ---------------------------------------------------------------------------------------------------------------
def test_closed_set_accuracy():
    assert metrics.closed_set_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    assert metrics.closed_set_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pred has 2 entries but labels has 3"):
        metrics.closed_set_accuracy([0, 1], [0, 1, 1])


@pytest.mark.parametrize("ids", [[math.inf], [-math.inf], [1e30], [math.nan], [0.5]])
def test_class_ids_must_be_finite_whole_numbers(ids):
    # inf == round(inf), and casting inf / 1e30 to int64 gives INT64_MIN: inf vs -inf would count as correct.
    with pytest.raises(ValueError, match="pred must hold integer class ids"):
        metrics.closed_set_accuracy(ids, [0])
    with pytest.raises(ValueError, match="labels must hold integer class ids"):
        metrics.closed_set_accuracy([0], ids)
    assert metrics.closed_set_accuracy([1.0, 2.0], [1, 3]) == 0.5           # whole floats are still class ids


def test_oscr_by_hand():
    # ascending: 0.1 u, 0.3 correct, 0.5 u, 0.8 wrong, 0.9 correct -> points (1, 2/3) (1/2, 1/3) (0, 1/3) (0, 0)
    known, correct, unknown = [0.9, 0.8, 0.3], [True, False, True], [0.5, 0.1]
    assert metrics.oscr(known, correct, unknown) == pytest.approx(0.5 * 0.5 + 0.5 * (1 / 3))
    # Perfect separation, all correct: ARPL's off-by-one leaves 1 - 1/(2 Nk Nu), not 1.
    assert metrics.oscr([2.0, 3.0], [True, True], [0.0, 1.0]) == pytest.approx(1 - 1 / 8)
    assert metrics.oscr([2.0, 3.0], [False, False], [0.0, 1.0]) == 0.0


def test_oscr_equals_arpl_without_ties_and_the_threshold_sweep_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(60):
        n_known, n_unknown = (int(n) for n in rng.integers(1, 50, size=2))
        correct = rng.random(n_known) < 0.7
        known, unknown = rng.normal(0.8, 1, n_known), rng.normal(0, 1, n_unknown)  # continuous: no ties
        assert metrics.oscr(known, correct, unknown) == pytest.approx(arpl_oscr_loop(known, correct, unknown),
                                                                      abs=1e-12)
        known, unknown = tied_scores(rng, n_known, n_unknown, decimals=0)
        expected = oscr_by_threshold_sweep(known, correct, unknown)
        assert metrics.oscr(known, correct, unknown) == pytest.approx(expected, abs=1e-12)
        perm = rng.permutation(n_known)  # ties are resolved by value: sample order cannot matter
        assert metrics.oscr(known[perm], correct[perm], unknown[::-1]) == metrics.oscr(known, correct, unknown)


def test_oscr_curve_and_checks():
    fpr, ccr = metrics.oscr_curve([0.9, 0.8, 0.3], [1, 0, 1], [0.5, 0.1])
    np.testing.assert_allclose(fpr, [1, 0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(ccr, [2 / 3, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    with pytest.raises(ValueError, match="known has 2 entries but known_correct has 1"):
        metrics.oscr([1.0, 2.0], [True], [0.0])
    with pytest.raises(ValueError, match="known_correct must be boolean"):
        metrics.oscr([1.0], [2], [0.0])


def test_macro_f1_by_hand_and_threshold_rules():
    known_scores, known_pred, known_labels = [0.9, 0.8, 0.4], [0, 1, 1], [0, 1, 0]
    unknown_scores, unknown_pred = [0.6, 0.2], [1, 0]
    # θ = 0.5: preds 0, 1, U | 1, U; truth 0, 1, 0 | U, U.  F1: class 0 = 2/3, class 1 = 2/3, unknown = 1/2
    assert metrics.macro_f1(known_scores, known_pred, known_labels, unknown_scores, unknown_pred,
                            threshold=0.5) == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    # default: the FPR@95 threshold. Known recall 1/3, 2/3, 2/3, 1 at θ = 0.9, 0.8, 0.6, 0.4: 1 is closest to
    # 0.95, so θ = 0.4 and only 0.2 is rejected. Preds 0, 1, 1 | 1, U: class 0 = 2/3, class 1 = 1/2, unknown = 2/3
    default = metrics.macro_f1(known_scores, known_pred, known_labels, unknown_scores, unknown_pred)
    assert default == pytest.approx(11 / 18)
    truth = [0, 1, 0, -1, -1]
    assert default == pytest.approx(sklearn_metrics.f1_score(truth, [0, 1, 1, 1, -1], average="macro"))
    swept = metrics.macro_f1(known_scores, known_pred, known_labels, unknown_scores, unknown_pred,
                             threshold="fsmoe_test_sweep")
    best = max(sklearn_metrics.f1_score(truth, np.where(np.r_[known_scores, unknown_scores] >= t,
                                                        np.r_[known_pred, unknown_pred], -1), average="macro")
               for t in np.arange(0.5, 1.0, 0.01))
    assert swept == pytest.approx(best) and swept >= default
    with pytest.raises(ValueError, match="fsmoe_test_sweep"):
        metrics.macro_f1(known_scores, known_pred, known_labels, unknown_scores, unknown_pred, threshold="best")


def test_macro_f1_matches_sklearn_on_tied_scores():
    for rng, known, unknown in random_cases(seed=6, count=60):
        classes = int(rng.integers(1, 6))
        known_labels = rng.integers(0, classes, len(known))
        known_pred = np.where(rng.random(len(known)) < 0.6, known_labels, rng.integers(0, classes, len(known)))
        unknown_pred = rng.integers(0, classes, len(unknown))
        theta = float(rng.choice(np.r_[known, unknown]))  # a threshold equal to some scores: ties at θ accepted
        preds = np.where(np.r_[known, unknown] >= theta, np.r_[known_pred, unknown_pred], -1)
        truth = np.r_[known_labels, np.full(len(unknown), -1)]
        expected = sklearn_metrics.f1_score(truth, preds, average="macro")
        assert metrics.macro_f1(known, known_pred, known_labels, unknown, unknown_pred,
                                threshold=theta) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Continual learning
# ---------------------------------------------------------------------------------------------------------------
# A[t, j]: accuracy on task j after training task t (3 tasks).
ACCURACY = np.array([[0.80, 0.30, 0.20],
                     [0.70, 0.90, 0.40],
                     [0.60, 0.85, 0.95]])
ZERO_SHOT = np.array([[0.25, 0.35, 0.15]])


def test_mtcl_transfer_avg_last():
    assert metrics.transfer(ACCURACY) == pytest.approx((0.30 + (0.20 + 0.40) / 2) / 2)
    assert metrics.avg(ACCURACY) == pytest.approx(ACCURACY.sum() / 9)
    assert metrics.last(ACCURACY) == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    with_zero_shot = np.vstack([ZERO_SHOT, ACCURACY])  # the zero-shot row is not one of the T checkpoints
    for fn in (metrics.transfer, metrics.avg, metrics.last):
        assert fn(with_zero_shot, zero_shot_row=True) == fn(ACCURACY)
    with pytest.raises(ValueError, match="zero_shot_row=True"):
        metrics.avg(with_zero_shot)
    # zero-shot CLIP (every row equal): Avg = Last = mean, Transfer = mean without the first dataset
    constant = np.tile([0.2, 0.6, 0.7], (3, 1))
    assert metrics.avg(constant) == pytest.approx(0.5) and metrics.last(constant) == pytest.approx(0.5)
    assert metrics.transfer(constant) == pytest.approx(0.65)


def test_class_incremental_and_forgetting():
    steps = [0.80, (0.70 + 0.90) / 2, (0.60 + 0.85 + 0.95) / 3]
    assert metrics.average_incremental_accuracy(ACCURACY) == pytest.approx(np.mean(steps))
    assert metrics.average_incremental_accuracy(steps) == pytest.approx(np.mean(steps))
    assert metrics.last_accuracy(ACCURACY) == pytest.approx(steps[-1])
    weighted = (0.70 * 1 + 0.90 * 3) / 4
    assert metrics.last_accuracy(ACCURACY[:2, :2], task_sizes=[1, 3]) == pytest.approx(weighted)
    # task 0: max(0.80, 0.70) - 0.60 = 0.20; task 1: 0.90 - 0.85 = 0.05
    assert metrics.forgetting(ACCURACY) == pytest.approx(0.125)
    assert metrics.backward_transfer(ACCURACY) == pytest.approx(((0.60 - 0.80) + (0.85 - 0.90)) / 2)
    upper_missing = np.where(np.triu(np.ones((3, 3)), 1) > 0, np.nan, ACCURACY)  # not evaluated: unused
    assert metrics.forgetting(upper_missing) == pytest.approx(0.125)
    assert metrics.average_incremental_accuracy(upper_missing) == pytest.approx(np.mean(steps))
    with pytest.raises(ValueError, match="NaN"):
        metrics.avg(upper_missing)
    with pytest.raises(ValueError, match="square"):
        metrics.forgetting(np.zeros((2, 3)))


@pytest.mark.parametrize("sizes", [[0, 10], [1, -1], [-1, 2], [math.inf, 1]])
@pytest.mark.parametrize("fn", [metrics.average_incremental_accuracy, metrics.last_accuracy])
def test_task_sizes_must_be_finite_and_positive(fn, sizes):
    # They are weights: 0 gives 0/0 at the first step, negatives silently skew the mean, inf gives NaN.
    with pytest.raises(ValueError, match=r"task_sizes must be finite and > 0 \(test samples per task\)"):
        fn(ACCURACY[:2, :2], task_sizes=sizes)
    assert fn(ACCURACY[:2, :2], task_sizes=[0.5, 1.5]) == pytest.approx(
        {metrics.last_accuracy: 0.25 * 0.70 + 0.75 * 0.90,
         metrics.average_incremental_accuracy: (0.80 + 0.25 * 0.70 + 0.75 * 0.90) / 2}[fn])


# ---------------------------------------------------------------------------------------------------------------
# Few-shot episodes
# ---------------------------------------------------------------------------------------------------------------
def test_mean_confidence_interval_600_and_3000_episodes():
    rng = np.random.default_rng(7)
    values = rng.normal(0.6, 0.1, 600)
    mean, half = metrics.mean_confidence_interval(values)
    assert mean == pytest.approx(values.mean())
    # t_{0.975, 599} = 1.96393 (tables), ~ the normal 1.95996
    assert half / (values.std(ddof=1) / math.sqrt(600)) == pytest.approx(1.96393, abs=1e-5)
    mean, half = metrics.mean_confidence_interval([1.0, 2.0, 3.0], confidence=0.95)
    assert (mean, half) == pytest.approx((2.0, 4.302653 * 1.0 / math.sqrt(3)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_confidence_interval([0.5])


def test_builtin_t_quantile_without_scipy(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 9, 10, 599, 2999, 20000):
        for confidence in (0.9, 0.95, 0.99):
            p = (1 + confidence) / 2
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-10)
    values = np.arange(10.0)
    with_scipy = metrics.mean_confidence_interval(values)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` now raises ImportError
    assert metrics.mean_confidence_interval(values) == pytest.approx(with_scipy, rel=1e-10)
    assert with_scipy[1] == pytest.approx(2.262157 * values.std(ddof=1) / math.sqrt(10))
