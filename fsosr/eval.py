"""``python -m fsosr.eval``: evaluate saved score files as OOD, open-set (OSR) or continual-learning (CL) tables.

Prints the table, and with ``--out DIR`` writes ``<protocol>.csv``, ``<protocol>.md``, the inputs re-saved as
``<protocol>_scores.npz`` (itself a valid input) and PNG plots. Metrics come from `fsosr.metrics`; numbers are
percentages with two decimals.

Score files: ``.npz`` (``numpy.savez``; write them with `save_scores`). Scores are 1-D, HIGHER = MORE KNOWN
(`fsosr.scoring`). A key ``a/b`` is a nested name (``save_scores(p, ood={"sun": s})`` writes ``ood/sun``).

``ood`` (one file; LoCoOp / OpenOOD tables ``FPR@95 | AUROC | AUPR_IN | AUPR_OUT | ACC``, a row per OOD set)::

    id_scores            [N]    scores of the in-distribution test set (required)
    ood_scores           [M]    one OOD set (named "ood"), or instead
    ood/<name>           [M]    one array per OOD set, or ood/<group>/<name> (OpenOOD's near/far: a mean row
                                "<group>ood" per group)
    id_correct           [N]    bool, the closed-set prediction is right; or id_pred [N] / id_logits [N, C]
                                with id_labels [N]. Optional: gives ACC (ID accuracy) and the OSCR plot.

``osr`` (one or more files; table ``ACC | AUROC | OSCR`` per split, then mean ± std over splits)::

    known_scores         [Nk]   scores of known-class test samples (required)
    unknown_scores       [Nu]   scores of unknown-class test samples (required)
    known_correct        [Nk]   bool; or known_pred [Nk] / known_logits [Nk, K] with known_labels [Nk].
                                Optional: gives ACC and OSCR.

  One split per file (named after the file), or several in one file under prefixes: ``split0/known_scores``, ...

``cl`` (one or more files, a row per run, mean ± std when several)::

    acc_matrix           [T, T] A[t, j] = accuracy on task j after training task t (fractions or percentages)
    zero_shot_row        ()     optional bool: acc_matrix is [T+1, T], row 0 the model before any training
    task_sizes           [T]    optional test samples per task (weights the class-incremental step accuracy)
    task_names           [T]    optional strings (plot labels)

  Also one run per file or several under prefixes (``seed1/acc_matrix``). Columns: Transfer, Avg, Last (MTCL,
  ZSCL), Avg_inc and Last_inc (class-incremental average incremental / last accuracy), Forgetting, BWT; a metric
  the matrix cannot give (NaN above the diagonal, one task) shows ``-`` with the reason below the table.

Usage::

    python -m fsosr.eval ood scores.npz --out results/locoop_seed1
    python -m fsosr.eval ood scores.npz --fpr-convention openood      # OpenOOD's OOD-positive FPR@95
    python -m fsosr.eval osr split0.npz split1.npz split2.npz split3.npz split4.npz --out results/osr
    python -m fsosr.eval cl mtcl_order1.npz --zero-shot-row --out results/cl

Checkpoints (``.pt``, ``.ckpt``, ...) are recognised but not evaluated yet; `scores_from_checkpoint` is where
that will plug in.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsosr import metrics, reporting
from fsosr.reporting import Row, Table
# Score-file I/O lives in fsosr.score_files; re-exported here, where the CLI's users look for it.
from fsosr.score_files import ScoreFileError, read_score_file, save_scores, scores_from_checkpoint

__all__ = ["ScoreFileError", "Evaluation", "save_scores", "read_score_file", "scores_from_checkpoint",
           "evaluate_ood", "evaluate_osr", "evaluate_cl", "write_outputs", "main"]

FPR_CONVENTIONS = {  # --fpr-convention value -> (metric, what it measures)
    "hendrycks": (metrics.fpr_at_tpr, "Hendrycks/LoCoOp, ID positive: share of OOD accepted at {tpr} ID recall"),
    "openood": (metrics.openood_fpr_at_tpr, "OpenOOD v1.5, OOD positive: share of ID rejected once {tpr} of OOD "
                                            "is rejected"),
}
AUROC_CONVENTIONS = ("sklearn", "arpl")  # fsosr.metrics.auroc's conventions


@dataclass
class Evaluation:
    """A table plus what the plots and the re-saved ``.npz`` need.

    pairs: (name, known scores, unknown scores, known_correct or None) per OOD set (named ``<group>/<name>`` in a
    group) / split; matrices: (run name, accuracy matrix as fractions, task names or None, has a zero-shot row) per
    CL run; arrays: the inputs under their file keys; auroc_convention: the table's, for the ROC plot's legend.
    """
    table: Table
    pairs: list[tuple] = field(default_factory=list)
    matrices: list[tuple] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    auroc_convention: str = "sklearn"


def _log(message: str) -> None:
    print(f"[fsosr.eval] {message}", file=sys.stderr)


def _vector(arrays: dict, path: Path, key: str, *, expected: str = "") -> np.ndarray:
    """arrays[key] as a non-empty 1-D array; errors name the file, the key and (when missing) what is expected."""
    if key not in arrays:
        present = ", ".join(sorted(arrays)) or "none"
        raise ScoreFileError(f"{path}: missing array '{key}'{expected} (arrays in the file: {present})")
    array = arrays[key]
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "biuf":
        raise ScoreFileError(f"{path}: '{key}' must be a non-empty 1-D numeric array, got shape {array.shape} "
                             f"dtype {array.dtype}")
    nan = np.flatnonzero(np.isnan(array)) if array.dtype.kind == "f" else []
    if len(nan):
        raise ScoreFileError(f"{path}: '{key}' contains NaN ({len(nan)} of {array.size}, first at index {nan[0]})")
    return array


def _checked(path: Path, what: str, fn, *args, **kwargs):
    """Run a metric, turning its ValueError (NaN, length mismatch, ...) into one that names the file."""
    try:
        return fn(*args, **kwargs)
    except ValueError as error:
        raise ScoreFileError(f"{path}: {what}: {error}") from None


def _correctness(arrays: dict, path: Path, prefix: str, n: int):
    """(correct flags or None, closed-set accuracy or None, the keys used) from ``<prefix>correct`` or
    ``<prefix>pred`` / ``<prefix>logits`` with ``<prefix>labels``."""
    correct_key, labels_key = prefix + "correct", prefix + "labels"
    if correct_key in arrays:
        correct = _vector(arrays, path, correct_key)
        if not np.isin(correct, (0, 1)).all():
            raise ScoreFileError(f"{path}: '{correct_key}' must be bool (or 0/1)")
        keys, correct = [correct_key], correct.astype(bool)
        accuracy = float(correct.mean())
    else:
        keys = [prefix + k for k in ("pred", "logits", "labels") if prefix + k in arrays]
        if not keys:
            return None, None, []
        if labels_key not in keys or len(keys) != 2:
            raise ScoreFileError(f"{path}: accuracy needs '{labels_key}' with exactly one of '{prefix}pred' or "
                                 f"'{prefix}logits'; found {keys}")
        prediction, labels = arrays[keys[0]], arrays[labels_key]
        accuracy = _checked(path, f"{keys[0]} vs {labels_key}", metrics.closed_set_accuracy, prediction, labels)
        correct = (prediction.argmax(axis=1) if prediction.ndim == 2 else prediction) == labels
    if len(correct) != n:  # one flag per scored sample, or ACC and OSCR would describe different samples
        raise ScoreFileError(f"{path}: '{keys[0]}' has {len(correct)} entries but '{prefix}scores' has {n}")
    return correct, accuracy, keys


def _check_options(tpr: float = 0.95, auroc_convention: str = "sklearn", fpr_convention: str = "hendrycks") -> None:
    """Bad arguments are the caller's error, not a file's: a plain ValueError, raised before any file is read."""
    if fpr_convention not in FPR_CONVENTIONS:
        raise ValueError(f"fpr_convention must be one of {sorted(FPR_CONVENTIONS)}, got {fpr_convention!r}")
    if not 0.0 < tpr <= 1.0:  # also rejects NaN
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    if auroc_convention not in AUROC_CONVENTIONS:
        raise ValueError(f"auroc_convention must be one of {list(AUROC_CONVENTIONS)}, got {auroc_convention!r}")


def _ties_note(convention: str) -> str:
    return "ties count 1/2 (sklearn)" if convention == "sklearn" else "ties count 0 (ARPL)"


def _warn_if_inverted(path: Path, name: str, value: float) -> None:
    if value < 0.5:
        _log(f"warning: AUROC {100 * value:.2f} < 50 for {name} in {path.name}: are the scores higher = more known?")


# ----------------------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------------------
def _ood_sets(arrays: dict, path: Path) -> list[tuple[str, str, str]]:
    """(group or "", set name, key) per OOD set, in file order."""
    sets = [("", "ood", "ood_scores")] if "ood_scores" in arrays else []
    for key in arrays:
        if key.startswith("ood/"):
            parts = key.split("/")[1:]
            if len(parts) > 2 or not all(parts):
                raise ScoreFileError(f"{path}: '{key}' must be ood/<name> or ood/<group>/<name>")
            sets.append(("", parts[0], key) if len(parts) == 1 else (parts[0], parts[1], key))
    if not sets:
        raise ScoreFileError(f"{path}: no OOD scores; expected 'ood_scores' or 'ood/<name>' arrays "
                             f"(arrays in the file: {', '.join(sorted(arrays)) or 'none'})")
    if "ood_scores" in arrays and len(sets) > 1:
        raise ScoreFileError(f"{path}: give either 'ood_scores' or 'ood/<name>' arrays, not both")
    return sets


def evaluate_ood(path, *, fpr_convention: str = "hendrycks", tpr: float = 0.95,
                 auroc_convention: str = "sklearn") -> Evaluation:
    """OOD table: ``FPR@95 | AUROC | AUPR_IN | AUPR_OUT | ACC`` per OOD set, a mean per group, the overall mean."""
    _check_options(tpr, auroc_convention, fpr_convention)
    fpr_metric, fpr_text = FPR_CONVENTIONS[fpr_convention]
    path = Path(path)
    arrays = read_score_file(path, "ood")
    known = _vector(arrays, path, "id_scores", expected=" (1-D scores of the in-distribution test set)")
    correct, accuracy, correct_keys = _correctness(arrays, path, "id_", len(known))
    columns = [f"FPR@{100 * tpr:g}", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    table = Table(f"OOD detection: {path.name}", "dataset", columns)
    evaluation = Evaluation(table, arrays={k: arrays[k] for k in ["id_scores", *correct_keys]},
                            auroc_convention=auroc_convention)
    groups: dict[str, list[Row]] = {}
    for group, name, key in _ood_sets(arrays, path):
        unknown = _vector(arrays, path, key)
        values = [_checked(path, key, fpr_metric, known, unknown, tpr),
                  _checked(path, key, metrics.auroc, known, unknown, convention=auroc_convention),
                  metrics.aupr_in(known, unknown), metrics.aupr_out(known, unknown), accuracy]
        _warn_if_inverted(path, key, values[1])
        groups.setdefault(group, []).append(Row(name, values))
        # Named with the group: near/x and far/x are different sets (and plots).
        evaluation.pairs.append((f"{group}/{name}" if group else name, known, unknown, correct))
        evaluation.arrays[f"ood/{group}/{name}" if group else f"ood/{name}"] = unknown
    every = [row for rows in groups.values() for row in rows]
    for group, rows in groups.items():
        table.rows += rows + ([reporting.mean_row(f"{group}ood", rows)] if group else [])
    table.rows.append(reporting.mean_row("mean", every))
    table.notes += [f"{columns[0]}: {fpr_text.format(tpr=f'{100 * tpr:g}%')}.",
                    f"AUROC: ID positive, {_ties_note(auroc_convention)}; AUPR_IN / AUPR_OUT: step-wise average "
                    "precision, ID / OOD positive.",
                    "ACC: closed-set accuracy on the ID set" + ("." if accuracy is not None else
                                                                ": not in the file (give id_correct, or id_pred / "
                                                                "id_logits with id_labels).")]
    _log(f"read {path}: ID {len(known)} | OOD " + ", ".join(f"{n} {len(k)}" for n, _, k, _ in evaluation.pairs))
    return evaluation


def _named_entries(paths, required: str, protocol: str) -> list[tuple[Path, str, dict, str]]:
    """(file, entry name, all arrays of the file, key prefix) for every split / run: top-level keys (the entry is
    named after the file) or ``<name>/<required>`` keys (prefix ``<name>/``)."""
    if isinstance(paths, (str, os.PathLike)):  # one file; iterating a str would give its characters
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError(f"no score files given: pass a list of .npz paths for {protocol}")
    entries, seen = [], {}
    for path in map(Path, paths):
        arrays = read_score_file(path, protocol)
        if required in arrays:
            found = [(path.stem, "")]
        else:
            found = [(key[: -len(required) - 1], key[: -len(required)]) for key in arrays
                     if key.endswith("/" + required)]
        if not found:
            raise ScoreFileError(f"{path}: missing array '{required}' (or '<name>/{required}' for several in one "
                                 f"file); arrays in the file: {', '.join(sorted(arrays)) or 'none'}")
        for name, prefix in found:
            if name in seen:
                raise ScoreFileError(f"{path}: '{name}' is also in {seen[name]}; names must be unique")
            seen[name] = path
            entries.append((path, name, arrays, prefix))
    return entries


def evaluate_osr(paths, *, auroc_convention: str = "sklearn") -> Evaluation:
    """OSR table: ``ACC | AUROC | OSCR`` per split, then mean ± std (population std) over splits.

    paths: a list of score files (a single path is one file)."""
    _check_options(auroc_convention=auroc_convention)
    table = Table("Open-set recognition", "split", ["ACC", "AUROC", "OSCR"])
    evaluation = Evaluation(table, auroc_convention=auroc_convention)
    for path, name, arrays, prefix in _named_entries(paths, "known_scores", "osr"):
        known = _vector(arrays, path, prefix + "known_scores")
        unknown = _vector(arrays, path, prefix + "unknown_scores", expected=f" (split '{name}')")
        correct, accuracy, correct_keys = _correctness(arrays, path, prefix + "known_", len(known))
        auroc = _checked(path, f"split {name}", metrics.auroc, known, unknown, convention=auroc_convention)
        oscr = None if correct is None else _checked(path, f"split {name}", metrics.oscr, known, correct, unknown)
        _warn_if_inverted(path, f"split {name}", auroc)
        table.rows.append(Row(name, [accuracy, auroc, oscr]))
        evaluation.pairs.append((name, known, unknown, correct))
        for key in [prefix + "known_scores", prefix + "unknown_scores", *correct_keys]:
            evaluation.arrays[f"{name}/{key[len(prefix):]}"] = arrays[key]
        _log(f"read {path}{f' [{name}]' if prefix else ''}: known {len(known)}, unknown {len(unknown)}")
    table.rows.append(reporting.mean_std_row(table.rows))
    table.notes.append(f"AUROC: known positive, {_ties_note(auroc_convention)}; OSCR: ARPL definition; "
                       "± std: population std over splits (ddof 0).")
    if any(row.values[0] is None for row in table.rows):
        table.notes.append("ACC/OSCR need known_correct, or known_pred / known_logits with known_labels.")
    return evaluation


CL_COLUMNS = ["Transfer", "Avg", "Last", "Avg_inc", "Last_inc", "Forgetting", "BWT"]


def _cl_matrix(arrays: dict, path: Path, prefix: str, zero_shot_row: bool):
    """(matrix as fractions, with a zero-shot row?, T x T part, task sizes or None, given in percent?), shapes
    checked."""
    matrix = arrays[prefix + "acc_matrix"]
    if matrix.ndim != 2 or matrix.size == 0 or matrix.dtype.kind not in "biuf":
        raise ScoreFileError(f"{path}: '{prefix}acc_matrix' must be a numeric 2-D matrix A[t, j], got shape "
                             f"{matrix.shape} dtype {matrix.dtype}")
    flag = arrays.get(prefix + "zero_shot_row", np.array(False))
    if flag.size != 1 or flag.dtype.kind not in "biuf" or flag.reshape(-1)[0] not in (0, 1):
        raise ScoreFileError(f"{path}: '{prefix}zero_shot_row' must be a single bool (True: row 0 of acc_matrix "
                             f"is the zero-shot model), got shape {flag.shape} dtype {flag.dtype}")
    with_zero_shot = zero_shot_row or bool(flag.reshape(-1)[0])
    tasks = matrix.shape[1]
    if matrix.shape[0] != tasks + with_zero_shot:
        expected = f"[T+1, T] = [{tasks + 1}, {tasks}] with the zero-shot row" if with_zero_shot else \
            "square [T, T] (or [T+1, T] with zero_shot_row / --zero-shot-row)"
        raise ScoreFileError(f"{path}: '{prefix}acc_matrix' has shape {matrix.shape}; expected {expected}")
    # Percentages -> fractions, the unit metrics and the report use (max > 1 cannot be a fraction).
    in_percent = bool(np.nanmax(np.abs(matrix)) > 1.0)
    fractions = matrix.astype(np.float64) / (100.0 if in_percent else 1.0)
    sizes = _vector(arrays, path, prefix + "task_sizes") if prefix + "task_sizes" in arrays else None
    if sizes is not None and len(sizes) != tasks:
        raise ScoreFileError(f"{path}: '{prefix}task_sizes' has {len(sizes)} entries for {tasks} tasks")
    if sizes is not None and not (np.isfinite(sizes) & (sizes > 0)).all():  # else only "n/a" columns would show it
        raise ScoreFileError(f"{path}: '{prefix}task_sizes' must be finite and > 0 (test samples per task), got "
                             f"{sizes.tolist()}")
    return fractions, with_zero_shot, fractions[1:] if with_zero_shot else fractions, sizes, in_percent


def _task_names(arrays: dict, path: Path, key: str, tasks: int) -> list[str] | None:
    """The optional plot labels: one per task (the heat map labels both axes with them)."""
    if key not in arrays:
        return None
    names = arrays[key]
    if names.ndim != 1 or len(names) != tasks:
        raise ScoreFileError(f"{path}: '{key}' must be 1-D with one name per task ({tasks}), got shape "
                             f"{names.shape}")
    return [str(name) for name in names]


def evaluate_cl(paths, *, zero_shot_row: bool = False) -> Evaluation:
    """CL table: Transfer / Avg / Last (MTCL), Avg_inc / Last_inc (class-incremental), Forgetting, BWT per run."""
    table = Table("Continual learning", "run", CL_COLUMNS)
    evaluation = Evaluation(table)
    for path, name, arrays, prefix in _named_entries(paths, "acc_matrix", "cl"):
        fractions, with_zero_shot, square, sizes, in_percent = _cl_matrix(arrays, path, prefix, zero_shot_row)
        compute = {
            "Transfer": lambda: metrics.transfer(fractions, zero_shot_row=with_zero_shot),
            "Avg": lambda: metrics.avg(fractions, zero_shot_row=with_zero_shot),
            "Last": lambda: metrics.last(fractions, zero_shot_row=with_zero_shot),
            "Avg_inc": lambda: metrics.average_incremental_accuracy(square, task_sizes=sizes),
            "Last_inc": lambda: metrics.last_accuracy(square, task_sizes=sizes),
            "Forgetting": lambda: metrics.forgetting(square),
            "BWT": lambda: metrics.backward_transfer(square),
        }
        values = []
        for column in CL_COLUMNS:
            try:
                values.append(compute[column]())
            except ValueError as error:  # shapes are checked above: only NaN entries or a single task get here
                values.append(None)
                table.notes.append(f"{name}: {column} n/a ({error}).")
        table.rows.append(Row(name, values))
        names = _task_names(arrays, path, prefix + "task_names", square.shape[1])
        evaluation.matrices.append((name, fractions, names, with_zero_shot))
        evaluation.arrays.update({f"{name}/{key}": arrays[prefix + key] for key in ("acc_matrix", "task_sizes",
                                                                                    "task_names")
                                  if prefix + key in arrays})
        evaluation.arrays[f"{name}/zero_shot_row"] = np.array(with_zero_shot)
        _log(f"read {path}{f' [{name}]' if prefix else ''}: {square.shape[1]} tasks"
             + (" + zero-shot row" if with_zero_shot else "") + (", values in percent" if in_percent else ""))
    if len(table.rows) > 1:
        table.rows.append(reporting.mean_std_row(table.rows))
    table.notes.insert(0, "Transfer/Avg/Last: MTCL (ZSCL, MoE-Adapters4CL); Avg_inc/Last_inc: class-incremental "
                          "accuracy on all classes seen so far (mean over steps / final step); Forgetting: max-drop "
                          "form; BWT: GEM.")
    return evaluation


# ----------------------------------------------------------------------------------------------------------------
# Outputs and the command line
# ----------------------------------------------------------------------------------------------------------------
def write_outputs(evaluation: Evaluation, out, protocol: str, *, plots: bool = True) -> list[Path]:
    """Write ``<protocol>.csv``, ``<protocol>.md``, ``<protocol>_scores.npz`` and (``plots``) PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = evaluation.table
    written = [out / f"{protocol}.csv", out / f"{protocol}.md"]
    reporting.write_csv(table, written[0])
    written[1].write_text(reporting.render_markdown(table))
    written.append(save_scores(out / f"{protocol}_scores.npz", evaluation.arrays))
    if plots:
        written += reporting.write_plots(out, protocol, table.title, evaluation.pairs, evaluation.matrices,
                                         auroc_convention=evaluation.auroc_convention)
    return written


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fsosr.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate saved score files: OOD, open-set (OSR) and continual-learning (CL) tables, printed "
                    "and (--out) written as CSV, markdown, re-saved scores and PNG plots.",
        epilog=__doc__[__doc__.index("Score files"):])  # the file format and usage, from the module docstring
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="write CSV, markdown, re-saved scores and plots here "
                                                 "(default: print only)")
    common.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    protocols = parser.add_subparsers(dest="protocol", required=True, metavar="{ood,osr,cl}")
    ood = protocols.add_parser("ood", parents=[common], help="OOD detection table from one score file")
    ood.add_argument("inputs", nargs=1, metavar="SCORES.npz")
    ood.add_argument("--fpr-convention", choices=sorted(FPR_CONVENTIONS), default="hendrycks",
                     help="hendrycks (default): ID positive, as LoCoOp/MCM; openood: OOD positive, as OpenOOD v1.5")
    ood.add_argument("--tpr", type=_rate, default=0.95, help="recall level of the FPR column (default 0.95)")
    osr = protocols.add_parser("osr", parents=[common], help="open-set table, one row per split")
    osr.add_argument("inputs", nargs="+", metavar="SCORES.npz")
    for sub in (ood, osr):
        sub.add_argument("--auroc-convention", choices=AUROC_CONVENTIONS, default="sklearn",
                         help="ties between known and unknown scores count 1/2 (sklearn, default) or 0 (ARPL/FSMoE)")
    cl = protocols.add_parser("cl", parents=[common], help="continual-learning table from accuracy matrices")
    cl.add_argument("inputs", nargs="+", metavar="SCORES.npz")
    cl.add_argument("--zero-shot-row", action="store_true",
                    help="row 0 of every acc_matrix is the model before any training ([T+1, T])")
    return parser


def run(args: argparse.Namespace) -> Evaluation:
    """Evaluate the parsed command line; returns the evaluation (also printed and, with --out, written)."""
    if args.protocol == "ood":
        evaluation = evaluate_ood(args.inputs[0], fpr_convention=args.fpr_convention, tpr=args.tpr,
                                  auroc_convention=args.auroc_convention)
    elif args.protocol == "osr":
        evaluation = evaluate_osr(args.inputs, auroc_convention=args.auroc_convention)
    else:
        evaluation = evaluate_cl(args.inputs, zero_shot_row=args.zero_shot_row)
    print(reporting.render_text(evaluation.table))
    if args.out is None:
        _log("no --out given: nothing written")
    else:
        written = write_outputs(evaluation, args.out, args.protocol, plots=not args.no_plots)
        pngs = sum(path.suffix == ".png" for path in written)
        _log(f"wrote {len(written) - pngs} files and {pngs} plots to {args.out}/: "
             + ", ".join(path.name for path in written[:3]) + (", ..." if pngs else ""))
    return evaluation


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad score file, with a message naming it)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ScoreFileError, reporting.MissingDependency) as error:
        print(f"python -m fsosr.eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
