"""Compile Triton kernels for an H100 (sm_90) without a GPU, and print each one's shared memory in bytes.

Run by tests/ops/test_triton_compiles.py in a subprocess: ``@triton.jit`` becomes the interpreter when
TRITON_INTERPRET=1 is set at import, which the test session does, so the compiler needs a fresh process.
Catches what the interpreter cannot: kernels that do not compile (types, control flow) and on-chip footprints.

``python triton_aot_compile.py [LAUNCH_LOG]`` prints one JSON object: ``probes`` (hand-made signatures that pin
down shared-memory limits) and, given the log of launches triton_launch_recorder.py wrote, ``launches``: every
recorded launch compiled, with its shared memory or the compiler's error.
"""
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fsosr._triton.moe_mlp as km

TARGET = GPUTarget("cuda", 90, 32)


def shared_bytes(fn, signature: dict, constexprs: dict, divisible: tuple = ()) -> int:
    """Shared memory of fn compiled with these types; pointers and the ints named in `divisible` specialised as
    divisible by 16, as the launcher does for aligned tensors and widths such as 768."""
    aligned = {name for name, kind in signature.items() if kind.startswith("*")} | set(divisible)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=TARGET).metadata.shared


# Kernels whose BLOCK the launcher sets differently under the interpreter (bigger: it runs programs one by one):
# compile the value a GPU run passes, the module's BLOCK as imported here, without the interpreter.
INTERPRETER_BLOCKS = {("fsosr._triton.masked_adamw", "_step_kernel"), ("fsosr._triton.masked_adamw", "_fused_kernel")}


def as_compiled(launch: dict) -> dict:
    """The constexprs a GPU run passes for a launch recorded under the interpreter. UPCAST (cast tl.dot operands to
    fp32) is forced on under the interpreter, whose bf16 dot is wrong; compiled, the launchers set it for fp32 data
    only (a no-op there). BLOCK of INTERPRETER_BLOCKS: the compiled launcher's."""
    constexprs = dict(launch["constexprs"])
    if "UPCAST" in constexprs:
        constexprs["UPCAST"] = not any(t in ("*bf16", "*fp16") for t in launch["signature"].values())
    if (launch["module"], launch["kernel"]) in INTERPRETER_BLOCKS:
        constexprs["BLOCK"] = importlib.import_module(launch["module"]).BLOCK
    return constexprs


def compile_launch(launch: dict) -> dict:
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    constexprs = as_compiled(launch)
    signature = {**launch["signature"], **{name: "constexpr" for name in constexprs}}
    names = list(fn.arg_names)
    # The launcher's divisibility specialisation (recorded per argument): part of what gets compiled.
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in launch["divisible_by_16"]}
    source = ASTSource(fn=fn, signature={name: signature[name] for name in names},
                       constexprs={(names.index(name),): value for name, value in constexprs.items()}, attrs=attrs)
    entry = {"kernel": launch["kernel"], "constexprs": constexprs, "signature": launch["signature"],
             "divisible_by_16": launch["divisible_by_16"]}
    try:
        entry["shared"] = triton.compile(source, target=TARGET, options=launch["options"]).metadata.shared
    except Exception as error:  # noqa: BLE001 - reported per launch, asserted on by the test
        entry["error"] = f"{type(error).__name__}: {error}"[:2000]
    return entry


def compile_launches(log_path: str) -> list:
    with open(log_path) as log:
        unique = {}
        for line in log:
            launch = json.loads(line)
            launch["constexprs"] = as_compiled(launch)  # the interpreter-only variants collapse
            unique.setdefault(json.dumps(launch, sort_keys=True), launch)
    with ProcessPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        return list(pool.map(compile_launch, unique.values()))


def probes() -> dict:
    results = {}
    for dtype in ("*fp32", "*bf16"):
        forward = {"x_ptr": dtype, "indices_ptr": "*i32", "gates_ptr": "*fp32", "order_ptr": "*i32", "w1_ptr": dtype,
                   "b1_ptr": dtype, "w2_ptr": dtype, "b2_ptr": dtype, "pre_ptr": "*fp32", "out_ptr": "*fp32",
                   **{n: "i32" for n in ("num_rows", "num_units", "k", "G", "d", "h", "d_out", "num_experts")},
                   "scale": "fp32", "dropout": "fp32", "keep_scale": "fp32", "seed_value": "i64", "seed_ptr": "*i64"}
        for h_pad in (128, 256):
            results[f"moe_forward {dtype} h_pad={h_pad}"] = shared_bytes(km._forward_kernel, forward, {
                "ACT": 0, "HAS_DROPOUT": True, "SEED_FROM_PTR": True, "PER_EXPERT": False, "PER_SLOT_OUT": True,
                "UPCAST": dtype == "*fp32",          # as km._upcast decides for compiled (not interpreted) runs
                "BLOCK_M": km.BLOCK_M, "BLOCK_K": km.BLOCK_K, "BLOCK_N": km.BLOCK_N, "H_PAD": h_pad},
                divisible=("d", "h", "d_out"))
    return results


def main() -> None:
    out = {"probes": probes()}
    if len(sys.argv) > 1:
        out["launches"] = compile_launches(sys.argv[1])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
