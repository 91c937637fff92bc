"""``apply_pluglm``: turn chosen FFN blocks of a Hugging Face BERT/RoBERTa, GPT-2 or
Llama-family model into PlugLM memory layers, in place.

Per-family wiring (A = the FFN block's input, F = its FFN, Mem = ``MemoryRead(A)``):

* **bert** (post-LN; ``layer.output(h, A) = LN(dropout(dense(h)) + A)``):
  ``out = LN(A + F + Mem)`` — exactly ``pluglm.nn.MemoryLayer``: one query per sequence,
  ``BatchNorm(W_q AttnPool(A, mask))``, the host's own output LayerNorm.
  keep_ffn=True: F is the original FFN; a forward pre-hook on ``layer.output`` adds Mem to
  its residual input, so the original modules, their code and their state-dict names stay.
  keep_ffn=False: ``layer.intermediate`` becomes an identity and ``layer.output`` a
  ``PostLNMemoryOutput`` (the reduced FFN of width memory_ffn_dim, default d, or none;
  the original LayerNorm kept under its name). ``chunk_size_feed_forward`` is set to 0 on
  patched layers, since the query pools over the whole sequence.
* **gpt2 / llama** (pre-LN; the block adds ``mlp(norm(x))`` to the residual x):
  the MLP output becomes ``F(A) + Mem(A)`` with A = norm(x), so the memory read joins the
  residual stream exactly like the MLP output, with no extra LayerNorm (the block's own
  pre-norm already normalises A, and a post-norm would rescale the pretrained residual).
  Queries are causal, one per token over its prefix, normalised by LayerNorm(key_dim)
  (BatchNorm's batch statistics would mix later tokens into earlier queries), and the
  prefix pool is carried across KV-cache calls, so ``generate`` matches a full recompute
  (see ``read.py``). keep_ffn=True: a forward hook on ``mlp`` adds Mem (original names
  kept); keep_ffn=False: ``mlp`` becomes a ``PreLNMemoryMLP`` (reduced FFN or none + Mem).

The attention mask never reaches an HF FFN block, so a forward pre-hook on the top-level
model (and its base model) records the raw 0/1 ``attention_mask`` (None = all tokens) and
the KV-cache past length; an always-called forward hook drops them afterwards. Memory
layers called outside a top-level forward (e.g. HF gradient checkpointing's recompute)
see every token as real: checkpointing of patched layers is not supported.

Registered on the host (train and save with it): each layer's ``memory_read`` and, with
``encoder=True``, ``model.pluglm_encoder``. Never registered: the memory (``set_memory``).
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from pluglm.nn import LiveEncodedMemory, RetrievalOutput
from pluglm.nn.activations import ACTIVATIONS

from .encoder import ATTACH_NAME, PlugLMEncoder
from .families import detect, shapes
from .read import QUERY_MODES, QUERY_NORMS, MemoryRead, ReadContext

_CTX = "_pluglm_context"


# ------------------------------------------------------------------------ replacement modules


class ReducedFFN(nn.Module):
    """Dropout(fc_out(act(fc_in(x)))): the memory layer's own FFN of width ``dim``."""

    def __init__(self, hidden_size: int, dim: int, act: str, dropout: float, init_std: float):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, dim)
        if act in ACTIVATIONS:
            self.act = ACTIVATIONS[act]
        else:  # a host activation PlugLM's table does not name
            from transformers.activations import ACT2FN

            self.act = ACT2FN[act]
        self.fc_out = nn.Linear(dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.fc_in, self.fc_out):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class PostLNMemoryOutput(nn.Module):
    """Replaces a BERT-like ``layer.output`` when keep_ffn=False:
    ``forward(hidden_states, input_tensor=A) = LayerNorm(A + Mem(A) + ffn(A))``
    (``layer.intermediate`` is an identity then, so hidden_states is A too)."""

    def __init__(self, memory_read: MemoryRead, ffn: nn.Module | None, layer_norm: nn.Module):
        super().__init__()
        self.memory_read = memory_read
        self.ffn = ffn
        self.LayerNorm = layer_norm  # the host's name, so its pretrained weights keep their key

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        A = input_tensor
        h = A + self.memory_read(A)
        if self.ffn is not None:
            h = h + self.ffn(A)
        return self.LayerNorm(h)


class PreLNMemoryMLP(nn.Module):
    """Replaces a pre-LN decoder's ``mlp`` when keep_ffn=False: ``Mem(A) + ffn(A)``."""

    def __init__(self, memory_read: MemoryRead, ffn: nn.Module | None):
        super().__init__()
        self.memory_read = memory_read
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.memory_read(hidden_states)
        if self.ffn is not None:
            out = out + self.ffn(hidden_states)
        return out


# ----------------------------------------------------------------------------------- hooks


