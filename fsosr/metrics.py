"""Metrics for OOD detection, open-set recognition, continual learning and few-shot episodes.

Conventions, everywhere in this module:

* Scores come from `fsosr.scoring`: HIGHER = MORE KNOWN. ``known`` holds the scores of in-distribution / known-class
  samples, ``unknown`` those of OOD / unknown-class samples; both 1-D (numpy arrays, torch tensors or lists).
  They are compared as float64: integers beyond 2**53 and longdouble values are rounded first, so nearby ones
  can tie (``auroc([2**53 + 1], [2**53]) == 0.5``). ±inf is allowed (e.g. the energy of -inf logits), NaN is not.
* A sample is accepted as known when ``score >= threshold``.
* Results are Python floats in [0, 1] (no ``* 100``).
* Where communities define a metric differently, each definition has its own name or ``convention=`` value, and the
  docstring says whose it is. In short:

  ================  ======================================================================================
  ``auroc``         known = positive, ties count 1/2 (Mann-Whitney U = ``sklearn.metrics.roc_auc_score``;
                    LoCoOp, OpenOOD, Vaze et al., DNPG). ``convention="arpl"``: ties count 0 (ARPL/FSMoE).
  ``aupr_in/out``   ``sklearn.metrics.average_precision_score`` (step-wise AP), In: known positive with the
                    score; Out: unknown positive with minus the score (LoCoOp's AUPR is In, FSMoE's is Out).
  ``fpr_at_tpr``    known positive: share of unknowns accepted at the threshold whose known recall is closest to
                    95 % (Hendrycks' ``fpr_and_fdr_at_recall``; OE, MCM, LoCoOp).
  ``openood_fpr_at_tpr``  OOD positive: share of knowns rejected at the first threshold rejecting >= 95 % of the
                    unknowns (OpenOOD v1.5 ``auc_and_fpr_recall``).
  ``oscr``          ARPL / Vaze et al. ``compute_oscr``: CCR(θ) counts scores > θ, FPR(θ) counts scores >= θ.
  ================  ======================================================================================

Everything sorts once: O(n log n). The continual-learning part reads an accuracy matrix ``A[t, j]`` = accuracy on
task/dataset j after training on task t (T x T); the few-shot part reduces per-episode values to mean ± a
t-interval.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fsosr._student_t import t_quantile

__all__ = [
    "auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "threshold_at_tpr", "tnr_at_tpr", "openood_fpr_at_tpr",
    "roc_curve", "closed_set_accuracy", "oscr", "oscr_curve", "macro_f1",
    "transfer", "avg", "last", "average_incremental_accuracy", "last_accuracy", "forgetting", "backward_transfer",
    "mean_confidence_interval",
]

# FSMoE's test_ood.py sweeps these MSP thresholds on the test set: np.arange(0.5, 1.0, 0.01).
FSMOE_F1_THRESHOLDS = np.arange(0.5, 1.0, 0.01)


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16; float64 keeps every float16/bfloat16/float32 value (and its ties) exactly.
        return (x.double() if x.is_floating_point() else x).numpy()
    try:
        return np.asarray(x)
    except Exception as error:  # ragged lists and the like
        raise ValueError(f"{name} must be an array, tensor or list of numbers: {error}") from None


def _scores(x, name: str) -> np.ndarray:
    """1-D, non-empty, NaN-free float64 scores."""
    a = _to_numpy(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: at least one sample is needed")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    nan = np.flatnonzero(np.isnan(a))
    if nan.size:
        raise ValueError(f"{name} contains NaN ({nan.size} of {a.size}, first at index {nan[0]})")
    return a


def _labels(x, name: str) -> np.ndarray:
    """1-D, non-empty integer class ids (booleans accepted as 0/1)."""
    a = _to_numpy(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one class id per sample), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: at least one sample is needed")
    if a.dtype.kind == "f":
        # |a| < 2**63 also rejects NaN and ±inf, which would otherwise cast to INT64_MIN with only a warning.
        if not (np.abs(a) < 2.0 ** 63).all() or (a != np.round(a)).any():
            raise ValueError(f"{name} must hold integer class ids (finite whole numbers within int64)")
        a = a.astype(np.int64)
    if a.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _same_length(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} has {len(a)} entries but {b_name} has {len(b)}; they must match")


def _check_rate(value: float, name: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def _counts_at_thresholds(positive: np.ndarray, negative: np.ndarray):
    """Distinct thresholds in DESCENDING order and, at each, #positives and #negatives with score >= threshold.

    The same points as sklearn's ``_binary_clf_curve`` / Hendrycks' code (one point per distinct score).
    """
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    tps = len(positive) - np.searchsorted(np.sort(positive), thresholds, side="left")
    fps = len(negative) - np.searchsorted(np.sort(negative), thresholds, side="left")
    return thresholds, tps, fps


# ----------------------------------------------------------------------------------------------------------------
# OOD detection (known vs unknown scores)
# ----------------------------------------------------------------------------------------------------------------
def auroc(known, unknown, *, convention: str = "sklearn") -> float:
    """Area under the ROC curve with known as the positive class: P(score_known > score_unknown).

    convention:
      ``"sklearn"`` (default): a tied (known, unknown) pair counts 1/2 — the Mann-Whitney U statistic, equal to
        ``sklearn.metrics.roc_auc_score(is_known, score)`` (LoCoOp, OpenOOD, Vaze et al., DNPG per episode).
      ``"arpl"``: a tied pair counts 0, as ARPL's ``metric_ood`` (used by FSMoE), whose sweep removes the known
        sample first on ties. Identical to ``"sklearn"`` when no known score equals an unknown score.
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    sorted_unknown = np.sort(unknown)
    below = np.searchsorted(sorted_unknown, known, side="left").sum()   # unknowns strictly below each known
    tied = np.searchsorted(sorted_unknown, known, side="right").sum() - below
    if convention == "sklearn":
        wins = below + 0.5 * tied
    elif convention == "arpl":
        wins = below
    else:
        raise ValueError(f"convention must be 'sklearn' or 'arpl', got {convention!r}")
    return float(wins / (len(known) * len(unknown)))


