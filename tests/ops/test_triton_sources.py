"""Static checks of the Triton kernel sources that the CPU interpreter cannot make.

The interpreter runs @triton.jit functions as Python, so a kernel that reads a plain module-level int passes every
CPU test and then fails to compile on a GPU ("Cannot access global variable ... from within @jit'ed function").
"""
import ast
import importlib
import inspect
import textwrap
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNEL_MODULES = ["masked_adamw", "moe_mlp", "moe_mlp_device", "moe_mlp_units", "sparse_adapter", "topk_route"]
JIT_TYPES = ("JITFunction", "InterpretedFunction")


def jit_functions(module):
    return [(name, obj.fn) for name, obj in vars(module).items() if type(obj).__name__ in JIT_TYPES]


def bad_globals(fn) -> set[str]:
    """Module-level names a jitted function reads that the Triton compiler would reject."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    local = {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    local |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    bad = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)) or node.id in local:
            continue
        if node.id not in fn.__globals__:
            continue
        value = fn.__globals__[node.id]
        if isinstance(value, (types.ModuleType, tl.constexpr)) or type(value).__name__ in JIT_TYPES:
            continue
        bad.add(node.id)
    return bad


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_jitted_code_reads_only_constexpr_globals(module_name):
    module = importlib.import_module(f"fsosr._triton.{module_name}")
    functions = jit_functions(module)
    assert functions, f"no @triton.jit functions found in fsosr._triton.{module_name}"
    offenders = {name: sorted(bad) for name, fn in functions if (bad := bad_globals(fn))}
    assert offenders == {}, f"globals that are not tl.constexpr, read inside jitted code: {offenders}"


def test_the_check_catches_a_plain_int_global(tmp_path, monkeypatch):
    (tmp_path / "planted_kernel.py").write_text(textwrap.dedent("""
        import triton.language as tl
        LIMIT = 4
        OK = tl.constexpr(2)

        def kernel(x_ptr, BLOCK):
            total = LIMIT + OK + BLOCK
            return total
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("planted_kernel")
    assert bad_globals(module.kernel) == {"LIMIT"}
