"""``python -m fsosr.info``: versions, the GPU, and which backends are built and usable here (and why not).

``--json`` prints the same facts as JSON (for bug reports and benchmark records).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import fsosr
from fsosr import _extension, backends


def _triton_version() -> str | None:
    if backends.triton_import_error() is not None:
        return None
    import triton  # noqa: PLC0415

    return triton.__version__


def collect() -> dict:
    """Every fact the report prints, as plain data."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    devices = [torch.device("cpu"), torch.device("cuda")]
    usable = {str(d): backends.usable_backends(d) for d in devices}
    return {
        "fsosr": fsosr.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpret": backends.triton_interpreting(),
        "gpu": gpu,
        "extension": {"loaded": _extension.LOADED, "error": _extension.LOAD_ERROR,
                      "cuda_kernels": _extension.WITH_CUDA, "build": _extension.BUILD_INFO,
                      "cpu_vector_isa": _extension.CPU_VECTOR_ISA},
        "backends": usable,
        "automatic": {str(d): backends.resolve("(automatic)", None, d) for d in devices
                      if d.type == "cpu" or gpu},
        "cuda_first_ops": sorted(backends.CUDA_FIRST),
    }


def render(facts: dict) -> str:
    lines = [f"fsosr {facts['fsosr']}  (Python {facts['python']})",
             f"torch   {facts['torch']}  (CUDA {facts['torch_cuda'] or 'none: CPU-only build'})",
             f"triton  {facts['triton'] or 'not installed'}"
             + ("  (interpreter: TRITON_INTERPRET=1)" if facts["triton_interpret"] else "")]
    gpu = facts["gpu"]
    lines.append(f"GPU     {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB)"
                 f"{' x' + str(gpu['count']) if gpu['count'] > 1 else ''}" if gpu else "GPU     none")
    ext = facts["extension"]
    if ext["loaded"]:
        build = ext["build"] or {}
        cuda = (f"with CUDA kernels (toolkit {build.get('cuda_toolkit')}, archs {build.get('cuda_arch_list')})"
                if ext["cuda_kernels"] else f"CPU kernels only ({_extension.without_cuda_reason()})")
        lines.append(f"fsosr._C built against torch {build.get('torch', '?')}: {cuda}; CPU kernels use "
                     f"{ext.get('cpu_vector_isa') or '?'} vector code")
    else:
        lines.append(f"fsosr._C not loaded: {ext['error']}")
    lines.append("")
    lines.append("backend     " + "  ".join(f"{d:<10}" for d in facts["backends"]))
    for name in backends.BACKENDS:
        cells = []
        reasons = []
        for device, table in facts["backends"].items():
            reason = table[name]
            cells.append(f"{'usable' if reason is None else 'no':<10}")
            if reason is not None:
                reasons.append(f"{device}: {reason}")
        lines.append(f"{name:<11} " + "  ".join(cells))
        lines.extend(f"              - {r}" for r in reasons)
    lines.append("")
    lines.append("automatic choice: " + ", ".join(f"{d} tensors -> {b}" for d, b in facts["automatic"].items())
                 + (f" (cuda first for {', '.join(facts['cuda_first_ops'])})" if "cuda" in facts["automatic"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsosr.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    facts = collect()
    print(json.dumps(facts, indent=2, default=str) if args.json else render(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
