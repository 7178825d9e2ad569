"""setup.py's decisions about the CUDA kernels, tested on its functions (importing setup.py builds nothing: it
calls setup() only when run as __main__, as pip's build backend runs it)."""
import importlib.util
import stat
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fsosr_setup_under_test", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_toolkit(tmp_path: Path, release: str) -> str:
    """A toolkit folder whose bin/nvcc prints nvcc's --version text for ``release``."""
    bin_dir = tmp_path / f"cuda-{release}" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir.parent)


@pytest.mark.parametrize(("release", "torch_cuda", "refused"), [
    ("13.0", "12.6", True), ("12.8", "13.0", True), ("13.0", "13.0", False), ("12.4", "12.8", False)])
def test_toolkit_of_another_major_version_is_refused_up_front(setup_py, tmp_path, release, torch_cuda, refused):
    # torch's extension builder accepts a toolkit of the same CUDA major version only (minor versions may differ).
    problem = setup_py.toolkit_mismatch(_fake_toolkit(tmp_path, release), torch_cuda, "2.7.1+cu126")
    if refused:
        assert problem is not None
        assert f"is CUDA {release} while torch 2.7.1+cu126 was built with CUDA {torch_cuda}" in problem
        assert f"CUDA {torch_cuda.split('.')[0]}.x toolkit" in problem
    else:
        assert problem is None


def test_unreadable_nvcc_version_leaves_the_decision_to_torch(setup_py, tmp_path):
    folder = _fake_toolkit(tmp_path, "13.0")
    (Path(folder) / "bin" / "nvcc").write_text("#!/bin/sh\necho 'a wrapper that prints something else'\n")
    assert setup_py.toolkit_mismatch(folder, "12.6", "2.7.1") is None


def test_default_build_goes_on_without_cuda_kernels_and_a_forced_one_stops(setup_py, tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    folder = _fake_toolkit(tmp_path, "13.0")
    monkeypatch.setattr(setup_py, "find_cuda_toolkit", lambda: (folder, "test"))
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.delenv("FSOSR_CUDA", raising=False)
    use_cuda, toolkit, reason = setup_py.want_cuda()
    assert (use_cuda, toolkit) == (False, None) and "is CUDA 13.0 while torch" in reason
    assert "building without CUDA kernels: the CUDA toolkit at" in capsys.readouterr().out
    monkeypatch.setenv("FSOSR_CUDA", "1")
    with pytest.raises(SystemExit, match=r"FSOSR_CUDA=1 but the CUDA toolkit at .* is CUDA 13\.0 while torch"):
        setup_py.want_cuda()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert setup_py.want_cuda() == (True, folder, None)
    monkeypatch.setenv("FSOSR_CUDA", "0")
    assert setup_py.want_cuda() == (False, None, "FSOSR_CUDA=0")


def test_the_toolkit_here_is_read_correctly(setup_py):
    # The real nvcc's --version text parses: of the CUDA major versions 10-19, exactly one (its own) is accepted,
    # so CI's pair (torch 2.14.1+cu130 beside CUDA 13.0) builds its CUDA kernels.
    folder, _how = setup_py.find_cuda_toolkit()
    if folder is None:
        pytest.skip("no CUDA toolkit here")
    accepted = [major for major in range(10, 20) if setup_py.toolkit_mismatch(folder, f"{major}.0", "x") is None]
    assert len(accepted) == 1, accepted
