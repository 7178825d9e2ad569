"""pytest plugin (``-p tests.ops.triton_launch_recorder``): record every Triton kernel launch the tests make under
the interpreter — the kernel, its arguments' Triton types, its constexpr values and the launch options — as JSON
lines in ``$FSOSR_TRITON_LAUNCH_LOG``, for ``triton_aot_compile.py`` to compile each one for an H100.

The interpreter runs code the compiler may reject, and it hides on-chip footprints; compiling the launches the
tests actually make (rather than hand-written signatures) keeps the check complete as kernels and launchers change.
"""
from __future__ import annotations

import inspect
import json
import os

import triton.language as tl
from triton.backends.nvidia.compiler import CUDABackend

from fsosr import testing

try:
    from triton._C.libtriton import native_specialize_impl
except ImportError:     # Triton 3.3: its launcher specialises in Python
    from triton.runtime.jit import create_specialize_impl

    def native_specialize_impl(backend, value, is_const, specialize_value, align):
        return create_specialize_impl()(value, backend.get_arg_specialization, is_const, specialize_value, align)


def specialization(value) -> tuple[str, bool]:
    """What Triton's launcher makes of a non-constexpr argument when it compiles for CUDA: its signature type
    ("constexpr" for an int equal to 1, which Triton specialises as a constant) and whether it is specialised as
    divisible by 16 (a tensor's address, an int's value). Divisibility changes the compiled kernel: it enables
    vectorised and asynchronous (cp.async, pipelined) loads, which take shared memory."""
    kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
    return kind, key == "D"


def is_constexpr(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.endswith("constexpr"))


def launch_record(fn, args: tuple, kwargs: dict) -> dict:
    parameters = inspect.signature(fn).parameters
    values = dict(zip(parameters, args))
    values.update({name: value for name, value in kwargs.items() if name in parameters})
    signature, constexprs, divisible = {}, {}, []
    for name, parameter in parameters.items():
        value = values.get(name, parameter.default)
        if is_constexpr(parameter) or value is None:  # a None argument is specialised as a constant
            constexprs[name] = value
            continue
        kind, aligned = specialization(value)
        if kind == "constexpr":
            constexprs[name] = value
        else:
            signature[name] = kind
            if aligned:
                divisible.append(name)
    options = {name: value for name, value in kwargs.items() if name not in parameters}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": divisible, "options": options}


def pytest_configure(config):
    path = os.environ.get("FSOSR_TRITON_LAUNCH_LOG")
    if not path:
        return
    seen: set[str] = set()

    def record(fn, args, kwargs, grid):
        line = json.dumps(launch_record(fn, args, kwargs), sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as log:
                log.write(line + "\n")

    testing.hook_interpreted_launches(record)
