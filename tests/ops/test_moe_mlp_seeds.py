"""Seeds of moe_mlp's dropout (and of topk_route's noise) as ints and as 0-d tensors: a tensor draws the same mask
as its value on every backend, torch.compile takes a seed that changes every step, and (GPU) a CUDA graph whose
seed tensor is advanced between replays draws a fresh mask in every replay."""
from __future__ import annotations

import pytest
import torch

from fsosr import backends, testing
from fsosr.nn import MoEAdapter
from fsosr.ops import moe_mlp, moe_mlp_per_expert_input, normal_from_seed, topk_route
from fsosr.ops._rng import _seed_key, seed_key_tensor, uniform_from_seed

CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "cpu", "triton") if backends.why_unavailable(b, CPU) is None]
SEEDS = [0, 7, -3, 2**62 + 5, -(2**63)]


def inputs(group_size=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * group_size, 16, generator=g).to(device).requires_grad_()
    routing = topk_route(torch.randn(3, 6, generator=g).to(device), 2, backend="reference")
    weights = [w.detach().float().to(device).requires_grad_() for w in testing.random_experts(6, 16, 8, 16, seed)]
    return x, routing, weights


def run(x, routing, weights, seed, backend, group_size=5, dropout=0.3):
    y = moe_mlp(x, routing, *weights, group_size=group_size, dropout=dropout, seed=seed, backend=backend)
    grads = torch.autograd.grad((y * y).sum(), (x, *weights))
    return y.detach(), grads


def assert_same(a, b):
    (ya, ga), (yb, gb) = a, b
    assert torch.equal(ya, yb)
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)


def test_key_tensor_and_seeded_draws_equal_the_int_forms():
    for seed in SEEDS:
        assert int(seed_key_tensor(torch.tensor(seed))) == _seed_key(seed) == int(seed_key_tensor(seed))
        assert torch.equal(normal_from_seed((9, 4), torch.tensor(seed)), normal_from_seed((9, 4), seed))
        counters = torch.arange(50)
        assert torch.equal(uniform_from_seed(counters, torch.tensor(seed)), uniform_from_seed(counters, seed))
    small = torch.tensor(5, dtype=torch.int32)                 # any integer dtype: its value counts
    assert torch.equal(normal_from_seed((4,), small), normal_from_seed((4,), 5))
    logits, noise_std = torch.randn(6, 5), torch.full((6, 5), 0.5)
    a = topk_route(logits, 2, noise_std=noise_std, seed=torch.tensor(11), backend="reference")
    b = topk_route(logits, 2, noise_std=noise_std, seed=11, backend="reference")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.gates, b.gates)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_tensor_seed_draws_the_int_seeds_mask(backend, seed):
    x, routing, weights = inputs()
    by_int = run(x, routing, weights, seed, backend)
    assert_same(run(x, routing, weights, torch.tensor(seed), backend), by_int)
    assert not torch.equal(run(x, routing, weights, seed + 1, backend)[0], by_int[0])     # the seed matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_input_tensor_seed(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 16, generator=g)
    routing = topk_route(torch.randn(4, 6, generator=g), 2, backend="reference")
    weights = [w.detach().float() for w in testing.random_experts(6, 16, 8, 16, 3)]
    ys = [moe_mlp_per_expert_input(x, routing, *weights, dropout=0.4, seed=s, backend=backend)
          for s in (21, torch.tensor(21))]
    assert torch.equal(ys[0], ys[1])


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run on CPU tensors here")
def test_triton_launchers_take_the_key_by_value_or_by_pointer():
    """The kernels read a key on their device through a pointer, a key on the host (GPU tensors) by value: both
    forms give the same forward and backward (here the by-value form is forced with an int key)."""
    from fsosr._triton import moe_mlp as kernels  # noqa: PLC0415

    x, routing, weights = inputs()
    x, weights = x.detach(), [w.detach() for w in weights]
    args = (x, routing.indices, routing.gates, routing.order, routing.offsets, *weights, 5, 0, 0.1, 0.3)
    y_ptr, pre_ptr = kernels.moe_mlp_forward(*args, seed_key_tensor(9), False)
    y_val, pre_val = kernels.moe_mlp_forward(*args, _seed_key(9), False)
    assert torch.equal(y_ptr, y_val) and torch.equal(pre_ptr, pre_val)
    grad_y = torch.randn_like(y_ptr)
    backward = [kernels.moe_mlp_backward(grad_y, *args[:9], pre_ptr, *args[9:], key, False)
                for key in (seed_key_tensor(9), _seed_key(9))]
    for a, b in zip(*backward):
        assert torch.equal(a, b)