def _post_ln_add_memory(module, args, kwargs):
    # BertOutput.forward(hidden_states, input_tensor) = LN(dropout(dense(h)) + input_tensor):
    # adding Mem to input_tensor gives LN(F + A + Mem) with the host's code untouched.
    if len(args) >= 2:
        A = args[1]
        return (args[0], A + module.memory_read(A), *args[2:]), kwargs
    if "input_tensor" not in kwargs:
        raise ValueError(f"{type(module).__name__} was called without its residual input "
                         f"(input_tensor); apply_pluglm cannot add the memory read")
    kwargs = dict(kwargs)
    kwargs["input_tensor"] = kwargs["input_tensor"] + module.memory_read(kwargs["input_tensor"])
    return args, kwargs


def _pre_ln_add_memory(module, args, kwargs, output):
    x = args[0] if args else next(iter(kwargs.values()))
    return output + module.memory_read(x)


_FORWARD_PARAMS: dict[type, list[str]] = {}


def _forward_params(cls) -> list[str]:
    names = _FORWARD_PARAMS.get(cls)
    if names is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        _FORWARD_PARAMS[cls] = names
    return names


def _past_length(cache, cache_position) -> int:
    if cache is not None:
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # legacy ((k [B, H, P, Dh], v), ...) tuples
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    return 0


def _capture_mask(module, args, kwargs):
    named = dict(kwargs)
    for name, value in zip(_forward_params(type(module)), args):
        named.setdefault(name, value)
    mask = named.get("attention_mask")
    cache = named.get("cache", named.get("past_key_values"))
    past = _past_length(cache, named.get("cache_position"))
    module.__dict__[_CTX].stack.append((mask, past))


def _release_mask(module, args, kwargs, output):
    stack = module.__dict__[_CTX].stack
    if stack:
        stack.pop()


def _install_context(model: nn.Module, base: nn.Module) -> ReadContext:
    ctx = model.__dict__.get(_CTX)
    if ctx is not None:
        return ctx
    ctx = ReadContext()
    for m in dict.fromkeys((model, base)):  # base may be model itself
        m.__dict__[_CTX] = ctx
        m.register_forward_pre_hook(_capture_mask, with_kwargs=True)
        m.register_forward_hook(_release_mask, with_kwargs=True, always_call=True)
    return ctx


# ------------------------------------------------------------------------------ public API


def _resolve_layers(layers, n: int) -> list[int]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(f"layers must be an int or a list of ints, got {layers!r}") from None
    if not items:
        raise ValueError("layers must name at least one layer")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layers: {i!r} is not a layer index of this {n}-layer model "
                             f"(use 0..{n - 1}, or negative from the top)")
        j = i % n
        if j in out:
            raise ValueError(f"layers: layer {j} is named twice in {items}")
        out.append(j)
    return sorted(out)


