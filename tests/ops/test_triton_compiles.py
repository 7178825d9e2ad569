"""Triton kernels compiled for an H100 (sm_90) on a machine without a GPU: they compile (the interpreter runs code
the compiler may reject) and their shared memory fits where the launchers use them.

Two fresh processes (``@triton.jit`` becomes the interpreter when TRITON_INTERPRET=1 is set at import, which this
session does): the Triton op tests run under the interpreter with tests/ops/triton_launch_recorder.py logging
every distinct launch, then tests/ops/triton_aot_compile.py compiles each logged launch, and a few hand-made
probes that pin down moe_mlp's TRITON_MAX_HIDDEN. About 4 minutes on 2 cores without Triton's cache. Where a GPU
is present the kernels are compiled for real by the op tests, so this stand-in is skipped there."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fsosr import backends
from fsosr.ops.moe_mlp import TRITON_MAX_HIDDEN

H100_SHARED_BYTES = 232448   # per block, opt-in maximum (227 KiB)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KERNEL_MODULES = ["fsosr._triton.masked_adamw", "fsosr._triton.moe_mlp", "fsosr._triton.moe_mlp_dense",
                  "fsosr._triton.moe_mlp_units", "fsosr._triton.sparse_adapter", "fsosr._triton.topk_route"]

if os.environ.get("FSOSR_TRITON_LAUNCH_LOG"):
    pytest.skip("the recording run (started by this module) must not start itself", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if backends.triton_unusable() is not None:
        pytest.skip(backends.triton_unusable())
    if torch.cuda.is_available():
        pytest.skip("with a GPU the op tests compile every launch for real")
    log = tmp_path_factory.mktemp("triton_launches") / "launches.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1", FSOSR_TRITON_LAUNCH_LOG=str(log))
    record = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/ops", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
         "-p", "tests.ops.triton_launch_recorder"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert record.returncode == 0, record.stdout[-3000:] + record.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FSOSR_TRITON_LAUNCH_LOG")}
    script = os.path.join(os.path.dirname(__file__), "triton_aot_compile.py")
    out = subprocess.run([sys.executable, script, str(log)], env=env, capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def launch_name(launch: dict) -> str:
    pointers = sorted({t for t in launch["signature"].values() if t.startswith("*")})
    return f"{launch['kernel']} {launch['constexprs']} {pointers}"


def test_every_launch_the_tests_make_compiles_and_fits_an_h100(compiled):
    launches = compiled["launches"]
    assert len(launches) >= 100, len(launches)   # 487 distinct launches when this was written
    errors = [f"{launch_name(x)}: {x['error']}" for x in launches if "error" in x]
    assert not errors, "\n".join(errors[:5])
    too_big = [f"{launch_name(x)}: {x['shared']} B" for x in launches if x["shared"] > H100_SHARED_BYTES]
    assert not too_big, "\n".join(too_big[:5])


def test_every_kernel_is_launched_by_the_tests(compiled):
    # A kernel no test launches is neither checked under the interpreter nor compiled here.
    from triton.runtime.jit import KernelInterface  # noqa: PLC0415
    kernels = {name for module in KERNEL_MODULES for name, obj in vars(importlib.import_module(module)).items()
               if isinstance(obj, KernelInterface) and name.endswith("_kernel")}
    assert len(kernels) >= 18, kernels
    assert kernels <= {x["kernel"] for x in compiled["launches"]}, kernels - {x["kernel"] for x in compiled["launches"]}


def test_moe_forward_fits_up_to_the_triton_hidden_limit_and_not_beyond(compiled):
    assert TRITON_MAX_HIDDEN == 128
    for dtype in ("*fp32", "*bf16"):
        assert compiled["probes"][f"moe_forward {dtype} h_pad=128"] <= H100_SHARED_BYTES
    # The next padded width does not fit in fp32: the limit cannot simply be raised.
    assert compiled["probes"]["moe_forward *fp32 h_pad=256"] > H100_SHARED_BYTES


def test_triton_launchers_host_arithmetic_matches_triton():
    """kernels/_launch.py stands in for triton.cdiv / triton.next_power_of_2 on the host (they cost 1.7 µs a call
    as ConstexprFunctions); the launchers pass n >= 1 to next_power_of_2."""
    import triton

    from fsosr._triton._launch import cdiv, next_power_of_2
    for n in [*range(1, 2100), 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in [0, 1, 2, 63, 64, 65, 197 * 64, 2**31 + 5]:
        for b in [1, 2, 3, 16, 64, 1024]:
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
