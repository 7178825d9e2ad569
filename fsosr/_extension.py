"""Loads the native extension ``fsosr._C`` without ever making ``import fsosr`` fail.

Importing ``_C`` runs its ``TORCH_LIBRARY`` registrations (the ``torch.ops.fsosr.*`` schemas and the CPU/CUDA
kernels). When it is missing or fails to load, the reason is kept for error messages and ``fsosr.info``.
"""
from __future__ import annotations

import torch  # noqa: F401  - the extension links against libtorch, which must be loaded first

try:
    from fsosr import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure (missing file, bad symbol, ABI) just disables the backends
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

try:
    from fsosr._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}

LOADED = _C is not None
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))
# Vector code the CPU kernels use here: avx512 | avx2 | generic (FSOSR_CPU_GENERIC=1 at import forces generic).
CPU_VECTOR_ISA = getattr(_C, "CPU_VECTOR_ISA", None)

if not LOADED:
    LOAD_ERROR = (LOAD_ERROR or "not built") + " (build it with `pip install -e . --no-build-isolation`)"
