"""tests/conftest.py makes the Triton interpreter pass float launch arguments as a compiled launch does (fp32), so
that a kernel needing more than fp32 of an argument fails here as it would on a GPU. This checks that hook on the
Triton installed here (the hook sits on the interpreter's GridExecutor, the same in Triton 3.3 to 3.8). Not under
tests/ops: the sm_90 compile check records the launches of tests/ops, and this kernel is a probe, not ours."""
import numpy as np
import pytest

from fsosr import backends

if backends.triton_unusable() is not None or not backends.triton_interpreting():
    pytest.skip("checks the interpreter (TRITON_INTERPRET=1) only", allow_module_level=True)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _argument_errors(out_ptr, positional, keyword, CONSTANT: tl.constexpr):
    # Python floats stay doubles in the interpreter's arithmetic: what an argument lost to fp32 shows here.
    tl.store(out_ptr, (positional - 0.1) * 1e9)
    tl.store(out_ptr + 1, (keyword - 0.2) * 1e9)
    tl.store(out_ptr + 2, (CONSTANT - 0.3) * 1e9)


def test_triton_interpreter_rounds_runtime_float_arguments_to_fp32():
    out = torch.zeros(3, dtype=torch.float64)
    _argument_errors[(1,)](out, 0.1, keyword=0.2, CONSTANT=0.3)
    lost = [(float(np.float32(v)) - v) * 1e9 for v in (0.1, 0.2)]
    assert lost[0] != 0 and lost[1] != 0
    # Run-time arguments, positional or keyword, arrive rounded; a constexpr is folded at full precision.
    assert out.tolist() == pytest.approx([lost[0], lost[1], 0.0], abs=1e-6)
