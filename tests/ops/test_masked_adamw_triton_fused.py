"""The triton backend's one-launch masked_adamw_ step (FSOSR_MASKED_ADAMW_TRITON_FUSED=1, kernels/masked_adamw.py
``_fused_kernel``): every program computes the rules it needs from the counters as they were, and the last one to
finish advances the counters. It must give the same bits as the two-launch step (rules kernel, then step kernel)
and MoSA's own optimizer in fp64. Under the interpreter on CPU tensors, compiled with FSOSR_TEST_DEVICE=cuda; the
``gpu`` tests capture it in a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from fsosr import testing
from fsosr.ops.masked_adamw import masked_adamw_
from tests.ops.test_masked_adamw import SEMANTICS, Model, _clone, assert_graph_replays_match_eager, big_inputs, run

DEVICE = testing.device_under_test()
pytestmark = pytest.mark.skipif("triton" not in testing.backends_under_test(DEVICE, ("triton",)),
                                reason="triton backend not usable here")


@pytest.fixture
def kernels():
    from fsosr._triton import masked_adamw  # noqa: PLC0415 - imports Triton
    return masked_adamw


def tiny_segments(n=9_001, seed=5):
    """big_inputs with segments of 1..40 entries over the first 3,000 entries (a program then spans hundreds of
    segments, most entries taking their rules per entry) and a few long ones after; some segments empty."""
    args, kwargs = big_inputs(n=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, 41, (150,), generator=g).cumsum(0)
    cuts = cuts[cuts < 3_000]
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([3_000, 3_000, 6_500, n])])
    segments = offsets.numel() - 1
    kwargs.update(segment_offsets=offsets, step=torch.randint(0, 3, (segments, 5), generator=g),
                  weight_decay=torch.rand(segments, generator=g, dtype=torch.float64) * 0.02)
    args[5] = torch.randint(0, 4, (segments,), generator=g)
    return args, kwargs


def run_steps(monkeypatch, fused, args, kwargs, semantics, steps=3, draws=1):
    """`steps` calls on copies of the inputs on DEVICE (fresh gradients and draws each, the same for both
    paths); returns params, exp_avg, exp_avg_sq, step counters."""
    monkeypatch.setenv("FSOSR_MASKED_ADAMW_TRITON_FUSED", "1" if fused else "0")
    a, k = _clone(args, kwargs, DEVICE)
    g = torch.Generator().manual_seed(11)
    segments = k["segment_offsets"].numel() - 1
    for _ in range(steps):
        a[1] = torch.randn(a[0].shape, generator=g, dtype=a[0].dtype).to(DEVICE)
        a[5] = torch.randint(0, 4, (segments, draws) if draws > 1 else (segments,), generator=g).to(DEVICE)
        masked_adamw_(*a, **k, semantics=semantics, backend="triton", validate=False)
    return a[0], a[2], a[3], k["step"]


@pytest.mark.parametrize("layout", ["long_segments", "tiny_segments"])
@pytest.mark.parametrize("draws", [1, 2])
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_step_equals_two_launches_bitwise(monkeypatch, kernels, layout, draws, semantics, dtype):
    args, kwargs = big_inputs(n=9_001) if layout == "long_segments" else tiny_segments()
    args = [t.to(dtype) if t.is_floating_point() else t for t in args[:4]] + args[4:]
    two = run_steps(monkeypatch, False, args, kwargs, semantics, draws=draws)
    one = run_steps(monkeypatch, True, args, kwargs, semantics, draws=draws)
    for x, y in zip(one, two):
        assert torch.equal(x, y)
    assert not torch.equal(one[0], args[0].to(DEVICE))
    assert not torch.equal(one[3], kwargs["step"].to(DEVICE))   # the counters did advance


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_fused_step_matches_seed_in_fp64(monkeypatch, kernels, semantics):
    """50 steps of MoSA's own optimizer (N dense copies, grad *= mask, HF AdamW) against the fused step."""
    monkeypatch.setenv("FSOSR_MASKED_ADAMW_TRITON_FUSED", "1")
    model = Model()
    flat, seed = run(model, semantics, "triton")
    for ours, theirs in zip(flat, seed):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    split_segment, split_first = 2, model.layout[2][1][0]
    seed_steps = [p.state.get("step", 0) for p in model.seed_params]
    assert model.steps[split_segment, :-1].tolist() == seed_steps[split_first:split_first + model.n_experts]


