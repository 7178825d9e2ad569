"""The documentation's code examples run as written: every ```python block marked ``<!-- runnable -->`` in the
README and docs/eval.md is executed in a fresh namespace (in a temporary folder: they may write files), and the
README's CLIP block (which needs a weights file and images) runs with the random-weight ``fsosr-tiny`` model and
small random images standing in for its placeholders."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES_WITH_RUNNABLE_BLOCKS = (README, REPO / "docs" / "eval.md")
BLOCK = re.compile(r"(<!-- runnable -->\n)?```python\n(.*?)```", re.S)


def _python_blocks(page: Path) -> list[tuple[bool, str]]:
    """(marked runnable, code) of every ```python block of ``page``, in order."""
    return [(bool(m.group(1)), m.group(2)) for m in BLOCK.finditer(page.read_text(encoding="utf-8"))]


RUNNABLE = [(page, code) for page in PAGES_WITH_RUNNABLE_BLOCKS for runnable, code in _python_blocks(page)
            if runnable]


def test_pages_mark_their_offline_examples():
    readme_blocks = _python_blocks(README)
    assert sum(runnable for runnable, _ in readme_blocks) >= 2, "the README's op examples lost their markers"
    assert any(runnable for runnable, _ in _python_blocks(REPO / "docs" / "eval.md"))
    for _, code in readme_blocks:
        compile(code, str(README), "exec")


@pytest.mark.parametrize("page,code", RUNNABLE,
                         ids=[f"{page.name}-block{i}" for i, (page, _) in enumerate(RUNNABLE)])
def test_runnable_block(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})  # noqa: S102 - the docs' own code


def test_readme_clip_block_with_stand_ins():
    [code] = [code for runnable, code in _python_blocks(README) if not runnable and "create_clip(" in code]
    call = 'create_clip("ViT-B-16-quickgelu", "weights/ViT-B-16.pt")'
    assert call in code, "update this test's stand-in for the README's create_clip call"
    namespace = {"__name__": "docs_example", "images": torch.randn(2, 3, 32, 32)}
    exec(compile(code.replace(call, 'create_clip("fsosr-tiny")'), str(README), "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (2, 2)
    assert namespace["feats"].embedding.shape[0] == 2
