"""``fsosr.optim.MaskedAdamW``: MoSA's optimizer step for a model's :class:`~fsosr.nn.SparseAdapter` modules as one
fused :func:`fsosr.ops.masked_adamw_` call over a flat buffer.

What MoSA's trainer does per step (its ``src/engine/trainer.py``): ``p.grad *= p.mask`` for every expert copy,
then HF AdamW (eps 1e-6, bias correction per tensor, decoupled decay after the step, wd 0.01 on every tensor whose
name is not a bias — the adapter LayerNorm weight included). Here every trainable tensor of the adapters lives in
one contiguous buffer (the modules' parameters become views of it), each tensor is one segment of the op, and the
owner map says which expert each entry belongs to:

- a split projection's ``w_own`` [out, in]: its ``owner`` map; its per-expert ``bias`` [N, out]: row i → expert i;
- a dense projection's weight and bias and the adapter LayerNorm: shared (owner 255).

The experts each segment drew since the last step come from :meth:`SparseAdapter.pop_draws` (two per step with
MoSA's two stochastic passes); the entries the experts do not own (``W_rest`` of a split down projection) decay
through :meth:`SparseLinear.decay_rest_` for the experts that stepped, which is what the seed's dense copies do.

Usage::

    optimizer = MaskedAdamW(adapters, lr=1e-3)       # after moving the model to its device and dtype
    for batch in loader:
        loss = criterion(model(x), y) (+ a second pass)  # every adapter runs at least one training forward
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fsosr.nn.sparse_adapter import SparseAdapter
from fsosr.ops.masked_adamw import SEMANTICS, SHARED, masked_adamw_

__all__ = ["MaskedAdamW"]


class _Segment:
    """One trainable tensor: how the op treats it. ``projection``: "down"/"up" when the tensor belongs to a split
    projection (its draws select the experts), else None (shared). ``rest_of``: the split projection whose
    non-owned entries decay with this tensor's experts (its ``w_own``)."""

    def __init__(self, param: torch.nn.Parameter, owner: torch.Tensor, weight_decay: float, adapter: int,
                 projection: str | None = None, rest_of=None):
        self.param, self.owner, self.weight_decay = param, owner, weight_decay
        self.adapter, self.projection, self.rest_of = adapter, projection, rest_of


