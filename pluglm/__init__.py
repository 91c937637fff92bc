"""pluglm: PlugLM-style plug-in memory language models on fused kernels.

Layers: ``pluglm_kernels`` (ops) -> ``pluglm.nn`` (modules, torch only) -> ``pluglm`` (model,
memory, integrations, CLI). Importing ``pluglm`` registers the PlugLM classes with the
transformers Auto classes (``AutoConfig``, ``AutoModel``, ``AutoModelForMaskedLM``, ...).
"""
from __future__ import annotations

from .auto import register as _register_auto
from .configuration_pluglm import PlugLMConfig
from .integrations import PlugLMEncoder, apply_pluglm, set_memory
from .memory import KnowledgeMemory, MemoryFormatError
from .refresh import AsyncKeyRefresher
from .modeling_pluglm import (
    PlugLMForMaskedLM,
    PlugLMForQuestionAnswering,
    PlugLMForSequenceClassification,
    PlugLMForTokenClassification,
    PlugLMModel,
    PlugLMPreTrainedModel,
    PlugLMRetrieval,
)

_register_auto()

__version__ = "0.1.0"
__all__ = [
    "AsyncKeyRefresher",
    "PlugLMEncoder",
    "apply_pluglm",
    "set_memory",
    "KnowledgeMemory",
    "MemoryFormatError",
    "PlugLMConfig",
    "PlugLMForMaskedLM",
    "PlugLMForQuestionAnswering",
    "PlugLMForSequenceClassification",
    "PlugLMForTokenClassification",
    "PlugLMModel",
    "PlugLMPreTrainedModel",
    "PlugLMRetrieval",
]
