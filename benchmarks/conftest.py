"""Shared benchmark plumbing: the device, timing that waits for the GPU, and extra_info every result carries.

Run:  pytest benchmarks/ --benchmark-json=bench.json && python benchmarks/report.py bench.json
Device: FSOSR_BENCH_DEVICE (default: cuda when available, else cpu).
"""
from __future__ import annotations

import os

import pytest
import torch

from fsosr import testing

DEVICE = torch.device(os.environ.get("FSOSR_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))

# Median seconds of each group's baseline provider, filled as the baselines run (they are parametrised first),
# so later providers in the same run can record their speed-up.
BASELINE_MEDIANS: dict[str, float] = {}


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def measure(benchmark, fn, *, group: str, provider: str, baseline: str, info: dict, rounds: int | None = None) -> None:
    """Time fn (warmed up, GPU-synchronised) and record provider, device and speed-up over the baseline.
    rounds: timed calls (default FSOSR_BENCH_ROUNDS, 20; at least 5)."""
    def timed():
        out = fn()
        synchronize()
        return out

    for _ in range(3):
        timed()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = group
    benchmark.extra_info.update(info, provider=provider, baseline=baseline, device=str(DEVICE),
                                device_name=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                threads=torch.get_num_threads(), torch=torch.__version__)
    rounds = rounds if rounds is not None else int(os.environ.get("FSOSR_BENCH_ROUNDS", "20"))
    benchmark.pedantic(timed, rounds=max(5, rounds), warmup_rounds=1)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is None:  # --benchmark-disable: each callable ran once as a smoke test, nothing was timed
        return
    median = benchmark.stats.stats.median
    if provider == baseline:
        BASELINE_MEDIANS[group] = median
    if group in BASELINE_MEDIANS:
        benchmark.extra_info["speedup_vs_" + baseline] = BASELINE_MEDIANS[group] / median


def cuda_graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream, as capture requires), returned as its replay:
    the step without Python, dispatch or launch costs, as a training loop that captures its step would run it."""
    graph, _ = testing.capture_cuda_graph(fn, warmup=3)
    return graph.replay


# Device-to-device copy bandwidth measured on this workplace's machines (bytes read + written per second): the
# floor a memory-bound kernel is measured against.
COPY_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def record_bandwidth(benchmark, floor_bytes: int) -> None:
    """extra_info: the bytes the step must move at least, the achieved rate over them, and on a known GPU the
    fraction of its measured copy bandwidth."""
    if benchmark.stats is None:
        return
    rate = floor_bytes / benchmark.stats.stats.median
    benchmark.extra_info.update(floor_bytes=floor_bytes, achieved_gb_s=rate / 1e9)
    if DEVICE.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in COPY_BANDWIDTH.items() if k in name), None)
        if peak is not None:
            benchmark.extra_info["fraction_of_copy_bandwidth"] = rate / peak


@pytest.fixture
def device() -> torch.device:
    return DEVICE
