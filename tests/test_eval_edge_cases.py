"""``python -m fsosr.eval`` on unusual but legitimate inputs (±inf scores, colliding set names, any key name) and on
malformed ones: a clean exit code 2 naming the file and key, never a traceback; argument errors are ValueErrors."""
import math
import zipfile

import numpy as np
import pytest

from fsosr import metrics, reporting
from fsosr.eval import ScoreFileError, evaluate_ood, evaluate_osr, main, read_score_file, save_scores

INF = math.inf


@pytest.fixture
def drawn_axes(monkeypatch):
    """Every matplotlib Axes the plots draw on, in order, to read legends and bar heights back."""
    pytest.importorskip("matplotlib")
    axes_list, original = [], reporting._figure

    def recording(*args, **kwargs):
        figure, axes = original(*args, **kwargs)
        axes_list.append(axes)
        return figure, axes

    monkeypatch.setattr(reporting, "_figure", recording)
    return axes_list


def legend(axes):
    return [text.get_text() for text in axes.get_legend().get_texts()]


def densities(axes):
    """(heights, edges) of each histogram (known first) in a density plot."""
    return [patch.get_data()[:2] for patch in axes.patches]


# ---------------------------------------------------------------------------------------------------------------
# ±inf scores: plotted in the edge bins, never a crash
# ---------------------------------------------------------------------------------------------------------------
def test_infinite_scores_go_into_the_edge_bins_of_the_density_plot(tmp_path, capsys, drawn_axes):
    save_scores(tmp_path / "f.npz", id_scores=[2.0, 3.0, INF], ood_scores=[-INF, 0.0, 1.0])
    assert main(["ood", str(tmp_path / "f.npz"), "--out", str(tmp_path / "d")]) == 0
    row = printed_row(capsys.readouterr().out, "ood")
    assert row[:2] == ["0.00", "100.00"]                              # FPR@95, AUROC: separable
    (known, edges), (unknown, same_edges) = densities(drawn_axes[0])
    assert edges[0] == 0.0 and edges[-1] == 3.0 and np.array_equal(edges, same_edges)   # from the finite scores
    width = edges[1] - edges[0]
    assert known[-1] * width == pytest.approx(2 / 3) and unknown[0] * width == pytest.approx(2 / 3)  # 3 and inf
    assert (known * width).sum() == pytest.approx(1.0) and (unknown * width).sum() == pytest.approx(1.0)
    assert legend(drawn_axes[0]) == ["ID (n=3, 1 at ±inf in the edge bins)",
                                     "OOD ood (n=3, 1 at ±inf in the edge bins)"]
    assert (tmp_path / "d" / "ood_density_ood.png").stat().st_size > 1000


def test_density_plot_of_only_infinite_scores(tmp_path, drawn_axes):
    reporting.plot_densities(tmp_path / "p.png", np.array([INF, INF]), np.array([-INF]), title="t",
                             known_label="known", unknown_label="unknown")
    (known, edges), (unknown, _) = densities(drawn_axes[0])
    width = edges[1] - edges[0]
    assert known[-1] * width == pytest.approx(1.0) and unknown[0] * width == pytest.approx(1.0)
    assert (tmp_path / "p.png").exists()


