"""Modules built on fsosr.ops."""
from fsosr.nn.moe import LayerExpertMoE, MoEAdapter
from fsosr.nn.prompts import ClassPrompts, CoOpPromptLearner
from fsosr.nn.prompts_conditional import CoCoOpPromptLearner, FSMoEOutput, FSMoEPromptLearner
from fsosr.nn.router import TopKRouter
from fsosr.nn.sparse_adapter import SparseAdapter, SparseLinear, partition_owner

__all__ = ["ClassPrompts", "CoCoOpPromptLearner", "CoOpPromptLearner", "FSMoEOutput", "FSMoEPromptLearner",
           "LayerExpertMoE", "MoEAdapter", "SparseAdapter", "SparseLinear", "TopKRouter", "partition_owner"]
