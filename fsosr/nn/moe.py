"""The two mixture-of-experts modules of the reimplemented methods, on :func:`fsosr.ops.moe_mlp`.

- :class:`MoEAdapter`: MoE-Adapters4CL's expert bank for one CLIP transformer block (22 bottleneck adapters shared
  by all tasks, one noisy top-2 router per task, activate-freeze of the most used experts after each task). The
  block adds its output in parallel to its MLP: ``x = h + MLP(LN2(h)) + adapter(h)`` with ``h = x + MHSA(LN1(x))``.
- :class:`LayerExpertMoE`: FSMoE's low-level branch, one expert per ViT layer fed that layer's CLS token, top-5
  of 11 chosen by an MLP router on the final normalised image feature.

Expert weights are stored stacked and K-major (``w1 [E, d_in, h]``, ``w2 [E, h, d_out]``) so the fused op can run
all experts in one grouped GEMM; the initialisations draw from torch's generator in the seeds' order, so under the
same ``torch.manual_seed`` the experts start bitwise equal to the seeds' ``nn.Linear`` modules (transposed).

Freezing (MoE-Adapters4CL's activate-freeze). The seed sets ``requires_grad=False`` on whole expert modules, so
AdamW skips them (grad None). With stacked parameters a frozen expert is a *row* of a trained tensor, which needs
two guarantees:

1. No gradient: the forward reads ``torch.where(frozen, w.detach(), w)`` ("split forward") when any expert is
   frozen, so autograd writes exact zeros into the frozen rows. Chosen over a tensor ``register_hook`` on the
   parameters because tensor hooks are lost by ``copy.deepcopy`` and by re-assigning a parameter, while the split
   forward lives in the module's code and traces under torch.compile. When nothing is frozen it costs nothing.
2. No movement: a zero gradient is not enough, since AdamW's decoupled weight decay shrinks every row it holds
   and Adam state from steps taken before the freeze keeps moving a row. :meth:`MoEAdapter.attach_to` registers
   optimizer step hooks that copy the frozen rows before ``optimizer.step()`` and write them back after it, so they
   stay bitwise unchanged under any optimizer. :meth:`MoEAdapter.frozen_parameter_mask` gives the same information
   as per-parameter masks for code that builds its own update rule.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fsosr.nn.router import TopKRouter
from fsosr.ops import Routing, load_balancing_loss, moe_mlp, moe_mlp_per_expert_input

__all__ = ["LayerExpertMoE", "MoEAdapter"]

# Mixed into the forward seed to get the dropout seed: the router noise and the dropout mask hash the same counter
# ranges, so one seed for both would correlate them.
_DROPOUT_SEED_SALT = 0x5DEECE66D

_EXPERT_PARAMETERS = ("w_down", "b_down", "w_up", "b_up")


def _linear_weight_bias(in_features: int, out_features: int, dtype=None, device=None):
    """The weight [out, in] and bias [out] of a freshly constructed ``nn.Linear`` (same draws, same order)."""
    layer = nn.Linear(in_features, out_features, dtype=dtype, device=device)
    return layer.weight.detach(), layer.bias.detach()


def _autocast_to(weights: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
    """Under torch.autocast the experts run in the features' dtype, as a Linear would (the native ops take one
    dtype); otherwise as they are."""
    if weights[0].dtype != features.dtype and torch.is_autocast_enabled(features.device.type):
        return [w.to(features.dtype) for w in weights]
    return weights


def _resync_frozen_ids(module: MoEAdapter, _incompatible_keys) -> None:
    """load_state_dict post-hook: the loaded ``frozen_experts`` buffer replaces the host mirror."""
    module._sync_frozen_ids()


class MoEAdapter(nn.Module):
    """MoE-Adapters4CL's mixture of bottleneck adapters for one transformer block (Yu et al., CVPR 2024).

    Expert e: ``Linear(width, r) → act → Dropout(p) → Linear(r, width) → ×scale``; a sample's L tokens all follow
    the top-k experts its token 0 (CLS for images, SOT for text) picks, with the same gates.

    Args:
        width: d of the residual stream (768 vision / 512 text for ViT-B/16).
        num_experts: E (22).  k: experts per sample (2).  bottleneck: r (64).
        num_routers: one router per task (11); ``active_task`` picks the one used.
        dropout: on the hidden activations, training only (0.1).  scale: output multiplier (0.1).
        activation: relu | gelu | quick_gelu | identity.
        noisy: Shazeer's learned Gaussian gate noise, training only.
        balance_loss: keep ``1e-2·(cv²(importance) + cv²(load))`` of the last forward in ``aux_loss`` (the seed
            computes it but never adds it to the objective, hence off by default).
        batch_first: h is [B, L, width] (True) or [L, B, width] (False, OpenAI CLIP's layout).
        backend: forwarded to the ops (None: automatic).

    Buffers: ``selection_counts`` [E] int64 (samples routed to each expert, summed over training forwards),
    ``frozen_experts`` [E] bool.
    """

    def __init__(self, width: int, num_experts: int = 22, k: int = 2, bottleneck: int = 64, num_routers: int = 11,
                 dropout: float = 0.1, scale: float = 0.1, activation: str = "relu", noisy: bool = True,
                 balance_loss: bool = False, *, balance_weight: float = 1e-2, batch_first: bool = False,
                 backend: str | None = None, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoEAdapter: k must be in [1, num_experts={num_experts}], got {k}")
        if num_routers < 1:
            raise ValueError(f"MoEAdapter: num_routers must be >= 1, got {num_routers}")
        self.width, self.num_experts, self.k, self.bottleneck = width, num_experts, k, bottleneck
        self.dropout, self.scale, self.activation = float(dropout), float(scale), activation
        self.balance_loss, self.balance_weight = balance_loss, balance_weight
        self.batch_first, self.backend = batch_first, backend
        self.active_task = 0     # which router routes; -1 means plain CLIP (DDAS's "task -1"): output zero
        self.bypass = False      # True: output zero whatever the task
        self.aux_loss: torch.Tensor | None = None
        factory = {"dtype": dtype, "device": device}
        self.w_down = nn.Parameter(torch.empty(num_experts, width, bottleneck, **factory))
        self.b_down = nn.Parameter(torch.empty(num_experts, bottleneck, **factory))
        self.w_up = nn.Parameter(torch.empty(num_experts, bottleneck, width, **factory))
        self.b_up = nn.Parameter(torch.empty(num_experts, width, **factory))
        self.register_buffer("selection_counts", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.register_buffer("frozen_experts", torch.zeros(num_experts, dtype=torch.bool, device=device))
        self._frozen_ids: tuple[int, ...] = ()  # host mirror of frozen_experts: decides without a device sync
        self._reset_experts()
        # The experts draw first so that, from the same generator state, they equal the seed's Adapters (whose
        # zero-initialised router matrices draw nothing). TopKRouter draws nn.Linear defaults, then zeroes them.
        self.routers = nn.ModuleList(
            TopKRouter(width, num_experts, k, noisy=noisy, zero_init=True, backend=backend).to(**factory)
            for _ in range(num_routers))
        # A module-level function, not a lambda: whole-model torch.save (as the seed does) must pickle it.
        self.register_load_state_dict_post_hook(_resync_frozen_ids)

    # --- initialisation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _reset_experts(self) -> None:
        """LoRA init as the seed's ``Adapter(init_option='lora')``: each expert constructs ``nn.Linear(width, r)``
        and ``nn.Linear(r, width)`` (default draws), then re-draws the down weight with kaiming_uniform(a=√5) and
        zeroes the up weight and both biases. Replaying those draws keeps the generator stream the seed's."""
        for e in range(self.num_experts):
            down, _ = _linear_weight_bias(self.width, self.bottleneck, self.w_down.dtype, self.w_down.device)
            _linear_weight_bias(self.bottleneck, self.width, self.w_down.dtype, self.w_down.device)  # up's draws
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.w_down[e].copy_(down.t())
        for p in (self.b_down, self.w_up, self.b_up):
            p.zero_()

    def reset_parameters(self) -> None:
        """Re-initialise experts (LoRA) and routers (zero); selection counts and freezing are left as they are."""
        self._reset_experts()
        for router in self.routers:
            for p in router.parameters():
                nn.init.zeros_(p)

    # --- forward --------------------------------------------------------------------------------------------------
    def _expert_weights(self) -> list[torch.Tensor]:
        """The four stacked parameters, with frozen experts' rows cut from autograd (see the module docstring)."""
        params = [self.w_down, self.b_down, self.w_up, self.b_up]
        if not self._frozen_ids:
            return params
        frozen = self.frozen_experts
        return [torch.where(frozen.view(-1, *([1] * (p.dim() - 1))), p.detach(), p) for p in params]

    def forward(self, h: torch.Tensor, *, task: int | None = None, seed: int | torch.Tensor | None = None,
                noise: torch.Tensor | None = None, dropout_seed: int | torch.Tensor | None = None) -> torch.Tensor:
        """h: [L, B, width] ([B, L, width] if batch_first) -> the adapter output, same shape as h
        (= scale·Σ_j gate_j·expert_j(h), routed per sample from token 0; a permuted view when not batch_first).

        Args:
            task: router to use (default ``active_task``); -1 returns zeros, as does ``bypass``.
            seed: fixes the training gate noise (and, unless ``dropout_seed`` is given, the dropout mask): an int,
                or a 0-d integer tensor (on the GPU: advance it in place between steps, and a compiled or
                CUDA-graph-captured step draws fresh noise and masks every call; an int is baked into a graph).
            noise: [B, E] standard-normal gate noise used as given (training, noisy routers only).
            dropout_seed: fixes the dropout mask (the op's counter-based mask, docs/ops/moe_mlp.md).
        """
        if h.dim() != 3 or h.shape[-1] != self.width:
            layout = "[B, L, width]" if self.batch_first else "[L, B, width]"
            raise ValueError(f"MoEAdapter: h must be {layout} with width {self.width}, got {tuple(h.shape)}")
        if h.shape[1 if self.batch_first else 0] == 0:
            raise ValueError("MoEAdapter: h has no tokens (token 0 routes each sample)")
        task = self.active_task if task is None else task
        if isinstance(task, bool) or not hasattr(task, "__index__"):     # numpy / 0-d tensor ints are fine
            raise TypeError(f"MoEAdapter: task must be an int, got {task!r}")
        task = operator.index(task)
        if self.bypass or task == -1:
            self.aux_loss = None
            return torch.zeros_like(h)
        if not 0 <= task < len(self.routers):
            raise IndexError(f"MoEAdapter: task {task} is not -1 or a router index in [0, {len(self.routers)})")
        samples = h if self.batch_first else h.transpose(0, 1)                   # [B, L, width]
        n_samples, n_tokens = samples.shape[0], samples.shape[1]
        routing: Routing = self.routers[task](samples[:, 0], seed=seed, noise=noise)
        if self.training:
            with torch.no_grad():  # int32 counts into the int64 buffer on the device: no host sync
                self.selection_counts += routing.counts
        self.aux_loss = load_balancing_loss(routing, self.balance_weight) if self.balance_loss else None
        dropout = self.dropout if self.training else 0.0
        if dropout_seed is None and seed is not None:
            # int64 first: the salt is wider than 32 bits, and a narrower tensor would keep its dtype and wrap
            dropout_seed = (seed.to(torch.int64) if isinstance(seed, torch.Tensor) else seed) ^ _DROPOUT_SEED_SALT
        rows = samples.reshape(n_samples * n_tokens, self.width)                # each sample's L rows contiguous
        out = moe_mlp(rows, routing, *_autocast_to(self._expert_weights(), rows), group_size=n_tokens,
                      activation=self.activation, scale=self.scale, dropout=dropout, seed=dropout_seed,
                      backend=self.backend)
        out = out.view(n_samples, n_tokens, self.width)
        return out if self.batch_first else out.transpose(0, 1)

    # --- selection counts and activate-freeze --------------------------------------------------------------------
    def __getstate__(self):
        # aux_loss is the last forward's loss, attached to that forward's graph: not module state, and a non-leaf
        # tensor that copy.deepcopy (an EMA or best-checkpoint copy) and pickling refuse or carry along.
        state = dict(super().__getstate__())
        state["aux_loss"] = None
        return state

    def reset_selection_counts(self) -> None:
        """Zero the counts (the seed counts afresh in every task's process)."""
        self.selection_counts.zero_()

    def most_selected(self, n: int = 2) -> list[int]:
        """Ids of the n experts selected most often so far (ties: lower id first). Syncs with the host once; call
        it after a task, e.g. ``adapter.freeze_experts(adapter.most_selected(2))``."""
        order = torch.sort(self.selection_counts, descending=True, stable=True).indices
        return order[:n].tolist()

    @property
    def frozen_ids(self) -> tuple[int, ...]:
        return self._frozen_ids

    def freeze_experts(self, ids: Iterable[int] | torch.Tensor) -> None:
        """Mark experts frozen (cumulative): they get zero gradient from now on and, with :meth:`attach_to`, never
        move under the optimizer. Freeze through this method (or load_state_dict), not by editing the buffer."""
        self._set_frozen(ids, True)

    def unfreeze_experts(self, ids: Iterable[int] | torch.Tensor | None = None) -> None:
        """Unfreeze the given experts (all when ids is None)."""
        self._set_frozen(range(self.num_experts) if ids is None else ids, False)

    def _set_frozen(self, ids, value: bool) -> None:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()                # a 0-d tensor too, e.g. selection_counts.argmax()
        elif isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.num_experts for i in ids):
            raise IndexError(f"MoEAdapter: expert ids must be in [0, {self.num_experts}), got {ids}")
        if ids:
            self.frozen_experts[torch.tensor(ids, device=self.frozen_experts.device)] = value
        self._sync_frozen_ids()

    def _sync_frozen_ids(self) -> None:
        self._frozen_ids = tuple(self.frozen_experts.nonzero().flatten().tolist())

    def _frozen_index(self) -> torch.Tensor:
        """The frozen ids as an index tensor on the parameters' device, cached: the step hooks use it every step."""
        cached = getattr(self, "_frozen_index_cache", None)
        if cached is None or cached[0] != self._frozen_ids or cached[1].device != self.w_down.device:
            cached = (self._frozen_ids, torch.tensor(self._frozen_ids, dtype=torch.int64, device=self.w_down.device))
            self._frozen_index_cache = cached
        return cached[1]

    def frozen_parameter_mask(self) -> dict[str, torch.Tensor]:
        """{parameter name: bool mask broadcast to its shape}, True on frozen experts' rows (expanded views, no
        copies). For custom update rules; :meth:`attach_to` already protects the rows under any torch optimizer."""
        frozen = self.frozen_experts
        return {name: frozen.view(-1, *([1] * (p.dim() - 1))).expand_as(p)
                for name, p in zip(_EXPERT_PARAMETERS, (self.w_down, self.b_down, self.w_up, self.b_up))}

    def frozen_rows(self) -> dict[str, torch.Tensor]:
        """Copies of the frozen experts' rows of each stacked parameter (empty when nothing is frozen)."""
        if not self._frozen_ids:
            return {}
        index = self._frozen_index()
        return {name: getattr(self, name).detach().index_select(0, index).clone() for name in _EXPERT_PARAMETERS}

    @torch.no_grad()
    def restore_frozen_(self, rows: dict[str, torch.Tensor]) -> None:
        """Write rows taken by :meth:`frozen_rows` back (undoing weight decay or momentum on frozen experts)."""
        if not rows:
            return
        index = self._frozen_index()
        for name, saved in rows.items():
            if saved.shape[0] != index.numel():
                raise RuntimeError("MoEAdapter: the frozen set changed between frozen_rows() and restore_frozen_()")
            getattr(self, name).index_copy_(0, index, saved)

    def attach_to(self, optimizer: torch.optim.Optimizer) -> tuple:
        """Keep frozen experts bitwise unchanged by every ``optimizer.step()``: a step pre-hook copies their rows,
        a post-hook writes them back. Returns the two hook handles (``.remove()`` to detach)."""
        saved: dict[str, dict[str, torch.Tensor]] = {}

        def before_step(_optimizer, _args, _kwargs):
            saved["rows"] = self.frozen_rows()

        def after_step(_optimizer, _args, _kwargs):
            self.restore_frozen_(saved.pop("rows", {}))

        return optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)

    @staticmethod
    def attach_all(model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
        """:meth:`attach_to` for every MoEAdapter inside ``model``; returns all hook handles."""
        return [handle for module in model.modules() if isinstance(module, MoEAdapter)
                for handle in module.attach_to(optimizer)]

    def extra_repr(self) -> str:
        return (f"width={self.width}, num_experts={self.num_experts}, k={self.k}, bottleneck={self.bottleneck}, "
                f"num_routers={len(self.routers)}, dropout={self.dropout}, scale={self.scale}, "
                f"activation={self.activation}, batch_first={self.batch_first}")


class LayerExpertMoE(nn.Module):
    """FSMoE's sparse MoE over ViT layers (the seed's ``SparseMoE`` in ``models/models_lowlayer3.py``).

    Expert i = ``Linear(in_features, hidden) → ReLU → Linear(hidden, out_features)`` reads the CLS feature of layer
    i; the router ``Linear(router_in, router_hidden) → ReLU → Linear(router_hidden, E)`` reads the final normalised
    image feature f; each image mixes its top-k experts with softmax gates over the k kept logits (no noise, no
    auxiliary loss).

    Args:
        num_layers: E, one expert per layer (11).  in_features: layer width (768).  hidden: expert hidden (1536).
        out_features: expert output (512).  router_in: width of f (512).  router_hidden: 1024.  k: 5.
        backend: forwarded to the ops (None: automatic).

    Parameters: ``w1 [E, in, hidden]``, ``b1 [E, hidden]``, ``w2 [E, hidden, out]``, ``b2 [E, out]``, ``router``.
    """

    def __init__(self, num_layers: int = 11, in_features: int = 768, hidden: int = 1536, out_features: int = 512,
                 router_in: int = 512, router_hidden: int = 1024, k: int = 5, *, backend: str | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= k <= num_layers:
            raise ValueError(f"LayerExpertMoE: k must be in [1, num_layers={num_layers}], got {k}")
        self.num_experts, self.k = num_layers, k
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.backend = backend
        factory = {"dtype": dtype, "device": device}
        # The seed's SparseMoE builds its router before its experts; keep that order for the generator stream.
        self.router = TopKRouter(router_in, num_layers, k, hidden_features=router_hidden, backend=backend).to(**factory)
        self.w1 = nn.Parameter(torch.empty(num_layers, in_features, hidden, **factory))
        self.b1 = nn.Parameter(torch.empty(num_layers, hidden, **factory))
        self.w2 = nn.Parameter(torch.empty(num_layers, hidden, out_features, **factory))
        self.b2 = nn.Parameter(torch.empty(num_layers, out_features, **factory))
        self._reset_experts()

    @torch.no_grad()
    def _reset_experts(self) -> None:
        """nn.Linear defaults per expert, drawn in the seed's order (expert by expert: linear1, then linear2)."""
        for e in range(self.num_experts):
            w1, b1 = _linear_weight_bias(self.in_features, self.hidden, self.w1.dtype, self.w1.device)
            w2, b2 = _linear_weight_bias(self.hidden, self.out_features, self.w1.dtype, self.w1.device)
            self.w1[e].copy_(w1.t())
            self.b1[e].copy_(b1)
            self.w2[e].copy_(w2.t())
            self.b2[e].copy_(b2)

    def reset_parameters(self) -> None:
        for layer in self.router.gate:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        self._reset_experts()

    def forward(self, layer_features: torch.Tensor | Sequence[torch.Tensor], f: torch.Tensor, *,
                return_routing: bool = False):
        """layer_features: [E, B, in_features] or E tensors [B, in_features]; f: [B, router_in].
        Returns [B, out_features] = Σ_{i ∈ top-k} g_i·expert_i(layer_features[i]) (and the Routing if asked)."""
        x = layer_features if isinstance(layer_features, torch.Tensor) else torch.stack(list(layer_features))
        if x.dim() != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.in_features:
            raise ValueError(f"LayerExpertMoE: layer_features must be [E={self.num_experts}, B, "
                             f"{self.in_features}], got {tuple(x.shape)}")
        if f.dim() != 2 or f.shape[0] != x.shape[1] or f.shape[1] != self.router.in_features:
            raise ValueError(f"LayerExpertMoE: f must be [B={x.shape[1]}, router_in={self.router.in_features}], got "
                             f"{tuple(f.shape)}")
        routing = self.router(f)
        weights = _autocast_to([self.w1, self.b1, self.w2, self.b2], x)
        out = moe_mlp_per_expert_input(x, routing, *weights, activation="relu", backend=self.backend)
        return (out, routing) if return_routing else out

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_experts}, in_features={self.in_features}, hidden={self.hidden}, "
                f"out_features={self.out_features}, k={self.k}")
