"""``python -m fsosr.eval``: tables equal `fsosr.metrics` computed directly, outputs exist and are valid, errors name
the file and the key."""
import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fsosr import metrics
from fsosr.eval import main, save_scores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def read_csv(path):
    """{row name: {column: float or None}} from a table CSV (percentages)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    index = next(iter(rows[0]))
    return {row[index]: {k: (float(v) if v else None) for k, v in row.items() if k != index} for row in rows}


def printed_rows(text):
    """{row name: [cells]} from the printed table (columns are separated by at least two spaces)."""
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip())
                                               for line in lines[rules[1] + 1: rules[2]])}


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, path
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def ood_arrays(seed=0, n_id=400):
    """ID scores with logits/labels, a separable OOD set and two overlapping ones (continuous: no ties)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n_id)
    logits = rng.normal(size=(n_id, 5))
    logits[np.arange(n_id), labels] += 1.0
    id_scores = rng.normal(1.0, 1.0, n_id)
    ood = {"near": {"cifar100": rng.normal(0.4, 1.0, 300), "tin": rng.normal(0.2, 1.2, 250)},
           "far": {"mnist": rng.uniform(-6.0, -5.0, 200)}}
    return dict(id_scores=id_scores, id_logits=logits, id_labels=labels, ood=ood)


def ood_values(known, unknown, accuracy, fpr=metrics.fpr_at_tpr):
    """The OOD row computed straight from fsosr.metrics, in percent."""
    return [100 * fpr(known, unknown), 100 * metrics.auroc(known, unknown), 100 * metrics.aupr_in(known, unknown),
            100 * metrics.aupr_out(known, unknown), 100 * accuracy]


def cells(values):
    return [f"{v:.2f}" for v in values]


