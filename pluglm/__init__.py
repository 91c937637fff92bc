"""pluglm: PlugLM-style plug-in memory language models on fused kernels.

Layers: ``pluglm_kernels`` (ops) -> ``pluglm.nn`` (modules) -> ``pluglm`` (model, memory,
integrations, CLI). Importing ``pluglm`` stays light: transformers-dependent parts import
lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"