def _average_precision(positive: np.ndarray, negative: np.ndarray) -> float:
    """sklearn's AP: sum over distinct thresholds (descending) of (R_i - R_{i-1}) * P_i, R_{-1} = 0."""
    _, tps, fps = _counts_at_thresholds(positive, negative)
    precision = tps / (tps + fps)
    recall = tps / len(positive)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr_in(known, unknown) -> float:
    """AUPR-In: average precision with KNOWN as positive, ranked by the score (higher = more known).

    ``sklearn.metrics.average_precision_score(is_known, score)`` — LoCoOp's "AUPR". Step-wise AP, not OpenOOD's
    trapezoid over the PR curve (which reads slightly higher).
    """
    return _average_precision(_scores(known, "known"), _scores(unknown, "unknown"))


def aupr_out(known, unknown) -> float:
    """AUPR-Out: average precision with UNKNOWN as positive, ranked by minus the score.

    ``sklearn.metrics.average_precision_score(is_unknown, -score)`` — FSMoE's "AUPR" (ARPL test code).
    """
    return _average_precision(-_scores(unknown, "unknown"), -_scores(known, "known"))


def _hendrycks_operating_point(known: np.ndarray, unknown: np.ndarray, tpr: float):
    """(threshold, #unknowns accepted) of Hendrycks' ``fpr_and_fdr_at_recall`` with known positive."""
    thresholds, tps, fps = _counts_at_thresholds(known, unknown)
    recall = tps / tps[-1]                                    # the same float division as the original
    full = int(np.searchsorted(tps, tps[-1], side="left"))    # first threshold reaching recall 1
    distance = np.abs(recall[: full + 1] - tpr)
    # The original scans from `full` back to the top threshold and takes the first minimum, i.e. among equally
    # close thresholds the LOWEST one (highest recall, most unknowns accepted).
    chosen = full - int(np.argmin(distance[::-1]))
    return thresholds[chosen], int(fps[chosen])


def threshold_at_tpr(known, unknown, tpr: float = 0.95) -> float:
    """The threshold `fpr_at_tpr` operates at (accept as known iff score >= threshold)."""
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    return float(_hendrycks_operating_point(known, unknown, _check_rate(tpr, "tpr"))[0])


