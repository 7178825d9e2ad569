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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    path = os.environ.get("FSOSR_FAILURE_LOG")
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
