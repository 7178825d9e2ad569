"""The pieces working together: MoE-Adapters4CL's setup (MoE adapters in both towers of a frozen CLIP, text
re-encoded every step, CE over class prompts, AdamW, activate-freeze between tasks) trains on the tiny CLIP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsosr.models.clip import create_clip
from fsosr.nn import MoEAdapter

CLASSES = ["a photo of the digit zero.", "a photo of the digit one.", "a photo of the digit two."]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    clip = create_clip("fsosr-tiny")
    clip.add_moe_adapters(num_experts=4, k=2, bottleneck=8, num_routers=2)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return clip, images, labels, clip.tokenize(CLASSES)


def _step(clip, optimizer, images, labels, tokens, seed: int) -> float:
    torch.manual_seed(seed)  # gate noise and dropout draw from the global generator here
    image = clip.encode_image(images, normalize=True)
    text = clip.encode_text(tokens, normalize=True)
    loss = F.cross_entropy(clip.logit_scale * image @ text.t(), labels, label_smoothing=0.2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def test_moe_adapters_train_and_count_selections():
    clip, images, labels, tokens = _setup()
    clip.train()
    params = [p for p in clip.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in clip.clip.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = [_step(clip, optimizer, images, labels, tokens, seed=s) for s in range(25)]
    assert min(losses[-5:]) < losses[0] - 0.05, losses
    for adapter in clip.vision_adapters:
        # every training forward routes each image to k experts: 25 steps x 6 images x 2
        assert int(adapter.selection_counts.sum()) == 25 * 6 * 2
    for adapter in clip.text_adapters:
        assert int(adapter.selection_counts.sum()) == 25 * 3 * 2


def test_frozen_experts_stay_bitwise_unchanged_on_the_next_task():
    clip, images, labels, tokens = _setup(seed=1)
    clip.train()
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    MoEAdapter.attach_all(clip, optimizer)
    for s in range(5):                                   # task 0
        _step(clip, optimizer, images, labels, tokens, seed=s)
    frozen = {}
    for i, adapter in enumerate(clip.adapters()):        # activate-freeze: the 2 most used experts per block
        ids = adapter.most_selected(2)
        adapter.freeze_experts(ids)
        frozen[i] = (ids, adapter.w_down.detach()[ids].clone(), adapter.w_up.detach()[ids].clone())
    clip.set_task(1)
    before_router0 = [a.routers[0].gate.weight.detach().clone() for a in clip.adapters()]
    for s in range(5, 10):                               # task 1 with its own router
        _step(clip, optimizer, images, labels, tokens, seed=s)
    moved = 0
    for i, adapter in enumerate(clip.adapters()):
        ids, w_down, w_up = frozen[i]
        assert torch.equal(adapter.w_down.detach()[ids], w_down)
        assert torch.equal(adapter.w_up.detach()[ids], w_up)
        free = [e for e in range(adapter.num_experts) if e not in ids]
        moved += int(adapter.w_up.grad is not None and adapter.w_up.grad[free].abs().sum() > 0)
        # task 0's router gets no gradient on task 1 (AdamW skips it; weight decay would show as a change)
        assert torch.equal(adapter.routers[0].gate.weight, before_router0[i])
    assert moved > 0


def test_bypass_gives_zero_shot_clip_logits_after_training():
    clip, images, labels, tokens = _setup(seed=2)
    with torch.no_grad():
        zero_shot = clip.zero_shot_logits(images, tokens)
    clip.train()
    optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=1e-2)
    for s in range(3):
        _step(clip, optimizer, images, labels, tokens, seed=s)
    clip.eval()
    with torch.no_grad():
        assert not torch.allclose(clip.zero_shot_logits(images, tokens), zero_shot, atol=1e-4)
        clip.set_task(-1)
        assert torch.equal(clip.zero_shot_logits(images, tokens), zero_shot)
