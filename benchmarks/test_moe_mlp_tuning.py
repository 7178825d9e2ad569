"""Launch options of the triton moe_mlp kernels at the GPU adapter shape (64 x 197 tokens, d 768, h 64, E 22, k 2),
fwd+bwd in fp32 and bf16, each step captured in a CUDA graph (device time without host costs; L2 flushed before
each step). One option changed at a time from the defaults (the baseline):

- the tiling of the forward and rows pass (FSOSR_MOE_MLP_TRITON_TILES=units: kernels/moe_mlp_units.py, no per-slot
  buffer) — with unit tiles also each option below that concerns their kernels, and their row tile (32 or 128
  rows instead of 64: a 197-token unit in 7 or 2 tiles instead of 4; each tile gathers the k experts' weights);
- FSOSR_MOE_MLP_TRITON_TUNE (kernels/moe_mlp_device.py ``TUNABLE``): warps and pipeline stages of the forward and
  rows-pass kernels (8 warps: no register spills for 16-bit data in the sm_90 compile check, which finds spills
  at the rule's 4), and of the weight-gradient kernel with its row step, output block and row chunks per expert
  (the rule takes none at this shape: E 22 x 24 output blocks = 528 programs; chunks balance uneven experts
  across more programs, at the price of an fp32 workspace written and summed after).

The measurements that set ``DEFAULT_TILING`` and the launch rules (kernels/moe_mlp.py, moe_mlp_device.py); the
default was tuned on the per-token shape (T = 50k). Needs a CUDA device.
"""
from __future__ import annotations

import pytest

import test_moe_mlp as tm
from conftest import DEVICE, measure, record_bandwidth

pytestmark = pytest.mark.skipif("triton" not in tm.OURS or DEVICE.type != "cuda",
                                reason="tunes the compiled Triton kernels: needs a CUDA device")

ROWS_OPTIONS = ["warps=8", "stages=2", "stages=4"]
WEIGHT_OPTIONS = ["weight_warps=8", "weight_stages=2", "weight_stages=4", "weight_rows=64", "weight_block_d=32",
                  "weight_block_d=128", "weight_splits=2", "weight_splits=4"]
UNIT_OPTIONS = ["unit_rows=32", "unit_rows=128"]
CONFIGS = (["default", "units"] + ROWS_OPTIONS + [f"units,{o}" for o in ROWS_OPTIONS + UNIT_OPTIONS] + WEIGHT_OPTIONS
           + ["units,weight_rows=64"])
# Every config compiles for sm_90 within an H100's 227 KiB of shared memory at this shape (Triton 3.8, launches
# recorded under the interpreter and compiled by tests/ops/triton_aot_compile.py, 2026-11-23) except the fp32 weight
# pass with a 128-wide output block: 262,656 B. (Largest that fit: fp32 unit kernels at 4 stages or 128 rows,
# 229,376 B.)
TOO_BIG = {("float32", "weight_block_d=128")}
CASES = [(dtype, config) for dtype in ("float32", "bfloat16") for config in CONFIGS if (dtype, config) not in TOO_BIG]


def config_variables(config: str) -> dict[str, str]:
    """FSOSR_MOE_MLP_TRITON_TILES and FSOSR_MOE_MLP_TRITON_TUNE for a config name ("units,warps=8")."""
    options = [] if config == "default" else config.split(",")
    tiles = "units" if "units" in options else "experts"
    return {"FSOSR_MOE_MLP_TRITON_TILES": tiles,
            "FSOSR_MOE_MLP_TRITON_TUNE": ",".join(o for o in options if o != "units")}


@pytest.mark.parametrize("dtype,config", CASES)
def test_triton_adapter_launch_options(benchmark, dtype, config):
    s = tm.SHAPES["adapter"]
    env = config_variables(config)
    measure(benchmark, tm.moe_step("adapter", "triton-graph", "fwd+bwd", dtype, env=env),
            group=f"moe_mlp tuning triton adapter N={s.units}x{s.group} {s.width}-{s.hidden}-{s.out} E={s.experts} "
                  f"k={s.k} fwd+bwd {dtype} graph",
            provider=config, baseline="default",
            info={"op": "moe_mlp tuning", "dtype": dtype, "mode": "fwd+bwd", **env, "backend": "triton-graph"})
    record_bandwidth(benchmark, tm.floor_bytes(s, "fwd+bwd", dtype))
