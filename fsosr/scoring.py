"""Per-sample "knownness" scores: HIGHER = MORE KNOWN (in-distribution), for every function here.

A score turns a model's outputs into one number per sample; `fsosr.metrics` then compares the scores of known and
unknown samples. Every score here uses the same sign, so ``auroc(score(known), score(unknown))`` is > 0.5 for a
useful detector whichever score is picked.

| name        | formula (per sample)                                   | used by                                    |
|-------------|--------------------------------------------------------|--------------------------------------------|
| ``msp``     | max_c softmax(logits)_c                                | Hendrycks & Gimpel baseline; FSMoE's F1     |
| ``max_logit``| max_c logits_c  (MLS)                                 | FSMoE, Vaze et al. ("closed-set is all...")|
| ``energy``  | T * logsumexp(logits / T)   (= minus the free energy)  | Liu et al. 2020; OpenOOD's EBO              |
| ``entropy`` | sum_c p_c log p_c            (= minus the entropy)     | OpenOOD-style baseline                      |
| ``mcm``     | max_c softmax(cos(f, t_c) / T)                         | MCM; LoCoOp (T = 1)                        |
| ``gl_mcm``  | mcm(global) + max_r max_c softmax(cos(f_r, t_c) / T)   | GL-MCM; LoCoOp (T = 1)                     |

All functions take torch tensors and return a float tensor with the class (last) dimension reduced: logits
``[N, C] -> [N]`` (other leading dimensions are kept). Nothing here needs or blocks autograd: wrap calls in
``torch.no_grad()`` at evaluation time as usual. Half-precision inputs are computed in float32,
because an fp16 softmax saturates at 1.0 and turns many distinct confidences into ties that change AUROC/FPR@95.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["msp", "max_logit", "energy", "entropy", "mcm", "gl_mcm", "LOGIT_SCORES", "score_logits"]


def _as_float_logits(x: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a [..., C] tensor of class scores and return it in float32 (float64 stays float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., C] with C >= 1 classes, got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    return x if x.dtype == torch.float64 else x.float()


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability: ``max_c softmax(logits)_c``, in [1/C, 1]; higher = more known.

    logits: [N, C] (any leading dims) -> [N]. For CLIP logits (100 * cosine) this is MCM at T = 0.01.
    """
    logits = _as_float_logits(logits, "logits")
    return torch.softmax(logits, dim=-1).amax(dim=-1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit (MLS): ``max_c logits_c``; higher = more known.  logits: [N, C] -> [N].

    The score FSMoE and Vaze et al. evaluate with (ARPL ``test`` on ``100 * cos`` logits).
    """
    logits = _as_float_logits(logits, "logits")
    return logits.amax(dim=-1)


def energy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Energy score: ``T * logsumexp(logits / T)``; higher = more known.  logits: [N, C] -> [N].

    This is MINUS the free energy ``E(x) = -T logsumexp(f(x)/T)`` of Liu et al. (2020); OpenOOD's EBO
    postprocessor returns the same sign as its "conf". T > 0 (default 1, as in both).
    """
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    logits = _as_float_logits(logits, "logits")
    # Shift by the row max before dividing by T: logits / T alone overflows for small T (1e37 / 0.01 is inf in
    # fp32) although the score itself is representable. The shift cancels exactly (detached: no gradient change);
    # an infinite max (all -inf, or a +inf logit) is not shifted, which keeps those rows at -inf / +inf.
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return shift.squeeze(-1) + T * torch.logsumexp((logits - shift) / T, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the softmax: ``sum_c p_c log p_c`` in [-log C, 0]; higher = more known.

    logits: [N, C] -> [N]. Computed from log_softmax; p = 0 (a -inf logit, or underflow) contributes exactly 0.
    """
    logits = _as_float_logits(logits, "logits")
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # A -inf logit gives p = 0 and log p = -inf, whose product is NaN: zero log p there instead (masking log p
    # rather than the product also keeps the gradient finite). NaN rows (all logits -inf) stay NaN.
    return (p * log_p.masked_fill(p == 0, 0.0)).sum(dim=-1)


def _cosine_softmax_max(features: torch.Tensor, text_features: torch.Tensor, T: float) -> torch.Tensor:
    """max_c softmax_c(cos(features, text_c) / T) for features [..., D] and text_features [C, D] -> [...]."""
    features = torch.nn.functional.normalize(features, dim=-1)
    text = torch.nn.functional.normalize(text_features, dim=-1)
    cosine = features @ text.t()  # [..., C]
    return torch.softmax(cosine / T, dim=-1).amax(dim=-1)


def _check_features(features: torch.Tensor, name: str, dims: int, text_features: torch.Tensor) -> torch.Tensor:
    features = _as_float_logits(features, name)
    if features.dim() != dims:
        shape = "[N, D]" if dims == 2 else "[N, R, D]"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(features.shape)}")
    if features.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"{name} has feature size {features.shape[-1]} but text_features has "
                         f"{text_features.shape[-1]}; both must be [..., D] with the same D")
    return features


def _check_text(text_features: torch.Tensor, T: float) -> torch.Tensor:
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    text_features = _as_float_logits(text_features, "text_features")
    if text_features.dim() != 2 or text_features.shape[0] == 0:
        raise ValueError(f"text_features must have shape [C, D] with C >= 1, got {tuple(text_features.shape)}")
    return text_features


def mcm(image_features: torch.Tensor, text_features: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Maximum Concept Matching: ``max_c softmax_c(cos(f, t_c) / T)``; higher = more known.

    image_features: [N, D]; text_features: [C, D] (one prompt embedding per known class) -> [N] in [1/C, 1].
    Both are L2-normalised here, so raw CLIP embeddings can be passed. T = 1 is MCM's and LoCoOp's default; the
    softmax is taken over cosines, not over ``100 * cos`` logits (those give MSP, i.e. T = 0.01).
    """
    text_features = _check_text(text_features, T)
    image_features = _check_features(image_features, "image_features", 2, text_features)
    return _cosine_softmax_max(image_features, text_features.to(image_features.dtype), T)


def gl_mcm(global_features: torch.Tensor, local_features: torch.Tensor, text_features: torch.Tensor,
           T: float = 1.0) -> torch.Tensor:
    """Global-Local MCM: ``mcm(global) + max_r max_c softmax_c(cos(f_r, t_c) / T)``; higher = more known.

    global_features: [N, D] (the image embedding); local_features: [N, R, D] (R region/patch embeddings, for
    LoCoOp the projected value-path tokens); text_features: [C, D] -> [N] in [2/C, 2].
    As in LoCoOp's ``test_ood``: the local softmax is per region over classes, then the max over regions and
    classes; the global and local terms are added with unit weight.
    """
    text_features = _check_text(text_features, T)
    global_features = _check_features(global_features, "global_features", 2, text_features)
    local_features = _check_features(local_features, "local_features", 3, text_features)
    if local_features.shape[0] != global_features.shape[0]:
        raise ValueError(f"local_features has {local_features.shape[0]} samples but global_features has "
                         f"{global_features.shape[0]}")
    if local_features.shape[1] == 0:
        raise ValueError("local_features must have at least one region (shape [N, R, D] with R >= 1)")
    text = text_features.to(global_features.dtype)
    global_score = _cosine_softmax_max(global_features, text, T)
    local_score = _cosine_softmax_max(local_features.to(global_features.dtype), text, T).amax(dim=-1)
    return global_score + local_score


# Scores that need only the logits, by the names used in configs and on the command line.
LOGIT_SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "msp": msp,
    "mls": max_logit,
    "max_logit": max_logit,
    "energy": energy,
    "entropy": entropy,
}


def score_logits(name: str, logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """Apply the logit score called ``name`` (a key of ``LOGIT_SCORES``), e.g. ``score_logits("energy", x, T=1)``."""
    try:
        fn = LOGIT_SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; choose one of {sorted(LOGIT_SCORES)}") from None
    return fn(logits, **kwargs)
