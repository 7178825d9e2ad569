"""Where the GPU time of one moe_mlp fwd+bwd step and one masked_adamw_ step goes: CUDA-event time per step and
the profiler's kernel table, per backend, at the benchmarks' shapes (needs a CUDA device).

    python benchmarks/kernel_profile.py

Every step starts with a cold L2, as in the benchmarks (conftest.flush_l2; its fill kernel, FillFunctor, shows
in the tables and is not the step's). A step much longer than the sum of its kernels is host-bound (Python,
dispatch, launches).
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_moe_mlp as tm  # noqa: E402
import test_masked_adamw as ta  # noqa: E402
from conftest import device_time, flush_l2  # noqa: E402


def timed(fn, n=20):
    """Milliseconds of GPU time per step (median, cold L2)."""
    for _ in range(3):
        fn()
    return device_time(fn, n) * 1e3


def table(fn, rows=14):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flush_l2(wait=False)
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def profile_moe_mlp() -> None:
    for dtype in ["float32", "bfloat16"]:
        for backend in ["cuda", "triton", "triton-units", "grouped_mm"]:
            try:
                fn = tm.moe_step("adapter", backend, "fwd+bwd", dtype)
                print(f"### moe_mlp adapter fwd+bwd {dtype} {backend}: {timed(fn):.3f} ms per step (CUDA events, "
                      "median, cold L2)")
                table(fn)
            except Exception as e:  # noqa: BLE001 - report and go on with the next backend
                print(f"### FAILED moe_mlp {dtype} {backend}: {e!r}"[:500])


def profile_masked_adamw() -> None:
    for size, blocks in ta.SIZES.items():
        g = torch.Generator().manual_seed(0)
        inputs = ta.flat_inputs(g, blocks)
        params = inputs[0]
        floor_bytes = params.numel() * ta.FLOOR_BYTES_PER_ENTRY
        for provider in ["cuda", "triton", "triton-fused"]:   # triton-fused: one launch (test_masked_adamw.py)
            fn = ta.flat_step(provider, inputs)
            try:
                ms = timed(fn, 50)
            except Exception as e:  # noqa: BLE001
                print(f"### FAILED masked_adamw_ {provider}: {e!r}"[:500])
                continue
            print(f"### masked_adamw_ {size} P={params.numel()} {provider}: {ms * 1e3:.1f} us per step "
                  "(CUDA events, median, cold L2), "
                  f"{floor_bytes / ms / 1e9:.2f} TB/s over the {floor_bytes / 1e6:.0f} MB it must move")
            table(fn, 6)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("kernel_profile.py needs a CUDA device")
    profile_moe_mlp()
    profile_masked_adamw()
