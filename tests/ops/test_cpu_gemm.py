"""fsosr::_cpu_gemm: the cpu backend's GEMM engine (csrc/cpu/gemm.cpp) on its own, against fp64 matmul, over the
shapes that reach each part of its block decomposition (rows of 128 once M > 256, B column panels of <= 128k
values, K chunks of 256), with oneDNN's brgemm and with ATen's BLAS fallback, strided operands, thread counts."""
import pytest
import torch

from fsosr import _extension
from fsosr.ops._cpu_gemm import cpu_gemm

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="native extension not built")

SHAPES = [  # (M, N, K): what they reach
    (1, 1, 1), (7, 13, 5), (0, 5, 3), (4, 0, 3),          # tiny and empty
    (3, 4, 0),                                             # K = 0: C = 0 (or c unchanged)
    (257, 64, 768),                                        # M > 256: row blocks 128 + 128 + 1; K chunks 256 x 3
    (64, 768, 300),                                        # K * N > 128k: column panels (432 + 336); K tail 44
    (197, 1536, 15), (33, 97, 513),                        # odd N / K tails
]


def operands(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in ((m, k), (k, n), (m, n))]


@pytest.mark.parametrize("mkldnn", [True, False], ids=["brgemm", "blas_fallback"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_fp64_matmul(monkeypatch, m, n, k, mkldnn):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn)
    a, b, c = operands(m, n, k, torch.float32)
    expected = a.double() @ b.double()
    tol = dict(atol=1e-4 * max(k, 1) ** 0.5, rtol=1e-5)
    torch.testing.assert_close(cpu_gemm(a, b).double(), expected, **tol)
    out = cpu_gemm(a, b, c)
    torch.testing.assert_close(out.double(), c.double() + expected, **tol)
    assert c.numel() == 0 or out.data_ptr() != c.data_ptr()   # c is not modified
    a64, b64, c64 = operands(m, n, k, torch.float64)
    torch.testing.assert_close(cpu_gemm(a64, b64, c64), c64 + a64 @ b64, atol=1e-12, rtol=1e-12)


def test_padded_rows_and_strided_columns():
    # Row-major with a leading dimension beyond the columns (brgemm's lda/ldb/ldc), and column-strided operands,
    # which go to at::mm.
    a, b, c = operands(300, 200, 150, torch.float32, seed=1)
    expected = a.double() @ b.double()

    def padded(t):
        out = torch.full((t.shape[0], t.shape[1] + 7), float("nan"))[:, :t.shape[1]]
        return out.copy_(t)

    def column_strided(t):
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=2).reshape(t.shape[0], -1)[:, ::2]

    for x, y in [(padded(a), padded(b)), (column_strided(a), b), (a, column_strided(b)), (a.t().contiguous().t(), b)]:
        assert not (x.is_contiguous() and y.is_contiguous())
        torch.testing.assert_close(cpu_gemm(x, y).double(), expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(cpu_gemm(a, b, padded(c)).double(), c.double() + expected, atol=1e-3, rtol=1e-5)


def test_blocks_do_not_depend_on_the_thread_count():
    a, b, c = operands(700, 1000, 600, torch.float32, seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(cpu_gemm(a, b, c))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_bad_input_is_a_value_error():
    a, b, c = operands(4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
        cpu_gemm(a, a)
    with pytest.raises(ValueError, match="must both be float32 or both float64"):
        cpu_gemm(a, b.double())
    with pytest.raises(ValueError, match="must both be float32 or both float64"):
        cpu_gemm(a.half(), b.half())
    with pytest.raises(ValueError, match="c must be"):
        cpu_gemm(a, b, c.t())


def test_opcheck_and_compile():
    a, b, c = operands(33, 20, 17, torch.float32)
    torch.library.opcheck(torch.ops.fsosr._cpu_gemm.default, (a, b, c))
    torch.library.opcheck(torch.ops.fsosr._cpu_gemm.default, (a, b, None))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: cpu_gemm(a, b, c) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(a, b, c), cpu_gemm(a, b, c) * 2)
