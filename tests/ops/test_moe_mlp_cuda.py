"""fsosr.ops.moe_mlp, cuda backend (csrc/cuda/moe_mlp_*): forward and every gradient against the fp64 reference,
edge-case routings, dropout masks equal to the cpu backend's, bitwise determinism, FSMoE's per-expert form,
CUDA-graph capture of forward + backward, opcheck. Every test needs a GPU (``@pytest.mark.gpu``).

The routing is computed once by the reference on CPU; its gates are then a leaf tensor (fp32) so that grad_gates
is compared too, and the same indices/order/offsets are used on both sides.
"""
from __future__ import annotations

import pytest
import torch

from fsosr import testing
from fsosr.ops import moe_mlp, moe_mlp_per_expert_input, topk_route
from fsosr.ops._rng import seed_key_tensor
from fsosr.ops.topk_route import Routing

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SCALE, SEED = 0.1, 5
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
NAMES = ["y"]

# (E, k, d, h, G, N): a sample of the grid (every value of each axis appears) plus hidden widths above
# the kernel's 128-column on-chip chunk (several chunks, fp32 partials read back), for k = 1 and k = 2.
CASES = [
    (1, 1, 64, 16, 1, 1), (1, 1, 97, 128, 197, 3), (2, 2, 97, 47, 1, 3), (2, 1, 768, 64, 197, 1),
    (7, 1, 64, 64, 197, 3), (7, 2, 97, 128, 1, 64), (7, 2, 768, 16, 1, 64), (22, 2, 768, 64, 197, 3),
    (22, 1, 97, 16, 197, 1), (22, 2, 64, 47, 1, 64), (22, 2, 768, 128, 1, 64), (2, 2, 64, 200, 5, 3),
    (3, 1, 97, 200, 5, 3),
]


def make_routing(logits: torch.Tensor, k: int) -> Routing:
    """Reference routing (fp64 logits) with fp32 gates, on the CPU."""
    routing = topk_route(logits.double(), k, backend="reference")
    return routing._replace(gates=routing.gates.detach().float())


def make_fn(routing: Routing, *, group_size=1, activation="relu", dropout=0.0, per_expert=False):
    """fn(x, gates, w1, b1, w2, b2, backend) -> (y,), with the routing's integer metadata fixed."""
    def fn(x, gates, w1, b1, w2, b2, backend):
        r = Routing(*(t.detach().to(x.device) for t in routing))._replace(gates=gates)
        if per_expert:
            y = moe_mlp_per_expert_input(x, r, w1, b1, w2, b2, activation=activation, scale=SCALE,
                                         dropout=dropout, seed=SEED, backend=backend)
        else:
            y = moe_mlp(x, r, w1, b1, w2, b2, group_size=group_size, activation=activation, scale=SCALE,
                        dropout=dropout, seed=SEED, backend=backend)
        return (y,)
    return fn


def make_inputs(routing, e, d, h, g, n, dtype, *, d_out=None, per_expert=False, seed=0):
    """[x, gates, w1, b1, w2, b2] on the GPU, all requiring grad; weights ~ 1/sqrt(fan-in) so values stay O(1)."""
    d_out = d if d_out is None else d_out
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*((e, n, d) if per_expert else (n * g, d)), generator=gen)
    weights = [torch.randn(*s, generator=gen) / max(1, s[-2 if len(s) == 3 else -1]) ** 0.5
               for s in [(e, d, h), (e, h), (e, h, d_out), (e, d_out)]]
    gates = routing.gates.to(CUDA).requires_grad_()
    cast = lambda t: t.to(CUDA, dtype).requires_grad_()  # noqa: E731
    return [cast(x), gates] + [cast(w) for w in weights]


def check(fn, inputs, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    testing.compare_with_reference(fn, inputs, backend="cuda", grad_outputs=[0], names=NAMES, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("e,k,d,h,g,n", CASES)
def test_cuda_matches_reference_fp32(e, k, d, h, g, n, dropout):
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(e * 1000 + h)), k)
    check(make_fn(routing, group_size=g, dropout=dropout), make_inputs(routing, e, d, h, g, n, torch.float32,
                                                                      seed=d + h))


