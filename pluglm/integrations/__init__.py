"""Drop-in PlugLM memory layers for Hugging Face models.

``apply_pluglm(model, memory, layers=[-1], keep_ffn=True, ...)`` turns chosen FFN blocks of a
BERT/RoBERTa-like, GPT-2 or Llama-family model into memory layers in place (per-family
wiring in ``apply.py``); ``PlugLMEncoder`` encodes memory entries with the host's own input
embeddings (``memory.encode(model.pluglm_encoder)``); ``set_memory(model, memory)`` swaps
memories. Needs transformers only for the models it patches.
"""
from pluglm.nn import LiveEncodedMemory

from .apply import (PostLNMemoryOutput, PreLNMemoryMLP, ReducedFFN, apply_pluglm, get_memory,
                    last_retrieval, memory_reads, reset_state, set_memory)
from .encoder import PlugLMEncoder
from .families import detect
from .read import MemoryRead

__all__ = [
    "LiveEncodedMemory",
    "MemoryRead",
    "PlugLMEncoder",
    "PostLNMemoryOutput",
    "PreLNMemoryMLP",
    "ReducedFFN",
    "apply_pluglm",
    "detect",
    "get_memory",
    "last_retrieval",
    "memory_reads",
    "reset_state",
    "set_memory",
]
