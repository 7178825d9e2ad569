"""``TopKRouter``: a gate network on top of :func:`fsosr.ops.topk_route`.

Covers both routers of the reimplemented methods:
- MoE-Adapters4CL (Shazeer noisy top-k): ``TopKRouter(d, 22, 2, noisy=True, zero_init=True)`` — linear gate and
  noise projections without bias, both zero at init, noise std ``softplus(x W_noise) + 0.01`` in training only.
- FSMoE: ``TopKRouter(512, 11, 5, hidden_features=1024)`` — ``Linear → ReLU → Linear`` gate, no noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsosr.ops import Routing, load_balancing_loss, topk_route


class TopKRouter(nn.Module):
    """Maps [N, in_features] routing inputs to a :class:`~fsosr.ops.Routing` over ``num_experts`` experts.

    Args:
        in_features: width of the routing input (e.g. the CLS/SOT token).
        num_experts: E.  k: experts per unit.
        noisy: add Shazeer's learned Gaussian noise to the logits while training (never in eval mode).
        hidden_features: None for a linear gate (no bias, as MoE-Adapters4CL); an int for FSMoE's
            ``Linear(in, hidden) → ReLU → Linear(hidden, E)`` gate.
        renormalize: softmax over the k kept logits (True) or over all E (False).
        zero_init: zero the gate's output layer and the noise projection (MoE-Adapters4CL): every logit ties at
            init, so the first clean selections are experts 0..k-1 and noisy ones are uniformly random.
        noise_epsilon: added to softplus(x W_noise) so the noise never vanishes (0.01 in Shazeer's code).
        backend: forwarded to :func:`fsosr.ops.topk_route`.
    """

    def __init__(self, in_features: int, num_experts: int, k: int, *, noisy: bool = False,
                 hidden_features: int | None = None, renormalize: bool = True, zero_init: bool = False,
                 noise_epsilon: float = 1e-2, backend: str | None = None):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k must be in [1, num_experts={num_experts}], got {k}")
        self.in_features, self.num_experts, self.k = in_features, num_experts, k
        self.renormalize, self.noise_epsilon, self.backend = renormalize, noise_epsilon, backend
        if hidden_features is None:
            self.gate = nn.Linear(in_features, num_experts, bias=False)
        else:
            self.gate = nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU(),
                                      nn.Linear(hidden_features, num_experts))
        self.noise = nn.Linear(in_features, num_experts, bias=False) if noisy else None
        if zero_init:
            last = self.gate if hidden_features is None else self.gate[-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
            if self.noise is not None:
                nn.init.zeros_(self.noise.weight)

    @property
    def noisy(self) -> bool:
        return self.noise is not None

    def forward(self, x: torch.Tensor, *, seed: int | torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> Routing:
        """x: [N, in_features] -> Routing of N units. ``seed``/``noise`` fix the training noise (optional)."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TopKRouter: x must be [N, in_features={self.in_features}], got shape {tuple(x.shape)}")
        weight = (self.gate if isinstance(self.gate, nn.Linear) else self.gate[0]).weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):   # autocast casts for Linear
            raise TypeError(f"TopKRouter: x is {x.dtype} but the router's weights are {weight.dtype}")
        logits = self.gate(x)
        if self.noise is not None and self.training:
            noise_std = F.softplus(self.noise(x)) + self.noise_epsilon
            return topk_route(logits, self.k, renormalize=self.renormalize, noise_std=noise_std, noise=noise,
                              seed=seed, backend=self.backend)
        return topk_route(logits, self.k, renormalize=self.renormalize, backend=self.backend)

    @staticmethod
    def balancing_loss(routing: Routing, weight: float = 1e-2) -> torch.Tensor:
        """Shazeer's cv²(importance) + cv²(load) loss, scaled by ``weight`` (optional; off in MoE-Adapters4CL)."""
        return load_balancing_loss(routing, weight)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, renormalize={self.renormalize}"