@pytest.mark.parametrize("activation", ["relu", "gelu", "quick_gelu", "identity"])
@pytest.mark.parametrize("e,k,d,h,g,n", [(7, 2, 97, 47, 197, 3), (22, 2, 64, 200, 1, 64)])
def test_cuda_activations(e, k, d, h, g, n, activation):
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(3)), k)
    fn = make_fn(routing, group_size=g, activation=activation, dropout=0.2)
    check(fn, make_inputs(routing, e, d, h, g, n, torch.float32, d_out=61, seed=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("e,k,d,h,g,n", [(22, 2, 768, 64, 197, 3), (7, 2, 97, 47, 1, 64), (2, 1, 64, 200, 5, 3)])
def test_cuda_low_precision(e, k, d, h, g, n, dtype):
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(9)), k)
    fn = make_fn(routing, group_size=g, activation="gelu", dropout=0.1)
    check(fn, make_inputs(routing, e, d, h, g, n, dtype, seed=9), dtype)


def edge_logits(kind: str, n: int, e: int) -> tuple[torch.Tensor, int]:
    """(logits, k) of an edge-case routing."""
    gen = torch.Generator().manual_seed(4)
    if kind == "one_expert":          # every unit's top-1 is expert e-1, the second pick is expert 0: the rest empty
        logits = torch.zeros(n, e)
        logits[:, e - 1], logits[:, 0] = 5.0, 1.0
        return logits, 2
    if kind == "ties":                # all equal: ties break to the lower index, gates all 1/k
        return torch.zeros(n, e), 2
    if kind == "k_equals_E":
        return torch.randn(n, e, generator=gen), e
    if kind == "empty_experts":       # only experts 0..2 of e are ever picked
        logits = torch.full((n, e), -30.0)
        logits[:, :3] = torch.randn(n, 3, generator=gen)
        return logits, 2
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["one_expert", "ties", "k_equals_E", "empty_experts"])
@pytest.mark.parametrize("g,n", [(1, 64), (197, 3)])
def test_cuda_edge_routings(kind, g, n):
    e = 5 if kind == "k_equals_E" else 7
    logits, k = edge_logits(kind, n, e)
    routing = make_routing(logits, k)
    check(make_fn(routing, group_size=g, dropout=0.1), make_inputs(routing, e, 97, 47, g, n, torch.float32, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 5])
def test_cuda_fsmoe_per_expert_input(dtype, k, monkeypatch):
    # FSMoE: B = 32 images, E = 11 layer experts 768 -> 1536 -> 512 (12 hidden chunks), top-5. The kernels: at
    # k = 5 the cuda backend would take its dense-masked path (tests/ops/test_moe_mlp.py covers that).
    monkeypatch.setenv("FSOSR_MOE_MLP_PATH", "routed")
    e, b, d, h, d_out = 11, 32, 768, 1536, 512
    routing = make_routing(torch.randn(b, e, generator=torch.Generator().manual_seed(2)), k)
    fn = make_fn(routing, per_expert=True, dropout=0.1)
    check(fn, make_inputs(routing, e, d, h, 1, b, dtype, d_out=d_out, per_expert=True, seed=2), dtype)


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per_expert"])
@pytest.mark.parametrize("g", [1, 17])
def test_cuda_dropout_mask_and_hidden_pre_match_cpu(per_expert, g):
    # A single differing mask element moves y by about |w2 row| / (1-p): far beyond the tolerance.
    e, n, d, h, k, p = 6, 8, 40, 96, 2, 0.5
    g = 1 if per_expert else g
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(6)), k)
    x, _, w1, b1, w2, b2 = make_inputs(routing, e, d, h, g, n, torch.float32, per_expert=per_expert, seed=6)
    args = lambda dev: (x.detach().to(dev), routing.indices.to(dev), routing.gates.to(dev),  # noqa: E731
                        routing.order.to(dev), routing.offsets.to(dev), *(t.detach().to(dev) for t in (w1, b1, w2, b2)),
                        g, 0, SCALE, p, seed_key_tensor(SEED), per_expert)
    y_cuda, pre_cuda = torch.ops.fsosr.moe_mlp_fwd(*args(CUDA))
    y_cpu, pre_cpu = torch.ops.fsosr.moe_mlp_fwd(*args("cpu"))
    torch.testing.assert_close(pre_cuda.cpu(), pre_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    again, _ = torch.ops.fsosr.moe_mlp_fwd(*args(CUDA))
    assert torch.equal(again, y_cuda)                                    # reproducible from the seed
    other = args(CUDA)[:-2] + (seed_key_tensor(SEED + 1), per_expert)
    assert not torch.allclose(torch.ops.fsosr.moe_mlp_fwd(*other)[0], y_cuda)  # and the seed matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("e,h,g,n", [(22, 64, 197, 64), (8, 64, 1, 8192), (4, 300, 5, 40)])
def test_cuda_bitwise_deterministic(e, h, g, n, dtype):
    # (22, 64, 197, 64): the MoE-Adapters GPU benchmark shape, 25k routed rows (two weight splits per expert);
    # (8, 64, 1, 8192): per-token routing, 16k rows; (4, 300, 5, 40): three hidden chunks.
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(8)), 2)
    fn = make_fn(routing, group_size=g, dropout=0.1)
    testing.assert_bitwise_deterministic(fn, make_inputs(routing, e, 768, h, g, n, dtype, seed=8), backend="cuda",
                                         grad_outputs=[0])


