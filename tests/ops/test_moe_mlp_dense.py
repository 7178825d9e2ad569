"""The cuda backend's dense-masked path for FSMoE's per-expert inputs (fsosr/ops/_moe_dense.py): every expert on
every unit, zero gates off the top-k, and the [E, B, h] dropout multipliers from one Triton launch
(kernels/moe_mlp_dense.py) where Triton runs, else from torch ops. Run here on CPU tensors (Triton through its
interpreter); the GPU test runs FSMoE's shape on CUDA."""
from __future__ import annotations

import pytest
import torch

from fsosr import backends, testing
from fsosr.ops import _moe_dense, moe_mlp, moe_mlp_per_expert_input, reference, topk_route

TRITON = backends.why_unavailable("triton", torch.device("cpu")) is None
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton does not run on CPU tensors here")


def torch_multipliers(indices, num_experts, hidden, dropout, seed, dtype):
    """The multipliers written independently of both implementations: a loop over slots."""
    num_units, k = indices.shape
    keep = reference.dropout_keep_mask(seed, dropout, num_units, k, 1, hidden, indices.device)[:, :, 0]
    out = torch.zeros(num_experts, num_units, hidden, dtype=dtype)
    for j in range(k):
        out[indices[:, j].long(), torch.arange(num_units)] = keep[:, j].to(dtype) / (1.0 - dropout)
    return out


