"""Plain-PyTorch versions of every fsosr op.

These are the seeds' semantics written out with stock tensor ops. They are the oracle every backend is tested
against (run them in fp64), and the fallback wherever no native backend can run. Autograd, ``torch.compile`` and
every device work through them because they are nothing but ordinary PyTorch.

Each function returns exactly the tensors the native ops return (same order, shapes and dtypes), so a test can
compare any backend with ``reference`` field by field.
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); fp32, fp16 and bf16 are accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_route(logits: torch.Tensor, k: int, renormalize: bool = True,
               noise: torch.Tensor | None = None, noise_std: torch.Tensor | None = None):
    """Top-k routing of N units over E experts (Shazeer et al. 2017, as FSMoE and MoE-Adapters4CL use it).

    Args:
        logits: [N, E] clean router logits.
        k: experts kept per unit, 1 <= k <= E.
        renormalize: True -> gates = softmax over the k kept noisy logits (FSMoE, MoE-Adapters4CL);
            False -> softmax over all E noisy logits, then the k largest probabilities (not renormalised).
        noise, noise_std: both None (clean routing) or both [N, E]; the noisy logits are
            ``logits + noise * noise_std`` (noise: standard-normal draws, treated as a constant).

    Returns ``(indices, gates, counts, order, offsets, importance, load, next_index)``:
        indices [N, k] int32: chosen experts, best first; ties go to the lower expert index, NaN ranks highest.
        gates [N, k] (fp32, fp64 for fp64 logits).
        counts [E] int32: units routed to each expert.
        order [N*k] int32: flat ids n*k + j sorted by expert, stable (ascending flat id within an expert).
        offsets [E+1] int32: offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e].
        importance [E]: sum over units of the gate given to each expert.
        load [E]: with noise and k < E, Shazeer's smooth load sum_n Phi((logits[n,e] - thr[n,e]) / noise_std[n,e]),
            thr = the (k+1)-th largest noisy logit of row n if e is selected, else the k-th; otherwise counts.
        next_index [N] int32: the expert ranked k+1 (the "in" threshold of the smooth load), -1 when k == E.
    """
    acc = accumulation_dtype(logits.dtype)
    n_units, n_experts = logits.shape
    clean = logits.to(acc)
    noisy = clean if noise is None else clean + noise.to(acc) * noise_std.to(acc)

    # A stable descending sort keeps equal values in ascending expert order (ties -> lower index) and puts NaN
    # first, which is the order every native backend reproduces.
    ranked_values, ranked_experts = torch.sort(noisy, dim=1, descending=True, stable=True)
    top_experts = ranked_experts[:, :k]
    if renormalize:
        gates = torch.softmax(ranked_values[:, :k], dim=1)
    else:
        gates = torch.softmax(noisy, dim=1).gather(1, top_experts)

    flat_experts = top_experts.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=logits.device)
    counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
    # int32 keys: torch sorts them with a radix sort, hundreds of times faster than int64 keys on the CPU.
    order = torch.sort(flat_experts.to(torch.int32), stable=True).indices
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    importance = torch.zeros(n_experts, dtype=acc, device=logits.device).index_add(
        0, flat_experts, gates.reshape(-1))

    if k < n_experts:
        next_index = ranked_experts[:, k]
    else:
        next_index = torch.full((n_units,), -1, dtype=torch.int64, device=logits.device)

    if noise is not None and k < n_experts:
        threshold_if_in = ranked_values[:, k:k + 1]       # (k+1)-th noisy logit
        threshold_if_out = ranked_values[:, k - 1:k]      # k-th noisy logit
        selected = torch.zeros_like(noisy, dtype=torch.bool).scatter_(1, top_experts, True)
        threshold = torch.where(selected, threshold_if_in, threshold_if_out)
        # A disabled expert (clean -inf) has margin -inf (Phi 0), also against a -inf threshold (which would give
        # NaN); a finite logit against a -inf threshold has margin +inf (Phi 1). Non-finite margins get no
        # gradient (phi(z) * z -> 0): the margin is computed from masked inputs there, so autograd sees no inf.
        live = torch.isfinite(clean) & torch.isfinite(threshold)
        margin = (torch.where(live, clean, 0.0) - torch.where(live, threshold, 0.0)) / noise_std.to(acc)
        margin = torch.where(live, margin, torch.where(clean == float("-inf"), float("-inf"), float("inf")))
        prob_in_top_k = torch.special.ndtr(margin)
        load = prob_in_top_k.sum(0)
    else:
        load = counts.to(acc)

    return (top_experts.to(torch.int32), gates, counts.to(torch.int32), order.to(torch.int32),
            offsets.to(torch.int32), importance, load, next_index.to(torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# Mixture-of-experts MLP (docs/ops/moe_mlp.md)
# ---------------------------------------------------------------------------------------------------------------
ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,                               # erf form, as torch.nn.GELU()
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),          # OpenAI CLIP's QuickGELU
    "identity": lambda t: t,
}


def dropout_keep_mask(seed: int, p: float, n_units: int, k: int, group_size: int, hidden: int,
                      device: torch.device) -> torch.Tensor:
    """Bool [N, k, G, h]: which hidden activations of (unit, slot, token, channel) survive dropout p.

    Element (n, j, t, c) is kept iff uniform(seed, ((n*k + j)*G + t)*h + c) >= p (fsosr.ops._rng), the same
    counter every backend hashes, so masks agree everywhere and backward passes recompute them.
    """
    from fsosr.ops._rng import uniform_from_seed  # noqa: PLC0415 - avoid an import cycle at package import

    counters = torch.arange(n_units * k * group_size * hidden, device=device)
    return (uniform_from_seed(counters, seed) >= p).reshape(n_units, k, group_size, hidden)


def _empty_output(shape, dtype, *inputs: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` (an empty batch) that depend on every input through an empty slice, so backward runs
    and gives each input a zero gradient, as the native backends' ops do (a plain torch.zeros has no graph, and
    ``autograd.grad`` of it raises)."""
    link = sum(t.reshape(-1)[:0].sum().to(dtype) for t in inputs if t.is_floating_point())
    return torch.zeros(shape, dtype=dtype, device=inputs[0].device) + link


