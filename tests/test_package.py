"""The installed package: the Triton subpackage mapping, the native extension, ``python -m fsosr.info``, and an
import that survives a broken extension."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import fsosr
from fsosr import _extension, backends

REPO = Path(__file__).resolve().parents[1]


def _run_python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FSOSR_BACKEND"}
    argv = [sys.executable, *(["-c", code] if code is not None else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_triton_subpackage_is_the_kernels_folder():
    import fsosr._triton  # noqa: PLC0415

    assert Path(fsosr._triton.__file__).resolve().parent == REPO / "kernels"


def test_triton_topk_route_module_imports():
    from fsosr._triton import topk_route as kernels  # noqa: PLC0415

    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "topk_route.py"
    assert callable(kernels.topk_route_forward) and callable(kernels.topk_route_backward)
    assert "triton" in sys.modules  # the module is a Triton module: importing it imports triton


def test_extension_is_loaded_and_registers_ops():
    assert _extension.LOADED is True, _extension.LOAD_ERROR
    assert _extension.LOAD_ERROR is None
    assert hasattr(torch.ops.fsosr, "topk_route_fwd")
    assert hasattr(torch.ops.fsosr, "topk_route_bwd")
    assert backends.why_unavailable("cpu", torch.device("cpu")) is None


def _needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object (read directly: no binutils needed)."""
    import struct  # noqa: PLC0415

    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)             # SHT_DYNAMIC
    strtab = sections[dynamic[6]]                                # sh_link: its string table
    needed = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:
            break
        if tag == 1:                                             # DT_NEEDED
            start = strtab[4] + value
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_extension_uses_the_shared_cxx_runtime():
    """A static copy of libstdc++ inside the extension crashes torch's error messages (two C++ runtimes in one
    process); setup.py links the shared one and warns when a build lacks it."""
    if not sys.platform.startswith("linux"):
        return
    from fsosr import _C  # noqa: PLC0415

    needed = _needed_libraries(_C.__file__)
    assert "libc10.so" in needed, needed                         # the parser reads the real table
    assert any(name.startswith("libstdc++.so") for name in needed), needed


def test_info_text_report():
    result = _run_python("-m", "fsosr.info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert torch.__version__ in out
    assert fsosr.__version__ in out
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^(reference|cpu|cuda|triton)\s+(usable|no)\s+(usable|no)\s*$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    assert set(rows) == set(backends.BACKENDS), out
    header = next(line for line in out.splitlines() if line.startswith("backend "))
    assert header.split()[1:] == ["cpu", "cuda"], header
    assert rows["cpu"][0] == "usable", out          # cpu backend, cpu tensors
    assert rows["reference"] == ("usable", "usable"), out
    assert "automatic choice: cpu tensors -> cpu" in out


def test_info_json_report():
    result = _run_python("-m", "fsosr.info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert {"fsosr", "torch", "triton", "extension", "backends"} <= set(facts)
    assert facts["fsosr"] == fsosr.__version__
    assert facts["torch"] == torch.__version__
    assert facts["extension"]["loaded"] is True
    assert set(facts["backends"]["cpu"]) == set(backends.BACKENDS)
    assert facts["backends"]["cpu"]["cpu"] is None
    assert facts["backends"]["cpu"]["reference"] is None
    assert "CUDA tensors" in facts["backends"]["cpu"]["cuda"]
    assert facts["automatic"]["cpu"] == "cpu"


def test_info_names_the_cuda_first_ops_when_a_gpu_is_listed():
    from fsosr import info  # noqa: PLC0415

    facts = info.collect()
    facts["automatic"] = {"cpu": "cpu"}
    assert "cuda first" not in info.render(facts)          # no GPU listed: no CUDA choice to qualify
    facts["automatic"]["cuda"] = "triton"
    assert "cuda tensors -> triton (cuda first for masked_adamw_, topk_route)" in info.render(facts)


_BROKEN_EXTENSION = textwrap.dedent("""
    import json, sys

    class BreakExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "fsosr._C":
                raise ImportError("simulated extension failure")
            return None

    sys.meta_path.insert(0, BreakExtension())

    import torch
    import fsosr
    from fsosr import backends

    result = {"loaded": fsosr._extension.LOADED, "load_error": fsosr._extension.LOAD_ERROR,
              "why_cpu": backends.why_unavailable("cpu", torch.device("cpu")),
              "automatic": backends.resolve("topk_route", None, torch.device("cpu"))}
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 1.0, 2.5]])
    routing = fsosr.ops.topk_route(logits, 2)
    result["indices"] = routing.indices.tolist()
    result["gates"] = routing.gates.tolist()
    try:
        fsosr.ops.topk_route(logits, 2, backend="cpu")
        result["explicit_cpu"] = None
    except backends.BackendUnavailable as exc:
        result["explicit_cpu"] = str(exc)
    from fsosr import info
    result["info"] = info.render(info.collect())
    print(json.dumps(result))
""")


def test_import_survives_a_broken_extension():
    proc = _run_python(code=_BROKEN_EXTENSION)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] is False
    assert "simulated" in result["load_error"]
    assert "simulated" in result["why_cpu"]
    assert result["automatic"] == "reference"
    # Falls back to the reference backend automatically.
    assert result["indices"] == [[1, 3], [0, 3]]
    logits = torch.tensor([[2.0, 0.5], [3.0, 2.5]])
    torch.testing.assert_close(torch.tensor(result["gates"]), torch.softmax(logits, dim=1))
    # An explicit choice does not fall back; the error says why.
    assert result["explicit_cpu"] is not None, "backend='cpu' ran although fsosr._C did not load"
    assert "simulated" in result["explicit_cpu"]
    assert "'cpu'" in result["explicit_cpu"]
    # The info report says the extension did not load, why, and that CPU tensors now go to reference.
    assert "fsosr._C not loaded" in result["info"] and "simulated" in result["info"]
    assert "automatic choice: cpu tensors -> reference" in result["info"]


_UNBUILT_EXTENSION = textwrap.dedent("""
    import sys

    class NoExtensionFile:
        # What a checkout that was never built sees: no fsosr/_C*.so, and Python's misleading error for it.
        def find_spec(self, name, path=None, target=None):
            if name == "fsosr._C":
                sys.modules["fsosr._extension"].extension_files = lambda folder=None: []
                raise ImportError("cannot import name '_C' from partially initialized module 'fsosr' "
                                  "(most likely due to a circular import)")
            return None

    sys.meta_path.insert(0, NoExtensionFile())

    from fsosr import info
    print(info.render(info.collect()))
""")


def test_info_says_plainly_that_the_extension_is_not_built():
    proc = _run_python(code=_UNBUILT_EXTENSION)
    assert proc.returncode == 0, proc.stderr
    assert "fsosr._C not loaded: the extension is not built (no fsosr/_C*.so" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    assert "circular import" not in proc.stdout


def test_load_error_names_the_cause():
    files = _extension.extension_files()
    assert files and all(p.parent == Path(fsosr.__file__).parent for p in files), files   # this build's _C*.so
    assert _extension.extension_files(REPO / "docs") == []
    missing = _extension.describe_load_error(ImportError("cannot import name '_C'"), [])
    assert "not built" in missing and "pip install --no-build-isolation -e ." in missing
    assert "cannot import" not in missing
    broken = _extension.describe_load_error(OSError("undefined symbol: _ZN3c10"), files)   # a file that fails to load
    assert broken.startswith("OSError: undefined symbol: _ZN3c10") and "pip install" in broken
