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

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

TENSOR_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.bool: "i1"}


def triton_type(value) -> str:
    """The signature entry Triton's launcher would derive for a non-constexpr argument."""
    if isinstance(value, torch.Tensor):
        return "*" + TENSOR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def is_constexpr(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.endswith("constexpr"))


def launch_record(fn, args: tuple, kwargs: dict) -> dict:
    parameters = inspect.signature(fn).parameters
    values = dict(zip(parameters, args))
    values.update({name: value for name, value in kwargs.items() if name in parameters})
    signature, constexprs = {}, {}
    for name, parameter in parameters.items():
        value = values.get(name, parameter.default)
        if is_constexpr(parameter) or value is None:  # a None argument is specialised as a constant
            constexprs[name] = value
        else:
            signature[name] = triton_type(value)
    options = {name: value for name, value in kwargs.items() if name not in parameters}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def pytest_configure(config):
    path = os.environ.get("FSOSR_TRITON_LAUNCH_LOG")
    if not path:
        return
    seen: set[str] = set()
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            line = json.dumps(launch_record(self.fn, args, kwargs), sort_keys=True)
            if line not in seen:
                seen.add(line)
                with open(path, "a") as log:
                    log.write(line + "\n")
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
