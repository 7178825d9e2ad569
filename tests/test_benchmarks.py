"""The benchmark suite's plumbing: every benchmark runs (each callable once, untimed), and benchmarks/report.py
turns pytest-benchmark JSON into the README's tables, GPU device times included."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_report():
    spec = importlib.util.spec_from_file_location("benchmark_report", REPO / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


def _bench(provider, median, **extra):
    return {"name": f"test_step[{provider}]", "group": "masked_adamw_ blocks=12",
            "stats": {"median": median},
            "extra_info": {"op": "masked_adamw_", "provider": provider, "baseline": "loop",
                           "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "threads": 16,
                           "torch": "2.11.0", **extra}}


def _gpu_run():
    return {"machine_info": {"cpu": {"brand_raw": "Xeon"}}, "commit_info": {"id": "0123456789abcdef"},
            "datetime": "2026-11-23T10:00:00.000000",
            "benchmarks": [
                _bench("loop", 4e-3, device_time_median_s=3.5e-3, fraction_of_copy_bandwidth=0.003,
                       device_fraction_of_copy_bandwidth=0.0034),
                _bench("cuda", 50e-6, peak_memory_mib=20.0, fraction_of_copy_bandwidth=0.24,
                       device_time_median_s=16e-6, device_fraction_of_copy_bandwidth=0.75),
                _bench("cuda-graph", 25e-6, fraction_of_copy_bandwidth=0.48, device_time_median_s=15e-6)]}


def test_report_cells_show_time_speedup_memory_bandwidth_and_device_time():
    lines = report.tables(_gpu_run()).splitlines()
    assert lines[0] == "#### masked_adamw_"
    assert lines[2] == "| workload | loop | cuda | cuda-graph |"
    row = lines[4]
    assert row.startswith("| blocks=12 | ")
    loop, cuda, graph = (cell.strip() for cell in row.strip("|").split("|")[1:])
    # The baseline shows its times only: no speed-up or share of bandwidth over itself.
    assert loop == "4.00 ms; device 3.50 ms"
    assert cuda == "50.0 µs (80.0×), 20 MiB, 24% BW; device 16.0 µs, 75% BW"
    # No device fraction recorded (an unknown GPU): the device time alone.
    assert graph == "25.0 µs (160.0×), 48% BW; device 15.0 µs"


def test_report_header_explains_device_times_only_when_there_are_some():
    data = _gpu_run()
    assert "L2 flush" in report.header(data)
    assert "NVIDIA H100 80GB HBM3" in report.header(data) and "commit 0123456789" in report.header(data)
    for bench in data["benchmarks"]:
        del bench["extra_info"]["device_time_median_s"]
    assert "L2 flush" not in report.header(data)
    assert "device" not in report.tables(data).split("\n", 4)[4]


def test_report_replaces_only_the_marked_part_of_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\nrest\n")
    report.update_readme(str(readme), "new table", "bench.json")
    text = readme.read_text()
    assert text.startswith(f"intro\n{report.START}\n") and text.endswith(f"{report.END}\nrest\n")
    assert "old table" not in text and "new table" in text and "from bench.json" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.update_readme(str(readme), "new table", "bench.json")


def test_report_merges_runs_and_skips_untimed_or_malformed_entries(capsys):
    first, second = _gpu_run(), _gpu_run()
    second["benchmarks"] = [_bench("cuda", 40e-6), _bench("triton", 80e-6, copy_bandwidth_bytes_s=4.3e12),
                            {"name": "broken", "group": None, "stats": None, "extra_info": None},
                            _bench("nan", float("nan")), _bench("zero", 0.0)]
    first["commit_info"] = None
    merged = report.merge([first, second], ["a.json", "b.json"])
    assert "keeping the one from b.json" in capsys.readouterr().err     # cuda measured twice: the later run's
    table = report.tables(merged)
    assert "40.0 µs (100.0×)" in table and "80.0 µs (50.0×)" in table   # both runs' providers in one row
    assert "nan" not in table and "zero" not in table.split("|---")[0]
    assert "4.3 TB/s on this GPU" in report.header(merged) and "commit ?" in report.header(merged)


def test_every_benchmark_runs():
    """Each benchmark's callable once (--benchmark-disable): the benchmarks stay runnable on this machine's
    providers. The end-to-end ViT-B/16 training step (half a minute on 2 cores) is left out, and so is the Triton
    interpreter the tests switch on (Triton would count as a CPU provider then, at full benchmark shapes)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FSOSR_BACKEND", "FSOSR_BENCH_DEVICE", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                          "--benchmark-disable", "-k", "not training_step"],
                         capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 70 and "failed" not in summary and "error" not in summary, summary


def test_every_forced_path_provider_names_its_switch():
    """Providers such as `cuda-routed` (a GPU-only FSMoE provider) force a path through the backend's switch; each
    one the moe_mlp benchmarks use must map to one (a missing entry failed only on a GPU). Building the step runs
    no kernel, so this checks the GPU providers here too."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import test_moe_mlp as t\n"
            "for shape, provider in [('adapter', 'cpu-routed'), ('adapter', 'cpu-dense'), ('adapter', 'cpu-blas'),\n"
            "                        ('adapter', 'triton-units'), ('fsmoe', 'cuda-routed')]:\n"
            "    fn = t.moe_step(shape, provider, 'fwd')\n"
            "    assert callable(fn), provider\n"
            "print(sorted(t.PATH_VARIABLES))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FSOSR_BENCH_DEVICE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["['cpu',", "'cuda',", "'triton']"]
