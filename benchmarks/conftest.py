"""Shared benchmark plumbing: the device, timing that waits for the GPU, and extra_info every result carries.

Run:  pytest benchmarks/ --benchmark-json=bench.json && python benchmarks/report.py bench.json
Device: FSOSR_BENCH_DEVICE (default: cuda when available, else cpu).

On a GPU every timed call starts with a cold L2 cache (``flush_l2``), as a layer's or an optimizer's step does in
training, where the rest of the iteration has run in between: an H100's 50 MB L2 would otherwise serve much of a
small step from cache (all of the 36 MB masked_adamw_ step at ViT-B/16 size) and overstate its bandwidth. Besides
pytest-benchmark's wall time (host work, launches and the wait for the GPU), a GPU result records the step's
device time: CUDA events around each call, median over the rounds (``device_time_median_s`` in extra_info); it
still counts the time the GPU waits for a host that launches slower than the GPU runs.
"""
from __future__ import annotations

import contextlib
import os
import statistics

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


_L2_FLUSH_BUFFER: list[torch.Tensor] = []


def flush_l2(wait: bool = True) -> None:
    """Evict the GPU's L2 cache (nothing to do on a CPU): zeroing a buffer twice the L2's size replaces every
    line, so the next step reads its inputs from HBM. wait: return only once the GPU is done (before a wall-time
    measurement); without it the GPU is still busy when the caller launches its step."""
    if DEVICE.type != "cuda":
        return
    if not _L2_FLUSH_BUFFER:
        l2_bytes = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 0) or 2**26
        _L2_FLUSH_BUFFER.append(torch.empty(2 * l2_bytes, dtype=torch.uint8, device=DEVICE))
    _L2_FLUSH_BUFFER[0].zero_()
    if wait:
        torch.cuda.synchronize()


def device_time(fn, rounds: int) -> float:
    """Median seconds of GPU time per call of fn, each after an L2 flush: CUDA events recorded just before and
    after the call's launches. The flush is not waited for, so the host queues the call's first kernels while the
    GPU still flushes and the time starts with the GPU busy, not with a launch latency (as triton.testing.do_bench
    does it)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        flush_l2(wait=False)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)


def measure(benchmark, fn, *, group: str, provider: str, baseline: str, info: dict, rounds: int | None = None,
            host_only: bool = False) -> None:
    """Time fn (warmed up, GPU-synchronised, L2 flushed before each call on a GPU) and record provider, device and
    speed-up over the baseline; on a GPU also fn's device time (``device_time``).
    rounds: timed calls (default FSOSR_BENCH_ROUNDS, 20; at least 5). host_only: fn runs no GPU work (no flush,
    no synchronisation, no device time)."""
    gpu = DEVICE.type == "cuda" and not host_only      # GPU work to wait for, flush the L2 before and time

    def timed():
        out = fn()
        if gpu:
            synchronize()
        return out

    for _ in range(3):
        timed()
    if gpu:
        flush_l2()  # allocates the flush buffer before the peak is reset: it is not the step's memory
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()   # inputs, the flush buffer, leftovers of earlier tests
    benchmark.group = group
    benchmark.extra_info.update(info, provider=provider, baseline=baseline, device=str(DEVICE),
                                device_name=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                threads=torch.get_num_threads(), torch=torch.__version__)
    rounds = max(5, rounds if rounds is not None else int(os.environ.get("FSOSR_BENCH_ROUNDS", "20")))
    benchmark.pedantic(timed, setup=flush_l2 if gpu else None, rounds=rounds, warmup_rounds=1)
    if gpu:
        # Extra peak of the step over what was allocated before it (the README's "extra peak memory"); this was
        # the whole peak minus the flush buffer until 2026-11-23, i.e. inputs and leftovers included.
        benchmark.extra_info["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
    if benchmark.stats is None:  # --benchmark-disable: each callable ran once as a smoke test, nothing was timed
        return
    if gpu:
        benchmark.extra_info["device_time_median_s"] = device_time(fn, rounds)
    median = benchmark.stats.stats.median
    if provider == baseline:
        BASELINE_MEDIANS[group] = median
    if group in BASELINE_MEDIANS:
        benchmark.extra_info["speedup_vs_" + baseline] = BASELINE_MEDIANS[group] / median


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """os.environ with ``variables`` set inside the block (the kernels' launchers read their options from it, in
    forward and in backward), restored after."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cuda_graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream, as capture requires), returned as its replay:
    the step without Python, dispatch or launch costs, as a training loop that captures its step would run it."""
    graph, _ = testing.capture_cuda_graph(fn, warmup=3)
    return graph.replay


# Device-to-device copy bandwidth measured on this workplace's machines (bytes read + written per second): the
# floor a memory-bound kernel is measured against.
COPY_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def record_bandwidth(benchmark, floor_bytes: int) -> None:
    """extra_info: the bytes the step must move at least, the achieved rate over them (per median wall time, and
    on a GPU per median device time), and on a known GPU the fractions of its measured copy bandwidth."""
    if benchmark.stats is None:
        return
    rate = floor_bytes / benchmark.stats.stats.median
    benchmark.extra_info.update(floor_bytes=floor_bytes, achieved_gb_s=rate / 1e9)
    if DEVICE.type != "cuda":
        return
    device_seconds = benchmark.extra_info.get("device_time_median_s")
    device_rate = floor_bytes / device_seconds if device_seconds else None
    if device_rate is not None:
        benchmark.extra_info["device_achieved_gb_s"] = device_rate / 1e9
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in COPY_BANDWIDTH.items() if k in name), None)
    if peak is not None:
        benchmark.extra_info["copy_bandwidth_bytes_s"] = peak      # what the fractions are of (report.py prints it)
        benchmark.extra_info["fraction_of_copy_bandwidth"] = rate / peak
        if device_rate is not None:
            benchmark.extra_info["device_fraction_of_copy_bandwidth"] = device_rate / peak


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_benchmark_update_commit_info(config, commit_info):
    """FSOSR_COMMIT names the commit where git cannot (the GPU machine gets a copy of the tree without .git
    history: its JSON said "commit unknown")."""
    if os.environ.get("FSOSR_COMMIT"):
        commit_info["id"] = os.environ["FSOSR_COMMIT"]
