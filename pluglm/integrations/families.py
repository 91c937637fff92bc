"""Model families ``apply_pluglm`` knows: where their layers and FFN blocks are, how their
configs spell the shapes, and how their input embeddings are computed.

Detection is structural (attribute layout of ``model.base_model``), not by ``model_type``,
so relatives with the same layout work unchanged:

* ``bert``  (post-LN encoders: BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, ...):
  ``base.encoder.layer[i].{intermediate, output}``, ``output(h, A) = LN(dropout(dense(h)) + A)``.
* ``gpt2``  (pre-LN decoder): ``base.h[i].mlp``, the block adds ``mlp(ln_2(x))`` to x.
* ``llama`` (pre-RMSNorm decoders: Llama, Mistral, Qwen2, ...): ``base.layers[i].mlp``,
  the block adds ``mlp(post_attention_layernorm(x))`` to x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    post_ln: bool  # True: the memory read joins the residual inside the block's LayerNorm
    decoder: bool  # causal LM: per-token causal queries, running pool across KV-cache calls

    def layers(self, base: nn.Module) -> nn.ModuleList:
        if self.name == "bert":
            return base.encoder.layer
        if self.name == "gpt2":
            return base.h
        return base.layers

    def embed(self, base: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """The host's own input embedding of memory entries: [E, L] ids -> [E, L, d].

        bert: the whole embedding module (word + position + token type + LayerNorm, as in
        docs/design.md §1); gpt2: wte + wpe (positions 0..L-1); llama: embed_tokens (no absolute
        positions). The last two are not normalised; the encoder adds its own LayerNorm.
        """
        ids = token_ids.long()
        if self.name == "bert":
            return base.embeddings(input_ids=ids)
        if self.name == "gpt2":
            pos = torch.arange(ids.shape[1], device=ids.device)
            return base.wte(ids) + base.wpe(pos)[None]
        return base.get_input_embeddings()(ids)

    def embedding_modules(self, base: nn.Module) -> tuple[nn.Module, ...]:
        """The host modules ``embed`` runs (they follow the encoder's train/eval mode)."""
        if self.name == "bert":
            return (base.embeddings,)
        if self.name == "gpt2":
            return (base.wte, base.wpe)
        return (base.get_input_embeddings(),)


BERT = Family("bert", post_ln=True, decoder=False)
GPT2 = Family("gpt2", post_ln=False, decoder=True)
LLAMA = Family("llama", post_ln=False, decoder=True)


def base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def detect(model: nn.Module) -> tuple[Family, nn.Module]:
    """(family, base model) of a Hugging Face model; ValueError when the layout is unknown."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
    base = base_model(model)
    layer = getattr(getattr(base, "encoder", None), "layer", None)
    if isinstance(layer, nn.ModuleList) and len(layer) and hasattr(layer[0], "intermediate") \
            and hasattr(getattr(layer[0], "output", None), "LayerNorm"):
        return BERT, base
    h = getattr(base, "h", None)
    if isinstance(h, nn.ModuleList) and len(h) and hasattr(h[0], "mlp") and hasattr(h[0], "ln_2"):
        return GPT2, base
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "mlp") \
            and hasattr(layers[0], "post_attention_layernorm"):
        return LLAMA, base
    mt = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(f"apply_pluglm supports BERT/RoBERTa-like encoders, GPT-2 and Llama-family "
                     f"decoders; cannot find their layer layout in {type(model).__name__} "
                     f"(model_type={mt!r})")


def _first(config, names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class Shapes:
    hidden_size: int
    num_heads: int
    eps: float
    act: str
    attention_dropout: float
    hidden_dropout: float
    init_std: float


def shapes(model: nn.Module) -> Shapes:
    """Width, heads, norm epsilon, activation, dropouts and init std from the model's config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: apply_pluglm infers shapes from it")
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first(config, ("num_attention_heads", "n_head"))
    if not isinstance(hidden, int) or not isinstance(heads, int):
        raise ValueError(f"cannot read hidden_size / num_attention_heads from {type(config).__name__}")
    act = _first(config, ("hidden_act", "activation_function"), "gelu")
    return Shapes(
        hidden_size=hidden, num_heads=heads,
        eps=float(_first(config, ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"), 1e-12)),
        act=act if isinstance(act, str) else "gelu",
        attention_dropout=float(_first(config, ("attention_probs_dropout_prob", "attn_pdrop",
                                                "attention_dropout"), 0.0)),
        hidden_dropout=float(_first(config, ("hidden_dropout_prob", "resid_pdrop"), 0.0)),
        init_std=float(_first(config, ("initializer_range",), 0.02)),
    )
