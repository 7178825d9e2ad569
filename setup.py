"""Build of fsosr's native extension `fsosr._C` (metadata lives in pyproject.toml).

    pip install -e . --no-build-isolation      # torch must be installed first: it is needed to build

Switches (environment variables):
    FSOSR_CUDA=0|1          force the CUDA kernels off / on (default: on when a CUDA toolkit and a CUDA build of
                            torch are both found)
    CUDA_HOME               the CUDA toolkit folder; default: the folder of the real nvcc (found by asking the
                            `nvcc` on PATH where it lives, which also sees through wrapper scripts)
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0": A100 and H100)
    MAX_JOBS                parallel compile jobs (default 2)

The CPU kernels and the op schemas are always built. CUDA kernels live in torch-free .cu files (seconds to
compile with nvcc); their torch glue is ordinary C++.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit folder of an nvcc executable or of a wrapper script that execs one.

    `nvcc --dryrun` prints the `_HERE_` variable, the bin/ folder of the real compiler, so a wrapper on PATH
    (as on our build machines) does not mislead us the way it misleads torch's own guess.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:  # --dryrun prints the compiler's environment without compiling anything
            out = subprocess.run([nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    if match:
        return os.path.dirname(os.path.normpath(match.group(1)))
    return None


def find_cuda_toolkit() -> tuple[str | None, str]:
    """(folder, how it was found) or (None, why not)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home, "CUDA_HOME"
        return None, f"CUDA_HOME={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for candidate in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
            nvcc = candidate
            break
    if nvcc is None:
        return None, "no nvcc on PATH and no /usr/local/cuda*"
    folder = _toolkit_of_nvcc(nvcc)
    if folder and os.path.exists(os.path.join(folder, "bin", "nvcc")):
        return folder, f"nvcc at {nvcc}"
    return None, f"could not locate the toolkit behind {nvcc}"


def toolkit_mismatch(folder: str, torch_cuda: str, torch_version: str) -> str | None:
    """Why torch's extension builder would refuse the toolkit at ``folder``, or None.

    torch refuses a toolkit whose CUDA major version differs from the one it was built with (its
    `_check_cuda_version`), deep inside the build; we say so up front, so that the default build can go on
    without CUDA kernels instead of failing (torch 2.7+cu126 beside a CUDA 13 nvcc, say).
    """
    try:
        out = subprocess.run([os.path.join(folder, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not run {folder}/bin/nvcc --version ({exc})"
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        return None             # an unknown format: let torch's own check decide
    toolkit_major, torch_major = match.group(1), torch_cuda.split(".")[0]
    if toolkit_major != torch_major:
        return (f"the CUDA toolkit at {folder} is CUDA {toolkit_major}.{match.group(2)} while torch {torch_version} "
                f"was built with CUDA {torch_cuda}; torch builds extensions only with a toolkit of the same major "
                f"version (set CUDA_HOME to a CUDA {torch_major}.x toolkit, or install a torch built for CUDA "
                f"{toolkit_major})")
    return None


def want_cuda() -> tuple[bool, str | None, str | None]:
    """(build the CUDA kernels?, the toolkit folder, why not when not)."""
    forced = os.environ.get("FSOSR_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"FSOSR_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        print("fsosr: CUDA kernels disabled by FSOSR_CUDA=0")
        return False, None, "FSOSR_CUDA=0"
    folder, how = find_cuda_toolkit()
    import torch  # noqa: PLC0415 - needed only to read how torch itself was built

    problem = None
    if folder is None:
        problem = f"no CUDA toolkit ({how})"
    elif torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build (its CUDA headers are missing)"
    else:
        problem = toolkit_mismatch(folder, torch.version.cuda, torch.__version__)
    if problem:
        if forced == "1":
            sys.exit(f"fsosr: FSOSR_CUDA=1 but {problem}")
        print(f"fsosr: building without CUDA kernels: {problem}")
        return False, None, problem
    print(f"fsosr: building CUDA kernels with the toolkit at {folder} ({how})")
    return True, folder, None


def write_build_info(use_cuda: bool, toolkit: str | None, without_cuda: str | None) -> None:
    """fsosr/_build_info.py: what this build was made with, for `python -m fsosr.info` (not version-controlled)."""
    import torch  # noqa: PLC0415

    info = {
        "torch": torch.__version__,
        "cuda_kernels": use_cuda,
        "cuda_toolkit": toolkit,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "without_cuda": without_cuda,    # why the CUDA kernels were not built (for `python -m fsosr.info`)
    }
    with open(os.path.join(ROOT, "fsosr", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time."""\n')
        f.write(f"BUILD_INFO = {info!r}\n")


def extension_modules():
    use_cuda, toolkit, without_cuda = want_cuda()
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported: set it first.
        os.environ["CUDA_HOME"] = toolkit
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # noqa: PLC0415

    write_build_info(use_cuda, toolkit, without_cuda)

    os.environ.setdefault("MAX_JOBS", "2")
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # torch picks the C++ standard its headers need (C++20 from torch 2.12 on). -fopenmp: at::parallel_for is
    # inlined from ATen's OpenMP header, so without it our loops would silently run on one thread.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"] + shared_libstdcxx_link_args()
    if not use_cuda:
        return [CppExtension("fsosr._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    return [CUDAExtension(
        "fsosr._C",
        sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
        extra_link_args=link,
    )]


def shared_libstdcxx_link_args() -> list[str]:
    """Link the C++ runtime as the shared libstdc++.so.6, named first on the link line.

    An extension that carries its own static copy of libstdc++ shares the process with torch's shared one: a
    locale facet made by one is then looked up with the other's facet ids, and the first TORCH_CHECK message that
    formats a number segfaults (seen on a GPU image whose toolchain linked libstdc++.a: the crash lands in
    codecvt<char16_t>::do_unshift under ostream::_M_insert<long>). Naming the shared object before the driver's own
    -lstdc++ resolves every C++ runtime symbol there, so no member of a static archive is ever pulled in."""
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    path = out.stdout.strip()
    return [path] if os.path.isabs(path) and os.path.exists(path) else []


def check_dynamic_libstdcxx(library: str) -> None:
    """Warn loudly when the linked extension does not load libstdc++.so.6 (see above). A warning, not an error:
    the extension works except where a C++ error message formats a number, and
    tests/test_package.py::test_extension_uses_the_shared_cxx_runtime fails on such a build."""
    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        return
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True).stdout
    if "libstdc++.so" not in dynamic:
        print(f"fsosr: WARNING: {library} was linked with a static copy of libstdc++ (no libstdc++.so.6 among "
              "its NEEDED libraries); torch error messages that format numbers will crash. Install the toolchain's "
              "shared libstdc++ (e.g. the libstdc++-<version>-dev package) or set CXX to a compiler that links it.",
              file=sys.stderr)


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension  # noqa: PLC0415

    class BuildExtensionChecked(BuildExtension):
        def build_extension(self, ext):
            super().build_extension(ext)
            check_dynamic_libstdcxx(self.get_ext_fullpath(ext.name))

    return BuildExtensionChecked.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


if __name__ == "__main__":   # pip's build backend runs this file as __main__; tests import its functions
    setup(
        # The Triton kernels live in kernels/ and install as fsosr._triton (a PyPI package named `kernels` exists).
        packages=find_packages(include=["fsosr", "fsosr.*"]) + ["fsosr._triton"],
        package_dir={"fsosr._triton": "kernels"},
        ext_modules=extension_modules(),
        cmdclass={"build_ext": build_ext_class()},
    )
