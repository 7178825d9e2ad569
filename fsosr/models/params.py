"""Which parameters a method trains: freezing helpers and a readable summary of what is trainable."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["count_parameters", "freeze", "trainable_parameters", "trainable_summary", "unfreeze"]


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """``requires_grad=True`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in registration order."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable_summary(module: nn.Module, depth: int = 2) -> str:
    """A small table of trainable parameter counts grouped by the first ``depth`` components of their names,
    ending with the trainable and total counts — what a training run prints before its first step."""
    groups: OrderedDict[str, int] = OrderedDict()
    for name, p in trainable_parameters(module):
        key = ".".join(name.split(".")[:depth])
        groups[key] = groups.get(key, 0) + p.numel()
    width = max([len(k) for k in groups] + [len("total")])
    lines = [f"{k:<{width}}  {n:>12,}" for k, n in groups.items()]
    trainable, total = count_parameters(module), count_parameters(module, trainable_only=False)
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"{'trainable':<{width}}  {trainable:>12,}  ({share:.3f}% of {total:,})")
    return "\n".join(lines)
