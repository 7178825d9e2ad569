"""The portable (non-AVX) loops of the C++ CPU kernels: FSOSR_CPU_GENERIC=1 forces them, so machines with AVX2 /
AVX-512 still test the code that runs on CPUs without them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsosr import _extension

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fsosr._C not built")


def _run(code_or_args: list[str], generic: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, FSOSR_CPU_GENERIC="1" if generic else "0")
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_switch_selects_generic_code():
    probe = ["-c", "from fsosr import _extension; print(_extension.CPU_VECTOR_ISA)"]
    assert _run(probe, generic=True).stdout.strip() == "generic"
    assert _run(probe, generic=False).stdout.strip() in {"avx512", "avx2", "generic"}


def test_generic_loops_match_the_fp64_reference():
    # The cpu tests of both ops with vectorised epilogues (moe_mlp's dropout/activation loops, masked AdamW's
    # update loop), rerun in a process where only the portable loops are used.
    selection = ("cpu and (native_matches_reference or native_activations or native_low_precision "
                 "or cpu_paths_match or matches_seed or edge_cases or deterministic)")
    result = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops/test_moe_mlp.py",
                   "tests/ops/test_masked_adamw.py", "-k", selection], generic=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
