"""Launch options of the triton moe_mlp kernels at the GPU adapter shape (64 x 197 tokens, d 768, h 64, E 22, k 2),
fwd+bwd in fp32 and bf16, each step captured in a CUDA graph (device time without host costs): the two tilings
(FSOSR_MOE_MLP_TRITON_TILES: expert tiles, the default, and unit tiles, kernels/moe_mlp_units.py) by the warps per
program of the GEMM kernels (FSOSR_MOE_MLP_TRITON_WARPS: the rule, 4 at h 64, or 8, where the sm_90 compile check
finds no register spills for 16-bit data). The measurements that set ``DEFAULT_TILING`` (kernels/moe_mlp.py) and
``_num_warps`` (kernels/moe_mlp_device.py). Needs a CUDA device; the baseline is the current default.
"""
from __future__ import annotations

import pytest

import test_moe_mlp as tm
from conftest import DEVICE, measure, record_bandwidth

pytestmark = pytest.mark.skipif("triton" not in tm.OURS or DEVICE.type != "cuda",
                                reason="tunes the compiled Triton kernels: needs a CUDA device")

WARPS = {"rule": None, "w8": "8"}
CONFIGS = [f"{tiles}-{warps}" for tiles in ("experts", "units") for warps in WARPS]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_adapter_launch_options(benchmark, dtype, config):
    tiles, warps = config.split("-")
    env = {"FSOSR_MOE_MLP_TRITON_TILES": tiles} | ({"FSOSR_MOE_MLP_TRITON_WARPS": WARPS[warps]} if WARPS[warps] else {})
    s = tm.SHAPES["adapter"]
    measure(benchmark, tm.moe_step("adapter", "triton-graph", "fwd+bwd", dtype, env=env),
            group=f"moe_mlp tuning triton adapter N={s.units}x{s.group} {s.width}-{s.hidden}-{s.out} E={s.experts} "
                  f"k={s.k} fwd+bwd {dtype} graph",
            provider=config, baseline=CONFIGS[0],
            info={"op": "moe_mlp tuning", "dtype": dtype, "mode": "fwd+bwd", "tiles": tiles,
                  "warps": WARPS[warps] or "rule", "backend": "triton-graph"})
    record_bandwidth(benchmark, tm.floor_bytes(s, "fwd+bwd", dtype))