def test_cuda_moe_layer_forward_backward_captures_in_a_cuda_graph():
    e, k, g, n, d, h = 22, 2, 197, 8, 768, 64
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(n * g, d, generator=gen).to(CUDA).requires_grad_()
    logits = torch.randn(n, e, generator=gen).to(CUDA).requires_grad_()
    params = [(torch.randn(*s, generator=gen) * 0.05).to(CUDA).requires_grad_()
              for s in [(e, d, h), (e, h), (e, h, d), (e, d)]]
    grad_out = torch.randn(n * g, d, generator=gen).to(CUDA)

    def layer():
        routing = topk_route(logits, k, backend="cuda", check_finite=False)
        y = moe_mlp(x, routing, *params, group_size=g, scale=SCALE, dropout=0.1, seed=7, backend="cuda")
        return (y, *torch.autograd.grad(y, (x, logits, *params), grad_out))

    graph, captured = testing.capture_cuda_graph(layer)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    eager = layer()
    for c, ref in zip(captured, eager):
        assert torch.equal(c, ref)


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per_expert"])
def test_cuda_opcheck(per_expert):
    e, n, d, h, k = 5, 4, 8, 6, 2
    g = 1 if per_expert else 17
    routing = make_routing(torch.randn(n, e, generator=torch.Generator().manual_seed(2)), k)
    x, gates, w1, b1, w2, b2 = make_inputs(routing, e, d, h, g, n, torch.float32, per_expert=per_expert, seed=2)
    args = (x, routing.indices.to(CUDA), gates, routing.order.to(CUDA), routing.offsets.to(CUDA), w1, b1, w2, b2,
            g, 2, SCALE, 0.2, seed_key_tensor(3), per_expert)
    torch.library.opcheck(torch.ops.fsosr.moe_mlp_fwd.default, args)


def test_cuda_rejects_fp64_with_a_clear_error():
    routing = make_routing(torch.randn(3, 4), 2)
    x, gates, w1, b1, w2, b2 = (t.detach().double() for t in make_inputs(routing, 4, 8, 6, 2, 3, torch.float32))
    with pytest.raises(TypeError, match="fp64 runs on the reference and cpu backends only"):
        make_fn(routing, group_size=2)(x, gates.float(), w1, b1, w2, b2, backend="cuda")
    with pytest.raises(RuntimeError, match="float64 runs on the cpu and reference backends"):
        torch.ops.fsosr.moe_mlp_fwd(x, routing.indices.to(CUDA), gates.float(), routing.order.to(CUDA),
                                    routing.offsets.to(CUDA), w1, b1, w2, b2, 2, 0, 1.0, 0.0, torch.tensor(0),
                                    False)
