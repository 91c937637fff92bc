"""Drop-in PlugLM modules for any model, built on the ``pluglm_kernels`` ops.

Depends only on torch, pluglm_kernels and ``pluglm.topk`` (never transformers), so it
imports alone: ``AttentivePool``, ``KnowledgeAttention`` (+ ``cosine_bias``), ``MemoryLayer`` with its
``Memory`` protocol, the ``TensorMemory`` implementation and ``RetrievalOutput``.
"""
from .knowledge_attention import ATTENTION_TYPES, KnowledgeAttention, cosine_bias
from .memory_layer import LinearAct, Memory, MemoryLayer, RetrievalOutput, TensorMemory
from .pooling import AttentivePool

__all__ = [
    "ATTENTION_TYPES",
    "AttentivePool",
    "KnowledgeAttention",
    "LinearAct",
    "Memory",
    "MemoryLayer",
    "RetrievalOutput",
    "TensorMemory",
    "cosine_bias",
]
