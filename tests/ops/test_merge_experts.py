"""fsosr.ops.merge_experts (MoSA's merge of N sparse experts into one adapter weight) on every backend: the fp64
mean of N dense copies as the oracle, bitwise agreement with the reference, determinism, opcheck, compile, the
differentiable fallback, errors; GPU-marked tests for cuda and triton."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsosr import testing
from fsosr.ops import merge_experts
from fsosr.ops import sparse_adapter as sparse_adapter_module

CPU = torch.device("cpu")
NATIVE = testing.backends_under_test(CPU, ("cpu", "triton"))

MERGE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MERGE_CASES = {"rest_scale": (True, True), "rest_ones": (True, False), "zero_rest": (False, True),
               "zero_rest_ones": (False, False)}


def make_merge_inputs(shape, n_experts, *, rest=True, scale=True, dtype=torch.float32, device=CPU, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    w_own, w_rest = rand(), rand() if rest else None
    owner = torch.randint(0, n_experts, shape, generator=g, dtype=torch.uint8).to(device)
    rest_scale = (0.8 + 0.2 * torch.rand(n_experts, generator=g, dtype=torch.float64)).to(device) if scale else None
    return w_own, owner, w_rest, rest_scale


def dense_mean_oracle(w_own, owner, w_rest, n_experts, rest_scale):
    """fp64 CPU: the mean over the N materialised dense expert copies, as the seed merges them (differentiable)."""
    own = w_own.cpu().double()
    rest = torch.zeros_like(own) if w_rest is None else w_rest.cpu().double()
    scale = torch.ones(n_experts, dtype=torch.float64) if rest_scale is None else rest_scale.cpu().double()
    return torch.stack([torch.where(owner.cpu() == i, own, scale[i] * rest) for i in range(n_experts)]).mean(0)


def merge_fn(backend, w_own, owner, w_rest, n_experts, rest_scale):
    return merge_experts(w_own, owner, w_rest, n_experts, rest_scale=rest_scale, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (97, 65), (768, 64)], ids=str)
@pytest.mark.parametrize("n_experts", [1, 2, 4, 7])
@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_matches_dense_mean_and_reference_bitwise(backend, shape, n_experts, case):
    rest, scale = MERGE_CASES[case]
    for dtype in MERGE_DTYPES:
        inputs = make_merge_inputs(shape, n_experts, rest=rest, scale=scale, dtype=dtype, seed=n_experts + len(shape))
        merged = merge_fn(backend, *inputs[:3], n_experts, inputs[3])
        assert merged.dtype == dtype and merged.shape == shape
        oracle = dense_mean_oracle(*inputs[:3], n_experts, inputs[3])
        atol, rtol = testing.TOLERANCES[dtype]
        torch.testing.assert_close(merged.double(), oracle, atol=atol, rtol=rtol, msg=lambda m: f"{dtype}: {m}")
        if n_experts == 1 or (not rest and dtype == torch.float64):
            assert torch.equal(merged.double(), oracle), dtype   # w_own, and w_own / N, are exact
        if backend != "reference":   # the same arithmetic in the same order: the same bits
            assert torch.equal(merged, merge_fn("reference", *inputs[:3], n_experts, inputs[3])), dtype


@pytest.mark.parametrize("backend", NATIVE)
def test_merge_bitwise_deterministic_and_thread_count_independent(backend):
    inputs = make_merge_inputs((300, 257), 5, seed=3)   # 77,100 entries: three parallel chunks on cpu
    threads, runs = torch.get_num_threads(), []
    try:
        for count in (3, 3, 1):
            torch.set_num_threads(count)
            runs.append(merge_fn(backend, *inputs[:3], 5, inputs[3]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_merge_empty_non_contiguous_and_bad_owner(backend):
    for shape in [(0,), (0, 5)]:
        w_own, owner, w_rest, scale = make_merge_inputs(shape, 3, dtype=torch.float16)
        merged = merge_fn(backend, w_own, owner, w_rest, 3, scale)
        assert merged.shape == shape and merged.dtype == torch.float16
    w_own, owner, w_rest, scale = make_merge_inputs((33, 20), 4, seed=2)
    merged = merge_fn(backend, w_own.t(), owner.t(), w_rest.t(), 4, scale)
    assert torch.equal(merged, merge_fn("reference", *(t.t().contiguous() for t in (w_own, owner, w_rest)), 4, scale))
    with pytest.raises(ValueError, match="owner values must be < num_experts = 3, got 3"):
        merge_fn(backend, w_own, owner, w_rest, 3, None)


def _merge_ops():
    names = {"cpu": "merge_experts", "triton": "merge_experts_triton"}
    return [getattr(torch.ops.fsosr, names[backend]) for backend in NATIVE]


@pytest.mark.parametrize("op", _merge_ops(), ids=str)
def test_merge_native_op_reads_coefficient_zero_for_owners_out_of_range(op):
    """The Python wrapper rejects such maps on the CPU; the kernels themselves must still stay in bounds."""
    w_own, owner, w_rest, _ = make_merge_inputs((9, 31), 3, seed=4)
    owner[0], owner[1] = 255, 3
    coefficients = torch.tensor([2.0, 1.5, 1.25], dtype=torch.float64)
    merged = op(w_own, owner, w_rest, coefficients, 3)
    table = torch.zeros(256, dtype=torch.float32)
    table[:3] = coefficients.float()
    assert torch.equal(merged, (w_own + table[owner.long()] * w_rest) / torch.tensor(3.0))
    assert torch.equal(merged[:2], w_own[:2] / torch.tensor(3.0))


@pytest.mark.parametrize("op", _merge_ops(), ids=str)
@pytest.mark.parametrize("rest", [True, False], ids=["rest", "zero_rest"])
def test_merge_opcheck(op, rest):
    for dtype in (torch.float32, torch.bfloat16):
        w_own, owner, w_rest, scale = make_merge_inputs((7, 5), 3, rest=rest, dtype=dtype, seed=7)
        torch.library.opcheck(op, (w_own, owner, w_rest, scale.sum() - scale, 3))


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_merge_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    w_own, owner, w_rest, scale = make_merge_inputs((17, 9), 4, seed=8)
    x = torch.randn(3, 9, generator=torch.Generator().manual_seed(1))

    def merged_linear(x, w_own, w_rest, scale):
        merged = merge_experts(w_own, owner, w_rest, 4, rest_scale=scale, backend=backend)
        return merged, F.linear(x, merged)

    compiled = torch.compile(merged_linear, fullgraph=True)
    eager = merged_linear(x, w_own, w_rest, scale)
    got = compiled(x, w_own, w_rest, scale)
    if backend != "reference":   # an opaque op: the compiled graph runs the same kernel
        assert torch.equal(got[0], eager[0])
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)
    w_train = w_own.clone().requires_grad_()   # the differentiable path traces too
    grad, = torch.autograd.grad(compiled(x, w_train, w_rest, scale)[1].sum(), [w_train])
    torch.testing.assert_close(grad, x.sum(0).expand(17, 9) / 4)


@pytest.mark.parametrize("backend", NATIVE)
def test_merge_differentiates_through_the_reference(backend, monkeypatch):
    calls = []
    real = sparse_adapter_module._merge_op
    monkeypatch.setattr(sparse_adapter_module, "_merge_op", lambda name: calls.append(name) or real(name))
    w_own, owner, w_rest, scale = make_merge_inputs((6, 5), 3, dtype=torch.float64, seed=11)
    leaves = [t.clone().requires_grad_() for t in (w_own, w_rest, scale)]
    merged = merge_fn(backend, leaves[0], owner, leaves[1], 3, leaves[2])
    assert calls == [] and merged.requires_grad
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((merged * weight).sum(), leaves)
    oracle_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    oracle = dense_mean_oracle(oracle_leaves[0], owner, oracle_leaves[1], 3, oracle_leaves[2])
    expected = torch.autograd.grad((oracle * weight).sum(), oracle_leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, c: merge_fn(backend, a, owner, b, 3, c), leaves)
    with torch.no_grad():   # no grad mode: the native op, with the same bits
        native = merge_fn(backend, leaves[0], owner, leaves[1], 3, leaves[2])
    assert calls == [backend] and not native.requires_grad and torch.equal(native, merged.detach())


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_merge_errors_name_the_argument(backend):
    w_own, owner, w_rest, scale = make_merge_inputs((4, 5), 3)
    cases = [
        (ValueError, "w_rest must have w_own's shape", dict(w_rest=w_rest[:3])),
        (TypeError, "w_rest must have w_own's dtype", dict(w_rest=w_rest.double())),
        (ValueError, "owner must have w_own's shape", dict(owner=owner[:, :4])),
        (TypeError, "owner must be a torch.uint8", dict(owner=owner.long())),
        (ValueError, r"rest_scale must be a tensor of shape \(3,\), got \(2,\)", dict(rest_scale=scale[:2])),
        (ValueError, r"rest_scale must be a tensor of shape \(3,\), got \(1, 3\)", dict(rest_scale=scale[None])),
        (TypeError, "rest_scale must be floating-point", dict(rest_scale=torch.ones(3, dtype=torch.long))),
        (ValueError, "num_experts must be an int in", dict(num_experts=0)),
        (ValueError, "num_experts must be an int in", dict(num_experts=257)),
    ]
    for error, message, override in cases:
        args = dict(w_own=w_own, owner=owner, w_rest=w_rest, num_experts=3, rest_scale=scale) | override
        with pytest.raises(error, match=message):
            merge_experts(**args, backend=backend)
    fp8 = w_own.to(torch.float8_e4m3fn)
    if backend == "reference":
        torch.testing.assert_close(merge_experts(fp8, owner, None, 3, backend=backend).float(),
                                   (fp8.float() / 3).to(torch.float8_e4m3fn).float())
    else:
        with pytest.raises(TypeError, match="runs fp32, fp16, bf16 and fp64"):
            merge_experts(fp8, owner, None, 3, backend=backend)


def test_merge_native_op_checks_its_arguments():
    if "cpu" not in NATIVE:
        pytest.skip("cpu backend not built")
    w_own, owner, w_rest, scale = make_merge_inputs((4, 5), 3)
    op = torch.ops.fsosr.merge_experts
    with pytest.raises(TypeError, match="coefficients must be float64"):
        op(w_own, owner, w_rest, scale.float(), 3)
    with pytest.raises(ValueError, match=r"coefficients must be \[num_experts = 3\]"):
        op(w_own, owner, w_rest, scale[:2], 3)
    with pytest.raises(ValueError, match=r"num_experts must be in \[1, 256\]"):
        op(w_own, owner, w_rest, scale, 0)
    with pytest.raises(TypeError, match="w_rest must have w_own's dtype"):
        op(w_own, owner, w_rest.double(), scale, 3)
    with pytest.raises(ValueError, match="owner must have w_own's shape"):
        op(w_own, owner[:2], w_rest, scale, 3)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", MERGE_DTYPES, ids=str)
@pytest.mark.parametrize("case", MERGE_CASES)
def test_gpu_merge_matches_oracle_reference_and_cpu_bitwise(backend, dtype, case):
    cuda = torch.device("cuda")
    rest, scale = MERGE_CASES[case]
    for shape, n_experts in [((768, 64), 4), ((97, 65), 7), ((1,), 2), ((0, 3), 3), ((4097, 3), 1)]:
        w_own, owner, w_rest, _ = make_merge_inputs(shape, n_experts, rest=rest, dtype=dtype, device=cuda, seed=5)
        # dyadic scales: their fp64 sum is exact in any order, so the cpu and cuda coefficients are the same bits
        rest_scale = 1 - torch.arange(n_experts, dtype=torch.float64, device=cuda) / 64 if scale else None
        merged = merge_fn(backend, w_own, owner, w_rest, n_experts, rest_scale)
        assert merged.device == w_own.device and merged.dtype == dtype and merged.shape == shape
        atol, rtol = testing.TOLERANCES[dtype]
        torch.testing.assert_close(merged.cpu().double(), dense_mean_oracle(w_own, owner, w_rest, n_experts,
                                                                            rest_scale), atol=atol, rtol=rtol)
        assert torch.equal(merged, merge_fn("reference", w_own, owner, w_rest, n_experts, rest_scale))
        on_cpu = [None if t is None else t.cpu() for t in (w_own, owner, w_rest, rest_scale)]
        assert torch.equal(merged.cpu(), merge_fn("reference", *on_cpu[:3], n_experts, on_cpu[3]))
        assert torch.equal(merged, merge_fn(backend, w_own, owner, w_rest, n_experts, rest_scale))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_merge_owner_out_of_range_cpu_scale_and_grad_fallback(backend):
    cuda = torch.device("cuda")
    w_own, owner, w_rest, scale = make_merge_inputs((768, 64), 3, device=cuda, seed=6)
    owner[0] = 255   # not checked on CUDA (a host read): coefficient 0, never an out-of-bounds read
    merged = merge_fn(backend, w_own, owner, w_rest, 3, scale.cpu())   # rest_scale may stay on the CPU
    torch.cuda.synchronize()
    assert torch.equal(merged[0], w_own[0] / torch.tensor(3.0, device=cuda))
    assert torch.equal(merged, merge_fn("reference", w_own, owner, w_rest, 3, scale))
    w_train = w_own.clone().requires_grad_()
    grad, = torch.autograd.grad(merge_fn(backend, w_train, owner, w_rest, 3, scale).sum(), [w_train])
    assert torch.equal(grad, torch.full_like(w_own, 1 / 3))
