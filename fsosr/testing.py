"""Test harness shared by every op's tests: compare any backend with the fp64 reference, outputs and gradients.

Usage pattern (see tests/ops/test_topk_route.py)::

    from fsosr import testing
    for backend in testing.backends_under_test(device):
        testing.compare_with_reference(my_op_fn, inputs, backend=backend, grad_outputs=[1, 5])

``fn(*inputs, backend=name)`` must return a tuple of tensors. The reference runs on fp64 CPU copies of the
floating inputs (integer inputs are copied as they are), so it is the exact oracle for every dtype and device.
Integer outputs must match exactly; floating outputs within the tolerance of the backend's input dtype.

Environment:
    FSOSR_TEST_DEVICE   ``cpu`` (default) or ``cuda``: the device op tests run on.
    TRITON_INTERPRET=1  lets the triton backend run on CPU tensors (tests/conftest.py sets it without a GPU).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from fsosr import backends

# (atol, rtol) for outputs computed from inputs of each dtype (accumulation in fp32, fp64 for fp64).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output of the captured call): ``fn`` run ``warmup`` times on a side stream first (Triton compiles,
    the allocator and autograd settle outside the capture, as capture requires), then captured once. Replaying
    the graph reruns fn's kernels on the same buffers, so the captured output is updated in place."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def device_under_test() -> torch.device:
    """The device op tests run on: ``FSOSR_TEST_DEVICE`` (default cpu)."""
    return torch.device(os.environ.get("FSOSR_TEST_DEVICE", "cpu"))


def backends_under_test(device: torch.device, implemented: Sequence[str] = backends.BACKENDS) -> list[str]:
    """Native backends (not ``reference``) that can run on ``device`` here."""
    return [b for b in implemented if b != "reference" and backends.why_unavailable(b, device) is None]


def to_reference_input(x):
    """fp64 CPU copy of a floating tensor (keeping requires_grad), CPU copy of other tensors, others as they are."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)
    return x.detach().cpu()


def _float_dtype(inputs) -> torch.dtype:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.dtype
    return torch.float32


def assert_outputs_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], *, atol: float,
                         rtol: float, names: Sequence[str] | None = None) -> None:
    """Integer tensors equal, floating tensors close (NaN where the other has NaN), shapes equal."""
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        name = names[i] if names else f"output {i}"
        if a is None or e is None:
            assert a is None and e is None, f"{name}: one side is None"
            continue
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not e.is_floating_point():
            assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
            torch.testing.assert_close(a.cpu(), e.cpu(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(a.detach().cpu().double(), e.detach().cpu().double(), atol=atol, rtol=rtol,
                                       equal_nan=True, msg=lambda m: f"{name}: {m}")


def run_with_grads(fn: Callable, inputs: Sequence, backend: str, grad_outputs: Sequence[int],
                   weights: Sequence[torch.Tensor] | None):
    """Outputs of ``fn`` and the gradients of sum_i <weights[i], outputs[grad_outputs[i]]> w.r.t. the inputs that
    require grad (None where an input does not)."""
    outputs = fn(*inputs, backend=backend)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not wrt or not grad_outputs:
        return outputs, []
    loss = sum((outputs[i].double() * w.to(outputs[i].device)).sum() for i, w in zip(grad_outputs, weights))
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return outputs, list(grads)


def compare_with_reference(fn: Callable, inputs: Sequence, *, backend: str, grad_outputs: Sequence[int] = (),
                           names: Sequence[str] | None = None, atol: float | None = None,
                           rtol: float | None = None, seed: int = 0):
    """Run ``backend`` on ``inputs`` and ``reference`` on their fp64 CPU copies; assert outputs and input
    gradients agree. ``grad_outputs``: indices of differentiable outputs to backpropagate random weights through.
    Returns (backend outputs, backend grads)."""
    dtype = _float_dtype(inputs)
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    ref_inputs = [to_reference_input(x) for x in inputs]
    ref_outputs = fn(*ref_inputs, backend="reference")
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(ref_outputs[i].shape, generator=generator, dtype=torch.float64) for i in grad_outputs]
    outputs, grads = run_with_grads(fn, inputs, backend, grad_outputs, weights)
    ref_outputs, ref_grads = run_with_grads(fn, ref_inputs, "reference", grad_outputs, weights)
    assert_outputs_close(outputs, ref_outputs, atol=atol, rtol=rtol, names=names)
    # Gradients are stored in the input dtype: allow its rounding on top of the compute tolerance, relative to
    # the gradient's scale (a sum over many terms).
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (rg is None), f"gradient {i}: present on one side only"
        if g is not None:
            scale = max(1.0, float(rg.abs().max())) if rg.numel() else 1.0
            torch.testing.assert_close(g.cpu().double(), rg, atol=atol * scale, rtol=rtol, equal_nan=True,
                                       msg=lambda m, i=i: f"gradient of input {i}: {m}")
    return outputs, grads


def assert_bitwise_deterministic(fn: Callable, inputs: Sequence, *, backend: str,
                                 grad_outputs: Sequence[int] = ()) -> None:
    """Two runs give bitwise-equal outputs and gradients."""
    generator = torch.Generator().manual_seed(1)
    probe = fn(*inputs, backend=backend)
    weights = [torch.randn(probe[i].shape, generator=generator, dtype=torch.float64) for i in grad_outputs]
    first = run_with_grads(fn, inputs, backend, grad_outputs, weights)
    second = run_with_grads(fn, inputs, backend, grad_outputs, weights)
    for a, b in zip(list(first[0]) + first[1], list(second[0]) + second[1]):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), "runs differ"


