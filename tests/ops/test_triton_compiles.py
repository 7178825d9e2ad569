"""Triton kernels compiled for an H100 (sm_90) on a machine without a GPU (tests/ops/triton_aot_compile.py in a
fresh process): they compile — the interpreter runs code the compiler may reject — and their shared memory fits
where the launchers use them, which is what sets moe_mlp's TRITON_MAX_HIDDEN."""
import json
import os
import subprocess
import sys

import pytest

from fsosr import backends
from fsosr.ops.moe_mlp import TRITON_MAX_HIDDEN

H100_SHARED_BYTES = 232448   # per block, opt-in maximum (227 KiB)


@pytest.fixture(scope="module")
def compiled():
    if backends.triton_import_error() is not None:
        pytest.skip(backends.triton_import_error())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot_compile.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_new_reduction_kernels_compile_for_sm90(compiled):
    for name in ("topk_finish smooth=False", "topk_finish smooth=True", "moe_reduce_splits *fp32",
                 "moe_reduce_splits *bf16"):
        assert 0 <= compiled[name] <= H100_SHARED_BYTES, (name, compiled[name])


def test_moe_forward_fits_up_to_the_triton_hidden_limit_and_not_beyond(compiled):
    assert TRITON_MAX_HIDDEN == 128
    for dtype in ("*fp32", "*bf16"):
        assert compiled[f"moe_forward {dtype} h_pad=128"] <= H100_SHARED_BYTES
    # The next padded width does not fit in fp32: the limit cannot simply be raised.
    assert compiled["moe_forward *fp32 h_pad=256"] > H100_SHARED_BYTES
