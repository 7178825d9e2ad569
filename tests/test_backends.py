"""Backend resolution: the ``backend=`` argument, else ``FSOSR_BACKEND``, else automatic; explicit choices that
cannot run raise :class:`BackendUnavailable` saying why."""
import pytest
import torch

from fsosr import _extension, backends
from fsosr.backends import BackendUnavailable
from fsosr.ops import topk_route

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("FSOSR_BACKEND", raising=False)


def _logits():
    return torch.tensor([[0.3, -1.0, 2.0, 0.7], [1.5, 1.4, -0.2, 0.0]])


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(BackendUnavailable, RuntimeError)


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "reference")
    assert backends.resolve("op", "cpu", CPU) == "cpu"
    monkeypatch.setenv("FSOSR_BACKEND", "cpu")
    assert backends.resolve("op", "reference", CPU) == "reference"


def test_explicit_argument_beats_an_unusable_env_backend(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "cuda")
    routing = topk_route(_logits(), 2, backend="cpu")
    assert routing.indices.tolist() == [[2, 3], [0, 1]]
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run here"):
        topk_route(_logits(), 2)


def test_env_used_without_argument(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "reference")
    assert backends.resolve("op", None, CPU) == "reference"
    monkeypatch.setenv("FSOSR_BACKEND", "cpu")
    assert backends.resolve("op", None, CPU) == "cpu"


def test_empty_env_means_automatic(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "")
    assert backends.resolve("op", None, CPU) == "cpu"


def test_automatic_choice_on_cpu_is_cpu():
    assert _extension.LOADED
    assert backends.resolve("op", None, CPU) == "cpu"


def test_automatic_choice_falls_back_to_reference():
    # Only a reference implementation: the automatic choice takes it.
    assert backends.resolve("op", None, CPU, implemented=("reference",)) == "reference"
    # Other devices (meta) have only the reference backend.
    assert backends.resolve("op", None, torch.device("meta")) == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice on a machine without a GPU")
def test_automatic_choice_for_cuda_tensors_without_gpu_is_reference():
    assert backends.resolve("op", None, CUDA) == "reference"


def test_unknown_argument_names_the_argument():
    with pytest.raises(ValueError, match=r"myop: unknown backend 'bogus'; choose one of reference, cpu, cuda, triton"):
        backends.resolve("myop", "bogus", CPU)


def test_unknown_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"myop: unknown FSOSR_BACKEND 'bogus'"):
        backends.resolve("myop", None, CPU)
    with pytest.raises(ValueError, match=r"topk_route: unknown FSOSR_BACKEND 'bogus'"):
        topk_route(_logits(), 2)


def test_unknown_name_in_why_unavailable():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.why_unavailable("gpu", CPU)


def test_cuda_on_cpu_tensors_is_unavailable():
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' cannot run here: .*CUDA tensors.*cpu"):
        backends.resolve("myop", "cuda", CPU)
    with pytest.raises(BackendUnavailable, match=r"topk_route: backend 'cuda'.*CUDA tensors"):
        topk_route(_logits(), 2, backend="cuda")


