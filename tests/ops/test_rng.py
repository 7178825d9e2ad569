"""Seeded normal draws (``fsosr.ops.normal_from_seed``) and seeded routing noise."""
import pytest
import torch

from fsosr.ops import normal_from_seed, topk_route


def test_same_seed_is_bitwise_equal():
    a = normal_from_seed((64, 33), 123)
    b = normal_from_seed((64, 33), 123)
    assert torch.equal(a, b)


def test_different_seeds_differ():
    draws = [normal_from_seed((256,), seed) for seed in (0, 1, 2, 7, 8)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            # Independent streams: essentially no element coincides.
            assert (draws[i] == draws[j]).sum() <= 1, (i, j)


def test_shape_and_dtype():
    x = normal_from_seed((3, 4, 5), 1)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32 and x.device.type == "cpu"
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        y = normal_from_seed((7, 2), 1, "cpu", dtype)
        assert y.shape == (7, 2) and y.dtype == dtype
    # The values are computed in fp64 and rounded once: every dtype rounds the same draws.
    ref = normal_from_seed((7, 2), 1, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(normal_from_seed((7, 2), 1, dtype=dtype), ref.to(dtype))
    assert normal_from_seed((0, 5), 1).shape == (0, 5)
    assert normal_from_seed((), 1).shape == ()


def test_element_depends_only_on_its_index():
    long = normal_from_seed((1000,), 42)
    assert torch.equal(long[:100], normal_from_seed((100,), 42))
    assert torch.equal(long.reshape(10, 100), normal_from_seed((10, 100), 42))
    assert torch.equal(long[:60].reshape(3, 4, 5), normal_from_seed((3, 4, 5), 42))


def test_statistics_are_standard_normal():
    x = normal_from_seed((200_000,), 2024, dtype=torch.float64)
    mean = x.mean()
    std = x.std()
    kurtosis = (((x - mean) / std) ** 4).mean()
    skew = (((x - mean) / std) ** 3).mean()
    assert abs(float(mean)) < 0.01
    assert abs(float(std) - 1.0) < 0.01
    assert abs(float(kurtosis) - 3.0) < 0.05
    assert abs(float(skew)) < 0.05
    # Tail mass: P(|z| > 2) = 0.0455 for a standard normal (binomial sd ~ 0.0005 here).
    assert abs(float((x.abs() > 2).double().mean()) - 0.0455) < 0.003


def test_finite():
    x = normal_from_seed((100_000,), 5)
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("seed", [2**40, -5, 2**63 - 1, -(2**63)])
def test_large_and_negative_seeds(seed):
    x = normal_from_seed((1000,), seed)
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x, normal_from_seed((1000,), seed))
    assert not torch.equal(x, normal_from_seed((1000,), 0))
    assert 0.8 < float(x.std()) < 1.2


def test_large_seeds_give_distinct_streams():
    a, b, c = (normal_from_seed((500,), s) for s in (2**40, -5, 5))
    assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(a, c)


@pytest.mark.parametrize("seed", [1.5, 7.0, "7", True, None, torch.tensor(7.0), torch.tensor([7]), torch.tensor(True)])
def test_rejects_non_int_seeds(seed):   # a 0-d integer tensor is a seed (tests/ops/test_moe_mlp_seeds.py)
    with pytest.raises(TypeError, match="seed must be an int or a 0-d integer tensor"):
        normal_from_seed((4,), seed)


def _seeded_inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 8, generator=gen)
    noise_std = torch.rand(16, 8, generator=gen) + 0.5
    return logits, noise_std


def test_seeded_routing_is_the_same_on_reference_and_cpu():
    logits, noise_std = _seeded_inputs()
    ref = topk_route(logits, 3, noise_std=noise_std, seed=7, backend="reference")
    cpu = topk_route(logits, 3, noise_std=noise_std, seed=7, backend="cpu")
    for name in ("indices", "counts", "order", "offsets"):
        assert torch.equal(getattr(ref, name), getattr(cpu, name)), name
    for name in ("gates", "importance", "load"):
        torch.testing.assert_close(getattr(cpu, name), getattr(ref, name), atol=1e-6, rtol=1e-6, msg=name)
    # The noise matters: clean routing differs from this one.
    clean = topk_route(logits, 3, backend="reference")
    assert not torch.equal(clean.indices, ref.indices)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_seed_equals_explicit_noise(backend):
    logits, noise_std = _seeded_inputs()
    seeded = topk_route(logits, 3, noise_std=noise_std, seed=7, backend=backend)
    explicit = topk_route(logits, 3, noise_std=noise_std, noise=normal_from_seed((16, 8), 7), backend=backend)
    for name, a, b in zip(seeded._fields, seeded, explicit):
        assert torch.equal(a, b), name
    other = topk_route(logits, 3, noise_std=noise_std, seed=8, backend=backend)
    assert not torch.equal(other.gates, seeded.gates)


def _seeded_route(logits, noise_std):
    r = topk_route(logits, 2, noise_std=noise_std, seed=7, backend="cpu")
    return r.indices, r.gates, r.counts, r.importance, r.load


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_seeded_routing_under_torch_compile_matches_eager(compile_backend, fresh_dynamo):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=gen)
    noise_std = torch.full((6, 5), 0.7)
    eager = _seeded_route(logits, noise_std)
    compiled = torch.compile(_seeded_route, fullgraph=True, backend=compile_backend)(logits, noise_std)
    names = ("indices", "gates", "counts", "importance", "load")
    for name, a, b in zip(names, compiled, eager):
        if b.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name
