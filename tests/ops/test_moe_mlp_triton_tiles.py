"""The triton backend's two tilings of moe_mlp: by expert (kernels/moe_mlp.py, per-slot buffer and a combine pass
for k >= 2) and by unit (kernels/moe_mlp_units.py: the k experts of a unit as one MLP whose hidden row is their
concatenation; no per-slot buffer). FSOSR_MOE_MLP_TRITON_TILES picks one (kernels.moe_mlp.unit_tiles).
Under the interpreter on CPU tensors, or compiled with FSOSR_TEST_DEVICE=cuda."""
from __future__ import annotations

import re

import pytest
import torch

from fsosr import testing
from tests.ops.test_moe_mlp import DEVICE, NATIVE, native_fn

pytestmark = pytest.mark.skipif("triton" not in NATIVE, reason="triton backend not usable here")


@pytest.fixture
def kernels():
    from fsosr._triton import moe_mlp  # noqa: PLC0415 - imports Triton
    return moe_mlp


def make_inputs(e, d, h, d_out, g, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n * g, d, generator=gen, dtype=torch.float64)
    logits = torch.randn(n, e, generator=gen, dtype=torch.float64)
    weights = [torch.randn(*s, generator=gen, dtype=torch.float64) / s[-2 if len(s) == 3 else -1] ** 0.5
               for s in [(e, d, h), (e, h), (e, h, d_out), (e, d_out)]]
    # Gradients reach the logits through the gates, so grad_gates is compared too.
    return ([x.to(DEVICE, dtype).requires_grad_(), logits.requires_grad_()]
            + [w.to(DEVICE, dtype).requires_grad_() for w in weights])


def count_unit_launches(monkeypatch, kernels):
    """Wrap the unit-tiled launchers; returns the list of launcher names called."""
    calls = []
    for name in ("forward", "backward_rows"):
        original = getattr(kernels.moe_mlp_units, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels.moe_mlp_units, name, wrapped)
    return calls


UNIT_CASES = [  # (E, k, d, h, d_out, G, N, activation, dropout): what each exercises
    (22, 2, 768, 64, 768, 197, 2, "relu", 0.1),     # MoE-Adapters4CL: k*h = 128 (the widest), 4 tiles, last 5 rows
    (7, 2, 97, 47, 50, 33, 3, "gelu", 0.0),         # odd d, d_out != d, k*h = 94 padded to 128, G just over 32
    (4, 4, 40, 16, 24, 16, 2, "quick_gelu", 0.2),   # k = E, 16-row tiles
    (5, 1, 24, 20, 24, 65, 2, "identity", 0.1),     # k = 1 (forced), second tile holds one row
    (3, 2, 64, 16, 32, 17, 1, "relu", 0.3),         # one unit, 32-row tile
]


def check_unit_tiles(monkeypatch, kernels, inputs, g, k, activation, dropout, tol, deterministic=False):
    """With unit tiles forced: y and every gradient match the fp64 reference, and the unit launchers ran."""
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", "units")
    calls = count_unit_launches(monkeypatch, kernels)
    fn = native_fn(g, activation, dropout)
    fn.k = k
    testing.compare_with_reference(fn, inputs, backend="triton", grad_outputs=[0], names=["y"], atol=tol, rtol=tol)
    assert calls == ["forward", "backward_rows"]
    if deterministic:
        testing.assert_bitwise_deterministic(fn, inputs, backend="triton", grad_outputs=[0])