def test_osr_density_plots_accept_infinite_scores(tmp_path):
    save_scores(tmp_path / "s.npz", known_scores=[1.0, INF], unknown_scores=[-INF, 0.5], known_correct=[1, 0])
    assert main(["osr", str(tmp_path / "s.npz"), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "osr_density_s.png").exists()


def printed_row(text, name):
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return line.split()[1:]


# ---------------------------------------------------------------------------------------------------------------
# One plot file per set / run, whatever the names
# ---------------------------------------------------------------------------------------------------------------
def test_density_plots_of_sets_with_colliding_names_are_all_written(tmp_path, capsys, drawn_axes):
    rng = np.random.default_rng(0)
    ood = {"near": {"x": rng.normal(0, 1, 20)}, "far": {"x": rng.normal(-3, 1, 20)},
           "a b": rng.normal(0, 1, 20), "a_b": rng.normal(0, 1, 20), "A_B": rng.normal(0, 1, 20)}
    save_scores(tmp_path / "f.npz", id_scores=rng.normal(1, 1, 30), ood=ood)
    assert main(["ood", str(tmp_path / "f.npz"), "--out", str(tmp_path / "d")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "d").glob("*.png"))
    assert pngs == ["ood_density_A_B_3.png", "ood_density_a_b.png", "ood_density_a_b_2.png", "ood_density_far_x.png",
                    "ood_density_near_x.png", "ood_roc.png"]
    assert "wrote 3 files and 6 plots" in capsys.readouterr().err      # the count logged = the files written
    assert [axes.get_title().split(": ")[-1] for axes in drawn_axes[:5]] == ["near/x", "far/x", "a b", "a_b", "A_B"]


def test_matrix_plots_of_runs_with_colliding_names_are_all_written(tmp_path):
    save_scores(tmp_path / "cl.npz", {"run 1": {"acc_matrix": np.eye(2)}, "run_1": {"acc_matrix": np.ones((2, 2))}})
    assert main(["cl", str(tmp_path / "cl.npz"), "--out", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == ["cl_matrix_run_1.png", "cl_matrix_run_1_2.png"]


def test_roc_legend_shows_the_chosen_auroc_convention(tmp_path, drawn_axes):
    known, unknown = np.array([1.0, 1.0, 2.0]), np.array([1.0, 0.0])      # ties: the conventions differ
    arpl, sklearn = metrics.auroc(known, unknown, convention="arpl"), metrics.auroc(known, unknown)
    assert (arpl, sklearn) == (4 / 6, 5 / 6)
    save_scores(tmp_path / "s.npz", known_scores=known, unknown_scores=unknown)
    assert main(["osr", str(tmp_path / "s.npz"), "--auroc-convention", "arpl", "--out", str(tmp_path / "d")]) == 0
    roc = next(axes for axes in drawn_axes if axes.get_title().startswith("ROC"))
    assert legend(roc) == ["s (AUROC, arpl 66.67)"]
    assert main(["osr", str(tmp_path / "s.npz"), "--out", str(tmp_path / "e")]) == 0
    assert legend([axes for axes in drawn_axes if axes.get_title().startswith("ROC")][-1]) == ["s (AUROC 83.33)"]


# ---------------------------------------------------------------------------------------------------------------
# Score files: any key name round-trips; malformed files exit with 2 and a message
# ---------------------------------------------------------------------------------------------------------------
def test_save_scores_round_trips_keys_named_like_numpy_arguments(tmp_path):
    arrays = {"file": np.array([1.0, 2.0]), "allow_pickle": np.array([True, False]), "path": np.arange(3),
              "x/compress": np.array(["a", "bc"])}
    path = save_scores(tmp_path / "s.npz", {k: v for k, v in arrays.items() if k != "file"}, file=arrays["file"])
    loaded = read_score_file(path)
    assert sorted(loaded) == sorted(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key
    with np.load(path) as data:                                          # still a plain numpy .npz
        assert np.array_equal(data["allow_pickle"], arrays["allow_pickle"])


@pytest.mark.parametrize("member", ["notes", "id_scores"])
def test_member_without_npy_suffix_is_a_score_file_error(tmp_path, capsys, member):
    path = tmp_path / "hand.npz"
    save_scores(path, {"id_scores": [0.9, 0.1], "ood_scores": [0.5]} if member == "notes" else {"ood_scores": [0.5]})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(member, b"0.9 0.1")                  # neither .npy nor an array: np.load returns the bytes
    with pytest.raises(ScoreFileError, match=f"member '{member}' is not a .npy array"):
        read_score_file(path)
    assert main(["ood", str(path)]) == 2
    assert f"{path}: member '{member}' is not a .npy array" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", [[0, 10], [1, -1], [-1, 2], [INF, 1]])
def test_bad_task_sizes_exit_with_2(tmp_path, capsys, sizes):
    save_scores(tmp_path / "cl.npz", acc_matrix=np.eye(2), task_sizes=np.array(sizes, dtype=float))
    assert main(["cl", str(tmp_path / "cl.npz"), "--out", str(tmp_path / "d")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'cl.npz'}: 'task_sizes' must be finite and > 0 (test samples per task)" in error


@pytest.mark.parametrize("extra, message", [
    ({"task_names": ["a", "b", "c"]}, "'task_names' must be 1-D with one name per task (2), got shape (3,)"),
    ({"task_names": np.array("ab")}, "'task_names' must be 1-D with one name per task (2), got shape ()"),
    ({"zero_shot_row": [True, True]}, "'zero_shot_row' must be a single bool"),
    ({"zero_shot_row": 2}, "'zero_shot_row' must be a single bool"),
    ({"zero_shot_row": "yes"}, "'zero_shot_row' must be a single bool"),
])
def test_malformed_optional_cl_keys_exit_with_2(tmp_path, capsys, extra, message):
    save_scores(tmp_path / "cl.npz", acc_matrix=np.eye(2), **extra)
    assert main(["cl", str(tmp_path / "cl.npz"), "--out", str(tmp_path / "d")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m fsosr.eval: error: ") and f"{tmp_path / 'cl.npz'}: {message}" in error


def test_valid_optional_cl_keys_still_work(tmp_path):
    save_scores(tmp_path / "cl.npz", acc_matrix=np.vstack([np.zeros(2), np.eye(2)]), zero_shot_row=np.array([1]),
                task_names=["a", "b"], task_sizes=[1, 3])
    assert main(["cl", str(tmp_path / "cl.npz"), "--out", str(tmp_path / "d")]) == 0
    with np.load(tmp_path / "d" / "cl_scores.npz") as saved:
        assert bool(saved["cl/zero_shot_row"]) and saved["cl/task_names"].tolist() == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# The Python API: arguments are checked first, with ValueErrors that name them
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_osr_takes_a_single_path_as_one_file(tmp_path):
    save_scores(tmp_path / "split0.npz", known_scores=[0.9, 0.4], unknown_scores=[0.5])
    for single in (str(tmp_path / "split0.npz"), tmp_path / "split0.npz"):
        rows = evaluate_osr(single).table.rows
        assert [row.name for row in rows] == ["split0", "mean"] and rows[0].values[1] == 0.5
    with pytest.raises(ValueError, match="no score files given"):
        evaluate_osr([])


@pytest.mark.parametrize("kwargs, message", [
    ({"fpr_convention": "x"}, r"fpr_convention must be one of \['hendrycks', 'openood'\], got 'x'"),
    ({"tpr": 1.5}, r"tpr must be in \(0, 1\], got 1.5"),
    ({"tpr": math.nan}, r"tpr must be in \(0, 1\], got nan"),
    ({"auroc_convention": "openood"}, r"auroc_convention must be one of \['sklearn', 'arpl'\], got 'openood'"),
])
def test_bad_evaluate_ood_arguments_are_value_errors_raised_before_reading(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        evaluate_ood(tmp_path / "does_not_exist.npz", **kwargs)      # the argument is reported, not the file
    assert not isinstance(raised.value, ScoreFileError)


def test_bad_evaluate_osr_convention_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="auroc_convention must be one of") as raised:
        evaluate_osr([tmp_path / "does_not_exist.npz"], auroc_convention="ARPL")
    assert not isinstance(raised.value, ScoreFileError)


def test_save_scores_refuses_an_array_given_twice(tmp_path):
    with pytest.raises(ValueError, match="'ood/x' is given twice"):
        save_scores(tmp_path / "s.npz", {"ood/x": [1.0]}, id_scores=[2.0], ood={"x": [0.5]})
    with pytest.raises(ValueError, match="both in the mapping and as keyword"):
        save_scores(tmp_path / "s.npz", {"id_scores": [1.0]}, id_scores=[2.0])
    assert not (tmp_path / "s.npz").exists()
    path = save_scores(tmp_path / "s.npz", {"ood/x": [1.0]}, id_scores=[2.0], ood={"y": [0.5]})
    assert sorted(read_score_file(path)) == ["id_scores", "ood/x", "ood/y"]