def fpr_at_tpr(known, unknown, tpr: float = 0.95) -> float:
    """FPR@TPR with KNOWN/ID as the positive class (Hendrycks' OE ``fpr_and_fdr_at_recall``; MCM, LoCoOp).

    Returns the share of unknown samples accepted (score >= θ), where θ is chosen as follows: the candidates are
    the distinct scores of all samples, from the highest down to the first one at which every known sample is
    accepted; θ is the candidate whose known recall ``#{known >= θ} / n_known`` is CLOSEST to ``tpr`` (it may be
    below it), and among equally close candidates the lowest one. Matches the original bit for bit (tested) for
    finite scores; ties between infinite scores are treated as ties here, where the original splits them (its
    ``np.diff`` gives inf - inf = NaN, which counts as a change of score).
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    _, accepted_unknown = _hendrycks_operating_point(known, unknown, _check_rate(tpr, "tpr"))
    return accepted_unknown / len(unknown)


def _arpl_sweep(known: np.ndarray, unknown: np.ndarray):
    """ARPL ``get_curve_online``: remove samples from the lowest score up, the known one first on ties.

    Returns (tp, fp) of length n + 1: the knowns and unknowns still accepted after l removals, l = 0..n.
    """
    scores = np.concatenate([known, unknown])
    is_unknown = np.concatenate([np.zeros(len(known), bool), np.ones(len(unknown), bool)])
    order = np.lexsort((is_unknown, scores))                  # by score, then known before unknown
    removed_unknown = np.concatenate([[0], np.cumsum(is_unknown[order])])
    removed_known = np.arange(len(scores) + 1) - removed_unknown
    return len(known) - removed_known, len(unknown) - removed_unknown


def tnr_at_tpr(known, unknown, tpr: float = 0.95, *, convention: str = "hendrycks") -> float:
    """TNR on unknowns (share rejected) at ``tpr`` recall of knowns.

    convention:
      ``"hendrycks"`` (default): ``1 - fpr_at_tpr(known, unknown, tpr)``, the same operating point.
      ``"arpl"``: ARPL's ``metric_ood`` TNR (FSMoE's CSV column): the sweep point after l removals (lowest score
        first, known first on ties; l = 0..n) whose known recall is closest to ``tpr``, the smallest l on ties.
        Differs from ``"hendrycks"`` only through ties and the choice among equally close points.
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    tpr = _check_rate(tpr, "tpr")
    if convention == "hendrycks":
        return 1.0 - _hendrycks_operating_point(known, unknown, tpr)[1] / len(unknown)
    if convention == "arpl":
        tp, fp = _arpl_sweep(known, unknown)
        chosen = int(np.argmin(np.abs(tp / len(known) - tpr)))
        return float(1.0 - fp[chosen] / len(unknown))
    raise ValueError(f"convention must be 'hendrycks' or 'arpl', got {convention!r}")


def openood_fpr_at_tpr(known, unknown, tpr: float = 0.95) -> float:
    """FPR@TPR with OOD/UNKNOWN as the positive class, as OpenOOD v1.5 reports "FPR@95".

    OpenOOD's ``auc_and_fpr_recall`` runs ``sklearn.metrics.roc_curve(is_unknown, -score)`` and returns
    ``fpr[argmax(tpr >= 0.95)]``: the share of KNOWN samples rejected at the first threshold (scanning from the
    fewest rejections up) that rejects at least ``tpr`` of the unknowns. roc_curve's default
    ``drop_intermediate=True`` first removes points collinear with both neighbours (equal steps); that is
    reproduced, so the value matches OpenOOD even when a removed point would have qualified first.
    Not comparable with `fpr_at_tpr` (OpenOOD issue #308).
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    tpr = _check_rate(tpr, "tpr")
    _, tps, fps = _counts_at_thresholds(-unknown, -known)     # positives: unknowns, ranked by -score
    if len(tps) > 2:  # sklearn drops points whose second differences in both fps and tps are zero
        keep = np.concatenate([[True], (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), [True]])
        tps, fps = tps[keep], fps[keep]
    tps, fps = np.concatenate([[0], tps]), np.concatenate([[0], fps])
    first = int(np.argmax(tps / tps[-1] >= tpr))
    return float(fps[first] / fps[-1])


def roc_curve(known, unknown):
    """ROC points with known positive, one per distinct threshold (descending) after the origin.

    Returns (fpr, tpr, thresholds) as numpy arrays; thresholds[0] = +inf. For plots; no point is dropped.
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    thresholds, tps, fps = _counts_at_thresholds(known, unknown)
    return (np.concatenate([[0.0], fps / len(unknown)]), np.concatenate([[0.0], tps / len(known)]),
            np.concatenate([[np.inf], thresholds]))


