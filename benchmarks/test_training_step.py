"""One MoE-Adapters4CL training step at the ViT-B/16 shape, end to end (DESIGN.md's "training step" target).

A frozen open_clip ViT-B/16 (random weights: the timing does not depend on them) with a MoE adapter (22 experts,
top-2, bottleneck 64, dropout 0.1, scale 0.1, noisy routing) beside the MLP of every block of both towers, as the
seed trains it: image features of a batch, text features of every class prompt re-encoded each step, CLIP logits,
cross-entropy, backward into the adapters and routers only, AdamW step.

Providers: `loop` — the adapters and routers on the `reference` backend (the seeds' per-expert loop and routing);
`fused` — the automatic backend (`cpu` here; on a GPU `triton` for the experts, `cuda` for the routing);
on a GPU also `fused-cuda` / `fused-triton`, one GPU backend for both.
Shapes: 4 images and 10 classes on the CPU (a ViT-B/16 step takes seconds on 2 cores), 64 images and 100 classes
on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, measure
from fsosr.models.clip import create_clip

BATCH, CLASSES = (64, 100) if DEVICE.type == "cuda" else (4, 10)


def training_step(backend: str | None):
    torch.manual_seed(0)
    clip = create_clip("ViT-B-16", device=DEVICE)
    clip.add_moe_adapters(num_experts=22, k=2, bottleneck=64, num_routers=1, backend=backend)
    clip.train()
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 224, 224, generator=g).to(DEVICE)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g).to(DEVICE)
    tokens = clip.tokenize([f"a photo of a class {i}." for i in range(CLASSES)]).to(DEVICE)

    def step():
        image = clip.encode_image(images, normalize=True)
        text = clip.encode_text(tokens, normalize=True)
        loss = F.cross_entropy(clip.logit_scale * image @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


# On a GPU also each GPU backend alone (routing and experts), to check the automatic choice inside a whole step,
# where the adapters' host work overlaps the frozen towers' GPU work.
GPU_PROVIDERS = ["fused-cuda", "fused-triton"] if DEVICE.type == "cuda" else []


@pytest.mark.parametrize("provider", ["loop", "fused"] + GPU_PROVIDERS)
def test_moe_adapters_training_step(benchmark, provider):
    step = training_step("reference" if provider == "loop" else provider.partition("-")[2] or None)
    measure(benchmark, step, group=f"training step MoE-Adapters ViT-B/16 B={BATCH} classes={CLASSES} E=22 k=2",
            provider=provider, baseline="loop", rounds=5,
            info={"op": "training_step", "model": "ViT-B-16", "batch": BATCH, "classes": CLASSES, "experts": 22,
                  "k": 2, "bottleneck": 64, "dtype": "float32", "backend": provider})
