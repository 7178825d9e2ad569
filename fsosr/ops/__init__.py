"""Fused, autograd-aware ops with ``reference`` / ``cpu`` / ``cuda`` / ``triton`` backends (see fsosr.backends)."""
from fsosr.ops import _cpu_gemm, reference  # noqa: F401 - _cpu_gemm registers its fake implementation
from fsosr.ops._rng import normal_from_seed
from fsosr.ops.balance import cv_squared, load_balancing_loss
from fsosr.ops.topk_route import Routing, topk_route
from fsosr.ops.moe_mlp import moe_mlp, moe_mlp_per_expert_input  # noqa: E402 - needs Routing
from fsosr.ops.masked_adamw import SHARED, masked_adamw_  # noqa: E402
from fsosr.ops.sparse_adapter import merge_experts, sparse_adapter_weight, sparse_linear  # noqa: E402

__all__ = ["SHARED", "Routing", "cv_squared", "load_balancing_loss", "masked_adamw_", "merge_experts", "moe_mlp",
           "moe_mlp_per_expert_input", "normal_from_seed", "reference", "sparse_adapter_weight", "sparse_linear",
           "topk_route"]
