"""Which backend runs an op: the ``backend=`` argument, else ``FSOSR_BACKEND``, else automatic.

| backend     | runs on                                              | what it is                          |
|-------------|------------------------------------------------------|-------------------------------------|
| reference   | any tensor                                           | plain PyTorch, the test oracle      |
| cpu         | CPU tensors, when ``fsosr._C`` is built              | C++ (ATen, at::parallel_for)        |
| cuda        | CUDA tensors, when ``fsosr._C`` has CUDA kernels     | CUDA C++                            |
| triton      | CUDA tensors (CPU tensors under TRITON_INTERPRET=1)  | Triton                              |

Automatic choice: CUDA tensors -> ``triton`` if usable, else ``cuda``, else ``reference`` — except for the ops in
:data:`CUDA_FIRST`, whose ``cuda`` kernels measured faster; CPU tensors -> ``cpu``
if built, else ``reference``. A backend that is asked for by name and cannot run raises
:class:`BackendUnavailable` saying why; there is never a silent fallback from an explicit choice.
"""
from __future__ import annotations

import os

import torch

from fsosr import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")

_triton_import_error: list[str | None] = []  # filled on first use: [None] when importable, else [reason]
_too_old: dict[str, str | None] = {}                               # Triton version -> reason or None
_interpreter_problems: dict[tuple[str, str], str | None] = {}      # (Triton, NumPy) versions -> reason or None