def count_launches(monkeypatch, kernels):
    names = []
    for name in ("_fused_kernel", "_rules_kernel", "_step_kernel"):
        kernel = getattr(kernels, name)

        class Counting:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                names.append(_name)
                return _kernel[grid]
        monkeypatch.setattr(kernels, name, Counting())
    return names


@pytest.mark.parametrize("case", ["int_step", "no_entries", "empty_segments", "fifteen_experts", "sixteen_experts"])
def test_fused_step_edge_cases(monkeypatch, kernels, case):
    """An int step (no counters to advance); no entries at all (the counters still advance, as the two-launch
    step advances them); empty first/middle/last segments; the most experts the fused step takes (15) and one
    more, which runs the two launches. One launch where fused, the arrival count re-armed after each."""
    n_experts = {"fifteen_experts": 15, "sixteen_experts": 16}.get(case, 4)
    args, kwargs = big_inputs(n=5_003, n_experts=n_experts)
    if case == "empty_segments":
        kwargs["segment_offsets"] = torch.tensor([0, 0, 800, 800, 800, 3_000, 3_000, 4_000, 5_003, 5_003, 5_003])
    if case == "no_entries":
        args = [t[:0] for t in args[:5]] + args[5:]
        kwargs["segment_offsets"] = torch.zeros(11, dtype=torch.int64)
    if case == "int_step":
        kwargs.update(step=7, num_experts=n_experts)
    launches = count_launches(monkeypatch, kernels)
    results = {}
    for fused in (False, True):
        launches.clear()
        results[fused] = run_steps(monkeypatch, fused, args, kwargs, "mosa", steps=2)
        expected = (["_fused_kernel"] * 2 if fused and case != "sixteen_experts"
                    else ["_rules_kernel", "_step_kernel"] * 2 if case != "no_entries" else ["_rules_kernel"] * 2)
        assert launches == expected
    for x, y in zip(results[True], results[False]):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    if case == "no_entries":
        assert results[True][3].sum() > kwargs["step"].sum()
    for counter in kernels._ARRIVAL_COUNTERS.values():
        assert counter.tolist() == [0]


def test_fused_setting_is_checked(monkeypatch, kernels):
    monkeypatch.setenv("FSOSR_MASKED_ADAMW_TRITON_FUSED", "yes")
    args, kwargs = big_inputs(n=100)
    with pytest.raises(ValueError, match="FSOSR_MASKED_ADAMW_TRITON_FUSED must be 0 or 1, got 'yes'"):
        masked_adamw_(*[t.to(DEVICE) for t in args], **_clone([], kwargs, DEVICE)[1], backend="triton",
                      validate=False)


@pytest.mark.gpu
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_gpu_fused_step_in_a_cuda_graph_equals_two_launches(monkeypatch, semantics):
    """Compiled, with 1,000 programs racing for the arrival counter: captured in a CUDA graph and replayed 5 times
    (counters advancing each time) against the two-launch step run eagerly, bit for bit."""
    def step(fused):
        def run(a, k):
            monkeypatch.setenv("FSOSR_MASKED_ADAMW_TRITON_FUSED", "1" if fused else "0")
            masked_adamw_(*a, **k, semantics=semantics, backend="triton", validate=False)
        return run
    args, kwargs = _clone(*big_inputs(n=1_000_003), "cuda")
    assert_graph_replays_match_eager(step(True), step(False), args, kwargs, replays=5)


@pytest.mark.parametrize("advance", [True, False])
def test_fused_step_passes_opcheck(monkeypatch, kernels, advance):
    """The registered op with the fused step: schema (its arrival count is internal and re-armed, not an argument),
    fake tensors, autograd registration, torch.compile."""
    monkeypatch.setenv("FSOSR_MASKED_ADAMW_TRITON_FUSED", "1")
    args, kwargs = _clone(*big_inputs(n=5000), DEVICE)
    params, grads, exp_avg, exp_avg_sq, owner, selected = args
    steps = kwargs["step"] + (0 if advance else 1)
    torch.library.opcheck(torch.ops.fsosr.masked_adamw_triton_,
                          (params, exp_avg, exp_avg_sq, steps, grads, owner, kwargs["segment_offsets"], selected,
                           kwargs["weight_decay"], 1e-3, 0.9, 0.999, 1e-6, 0, advance))
