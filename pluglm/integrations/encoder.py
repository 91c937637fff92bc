"""Memory-entry encoder for a Hugging Face host model (docs/design.md §1's document encoder,
generalised to any supported family).

``PlugLMEncoder.encode_memory(token_ids [E, L], attention_mask [E, L])
-> (keys [E, key_dim], values [E, d])``::

    X   = host input embedding of the entry          # the host's own modules, shared
    X   = LayerNorm(X)        (gpt2 / llama only: their embeddings are not normalised)
    E_i = AttnPool(X, mask)                          # [E, d]
    k_i = W_k E_i + b_k,  v_i = W_v E_i + b_v

This is the duck-typed encoder ``KnowledgeMemory.encode(encoder)`` calls. It is
differentiable (the training re-encode of retrieved entries trains the host embeddings,
the pooler, W_k and W_v); ``encode`` is the chunked no-grad version for a full refresh.

The host embedding modules are referenced, not registered (they already live in the host
model; registering them twice would duplicate their tensors in the state dict).
``from_model(model, attach=True)`` registers the encoder as ``model.pluglm_encoder`` so its
parameters train and save with the host.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from pluglm.nn import AttentivePool

from .families import detect, shapes

ATTACH_NAME = "pluglm_encoder"


class PlugLMEncoder(nn.Module):
    """Entry keys/values from a host model's input embeddings (module docstring).

    Args:
      embed_fn: ``token_ids [E, L] long -> [E, L, d]``, the host's embedding.
      hidden_size: d. key_dim: key width (the memory layers' key_dim).
      value_dim: value width (default d, what the memory reads need).
      normalize: add a LayerNorm(d) after the embedding (hosts whose embedding has none).
      eps: that LayerNorm's epsilon. init_std: N(0, init_std) weights, zero biases.
    Parameters: norm (optional), pooler (AttentivePool), key_proj, value_proj.
    """

    def __init__(self, embed_fn, hidden_size: int, key_dim: int = 128, value_dim: int | None = None,
                 *, normalize: bool = False, eps: float = 1e-12, init_std: float = 0.02,
                 backend: str = "auto"):
        super().__init__()
        if not callable(embed_fn):
            raise TypeError("embed_fn must be callable: token_ids [E, L] -> embeddings [E, L, d]")
        for name, v in (("hidden_size", hidden_size), ("key_dim", key_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        value_dim = hidden_size if value_dim is None else value_dim
        self.hidden_size = hidden_size
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.__dict__["_embed_fn"] = embed_fn
        self.__dict__["_host_modules"] = ()  # host embedding modules that follow train()/eval()
        self.norm = nn.LayerNorm(hidden_size, eps=eps) if normalize else None
        self.pooler = AttentivePool(hidden_size, backend=backend, init_std=init_std)
        self.key_proj = nn.Linear(hidden_size, key_dim)
        self.value_proj = nn.Linear(hidden_size, value_dim)
        for lin in (self.key_proj, self.value_proj):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    @classmethod
    def from_model(cls, model: nn.Module, key_dim: int = 128, *, value_dim: int | None = None,
                   attach: bool = True, backend: str = "auto") -> "PlugLMEncoder":
        """Build the encoder for a BERT/RoBERTa, GPT-2 or Llama-family model, on the host's
        device and dtype. attach=True registers it as ``model.pluglm_encoder`` (replacing
        none: an existing one is an error, since memories were encoded with it)."""
        family, base = detect(model)
        sh = shapes(model)
        if attach and isinstance(getattr(model, ATTACH_NAME, None), nn.Module):
            raise ValueError(f"model already has a {ATTACH_NAME}; delete it first to build a new one")
        enc = cls(functools.partial(family.embed, base), sh.hidden_size, key_dim, value_dim,
                  normalize=family.name != "bert", eps=sh.eps, init_std=sh.init_std, backend=backend)
        ref = base.get_input_embeddings().weight
        enc.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        enc.__dict__["_host_modules"] = family.embedding_modules(base)
        enc.train(model.training)
        if attach:
            setattr(model, ATTACH_NAME, enc)
        return enc

    def train(self, mode: bool = True):
        # KnowledgeMemory.encode switches the encoder to eval for a dropout-free encode: the
        # host embedding modules it reads (not children) must follow.
        super().train(mode)
        for m in self.__dict__["_host_modules"]:
            m.train(mode)
        return self

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_embed_fn"](token_ids)

    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids: [E, L] integer; attention_mask: [E, L] 0/1 (None = all tokens).
        Returns keys [E, key_dim], values [E, value_dim]; differentiable."""
        if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.is_floating_point():
            raise ValueError(f"token_ids must be an integer [E, L] tensor, got "
                             f"{getattr(token_ids, 'dtype', type(token_ids))} {tuple(getattr(token_ids, 'shape', ()))}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(token_ids.shape):
            raise ValueError(f"attention_mask must have token_ids' shape {tuple(token_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        dev = self.key_proj.weight.device
        x = self.embed(token_ids.to(dev))  # [E, L, d]
        if self.norm is not None:
            x = self.norm(x)
        pooled = self.pooler(x, None if attention_mask is None else attention_mask.to(dev))  # [E, d]
        return self.key_proj(pooled), self.value_proj(pooled)

    encode_memory = forward

    @torch.no_grad()
    def encode(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries in chunks of batch_size, no grad, in the current mode (call eval()
        first for a dropout-free refresh). Returns keys [M, key_dim], values [M, dv]."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        M = token_ids.shape[0]
        dev = self.key_proj.weight.device
        keys = torch.empty(M, self.key_dim, device=dev, dtype=self.key_proj.weight.dtype)
        values = torch.empty(M, self.value_dim, device=dev, dtype=self.value_proj.weight.dtype)
        for s in range(0, M, batch_size):
            e = min(M, s + batch_size)
            k, v = self(token_ids[s:e], None if attention_mask is None else attention_mask[s:e])
            keys[s:e], values[s:e] = k, v
        return keys, values

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, key_dim={self.key_dim}, value_dim={self.value_dim}"
