"""Compile Triton kernels for an H100 (sm_90) without a GPU, and print each one's shared memory in bytes.

Run by tests/ops/test_triton_compiles.py in a subprocess: ``@triton.jit`` becomes the interpreter when
TRITON_INTERPRET=1 is set at import, which the test session does, so the compiler needs a fresh process.
Catches what the interpreter cannot: kernels that do not compile (types, control flow) and on-chip footprints.
"""
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "kernels"))
import moe_mlp as km  # noqa: E402
import topk_route as kt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def shared_bytes(fn, signature: dict, constexprs: dict) -> int:
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=TARGET).metadata.shared


def main() -> None:
    results = {}
    finish = {"part_counts_ptr": "*i32", "part_importance_ptr": "*fp32", "part_load_ptr": "*fp32", "base_ptr": "*i32",
              "counts_ptr": "*i32", "offsets_ptr": "*i32", "importance_ptr": "*fp32", "load_ptr": "*fp32",
              "num_programs": "i32", "num_experts": "i32"}
    for smooth in (False, True):
        results[f"topk_finish smooth={smooth}"] = shared_bytes(
            kt._finish_kernel, finish, {"SMOOTH_LOAD": smooth, "BLOCK_P": 64, "E_PAD": 32})
    for out in ("*fp32", "*bf16"):
        reduce = {**{f"{n}_ws": "*fp32" for n in ("dw1", "db1", "dw2", "db2")},
                  **{f"{n}_ptr": out for n in ("dw1", "db1", "dw2", "db2")},
                  **{n: "i32" for n in ("n_w1", "n_b1", "n_w2", "n_b2", "num_splits")}}
        results[f"moe_reduce_splits {out}"] = shared_bytes(km._reduce_splits_kernel, reduce, {"BLOCK": km.SUM_BLOCK})
    for dtype in ("*fp32", "*bf16"):
        forward = {"x_ptr": dtype, "indices_ptr": "*i32", "gates_ptr": "*fp32", "order_ptr": "*i32", "w1_ptr": dtype,
                   "b1_ptr": dtype, "w2_ptr": dtype, "b2_ptr": dtype, "pre_ptr": "*fp32", "out_ptr": "*fp32",
                   **{n: "i32" for n in ("num_rows", "num_units", "k", "G", "d", "h", "d_out", "num_experts")},
                   "scale": "fp32", "dropout": "fp32", "seed_key": "i64"}
        for h_pad in (128, 256):
            results[f"moe_forward {dtype} h_pad={h_pad}"] = shared_bytes(km._forward_kernel, forward, {
                "ACT": 0, "HAS_DROPOUT": True, "PER_EXPERT": False, "PER_SLOT_OUT": True,
                "UPCAST": dtype == "*fp32",          # as km._upcast decides for compiled (not interpreted) runs
                "BLOCK_M": km.BLOCK_M, "BLOCK_K": km.BLOCK_K, "BLOCK_N": km.BLOCK_N, "H_PAD": h_pad})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