# ----------------------------------------------------------------------------------------------------------------
# Open-set recognition
# ----------------------------------------------------------------------------------------------------------------
def closed_set_accuracy(pred, labels) -> float:
    """Top-1 accuracy of known-class samples over the known classes only.

    pred: [N] predicted class ids, or [N, C] class scores (argmax taken); labels: [N] true class ids.
    """
    pred_array = _to_numpy(pred, "pred")
    if pred_array.ndim == 2:
        if pred_array.shape[1] == 0:
            raise ValueError(f"pred has shape {pred_array.shape}: class scores need at least one class")
        pred_array = pred_array.argmax(axis=1)
    pred_array = _labels(pred_array, "pred")
    labels = _labels(labels, "labels")
    _same_length(pred_array, "pred", labels, "labels")
    return float(np.mean(pred_array == labels))


def _bools(x, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one flag per sample), got shape {a.shape}")
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got values outside {{0, 1}}")
    return a.astype(bool)


def oscr_curve(known, known_correct, unknown):
    """The (FPR, CCR) points `oscr` integrates, from (1, CCR at the lowest threshold) down to (0, 0).

    For θ over every distinct score (ascending): FPR(θ) = #{unknown: s >= θ} / n_unknown and
    CCR(θ) = #{known, correctly classified: s > θ} / n_known; the point (0, 0) closes the curve.
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    known_correct = _bools(known_correct, "known_correct")
    _same_length(known, "known", known_correct, "known_correct")
    thresholds = np.unique(np.concatenate([known, unknown]))
    accepted_unknown = len(unknown) - np.searchsorted(np.sort(unknown), thresholds, side="left")
    correct_scores = np.sort(known[known_correct])
    accepted_correct = len(correct_scores) - np.searchsorted(correct_scores, thresholds, side="right")
    fpr = np.concatenate([accepted_unknown / len(unknown), [0.0]])
    ccr = np.concatenate([accepted_correct / len(known), [0.0]])
    return fpr, ccr


def oscr(known, known_correct, unknown) -> float:
    """Open-Set Classification Rate: area under CCR vs FPR, ARPL's definition (also osr_closed_set_all_you_need's).

    known: [Nk] scores of known-class samples; known_correct: [Nk] bool, the closed-set prediction is right;
    unknown: [Nu] scores of unknown-class samples. Higher scores = more known.

    ARPL's ``compute_oscr`` sorts all scores ascending and, for each cut k, counts correctly classified knowns at
    positions ``k+1:`` but unknowns at positions ``k:``. That off-by-one is kept: CCR(θ) counts known scores
    STRICTLY above θ while FPR(θ) counts unknown scores AT OR above θ, θ running over the scores; the curve
    starts at FPR = 1 (ARPL's extra (1, 1) point adds zero area) and ends at (0, 0); trapezoid rule.
    Without ties this equals ARPL's value exactly (tested against its O(n^2) loop). With ties ARPL's value
    depends on the order numpy's unstable quicksort leaves tied samples in; here θ runs over DISTINCT scores, so
    the result depends only on the values (deterministic, invariant to sample order): within a tie, unknowns
    count as accepted and correct knowns as rejected, the off-by-one applied to the whole tied group.
    """
    fpr, ccr = oscr_curve(known, known_correct, unknown)
    return float(np.sum((fpr[:-1] - fpr[1:]) * (ccr[:-1] + ccr[1:]) / 2.0))


def _macro_f1_of(true: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 over the union of labels in ``true`` and ``pred`` (sklearn's default ``labels``)."""
    classes, codes = np.unique(np.concatenate([true, pred]), return_inverse=True)
    true_codes, pred_codes = codes[: len(true)], codes[len(true):]
    hits = np.bincount(true_codes[true_codes == pred_codes], minlength=len(classes))
    in_truth = np.bincount(true_codes, minlength=len(classes))
    in_pred = np.bincount(pred_codes, minlength=len(classes))
    return float(np.mean(2.0 * hits / (in_truth + in_pred)))   # 2TP / (2TP + FP + FN)


def macro_f1(known_scores, known_pred, known_labels, unknown_scores, unknown_pred, *, threshold=None,
             tpr: float = 0.95) -> float:
    """Macro-F1 of open-set predictions: K known classes plus one "unknown" class.

    A sample whose score is >= the threshold keeps its closed-set prediction (``known_pred`` / ``unknown_pred``:
    class ids 0..K-1, the argmax over known classes); below it is predicted "unknown". True labels are
    ``known_labels`` for knowns and "unknown" for every unknown sample. F1 is averaged over the union of classes
    that occur in the truth or the predictions (``sklearn.metrics.f1_score(average="macro")``, as ARPL/FSMoE and
    DNPG call it).

    threshold:
      ``None`` (default): the threshold of `fpr_at_tpr` (`threshold_at_tpr`): the same operating point as FPR@95,
        set by the known recall (closest to ``tpr``), never tuned for F1.
      a number: that threshold.
      ``"fsmoe_test_sweep"``: FSMoE's ``test_ood.py``: the best macro-F1 over thresholds 0.50, 0.51, ..., 0.99
        applied to the scores (FSMoE uses MSP). It picks the threshold ON THE TEST SET (an oracle; optimistic).
        FSMoE also labels every accepted unknown as class 0; pass ``unknown_pred=zeros`` to reproduce that.
    """
    known_scores, unknown_scores = _scores(known_scores, "known_scores"), _scores(unknown_scores, "unknown_scores")
    known_pred, known_labels = _labels(known_pred, "known_pred"), _labels(known_labels, "known_labels")
    unknown_pred = _labels(unknown_pred, "unknown_pred")
    _same_length(known_scores, "known_scores", known_pred, "known_pred")
    _same_length(known_scores, "known_scores", known_labels, "known_labels")
    _same_length(unknown_scores, "unknown_scores", unknown_pred, "unknown_pred")
    for name, ids in (("known_pred", known_pred), ("known_labels", known_labels), ("unknown_pred", unknown_pred)):
        if ids.min() < 0:
            raise ValueError(f"{name} must hold class ids >= 0 (the unknown class is added here)")
    unknown_id = -1
    scores = np.concatenate([known_scores, unknown_scores])
    closed_pred = np.concatenate([known_pred, unknown_pred])
    truth = np.concatenate([known_labels, np.full(len(unknown_scores), unknown_id)])

    def f1_at(theta: float) -> float:
        return _macro_f1_of(truth, np.where(scores >= theta, closed_pred, unknown_id))

    if threshold is None:
        return f1_at(_hendrycks_operating_point(known_scores, unknown_scores, _check_rate(tpr, "tpr"))[0])
    if isinstance(threshold, str):
        if threshold != "fsmoe_test_sweep":
            raise ValueError(f"threshold must be None, a number or 'fsmoe_test_sweep', got {threshold!r}")
        return max(f1_at(theta) for theta in FSMOE_F1_THRESHOLDS)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return f1_at(threshold)


# ----------------------------------------------------------------------------------------------------------------
# Continual learning: A[t, j] = accuracy on task j after training on task t
# ----------------------------------------------------------------------------------------------------------------
def _accuracy_matrix(accuracy, zero_shot_row: bool = False) -> np.ndarray:
    a = _to_numpy(accuracy, "accuracy")
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "biuf":
        raise ValueError(f"accuracy must be a non-empty numeric 2-D matrix A[t, j], got shape {a.shape}")
    a = a.astype(np.float64)
    if zero_shot_row:
        if a.shape[0] != a.shape[1] + 1:
            raise ValueError(f"with zero_shot_row=True accuracy must be (T+1) x T, got {a.shape}")
        a = a[1:]
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy must be square T x T (rows: after task t, columns: task j), got {a.shape}"
                         + ("" if zero_shot_row else "; pass zero_shot_row=True if row 0 is the zero-shot model"))
    return a


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if np.isnan(values).any():
        raise ValueError(f"accuracy has NaN in {what}, which this metric needs")
    return values


