"""pluglm: PlugLM-style plug-in memory language models on fused kernels.

Layers (docs/design.md, "Layers"): ``pluglm_kernels`` (ops) -> ``pluglm.nn`` (modules, torch
only) -> memory, index, distributed -> the transformers model, integrations, refresher ->
CLI and benchmarks. Importing ``pluglm`` (or ``pluglm.nn``, ``pluglm.memory``) imports no
transformers: the names below are loaded on first use. The PlugLM classes are registered
with the transformers Auto classes (``AutoConfig``, ``AutoModel``, ``AutoModelForMaskedLM``,
...) as soon as they are loaded, e.g. by ``pluglm.PlugLMForMaskedLM`` or
``pluglm.auto.register()``.
"""
from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__  # noqa: F401  (pluglm.__version__)

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "AsyncKeyRefresher": ".refresh",
    "PlugLMEncoder": ".integrations",
    "apply_pluglm": ".integrations",
    "set_memory": ".integrations",
    "KnowledgeMemory": ".memory",
    "MemoryFormatError": ".memory",
    "PlugLMConfig": ".modeling_pluglm",  # through the models, so the Auto classes register
    "PlugLMForMaskedLM": ".modeling_pluglm",
    "PlugLMForQuestionAnswering": ".modeling_pluglm",
    "PlugLMForSequenceClassification": ".modeling_pluglm",
    "PlugLMForTokenClassification": ".modeling_pluglm",
    "PlugLMModel": ".modeling_pluglm",
    "PlugLMPreTrainedModel": ".modeling_pluglm",
    "PlugLMRetrieval": ".modeling_pluglm",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        # a subpackage not imported yet (pluglm.nn, pluglm.memory, ...): what eager imports
        # used to provide
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'pluglm' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
