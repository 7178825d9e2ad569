"""Result tables (text, markdown, CSV) and evaluation plots (PNG) for ``python -m fsosr.eval``.

Values are stored as fractions (metrics' convention: floats in [0, 1]) and shown as percentages with two
decimals, as papers and OpenOOD print them. A missing value (a metric the inputs cannot give) is ``None``: shown
as ``-``, written to CSV as an empty cell.

Plots use matplotlib's object API with an explicit Agg canvas instead of ``pyplot``: no GUI backend is needed and
importing or calling this module never changes the backend of a user's session (a notebook, say). matplotlib is
imported only when a plot is drawn.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsosr import metrics

__all__ = ["MissingDependency", "Row", "Table", "mean_row", "mean_std_row", "render_text", "render_markdown",
           "write_csv", "plot_densities", "plot_roc", "plot_oscr", "plot_accuracy_matrix", "write_plots"]

MISSING = "-"


class MissingDependency(RuntimeError):
    """An optional package a requested output needs (matplotlib for plots) is not installed."""


@dataclass
class Row:
    """One table row: ``values`` per column (fractions or None); ``std`` turns it into a "mean ± std" row."""
    name: str
    values: list[float | None]
    std: list[float | None] | None = None


@dataclass
class Table:
    """A result table: ``index`` names the first column (dataset / split / run); ``notes`` print below it."""
    title: str
    index: str
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _column(rows: list[Row], j: int) -> list[float]:
    return [row.values[j] for row in rows if row.values[j] is not None]


def mean_row(name: str, rows: list[Row]) -> Row:
    """Arithmetic mean of each column over ``rows`` (None where no row has a value), as LoCoOp/OpenOOD average
    over OOD sets."""
    width = len(rows[0].values)
    return Row(name, [float(np.mean(c)) if (c := _column(rows, j)) else None for j in range(width)])


def mean_std_row(rows: list[Row]) -> Row:
    """Mean and population std (``np.std``, ddof = 0, as OpenOOD's ``eval_ood.py``) of each column over ``rows``."""
    width = len(rows[0].values)
    columns = [_column(rows, j) for j in range(width)]
    return Row("mean", [float(np.mean(c)) if c else None for c in columns],
               [float(np.std(c)) if c else None for c in columns])


def _percent(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _cells(row: Row) -> list[str]:
    if row.std is None:
        return [row.name] + [_percent(v) for v in row.values]
    cells = [f"{_percent(v)} ± {_percent(s)}" if v is not None else MISSING for v, s in zip(row.values, row.std)]
    return [f"{row.name} ± std"] + cells


def render_text(table: Table) -> str:
    """The table as aligned plain text (first column left-aligned, numbers right-aligned), notes below."""
    grid = [[table.index] + table.columns] + [_cells(row) for row in table.rows]
    widths = [max(len(line[j]) for line in grid) for j in range(len(grid[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    rule = "-" * len(line(grid[0]))
    body = [line(cells) for cells in grid[1:]]
    return "\n".join([table.title, rule, line(grid[0]), rule, *body, rule, *table.notes])


def render_markdown(table: Table) -> str:
    """The table as GitHub markdown (numbers right-aligned), the title as a heading and notes as a list."""
    header = [table.index] + table.columns
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in table.rows]
    if table.notes:
        lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """Percentages at full precision, for scripts; a "mean ± std" row becomes a ``mean`` and a ``std`` row."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([table.index] + table.columns)
        for row in table.rows:
            lines = [(row.name, row.values)] if row.std is None else [(row.name, row.values), ("std", row.std)]
            for name, values in lines:
                writer.writerow([name] + ["" if v is None else repr(100.0 * v) for v in values])


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
def _figure(width: float = 5.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("plots need matplotlib: `pip install matplotlib`, or pass --no-plots") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches the Agg canvas that savefig renders with
    return figure, figure.add_subplot()


def plot_densities(path: Path, known, unknown, *, title: str, known_label: str, unknown_label: str) -> None:
    """Histogram densities of known vs unknown scores on shared bins (LoCoOp's ``plot_distribution`` view).

    ±inf scores (legitimate: the energy of -inf logits) are counted in the first / last bin and noted in the legend.
    """
    figure, axes = _figure()
    both = np.concatenate([known, unknown]).astype(np.float64)
    # Bins span the finite scores only: numpy cannot place edges on an infinite range.
    finite = both[np.isfinite(both)] if np.isfinite(both).any() else np.zeros(1)
    # Shared edges so the two densities are comparable; capped so a huge set stays readable.
    edges = np.histogram_bin_edges(finite, bins=min(100, max(10, len(np.histogram_bin_edges(finite, bins="auto")))))
    for scores, label in ((known, known_label), (unknown, unknown_label)):
        scores = np.asarray(scores, dtype=np.float64)
        density, _ = np.histogram(np.clip(scores, edges[0], edges[-1]), bins=edges, density=True)
        infinite = int(np.isinf(scores).sum())
        note = f", {infinite} at ±inf in the edge bins" if infinite else ""
        axes.stairs(density, edges, fill=True, alpha=0.45, label=f"{label} (n={len(scores)}{note})")
    axes.set(xlabel="score (higher = more known)", ylabel="density", title=title)
    axes.legend()
    figure.savefig(path, dpi=100)


def plot_roc(path: Path, pairs, *, title: str, auroc_convention: str = "sklearn") -> None:
    """ROC curves (known = positive), one per (name, known, unknown) in ``pairs``, AUROC in the legend, computed
    with ``auroc_convention`` (`fsosr.metrics.auroc`) so that it matches the table."""
    figure, axes = _figure()
    tag = "" if auroc_convention == "sklearn" else f", {auroc_convention}"
    for name, known, unknown in pairs:
        fpr, tpr, _ = metrics.roc_curve(known, unknown)
        value = metrics.auroc(known, unknown, convention=auroc_convention)
        axes.plot(fpr, tpr, label=f"{name} (AUROC{tag} {100 * value:.2f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="FPR (unknown accepted)", ylabel="TPR (known accepted)", title=title, xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=100)


def plot_oscr(path: Path, triples, *, title: str) -> None:
    """OSCR curves (CCR vs FPR, ARPL definition), one per (name, known, known_correct, unknown)."""
    figure, axes = _figure()
    for name, known, known_correct, unknown in triples:
        fpr, ccr = metrics.oscr_curve(known, known_correct, unknown)
        axes.plot(fpr, ccr, label=f"{name} (OSCR {100 * metrics.oscr(known, known_correct, unknown):.2f})")
    axes.set(xlabel="FPR (unknown accepted)", ylabel="CCR (known accepted and correct)", title=title,
             xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=100)


def plot_accuracy_matrix(path: Path, accuracy: np.ndarray, *, title: str, task_names=None,
                         zero_shot_row: bool = False) -> None:
    """Heat map of A[t, j] (rows: after training task t, the zero-shot model first if given; columns: evaluated
    on task j), in percent."""
    rows, tasks = accuracy.shape
    size = max(4.0, 0.6 * tasks + 2.0)
    figure, axes = _figure(size, size * 0.85)
    image = axes.imshow(100.0 * accuracy, vmin=0, vmax=100, cmap="viridis")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    if tasks <= 12:  # numbers stay legible up to about a dozen tasks
        for (t, j), value in np.ndenumerate(accuracy):
            if not math.isnan(value):  # dark text on the bright end of viridis, light text elsewhere
                axes.text(j, t, f"{100 * value:.1f}", ha="center", va="center", fontsize="x-small",
                          color="black" if value > 0.7 else "white")
    names = list(task_names) if task_names is not None else [str(j) for j in range(tasks)]
    axes.set_xticks(range(tasks), names, rotation=45 if task_names is not None else 0, ha="right")
    axes.set_yticks(range(rows), (["zero-shot"] if zero_shot_row else []) + names[: rows - zero_shot_row])
    axes.set(xlabel="evaluated on task", ylabel="after training task", title=title)
    figure.savefig(path, dpi=100)


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "set"


def _unique_paths(out: Path, stem: str, names) -> list[Path]:
    """``out/<stem>_<name>.png`` per name; names that sanitise to the same file ("a b", "a_b"; compared
    case-insensitively, as macOS and Windows file systems do) get a suffix _2, _3, ... instead of overwriting."""
    paths, taken = [], set()
    for name in names:
        base = candidate = f"{stem}_{_file_name(name)}"
        copy = 1
        while candidate.casefold() in taken:
            copy += 1
            candidate = f"{base}_{copy}"
        taken.add(candidate.casefold())
        paths.append(out / f"{candidate}.png")
    return paths


def write_plots(out: Path, protocol: str, title: str, pairs, matrices, *,
                auroc_convention: str = "sklearn") -> list[Path]:
    """Every plot ``python -m fsosr.eval`` draws, as ``out/<protocol>_*.png``; returns the paths (one per file).

    pairs: (name, known, unknown, known_correct or None) -> one density plot each, one ROC plot (AUROC in the
    legend by ``auroc_convention``), and an OSCR plot of those with known_correct; matrices: (name, accuracy, task
    names, zero-shot row?) -> one heat map each. Names give the file names (an OOD set's name includes its group).
    """
    written = []
    known_label, unknown_label = ("ID", "OOD") if protocol == "ood" else ("known", "unknown")
    density_paths = _unique_paths(out, f"{protocol}_density", [pair[0] for pair in pairs])
    for (name, known, unknown, _), path in zip(pairs, density_paths):
        written.append(path)
        plot_densities(written[-1], known, unknown, title=f"{title}: {name}", known_label=known_label,
                       unknown_label=f"{unknown_label} {name}")
    if pairs:
        written.append(out / f"{protocol}_roc.png")
        plot_roc(written[-1], [pair[:3] for pair in pairs], title=f"ROC: {title}", auroc_convention=auroc_convention)
    with_correct = [(name, known, correct, unknown) for name, known, unknown, correct in pairs if correct is not None]
    if with_correct:
        written.append(out / f"{protocol}_oscr.png")
        plot_oscr(written[-1], with_correct, title=f"OSCR: {title}")
    matrix_paths = _unique_paths(out, f"{protocol}_matrix", [matrix[0] for matrix in matrices])
    for (name, accuracy, task_names, zero_shot_row), path in zip(matrices, matrix_paths):
        written.append(path)
        plot_accuracy_matrix(written[-1], accuracy, title=f"A[t, j]: {name}", task_names=task_names,
                             zero_shot_row=zero_shot_row)
    return written