def transfer(accuracy, *, zero_shot_row: bool = False) -> float:
    """MTCL "Transfer" (ZSCL; MoE-Adapters4CL): mean over tasks j >= 1 of mean_{t < j} A[t, j].

    Accuracy on each dataset BEFORE it is learned (by the checkpoints trained on earlier tasks); the first task
    has no such entry and is left out. A zero-shot row (the model before task 0, given as row 0 of a (T+1) x T
    matrix with ``zero_shot_row=True``) is dropped: ZSCL's Transfer uses only the T trained checkpoints.
    """
    a = _accuracy_matrix(accuracy, zero_shot_row)
    if len(a) < 2:
        raise ValueError("transfer needs at least 2 tasks")
    return float(np.mean([_finite(a[:j, j], f"column {j} above the diagonal").mean() for j in range(1, len(a))]))


def avg(accuracy, *, zero_shot_row: bool = False) -> float:
    """MTCL "Avg" (ZSCL; MoE-Adapters4CL): mean of all T x T entries, i.e. mean_j mean_t A[t, j].

    The zero-shot row, if given (``zero_shot_row=True``), is not one of the T checkpoints and is dropped.
    """
    return float(_finite(_accuracy_matrix(accuracy, zero_shot_row), "the matrix").mean())


def last(accuracy, *, zero_shot_row: bool = False) -> float:
    """MTCL "Last" (ZSCL; MoE-Adapters4CL): mean_j A[T-1, j], every dataset after the final task."""
    a = _accuracy_matrix(accuracy, zero_shot_row)
    return float(_finite(a[-1], "the last row").mean())