# ---------------------------------------------------------------------------------------------------------------
# OOD
# ---------------------------------------------------------------------------------------------------------------
def test_ood_table_equals_metrics_with_openood_group_means(tmp_path, capsys):
    arrays = ood_arrays()
    save_scores(tmp_path / "scores.npz", **arrays)
    assert main(["ood", str(tmp_path / "scores.npz"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    accuracy = metrics.closed_set_accuracy(arrays["id_logits"], arrays["id_labels"])
    expected = {name: ood_values(arrays["id_scores"], scores, accuracy)
                for group in arrays["ood"].values() for name, scores in group.items()}
    expected["nearood"] = list(np.mean([expected["cifar100"], expected["tin"]], axis=0))
    expected["farood"] = expected["mnist"]
    expected["mean"] = list(np.mean([expected["cifar100"], expected["tin"], expected["mnist"]], axis=0))

    table = read_csv(tmp_path / "out" / "ood.csv")
    assert list(table) == ["cifar100", "tin", "nearood", "mnist", "farood", "mean"]   # OpenOOD's row order
    for name, values in expected.items():
        assert list(table[name].values()) == pytest.approx(values, rel=1e-12, abs=1e-12), name
    assert list(table["mean"]) == ["FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert table["mnist"]["FPR@95"] == 0.0 and table["mnist"]["AUROC"] == 100.0     # separable set
    printed = printed_rows(capsys.readouterr().out)
    assert printed == {name: cells(values) for name, values in expected.items()}


def test_ood_fpr_convention_and_tpr_switch_the_definition(tmp_path, capsys):
    arrays = ood_arrays(seed=1)
    save_scores(tmp_path / "s.npz", id_scores=arrays["id_scores"], ood_scores=arrays["ood"]["near"]["tin"])
    known, unknown = arrays["id_scores"], arrays["ood"]["near"]["tin"]
    assert main(["ood", str(tmp_path / "s.npz"), "--fpr-convention", "openood", "--tpr", "0.9",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    table = read_csv(tmp_path / "ood.csv")
    openood, hendrycks = metrics.openood_fpr_at_tpr(known, unknown, 0.9), metrics.fpr_at_tpr(known, unknown, 0.9)
    assert openood != hendrycks                       # the data tell the two definitions apart
    assert table["ood"]["FPR@90"] == pytest.approx(100 * openood, rel=1e-12)
    assert table["ood"]["ACC"] is None                # no labels in the file
    out = capsys.readouterr().out
    assert printed_rows(out)["ood"][-1] == "-" and "OOD positive" in out


def test_ood_outputs_markdown_plots_and_resaved_scores(tmp_path, capsys):
    arrays = ood_arrays(seed=2)
    save_scores(tmp_path / "scores.npz", **arrays)
    out = tmp_path / "out"
    assert main(["ood", str(tmp_path / "scores.npz"), "--out", str(out)]) == 0
    markdown = (out / "ood.md").read_text().splitlines()
    assert "| dataset | FPR@95 | AUROC | AUPR_IN | AUPR_OUT | ACC |" in markdown
    expected = ood_values(arrays["id_scores"], arrays["ood"]["far"]["mnist"],
                          metrics.closed_set_accuracy(arrays["id_logits"], arrays["id_labels"]))
    assert "| mnist | " + " | ".join(cells(expected)) + " |" in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["ood_density_far_mnist.png", "ood_density_near_cifar100.png", "ood_density_near_tin.png",
                    "ood_oscr.png", "ood_roc.png"]                  # grouped sets: the group is in the name
    for name in pngs:
        assert_png(out / name)
    with np.load(out / "ood_scores.npz") as saved:
        assert sorted(saved.files) == ["id_labels", "id_logits", "id_scores", "ood/far/mnist", "ood/near/cifar100",
                                       "ood/near/tin"]
        np.testing.assert_array_equal(saved["ood/near/tin"], arrays["ood"]["near"]["tin"])
    # The re-saved file is itself a valid input and gives the same table.
    assert main(["ood", str(out / "ood_scores.npz"), "--out", str(tmp_path / "again"), "--no-plots"]) == 0
    assert read_csv(tmp_path / "again" / "ood.csv") == read_csv(out / "ood.csv")


def test_without_out_only_prints(tmp_path, capsys):
    known, unknown = np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.1, 0.75, 0.3])
    save_scores(tmp_path / "s.npz", id_scores=known, ood={"a": unknown}, id_correct=[True, True, False, True])
    assert main(["ood", str(tmp_path / "s.npz")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    printed = printed_rows(capsys.readouterr().out)
    assert printed["a"] == cells(ood_values(known, unknown, 0.75)) == printed["mean"]
    assert printed["a"][1] == "75.00"                 # AUROC by hand: 9 of 12 pairs ordered correctly


# ---------------------------------------------------------------------------------------------------------------
# OSR
# ---------------------------------------------------------------------------------------------------------------
def osr_split(rng, n_known=120, n_unknown=90):
    known = rng.normal(1.0, 1.0, n_known)
    return dict(known_scores=known, known_correct=rng.random(n_known) < 0.8, unknown_scores=rng.normal(0, 1, n_unknown))


def osr_values(split):
    k, c, u = split["known_scores"], split["known_correct"], split["unknown_scores"]
    return [100 * c.mean(), 100 * metrics.auroc(k, u), 100 * metrics.oscr(k, c, u)]


def test_osr_table_per_split_and_mean_std(tmp_path, capsys):
    rng = np.random.default_rng(3)
    splits = {f"split{i}": osr_split(rng) for i in range(5)}
    for name in ("split0", "split1", "split2"):                     # one split per file ...
        save_scores(tmp_path / f"{name}.npz", **splits[name])
    save_scores(tmp_path / "rest.npz", split3=splits["split3"], split4=splits["split4"])   # ... or prefixed
    files = [str(tmp_path / f) for f in ("split0.npz", "split1.npz", "split2.npz", "rest.npz")]
    assert main(["osr", *files, "--out", str(tmp_path / "out")]) == 0
    expected = np.array([osr_values(splits[f"split{i}"]) for i in range(5)])
    table = read_csv(tmp_path / "out" / "osr.csv")
    assert list(table) == [f"split{i}" for i in range(5)] + ["mean", "std"]
    for i in range(5):
        assert list(table[f"split{i}"].values()) == pytest.approx(expected[i], rel=1e-12)
    assert list(table["mean"].values()) == pytest.approx(expected.mean(axis=0), rel=1e-12)
    assert list(table["std"].values()) == pytest.approx(expected.std(axis=0), rel=1e-12)   # ddof 0
    printed = printed_rows(capsys.readouterr().out)
    assert printed["mean ± std"] == [f"{m:.2f} ± {s:.2f}" for m, s in zip(expected.mean(0), expected.std(0))]
    assert "| mean ± std | " in (tmp_path / "out" / "osr.md").read_text()
    for name in ("osr_roc.png", "osr_oscr.png", "osr_density_split3.png"):
        assert_png(tmp_path / "out" / name)


def test_osr_accuracy_from_logits_and_arpl_ties(tmp_path):
    rng = np.random.default_rng(4)
    labels, logits = rng.integers(0, 6, 80), rng.normal(size=(80, 6))
    known, unknown = rng.integers(0, 5, 80).astype(float), rng.integers(0, 4, 50).astype(float)   # many ties
    save_scores(tmp_path / "tied.npz", known_scores=known, known_logits=logits, known_labels=labels,
                unknown_scores=unknown)
    assert main(["osr", str(tmp_path / "tied.npz"), "--auroc-convention", "arpl",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    row = read_csv(tmp_path / "osr.csv")["tied"]
    correct = logits.argmax(1) == labels
    assert metrics.auroc(known, unknown, convention="arpl") != metrics.auroc(known, unknown)
    assert row == pytest.approx({"ACC": 100 * metrics.closed_set_accuracy(logits, labels),
                                 "AUROC": 100 * metrics.auroc(known, unknown, convention="arpl"),
                                 "OSCR": 100 * metrics.oscr(known, correct, unknown)}, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Continual learning
# ---------------------------------------------------------------------------------------------------------------
def test_cl_mtcl_matrix_in_percent_with_zero_shot_row(tmp_path, capsys):
    percent = np.array([[50, 20, 10], [60, 80, 15.0], [70, 75, 85], [65, 70, 90]])   # row 0: zero-shot model
    save_scores(tmp_path / "order1.npz", acc_matrix=percent, task_names=["aircraft", "dtd", "mnist"])
    assert main(["cl", str(tmp_path / "order1.npz"), "--zero-shot-row", "--out", str(tmp_path / "out")]) == 0
    a = percent / 100
    assert list(read_csv(tmp_path / "out" / "cl.csv")["order1"].values()) == pytest.approx([
        100 * metrics.transfer(a, zero_shot_row=True), 100 * metrics.avg(a, zero_shot_row=True),
        100 * metrics.last(a, zero_shot_row=True), 100 * metrics.average_incremental_accuracy(a[1:]),
        100 * metrics.last_accuracy(a[1:]), 100 * metrics.forgetting(a[1:]), 100 * metrics.backward_transfer(a[1:])])
    # By hand, without the zero-shot row: Transfer = mean(80, mean(15, 85)) = 65; Avg = 610 / 9; Last = 225 / 3.
    assert printed_rows(capsys.readouterr().out)["order1"][:3] == ["65.00", "67.78", "75.00"]
    assert_png(tmp_path / "out" / "cl_matrix_order1.png")
    with np.load(tmp_path / "out" / "cl_scores.npz") as saved:
        assert bool(saved["order1/zero_shot_row"]) and saved["order1/acc_matrix"].shape == (4, 3)


def test_cl_class_incremental_runs_mean_std_and_missing_metrics(tmp_path, capsys):
    nan = np.nan
    runs = {"seed1": np.array([[0.9, nan, nan], [0.8, 0.85, nan], [0.7, 0.75, 0.8]]),
            "seed2": np.array([[0.95, nan, nan], [0.7, 0.9, nan], [0.6, 0.7, 0.9]])}
    sizes = np.array([100, 100, 200])
    save_scores(tmp_path / "ci.npz", {name: {"acc_matrix": a, "task_sizes": sizes} for name, a in runs.items()})
    assert main(["cl", str(tmp_path / "ci.npz"), "--out", str(tmp_path), "--no-plots"]) == 0
    table = read_csv(tmp_path / "cl.csv")
    per_run = np.array([[100 * metrics.average_incremental_accuracy(a, task_sizes=sizes),
                         100 * metrics.last_accuracy(a, task_sizes=sizes), 100 * metrics.forgetting(a)]
                        for a in runs.values()])
    for i, name in enumerate(runs):
        assert table[name]["Transfer"] is None and table[name]["Avg"] is None     # NaN above the diagonal
        assert [table[name][c] for c in ("Avg_inc", "Last_inc", "Forgetting")] == pytest.approx(per_run[i])
    assert [table["mean"][c] for c in ("Avg_inc", "Last_inc", "Forgetting")] == pytest.approx(per_run.mean(0))
    assert [table["std"][c] for c in ("Avg_inc", "Last_inc", "Forgetting")] == pytest.approx(per_run.std(0))
    out = capsys.readouterr().out
    assert "seed1: Transfer n/a (accuracy has NaN in column 1 above the diagonal" in out


# ---------------------------------------------------------------------------------------------------------------
# Errors name the file and the key
# ---------------------------------------------------------------------------------------------------------------
def write_bad(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    good = dict(id_scores=[0.9, 0.5, 0.1], ood={"sun": [0.2, 0.3]})
    if case == "missing_id":
        save_scores(path, ood={"sun": [0.2]})
    elif case == "nan":
        save_scores(path, id_scores=[0.9, 0.5], ood={"sun": [0.2, np.nan]})
    elif case == "labels_only":
        save_scores(path, **good, id_labels=[0, 1, 2])
    elif case == "short_correct":
        save_scores(path, **good, id_correct=[True, False])
    elif case == "no_ood":
        save_scores(path, id_scores=[0.9, 0.5])
    elif case == "not_npz":
        path.write_bytes(b"not a zip file")
    elif case == "npy":
        np.save(tmp_path / "single.npy", np.arange(3.0))
        path = tmp_path / "single.npy"
    elif case == "missing_unknown":
        save_scores(path, split0={"known_scores": [0.1, 0.2]})
    elif case == "cl_shape":
        save_scores(path, acc_matrix=np.ones((3, 2)))
    return path


@pytest.mark.parametrize("protocol, case, message", [
    ("ood", "missing_id", "missing array 'id_scores' (1-D scores of the in-distribution test set) "
                          "(arrays in the file: ood/sun)"),
    ("ood", "nan", "'ood/sun' contains NaN (1 of 2, first at index 1)"),
    ("ood", "labels_only", "accuracy needs 'id_labels' with exactly one of 'id_pred' or 'id_logits'"),
    ("ood", "short_correct", "'id_correct' has 2 entries but 'id_scores' has 3"),
    ("ood", "no_ood", "no OOD scores; expected 'ood_scores' or 'ood/<name>' arrays (arrays in the file: id_scores)"),
    ("ood", "not_npz", "is not an .npz archive (write score files with numpy.savez or fsosr.eval.save_scores)"),
    ("ood", "npy", "is a single .npy array; score files are .npz archives of named arrays"),
    ("osr", "missing_unknown", "missing array 'split0/unknown_scores' (split 'split0')"),
    ("cl", "cl_shape", "'acc_matrix' has shape (3, 2); expected square [T, T] (or [T+1, T] with zero_shot_row"),
])
def test_errors_name_file_and_key(tmp_path, capsys, protocol, case, message):
    path = write_bad(tmp_path, case)
    assert main([protocol, str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m fsosr.eval: error: ") and str(path) in error and message in error


def test_missing_file_and_checkpoint_are_explained(tmp_path, capsys):
    assert main(["osr", str(tmp_path / "nope.npz")]) == 2
    assert f"score file not found: {tmp_path / 'nope.npz'}" in capsys.readouterr().err
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(["ood", str(tmp_path / "model.pt")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'model.pt'}: this looks like a checkpoint" in error and "save_scores" in error


# ---------------------------------------------------------------------------------------------------------------
# save_scores and the command line
# ---------------------------------------------------------------------------------------------------------------
def test_save_scores_flattens_converts_and_writes_atomically(tmp_path):
    path = save_scores(tmp_path / "run" / "scores", id_scores=torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
                       ood={"near": {"tin": [0.1, 0.2]}}, id_correct=np.array([True, False]))
    assert path == tmp_path / "run" / "scores.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.npz"]        # no temporary file left
    with np.load(path) as saved:
        assert saved.files == ["id_scores", "ood/near/tin", "id_correct"]
        assert saved["id_scores"].dtype == np.float64 and saved["id_scores"].tolist() == [0.5, 0.25]
        assert saved["id_correct"].dtype == bool and saved["ood/near/tin"].tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="ood/x: object arrays"):
        save_scores(tmp_path / "bad.npz", ood={"x": np.array([None, 1])})


def test_module_help_documents_the_format():
    result = subprocess.run([sys.executable, "-m", "fsosr.eval", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{ood,osr,cl}" in result.stdout
    for key in ("id_scores", "ood/<name>", "known_correct", "unknown_scores", "acc_matrix", "--fpr-convention"):
        assert key in result.stdout, key