@pytest.mark.parametrize("e,k,d,h,d_out,g,n,activation,dropout", UNIT_CASES)
def test_unit_tiles_match_reference(monkeypatch, kernels, e, k, d, h, d_out, g, n, activation, dropout):
    inputs = make_inputs(e, d, h, d_out, g, n, torch.float32, seed=e * 10 + g)
    check_unit_tiles(monkeypatch, kernels, inputs, g, k, activation, dropout, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unit_tiles_low_precision(monkeypatch, kernels, dtype):
    inputs = make_inputs(22, 64, 64, 64, 40, 2, dtype, seed=9)
    check_unit_tiles(monkeypatch, kernels, inputs, 40, 2, "relu", 0.1, tol=2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_unit_tiles_are_deterministic_and_round_differently_from_expert_tiles(monkeypatch, kernels):
    fn = native_fn(37, "gelu", 0.1)
    fn.k = 2
    inputs = make_inputs(6, 48, 32, 40, 37, 3, torch.float32, seed=3)
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", "units")
    testing.assert_bitwise_deterministic(fn, inputs, backend="triton", grad_outputs=[0])
    probe = [torch.randn(3 * 37, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    by_unit = testing.run_with_grads(fn, inputs, "triton", [0], probe)
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", "experts")
    by_expert = testing.run_with_grads(fn, inputs, "triton", [0], probe)
    unit_values = list(by_unit[0]) + list(by_unit[1])
    expert_values = list(by_expert[0]) + list(by_expert[1])
    # Different GEMM shapes and summation orders: not the same bits (so the two runs did take different kernels),
    # the same function.
    assert not all(torch.equal(a, b) for a, b in zip(unit_values, expert_values))
    for a, b in zip(unit_values, expert_values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiling,k,g,h,per_expert,expected", [
    ("units", 2, 197, 64, False, True), ("units", 1, 1, 16, False, True),
    ("units", 3, 197, 64, False, False),          # k*h = 192 > 128: does not fit, expert tiles
    ("units", 2, 197, 64, True, False),           # per-expert inputs (FSMoE): units do not share their input rows
    ("units", 2, 197, 0, False, False),           # no hidden columns
    ("experts", 2, 197, 64, False, False),
    ("auto", 2, 197, 64, False, True), ("auto", 2, 77, 64, False, True), ("auto", 2, 31, 64, False, False),
    ("auto", 1, 197, 64, False, False),           # k = 1 has no per-slot buffer to save
])
def test_tiling_rule(monkeypatch, kernels, tiling, k, g, h, per_expert, expected):
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", tiling)
    assert kernels.unit_tiles(k, g, h, per_expert) is expected


def test_default_tiling_and_a_bad_setting(monkeypatch, kernels):
    monkeypatch.delenv("FSOSR_MOE_MLP_TRITON_TILES", raising=False)
    # Expert tiles until unit tiles have run on a GPU (kernels/moe_mlp.py, DEFAULT_TILING).
    assert kernels.DEFAULT_TILING == "experts" and kernels.unit_tiles(2, 197, 64, False) is False
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", "by_unit")
    with pytest.raises(ValueError, match="FSOSR_MOE_MLP_TRITON_TILES must be experts, units or auto"):
        kernels.unit_tiles(2, 197, 64, False)


def test_auto_tiling_runs_units_for_per_sample_routing_only(monkeypatch, kernels):
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", "auto")
    calls = count_unit_launches(monkeypatch, kernels)
    for g, n, expected in [(40, 2, ["forward", "backward_rows"]), (1, 40, [])]:
        calls.clear()
        fn = native_fn(g, "relu", 0.0)
        fn.k = 2
        inputs = make_inputs(5, 16, 16, 16, g, n, torch.float32, seed=g)
        testing.compare_with_reference(fn, inputs, backend="triton", grad_outputs=[0], names=["y"], atol=1e-4,
                                       rtol=1e-4)
        assert calls == expected, (g, calls)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_unit_tiles_match_reference_and_are_deterministic(monkeypatch, kernels, dtype):
    inputs = make_inputs(22, 768, 64, 768, 197, 16, dtype, seed=11)
    inputs = [t.detach().to("cuda" if i != 1 else "cpu").requires_grad_() for i, t in enumerate(inputs)]
    check_unit_tiles(monkeypatch, kernels, inputs, 197, 2, "relu", 0.1,
                     tol=3e-2 if dtype == torch.bfloat16 else 1e-4, deterministic=True)


def record_gemm_launches(monkeypatch, kernels):
    """[(kernel name, launch kwargs and its grid)] of every moe_mlp GEMM kernel launch from now on (the elementwise
    slot-sum and split-reduce kernels are left out)."""
    from triton.runtime.jit import JITFunction  # noqa: PLC0415 - imports Triton
    gemm_kernels = {"_forward_kernel", "_backward_rows_kernel", "_backward_weights_kernel", "_unit_forward_kernel",
                    "_unit_backward_rows_kernel"}
    launches = []

    def record(fn, args, kwargs, grid):
        if fn.__name__ in gemm_kernels:
            launches.append((fn.__name__, dict(kwargs, grid=grid)))

    if not isinstance(kernels._forward_kernel, JITFunction):    # an InterpretedFunction under the interpreter
        testing.hook_interpreted_launches(record, monkeypatch=monkeypatch)
        return launches
    original_run = JITFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            record(self.fn, args, kwargs, tuple(grid))
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(JITFunction, "run", recording_run)
    return launches


@pytest.mark.parametrize("tiling", ["experts", "units"])
def test_tuned_launch_options_reach_the_launches(monkeypatch, kernels, tiling):
    """FSOSR_MOE_MLP_TRITON_TUNE (a knob for GPU tuning sessions) sets the launch options it names, and only
    those; unset, each kernel keeps its rule (4 warps up to a 64-wide accumulator, Triton's default stages,
    WEIGHT_ROWS rows per weight-pass step, a 64-wide output block)."""
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", tiling)
    launches = record_gemm_launches(monkeypatch, kernels)
    fn = native_fn(33, "relu", 0.0)
    fn.k = 2
    inputs = make_inputs(4, 80, 16, 72, 33, 2, torch.float32, seed=4)   # h 16 (units: k*h 32): 4 warps by rule

    def run(tune):
        monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TUNE", tune)
        launches.clear()
        (y,) = fn(*inputs, backend="triton")
        y.backward(torch.ones_like(y))
        return {name: kwargs for name, kwargs in launches}

    default = run("")
    rows_kernels = ({"_unit_forward_kernel", "_unit_backward_rows_kernel"} if tiling == "units"
                    else {"_forward_kernel", "_backward_rows_kernel"})
    assert set(default) == rows_kernels | {"_backward_weights_kernel"}
    assert all(kw["num_warps"] == 4 and "num_stages" not in kw for kw in default.values())
    weights = default["_backward_weights_kernel"]
    assert (weights["BLOCK_M"], weights["BLOCK_D"], weights["grid"]) == (kernels.WEIGHT_ROWS, 64, (4, 1, 4))
    tuned = run("warps=2, stages=2,weight_warps=8,weight_stages=4,weight_rows=32,weight_block_d=16")
    assert set(tuned) == set(default)
    assert all((tuned[n]["num_warps"], tuned[n]["num_stages"]) == (2, 2) for n in rows_kernels)
    weights = tuned["_backward_weights_kernel"]
    assert (weights["num_warps"], weights["num_stages"], weights["BLOCK_M"], weights["BLOCK_D"]) == (8, 4, 32, 16)
    assert weights["grid"] == (4, 1, 5 + 5)                 # d 80, d_out 72 in 16-wide blocks
    only_weights = run("weight_rows=64,weight_splits=3")
    assert only_weights["_backward_weights_kernel"]["BLOCK_M"] == 64
    assert only_weights["_backward_weights_kernel"]["grid"] == (4, 3, 4)
    assert all(only_weights[n]["num_warps"] == 4 and "num_stages" not in only_weights[n] for n in rows_kernels)


@pytest.mark.parametrize("tune,message", [("warps=6", "warps must be one of (2, 4, 8, 16), got '6'"),
                                          ("weight_rows=x", "weight_rows must be one of"),
                                          ("block_m=64", "unknown option 'block_m'; options: warps, stages")])
def test_bad_tuning_is_refused(monkeypatch, kernels, tune, message):
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TUNE", tune)
    fn = native_fn(5, "relu", 0.0)
    fn.k = 1
    with pytest.raises(ValueError, match=re.escape("FSOSR_MOE_MLP_TRITON_TUNE: " + message)):
        fn(*make_inputs(2, 16, 16, 16, 5, 2, torch.float32, seed=1), backend="triton")


@pytest.mark.parametrize("tiling", ["experts", "units"])
@pytest.mark.parametrize("tune", ["weight_rows=16,weight_block_d=16", "weight_rows=32,weight_block_d=32",
                                  "weight_rows=256,weight_block_d=16", "weight_rows=64,weight_block_d=128",
                                  "weight_rows=16,weight_splits=3", "weight_splits=16"])
def test_tuned_weight_tiles_match_reference(monkeypatch, kernels, tiling, tune):
    """The weight pass at the tile sizes a tuning session may pick: several output blocks with partial last ones
    (d 40, d_out 56 at 16 / 32), one block covering both (128), row steps longer than an expert's rows (256), rows
    in chunks (partials in the workspace, then the ordered sum; 16 chunks: some empty), against the fp64
    reference. (Sizes whose sm_90 build fits an H100's shared memory: the compile check builds
    these launches too.)"""
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TILES", tiling)
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TUNE", tune)
    fn = native_fn(37, "gelu", 0.1)
    fn.k = 2
    inputs = make_inputs(5, 40, 24, 56, 37, 3, torch.float32, seed=11)
    testing.compare_with_reference(fn, inputs, backend="triton", grad_outputs=[0], names=["y"], atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("rows", [16, 128])
def test_tuned_unit_rows_match_reference(monkeypatch, kernels, rows):
    """Unit tiles of 16 or 128 rows (FSOSR_MOE_MLP_TRITON_TUNE unit_rows; 64 by default): G 150 is 10 tiles of 16
    (the last 6 rows) or 2 of 128 (the last 22), k*h 94 padded to 128."""
    monkeypatch.setenv("FSOSR_MOE_MLP_TRITON_TUNE", f"unit_rows={rows}")
    launches = record_gemm_launches(monkeypatch, kernels)
    inputs = make_inputs(7, 40, 47, 24, 150, 2, torch.float32, seed=rows)
    check_unit_tiles(monkeypatch, kernels, inputs, 150, 2, "relu", 0.1, tol=1e-4)
    tiles = {name: (kw["BLOCK_M"], kw["grid"]) for name, kw in launches if name.startswith("_unit")}
    expected = (rows, (2, -(-150 // rows)))
    assert tiles == {"_unit_forward_kernel": expected, "_unit_backward_rows_kernel": expected}
