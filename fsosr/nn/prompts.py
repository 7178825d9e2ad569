"""Text prompt learners on a frozen :class:`~fsosr.models.clip.ClipBackbone`: CoOp here, the image-conditioned
CoCoOp and FSMoE learners in :mod:`fsosr.nn.prompts_conditional`.

A prompt for class c is built the way CoOp builds it: the text ``"X X … X {name}."`` (one ``X`` per context token)
is tokenised once; its token embeddings give a fixed prefix (SOT) and suffix (class name, ".", EOT, padding), kept
as buffers, and the learnable context vectors replace the ``X`` embeddings. With the context set to the token
embeddings of real words, the prompt is exactly the embedding of the equivalent text, so the text features equal
``clip.encode_text(clip.tokenize(text))``.

Truncation (``truncate=True``, the default). The text tower is causal, so the state at the EOT token — the only
one the text embedding reads — never sees the padding after it. The learners therefore keep only the first
``max(EOT position) + 1`` tokens: for short class names (CIFAR, digits) that is ~10 of 77 tokens, a several-fold
cut in the text encoder's cost, which dominates instance-conditioned methods (B·C prompts a step; in FSMoE it
outweighs the MoE). The result equals the full-length pass up to float rounding (summation order inside attention
changes), not bit for bit; ``truncate=False`` reproduces open_clip bitwise. Text towers without a causal mask are
never truncated.

The learner holds a reference to the CLIP but does not register it as a submodule: ``parameters()`` and
``state_dict()`` hold only what the method trains (the prefix/suffix buffers are rebuilt from the CLIP and the class
names, so they are not saved), and the CLIP is moved between devices by its owner, not by the learner.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # fsosr.models imports fsosr.nn; a runtime import here would be circular
    from fsosr.models.clip import ClipBackbone

__all__ = ["CoOpPromptLearner", "ClassPrompts"]

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
_PLACEHOLDER = "X"  # CoOp's context placeholder; one BPE token, checked at build time


def _clean_class_names(class_names) -> list[str]:
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names, not one string")
    names = [str(n).replace("_", " ").strip() for n in class_names]  # CoOp: "sea_lion" -> "sea lion"
    if not names:
        raise ValueError("class_names is empty: a prompt learner needs at least one class")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"class_names: empty name at positions {empty}")
    return names


@contextlib.contextmanager
def seeded(generator: torch.Generator | None):
    """Draw module initialisations from ``generator`` without touching the global RNG.

    With None, draws come from torch's global CPU generator (as in the seeds, under ``torch.manual_seed``). With a
    generator, one seed is drawn from it and the global CPU generator is forked and re-seeded for the block, so
    ``nn.Linear`` constructors (which take no generator) are deterministic too. Build on the CPU inside the block.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ClassPrompts(nn.Module):
    """The class-dependent, fixed half of every prompt learner (CoOp's construction, see the module docstring).

    Args:
        clip: the frozen backbone (kept as a plain reference).
        class_names: C names; ``_`` becomes a space.
        n_ctx: context tokens; ignored when ``ctx_init`` is given (then n_ctx = its number of BPE tokens, which is
            CoOp's word count for ordinary words such as "a photo of a").
        ctx_init: words whose token embeddings initialise the context, or None/"" for random init.
        class_token_position: "end" (``SOT ctx name . EOT``), "middle" (``SOT ctx[:n//2] name ctx[n//2:] . EOT``)
            or "front" (``SOT name ctx . EOT``), as CoOp.
        truncate: keep only the tokens up to the last EOT (see the module docstring).

    Buffers: ``token_prefix [C, 1, width]``, ``token_suffix [C, L−1−n_ctx, width]``, ``pool_index [C]`` (EOT
    positions), ``name_lengths [C]``, and ``token_order [C, L]`` (None for "end"). ``init_embedding`` is
    ``[n_ctx, width]`` (the words of ``ctx_init``) or None.
    """

    def __init__(self, clip: ClipBackbone, class_names, n_ctx: int = 16, ctx_init: str | None = None,
                 class_token_position: str = "end", truncate: bool = True):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, "
                             f"got {class_token_position!r}")
        object.__setattr__(self, "clip", clip)  # a reference, not a submodule (module docstring)
        self.class_names = _clean_class_names(class_names)
        self.class_token_position = class_token_position
        ctx_init = ctx_init.replace("_", " ").strip() if ctx_init else None
        init_ids = clip.tokenizer.encode(ctx_init) if ctx_init else None
        if init_ids is not None:
            n_ctx = len(init_ids)
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.n_ctx, self.ctx_init = n_ctx, ctx_init
        self._check_lengths(clip, init_ids)
        self._build_buffers(clip, init_ids, truncate and clip.text_is_causal)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def prompt_length(self) -> int:
        """L: tokens per prompt (the context length, or the longest prompt when truncated)."""
        return 1 + self.n_ctx + self.token_suffix.shape[1]

    def _check_lengths(self, clip: ClipBackbone, init_ids) -> None:
        """Every prompt must fit the context with its EOT; the tokenizer would silently cut it otherwise."""
        limit = clip.context_length
        what = f"ctx_init {self.ctx_init!r} ({self.n_ctx} tokens)" if init_ids else f"n_ctx={self.n_ctx}"
        if self.n_ctx + 4 > limit:  # SOT, ≥1 name token, ".", EOT
            raise ValueError(f"{what} leaves no room for a class name in the context length {limit}")
        for name in self.class_names:
            needed = 2 + self.n_ctx + len(clip.tokenizer.encode(f"{name}."))
            if needed > limit:
                raise ValueError(f"{what}: the prompt for class {name!r} needs {needed} tokens, more than the "
                                 f"context length {limit}")

    @torch.no_grad()
    def _build_buffers(self, clip: ClipBackbone, init_ids, truncate: bool) -> None:
        placeholder = " ".join([_PLACEHOLDER] * self.n_ctx)
        tokens = clip.tokenize([f"{placeholder} {name}." for name in self.class_names])
        x_id = clip.tokenizer.encode(_PLACEHOLDER)
        if len(x_id) != 1 or not bool((tokens[:, 1:1 + self.n_ctx] == x_id[0]).all()):
            raise RuntimeError("the tokenizer does not map each placeholder 'X' to one token")
        pool_index = clip.pool_index(tokens)
        length = int(pool_index.max()) + 1 if truncate else tokens.shape[1]
        embedding = clip.token_embedding(tokens[:, :length])
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("pool_index", pool_index, persistent=False)
        name_lengths = torch.tensor([len(clip.tokenizer.encode(n)) for n in self.class_names], device=tokens.device)
        self.register_buffer("name_lengths", name_lengths, persistent=False)
        self.register_buffer("token_order", self._token_order(length, name_lengths), persistent=False)
        init = None
        if init_ids is not None:
            init = clip.token_embedding(torch.tensor(init_ids, device=tokens.device)).clone()
        self.register_buffer("init_embedding", init, persistent=False)

    def _token_order(self, length: int, name_lengths: torch.Tensor) -> torch.Tensor | None:
        """[C, L] positions in the "end" layout (SOT ctx name rest) to read for the chosen layout, or None."""
        if self.class_token_position == "end":
            return None
        n, half = self.n_ctx, self.n_ctx // 2
        rows = []
        for name_len in name_lengths.tolist():  # C small lists at build time; the forward is one gather
            ctx = list(range(1, 1 + n))
            name = list(range(1 + n, 1 + n + name_len))
            rest = list(range(1 + n + name_len, length))
            if self.class_token_position == "middle":
                rows.append([0] + ctx[:half] + name + ctx[half:] + rest)
            else:
                rows.append([0] + name + ctx + rest)
        return torch.tensor(rows, dtype=torch.long, device=name_lengths.device)

    def assemble(self, ctx: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings [N, L, width] from per-prompt context ``ctx [N, n_ctx, width]`` and the class of each
        prompt ``class_ids [N]`` (None: N = C, prompt c is class c)."""
        if ctx.dim() != 3 or ctx.shape[1:] != (self.n_ctx, self.token_prefix.shape[-1]):
            raise ValueError(f"ctx must be [N, {self.n_ctx}, {self.token_prefix.shape[-1]}], got {tuple(ctx.shape)}")
        prefix, suffix, order = self.token_prefix, self.token_suffix, self.token_order
        if class_ids is not None:
            prefix, suffix = prefix.index_select(0, class_ids), suffix.index_select(0, class_ids)
            order = order.index_select(0, class_ids) if order is not None else None
        if ctx.shape[0] != prefix.shape[0]:
            raise ValueError(f"ctx holds {ctx.shape[0]} prompts for {prefix.shape[0]} classes")
        prompts = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)
        if order is not None:
            prompts = prompts.gather(1, order.unsqueeze(-1).expand_as(prompts))
        return prompts

    def init_context(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """Initial context of ``shape`` (last two dims n_ctx × width): the ``ctx_init`` words repeated over the
        leading dims, else N(0, std²) from the global CPU generator (wrap the call in :func:`seeded`)."""
        if self.init_embedding is not None:
            return self.init_embedding.expand(shape).clone()
        ctx = torch.empty(shape, dtype=self.token_prefix.dtype).normal_(0.0, std)
        return ctx.to(self.token_prefix.device)

    def encode_batched(self, ctx: torch.Tensor, normalize: bool = True, chunk_size: int | None = None):
        """Text features [B, C, D] of image-conditioned prompts: ``ctx [B, n_ctx, width]`` is image b's context,
        shared by its C class prompts. All B·C prompts go through the text tower together, ``chunk_size`` prompts
        per pass at most (None: one pass).

        Memory: one pass holds B·C·L·width prompt embeddings and the text tower's activations for B·C sequences
        (e.g. 32 images × 200 classes × 77 × 512 fp32 = 1 GB per activation tensor). Chunking bounds the peak
        under ``torch.no_grad()``; with autograd every chunk's activations stay saved for backward, so training
        memory still grows with B·C (chunking then only trims the transient buffers).
        """
        if ctx.dim() != 3:
            raise ValueError(f"ctx must be [B, n_ctx, width], got {tuple(ctx.shape)}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        n_images, n_classes = ctx.shape[0], self.num_classes
        total = n_images * n_classes
        step = total if chunk_size is None else min(chunk_size, total)
        features = []
        for start in range(0, total, max(step, 1)):
            flat = torch.arange(start, min(start + step, total), device=ctx.device)
            image_ids, class_ids = flat // n_classes, flat % n_classes  # image-major: row b·C + c
            prompts = self.assemble(ctx.index_select(0, image_ids), class_ids)
            features.append(self.clip.encode_text_embeddings(prompts, self.pool_index.index_select(0, class_ids),
                                                             normalize=normalize))
        if not features:  # B = 0
            return ctx.new_zeros(0, n_classes, self.clip.embed_dim)
        return torch.cat(features).view(n_images, n_classes, -1)


class CoOpPromptLearner(ClassPrompts):
    """CoOp's learnable context (Zhou et al. 2022), used by CoOp and LoCoOp (Miyai et al. 2023).

    Args:
        clip: a frozen :class:`~fsosr.models.clip.ClipBackbone`.
        class_names: C class names.
        n_ctx: context tokens (16 in CoOp/LoCoOp); replaced by the token count of ``ctx_init`` when given.
        ctx_init: e.g. "a photo of a" to start from those words' embeddings; None (LoCoOp) for N(0, init_std²).
        class_specific: one context per class (CoOp's CSC, ``ctx [C, n_ctx, width]``) instead of one shared
            ``[n_ctx, width]``. With ``ctx_init`` every class starts from the same words (CoOp ignores CSC then).
        class_token_position: "end", "middle" or "front" (see :class:`ClassPrompts`).
        init_std: 0.02.  truncate: see the module docstring.  generator: for a reproducible random init.

    Only ``ctx`` is trainable. Example::

        learner = CoOpPromptLearner(clip, ["cat", "dog"], n_ctx=16)
        text = learner.text_features()                     # [C, D], normalised
        logits = learner.logits(clip.encode_image(images, normalize=True))   # [B, C]
    """

    def __init__(self, clip: ClipBackbone, class_names, n_ctx: int = 16, ctx_init: str | None = None,
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 truncate: bool = True, generator: torch.Generator | None = None):
        super().__init__(clip, class_names, n_ctx, ctx_init, class_token_position, truncate)
        self.class_specific = bool(class_specific)
        width = self.token_prefix.shape[-1]
        shape = (self.num_classes, self.n_ctx, width) if self.class_specific else (self.n_ctx, width)
        with seeded(generator):
            self.ctx = nn.Parameter(self.init_context(shape, init_std))

    def forward(self) -> torch.Tensor:
        """Prompt embeddings [C, L, width] (text tower input; their EOT positions are ``pool_index [C]``)."""
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        return self.assemble(ctx)

    def text_features(self, normalize: bool = True) -> torch.Tensor:
        """[C, D] text embeddings of all class prompts, one batched text-tower pass."""
        return self.clip.encode_text_embeddings(self(), self.pool_index, normalize=normalize)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C] = exp(logit_scale)·⟨f_b, t_c⟩ for L2-normalised image features ``[B, D]`` (or local features
        ``[B, P, D]`` → ``[B, P, C]``, LoCoOp's local logits)."""
        return self.clip.logit_scale * image_features @ self.text_features(normalize=True).t()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
                f"class_specific={self.class_specific}, position={self.class_token_position!r}, "
                f"prompt_length={self.prompt_length}")
