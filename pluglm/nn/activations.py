"""The activation functions a PlugLM layer may name (``hidden_act``, ``ffn_act``), in one
table for the model, the memory layer's reduced FFN and ``apply_pluglm``'s FFN."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# Hugging Face names included: "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_tanh": _gelu_tanh,
               "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu, "silu": F.silu, "swish": F.silu,
               "tanh": torch.tanh}


def activation(name: str, arg: str = "act"):
    """The function called ``name``; ValueError naming ``arg`` for an unknown one."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{arg} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


__all__ = ["ACTIVATIONS", "activation"]
