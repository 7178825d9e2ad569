"""Image-conditioned prompt learners: CoCoOp and FSMoE's full-spectrum learner (Xie et al. 2025).

Both shift a shared context by functions of the image, so every image has its own C class prompts. The seeds run
the text tower once per image in a Python loop; here all B·C prompts go through it in one batched pass
(:meth:`~fsosr.nn.prompts.ClassPrompts.encode_batched`, with an optional ``chunk_size`` bounding the prompts per
pass — see its docstring for the memory cost B·C·L·width).

The CLIP is frozen and nothing trainable sits in its image tower, so the image features are computed without
autograd (less memory, same gradients); if a caller has made CLIP parameters trainable, autograd is kept.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fsosr.nn.moe import LayerExpertMoE
from fsosr.nn.prompts import ClassPrompts, seeded
from fsosr.ops import Routing

if TYPE_CHECKING:
    from fsosr.models.clip import ClipBackbone

__all__ = ["CoCoOpPromptLearner", "FSMoEOutput", "FSMoEPromptLearner"]

FSMOE_ORDERS = ("moe_first", "swapped")


def _image_grad_mode(clip: ClipBackbone):
    """Autograd for the image tower only when something in the CLIP is trainable."""
    needed = torch.is_grad_enabled() and any(p.requires_grad for p in clip.parameters())
    return torch.set_grad_enabled(needed)


def _instance_logits(clip: ClipBackbone, image_features: torch.Tensor, text_features: torch.Tensor):
    """[B, C] = exp(logit_scale)·⟨f_b, t_{b,c}⟩ for f [B, D] and per-image text features t [B, C, D]."""
    scores = torch.bmm(text_features, image_features.to(text_features.dtype).unsqueeze(-1)).squeeze(-1)
    return clip.logit_scale * scores


def _check_features(image_features: torch.Tensor, dim: int, name: str = "image_features") -> None:
    if image_features.dim() != 2 or image_features.shape[1] != dim:
        raise ValueError(f"{name} must be [B, {dim}], got {tuple(image_features.shape)}")


def _meta_net(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class CoCoOpPromptLearner(ClassPrompts):
    """CoCoOp (Zhou et al. 2022): ``ctx_b = ctx + π(f_b)`` with the meta-net
    π = ``Linear(D → hidden) → ReLU → Linear(hidden → text_width)`` on the normalised image embedding f_b.

    Args:
        clip: a frozen :class:`~fsosr.models.clip.ClipBackbone`.  class_names: C names.
        n_ctx: 4 (replaced by the token count of ``ctx_init`` when given).  ctx_init: "a photo of a" or None.
        meta_hidden: π's hidden width; default ``embed_dim // 16`` (32 for ViT-B/16), at least 1.
        class_token_position, init_std, truncate, generator: as :class:`~fsosr.nn.prompts.CoOpPromptLearner`.
        chunk_size: default for :meth:`text_features` (prompts per text-tower pass; None = all B·C at once).

    Trainable: ``ctx [n_ctx, width]`` and ``meta_net``.
    """

    def __init__(self, clip: ClipBackbone, class_names, n_ctx: int = 4, ctx_init: str | None = "a photo of a",
                 meta_hidden: int | None = None, class_token_position: str = "end", init_std: float = 0.02,
                 truncate: bool = True, chunk_size: int | None = None, generator: torch.Generator | None = None):
        super().__init__(clip, class_names, n_ctx, ctx_init, class_token_position, truncate)
        embed_dim, width = clip.embed_dim, self.token_prefix.shape[-1]
        meta_hidden = max(1, embed_dim // 16) if meta_hidden is None else meta_hidden
        self.chunk_size = chunk_size
        with seeded(generator):  # CoCoOp's order: context, then meta-net
            self.ctx = nn.Parameter(self.init_context((self.n_ctx, width), init_std))
            self.meta_net = _meta_net(embed_dim, meta_hidden, width)
        self.meta_net.to(dtype=self.token_prefix.dtype, device=self.token_prefix.device)

    def context(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, n_ctx, width] per-image context from L2-normalised image embeddings [B, D]."""
        _check_features(image_features, self.clip.embed_dim)
        bias = self.meta_net(image_features.to(self.ctx.dtype))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def text_features(self, image_features: torch.Tensor, normalize: bool = True,
                      chunk_size: int | None = None) -> torch.Tensor:
        """[B, C, D] text embeddings of every image's class prompts, batched over images × classes.
        ``image_features`` [B, D] must be L2-normalised (what CoCoOp feeds its meta-net)."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        return self.encode_batched(self.context(image_features), normalize=normalize, chunk_size=chunk_size)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C] exp(logit_scale)·cos from L2-normalised image embeddings [B, D]."""
        return _instance_logits(self.clip, image_features, self.text_features(image_features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images → [B, C] logits."""
        with _image_grad_mode(self.clip):
            features = self.clip.encode_image(images, normalize=True)
        return self.logits(features)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}"


@dataclass
class FSMoEOutput:
    """What one FSMoE forward returns besides the logits (the pieces FSMoE's loss CE + 0.1·L_rc needs).

    logits: [B, C] exp(logit_scale)·⟨f_b, t_{b,c}⟩ (higher = more like class c; MLS score = max over c).
    image_features: [B, D] f, the L2-normalised image embedding.
    text_features: [B, C, D] L2-normalised per-image class text embeddings.
    meta_features: [B, width] π_h(f), the meta-net output: the seed's ``top_feature``, input of the
        routing-contrastive loss L_rc (cosine InfoNCE over same/other-class samples at τ = 0.01).
    moe_features: [B, width] m(f), the MoE output added to the low-level context half.
    routing: the MoE's :class:`~fsosr.ops.Routing` (top-k indices [B, k] and gates [B, k]).
    """
    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    meta_features: torch.Tensor
    moe_features: torch.Tensor
    routing: Routing


class FSMoEPromptLearner(ClassPrompts):
    """FSMoE's full-spectrum prompt learner (Xie et al., Neural Networks 2025; the seed's ``models_lowlayer3.py``).

    One unified context ``ctx [n_ctx, width]``. For image b with normalised embedding f_b and CLS tokens of the
    residual stream after blocks 1..L−1 (``ClipBackbone.image_features(layer_cls=True).layer_cls``):

    - low-level: ``m_b = LayerExpertMoE(layer_cls[layers], f_b)``, expert i an MLP
      ``vision_width → expert_hidden → width`` on layer ``layers[i]``, top-k of E routed on f_b;
    - high-level: ``π_h(f_b)``, meta-net ``Linear(D → meta_hidden) → ReLU → Linear(meta_hidden → width)``;
    - ``ctx_b[:n_ctx//2] = ctx[:n_ctx//2] + m_b`` and ``ctx_b[n_ctx//2:] = ctx[n_ctx//2:] + π_h(f_b)``
      (``order="swapped"``: the seed's ``_order`` variant, m_b on the second half and π_h on the first);
    - ``logits[b, c] = exp(logit_scale)·⟨f_b, t_{b,c}⟩``, t_{b,c} the normalised text embedding of class c's prompt
      with context ctx_b.

    In ViT-B/16 the text width and the embedding D are both 512, so the seed's meta-net is 512→1024→512 and its
    experts end in 512. Where they differ (small test models) both outputs map to the **text width**, the width the
    context lives in; router and meta-net inputs stay D.

    Args:
        clip: a frozen :class:`~fsosr.models.clip.ClipBackbone`.  class_names: C names.
        n_ctx: 8 (≥ 2, one token per half at least).  ctx_init: None (random N(0, init_std²)) or words.
        layers: indices into ``layer_cls`` (0 = after block 1); default all L−1 (11 for ViT-B).
        top_k: experts per image; default min(5, len(layers)).
        expert_hidden: 2·vision_width (1536).  router_hidden: 2·D (1024).  meta_hidden: 2·D (1024).
        order: "moe_first" (default) or "swapped".
        class_token_position, init_std, truncate, generator: as :class:`~fsosr.nn.prompts.CoOpPromptLearner`.
        chunk_size: prompts per text-tower pass (None = all B·C).  backend: for the MoE's fused ops.

    Trainable: ``ctx``, ``meta_net``, ``moe`` (router and experts), ~23M parameters at ViT-B/16.
    """

    def __init__(self, clip: ClipBackbone, class_names, n_ctx: int = 8, ctx_init: str | None = None,
                 layers: Sequence[int] | None = None, top_k: int | None = None, expert_hidden: int | None = None,
                 router_hidden: int | None = None, meta_hidden: int | None = None, order: str = "moe_first",
                 class_token_position: str = "end", init_std: float = 0.02, truncate: bool = True,
                 chunk_size: int | None = None, backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(clip, class_names, n_ctx, ctx_init, class_token_position, truncate)
        if self.n_ctx < 2:
            raise ValueError(f"FSMoE splits the context in two halves: n_ctx must be >= 2, got {self.n_ctx}")
        if order not in FSMOE_ORDERS:
            raise ValueError(f"order must be one of {FSMOE_ORDERS}, got {order!r}")
        layers = self._check_layers(layers, clip.num_vision_blocks)
        self.order, self.chunk_size = order, chunk_size
        embed_dim, width, vision_width = clip.embed_dim, self.token_prefix.shape[-1], clip.vision_width
        top_k = min(5, len(layers)) if top_k is None else top_k
        with seeded(generator):
            self.ctx = nn.Parameter(self.init_context((self.n_ctx, width), init_std))
            self.meta_net = _meta_net(embed_dim, meta_hidden or 2 * embed_dim, width)
            self.moe = LayerExpertMoE(len(layers), vision_width, expert_hidden or 2 * vision_width, width, embed_dim,
                                      router_hidden or 2 * embed_dim, top_k, backend=backend)
        factory = {"dtype": self.token_prefix.dtype, "device": self.token_prefix.device}
        self.meta_net.to(**factory)
        self.moe.to(**factory)
        self.register_buffer("layers", torch.tensor(layers, dtype=torch.long, device=factory["device"]),
                             persistent=False)

    @staticmethod
    def _check_layers(layers, num_blocks: int) -> list[int]:
        available = num_blocks - 1  # CLS taps exist after blocks 1..L−1
        layers = list(range(available)) if layers is None else [int(i) for i in layers]
        if not layers:
            raise ValueError("layers is empty: FSMoE needs at least one layer expert")
        bad = [i for i in layers if not 0 <= i < available]
        if bad:
            raise ValueError(f"layers {bad} out of range: the image tower has {available} CLS taps "
                             f"(0..{available - 1})")
        return layers

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] → (f [B, D] normalised embedding, layer_cls [L−1, B, vision_width] all CLS taps)."""
        with _image_grad_mode(self.clip):
            feats = self.clip.image_features(images, layer_cls=True, normalize=True)
        return feats.embedding, feats.layer_cls

    def context(self, image_features: torch.Tensor, layer_cls: torch.Tensor):
        """Per-image context. ``image_features`` [B, D] normalised f; ``layer_cls`` [L−1, B, vision_width].
        Returns (ctx_b [B, n_ctx, width], m [B, width], π_h(f) [B, width], routing)."""
        _check_features(image_features, self.clip.embed_dim)
        expected = (self.clip.num_vision_blocks - 1, image_features.shape[0], self.clip.vision_width)
        if tuple(layer_cls.shape) != expected:
            raise ValueError(f"layer_cls must be [L-1, B, vision_width] = {list(expected)}, "
                             f"got {tuple(layer_cls.shape)}")
        f = image_features.to(self.ctx.dtype)
        moe_out, routing = self.moe(layer_cls.index_select(0, self.layers).to(self.ctx.dtype), f,
                                    return_routing=True)
        meta_out = self.meta_net(f)
        first, second = (moe_out, meta_out) if self.order == "moe_first" else (meta_out, moe_out)
        half = self.n_ctx // 2
        ctx = torch.cat([self.ctx[:half] + first.unsqueeze(1), self.ctx[half:] + second.unsqueeze(1)], dim=1)
        return ctx, moe_out, meta_out, routing

    def forward_features(self, image_features: torch.Tensor, layer_cls: torch.Tensor, *,
                         return_parts: bool = False):
        """Logits [B, C] (or an :class:`FSMoEOutput`) from precomputed image taps (see :meth:`context`)."""
        ctx, moe_out, meta_out, routing = self.context(image_features, layer_cls)
        text = self.encode_batched(ctx, normalize=True, chunk_size=self.chunk_size)
        logits = _instance_logits(self.clip, image_features, text)
        if not return_parts:
            return logits
        return FSMoEOutput(logits, image_features, text, meta_out, moe_out, routing)

    def forward(self, images: torch.Tensor, *, return_parts: bool = False):
        """[B, 3, H, W] images → logits [B, C], or an :class:`FSMoEOutput` with ``return_parts``."""
        return self.forward_features(*self.encode_images(images), return_parts=return_parts)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, layers={self.layers.tolist()}, "
                f"order={self.order!r}")
