"""CLIP (open_clip) with the feature taps and adapter slots fsosr's methods need.

:class:`ClipBackbone` wraps an open_clip ``CLIP`` without re-implementing its math: the forward passes call the
model's own modules (``visual._embeds``/``_pool``, each block's ``ln_1``/``attention``/``ls_1``/``ln_2``/``mlp``/
``ls_2``, ``ln_final``, projections), so with no adapter active every output equals open_clip's ``encode_image``
/ ``encode_text`` bit for bit. What it adds:

- taps (:meth:`ClipBackbone.image_features`): FSMoE's per-block CLS tokens (raw residual stream after blocks
  1..L−1, FSMoE's ``clip_revised``), LoCoOp's local features from the last block's value path (its ``clip_w_local``),
  open_clip's final patch tokens, and the global embedding — all from one pass;
- text from token embeddings (:meth:`ClipBackbone.encode_text_embeddings`) for prompt learners, any number of
  prompts in one batched pass;
- adapter slots (:meth:`ClipBackbone.add_moe_adapters`): one :class:`~fsosr.nn.MoEAdapter` per block of either
  tower, parallel to the MLP and fed the post-attention residual ``h``:
  ``out = h + MLP(LN2(h)) + adapter(h)`` (MoE-Adapters4CL's ``mtil/clip/model.py``), with a task switch
  where task −1 bypasses every adapter (DDAS's plain CLIP).

The CLIP weights are frozen on construction; adapters added later are trainable.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsosr.models.clip_loading import build_open_clip, clip_config, save_open_clip
from fsosr.models.params import freeze, trainable_summary
from fsosr.nn.moe import MoEAdapter

__all__ = ["ClipBackbone", "ImageFeatures", "create_clip"]


@dataclass
class ImageFeatures:
    """What one image pass can return (fields not asked for are None).

    embedding: [B, D] the image embedding (``encode_image``, not normalised).
    layer_cls: [L−1, B, width] CLS token of the residual stream after blocks 1..L−1 (no LayerNorm).
    local: [B, P, D] LoCoOp's local features (value path of the last block, ``ln_post``, CLS dropped, ``@ proj``).
    patch_tokens: [B, P, width] ``ln_post`` of the final patch tokens (open_clip's ``output_tokens``).
    """
    embedding: torch.Tensor
    layer_cls: torch.Tensor | None = None
    local: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None


class _TextTower:
    """Uniform access to the text transformer of open_clip's ``CLIP`` (attributes on the model) and
    ``CustomTextCLIP`` (a ``TextTransformer`` in ``model.text``)."""

    def __init__(self, model: nn.Module):
        owner = getattr(model, "text", model)
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(owner, attr):
                raise ValueError(f"{type(model).__name__}: text tower without {attr}; fsosr supports open_clip's own "
                                 f"text transformer (not Hugging Face towers)")
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise ValueError("text towers with a class token or padding mask (CoCa-style) are not supported")
        self.owner = owner
        self.pool_type = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        self.eos_id = getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))

    def __getattr__(self, name):
        # Called only for names missing from the instance. While copy.deepcopy or pickle rebuild a _TextTower,
        # "owner" is not set yet and they probe dunders such as __setstate__: answering those through
        # self.owner would call __getattr__("owner") again, without end.
        owner = self.__dict__.get("owner")
        if owner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(owner, name)


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP with taps and adapter slots (see the module docstring).

    Build with :func:`create_clip`. ``clip`` is the open_clip model (its state dict is the checkpoint format);
    ``vision_adapters``/``text_adapters`` are ``nn.ModuleList``s of per-block adapters, or None.
    """

    def __init__(self, clip: nn.Module, name: str):
        super().__init__()
        visual = getattr(clip, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise ValueError(f"{name}: fsosr's CLIP taps need open_clip's VisionTransformer image tower")
        self.clip = freeze(clip)
        self.name = name
        self._text = _TextTower(clip)
        self.vision_adapters: nn.ModuleList | None = None
        self.text_adapters: nn.ModuleList | None = None
        import open_clip
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)

    # --- basic facts ------------------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self._text.positional_embedding.shape[0])

    @property
    def image_size(self) -> int:
        return self._image_hw[0]

    @property
    def _image_hw(self) -> tuple[int, int]:
        size = self.clip.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @property
    def embed_dim(self) -> int:
        proj = self.clip.visual.proj
        return int(proj.shape[1]) if proj is not None else self.clip.visual.transformer.width

    @property
    def vision_width(self) -> int:
        return self.clip.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self._text.transformer.width

    @property
    def num_vision_blocks(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def text_is_causal(self) -> bool:
        """True when the text tower runs under a causal mask (CLIP's): a prompt's EOT state then ignores every
        position after it, so prompts may be cut after their EOT."""
        return self._text.attn_mask is not None

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._text.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale): 100 for OpenAI CLIP."""
        return self.clip.logit_scale.exp()

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """[P, context_length] token ids (SOT … EOT, zero padded), on the model's device."""
        return self.tokenizer(texts).to(self.clip.logit_scale.device)

    # --- adapter slots ----------------------------------------------------------------------------------------------
    def add_moe_adapters(self, towers: tuple[str, ...] = ("vision", "text"), **adapter_kwargs) -> list[MoEAdapter]:
        """One :class:`MoEAdapter` per block of each tower in ``towers`` (batch-first, the block's width; other
        arguments as MoEAdapter's: num_experts, k, bottleneck, num_routers, dropout, scale, noisy, backend, …).
        Replaces adapters already there. Returns the new adapters (vision first)."""
        created = []
        params = next(self.clip.parameters())
        for tower in towers:
            if tower not in ("vision", "text"):
                raise ValueError(f"towers: 'vision' and/or 'text', got {tower!r}")
            transformer = self.clip.visual.transformer if tower == "vision" else self._text.transformer
            self._check_plain_blocks(transformer, tower)
            adapters = nn.ModuleList(
                MoEAdapter(transformer.width, batch_first=True, dtype=params.dtype, device=params.device,
                           **adapter_kwargs) for _ in transformer.resblocks)
            setattr(self, f"{tower}_adapters", adapters)
            created.extend(adapters)
        return created

    @staticmethod
    def _check_plain_blocks(transformer: nn.Module, tower: str) -> None:
        for block in transformer.resblocks:
            missing = [a for a in ("ln_1", "attention", "ls_1", "ln_2", "mlp", "ls_2") if not hasattr(block, a)]
            if missing:
                raise ValueError(f"{tower} tower: adapter slots need open_clip's ResidualAttentionBlock; "
                                 f"{type(block).__name__} lacks {missing}")

    def adapters(self) -> list[MoEAdapter]:
        return [a for group in (self.vision_adapters, self.text_adapters) if group is not None for a in group]

    def set_task(self, task: int) -> None:
        """Route every adapter with router ``task``; −1 runs plain CLIP (DDAS's "task −1")."""
        for adapter in self.adapters():
            adapter.active_task = task

    @contextlib.contextmanager
    def adapters_bypassed(self):
        """Within the block every adapter is skipped (outputs equal plain CLIP's)."""
        saved = [(a, a.bypass) for a in self.adapters()]
        for adapter, _ in saved:
            adapter.bypass = True
        try:
            yield self
        finally:
            for adapter, value in saved:
                adapter.bypass = value

    # --- block loop ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, attn_mask, adapter: MoEAdapter | None) -> torch.Tensor:
        """One residual block on batch-first x; with an active adapter the MLP gets a parallel adapter on h."""
        if adapter is None or adapter.bypass or adapter.active_task == -1:
            return block(x, attn_mask=attn_mask)
        h = x + block.ls_1(block.attention(block.ln_1(x), attn_mask=attn_mask))
        return h + block.ls_2(block.mlp(block.ln_2(h))) + adapter(h)

    def _run_blocks(self, transformer: nn.Module, x: torch.Tensor, attn_mask, adapters, *,
                    keep_cls: bool = False, stop_before_last: bool = False):
        """Run the blocks on x [B, L, width]; returns (x, [CLS after each block but the last] if ``keep_cls``).
        ``stop_before_last`` returns the last block's input instead of its output."""
        if not getattr(transformer, "batch_first", True):
            raise ValueError("fsosr runs open_clip transformers in their batch-first layout (open_clip >= 2.24)")
        blocks = transformer.resblocks
        cls_tokens = []
        for i, block in enumerate(blocks):
            if stop_before_last and i == len(blocks) - 1:
                break
            x = self._block(block, x, attn_mask, adapters[i] if adapters is not None else None)
            if keep_cls and i < len(blocks) - 1:
                cls_tokens.append(x[:, 0])
        return x, cls_tokens

    # --- image side -------------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] → [B, D]; equals open_clip's ``encode_image`` when no adapter is active."""
        return self.image_features(images, normalize=normalize).embedding

    def image_features(self, images: torch.Tensor, *, layer_cls: bool = False, local: bool = False,
                       patch_tokens: bool = False, normalize: bool = False) -> ImageFeatures:
        """One pass over the image tower returning the taps asked for (see :class:`ImageFeatures`).
        ``normalize`` L2-normalises ``embedding`` and ``local`` (not the raw-residual taps)."""
        visual = self.clip.visual
        # the position embedding has a fixed grid: another size would fail later as a bare broadcasting error
        expected = (visual.conv1.in_channels, *self._image_hw)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.name} takes images [B, {', '.join(map(str, expected))}] (its image size), "
                             f"got {tuple(images.shape)}; resize them to {self._image_hw[0]}×{self._image_hw[1]}")
        x = visual._embeds(images.to(visual.conv1.weight.dtype))
        x, cls_tokens = self._run_blocks(visual.transformer, x, None, self.vision_adapters, keep_cls=layer_cls,
                                         stop_before_last=local)
        local_features = None
        if local:
            last = visual.transformer.resblocks[-1]
            local_features = self._value_path(last, x)
            adapter = self.vision_adapters[-1] if self.vision_adapters is not None else None
            x = self._block(last, x, None, adapter)
            local_features = visual.ln_post(local_features[:, 1:])
            if visual.proj is not None:
                local_features = local_features @ visual.proj
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
            local_features = F.normalize(local_features, dim=-1) if local_features is not None else None
        return ImageFeatures(
            embedding=pooled,
            layer_cls=torch.stack(cls_tokens) if layer_cls else None,
            local=local_features,
            patch_tokens=tokens if patch_tokens else None)

    @staticmethod
    def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """LoCoOp's v–v path of one block on its input x [B, L, width]: v = x + out_proj(V(LN1 x)); v += MLP(LN2 v)
        (no attention mixing: each token only sees itself)."""
        attn = block.attn
        width = x.shape[-1]
        if not getattr(attn, "_qkv_same_embed_dim", True):
            raise ValueError("local features need a fused in_proj (open_clip's nn.MultiheadAttention)")
        w_v = attn.in_proj_weight[2 * width:]
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        v = x + block.ls_1(attn.out_proj(F.linear(block.ln_1(x), w_v, b_v)))
        return v + block.ls_2(block.mlp(block.ln_2(v)))

    # --- text side --------------------------------------------------------------------------------------------------
    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """[P] position whose final state is the text embedding: the EOT token (open_clip's pooling rule)."""
        if self._text.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self._text.pool_type == "eos":
            return (tokens == self._text.eos_id).int().argmax(dim=-1)
        if self._text.pool_type == "last":
            return torch.full(tokens.shape[:1], tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        if self._text.pool_type == "first":
            return torch.zeros(tokens.shape[:1], dtype=torch.long, device=tokens.device)
        raise ValueError(f"unsupported text pooling {self._text.pool_type!r}")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[P, L] token ids → [P, D]; equals open_clip's ``encode_text`` when no adapter is active."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [P, L] token ids, got {tuple(tokens.shape)}")
        embeddings = self._text.token_embedding(tokens)
        return self.encode_text_embeddings(embeddings, self.pool_index(tokens), normalize=normalize)

    def encode_text_embeddings(self, embeddings: torch.Tensor, pool_index: torch.Tensor,
                               normalize: bool = False) -> torch.Tensor:
        """Text tower on token embeddings: [P, L, text_width] (e.g. a prompt learner's context spliced between
        SOT and the class tokens) and [P] pooling positions (``pool_index(tokens)``) → [P, D], all P prompts in
        one batched pass. L may be shorter than the context length (causal mask and positions are sliced)."""
        text = self._text
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.text_width:
            raise ValueError(f"embeddings must be [P, L, {self.text_width}], got {tuple(embeddings.shape)}")
        n_prompts, length = embeddings.shape[:2]
        if length > self.context_length:
            raise ValueError(f"prompts of {length} tokens exceed the context length {self.context_length}")
        if pool_index.shape != (n_prompts,):
            raise ValueError(f"pool_index must be [{n_prompts}], got {tuple(pool_index.shape)}")
        cast_dtype = text.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
        attn_mask = text.attn_mask
        if attn_mask is not None and length != attn_mask.shape[0]:
            attn_mask = attn_mask[:length, :length]
        x, _ = self._run_blocks(text.transformer, x, attn_mask, self.text_adapters)
        x = text.ln_final(x)
        pooled = x[torch.arange(n_prompts, device=x.device), pool_index]
        projection = text.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # --- logits, summaries, saving ----------------------------------------------------------------------------------
    def zero_shot_logits(self, images: torch.Tensor, texts_or_tokens) -> torch.Tensor:
        """[B, C] exp(logit_scale)·cos(image, class text) for class prompts given as strings or token ids."""
        tokens = self.tokenize(texts_or_tokens) if not isinstance(texts_or_tokens, torch.Tensor) else texts_or_tokens
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        return self.logit_scale * image @ text.t()

    def trainable_summary(self) -> str:
        return trainable_summary(self)

    def save(self, path: str | os.PathLike):
        """Write the CLIP weights (not adapters) so that ``create_clip(self.name, path)`` rebuilds this model."""
        return save_open_clip(self.clip, self.name, path)


def create_clip(name: str, checkpoint: str | os.PathLike | None = None, *, precision: str = "fp32",
                device: str | torch.device = "cpu") -> ClipBackbone:
    """A frozen :class:`ClipBackbone` of architecture ``name`` (open_clip name or ``fsosr-tiny``/``fsosr-digits``)
    with weights from the local file ``checkpoint`` (open_clip state dict or OpenAI TorchScript ``.pt``; random
    init when None). See :mod:`fsosr.models.clip_loading` for formats and errors."""
    clip_config(name)  # unknown names fail here, before any work
    return ClipBackbone(build_open_clip(name, checkpoint, precision=precision, device=device), name)
