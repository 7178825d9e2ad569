"""fsosr.ops.topk_route: every backend against the fp64 reference, gradients, opcheck, compile, determinism,
invariants and every error path."""
from __future__ import annotations

import pytest
import torch

from fsosr import backends, testing
from fsosr.ops import topk_route

DEVICE = testing.device_under_test()
NATIVE = testing.backends_under_test(DEVICE)
FIELDS = ("indices", "gates", "counts", "order", "offsets", "importance", "load")
GATES, IMPORTANCE, LOAD = 1, 5, 6


def make_inputs(n, e, *, noisy, dtype=torch.float32, device=DEVICE, seed=0, ties=True):
    """Random logits (with a tied row and a row of repeated values when ties=True), and noise/noise_std."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g, dtype=torch.float64)
    if ties and n > 1:
        logits[0] = 0.0                                   # all experts tie: the lowest k indices must win
        logits[-1] = torch.arange(e, dtype=torch.float64) // 3 * 0.5   # runs of three equal values
    noise = noise_std = None
    if noisy:
        noise = torch.randn(n, e, generator=g, dtype=torch.float64)
        noise_std = torch.rand(n, e, generator=g, dtype=torch.float64) + 0.1
        if ties and n > 1:
            noise[0] = 0.0  # keep the all-zero row tied under noise
    cast = lambda t: None if t is None else t.to(device, dtype).requires_grad_(t is not noise)  # noqa: E731
    return cast(logits), cast(noise), cast(noise_std)


def route_fn(k, renormalize):
    def fn(logits, noise, noise_std, backend):
        return tuple(topk_route(logits, k, renormalize=renormalize, noise=noise, noise_std=noise_std,
                                backend=backend))
    return fn


def k_values(e):
    return sorted({k for k in (1, 2, 5, e) if k <= e})


CASES = [(n, e, k) for n in (1, 7, 197, 1000) for e in (1, 2, 7, 8, 22, 64) for k in k_values(e)]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax_all"])
@pytest.mark.parametrize("n,e,k", CASES)
def test_matches_reference(backend, n, e, k, renormalize, noisy):
    inputs = make_inputs(n, e, noisy=noisy, seed=n * 1000 + e * 10 + k)
    grad_outputs = [GATES, IMPORTANCE] + ([LOAD] if noisy else [])
    outputs, _ = testing.compare_with_reference(route_fn(k, renormalize), inputs, backend=backend,
                                                grad_outputs=grad_outputs, names=FIELDS)
    check_invariants(outputs, n, e, k)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
def test_matches_reference_with_more_row_blocks_than_one_reduction_tile(backend, noisy):
    # 4500 rows of 3 experts: 71 blocks of 64 rows, so the Triton forward's reduction over per-block partials
    # (64 blocks per tile) takes two tiles and carries its prefix sums across them.
    inputs = make_inputs(4500, 3, noisy=noisy, seed=45)
    grad_outputs = [GATES, IMPORTANCE] + ([LOAD] if noisy else [])
    outputs, _ = testing.compare_with_reference(route_fn(2, True), inputs, backend=backend,
                                                grad_outputs=grad_outputs, names=FIELDS)
    check_invariants(outputs, 4500, 3, 2)


def check_invariants(outputs, n, e, k):
    indices, gates, counts, order, offsets, importance, load = outputs
    assert indices.dtype == counts.dtype == order.dtype == offsets.dtype == torch.int32
    flat = indices.reshape(-1).long()
    assert ((flat >= 0) & (flat < e)).all()
    assert torch.equal(order.long().sort().values, torch.arange(n * k, device=order.device))  # a permutation
    assert int(counts.sum()) == n * k
    assert torch.equal(offsets.long(), torch.cat([offsets.new_zeros(1).long(), counts.long().cumsum(0)]))
    routed = flat[order.long()]
    assert bool((routed[1:] >= routed[:-1]).all()), "order is not grouped by expert"
    same = routed[1:] == routed[:-1]
    assert bool((order[1:][same] > order[:-1][same]).all()), "order is not stable within an expert"
    if n > 1 and k > 1:  # no expert twice in one row
        assert bool((indices.sort(dim=1).values.diff(dim=1) != 0).all())


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
def test_low_and_double_precision(backend, dtype, noisy):
    if dtype == torch.float64 and backend != "cpu":
        with pytest.raises(TypeError, match="fp64"):
            topk_route(torch.zeros(3, 4, dtype=dtype, device=DEVICE), 2, backend=backend)
        return
    inputs = make_inputs(197, 22, noisy=noisy, dtype=dtype, seed=5)
    outputs, _ = testing.compare_with_reference(route_fn(2, True), inputs, backend=backend,
                                                grad_outputs=[GATES, IMPORTANCE] + ([LOAD] if noisy else []),
                                                names=FIELDS)
    expected_gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert outputs[GATES].dtype == outputs[IMPORTANCE].dtype == outputs[LOAD].dtype == expected_gate_dtype


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
@pytest.mark.parametrize("k", [1, 2, 22])
def test_all_tied_logits_pick_lowest_indices(backend, k):
    # MoE-Adapters4CL zero-initialises its router, so at step 0 every logit ties.
    logits = torch.zeros(5, 22, device=DEVICE)
    logits[1] = -0.0  # -0.0 ties with +0.0
    for renormalize, gate in ((True, 1.0 / k), (False, 1.0 / 22)):
        r = topk_route(logits, k, renormalize=renormalize, backend=backend)
        assert torch.equal(r.indices.cpu(), torch.arange(k, dtype=torch.int32).expand(5, k))
        torch.testing.assert_close(r.gates.cpu(), torch.full((5, k), gate))
        assert torch.equal(r.counts.cpu(), (torch.arange(22) < k).int() * 5)


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_minus_inf_and_nan_policy(backend):
    logits = torch.tensor([[0.5, -float("inf"), 1.0, -float("inf")],
                           [-float("inf"), -float("inf"), 2.0, -float("inf")]], device=DEVICE)
    r = topk_route(logits, 2, backend=backend)
    assert r.indices.tolist() == [[2, 0], [2, 0]]  # among tied -inf the lower index wins
    torch.testing.assert_close(r.gates[1].cpu(), torch.tensor([1.0, 0.0]))
    bad = logits.clone()
    bad[0, 3] = float("nan")
    # The check is on by default for CPU tensors; CUDA tensors ask for it (it would synchronise).
    check = {} if DEVICE.type == "cpu" else {"check_finite": True}
    with pytest.raises(ValueError, match="logits contain NaN"):
        topk_route(bad, 2, backend=backend, **check)
    with pytest.raises(ValueError, match="logits contain NaN"):
        topk_route(torch.tensor([[float("inf"), 0.0]], device=DEVICE), 1, backend=backend, **check)
    with pytest.raises(ValueError, match="noise_std"):
        topk_route(logits, 2, noise_std=-1.0, seed=0, backend=backend, **check)
    with pytest.raises(ValueError, match="noise_std"):
        topk_route(logits, 2, noise_std=0.0, seed=0, backend=backend, **check)


# Triton's interpreter evaluates both sides of tl.where with numpy, whose inf - inf and 0 * inf in the discarded
# branch warn; compiled kernels select without evaluating exceptions.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
@pytest.mark.parametrize("disabled", [1, 3], ids=["one_disabled", "threshold_disabled"])
def test_noisy_load_with_disabled_experts(backend, disabled):
    # Disabled experts (-inf logits) under noisy gating: their smooth-load terms are 0 and give no gradient; with
    # 3 of 5 disabled and k = 2, the (k+1)-th noisy logit (the threshold) is -inf too, so the live experts' load
    # terms are 1 with no gradient. (Found broken: NaN or inf noise_std gradients, and a NaN load when both are -inf.)
    logits, noise, noise_std = make_inputs(6, 5, noisy=True, seed=11, ties=False)
    with torch.no_grad():
        logits[:, :disabled] = float("-inf")
    fn = route_fn(2, True)
    outputs, grads = testing.compare_with_reference(fn, (logits, noise, noise_std), backend=backend,
                                                    grad_outputs=[GATES, IMPORTANCE, LOAD], names=FIELDS)
    load, grad_std = outputs[LOAD].cpu(), grads[1].cpu()     # grads: logits, noise_std
    assert torch.isfinite(load).all() and torch.isfinite(grad_std).all() and torch.isfinite(grads[0]).all()
    assert torch.all(load[:disabled] == 0) and torch.all(grad_std[:, :disabled] == 0)
    if disabled == 3:
        assert torch.all(load[3:] == 6)     # the live experts' noise_std still gets gradient through the gates


@pytest.mark.parametrize("backend", [b for b in NATIVE if b != "cpu"])
def test_unchecked_nan_ranks_first(backend):
    # Where the check is off (as on CUDA by default), NaN ranks first and poisons the gates of its row only.
    logits = torch.tensor([[0.0, float("nan"), 3.0], [1.0, 2.0, 3.0]], device=DEVICE)
    r = topk_route(logits, 2, backend=backend, check_finite=False)
    expected = topk_route(logits.cpu(), 2, backend="reference", check_finite=False)
    assert torch.equal(r.indices.cpu(), expected.indices) and r.indices[0].tolist() == [1, 2]
    assert r.gates[0].isnan().all() and not r.gates[1].isnan().any()


@pytest.mark.parametrize("backend", NATIVE)
def test_bitwise_deterministic(backend):
    inputs = make_inputs(1000, 22, noisy=True, seed=11)
    testing.assert_bitwise_deterministic(route_fn(2, True), inputs, backend=backend,
                                         grad_outputs=[GATES, IMPORTANCE, LOAD])


@pytest.mark.skipif("cpu" not in NATIVE, reason="cpu backend not built")
def test_cpu_result_independent_of_thread_count():
    inputs = make_inputs(5000, 22, noisy=True, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_route(inputs[0], 2, noise=inputs[1], noise_std=inputs[2], backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = topk_route(inputs[0], 2, noise=inputs[1], noise_std=inputs[2], backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in NATIVE, reason="cpu backend not built")
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [2, 7])
def test_gradcheck_fp64(renormalize, k):
    logits, noise, noise_std = make_inputs(6, 7, noisy=True, dtype=torch.float64, seed=3, ties=False)

    def fn(logits, noise_std):
        r = topk_route(logits, k, renormalize=renormalize, noise=noise, noise_std=noise_std, backend="cpu")
        return r.gates, r.importance, r.load

    assert torch.autograd.gradcheck(fn, (logits, noise_std))
    assert torch.autograd.gradcheck(lambda x: topk_route(x, k, renormalize=renormalize, backend="cpu").gates,
                                    (logits,))


def _op_pairs():
    pairs = []
    if "cpu" in NATIVE or "cuda" in NATIVE:
        pairs.append((torch.ops.fsosr.topk_route_fwd.default, torch.ops.fsosr.topk_route_bwd.default))
    if "triton" in NATIVE:
        pairs.append((torch.ops.fsosr.topk_route_fwd_triton.default, torch.ops.fsosr.topk_route_bwd_triton.default))
    return pairs


@pytest.mark.parametrize("ops", _op_pairs(), ids=lambda p: p[0].name())
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
def test_opcheck(ops, noisy):
    forward, backward = ops
    logits, noise, noise_std = make_inputs(9, 7, noisy=noisy, seed=4)
    if noise is not None:
        noise = noise.detach()
    torch.library.opcheck(forward, (logits, 2, True, noise, noise_std))
    outs = forward(logits.detach(), 2, True, noise, None if noise_std is None else noise_std.detach())
    grads = (torch.randn(9, 2, device=DEVICE), torch.randn(7, device=DEVICE), torch.randn(7, device=DEVICE))
    torch.library.opcheck(backward, (*grads, logits.detach(), noise,
                                     None if noise_std is None else noise_std.detach(), outs[3], outs[0], outs[7],
                                     True))


@pytest.mark.parametrize("backend", NATIVE)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    logits, noise, noise_std = make_inputs(33, 22, noisy=True, seed=8)

    def step(logits, noise_std):
        r = topk_route(logits, 2, noise=noise, noise_std=noise_std, backend=backend)
        return (r.gates.sum(dim=1) * 2).sum() + r.importance.pow(2).sum() + r.load.sum(), r.indices, r.order

    compiled = torch.compile(step, fullgraph=True)
    eager_loss, eager_idx, eager_order = step(logits, noise_std)
    eager_grads = torch.autograd.grad(eager_loss, (logits, noise_std))
    loss, idx, order = compiled(logits, noise_std)
    grads = torch.autograd.grad(loss, (logits, noise_std))
    assert torch.equal(idx, eager_idx) and torch.equal(order, eager_order)
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)


@pytest.mark.skipif("cpu" not in NATIVE, reason="cpu backend not built")
def test_million_units():
    logits = torch.randn(1_000_000, 22, generator=torch.Generator().manual_seed(0))
    r = topk_route(logits, 2, backend="cpu")
    check_invariants(r, 1_000_000, 22, 2)
    ref = topk_route(logits.double(), 2, backend="reference")
    assert torch.equal(r.indices, ref.indices) and torch.equal(r.order, ref.order)
    # Block-wise fp32 sums over 10^6 units stay close to the exact fp64 sum.
    torch.testing.assert_close(r.importance.double(), ref.importance, rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_errors_name_the_argument(backend):
    x = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="k must be"):
        topk_route(x, 0, backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        topk_route(x, 7, backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        topk_route(x, 2.0, backend=backend)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_route(x[0], 1, backend=backend)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_route(x[None], 1, backend=backend)
    with pytest.raises(TypeError, match="logits must be fp32"):
        topk_route(torch.ones(4, 6, dtype=torch.int64, device=DEVICE), 1, backend=backend)
    with pytest.raises(TypeError, match="logits must be a tensor"):
        topk_route([[1.0, 2.0]], 1, backend=backend)
    with pytest.raises(ValueError, match="noise was given without noise_std"):
        topk_route(x, 2, noise=torch.randn_like(x), backend=backend)
    with pytest.raises(ValueError, match="seed was given without noise_std"):
        topk_route(x, 2, seed=3, backend=backend)
    with pytest.raises(ValueError, match="either noise or seed"):
        topk_route(x, 2, noise=torch.randn_like(x), noise_std=1.0, seed=1, backend=backend)
    with pytest.raises(ValueError, match="noise_std of shape"):
        topk_route(x, 2, noise_std=torch.ones(3, device=DEVICE), seed=0, backend=backend)
    with pytest.raises(ValueError, match="noise_std is on meta"):
        topk_route(x, 2, noise_std=torch.ones(4, 6, device="meta"), seed=0, backend=backend)
    with pytest.raises(TypeError, match="noise_std must be floating"):
        topk_route(x, 2, noise_std=torch.ones(4, 6, dtype=torch.int32, device=DEVICE), seed=0, backend=backend)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        topk_route(x, 2, renormalize=1, backend=backend)
    with pytest.raises(ValueError, match="at least one expert"):
        topk_route(torch.zeros(3, 0, device=DEVICE), 1, backend=backend)


def test_backend_errors_say_why():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        topk_route(x, 2, backend="gpu")
    with pytest.raises(backends.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        topk_route(x, 2, backend="cuda")


@pytest.mark.skipif("cpu" not in NATIVE, reason="cpu backend not built")
def test_cpu_kernel_validates_direct_calls():
    # The C++ op checks its own inputs too (for users calling torch.ops.fsosr directly).
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.fsosr.topk_route_fwd(x, 9, True, None, None)
    with pytest.raises(RuntimeError, match="noise and noise_std must be given together"):
        torch.ops.fsosr.topk_route_fwd(x, 2, True, torch.randn(4, 6), None)
    with pytest.raises(RuntimeError, match="must match logits"):
        torch.ops.fsosr.topk_route_fwd(x, 2, True, torch.randn(4, 6), torch.ones(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="logits contain NaN"):
        torch.ops.fsosr.topk_route_fwd(torch.full((2, 3), float("nan")), 1, True, None, None)


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_zero_units(backend):
    r = topk_route(torch.zeros(0, 5, device=DEVICE), 2, backend=backend)
    assert r.indices.shape == (0, 2) and r.order.shape == (0,) and r.offsets.tolist() == [0] * 6
    assert r.counts.tolist() == [0] * 5 and r.importance.tolist() == [0.0] * 5


def test_non_contiguous_inputs_are_accepted():
    base = torch.randn(22, 40)
    logits = base.t()  # [40, 22], not contiguous
    std = (torch.rand(22, 40) + 0.1).t()
    for backend in ["reference"] + testing.backends_under_test(torch.device("cpu")):
        r = topk_route(logits, 2, noise_std=std, seed=1, backend=backend)
        ref = topk_route(logits.contiguous(), 2, noise_std=std.contiguous(), seed=1, backend="reference")
        assert torch.equal(r.indices.cpu(), ref.indices)
        torch.testing.assert_close(r.load.cpu(), ref.load)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,e,k", [(1, 22, 2), (197, 22, 2), (1000, 64, 5), (50_000, 8, 2), (4096, 22, 22)])
def test_gpu_matches_reference(backend, dtype, n, e, k):
    inputs = make_inputs(n, e, noisy=True, dtype=dtype, device=torch.device("cuda"), seed=n + e)
    outputs, _ = testing.compare_with_reference(route_fn(k, True), inputs, backend=backend,
                                                grad_outputs=[GATES, IMPORTANCE, LOAD], names=FIELDS)
    check_invariants(outputs, n, e, k)
    testing.assert_bitwise_deterministic(route_fn(k, True), inputs, backend=backend,
                                         grad_outputs=[GATES, IMPORTANCE, LOAD])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_and_replay(backend):
    device = torch.device("cuda")
    logits = torch.randn(4096, 22, device=device)
    std = torch.rand(4096, 22, device=device) + 0.1
    noise = torch.randn(4096, 22, device=device)
    run = lambda: topk_route(logits, 2, noise=noise, noise_std=std, backend=backend, check_finite=False)  # noqa
    graph, captured = testing.capture_cuda_graph(run)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    expected = run()
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)
