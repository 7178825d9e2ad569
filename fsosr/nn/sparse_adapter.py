"""MoSA's mixture of sparse adapters (Zhang et al. 2023, arXiv 2312.02923) with compact expert storage.

A bottleneck adapter ``Up(act(Down(x)))`` whose split matrices are shared by N experts: each entry belongs to one
expert (a fixed random partition), one expert per projection is drawn uniformly per forward while training (the
whole batch uses it), and evaluation uses the mean of the experts. The seed keeps N dense copies; here a split
matrix is one ``w_own`` parameter + a uint8 ``owner`` buffer + what the non-owners hold (see
:mod:`fsosr.ops.sparse_adapter`), which is lossless (:meth:`SparseLinear.to_dense_experts` /
:meth:`SparseLinear.from_dense_experts`).

Non-owned entries (``w_rest``). Every expert starts as a copy of expert 0 and never gets a gradient on entries it
does not own, so those entries only change by AdamW's decoupled decay ``p ← p·(1 − lr·wd)`` on the steps the
optimizer takes on that expert:
- up-projection (zero init): they stay exactly 0, so ``w_rest`` is None (no storage);
- down-projection (kaiming init): expert i holds ``rest_scale[i] · w_rest`` with ``w_rest`` = the initial weight
  and ``rest_scale[i] = Π_t (1 − lr_t·wd)`` over the steps expert i took. Which steps those are depends on the
  optimizer semantics (torch-1.11 ``mosa``: every step since the expert was first selected; ``skip``: steps where it
  was selected; ``freeze``: none), so the optimizer reports them through :meth:`SparseLinear.decay_rest_`.
  A scalar per expert is exact because all non-owned entries of an expert decay together.

Partition (seed: ``Pruner.divide``): scores S ~ U(0,1) from a seeded generator, shape of the weight ([out, in],
``nn.Linear`` layout); entries are ranked by score (ties broken by position, so the sets stay disjoint where the
seed's ``lo ≤ S ≤ hi`` test could overlap) and expert i owns ranks ``[⌊i·n/N⌋, ⌊(i+1)·n/N⌋)``:
|M_i| = n/N when N divides n. ``row`` / ``column`` modes do the same within each row / column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsosr.ops.sparse_adapter import MAX_EXPERTS, merge_experts, sparse_adapter_weight, sparse_linear

__all__ = ["PLACEMENTS", "AdapterPlacement", "SparseAdapter", "SparseLinear", "block_forward", "partition_owner"]

PARTITION_MODES = ("element", "row", "column")
SPLITS = ("up", "down", "both")


def partition_owner(shape, num_experts: int, *, mode: str = "element",
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Owner map [*shape] uint8 from quantiles of U(0,1) scores drawn with ``generator`` (on the CPU, so a seed
    gives the same map on every device).

    mode: ``element`` (whole tensor), ``row`` (each row of a 2-D weight), ``column`` (each column).
    """
    if mode not in PARTITION_MODES:
        raise ValueError(f"partition_owner: mode must be one of {PARTITION_MODES}, got {mode!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"partition_owner: num_experts must be an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
    shape = tuple(shape)
    if mode != "element" and len(shape) != 2:
        raise ValueError(f"partition_owner: mode {mode!r} needs a 2-D shape, got {shape}")
    scores = torch.rand(shape, generator=generator)
    # Rank along the last dim of a [groups, n] view: one group for element mode, rows / columns otherwise.
    grouped = {"element": scores.reshape(1, -1), "row": scores, "column": scores.t()}[mode]
    n = grouped.shape[1]
    order = torch.argsort(grouped, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    starts = torch.tensor([i * n // num_experts for i in range(num_experts)])
    owner = torch.searchsorted(starts, rank.contiguous(), right=True) - 1
    owner = owner.t() if mode == "column" else owner
    return owner.reshape(shape).to(device=device, dtype=torch.uint8).contiguous()


def _check_owner(owner: torch.Tensor, shape, num_experts: int, name: str = "owner") -> None:
    if not isinstance(owner, torch.Tensor) or owner.dtype != torch.uint8:
        got = owner.dtype if isinstance(owner, torch.Tensor) else type(owner).__name__
        raise TypeError(f"{name} must be a torch.uint8 tensor, got {got}")
    if tuple(owner.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(owner.shape)}")
    if owner.numel() and int(owner.max()) >= num_experts:
        raise ValueError(f"{name} holds expert id {int(owner.max())} but num_experts is {num_experts}")


class SparseLinear(nn.Module):
    """One adapter projection ``y = x Wᵀ + b`` (W [out, in]), either dense or split into N sparse experts.

    Split: parameters ``w_own`` [out, in] and ``bias`` [N, out] (per-expert dense biases, not split, as MoSA's
    ``BIAS=True``); buffers ``owner`` [out, in] uint8, ``w_rest`` [out, in] or None (zeros), ``rest_scale`` [N] fp64.
    Dense: parameters ``weight`` [out, in], ``bias`` [out] (one Linear shared by all experts).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, *, split: bool, zero_init: bool,
                 partition: str = "element", generator: torch.Generator | None = None, backend: str | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.split, self.backend = split, backend
        weight = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        if not zero_init:  # the seed's down init; drawn from the global RNG as nn.Linear would be
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if split:
            self.w_own = nn.Parameter(weight.clone())
            self.bias = nn.Parameter(torch.zeros(num_experts, out_features, dtype=weight.dtype, device=device))
            owner = partition_owner(weight.shape, num_experts, mode=partition, generator=generator, device=device)
            self.register_buffer("owner", owner)
            self.register_buffer("w_rest", None if zero_init else weight.clone())
            self.register_buffer("rest_scale", torch.ones(num_experts, dtype=torch.float64, device=device))
        else:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=device))

    def _rest_for(self, expert: int) -> torch.Tensor | None:
        if self.w_rest is None:
            return None
        return self.w_rest * self.rest_scale[expert].to(self.w_rest.dtype)

    def expert_weight(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [out, in], b [out]) of expert ``expert``; differentiable w.r.t. ``w_own`` and ``bias``."""
        if not self.split:
            return self.weight, self.bias
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        weight = sparse_adapter_weight(self.w_own, self.owner, self._rest_for(expert), expert, backend=self.backend)
        return weight, self.bias[expert]

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W̄ [out, in], b̄ [out]): the mean over the experts (MoSA's ``add`` merge), exact from the compact form."""
        if not self.split:
            return self.weight, self.bias
        weight = merge_experts(self.w_own, self.owner, self.w_rest, self.num_experts, rest_scale=self.rest_scale,
                               backend=self.backend)
        return weight, self.bias.mean(0)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """x [..., in] → [..., out] through expert ``expert`` (None: the merged weights).

        A split projection runs :func:`fsosr.ops.sparse_linear`, whose backward masks w_own's gradient to the
        expert's entries inside the weight-gradient GEMM. Inputs of another dtype than the weights (autocast) take
        the materialised weight and ``F.linear``, which autocast knows how to cast; the values are the same.
        """
        if expert is None or not self.split:
            weight, bias = self.merged_weight() if expert is None else self.expert_weight(expert)
            return F.linear(x, weight, bias)
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        if x.dtype != self.w_own.dtype:
            return F.linear(x, *self.expert_weight(expert))
        return sparse_linear(x, self.w_own, self._rest_for(expert), self.owner, expert, self.bias[expert],
                             backend=self.backend)

    @torch.no_grad()
    def decay_rest_(self, factor: float, experts) -> None:
        """Record a decoupled-decay step ``× factor`` (= 1 − lr·wd) on the non-owned entries of ``experts``
        (a list of ids or an [N] bool mask, which may live on the device): the experts the optimizer stepped this
        iteration. A bool mask is applied without indexing, so a CUDA mask costs no host synchronisation."""
        if not self.split:
            return
        experts = torch.as_tensor(experts, device=self.rest_scale.device)
        if experts.dtype == torch.bool:
            # 1 + mask·(factor − 1): exactly factor where set (factor − 1 is exact for factor in [0.5, 2]), 1 elsewhere
            self.rest_scale.mul_(1.0 + experts.to(self.rest_scale.dtype) * (float(factor) - 1.0))
        else:
            self.rest_scale[experts] *= factor

    @torch.no_grad()
    def to_dense_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed's N dense copies: (weights [N, out, in], biases [N, out])."""
        if not self.split:
            raise RuntimeError("to_dense_experts: this projection is not split (one dense Linear)")
        weights = torch.stack([self.expert_weight(i)[0] for i in range(self.num_experts)])
        return weights, self.bias.detach().clone()

    @torch.no_grad()
    def from_dense_experts(self, weights: torch.Tensor, biases: torch.Tensor, owner: torch.Tensor | None = None,
                           rest_scale: torch.Tensor | None = None) -> None:
        """Load N dense copies (weights [N, out, in], biases [N, out]) under ``owner`` (default: the current map).

        Expert i's non-owned entries must equal ``rest_scale[i] · w_rest`` for one ``w_rest`` (``rest_scale``
        defaults to ones: they must agree across experts); otherwise the copies have no compact form and this
        raises ValueError naming ``weights``.
        """
        if not self.split:
            raise RuntimeError("from_dense_experts: this projection is not split (one dense Linear)")
        n, shape = self.num_experts, (self.out_features, self.in_features)
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n, *shape):
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must have shape {(n, *shape)}, got {got}")
        if weights.dtype != self.w_own.dtype:
            raise TypeError(f"weights must have dtype {self.w_own.dtype}, got {weights.dtype}")
        if not isinstance(biases, torch.Tensor) or tuple(biases.shape) != (n, self.out_features):
            got = tuple(biases.shape) if isinstance(biases, torch.Tensor) else type(biases).__name__
            raise ValueError(f"biases must have shape {(n, self.out_features)}, got {got}")
        if biases.dtype != self.bias.dtype:
            raise TypeError(f"biases must have dtype {self.bias.dtype}, got {biases.dtype}")
        owner = self.owner if owner is None else owner
        _check_owner(owner, shape, n)
        scale = torch.ones(n, dtype=torch.float64) if rest_scale is None else rest_scale.detach().double().cpu()
        if tuple(scale.shape) != (n,):
            raise ValueError(f"rest_scale must have shape ({n},), got {tuple(scale.shape)}")
        weights, owner = weights.to(self.w_own.device), owner.to(self.w_own.device)
        index = owner.long().unsqueeze(0)
        w_own = weights.gather(0, index).squeeze(0)
        w_rest = None
        if n > 1:  # read the rest from the lowest-numbered non-owner, undoing its decay
            other = (owner == 0).long().unsqueeze(0)
            other_scale = scale.to(weights.device)[other.squeeze(0)].to(weights.dtype)
            w_rest = weights.gather(0, other).squeeze(0) / other_scale
            if not bool(w_rest.any()):
                w_rest = None  # all zeros: a zero-init up-projection, kept without storage
        rebuilt = torch.stack([torch.where(owner == i, w_own, 0.0 if w_rest is None else w_rest * scale[i].item())
                               for i in range(n)])
        exact = rest_scale is None
        # NaN matches NaN: a diverged expert's own entries still have a compact form.
        if not torch.allclose(rebuilt, weights, rtol=0 if exact else 1e-6, atol=0, equal_nan=True):
            raise ValueError("weights: the experts' non-owned entries differ by more than a per-expert decay, "
                             "so these copies were not trained under this owner map")
        self.w_own.copy_(w_own)
        self.bias.copy_(biases)
        self.owner = owner.clone()
        self.w_rest = w_rest
        self.rest_scale = scale.to(self.owner.device)


@dataclass(frozen=True)
class AdapterPlacement:
    """Where MoSA puts an adapter in a ViT block and what the adapter looks like there (MoSA's ``vit_mosa.py``)."""
    name: str
    adapters_per_block: int
    where: str            # the block's forward with the adapter(s), h = x + Attn(LN1(x))
    layer_norm: bool      # the adapter's own trainable LayerNorm (eps 1e-6) on its input
    activation: str
    scale: float
    dropout: float


PLACEMENTS = {
    "adaptformer": AdapterPlacement("adaptformer", 1, "out = h + MLP(LN2(h)) + adapter(h)  (parallel to the MLP)",
                                    True, "gelu", 0.1, 0.1),
    "pfeiffer": AdapterPlacement("pfeiffer", 1, "z = MLP(LN2(h)); out = h + z + adapter(z)  (after the MLP)",
                                 True, "relu", 1.0, 0.0),
    "houlsby": AdapterPlacement("houlsby", 2, "h' = h + adapter_0(h); h2 = h' + MLP(LN2(h')); "
                                "out = h2 + adapter_1(h2)", False, "silu", 1.0, 0.0),
}

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def block_forward(placement: str, x: torch.Tensor, *, attn, norm1, mlp, norm2, adapters) -> torch.Tensor:
    """One pre-norm ViT block ``x → out`` with MoSA adapters placed per ``placement`` (x [B, L, d]).

    ``adapters``: a sequence of ``PLACEMENTS[placement].adapters_per_block`` :class:`SparseAdapter` modules; each
    draws its own experts, so a Houlsby block makes four independent draws as the seed does.
    """
    spec = PLACEMENTS[placement]
    if len(adapters) != spec.adapters_per_block:
        raise ValueError(f"adapters: {placement} needs {spec.adapters_per_block} per block, got {len(adapters)}")
    h = x + attn(norm1(x))
    if placement == "adaptformer":
        return h + mlp(norm2(h)) + adapters[0](h)
    if placement == "pfeiffer":
        z = mlp(norm2(h))
        return h + z + adapters[0](z)
    h = h + adapters[0](h)
    h = h + mlp(norm2(h))
    return h + adapters[1](h)


class SparseAdapter(nn.Module):
    """``scale · Up(Dropout(act(Down(LN_a(x)))))`` with N sparse experts in the split projection(s).

    Args:
        width: d (768 for ViT-B).  bottleneck: r (64 FGVC, 16 VTAB).  num_experts: N (4; 2 for Cars/multi-task).
        split: which matrix is split — ``up`` (seed ``SHARE=down``, the default recipe), ``down`` (``SHARE=up``,
            Cars) or ``both`` (``SHARE=none``, multi-task). The other is one dense Linear.
        placement: ``adaptformer`` | ``pfeiffer`` | ``houlsby``: sets the LayerNorm, activation, scale and dropout
            (see :data:`PLACEMENTS`); ``layer_norm``/``activation``/``scale``/``dropout`` override them.
        partition: ``element`` | ``row`` | ``column``.  partition_seed: seeds the U(0,1) scores (3407 as the seed's
            scripts); down's map is drawn before up's.
        generator: torch.Generator for the per-forward expert draws (also :meth:`set_generator` or the forward's
            ``generator=``); None uses torch's default generator.

    Forward ``x [..., d] → [..., d]``. Training: two independent uniform draws per forward (down first, then up,
    made even for a dense projection so the random stream does not depend on ``split``), shared by the batch, kept
    in :attr:`selected` (the last forward's) and appended to the draws :meth:`pop_draws` returns (every training
    forward since the optimizer's last step: two with MoSA's two stochastic passes). Eval: the merged adapter (:meth:`merge`), recomputed each forward so it is never stale.
    """

    def __init__(self, width: int, bottleneck: int = 64, num_experts: int = 4, *, split: str = "up",
                 placement: str = "adaptformer", partition: str = "element", partition_seed: int = 3407,
                 layer_norm: bool | None = None, activation: str | None = None, scale: float | None = None,
                 dropout: float | None = None, generator: torch.Generator | None = None, backend: str | None = None,
                 dtype=None, device=None):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"SparseAdapter: split must be one of {SPLITS}, got {split!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"SparseAdapter: placement must be one of {tuple(PLACEMENTS)}, got {placement!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(f"SparseAdapter: num_experts must be an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
        spec = PLACEMENTS[placement]
        activation = spec.activation if activation is None else activation
        if activation not in _ACTIVATIONS:
            raise ValueError(f"SparseAdapter: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        self.width, self.bottleneck, self.num_experts = width, bottleneck, num_experts
        self.split_mode, self.placement, self.activation = split, placement, activation
        self.scale = spec.scale if scale is None else scale
        use_norm = spec.layer_norm if layer_norm is None else layer_norm
        self.norm = nn.LayerNorm(width, eps=1e-6, dtype=dtype, device=device) if use_norm else None
        self.dropout = nn.Dropout(spec.dropout if dropout is None else dropout)
        scores = torch.Generator().manual_seed(partition_seed)
        common = dict(partition=partition, generator=scores, backend=backend, dtype=dtype, device=device)
        self.down = SparseLinear(width, bottleneck, num_experts, split=split in ("down", "both"), zero_init=False,
                                 **common)
        self.up = SparseLinear(bottleneck, width, num_experts, split=split in ("up", "both"), zero_init=True,
                               **common)
        self._generator = generator
        self.selected: dict[str, int | None] = {"down": None, "up": None}
        self._draws: dict[str, list[int]] = {"down": [], "up": []}

    def set_generator(self, generator: torch.Generator | None) -> None:
        """The generator the expert draws come from (seeded by the trainer)."""
        self._generator = generator

    def split_projections(self) -> dict[str, SparseLinear]:
        """The split projections by name (``down``/``up``): what the masked optimizer updates."""
        return {name: proj for name, proj in (("down", self.down), ("up", self.up)) if proj.split}

    def owner_maps(self) -> dict[str, torch.Tensor]:
        """``owner`` [out, in] uint8 per split projection."""
        return {name: proj.owner for name, proj in self.split_projections().items()}

    def selected_experts(self) -> dict[str, int | None]:
        """Expert drawn per split projection by the last training forward (None before one / in eval)."""
        return {name: self.selected[name] for name in self.split_projections()}

    def pop_draws(self) -> dict[str, list[int]]:
        """The experts drawn per split projection by every training forward since the last call, in order, and
        forget them: what the masked optimizer's ``selected [S, D]`` needs after MoSA's two passes."""
        draws = {name: list(self._draws[name]) for name in self.split_projections()}
        self._draws = {"down": [], "up": []}
        return draws

    def draw_experts(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Two independent uniform draws in [0, N): (down, up). CPU draws, so no device synchronisation."""
        generator = generator if generator is not None else self._generator
        draws = [int(torch.randint(self.num_experts, (1,), generator=generator)) for _ in range(2)]
        return draws[0], draws[1]

    def merge(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """MoSA's merge: {"down": (W̄, b̄), "up": (W̄, b̄)}, the mean over experts of each projection."""
        return {"down": self.down.merged_weight(), "up": self.up.merged_weight()}

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x [..., width] → adapter output [..., width] (not yet added to the residual stream)."""
        if x.shape[-1] != self.width:
            raise ValueError(f"SparseAdapter: x must have last dim {self.width}, got shape {tuple(x.shape)}")
        if self.training:
            down_id, up_id = self.draw_experts(generator)
            self.selected = {"down": down_id if self.down.split else None, "up": up_id if self.up.split else None}
            self._draws["down"].append(down_id)
            self._draws["up"].append(up_id)
        else:
            down_id = up_id = None
            self.selected = {"down": None, "up": None}
        h = self.norm(x) if self.norm is not None else x
        h = self.down(h, down_id if self.down.split else None)
        h = self.dropout(_ACTIVATIONS[self.activation](h))
        h = self.up(h, up_id if self.up.split else None)
        return h * self.scale if self.scale != 1.0 else h

    def extra_repr(self) -> str:
        return (f"width={self.width}, bottleneck={self.bottleneck}, num_experts={self.num_experts}, "
                f"split={self.split_mode!r}, placement={self.placement!r}, scale={self.scale}")
