"""Drop-in PlugLM modules for any model, built on the ``pluglm_kernels`` ops.

Depends only on torch, pluglm_kernels and ``pluglm.topk`` (never transformers), so it
imports alone: ``AttentivePool``, ``KnowledgeAttention`` (+ ``cosine_bias``), ``MemoryLayer``
with its ``Memory`` protocol, the ``TensorMemory`` implementation, ``RetrievalOutput``, and
``LiveEncodedMemory`` (stale-key search, fresh re-encode of what was retrieved).
"""
from .knowledge_attention import ATTENTION_TYPES, KnowledgeAttention, cosine_bias
from .memory_layer import LinearAct, Memory, MemoryLayer, RetrievalOutput, TensorMemory
from .pooling import AttentivePool
from .read import LiveEncodedMemory

__all__ = [
    "ATTENTION_TYPES",
    "AttentivePool",
    "KnowledgeAttention",
    "LinearAct",
    "LiveEncodedMemory",
    "Memory",
    "MemoryLayer",
    "RetrievalOutput",
    "TensorMemory",
    "cosine_bias",
]