def test_cpu_on_cuda_tensors_is_unavailable():
    with pytest.raises(BackendUnavailable, match=r"cpu backend runs on CPU tensors, got tensors on cuda"):
        backends.resolve("myop", "cpu", CUDA)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if backends.triton_unusable() is not None:
        pytest.skip(backends.triton_unusable())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backends.triton_interpreting()
    with pytest.raises(BackendUnavailable, match=r"set TRITON_INTERPRET=1"):
        backends.resolve("myop", "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match=r"set TRITON_INTERPRET=1"):
        backends.resolve("myop", "triton", CPU)


def test_triton_on_cpu_with_the_interpreter(monkeypatch):
    if backends.triton_unusable() is not None:
        pytest.skip(backends.triton_unusable())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_interpreting()
    assert backends.resolve("myop", "triton", CPU) == "triton"
    # The interpreter never makes triton the automatic choice for CPU tensors.
    assert backends.resolve("myop", None, CPU) == "cpu"


def test_missing_implementation_is_unavailable():
    with pytest.raises(BackendUnavailable, match=r"myop: there is no 'cpu' implementation \(have: reference\)"):
        backends.resolve("myop", "cpu", CPU, implemented=("reference",))


def test_missing_implementation_via_env(monkeypatch):
    monkeypatch.setenv("FSOSR_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match=r"there is no 'triton' implementation \(have: reference, cpu\)"):
        backends.resolve("myop", None, CPU, implemented=("reference", "cpu"))


def test_usable_backends_cpu():
    table = backends.usable_backends(CPU)
    assert list(table) == list(backends.BACKENDS)
    assert table["reference"] is None
    assert table["cpu"] is None
    assert "CUDA tensors" in table["cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons on a machine without a GPU")
def test_usable_backends_cuda_without_gpu():
    table = backends.usable_backends(CUDA)
    assert set(table) == set(backends.BACKENDS)
    assert table["reference"] is None
    assert "CPU tensors" in table["cpu"]
    assert isinstance(table["cuda"], str) and table["cuda"]
    assert isinstance(table["triton"], str) and table["triton"]


def test_automatic_choice_on_cuda_follows_the_measured_per_op_order(monkeypatch):
    """On CUDA tensors Triton comes first, except for the ops whose cuda kernels measured faster (CUDA_FIRST);
    each falls back to the other GPU backend, then to reference, when one is unusable."""
    usable = {"cuda", "triton"}
    monkeypatch.setattr(backends, "why_unavailable", lambda b, d: None if b in usable else "not here")
    cuda = torch.device("cuda")
    assert backends.resolve("moe_mlp", None, cuda) == "triton"
    assert backends.resolve("topk_route", None, cuda) == "cuda"
    assert backends.resolve("masked_adamw_", None, cuda) == "cuda"
    assert backends.resolve("masked_adamw_", None, cuda, implemented=("reference", "triton")) == "triton"
    usable.discard("cuda")
    assert backends.resolve("topk_route", None, cuda) == "triton"
    usable.clear()
    assert backends.resolve("topk_route", None, cuda) == "reference"
    assert backends.CUDA_FIRST == {"topk_route", "masked_adamw_"}


def test_a_shape_limit_steers_the_automatic_choice_and_refuses_an_explicit_one(monkeypatch):
    usable = {"cuda", "triton"}
    monkeypatch.setattr(backends, "why_unavailable", lambda b, d: None if b in usable else "not here")
    cuda = torch.device("cuda")
    limits = {"triton": "its tile holds h <= 128, got h = 1536"}
    assert backends.resolve("moe_mlp", None, cuda) == "triton"
    assert backends.resolve("moe_mlp", None, cuda, unsupported=limits) == "cuda"
    assert backends.resolve("moe_mlp", "cuda", cuda, unsupported=limits) == "cuda"
    with pytest.raises(BackendUnavailable, match=r"moe_mlp: backend 'triton' cannot run this shape: its tile holds"):
        backends.resolve("moe_mlp", "triton", cuda, unsupported=limits)
    monkeypatch.setenv("FSOSR_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match=r"cannot run this shape"):
        backends.resolve("moe_mlp", None, cuda, unsupported=limits)
    usable.discard("cuda")
    monkeypatch.delenv("FSOSR_BACKEND")
    assert backends.resolve("moe_mlp", None, cuda, unsupported=limits) == "reference"


@pytest.mark.parametrize(("triton_version", "numpy_version", "refused"), [
    ("3.6.0", "2.4.6", True), ("3.3.1", "2.5.0rc1", True), ("3.6.1+git1a2b", "2.4rc1", True),
    ("3.6.0", "2.3.5", False), ("3.6.0", "2.3rc14", False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "3.0.0", False), ("4.0.0", "2.4.0", False)])
def test_triton_interpreter_numpy_incompatibility(monkeypatch, triton_version, numpy_version, refused):
    # Triton < 3.7's interpreter does int() of one-element arrays, which NumPy >= 2.4 refuses: every kernel with a
    # run-time loop bound fails there with a NumPy TypeError, so the backend says why instead.
    if backends.triton_import_error() is not None:
        pytest.skip(backends.triton_import_error())
    import numpy  # noqa: PLC0415
    import triton  # noqa: PLC0415

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backends.why_unavailable("triton", CPU)
    if refused:
        assert reason is not None and f"Triton {triton_version}" in reason and "numpy<2.4" in reason
        with pytest.raises(BackendUnavailable, match=r"triton-lang/triton#9171"):
            backends.resolve("myop", "triton", CPU)
    else:
        assert reason is None
        assert backends.resolve("myop", "triton", CPU) == "triton"
    # Without the interpreter the CPU reason is the usual one (compiled kernels are not affected).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.why_unavailable("triton", CPU)


def test_cuda_backend_says_why_the_build_has_no_cuda_kernels(monkeypatch):
    # setup.py records why it built without CUDA kernels (here: a toolkit of another CUDA major version).
    if not _extension.LOADED:
        pytest.skip(_extension.LOAD_ERROR)
    monkeypatch.setattr(_extension, "WITH_CUDA", False)
    monkeypatch.setattr(_extension, "BUILD_INFO", {"without_cuda": "the CUDA toolkit at /x is CUDA 13.0 while torch"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.why_unavailable("cuda", torch.device("cuda")) == (
        "fsosr._C was built without CUDA kernels (the CUDA toolkit at /x is CUDA 13.0 while torch)")
    monkeypatch.setattr(_extension, "BUILD_INFO", {})      # a build from before the reason was recorded
    assert "(no CUDA toolkit at build time, or FSOSR_CUDA=0)" in backends.why_unavailable("cuda", torch.device("cuda"))


@pytest.mark.parametrize(("triton_version", "refused"), [("3.2.0", True), ("2.3.1", True), ("3.3.1", False),
                                                          ("3.8.0", False)])
def test_triton_older_than_3_3_is_refused_on_every_device(monkeypatch, triton_version, refused):
    if backends.triton_import_error() is not None:
        pytest.skip(backends.triton_import_error())
    import numpy  # noqa: PLC0415
    import triton  # noqa: PLC0415

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", "2.3.5")     # (NumPy >= 2.4 is refused with Triton < 3.7 anyway)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in (CPU, torch.device("cuda")):
        reason = backends.why_unavailable("triton", device)
        if refused:
            assert reason == f"Triton {triton_version} is older than 3.3, the oldest fsosr's Triton kernels run with"
        else:
            assert reason is None
