"""fsosr.ops.sparse_adapter_weight and fsosr.ops.sparse_linear on every backend against the fp64 reference:
outputs and every gradient, the owner mask of the weight gradient, edge cases, gradcheck, opcheck, compile,
determinism and the error paths (merge_experts: tests/ops/test_merge_experts.py). ``triton`` runs under the interpreter at small sizes; the ``gpu``-marked tests at
the end run ``cuda`` and ``triton`` on CUDA tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsosr import backends, testing
from fsosr.ops import sparse_adapter_weight, sparse_linear

CPU = torch.device("cpu")
NATIVE = testing.backends_under_test(CPU, ("cpu", "triton"))
LINEAR_OUTPUT = ("y",)


def make_inputs(m, out, inn, n_experts, *, rest=True, bias=True, dtype=torch.float32, device=CPU, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    cast = lambda t: t.to(device, dtype).requires_grad_()  # noqa: E731
    owner = torch.randint(0, n_experts, (out, inn), generator=g, dtype=torch.uint8).to(device)
    return (cast(rand(m, inn)), cast(rand(out, inn)), cast(rand(out, inn)) if rest else None, owner,
            cast(rand(out)) if bias else None)


def linear_fn(expert):
    def fn(x, w_own, w_rest, owner, bias, backend):
        return (sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend),)
    return fn


def weight_fn(expert):
    def fn(w_own, owner, w_rest, backend):
        return (sparse_adapter_weight(w_own, owner, w_rest, expert, backend=backend),)
    return fn


SHAPES = [(1, 1, 1, 1), (5, 7, 3, 4), (70, 65, 33, 3), (33, 12, 80, 2)]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("m,out,inn,n_experts", SHAPES)
@pytest.mark.parametrize("rest", [True, False], ids=["rest", "zero_rest"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_reference(backend, m, out, inn, n_experts, rest, bias):
    x, w_own, w_rest, owner, b = make_inputs(m, out, inn, n_experts, rest=rest, bias=bias, seed=m + out + inn)
    expert = n_experts - 1
    testing.compare_with_reference(linear_fn(expert), (x, w_own, w_rest, owner, b), backend=backend,
                                   grad_outputs=[0], names=LINEAR_OUTPUT)
    testing.compare_with_reference(weight_fn(expert), (w_own, owner, w_rest), backend=backend, grad_outputs=[0])


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_double_precision(backend, dtype):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("fp64 GEMMs run on cpu and reference only")
    inputs = make_inputs(40, 24, 20, 3, dtype=dtype, seed=5)
    atol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: None}[dtype]
    testing.compare_with_reference(linear_fn(1), inputs, backend=backend, grad_outputs=[0], atol=atol, rtol=atol)


def _grads(backend, inputs, expert, weight=None):
    x, w_own, w_rest, owner, bias = inputs
    y = sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) if weight is None else weight
    return torch.autograd.grad((y * weight).sum(), [x, w_own, w_rest, bias])


@pytest.mark.parametrize("backend", NATIVE)
def test_weight_gradient_is_split_exactly_by_the_owner_mask(backend):
    """The epilogue writes the tile's owned entries to grad_w_own and the others to grad_w_rest: both are exact
    zeros where they do not belong, and together they are the unmasked dW = grad_y^T x."""
    inputs = make_inputs(50, 70, 30, 4, seed=9)
    x, w_own, w_rest, owner, bias = inputs
    _, grad_own, grad_rest, _ = _grads(backend, inputs, 2)
    mine = owner == 2
    assert torch.all(grad_own[~mine] == 0) and torch.all(grad_rest[mine] == 0)
    weight = torch.randn(50, 70, generator=torch.Generator().manual_seed(2))
    dense = weight.t().double() @ x.detach().double()
    torch.testing.assert_close((grad_own + grad_rest).double(), dense, rtol=2e-5, atol=2e-5)
    assert bool((grad_own[mine] != 0).all()) and bool((grad_rest[~mine] != 0).all())


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", ["all_one_expert", "expert_owns_nothing", "single_expert", "no_rows"])
def test_edge_cases(backend, case):
    n_experts, expert, m = {"single_expert": (1, 0, 9), "no_rows": (3, 1, 0)}.get(case, (3, 1, 9))
    x, w_own, w_rest, owner, bias = make_inputs(m, 17, 11, n_experts, seed=3)
    if case == "all_one_expert":
        owner = torch.full_like(owner, expert)
    elif case == "expert_owns_nothing":
        owner = torch.where(owner == expert, 0, owner).to(torch.uint8)
    inputs = (x, w_own, w_rest, owner, bias)
    testing.compare_with_reference(linear_fn(expert), inputs, backend=backend, grad_outputs=[0] if m else [])
    weight = sparse_adapter_weight(w_own, owner, w_rest, expert, backend=backend)
    if case in ("all_one_expert", "single_expert"):
        assert torch.equal(weight, w_own)
    if case == "expert_owns_nothing":
        assert torch.equal(weight, w_rest)
        _, grad_own, grad_rest, _ = _grads(backend, inputs, expert)
        assert torch.all(grad_own == 0) and bool((grad_rest != 0).any())
    if case == "no_rows":
        y = sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend)
        assert y.shape == (0, 17)
        grad_own, grad_bias = torch.autograd.grad(y.sum(), [w_own, bias])
        assert torch.all(grad_own == 0) and torch.all(grad_bias == 0)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("out,inn", [(0, 8), (8, 0)], ids=["no_outputs", "no_inputs"])
def test_zero_width_weights(backend, out, inn):
    # (Found broken: a [rows, 0] view of x through reshape(-1, 0) raised for in_features = 0.) With no inputs,
    # y is the bias; with no outputs, y is empty and x gets a zero gradient.
    inputs = make_inputs(5, out, inn, 3, seed=4)
    testing.compare_with_reference(linear_fn(1), inputs, backend=backend, grad_outputs=[0])
    y = sparse_linear(*inputs[:4], 1, inputs[4], backend=backend)
    assert y.shape == (5, out)
    if inn == 0:
        assert torch.equal(y, inputs[4].detach().expand(5, out))


@pytest.mark.parametrize("backend", NATIVE)
def test_leading_dims_expert_tensor_and_frozen_inputs(backend):
    x, w_own, w_rest, owner, bias = make_inputs(12, 9, 5, 3, seed=4)
    x3 = x.detach().reshape(3, 4, 5)          # [..., in]; x does not require grad here
    w_rest = w_rest.detach()                  # a buffer, as in SparseLinear
    y = sparse_linear(x3, w_own, w_rest, owner, torch.tensor(2, dtype=torch.int32), bias, backend=backend)
    expected = F.linear(x3.double(), torch.where(owner == 2, w_own, w_rest).double(), bias.double())
    assert y.shape == (3, 4, 9)
    torch.testing.assert_close(y.double(), expected, rtol=2e-5, atol=2e-5)
    grad_own, = torch.autograd.grad(y.sum(), [w_own])
    assert torch.all(grad_own[owner != 2] == 0)


def test_triton_weight_gradient_split_path_matches_one_split():
    if "triton" not in NATIVE:
        pytest.skip("triton is not usable here")
    from fsosr._triton import sparse_adapter as kernels
    x, w_own, w_rest, owner, _ = (t.detach() if t is not None else None for t in make_inputs(300, 20, 24, 3))
    grad_y = torch.randn(300, 20, generator=torch.Generator().manual_seed(1))
    expert = torch.tensor(1)
    one = kernels.sparse_linear_backward(grad_y, x, w_own, w_rest, owner, expert, True, True, True, True, splits=1)
    three = kernels.sparse_linear_backward(grad_y, x, w_own, w_rest, owner, expert, True, True, True, True, splits=3)
    dense = (grad_y.t().double() @ x.double())
    mine = owner == 1
    for result in (one, three):
        torch.testing.assert_close(result[1].double(), torch.where(mine, dense, 0.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result[2].double(), torch.where(mine, 0.0, dense), rtol=1e-5, atol=1e-5)
        assert torch.all(result[1][~mine] == 0)
    assert kernels.num_splits(128 * 197, 768, 64) > 1 and kernels.num_splits(100, 768, 64) == 1
    # the value path for the expert id (a CPU id with GPU weights) selects like the pointer path
    value_path = kernels.sparse_adapter_weight.__globals__["_select_kernel"]
    out = torch.empty_like(w_own)
    value_path[(1,)](w_own, w_rest, owner, torch.empty(1, dtype=torch.int64), 1, out, w_own.numel(),
                     HAS_REST=True, FROM_PTR=False, BLOCK=1024)
    assert torch.equal(out, torch.where(mine, w_own, w_rest))


@pytest.mark.parametrize("rest", [True, False], ids=["rest", "zero_rest"])
def test_gradcheck_fp64(rest):
    if "cpu" not in NATIVE:
        pytest.skip("cpu backend not built")
    x, w_own, w_rest, owner, bias = make_inputs(6, 5, 4, 3, rest=rest, dtype=torch.float64, seed=6)
    inputs = tuple(t for t in (x, w_own, w_rest, bias) if t is not None)

    def linear(*args):
        x, w_own, *others = args
        w_rest, bias = (others[0], others[1]) if rest else (None, others[0])
        return sparse_linear(x, w_own, w_rest, owner, 1, bias, backend="cpu")

    assert torch.autograd.gradcheck(linear, inputs)
    assert torch.autograd.gradcheck(lambda w, r: sparse_adapter_weight(w, owner, r, 2, backend="cpu"),
                                    (w_own, w_rest if rest else torch.zeros_like(w_own, requires_grad=True)))


def _op_sets():
    sets = []
    if "cpu" in NATIVE:
        ops = torch.ops.fsosr
        sets.append((ops.sparse_adapter_weight, ops.sparse_adapter_weight_bwd, ops.sparse_linear_fwd,
                     ops.sparse_linear_bwd))
    if "triton" in NATIVE:
        ops = torch.ops.fsosr
        sets.append((ops.sparse_adapter_weight_triton, ops.sparse_adapter_weight_bwd_triton,
                     ops.sparse_linear_fwd_triton, ops.sparse_linear_bwd_triton))
    return sets


@pytest.mark.parametrize("ops", _op_sets(), ids=lambda s: str(s[0]).split(".")[-1])
@pytest.mark.parametrize("rest", [True, False], ids=["rest", "zero_rest"])
def test_opcheck(ops, rest):
    weight_op, weight_bwd, linear_op, linear_bwd = ops
    x, w_own, w_rest, owner, bias = make_inputs(9, 7, 5, 3, rest=rest, seed=7)
    expert = torch.tensor(1)
    torch.library.opcheck(weight_op, (w_own, owner, w_rest, expert))
    torch.library.opcheck(linear_op, (x, w_own, w_rest, owner, expert, bias))
    grad_y = torch.randn(9, 7)
    torch.library.opcheck(weight_bwd, (grad_y[:7, :5].contiguous(), owner, expert, rest))
    detached = [t.detach() if t is not None else None for t in (x, w_own, w_rest)]
    torch.library.opcheck(linear_bwd, (grad_y, *detached, owner, expert, True, True, rest, True))


@pytest.mark.parametrize("backend", NATIVE)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, w_own, w_rest, owner, bias = make_inputs(13, 10, 6, 4, seed=8)
    w_rest = w_rest.detach()

    def step(x, w_own, bias, expert: int):
        y = sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend)
        w = sparse_adapter_weight(w_own, owner, w_rest, expert, backend=backend)
        return y.square().sum() + (w * w).sum()

    compiled = torch.compile(step, fullgraph=True)
    for expert in (1, 3):
        eager = step(x, w_own, bias, expert)
        eager_grads = torch.autograd.grad(eager, (x, w_own, bias))
        loss = compiled(x, w_own, bias, expert)
        grads = torch.autograd.grad(loss, (x, w_own, bias))
        torch.testing.assert_close(loss, eager)
        for g, eg in zip(grads, eager_grads):
            torch.testing.assert_close(g, eg)


@pytest.mark.parametrize("backend", NATIVE)
def test_bitwise_deterministic(backend):
    inputs = make_inputs(70, 65, 33, 3, seed=10)
    testing.assert_bitwise_deterministic(linear_fn(2), inputs, backend=backend, grad_outputs=[0])
    testing.assert_bitwise_deterministic(weight_fn(2), inputs[1:2] + (inputs[3], inputs[2]), backend=backend,
                                         grad_outputs=[0])


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_errors_name_the_argument(backend):
    x, w_own, w_rest, owner, bias = (t.detach() for t in make_inputs(4, 5, 3, 2))
    with pytest.raises(TypeError, match="owner must be a torch.uint8"):
        sparse_linear(x, w_own, w_rest, owner.long(), 0, bias, backend=backend)
    with pytest.raises(ValueError, match="owner must have w_own's shape"):
        sparse_linear(x, w_own, w_rest, owner[:2], 0, bias, backend=backend)
    with pytest.raises(TypeError, match="w_rest must have w_own's dtype"):
        sparse_linear(x, w_own, w_rest.double(), owner, 0, bias, backend=backend)
    with pytest.raises(ValueError, match=r"x must be \[..., in = 3\]"):
        sparse_linear(x[:, :2], w_own, w_rest, owner, 0, bias, backend=backend)
    with pytest.raises(ValueError, match="bias must be"):
        sparse_linear(x, w_own, w_rest, owner, 0, bias[:3], backend=backend)
    with pytest.raises(ValueError, match="w_own must be 2-D"):
        sparse_linear(x, w_own[0], None, owner[0], 0, None, backend=backend)
    with pytest.raises(ValueError, match="expert must be an int"):
        sparse_linear(x, w_own, w_rest, owner, 256, bias, backend=backend)
    with pytest.raises(TypeError, match="expert must be an int or a 0-d integer tensor"):
        sparse_adapter_weight(w_own, owner, w_rest, torch.tensor(1.0), backend=backend)
    with pytest.raises(ValueError, match="expert is on meta"):
        sparse_adapter_weight(w_own, owner, w_rest, torch.tensor(1, device="meta"), backend=backend)
    for expert in (256, -1, 257):   # a CPU tensor is range-checked like an int (uint8 would wrap it to 0, 255, 1)
        with pytest.raises(ValueError, match=r"expert must be in \[0, 255\]"):
            sparse_adapter_weight(w_own, owner, w_rest, torch.tensor(expert), backend=backend)
        with pytest.raises(ValueError, match=r"expert must be in \[0, 255\]"):
            sparse_linear(x, w_own, w_rest, owner, torch.tensor(expert, dtype=torch.int32), bias, backend=backend)
    if backend != "reference":
        with pytest.raises(TypeError, match="takes x in w_own's dtype"):
            sparse_linear(x.double(), w_own, w_rest, owner, 0, bias, backend=backend)
    if backend == "triton":
        with pytest.raises(TypeError, match="fp32, fp16 and bf16"):
            sparse_linear(x.double(), w_own.double(), None, owner, 0, None, backend=backend)


def test_backend_errors_say_why():
    x, w_own, w_rest, owner, bias = (t.detach() for t in make_inputs(4, 5, 3, 2))
    with pytest.raises(backends.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        sparse_linear(x, w_own, w_rest, owner, 0, bias, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_adapter_weight(w_own, owner, w_rest, 0, backend="gpu")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,out,inn", [(1, 768, 64), (197, 64, 768), (128 * 197, 768, 64), (1000, 65, 33)])
@pytest.mark.parametrize("rest", [True, False], ids=["rest", "zero_rest"])
def test_gpu_matches_reference(backend, dtype, m, out, inn, rest):
    cuda = torch.device("cuda")
    inputs = make_inputs(m, out, inn, 4, rest=rest, dtype=dtype, device=cuda, seed=m)
    atol = 2e-4 if dtype == torch.float32 else 6e-2
    testing.compare_with_reference(linear_fn(3), inputs, backend=backend, grad_outputs=[0], atol=atol, rtol=atol)
    testing.assert_bitwise_deterministic(linear_fn(3), inputs, backend=backend, grad_outputs=[0])
    testing.compare_with_reference(weight_fn(3), (inputs[1], inputs[3], inputs[2]), backend=backend,
                                   grad_outputs=[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_expert_on_device_and_mask_exact(backend):
    cuda = torch.device("cuda")
    x, w_own, w_rest, owner, bias = make_inputs(500, 768, 64, 4, device=cuda, seed=1)
    for expert in (torch.tensor(2, device=cuda), torch.tensor(2), 2):
        y = sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend)
        grad_own, grad_rest = torch.autograd.grad(y.square().sum(), [w_own, w_rest])
        mine = owner == 2
        assert torch.all(grad_own[~mine] == 0) and torch.all(grad_rest[mine] == 0)
        ref = sparse_linear(x, w_own, w_rest, owner, 2, bias, backend="reference")
        torch.testing.assert_close(y, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_and_replay(backend):
    cuda = torch.device("cuda")
    x, w_own, w_rest, owner, bias = (t.detach() for t in make_inputs(256, 768, 64, 4, device=cuda, seed=2))
    expert = torch.tensor(1, device=cuda)
    run = lambda: sparse_linear(x, w_own, w_rest, owner, expert, bias, backend=backend)  # noqa: E731
    graph, captured = testing.capture_cuda_graph(run)
    expert.fill_(3)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, run())


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_weight_is_contiguous_for_strided_inputs(backend):
    """A column-partition owner map is built transposed; every backend returns a contiguous weight all the same."""
    _, w_own, w_rest, owner, _ = (t.detach() for t in make_inputs(4, 6, 5, 3, seed=4))
    w = sparse_adapter_weight(w_own.t(), owner.t(), w_rest.t(), 1, backend=backend)
    assert w.is_contiguous() and w.shape == (5, 6)
    assert torch.equal(w, torch.where(owner.t() == 1, w_own.t(), w_rest.t()))
