"""fsosr: open-set recognition, OOD detection and continual learning on CLIP/ViT with parameter-efficient tuning.

The hot paths are fused ops (``fsosr.ops``) with four backends (``reference``, ``cpu``, ``cuda``, ``triton``);
``python -m fsosr.info`` shows which ones are built and usable on this machine.
"""
__version__ = "0.1.0"

from fsosr import backends, metrics, nn, ops, optim, scoring  # noqa: E402

__all__ = ["__version__", "backends", "metrics", "nn", "ops", "optim", "scoring"]