_NO_GPU = "no CUDA device is visible (torch.cuda.is_available() is False)"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op here (the message says why)."""


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> str | None:
    """None when Triton can be imported, else the reason."""
    if not _triton_import_error:
        try:
            import triton  # noqa: F401, PLC0415

            _triton_import_error.append(None)
        except Exception as exc:  # noqa: BLE001
            _triton_import_error.append(f"triton cannot be imported ({type(exc).__name__}: {exc})")
    return _triton_import_error[0]


def triton_unusable() -> str | None:
    """None when Triton can be imported and is new enough for our kernels, else the reason (tests skip on it)."""
    return triton_import_error() or triton_too_old()


def triton_too_old() -> str | None:
    """None when the installed Triton is one our kernels run with (3.3 or newer), else the reason. Triton 3.2
    (torch 2.6's) aborts the process in its interpreter on our topk_route kernel, and no GPU run used it."""
    import triton  # noqa: PLC0415

    version = triton.__version__
    if version not in _too_old:      # once per version: ops ask on every call
        _too_old[version] = (f"Triton {version} is older than 3.3, the oldest fsosr's Triton kernels run with"
                             if _major_minor(version) < (3, 3) else None)
    return _too_old[version]


def triton_interpreter_problem() -> str | None:
    """None when Triton's interpreter can run our kernels with the NumPy installed here, else the reason.

    Triton before 3.7 turns a run-time scalar into a Python int (``range(0, k)`` over a kernel argument) with
    ``int()`` of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"; triton-lang/triton#9171). Checked: Triton 3.3.1 and 3.6.0 fail with NumPy 2.4.6, 3.7.0 and
    3.8.0 squeeze first. Compiled kernels on a GPU are not affected.
    """
    if triton_import_error():
        return None
    import numpy  # noqa: PLC0415
    import triton  # noqa: PLC0415

    versions = (triton.__version__, numpy.__version__)
    if versions not in _interpreter_problems:   # once per pair of versions: ops ask on every call
        problem = None
        if _major_minor(versions[0]) < (3, 7) and _major_minor(versions[1]) >= (2, 4):
            problem = (f"Triton {versions[0]}'s interpreter cannot run with NumPy {versions[1]} (it converts "
                       "one-element arrays to ints, which NumPy >= 2.4 refuses; triton-lang/triton#9171): install "
                       "'numpy<2.4' or Triton >= 3.7")
        _interpreter_problems[versions] = problem
    return _interpreter_problems[versions]


def _major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0', '2.4rc1' or '3.8.0+git1a2b'. Plain string and int
    work, no regex: ops may first ask while torch.compile traces them, and a regex there makes dynamo guard on the
    re module's cache, which torch 2.7 then fails."""
    def leading_int(text: str) -> int:
        digits = ""
        for c in text:
            if not c.isdigit():
                break
            digits += c
        return int(digits or 0)

    parts = version.split(".") + ["0"]
    return leading_int(parts[0]), leading_int(parts[1])


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` here, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got tensors on {device}"
        return None if _extension.LOADED else f"fsosr._C is not available: {_extension.LOAD_ERROR}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got tensors on {device}"
        if not _extension.LOADED:
            return f"fsosr._C is not available: {_extension.LOAD_ERROR}"
        if not _extension.WITH_CUDA:
            return f"fsosr._C was built without CUDA kernels ({_extension.without_cuda_reason()})"
        return None if torch.cuda.is_available() else _NO_GPU
    if backend == "triton":
        error = triton_unusable()
        if error:
            return error
        if device.type == "cuda":
            return None if torch.cuda.is_available() else _NO_GPU
        if device.type == "cpu" and triton_interpreting():
            return triton_interpreter_problem()
        if device.type == "cpu":
            return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# Ops whose automatic choice on CUDA tensors is ``cuda`` before ``triton``, because the cuda kernel was faster per
# eager call in every row of the README's H100 run (benchmarks/results/2026-11-22-h100-c.json): topk_route forward
# 131-309 vs 706-1210 µs, forward+backward 0.88-1.34 vs 2.11-2.27 ms; masked_adamw_ 68 vs 286 µs (ViT-B/16) and
# 331 vs 376 µs (16x the blocks), where the Triton wrapper's host time dominates (replayed from a CUDA graph the
# Triton step is the faster one at 16x the blocks, 240 vs 282 µs). moe_mlp stays Triton-first: its cuda kernels are
# SIMT (2.1 ms of device time per bf16 adapter fwd+bwd against 0.49 ms for triton), and in a whole MoE-Adapters4CL
# training step on an H100 (same file), where the wrappers' host time overlaps the backbone's GPU work, triton
# experts took 192.6 ms against 217.3 ms with cuda. Experts wider than the Triton kernels hold on chip go to cuda
# through moe_mlp's shape limits. Re-measure when either side changes.
CUDA_FIRST = frozenset({"topk_route", "masked_adamw_"})


def resolve(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...] = BACKENDS,
            unsupported: dict[str, str] | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device``; raises if an explicit choice cannot run.

    ``unsupported`` maps a backend to the reason it cannot run this call's shape (e.g. a kernel's on-chip limit):
    the automatic choice passes over it, an explicit choice of it raises :class:`BackendUnavailable`.
    """
    unsupported = unsupported or {}
    requested = backend if backend is not None else (os.environ.get("FSOSR_BACKEND") or None)
    if requested is not None:
        if requested not in BACKENDS:
            source = "backend" if backend is not None else "FSOSR_BACKEND"
            raise ValueError(f"{op}: unknown {source} {requested!r}; choose one of {', '.join(BACKENDS)}")
        if requested not in implemented:
            raise BackendUnavailable(f"{op}: there is no {requested!r} implementation (have: {', '.join(implemented)})")
        reason = why_unavailable(requested, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot run here: {reason}")
        if requested in unsupported:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot run this shape: {unsupported[requested]}")
        return requested
    if device.type == "cuda":
        candidates = ("cuda", "triton", "reference") if op in CUDA_FIRST else ("triton", "cuda", "reference")
    elif device.type == "cpu":
        candidates = ("cpu", "reference")
    else:
        candidates = ("reference",)
    for candidate in candidates:
        if candidate in implemented and candidate not in unsupported and why_unavailable(candidate, device) is None:
            return candidate
    return "reference"


def usable_backends(device: torch.device) -> dict[str, str | None]:
    """Every backend with None (usable on ``device``) or the reason it is not."""
    return {name: why_unavailable(name, device) for name in BACKENDS}