def _check_choice(name, value, choices):
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def apply_pluglm(model: nn.Module, memory=None, layers=(-1,), keep_ffn: bool = True, key_dim: int = 128,
                 memory_k: int = 5, memory_ffn_dim: int | None = None, attention_type: str = "multi_head",
                 dropout: float | None = None, backend: str = "auto", *, query_mode: str | None = None,
                 query_norm: str | None = None, num_heads: int | None = None,
                 encoder: bool = True) -> nn.Module:
    """Turn the FFN blocks of ``layers`` into memory layers, in place; returns ``model``.

    model: a Hugging Face BERT/RoBERTa-like, GPT-2 or Llama-family model (any head).
    memory: anything with ``search(q [R, key_dim], k)`` and ``fetch(indices [R, N])`` (a
      ``KnowledgeMemory`` or ``pluglm.nn.TensorMemory`` with keys [M, key_dim] and values
      [M, d]); None to plug one in later with ``set_memory``.
    layers: layer indices, negative = from the top ([-1]: the last layer).
    keep_ffn: keep the original FFN (plus the memory read); False drops its parameters and
      uses a reduced FFN of width memory_ffn_dim (default d; 0 = none).
    key_dim, memory_k (N), attention_type ("multi_head" / "sentence_level"): as MemoryLayer.
    dropout: knowledge-attention dropout (default: the config's attention dropout).
    query_mode: "sequence" (default for encoders) or "causal" (default for decoders).
    query_norm: "batch" (default for encoders), "layer" (default for decoders) or "none".
    num_heads: knowledge-attention heads (default: the model's attention heads).
    encoder: attach ``model.pluglm_encoder`` (a ``PlugLMEncoder``) if it has none.

    Shapes come from ``model.config``; new modules take the patched layer's device and dtype.
    Also binds ``model.set_memory(memory)``.
    """
    family, base = detect(model)
    sh = shapes(model)
    if not isinstance(keep_ffn, bool):
        raise ValueError(f"keep_ffn must be a bool, got {keep_ffn!r}")
    if memory_ffn_dim is not None and (isinstance(memory_ffn_dim, bool) or not isinstance(memory_ffn_dim, int)
                                       or memory_ffn_dim < 0):
        raise ValueError(f"memory_ffn_dim must be an int >= 0 or None, got {memory_ffn_dim!r}")
    if keep_ffn and memory_ffn_dim:
        raise ValueError("memory_ffn_dim is the width of the FFN that replaces the original one: "
                         "it needs keep_ffn=False")
    _check_choice("query_mode", query_mode, QUERY_MODES)
    _check_choice("query_norm", query_norm, QUERY_NORMS)
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1) or None, got {dropout!r}")
    blocks = family.layers(base)
    chosen = _resolve_layers(layers, len(blocks))
    for i in chosen:
        if any(isinstance(m, MemoryRead) for m in blocks[i].modules()):
            raise ValueError(f"layer {i} already has a memory read")
    ffn_dim = sh.hidden_size if memory_ffn_dim is None else memory_ffn_dim

    ctx = _install_context(model, base)
    for i in chosen:
        block = blocks[i]
        ref = next(block.parameters())
        read = MemoryRead(sh.hidden_size, num_heads or sh.num_heads, key_dim, memory_k, attention_type,
                          dropout=sh.attention_dropout if dropout is None else float(dropout),
                          query_mode=query_mode or ("causal" if family.decoder else "sequence"),
                          query_norm=query_norm or ("layer" if family.decoder else "batch"),
                          stateful=family.decoder, eps=sh.eps, init_std=sh.init_std, backend=backend)
        read.__dict__["_context"] = ctx
        ffn = None
        if not keep_ffn and ffn_dim > 0:
            ffn = ReducedFFN(sh.hidden_size, ffn_dim, sh.act, sh.hidden_dropout, sh.init_std)
        if family.post_ln:
            block.chunk_size_feed_forward = 0
            if keep_ffn:
                block.output.add_module("memory_read", read)
                block.output.register_forward_pre_hook(_post_ln_add_memory, with_kwargs=True)
            else:
                block.intermediate = nn.Identity()
                block.output = PostLNMemoryOutput(read, ffn, block.output.LayerNorm)
        else:
            if keep_ffn:
                block.mlp.add_module("memory_read", read)
                block.mlp.register_forward_hook(_pre_ln_add_memory, with_kwargs=True)
            else:
                block.mlp = PreLNMemoryMLP(read, ffn)
        for m in (read, ffn):
            if m is not None:  # join the host's device, dtype and train/eval mode
                m.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
                m.train(block.training)

    if encoder and not isinstance(getattr(model, ATTACH_NAME, None), nn.Module):
        PlugLMEncoder.from_model(model, key_dim, backend=backend, attach=True)
    model.__dict__["set_memory"] = types.MethodType(set_memory, model)
    if memory is not None:
        set_memory(model, memory)  # after the encoder exists, so a KnowledgeMemory is live-encoded
    return model


def memory_reads(model: nn.Module) -> list[MemoryRead]:
    """The model's memory reads, in layer order."""
    return [m for m in model.modules() if isinstance(m, MemoryRead)]


def set_memory(model: nn.Module, memory, *, reencode: bool | None = None) -> None:
    """Plug ``memory`` into every memory layer of ``model`` (None unplugs). The model keeps a
    reference only: the memory is not a parameter, buffer or state-dict entry.

    reencode: None (default) = wrap a memory that has ``token_ids_of`` (KnowledgeMemory) in a
    ``LiveEncodedMemory`` with ``model.pluglm_encoder`` when the model has one, so training
    re-encodes the retrieved entries; True = require that; False = use ``fetch`` as is.
    """
    reads = memory_reads(model)
    if not reads:
        raise ValueError(f"{type(model).__name__} has no memory layers: call apply_pluglm(model, ...) first")
    if reencode not in (None, True, False):
        raise ValueError(f"reencode must be None, True or False, got {reencode!r}")
    encoder = getattr(model, ATTACH_NAME, None)
    if memory is not None and reencode is not False and not isinstance(memory, LiveEncodedMemory):
        can = callable(getattr(memory, "token_ids_of", None)) and isinstance(encoder, PlugLMEncoder)
        if reencode and not can:
            raise ValueError("reencode=True needs a memory with token_ids_of(ids) and model.pluglm_encoder")
        if can:
            memory = LiveEncodedMemory(memory, encoder)
    for r in reads:
        r.set_memory(memory)


def get_memory(model: nn.Module):
    """The memory plugged into the model's memory layers (None if none)."""
    reads = memory_reads(model)
    mem = reads[0].memory if reads else None
    return mem.memory if isinstance(mem, LiveEncodedMemory) else mem


def last_retrieval(model: nn.Module) -> list[RetrievalOutput | None]:
    """Per memory layer (layer order), what its last forward retrieved: indices and scores,
    [B, N] for sequence queries, [B, T, N] for causal ones."""
    return [r.last_retrieval for r in memory_reads(model)]


def reset_state(model: nn.Module) -> None:
    """Forget every memory layer's running query pool (decoders)."""
    for r in memory_reads(model):
        r.reset_state()
