"""Backbones (open_clip CLIP, timm ViT, ResNet-12, AlexNet features) with the taps and adapter slots the methods need,
built from local weight files only."""