def random_experts(e: int, d: int, h: int, d_out: int, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Stacked expert weights (w1 [E, d, h], b1 [E, h], w2 [E, h, d_out], b2 [E, d_out]) for moe_mlp tests:
    N(0, 0.3²) leaf tensors that require grad, a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*shape, generator=g, dtype=dtype) * 0.3).requires_grad_()
                 for shape in ((e, d, h), (e, h), (e, h, d_out), (e, d_out)))


def hook_interpreted_launches(on_launch: Callable, *, monkeypatch=None) -> None:
    """Call ``on_launch(fn, args, kwargs, grid)`` before every kernel launch that Triton's interpreter
    (TRITON_INTERPRET=1) runs from now on, then run the launch. ``fn``: the
    kernel's Python function; ``args``, ``kwargs``: what the launch got (kwargs still hold the launch options,
    num_warps and the like, as ``JITFunction.run`` gets them); ``grid``: the grid as a tuple (a callable one called
    with the kernel's bound arguments, as the compiled launcher calls it). With ``monkeypatch`` the hook is undone
    at the end of the test; without, it stays.

    The hook is on GridExecutor.__call__ because every interpreted launch runs through it in Triton 3.3 to 3.8;
    ``InterpretedFunction.run`` is a class attribute only from 3.4 (3.3 sets it on each kernel, and its
    ``kernel[grid]`` does not call it)."""
    import inspect  # noqa: PLC0415
    from triton.runtime.interpreter import GridExecutor, InterpretedFunction  # noqa: PLC0415 - imports Triton

    original_call = GridExecutor.__call__

    def call(self, *args, **kwargs):
        # Triton 3.3's InterpretedFunction.run passes its grid and warmup keywords on; a warm-up launches nothing.
        reserved = {"grid", "warmup"} - set(self.arg_names)
        if kwargs.get("warmup", False) and "warmup" in reserved:
            return original_call(self, *args, **kwargs)
        kwargs = {name: value for name, value in kwargs.items() if name not in reserved}
        # GridExecutor holds the interpreter's rewrite of the kernel (with string annotations in Triton 3.6, 3.8).
        fn = next((kernel for kernel, rewritten in InterpretedFunction.rewritten_fn.items() if rewritten is self.fn),
                  self.fn)
        grid = self.grid
        if callable(grid):
            bound = inspect.signature(fn).bind(*args, **{n: v for n, v in kwargs.items() if n in self.arg_names})
            bound.apply_defaults()
            grid = grid(bound.arguments)
        on_launch(fn, args, kwargs, tuple(grid))
        return original_call(self, *args, **kwargs)

    if monkeypatch is None:
        GridExecutor.__call__ = call
    else:
        monkeypatch.setattr(GridExecutor, "__call__", call)