def _step_accuracies(accuracy, task_sizes) -> np.ndarray:
    """Accuracy on all classes seen so far after each step, from a 1-D list or a T x T matrix."""
    a = _to_numpy(accuracy, "accuracy")
    if a.ndim == 1:
        if task_sizes is not None:
            raise ValueError("task_sizes applies only to a T x T accuracy matrix")
        return _scores(a, "accuracy")
    a = _accuracy_matrix(a)
    sizes = np.ones(len(a)) if task_sizes is None else _scores(task_sizes, "task_sizes")
    _same_length(sizes, "task_sizes", a, "accuracy")
    if not (np.isfinite(sizes) & (sizes > 0)).all():  # they are weights: 0 or inf gives 0/0, negatives nonsense
        raise ValueError(f"task_sizes must be finite and > 0 (test samples per task), got {sizes.tolist()}")
    return np.array([np.average(_finite(a[t, : t + 1], f"row {t} up to the diagonal"), weights=sizes[: t + 1])
                     for t in range(len(a))])


def average_incremental_accuracy(accuracy, *, task_sizes=None) -> float:
    """Class-incremental "Avg" (iCaRL; MoE-Adapters4CL's CIFAR-100 tables): mean over ALL steps (the first
    included) of the accuracy on every class seen so far.

    accuracy: [T] step accuracies, or a T x T matrix A[t, j] with per-task accuracies, whose step-t accuracy is
    the mean of A[t, :t+1] weighted by ``task_sizes`` (test samples per task; equal if omitted).
    """
    return float(np.mean(_step_accuracies(accuracy, task_sizes)))


def last_accuracy(accuracy, *, task_sizes=None) -> float:
    """Class-incremental "Last": the accuracy on all classes after the final step (inputs as above)."""
    return float(_step_accuracies(accuracy, task_sizes)[-1])


def forgetting(accuracy) -> float:
    """Average forgetting (Chaudhry et al. 2018, max-drop form): mean over j < T-1 of
    ``max_{j <= t <= T-2} A[t, j] - A[T-1, j]``.

    The max runs over the checkpoints AFTER task j was learned: accuracy a CLIP model had on task j before
    learning it (zero-shot) is not counted as something it could forget. Entries above the diagonal are unused
    (may be NaN).
    """
    a = _accuracy_matrix(accuracy)
    if len(a) < 2:
        raise ValueError("forgetting needs at least 2 tasks")
    drops = [_finite(a[j:-1, j], f"column {j}").max() - _finite(a[-1:, j], "the last row")[0]
             for j in range(len(a) - 1)]
    return float(np.mean(drops))


def backward_transfer(accuracy) -> float:
    """BWT (Lopez-Paz & Ranzato 2017, GEM): mean over j < T-1 of A[T-1, j] - A[j, j] (negative = forgetting)."""
    a = _accuracy_matrix(accuracy)
    if len(a) < 2:
        raise ValueError("backward_transfer needs at least 2 tasks")
    return float(np.mean(_finite(a[-1, :-1] - np.diag(a)[:-1], "the diagonal or the last row")))


# ----------------------------------------------------------------------------------------------------------------
# Few-shot episodes
# ----------------------------------------------------------------------------------------------------------------
def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval over episodes: (mean, h).

    ``h = t_{(1+confidence)/2, n-1} * std(values, ddof=1) / sqrt(n)``, as DNPG/RFS/TANE report few-shot results
    (``scipy.stats.t.ppf(0.975, n-1) * scipy.stats.sem(values)``); report ``mean ± h`` (× 100 for %).
    Uses scipy when installed, else a built-in exact t quantile.
    """
    a = _scores(values, "values")
    if len(a) < 2:
        raise ValueError("values needs at least 2 episodes for a confidence interval")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    p, df = (1.0 + confidence) / 2.0, len(a) - 1
    try:
        from scipy.stats import t as student_t
        quantile = float(student_t.ppf(p, df))
    except ImportError:
        quantile = t_quantile(p, df)
    return float(a.mean()), float(quantile * a.std(ddof=1) / math.sqrt(len(a)))