def moe_mlp(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, group_size: int = 1, activation: str = "relu", scale: float = 1.0,
            dropout: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The seeds' expert loop (MoE-Adapters4CL's dispatcher): for each expert, gather the units routed to it,
    run Linear → act → dropout → Linear on all their rows, weight by the gate and index_add into the output.

    x [N*G, d], indices/gates [N, k], w1 [E, d, h], b1 [E, h], w2 [E, h, d_out], b2 [E, d_out] -> [N*G, d_out].
    Accumulates in fp32 (fp64 for fp64 x); returns x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    n_units, k = indices.shape
    d_out = w2.shape[2]
    if n_units == 0:
        return _empty_output((0, d_out), x.dtype, x, gates, w1, b1, w2, b2)
    units = x.to(acc).reshape(n_units, group_size, x.shape[1])   # not -1: N or d may be 0
    act = ACTIVATIONS[activation]
    keep = (dropout_keep_mask(seed, dropout, n_units, k, group_size, w1.shape[2], x.device)
            if dropout > 0 else None)
    y = torch.zeros(n_units, group_size, d_out, dtype=acc, device=x.device)
    for e in range(w1.shape[0]):
        unit, slot = (indices == e).nonzero(as_tuple=True)
        if unit.numel() == 0:
            continue
        hidden = act(units[unit] @ w1[e].to(acc) + b1[e].to(acc))          # [n_e, G, h]
        if keep is not None:
            hidden = hidden * keep[unit, slot] / (1.0 - dropout)
        out = hidden @ w2[e].to(acc) + b2[e].to(acc)                       # [n_e, G, d_out]
        y = y.index_add(0, unit, out * gates[unit, slot].to(acc)[:, None, None])
    return (scale * y).reshape(n_units * group_size, d_out).to(x.dtype)


def moe_mlp_per_expert_input(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor,
                             b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str = "relu",
                             scale: float = 1.0, dropout: float = 0.0, seed: int = 0) -> torch.Tensor:
    """FSMoE's form: expert e reads its own input x[e] (the CLS token of ViT layer e).

    x [E, B, d], indices/gates [B, k] -> y [B, d_out] = scale * sum_j gates[b, j] * expert_e(x[e, b]).
    """
    acc = accumulation_dtype(x.dtype)
    n_units, k = indices.shape
    if n_units == 0:
        return _empty_output((0, w2.shape[2]), x.dtype, x, gates, w1, b1, w2, b2)
    act = ACTIVATIONS[activation]
    keep = dropout_keep_mask(seed, dropout, n_units, k, 1, w1.shape[2], x.device) if dropout > 0 else None
    y = torch.zeros(n_units, w2.shape[2], dtype=acc, device=x.device)
    for e in range(w1.shape[0]):
        unit, slot = (indices == e).nonzero(as_tuple=True)
        if unit.numel() == 0:
            continue
        hidden = act(x[e, unit].to(acc) @ w1[e].to(acc) + b1[e].to(acc))   # [n_e, h]
        if keep is not None:
            hidden = hidden * keep[unit, slot, 0] / (1.0 - dropout)
        out = hidden @ w2[e].to(acc) + b2[e].to(acc)
        y = y.index_add(0, unit, out * gates[unit, slot].to(acc)[:, None])
    return (scale * y).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# masked_adamw_ (MoSA's masked HF-AdamW step; semantics in fsosr/ops/masked_adamw.py)
# ---------------------------------------------------------------------------------------------------------------
MASKED_ADAMW_SEMANTICS = ("mosa", "skip", "freeze")
SHARED_OWNER = 255  # owner value of flat-buffer entries that are not split between experts


