"""Loads the native extension ``fsosr._C`` without ever making ``import fsosr`` fail.

Importing ``_C`` runs its ``TORCH_LIBRARY`` registrations (the ``torch.ops.fsosr.*`` schemas and the CPU/CUDA
kernels). When it is missing or fails to load, the reason is kept for error messages and ``fsosr.info``.
"""
from __future__ import annotations

import importlib.machinery
from pathlib import Path

import torch  # noqa: F401  - the extension links against libtorch, which must be loaded first

BUILD_COMMAND = "pip install --no-build-isolation -e ."


def extension_files(folder: str | Path | None = None) -> list[Path]:
    """The built ``_C`` extension files in the package folder (``fsosr/_C.cpython-*.so``), if any."""
    folder = Path(__file__).parent if folder is None else Path(folder)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in folder.glob("_C*") if p.name.endswith(suffixes))


def describe_load_error(exc: BaseException, files: list[Path]) -> str:
    """Why ``fsosr._C`` is not available: plainly "not built" when there is no extension file (Python then
    reports a misleading circular import), else the real import error (bad symbol, ABI, another torch)."""
    if not files:
        return f"the extension is not built (no fsosr/_C*.so next to the package): run `{BUILD_COMMAND}`"
    return f"{type(exc).__name__}: {exc} (rebuild it with `{BUILD_COMMAND}`)"


try:
    from fsosr import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure (missing file, bad symbol, ABI) just disables the backends
    _C = None
    LOAD_ERROR = describe_load_error(exc, extension_files())

try:
    from fsosr._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}

LOADED = _C is not None
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))
# Vector code the CPU kernels use here: avx512 | avx2 | generic (FSOSR_CPU_GENERIC=1 at import forces generic).
CPU_VECTOR_ISA = getattr(_C, "CPU_VECTOR_ISA", None)


def without_cuda_reason() -> str:
    """Why this build has no CUDA kernels, as setup.py recorded it (older builds did not record it)."""
    return BUILD_INFO.get("without_cuda") or "no CUDA toolkit at build time, or FSOSR_CUDA=0"