class MaskedAdamW(torch.optim.Optimizer):
    """HF AdamW with MoSA's expert masks over every :class:`SparseAdapter` in ``adapters``, one fused step.

    Args:
        adapters: the SparseAdapter modules to train (e.g. ``[m for m in model.modules() if isinstance(m,
            SparseAdapter)]``). Their parameters must share one dtype (fp32 or fp64) and device; they are moved
            into one flat buffer, so build the optimizer after ``model.to(...)``.
        lr, betas, eps: HF AdamW's (MoSA: eps 1e-6).
        weight_decay: decoupled, after the Adam step, on every non-bias tensor (MoSA: 0.01).
        semantics: ``mosa`` (torch 1.11, the published numbers) | ``skip`` | ``freeze``; see
            :mod:`fsosr.ops.masked_adamw`.
        backend: forwarded to :func:`masked_adamw_` (None: automatic).
        other_params: ``(name, parameter)`` pairs trained by the same HF AdamW step without masks (MoSA's
            classifier head: ``model.vit.head.named_parameters(prefix="head")``). MoSA's parameter groups decide
            their decay by name: 0 for names containing ``bias`` or ``LayerNorm.weight``, else ``weight_decay``.

    The state (moments and per-(tensor, expert) step counters) is in ``state_dict()`` as flat tensors.
    """

    def __init__(self, adapters: Iterable[SparseAdapter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, semantics: str = "mosa",
                 backend: str | None = None, other_params: Iterable[tuple[str, torch.nn.Parameter]] = ()):
        self.adapters = list(adapters)
        if not self.adapters or not all(isinstance(a, SparseAdapter) for a in self.adapters):
            raise TypeError("MaskedAdamW: adapters must be a non-empty iterable of fsosr.nn.SparseAdapter modules")
        if semantics not in SEMANTICS:
            raise ValueError(f"MaskedAdamW: semantics must be one of {', '.join(SEMANTICS)}, got {semantics!r}")
        if len({a.num_experts for a in self.adapters}) != 1:
            raise ValueError("MaskedAdamW: every adapter must have the same number of experts")
        self.num_experts = self.adapters[0].num_experts
        self.semantics, self.backend = semantics, backend
        self._segments = self._collect_segments(weight_decay)
        for name, param in other_params:
            no_decay = "bias" in name or "LayerNorm.weight" in name  # MoSA's optimizer groups, by name
            shared = torch.full(param.shape, SHARED, dtype=torch.uint8)
            self._segments.append(_Segment(param, shared, 0.0 if no_decay else weight_decay, adapter=-1))
        params = [s.param for s in self._segments]
        if any(not p.requires_grad for p in params):
            raise ValueError("MaskedAdamW: every adapter tensor it trains must require grad (a frozen one would still "
                             "be decayed); unfreeze the adapters or leave the frozen ones out")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("MaskedAdamW: a parameter appears twice (other_params repeating an adapter's?)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("MaskedAdamW: every parameter must have one dtype and device")
        if first.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"MaskedAdamW: adapter parameters must be float32 or float64, got {first.dtype}")
        sizes = [p.numel() for p in params]
        self._offsets = torch.tensor([0] + sizes, device=first.device).cumsum(0)
        self._flat = torch.cat([p.detach().reshape(-1) for p in params])
        with torch.no_grad():
            for p, view in zip(params, self._flat.split(sizes)):
                p.data = view.view_as(p)  # the module now trains the flat buffer in place
        self._grad = torch.zeros_like(self._flat)
        self._owner = torch.cat([s.owner.reshape(-1).to(torch.uint8) for s in self._segments]).to(first.device)
        self._decay = torch.tensor([s.weight_decay for s in self._segments], dtype=torch.float64,
                                   device=first.device)
        self._exp_avg = torch.zeros_like(self._flat)
        self._exp_avg_sq = torch.zeros_like(self._flat)
        self._steps = torch.zeros(len(self._segments), self.num_experts + 1, dtype=torch.int64, device=first.device)

    def _collect_segments(self, weight_decay: float) -> list[_Segment]:
        segments = []
        for index, adapter in enumerate(self.adapters):
            n = adapter.num_experts
            if adapter.norm is not None:
                for name, p in (("weight", adapter.norm.weight), ("bias", adapter.norm.bias)):
                    shared = torch.full(p.shape, SHARED, dtype=torch.uint8)
                    segments.append(_Segment(p, shared, weight_decay if name == "weight" else 0.0, index, None))
            for name in ("down", "up"):
                proj = getattr(adapter, name)
                if proj.split:
                    segments.append(_Segment(proj.w_own, proj.owner.cpu(), weight_decay, index, name, rest_of=proj))
                    rows = torch.arange(n, dtype=torch.uint8)[:, None].expand(n, proj.out_features)
                    segments.append(_Segment(proj.bias, rows, 0.0, index, name))
                else:
                    shared = torch.full(proj.weight.shape, SHARED, dtype=torch.uint8)
                    segments.append(_Segment(proj.weight, shared, weight_decay, index, None))
                    segments.append(_Segment(proj.bias, torch.full(proj.bias.shape, SHARED, dtype=torch.uint8),
                                             0.0, index, None))
        return segments

    def _selected(self) -> torch.Tensor:
        """[S, D]: the experts every segment drew since the last step (shared segments: any value)."""
        draws = []
        for index, adapter in enumerate(self.adapters):
            popped = adapter.pop_draws()
            if any(len(v) == 0 for v in popped.values()):
                raise RuntimeError(f"MaskedAdamW.step: adapter {index} ran no training forward since the last step "
                                   "(every adapter must be used; MoSA draws its experts in forward)")
            draws.append(popped)
        per_segment = [draws[s.adapter][s.projection] if s.projection is not None else [0]
                       for s in self._segments]
        width = max(len(d) for d in per_segment)
        padded = torch.tensor([d + [d[-1]] * (width - len(d)) for d in per_segment],  # a repeated draw is a no-op
                              dtype=torch.int64)
        if self._flat.is_cuda:  # pinned + non_blocking: the copy waits for nothing the GPU is still running
            return padded.pin_memory().to(self._flat.device, non_blocking=True)
        return padded

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        selected = self._selected()
        # One concatenation into the flat gradient (a tensor without a gradient contributes zeros).
        torch.cat([s.param.grad.reshape(-1) if s.param.grad is not None
                   else s.param.new_zeros(s.param.numel()) for s in self._segments], out=self._grad)
        before = self._steps.clone()
        masked_adamw_(self._flat, self._grad, self._exp_avg, self._exp_avg_sq, self._owner, selected,
                      lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=self._decay,
                      step=self._steps, semantics=self.semantics, segment_offsets=self._offsets,
                      backend=self.backend)
        self._decay_rest(group["lr"], before)
        return loss

    def _decay_rest(self, lr: float, before: torch.Tensor) -> None:
        """W_rest of each split projection decays like the non-owned entries of the experts that stepped."""
        if self.semantics == "freeze":
            return  # freeze keeps every entry outside an expert's mask as it was
        stepped = (self._steps > before)[:, :self.num_experts]  # on the device: decay_rest_ takes it without a sync
        for index, s in enumerate(self._segments):
            if s.rest_of is not None and s.rest_of.w_rest is not None and s.weight_decay:
                s.rest_of.decay_rest_(1.0 - lr * s.weight_decay, stepped[index])

    def state_dict(self) -> dict:
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "exp_avg": self._exp_avg.clone(), "exp_avg_sq": self._exp_avg_sq.clone(),
                "steps": self._steps.clone(), "semantics": self.semantics}

    def load_state_dict(self, state: dict) -> None:
        for name in ("exp_avg", "exp_avg_sq", "steps"):
            mine = getattr(self, f"_{name}")
            if tuple(state[name].shape) != tuple(mine.shape):
                raise ValueError(f"MaskedAdamW.load_state_dict: {name} has shape {tuple(state[name].shape)}, this "
                                 f"optimizer's is {tuple(mine.shape)} (different adapters?)")
            mine.copy_(state[name])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