def masked_adamw_flat_(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
                       grads: torch.Tensor, owner: torch.Tensor, segment_offsets: torch.Tensor,
                       selected: torch.Tensor, weight_decay: torch.Tensor, lr: float, beta1: float, beta2: float,
                       eps: float, semantics: int, advance_steps: bool) -> None:
    """The native op's contract in plain PyTorch, on the flat buffers, in place (the ``reference`` backend).

    Same arguments as ``fsosr::masked_adamw_``; ``semantics`` is the index into MASKED_ADAMW_SEMANTICS.
    """
    n_experts = steps.shape[1] - 1
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=params.device), lengths)
    slot = torch.where(owner == SHARED_OWNER, n_experts, owner.long())
    drawn_slot = torch.zeros_like(steps, dtype=torch.bool)                       # [S, N+1]
    drawn_slot[:, n_experts] = True
    chosen = selected.reshape(len(selected), -1)                                 # [S, D]: every draw this step
    drawn_slot.scatter_(1, chosen, torch.ones_like(chosen, dtype=torch.bool))
    update_slot = drawn_slot | (steps > 0) if MASKED_ADAMW_SEMANTICS[semantics] == "mosa" else drawn_slot
    if advance_steps:
        steps += update_slot.long()
    t = steps.to(torch.float64).clamp(min=1)
    step_size = lr * torch.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)              # HF AdamW's bias correction
    update = update_slot[segment, slot]
    grad = torch.where(drawn_slot[segment, slot], grads, torch.zeros_like(grads))  # select: drops NaN elsewhere
    m_new = beta1 * exp_avg + (1 - beta1) * grad
    v_new = beta2 * exp_avg_sq + (1 - beta2) * (grad * grad)
    stepped = params - step_size[segment, slot].to(params.dtype) * (m_new / (v_new.sqrt() + eps))
    decayed = stepped - (lr * weight_decay[segment]).to(params.dtype) * stepped
    params.copy_(torch.where(update, decayed, params))
    exp_avg.copy_(torch.where(update, m_new, exp_avg))
    exp_avg_sq.copy_(torch.where(update, v_new, exp_avg_sq))


class SeedParam:
    """One dense parameter tensor as MoSA holds it: N dense expert copies are N SeedParams of one ``group``.

    group: which expert draw selects it (one per split projection per block); expert: None for a tensor every
    forward uses (shared down projection, adapter LayerNorm), else the expert this copy belongs to; mask: MoSA's
    ``p.mask`` (None: not masked; per-expert biases carry an all-ones mask, which is the same); weight_decay: the
    parameter group's (0.01 for weights, 0 for biases). ``grad`` and ``state`` are what torch and HF AdamW keep.
    """

    def __init__(self, value: torch.Tensor, *, group: int, expert: int | None = None,
                 mask: torch.Tensor | None = None, weight_decay: float = 0.0):
        self.value, self.group, self.expert, self.mask, self.weight_decay = value, group, expert, mask, weight_decay
        self.grad: torch.Tensor | None = None
        self.state: dict = {}


def seed_masked_adamw_step_(params: list[SeedParam], grads: list[torch.Tensor], selected, *, lr: float,
                            betas: tuple[float, float], eps: float, semantics: str) -> None:
    """One MoSA training step's gradient handling and optimizer step, written the seed's way.

    grads[i] is the dense gradient backward would give params[i] if its expert was used; selected[group] is the
    expert drawn for that group, or the experts drawn in the step's passes (a sequence or tensor). Then, as the seed does: unused experts get no gradient (``skip``/``freeze``:
    torch >= 2 ``zero_grad(set_to_none=True)``) or keep a zero one once they have had one (``mosa``: torch 1.11
    ``zero_grad()``); ``p.grad *= p.mask`` for every parameter; HF AdamW (transformers.AdamW, correct_bias=True):
    state created on a parameter's first gradient, bias correction from its own step count, eps added to sqrt(v),
    decoupled decay ``p -= lr * wd * p`` after the Adam step. ``freeze`` additionally keeps every entry outside a
    parameter's mask (params and moments) unchanged.
    """
    beta1, beta2 = betas
    for p, g in zip(params, grads):
        chosen = selected[p.group]
        drawn = {int(e) for e in torch.as_tensor(chosen).reshape(-1).tolist()}
        used = p.expert is None or p.expert in drawn
        if used:
            p.grad = g.clone()
        elif semantics == "mosa":
            p.grad = None if p.grad is None else torch.zeros_like(p.value)
        else:
            p.grad = None
        if p.grad is not None and p.mask is not None:
            p.grad *= p.mask
    for p in params:
        if p.grad is None:
            continue
        if not p.state:
            p.state = {"step": 0, "exp_avg": torch.zeros_like(p.value), "exp_avg_sq": torch.zeros_like(p.value)}
        state = p.state
        state["step"] += 1
        m = state["exp_avg"] * beta1 + p.grad * (1 - beta1)
        v = state["exp_avg_sq"] * beta2 + p.grad * p.grad * (1 - beta2)
        denom = v.sqrt() + eps
        step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
        new = p.value - step_size * (m / denom)
        new = new - lr * p.weight_decay * new
        if semantics == "freeze" and p.mask is not None:
            keep = p.mask.bool()
            new, m, v = torch.where(keep, new, p.value), torch.where(keep, m, state["exp_avg"]), \
                torch.where(keep, v, state["exp_avg_sq"])
        p.value, state["exp_avg"], state["exp_avg_sq"] = new, m, v