def test_bad_seeds_are_refused():
    x, routing, weights = inputs()
    for seed in (torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(True), 2.0, True):
        with pytest.raises(TypeError, match="seed must be an int, a 0-d integer tensor or None"):
            moe_mlp(x, routing, *weights, group_size=5, dropout=0.1, seed=seed, backend="reference")
    with pytest.raises(ValueError, match="put it on the CPU or on x's device"):
        moe_mlp(x, routing, *weights, group_size=5, dropout=0.1, seed=torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="seed must be an int or a 0-d integer tensor"):
        normal_from_seed((3,), torch.tensor([1]))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_cpu_op_checks_its_seed_key():
    x, routing, weights = inputs()
    args = (x.detach(), routing.indices, routing.gates, routing.order, routing.offsets, *(w.detach() for w in weights),
            5, 0, 1.0, 0.2)
    for key in (torch.tensor([1]), torch.tensor(1.0), torch.tensor(1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="seed_key must be a 0-d int64 tensor"):
            torch.ops.fsosr.moe_mlp_fwd(*args, key, False)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_compiled_step_takes_a_new_seed_every_call():
    """An int seed that changes every step (dynamo turns it into a symbolic int after one recompile) and a seed
    tensor advanced in place (no recompile): each compiled step equals the eager step with that seed."""
    x, routing, weights = inputs()

    def step(x, seed):
        return moe_mlp(x, routing, *weights, group_size=5, dropout=0.3, seed=seed, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for seed in (11, 12, 13):
        assert torch.equal(compiled(x, seed), step(x, seed))
    seed = torch.tensor(40)
    for _ in range(3):
        seed += 1
        assert torch.equal(compiled(x, seed), step(x, int(seed)))
    with pytest.raises(Exception, match="explicit seed="):   # no seed: one would be drawn inside the graph
        torch.compile(lambda x: step(x, None), fullgraph=True)(x)


def random_adapter(backend: str, device="cpu") -> MoEAdapter:
    """A training-mode MoEAdapter with every parameter random (LoRA init zeroes the up projection, and an output
    of zeros would make every comparison below pass)."""
    torch.manual_seed(0)
    layer = MoEAdapter(16, num_experts=6, k=2, bottleneck=8, num_routers=1, backend=backend).to(device).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_moe_adapter_tensor_seed_and_compiled_training_forward():
    layer = random_adapter("cpu")
    h = torch.randn(5, 3, 16)
    by_int = layer(h, seed=8)
    assert by_int.abs().max() > 0 and not torch.equal(layer(h, seed=9), by_int)
    for dtype in (torch.int64, torch.int32, torch.int16):       # noise and dropout from one seed, any integer dtype
        assert torch.equal(layer(h, seed=torch.tensor(8, dtype=dtype)), by_int)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    for seed in (3, 4, 5):
        assert torch.equal(compiled(h, seed=seed), layer(h, seed=seed))
    seed = torch.tensor(20)
    for _ in range(2):
        seed += 1
        assert torch.equal(compiled(h, seed=seed), layer(h, seed=int(seed)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_gpu_cuda_graph_replays_draw_fresh_masks_from_a_device_seed(backend, per_expert):
    """A captured step whose seed lives on the GPU: advancing it between replays gives each replay the mask of its
    seed (as the eager op draws it), where an int seed would repeat the capture's mask. (cuda with per-expert
    input at this shape, E <= 4k, takes the dense path and its one-launch Triton multipliers.)"""
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(5)
    if per_expert:
        x = torch.randn(6, 4, 16, generator=g).to(cuda)
        routing = topk_route(torch.randn(4, 6, generator=g).to(cuda), 2)
    else:
        x = torch.randn(4 * 7, 16, generator=g).to(cuda)
        routing = topk_route(torch.randn(4, 6, generator=g).to(cuda), 2)
    weights = [w.detach().float().to(cuda) for w in testing.random_experts(6, 16, 8, 16, 5)]
    seed = torch.tensor(100, device=cuda)

    def step(s):
        if per_expert:
            return moe_mlp_per_expert_input(x, routing, *weights, dropout=0.3, seed=s, backend=backend)
        return moe_mlp(x, routing, *weights, group_size=7, dropout=0.3, seed=s, backend=backend)

    graph, out = testing.capture_cuda_graph(lambda: step(seed))
    outputs = []
    for value in (101, 102, 103):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step(value))
        outputs.append(out.clone())
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


@pytest.mark.gpu
def test_gpu_capture_without_a_seed_is_refused():
    """Dropout with no seed inside a capture would draw one seed on the host and give every replay its mask."""
    cuda = torch.device("cuda")
    x, routing, weights = inputs(device=cuda)
    x, weights = x.detach(), [w.detach() for w in weights]
    with pytest.raises(ValueError, match="capturing a CUDA graph with dropout > 0 needs seed="):
        testing.capture_cuda_graph(lambda: moe_mlp(x, routing, *weights, group_size=5, dropout=0.3))


@pytest.mark.gpu
def test_gpu_moe_adapter_takes_a_host_or_device_seed_tensor():
    cuda = torch.device("cuda")
    layer = random_adapter("triton", cuda)
    h = torch.randn(5, 3, 16, device=cuda)
    by_int = layer(h, seed=8)
    for seed in (torch.tensor(8), torch.tensor(8, device=cuda), torch.tensor(8, dtype=torch.int32, device=cuda)):
        assert torch.equal(layer(h, seed=seed), by_int)
