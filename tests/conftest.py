"""Shared pytest setup.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
Triton is first imported. ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present.

``FSOSR_FAILURE_LOG=path``: append every failure (with its traceback) and every test slower than 10 s to that
file as it happens, so a run cut off by a time limit (a GPU lease) still leaves the details; pytest prints them
only at the end.
"""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fsosr import testing  # noqa: E402


def pytest_configure(config):
    if testing.device_under_test().type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("FSOSR_TEST_DEVICE=cuda but no CUDA device is visible")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _round_float_arguments_as_compiled()


def pytest_report_header(config):
    """Says up front when the Triton tests cannot run here for a reason outside the project (each of them then
    skips or fails with that reason)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    from fsosr import backends  # noqa: PLC0415

    problem = backends.triton_interpreter_problem()
    return f"WARNING: the Triton tests cannot run here: {problem}" if problem else None


def _round_float_arguments_as_compiled():
    """A compiled Triton launch passes a Python float argument as fp32; the interpreter keeps the double. Round
    them here too, so that a kernel which needs more than fp32 of an argument (1 - p for dropout p near 1, 1 - beta)
    fails under the interpreter as it would on a GPU. (GridExecutor runs every interpreted launch in Triton 3.3 to
    3.8, and knows the kernel's parameter names and which of them are constexpr.)"""
    import numpy as np  # noqa: PLC0415
    try:
        from triton.runtime.interpreter import GridExecutor  # noqa: PLC0415
    except ImportError:         # no Triton: its tests skip themselves
        return

    original_call = GridExecutor.__call__

    def call(self, *args, **kwargs):
        runtime = [name not in self.constexprs for name in self.arg_names]
        args = tuple(float(np.float32(a)) if type(a) is float and i < len(runtime) and runtime[i] else a
                     for i, a in enumerate(args))
        kwargs = {name: float(np.float32(a)) if type(a) is float and name in self.arg_names
                  and name not in self.constexprs else a for name, a in kwargs.items()}
        return original_call(self, *args, **kwargs)

    GridExecutor.__call__ = call


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    path = os.environ.get("FSOSR_FAILURE_LOG")
    if os.environ.get("PYTEST_XDIST_WORKER"):   # under xdist the controller logs every worker's reports once
        return
    if not path or not (report.failed or (report.when == "call" and report.duration > 10)):
        return
    with open(path, "a") as f:
        tag = "FAILED" if report.failed else "SLOW"
        f.write(f"==== {tag} {report.nodeid} [{report.when}] {report.duration:.1f} s at {time.strftime('%X')}\n")
        if report.failed:
            f.write(report.longreprtext[-4000:] + "\n")


@pytest.fixture
def device() -> torch.device:
    """The device op tests run on (FSOSR_TEST_DEVICE, default cpu)."""
    return testing.device_under_test()


@pytest.fixture
def cuda_device() -> torch.device:
    return torch.device("cuda")