def distinct_indices(num_units, num_experts, k, seed, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=g)[:k] for _ in range(num_units)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)).to(dtype)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("n_experts,k", [(1, 1), (3, 2), (11, 5), (4, 4)])
def test_dense_per_expert_form_matches_reference(n_experts, k, activation, dropout):
    """On CPU fp64 tensors (torch multipliers): forward and every gradient equal the seeds' loop, dropout masks
    included."""
    g = torch.Generator().manual_seed(n_experts * 10 + k)
    x = torch.randn(n_experts, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(6, n_experts, generator=g, dtype=torch.float64, requires_grad=True)
    weights = testing.random_experts(n_experts, 9, 13, 5, seed=k)
    routing = topk_route(logits, k, backend="reference")
    args = (routing.indices, routing.gates, *weights, activation, 0.5, dropout, 1234)
    y = _moe_dense.moe_mlp_per_expert_input_dense(x, *args)
    expected = reference.moe_mlp_per_expert_input(x, *args)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * probe).sum(), (x, logits, *weights), retain_graph=True)
    want = torch.autograd.grad((expected * probe).sum(), (x, logits, *weights))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("num_units,num_experts,k,hidden", [(1, 1, 1, 1), (7, 11, 5, 1536), (5, 4, 4, 513),
                                                            (3, 22, 2, 64), (0, 3, 2, 8), (2, 6, 3, 0)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dropout", [0.1, 0.9999])
def test_triton_dropout_multipliers_equal_the_torch_ones_bitwise(num_units, num_experts, k, hidden, index_dtype,
                                                                  dropout):
    """One launch, the routed kernels' hash and counters: bit for bit the torch formulation (hidden widths over
    and under the kernel's 512-column block, k = E, no units, no hidden columns, p near 1 where 1/(1 - p) must
    come from the double 1 - p)."""
    indices = distinct_indices(num_units, num_experts, k, seed=hidden + k, dtype=index_dtype)
    want = torch_multipliers(indices, num_experts, hidden, dropout, 77, torch.float32)
    got = _moe_dense.expert_dropout_multipliers(indices, num_experts, hidden, dropout, 77, torch.float32,
                                                use_triton=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    by_torch = _moe_dense.expert_dropout_multipliers(indices, num_experts, hidden, dropout, 77, torch.float32,
                                                     use_triton=False)
    assert torch.equal(by_torch, want)
    if dropout == 0.1 and want.numel() > 100:     # the comparison saw kept and dropped entries
        assert (want > 0).any() and (want == 0).any()


@needs_triton
def test_triton_dropout_multipliers_op_checks_and_compiles():
    indices = distinct_indices(6, 7, 3, seed=1)
    args = (indices, 7, 40, 0.25, torch.tensor(12345))
    torch.library.opcheck(torch.ops.fsosr.expert_dropout_multipliers_triton.default, args)
    eager = _moe_dense.expert_dropout_multipliers(indices, 7, 40, 0.25, 99, torch.float32)
    compiled = torch.compile(_moe_dense.expert_dropout_multipliers, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(indices, 7, 40, 0.25, 99, torch.float32), eager)
    with pytest.raises(ValueError, match="fp32"):
        _moe_dense.expert_dropout_multipliers(indices, 7, 40, 0.25, 99, torch.float64, use_triton=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_multipliers_in_the_dense_form_match_reference(dtype):
    """fp32 accumulation where Triton runs takes the one-launch multipliers: the dense form still equals the
    seeds' loop (forward and gradients, fp32 tolerance) with FSMoE's k = 5 of E = 11."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 9, 12, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(9, 11, generator=g, requires_grad=True)
    weights = [w.detach().to(dtype).requires_grad_() for w in testing.random_experts(11, 12, 20, 7, seed=2)]
    routing = topk_route(logits, 5, backend="reference")
    args = (routing.indices, routing.gates, *weights, "gelu", 0.7, 0.2, 31)
    y = _moe_dense.moe_mlp_per_expert_input_dense(x, *args)
    expected = reference.moe_mlp_per_expert_input(x, *args)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, expected, **tol)
    probe = torch.randn(y.shape, generator=g).to(dtype)
    got = torch.autograd.grad((y * probe).sum(), (x, logits, *weights), retain_graph=True)
    want = torch.autograd.grad((expected * probe).sum(), (x, logits, *weights))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_dense_per_expert_shape_rule(monkeypatch):
    monkeypatch.delenv("FSOSR_MOE_MLP_PATH", raising=False)
    assert _moe_dense.use_dense_per_expert(11, 5) and _moe_dense.use_dense_per_expert(8, 2)
    assert not _moe_dense.use_dense_per_expert(22, 2) and not _moe_dense.use_dense_per_expert(9, 2)
    monkeypatch.setenv("FSOSR_MOE_MLP_PATH", "routed")
    assert not _moe_dense.use_dense_per_expert(11, 5)
    monkeypatch.setenv("FSOSR_MOE_MLP_PATH", "dense")
    assert _moe_dense.use_dense_per_expert(22, 2)
    for keep_rule in ("", "auto"):
        monkeypatch.setenv("FSOSR_MOE_MLP_PATH", keep_rule)
        assert _moe_dense.use_dense_per_expert(11, 5) and not _moe_dense.use_dense_per_expert(22, 2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("value", ["Dense", "routed ", "unit"])
def test_mistyped_path_variable_raises(monkeypatch, value, backend):
    """A value the C++ rule would silently ignore makes both public ops raise before any backend runs."""
    if backends.why_unavailable(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} backend not usable here")
    monkeypatch.setenv("FSOSR_MOE_MLP_PATH", value)
    routing = topk_route(torch.randn(3, 4), 2)
    w1, b1, w2, b2 = torch.randn(4, 5, 6), torch.randn(4, 6), torch.randn(4, 6, 5), torch.randn(4, 5)
    for call in (lambda: moe_mlp(torch.randn(3, 5), routing, w1, b1, w2, b2, backend=backend),
                 lambda: moe_mlp_per_expert_input(torch.randn(4, 3, 5), routing, w1, b1, w2, b2, backend=backend)):
        with pytest.raises(ValueError, match=r"FSOSR_MOE_MLP_PATH must be routed, dense or auto.*" + repr(value)):
            call()
    for good in ("routed", "dense", "auto", ""):
        monkeypatch.setenv("FSOSR_MOE_MLP_PATH", good)
        moe_mlp(torch.randn(3, 5), routing, w1, b1, w2, b2, backend=backend)
        moe_mlp_per_expert_input(torch.randn(4, 3, 5), routing, w1, b1, w2, b2, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["automatic", "routed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fsmoe_shape_runs_automatically_on_cuda(dtype, path, monkeypatch):
    """FSMoE's layer experts (B 32, E 11, k 5, 768 -> 1536 -> 512): the automatic choice on CUDA tensors is the
    cuda backend (triton cannot hold h = 1536), which takes its dense-masked path (11 <= 4 * 5); forced routed,
    the SIMT kernels. Both match the fp64 reference, forward and backward, with FSMoE's dropout 0.1 (the dense path's
    multipliers from the Triton kernel, the routed kernels' own hash)."""
    if path == "routed":
        monkeypatch.setenv("FSOSR_MOE_MLP_PATH", "routed")
    else:
        monkeypatch.delenv("FSOSR_MOE_MLP_PATH", raising=False)
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(11, 32, 768, generator=g, dtype=torch.float64)
    logits64 = torch.randn(32, 11, generator=g, dtype=torch.float64)
    weights64 = testing.random_experts(11, 768, 1536, 512, seed=5)
    probe = torch.randn(32, 512, generator=g, dtype=torch.float64)
    assert backends.resolve("moe_mlp", None, device, unsupported={"triton": "wide"}) == "cuda"

    def run(x, logits, weights, backend):
        x = x.detach().requires_grad_()
        routing = topk_route(logits, 5, backend="reference" if backend == "reference" else None)
        y = moe_mlp_per_expert_input(x, routing, *weights, dropout=0.1, seed=17, backend=backend)
        grads = torch.autograd.grad((y * probe.to(y)).sum(), (x, *weights))
        return y, grads

    rounded = lambda t: t.detach().to(dtype).double()  # noqa: E731 - the reference sees the inputs the GPU sees
    y_ref, grads_ref = run(rounded(x64), rounded(logits64), [rounded(w).requires_grad_() for w in weights64],
                           "reference")
    weights = [w.detach().to(device, dtype).requires_grad_() for w in weights64]
    y, grads = run(x64.to(device, dtype), logits64.to(device, dtype), weights, None)
    tol = dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=0, atol=1e-5)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):     # compared relative to each tensor's largest entry
        scale = want.abs().max()
        torch.testing.assert_close(got.double().cpu() / scale, want / scale, **tol)
