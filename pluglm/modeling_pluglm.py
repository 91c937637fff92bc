"""PlugLM models (docs/design.md §1): a post-LN BERT whose top ``num_memory_layers`` layers read
a plug-in memory instead of a full FFN.

Classes: ``PlugLMModel`` (backbone, optional BERT pooler) and the heads
``PlugLMForMaskedLM``, ``PlugLMForSequenceClassification``, ``PlugLMForQuestionAnswering``,
``PlugLMForTokenClassification``. State-dict names follow BERT (``bert.embeddings...``,
``bert.encoder.layer.i.attention...``, ``cls.predictions...``) so BERT checkpoints warm-start
every non-memory weight.

The memory is plugged in with ``model.set_memory(mem)`` and never owned: it is not a
submodule, not in the state dict, and ``.to()`` leaves it alone. Any object with
``search(q [B, key_dim], k) -> (scores, indices)`` and ``fetch(indices [B, N]) ->
(keys [B, N, key_dim], values [B, N, d])`` works; with ``token_ids_of(indices) ->
(ids [B, N, L], mask [B, N, L])`` the model can re-encode retrieved entries itself:

* training (grad enabled): search the stored (stale) keys, then re-encode only the
  retrieved entries with the live document encoder, so the gradient reaches the word /
  position / type embeddings, the embedding LayerNorm, the document pooler, W_k and W_v;
* eval: stored keys and values (and, after ``precompute_tables()``, the fused gather op);
  a memory without stored values is re-encoded under no_grad.

Document encoder (``encode_memory``): ``E = AttnPool_doc(LayerNorm(word + pos + type))`` with
the backbone's own embedding tables (fused ``pluglm_kernels.encode_knowledge``, no dropout),
``k = W_k E + b_k`` [key_dim], ``v = W_v E + b_v`` [d].

``config.compat="published"`` reproduces what the published code computes instead of the
paper (``config.published_differences``): head-major knowledge-attention output, pooling
denominator ``sum(exp) + 1e-8`` (in PyTorch ops, not the fused pooling kernels), embedding
dropout when retrieved entries are re-encoded in training (never in ``encode_memory`` or a
refresh), and a masked-LM decoder of its own (``cls.predictions.decoder.weight``).

``output_retrieval=True`` adds ``retrieval``: per memory layer a ``PlugLMRetrieval`` with
``indices`` [B, N] int64, ``scores`` [B, N] float32 and ``sources`` (nested lists, or None
when the memory has no ``sources_of``).

transformers features (README, "The model classes and transformers"): self-attention is
SDPA or, with ``attn_implementation="eager"`` or ``output_attentions``, an explicit softmax
whose probabilities [B, H, T, T] go to ``attentions``; ``output_attentions`` also fills
``retrieval[i].attentions`` with the knowledge-attention probabilities [B, T, H, N] (and
makes ``output_retrieval`` default to True). Gradient checkpointing covers every layer; a
checkpointed memory layer's recompute reuses the retrieval of its first forward.
``copy.deepcopy(model)`` shares the plugged-in memory.

Files: ``save_pretrained`` is transformers' own, in-place save; the crash-safe save (and the
checksum-verifying load) is ``pluglm.safe_save.save_pretrained_atomic`` /
``from_pretrained_safe`` (docs/design.md §7).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

import pluglm_kernels
from pluglm.nn import AttentivePool, KnowledgeAttention, LiveEncodedMemory, MemoryLayer
from pluglm.nn.activations import activation
from pluglm.nn.knowledge_attention import cosine_bias
from pluglm.nn.memory_layer import Memory, RetrievalOutput

from .configuration_pluglm import PlugLMConfig

logger = transformers.utils.logging.get_logger(__name__)
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
PUBLISHED_POOL_EPS = 1e-8  # the published attentive pooling's denominator term


def _pool_eps(config) -> float | None:
    return PUBLISHED_POOL_EPS if "pool_denominator" in config.published_differences else None


def _act(name: str):
    return activation(name, "hidden_act")


class PlugLMRetrieval(NamedTuple):
    """What one memory layer retrieved: indices [B, N] int64 (memory rows), scores [B, N]
    float32 (q . k_i on the searched keys, best first), sources (nested lists shaped like
    indices, or None when the memory names no sources), attentions (with
    ``output_attentions``: the knowledge-attention probabilities over the N entries,
    [B, T, H, N] float32, before dropout, detached; else None)."""

    indices: torch.Tensor
    scores: torch.Tensor
    sources: list | None = None
    attentions: torch.Tensor | None = None


# ------------------------------------------------------------------------------- outputs

@dataclass
class PlugLMModelOutput(BaseModelOutputWithPooling):
    retrieval: tuple | None = None


@dataclass
class PlugLMMaskedLMOutput(MaskedLMOutput):
    retrieval: tuple | None = None


@dataclass
class PlugLMSequenceClassifierOutput(SequenceClassifierOutput):
    retrieval: tuple | None = None


@dataclass
class PlugLMQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    retrieval: tuple | None = None


@dataclass
class PlugLMTokenClassifierOutput(TokenClassifierOutput):
    retrieval: tuple | None = None


# ------------------------------------------------------------------------------ backbone

class PlugLMEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout (BERT). Also the document encoder's
    embedding (read through its tables by ``encode_knowledge``, without dropout)."""

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        d = config.hidden_size
        pad = config.pad_token_id
        pad = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, d]
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None]  # [1, T]
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        x = x + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class PlugLMSelfAttention(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, attn_bias, eager: bool = False):
        """x: [B, T, d]; attn_bias: [B, 1, 1, T] additive key-padding bias in x's dtype.
        Returns (out [B, T, d], probs): SDPA (probs None), or with ``eager`` the explicit
        softmax whose probabilities [B, H, T, T] (after dropout, as BERT) are returned."""
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.query, self.key, self.value))  # [B, H, T, Dh]
        p = self.dropout_p if self.training else 0.0
        if eager:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + attn_bias
            acc = torch.promote_types(scores.dtype, torch.float32)  # fp16/bf16 softmax in fp32
            probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)  # [B, H, T, T]
            probs = F.dropout(probs, p, self.training)
            out = torch.matmul(probs, v)
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
        return out.transpose(1, 2).reshape(B, T, d), probs


class PlugLMSelfOutput(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class PlugLMAttention(nn.Module):
    """BertAttention: post-LN self-attention block."""

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.self = PlugLMSelfAttention(config)
        self.output = PlugLMSelfOutput(config)

    def forward(self, x, attn_bias, eager: bool = False):
        h, probs = self.self(x, attn_bias, eager)
        return self.output(h, x), probs


class PlugLMIntermediate(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self._act = _act(config.hidden_act)

    def forward(self, x):
        return self._act(self.dense(x))


class PlugLMOutput(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class PlugLMLayer(nn.Module):
    """A plain BERT layer: attention, then the full FFN.

    Every layer returns (hidden [B, T, d], retrieval or None, self-attention probabilities
    or None, knowledge-attention probabilities or None)."""

    gradient_checkpointing = False  # set per layer by gradient_checkpointing_enable()

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.attention = PlugLMAttention(config)
        self.intermediate = PlugLMIntermediate(config)
        self.output = PlugLMOutput(config)

    def forward(self, x, attn_bias, mask, memory, eager=False, output_attentions=False):
        a, probs = self.attention(x, attn_bias, eager)
        return self.output(self.intermediate(a), a), None, probs, None


class PlugLMMemoryBlock(nn.Module):
    """A memory layer: attention, then ``pluglm.nn.MemoryLayer`` in place of the full FFN."""

    gradient_checkpointing = False

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.attention = PlugLMAttention(config)
        self.memory = MemoryLayer(
            hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            key_dim=config.key_dim, memory_k=config.memory_k,
            memory_ffn_dim=config.memory_ffn_dim, ffn_act=config.hidden_act,
            attention_type=config.knowledge_attention, dropout=config.hidden_dropout_prob,
            attention_dropout=config.memory_attention_dropout,
            layer_norm_eps=config.layer_norm_eps, backend=config.kernel_backend,
            head_major_output="head_layout" in config.published_differences,
            pool_denominator_eps=_pool_eps(config))

    def forward(self, x, attn_bias, mask, memory, eager=False, output_attentions=False):
        a, probs = self.attention(x, attn_bias, eager)
        if not output_attentions:
            out, r = self.memory(a, mask, memory, return_retrieval=True)
            return out, r, probs, None
        if self.training and not isinstance(memory, _RecordedRead):
            # a training-mode query cannot be recomputed (BatchNorm updates its statistics)
            memory = _RecordedRead(memory)
        if isinstance(memory, _RecordedRead):
            memory.keep_fetched = True
        out, r = self.memory(a, mask, memory, return_retrieval=True)
        return out, r, probs, self._knowledge_probs(a, mask, memory, r.indices)

    @torch.no_grad()
    def _knowledge_probs(self, a, mask, memory, indices):
        """The probabilities the knowledge attention used, [B, T, H, N] float32, from the
        layer input ``a`` and what the layer searched and fetched (recorded, or re-read)."""
        layer = self.memory
        recorded = isinstance(memory, _RecordedRead)
        # eval: BatchNorm reads its running statistics, so the query recomputes exactly
        q = memory.query if recorded and memory.query is not None else layer.compute_query(a, mask)
        fetched = memory.fetched if recorded else None
        if recorded:
            memory.fetched = None  # do not keep the values alive (checkpointing)
        if fetched is None:
            tables = layer.tables if memory is layer.memory else None
            if tables is not None:  # the precomputed-table path: keys from the same table
                keys = (memory.fetch_keys(indices) if hasattr(memory, "fetch_keys")
                        else memory.fetch(indices)[0])
                bias = cosine_bias(q, keys.to(a.device))
                return layer.knowledge_attention.attention_probs_gathered(a, tables[0], indices, bias)
            fetched = memory.fetch(indices)
        keys, values = fetched
        bias = cosine_bias(q, keys.to(a.device))  # [B, N]
        return layer.knowledge_attention.attention_probs(
            a, values.to(device=a.device, dtype=a.dtype), bias)


class PlugLMLayerStack(nn.Module):
    """The transformer layers (BERT's ``encoder``: state-dict names ``encoder.layer.i...``);
    not to be confused with ``pluglm.PlugLMEncoder``, the memory-entry encoder of
    ``apply_pluglm``."""

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        first_mem = config.num_hidden_layers - config.num_memory_layers
        self.layer = nn.ModuleList(
            [PlugLMLayer(config) if i < first_mem else PlugLMMemoryBlock(config)
             for i in range(config.num_hidden_layers)])


class PlugLMKnowledgeEncoder(nn.Module):
    """The document side: attentive pooler over embedded entry tokens, W_k and W_v."""

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.pooler = AttentivePool(config.hidden_size, init_std=config.initializer_range,
                                    backend=config.kernel_backend,
                                    denominator_eps=_pool_eps(config))
        self.key_proj = nn.Linear(config.hidden_size, config.key_dim)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Inference through precomputed pooler tables (docs/design.md §3,
        # encode_knowledge_factored); False: always the pooler's matmul (encode_knowledge).
        self.use_tables = True
        self._tables = _TablesCache()
        # config.doc_position_embeddings=False: entry tokens are embedded without positions
        # (docs/design.md §1): a zero table in place of the position table keeps every
        # kernel's signature. Made on first use to match the position table's dtype and
        # device; not a buffer (a buffer made on transformers' meta device at load time
        # would come back uninitialised, and it is no weight to save).
        self.use_positions = bool(getattr(config, "doc_position_embeddings", True))
        self._position_zeros = None

    def position_table(self, emb: "PlugLMEmbeddings") -> torch.Tensor:
        """The position table entry tokens are embedded with: ``emb``'s, or zeros."""
        w = emb.position_embeddings.weight
        if self.use_positions:
            return w
        z = self._position_zeros
        if z is None or z.dtype != w.dtype or z.device != w.device or z.shape != w.shape:
            z = self._position_zeros = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        return z


class _TablesCache:
    """The ``pluglm_kernels.EncoderTables`` of one encoder, rebuilt when any weight they
    come from changes (in place: its version counter; replaced: its identity or address).
    Not module state: no state_dict entry, and a deep copy starts empty (a copy's weights
    are other tensors)."""

    def __init__(self):
        self._key = None
        self._tables = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return _TablesCache()

    def get(self, emb: "PlugLMEmbeddings", pool, positions) -> "pluglm_kernels.EncoderTables":
        ts = (emb.word_embeddings.weight, positions,
              emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias,
              pool.w1, pool.b1)
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.shape, t.device) for t in ts)
        with self._lock:
            if self._key != key:
                self._tables = None  # free the old tables before building the new ones
                self._tables = pluglm_kernels.encoder_tables(*ts)
                self._key = key
            return self._tables


def _tables_apply(emb, knowledge_encoder, backend: str, token_ids) -> bool:
    """Whether this encode may run through the precomputed tables: inference (eval mode, no
    gradient needed) on CPU, where the fused C++ kernel runs, with a kernel dtype."""
    if not getattr(knowledge_encoder, "use_tables", False) or knowledge_encoder.training:
        return False
    if backend not in ("auto", "cpu") or torch.compiler.is_compiling():
        return False
    w = emb.word_embeddings.weight
    if w.device.type != "cpu" or token_ids.device.type != "cpu":
        return False
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    params = (w, knowledge_encoder.position_table(emb), emb.token_type_embeddings.weight,
              emb.LayerNorm.weight, emb.LayerNorm.bias, knowledge_encoder.pooler.w1,
              knowledge_encoder.pooler.b1, knowledge_encoder.pooler.w2,
              knowledge_encoder.pooler.b2)
    if any(t.is_inference() for t in params):  # no version counter to key the tables by
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in params))


class PlugLMPooler(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


def _encode_entries(emb: "PlugLMEmbeddings", knowledge_encoder: "PlugLMKnowledgeEncoder",
                    backend: str, token_ids, attention_mask, *, dropout: bool = False):
    """The document encoder (module docstring): entries [E, L] -> (keys [E, key_dim],
    values [E, d]), read through ``emb``'s tables and ``knowledge_encoder``. dropout=True:
    the embedding dropout (compat="published", training re-encode only)."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise ValueError(f"token_ids must have shape [E, L], got "
                         f"{tuple(getattr(token_ids, 'shape', ()))}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != token_ids.shape:
        raise ValueError(f"attention_mask must be the raw 0/1 mask of token_ids' shape "
                         f"{tuple(token_ids.shape)}, got {tuple(getattr(attention_mask, 'shape', ()))}")
    pool = knowledge_encoder.pooler
    device = emb.word_embeddings.weight.device
    positions = knowledge_encoder.position_table(emb)
    if dropout or pool.denominator_eps is not None:
        # compat="published": the embedding module's own math, then its dropout (training
        # re-encode only) and the published pooling; the fused op has neither
        ids = token_ids.to(device).long()
        x = (emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0]
             + positions[:ids.shape[1]])  # [E, L, d]
        x = F.dropout(emb.LayerNorm(x), emb.dropout.p, training=dropout)
        pooled = pool(x, attention_mask.to(device))  # [E, d]
        return knowledge_encoder.key_proj(pooled), knowledge_encoder.value_proj(pooled)
    if _tables_apply(emb, knowledge_encoder, backend, token_ids):
        pooled = pluglm_kernels.encode_knowledge_factored(
            token_ids, attention_mask, emb.word_embeddings.weight,
            positions, emb.token_type_embeddings.weight,
            emb.LayerNorm.weight, emb.LayerNorm.bias,
            knowledge_encoder._tables.get(emb, pool, positions), pool.w2, pool.b2,
            eps=emb.LayerNorm.eps, backend=backend)  # [E, d]
        return knowledge_encoder.key_proj(pooled), knowledge_encoder.value_proj(pooled)
    pooled = pluglm_kernels.encode_knowledge(
        token_ids.to(device), attention_mask.to(device), emb.word_embeddings.weight,
        positions, emb.token_type_embeddings.weight, emb.LayerNorm.weight,
        emb.LayerNorm.bias, pool.w1, pool.b1, pool.w2, pool.b2, eps=emb.LayerNorm.eps,
        backend=backend)  # [E, d]
    return knowledge_encoder.key_proj(pooled), knowledge_encoder.value_proj(pooled)


class _MemoryEncoderCopy(nn.Module):
    """Frozen copies of the modules ``encode_memory`` reads (embeddings, document pooler, W_k,
    W_v), encoding through the same ``_encode_entries`` as the model: what
    ``memory_encoder_snapshot`` returns for a background key refresh."""

    def __init__(self, plug: "PlugLMModel"):
        super().__init__()
        self.embeddings = copy.deepcopy(plug.embeddings)
        self.knowledge_encoder = copy.deepcopy(plug.knowledge_encoder)
        self.backend = plug.config.kernel_backend
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def encode_memory(self, token_ids, attention_mask):
        return _encode_entries(self.embeddings, self.knowledge_encoder, self.backend,
                               token_ids, attention_mask)


class _TrainingReencoder:
    """The document encoder as the re-encode of retrieved entries (``LiveEncodedMemory``)
    sees it: the model's own, plus, with compat="published" in training, the embedding
    dropout. Its output is then random per call (``stochastic``), so every retrieved slot
    gets its own mask (no dedup)."""

    def __init__(self, plug: "PlugLMModel"):
        self.plug = plug

    @property
    def device(self) -> torch.device:
        return self.plug.device

    @property
    def stochastic(self) -> bool:
        p = self.plug
        return (p.training and p.embeddings.dropout.p > 0
                and "reencode_dropout" in p.config.published_differences)

    def encode_memory(self, token_ids, attention_mask):
        return self.plug._encode_memory(token_ids, attention_mask, dropout=self.stochastic)


class _RecordedRead:
    """What one memory layer read in one forward: the first search's query and result, and
    (``keep_fetched``) what fetch returned. A later search — the recompute of a
    gradient-checkpointed layer — gets the first result back instead of searching again:
    the memory may have changed meanwhile, and the recompute must rebuild exactly the graph
    whose activations were dropped (same entries, hence same shapes and gradients)."""

    def __init__(self, memory):
        self.memory = memory
        self.keep_fetched = False
        self.query = None
        self.result = None
        self.fetched = None

    def search(self, q, k):
        if self.result is None:
            self.query = q.detach()
            self.result = self.memory.search(q, k)
        return self.result

    def fetch(self, indices):
        out = self.memory.fetch(indices)
        if self.keep_fetched:
            self.fetched = out
        return out

    def __getattr__(self, name):  # token_ids_of, fetch_keys, values, version, ...
        if name == "memory":
            raise AttributeError(name)
        return getattr(self.memory, name)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """Keep the running statistics of every training-mode BatchNorm in ``module`` as they
    are (a checkpointed recompute must not count the same batch twice): the recompute
    updates throw-away copies, which the recomputed graph may also save for its backward."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    kept = [[getattr(m, n) for n in names] for m in bns]
    for m, bufs in zip(bns, kept):
        for n, t in zip(names, bufs):
            setattr(m, n, t.clone())
    try:
        yield
    finally:
        for m, bufs in zip(bns, kept):
            for n, t in zip(names, bufs):
                setattr(m, n, t)


def _checkpointed(blk, x, attn_bias, keep, memory, eager, output_attentions):
    """Run one layer under its ``_gradient_checkpointing_func`` (set by
    ``gradient_checkpointing_enable``). A memory layer reads through a ``_RecordedRead`` so
    the backward's recompute reuses the retrieved ids and keeps the BatchNorm statistics."""
    if isinstance(blk, PlugLMMemoryBlock):
        memory = _RecordedRead(memory)
    calls = []

    def run(x, attn_bias, keep):
        ctx = _running_stats_kept(blk) if calls else contextlib.nullcontext()
        calls.append(None)
        with ctx:
            y, r, probs, kprobs = blk(x, attn_bias, keep, memory, eager, output_attentions)
        # Flat tensors only: the reentrant variant returns outputs through an autograd.Function,
        # which attaches its backward to every float output object, so the retrieval (reused
        # by the recompute) leaves as fresh detached aliases or the backward would recurse.
        if r is None:
            return y, None, None, probs, None
        return y, r.indices, r.scores.detach(), probs, None if kprobs is None else kprobs.detach()

    y, idx, scores, probs, kprobs = blk._gradient_checkpointing_func(run, x, attn_bias, keep)
    if idx is None:
        return y, None, probs, None
    return y, RetrievalOutput(idx, scores.detach()), probs, None if kprobs is None else kprobs.detach()


# ------------------------------------------------------------------------------- models

class PlugLMPreTrainedModel(PreTrainedModel):
    """Weight init, memory plumbing and explain() shared by every PlugLM class."""

    config_class = PlugLMConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["PlugLMLayer", "PlugLMMemoryBlock"]

    def __init__(self, config: PlugLMConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self._attn_implementation_running()  # an unsupported request fails at construction

    # ------------------------------------------------- transformers integration hooks

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # set_attn_implementation() may switch at any time: every forward reads the config
        return True

    def _attn_implementation_running(self) -> str:
        """What self-attention runs: "sdpa" (the default, F.scaled_dot_product_attention) or
        "eager" (explicit softmax; what output_attentions uses). Anything else raises."""
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={impl!r} is not supported by PlugLM models: "
                             f"use one of {ATTN_IMPLEMENTATIONS}")
        return impl

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1):
        """The hook ``gradient_checkpointing_enable/disable`` call (transformers 4.x and 5.x):
        every ``every_n_layers``-th layer (memory layers included) runs checkpointed."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        func = gradient_checkpointing_func or functools.partial(checkpoint, use_reentrant=False)
        for i, blk in enumerate(self._plug.encoder.layer):
            blk.gradient_checkpointing = bool(enable) and i % every_n_layers == 0
            blk._gradient_checkpointing_func = func

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``; with a ``device_map`` that offloads what PlugLM
        reads directly (embeddings, knowledge encoder) it raises now, not at the forward."""
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            cls._check_device_map(device_map)
        out = super().from_pretrained(*args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        model._plug._check_not_offloaded()
        return out

    @classmethod
    def _check_device_map(cls, device_map: dict):
        devices = {str(d) for d in device_map.values()}
        # "cpu" entries are offloaded (not run) when an accelerator is in the map
        offloaded = {"disk"} | ({"cpu"} if devices - {"cpu", "disk"} else set())
        prefix = "" if cls is PlugLMModel else cls.base_model_prefix + "."
        direct = [prefix + "embeddings", prefix + "knowledge_encoder"]
        for key, dev in device_map.items():
            if str(dev) not in offloaded:
                continue
            for name in direct:
                if key in ("", name) or name.startswith(key + ".") or key.startswith(name + "."):
                    raise ValueError(
                        f"device_map offloads {key!r} ({dev}), which holds `{name}`: PlugLM reads "
                        f"the embeddings (also the tied MLM decoder) and the knowledge encoder "
                        f"directly, so they cannot be offloaded; offloading `{prefix}encoder` "
                        f"(the layers) is supported")

    def __deepcopy__(self, memo):
        """Deep copy of the weights and buffers; the plugged-in memory is shared, not copied
        (the model never owns it, as for ``.to()`` and the state dict): the copy reads the
        same memory. ``copy.deepcopy(memory)`` and ``set_memory`` give it its own."""
        memory = self.memory
        if memory is not None:
            memo.setdefault(id(memory), memory)
        rv = self.__reduce_ex__(4)
        return copy._reconstruct(self, memo, *rv)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            if module.track_running_stats:
                nn.init.zeros_(module.running_mean)
                nn.init.ones_(module.running_var)
                module.num_batches_tracked.zero_()
        elif isinstance(module, AttentivePool):
            nn.init.normal_(module.w1, std=std)
            nn.init.zeros_(module.b1)
            nn.init.normal_(module.w2, std=std)
            nn.init.zeros_(module.b2)
        elif isinstance(module, KnowledgeAttention):
            if getattr(module, "beta", None) is not None:
                nn.init.ones_(module.beta)
        elif isinstance(module, PlugLMLMPredictionHead):
            nn.init.zeros_(module.bias)

    @staticmethod
    def _fix_state_dict_key_on_load(key):
        # transformers 4.x renames every checkpoint key containing "beta"/"gamma" (legacy TF
        # LayerNorm names) on load; the knowledge attention's per-head scale is really named
        # beta. (4.48+ call this hook; 5.x no longer renames.)
        out = PreTrainedModel._fix_state_dict_key_on_load(key)
        if key.endswith("knowledge_attention.beta"):
            return (key, False) if isinstance(out, tuple) else key
        return out

    # --------------------------------------------------------------------- memory API

    @property
    def _plug(self) -> "PlugLMModel":
        return self if isinstance(self, PlugLMModel) else getattr(self, self.base_model_prefix)

    @property
    def memory(self):
        """The plugged-in memory (or None)."""
        return self._plug.__dict__.get("_memory")

    def set_memory(self, memory, *, reencode: bool | None = None):
        """Plug in ``memory`` (replacing any other); the model keeps a reference only.

        reencode: None (default) = re-encode retrieved entries from their token ids with
        the live encoder when training with grad enabled, or when the memory stores no
        values; True = always; False = never (use the memory's ``fetch``). Returns self.
        """
        plug = self._plug
        if memory is not None:
            if not callable(getattr(memory, "search", None)):
                raise TypeError(f"memory must have search(q, k); got {type(memory).__name__}")
            has_ids = callable(getattr(memory, "token_ids_of", None))
            if not has_ids and not callable(getattr(memory, "fetch", None)):
                raise TypeError("memory must have fetch(indices) or token_ids_of(indices)")
            if reencode and not has_ids:
                raise ValueError("reencode=True needs a memory with token_ids_of(indices)")
            check = getattr(memory, "check_compatible", None)
            if callable(check):  # fail here, not at the first forward
                check(key_dim=self.config.key_dim, value_dim=self.config.hidden_size,
                      vocab_size=self.config.vocab_size)
        if reencode not in (None, True, False):
            raise ValueError(f"reencode must be None, True or False, got {reencode!r}")
        plug.__dict__["_memory"] = memory
        plug.__dict__["_reencode"] = reencode
        for layer in plug.memory_layers():
            layer.set_memory(memory if isinstance(memory, Memory) else None)
        return self

    def memory_layers(self) -> list[MemoryLayer]:
        """The ``pluglm.nn.MemoryLayer`` of every memory block, bottom to top."""
        return [blk.memory for blk in self._plug.encoder.layer if isinstance(blk, PlugLMMemoryBlock)]

    @torch.no_grad()
    def align_retrieval(self, memory=None, *, sample: int = 4096, value_gain: float = 4.0,
                        beta: float = 8.0, open_read_path: bool | None = None):
        """Make every memory layer's query side a copy of the document side: query pooler
        := doc pooler, W_q := W_k (config.retrieval_init="aligned" does this at init).

        Why: the search is trained only through cos(q, k_j) of the entries it retrieved, so
        if the gold entry is never in the top-N nothing teaches the model to find it (the
        cold start). At init a post-LN stack barely changes its input, so a memory layer's
        self-attention output is close to the token embeddings that the document encoder
        pools: with both sides sharing weights, q . k_i scores the word overlap of query and
        entry, and the gold entry (the one naming the same entity) is retrieved from step one.

        ``open_read_path`` (default: when ``memory`` is given; the construction-time call
        leaves it closed, so a fresh model keeps BERT's init elsewhere) opens the read path
        too: W_v = ``value_gain`` * I and, in multi-head knowledge
        attention, W_V = W_O = I, with beta = ``beta``. With BERT's 0.02-std init the memory's
        contribution to a token is ~1e-3 of the residual stream and the gradient that would
        teach the model to read it is as small; the cosine bias beta * c_j with beta = 1
        cannot single out the best of the N entries either. (An initialisation: call it on a
        fresh model, not a trained one.)

        With ``memory`` (anything with ``token_ids_of``; up to ``sample`` of its entries are
        read), the key and value biases are also set so that keys and values are centred over
        those entries: the template words every entry shares otherwise dominate both, so
        cos(q, k_j) hardly separates the retrieved entries and their values look alike, and
        the gradient that should teach the model which entry to read is ~0. Re-encode the
        memory afterwards. Returns self."""
        plug = self._plug
        doc = plug.knowledge_encoder
        if open_read_path is None:
            open_read_path = memory is not None
        for layer in self.memory_layers():
            for name in ("w1", "b1", "w2", "b2"):
                src, dst = getattr(doc.pooler, name), getattr(layer.pooler, name)
                if src.shape != dst.shape:
                    raise ValueError(f"align_retrieval needs the memory layer's pooler shaped like "
                                     f"the document pooler ({name}: {tuple(dst.shape)} vs {tuple(src.shape)})")
                dst.copy_(src)
            layer.query_proj.weight.copy_(doc.key_proj.weight)
            layer.query_proj.bias.copy_(doc.key_proj.bias)
            if not open_read_path:
                continue
            ka = layer.knowledge_attention
            for proj in (getattr(ka, "v_proj", None), getattr(ka, "out_proj", None)):
                if proj is not None and proj.weight.shape[0] == proj.weight.shape[1]:
                    proj.weight.copy_(torch.eye(proj.weight.shape[0]))
                    if proj.bias is not None:
                        proj.bias.zero_()
            if getattr(ka, "beta", None) is not None:
                ka.beta.fill_(beta)
        vp = doc.value_proj
        if open_read_path and vp.weight.shape[0] == vp.weight.shape[1]:
            vp.weight.copy_(value_gain * torch.eye(vp.weight.shape[0]))
            vp.bias.zero_()
        if memory is not None:
            n = len(memory)
            ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:sample] if n > sample \
                else torch.arange(n)
            valid = getattr(memory, "valid", None)
            if isinstance(valid, torch.Tensor):
                ids = ids[valid.cpu()[ids]]
            tok, mask = memory.token_ids_of(ids.view(1, -1))  # [1, E, L] each
            keys, values = self.encode_memory(tok[0], mask[0])  # [E, key_dim], [E, d]
            doc.key_proj.bias.sub_(keys.float().mean(0).to(doc.key_proj.bias.dtype))
            doc.value_proj.bias.sub_(values.float().mean(0).to(doc.value_proj.bias.dtype))
        return self

    def encode_memory(self, token_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Memory entries -> (keys [E, key_dim], values [E, d]); differentiable (wrap in
        no_grad to build a memory). token_ids [E, L] int16/int32/int64, attention_mask
        [E, L] raw 0/1; moved to the model's device when elsewhere."""
        self._plug._check_not_offloaded()
        return self._plug._encode_memory(token_ids, attention_mask)

    def memory_encoder_snapshot(self) -> nn.Module:
        """A frozen copy (no grad, eval mode) of what ``encode_memory`` reads: the embedding
        tables and LayerNorm, the document pooler, W_k and W_v, nothing else. The key
        refresher encodes with it while training keeps updating the live weights."""
        return _MemoryEncoderCopy(self._plug)

    def precompute_tables(self, *, dtype: torch.dtype | None = None, chunk_size: int = 65536):
        """Inference option (multi_head only): project every stored value once per memory
        layer and read the projections with the fused gather op in eval. Costs 2·M·d
        elements per memory layer; rebuilt automatically when the memory or weights change
        (see ``MemoryLayer.precompute_tables``). Needs a memory with ``values``. Returns self."""
        memory = self.memory
        if memory is None:
            raise ValueError("no memory: call set_memory(memory) first")
        for layer in self.memory_layers():
            layer.precompute_tables(memory, dtype=dtype, chunk_size=chunk_size)
        return self

    def release_tables(self):
        for layer in self.memory_layers():
            layer.release_tables()
        return self

    def convert_sync_batchnorm(self, process_group=None):
        """Turn the query BatchNorm of every memory layer into SyncBatchNorm (for DDP, so the
        query statistics are global). State-dict names and values are unchanged. Returns self."""
        for layer in self.memory_layers():
            layer.batch_norm = nn.SyncBatchNorm.convert_sync_batchnorm(layer.batch_norm, process_group)
        return self

    @torch.no_grad()
    def explain(self, texts, tokenizer, k: int = 5, *, max_length: int | None = None):
        """Which memory entries each text retrieves, per memory layer.

        Runs the eval forward (no grad; the model's mode is restored) and searches the top
        ``k`` entries with each memory layer's query. Returns, per text, per memory layer, a
        list of ``{"index", "score", "text", "source"}`` best first (text/source None when
        the memory has no ``texts_of``/``sources_of``).
        """
        if isinstance(texts, str):
            texts = [texts]
        memory = self.memory
        if memory is None:
            raise ValueError("no memory: call set_memory(memory) first")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        max_length = max_length or self.config.max_position_embeddings
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc = {n: enc[n].to(self.device) for n in ("input_ids", "attention_mask", "token_type_ids")
               if n in enc}
        queries, hooks = [], []
        for layer in self.memory_layers():
            hooks.append(layer.batch_norm.register_forward_hook(
                lambda mod, inp, out: queries.append(out.detach())))
        was_training = self.training
        try:
            self.eval()
            self._plug(**enc)
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        per_layer = []
        for q in queries:
            scores, ids = memory.search(q, k)  # [B, k] each
            txt = memory.texts_of(ids) if hasattr(memory, "texts_of") else None
            src = memory.sources_of(ids) if hasattr(memory, "sources_of") else None
            per_layer.append((scores.tolist(), ids.tolist(), txt, src))
        result = []
        for b in range(len(texts)):
            layers = []
            for scores, ids, txt, src in per_layer:
                layers.append([{"index": ids[b][j], "score": scores[b][j],
                                "text": None if txt is None else txt[b][j],
                                "source": None if src is None else src[b][j]}
                               for j in range(len(ids[b]))])
            result.append(layers)
        return result

    def _return_dict(self, return_dict):
        return return_dict if return_dict is not None else getattr(self.config, "return_dict", True)


class PlugLMModel(PlugLMPreTrainedModel):
    """The PlugLM backbone: embeddings, BERT layers, memory layers on top, optional pooler.

    forward(input_ids [B, T], attention_mask [B, T] raw 0/1, token_type_ids, position_ids,
    inputs_embeds, output_hidden_states, output_retrieval, return_dict, memory=None,
    output_attentions) -> PlugLMModelOutput(last_hidden_state [B, T, d], pooler_output
    [B, d] | None, hidden_states, attentions, retrieval). ``memory=`` overrides the
    plugged-in memory for this call.
    """

    def __init__(self, config: PlugLMConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = PlugLMEmbeddings(config)
        self.encoder = PlugLMLayerStack(config)
        self.knowledge_encoder = PlugLMKnowledgeEncoder(config)
        self.pooler = PlugLMPooler(config) if add_pooling_layer else None
        self.__dict__["_memory"] = None
        self.__dict__["_reencode"] = None
        self.post_init()
        if getattr(config, "retrieval_init", "aligned") == "aligned":
            self.align_retrieval()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _encode_memory(self, token_ids, attention_mask, *, dropout: bool = False):
        return _encode_entries(self.embeddings, self.knowledge_encoder, self.config.kernel_backend,
                               token_ids, attention_mask, dropout=dropout)

    def _check_not_offloaded(self):
        """The embedding tables and the knowledge encoder are read directly (document
        encoder, device of the inputs), not through module calls that accelerate's offload
        hooks intercept: they must stay loaded. Offloading the layers works."""
        for name in ("embeddings", "knowledge_encoder"):
            for p in getattr(self, name).parameters():
                if p.device.type == "meta":
                    raise ValueError(
                        f"PlugLM cannot run with `{name}` offloaded (device_map 'disk', or 'cpu' "
                        f"offload beside an accelerator): it reads those weights directly. Map "
                        f"`{name}` to an execution device; offloading `encoder` (the layers) is "
                        f"supported")

    def _reading_memory(self, memory):
        """The object the memory layers read for this forward (see the module docstring)."""
        reencode = self.__dict__.get("_reencode")
        if reencode is False or not callable(getattr(memory, "token_ids_of", None)):
            return memory
        if reencode is True or (self.training and torch.is_grad_enabled()) \
                or not isinstance(getattr(memory, "values", None), torch.Tensor) \
                or not callable(getattr(memory, "fetch", None)):
            return LiveEncodedMemory(memory, _TrainingReencoder(self), always=True)
        return memory

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, output_retrieval=None,
                return_dict=None, memory=None, output_attentions=None):
        return_dict = self._return_dict(return_dict)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else getattr(self.config, "output_hidden_states", False))
        output_attentions, output_retrieval, eager = self._attention_outputs(
            output_attentions, output_retrieval)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, d]")
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
        if len(shape) != 2 or (inputs_embeds is not None and inputs_embeds.dim() != 3):
            raise ValueError(f"input_ids must be [B, T] (inputs_embeds [B, T, d]), got {shape}")
        B, T = shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        self._check_not_offloaded()
        device = self.embeddings.word_embeddings.weight.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        elif tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be the raw [B={B}, T={T}] 0/1 padding mask, "
                             f"got {tuple(attention_mask.shape)}")

        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, T, d]
        keep = attention_mask.to(device).ne(0)  # [B, T]
        attn_bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=device).masked_fill(
            ~keep[:, None, None, :], torch.finfo(x.dtype).min)  # [B, 1, 1, T]

        memory = self.memory if memory is None else memory
        reading = None
        if self.config.num_memory_layers > 0:
            if memory is None:
                raise ValueError("no memory: call model.set_memory(memory) (or pass memory=)")
            reading = self._reading_memory(memory)

        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        retrieval, knowledge = [], []
        recompute = self.training and torch.is_grad_enabled()
        for blk in self.encoder.layer:
            if recompute and blk.gradient_checkpointing:
                x, r, probs, kprobs = _checkpointed(blk, x, attn_bias, keep, reading, eager,
                                                    output_attentions)
            else:
                x, r, probs, kprobs = blk(x, attn_bias, keep, reading, eager, output_attentions)
            if r is not None:
                retrieval.append(r)
                knowledge.append(kprobs)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
            if output_attentions:
                attentions = attentions + (probs,)
        pooled = self.pooler(x) if self.pooler is not None else None
        ret = self._retrieval(memory, retrieval, knowledge) if output_retrieval else None
        if not return_dict:
            return tuple(v for v in (x, pooled, hidden_states, attentions, ret) if v is not None)
        return PlugLMModelOutput(last_hidden_state=x, pooler_output=pooled,
                                 hidden_states=hidden_states, attentions=attentions, retrieval=ret)

    def _attention_outputs(self, output_attentions, output_retrieval):
        """(output_attentions, output_retrieval, eager): the argument, else the config;
        retrieval follows output_attentions unless given (it carries the knowledge-attention
        probabilities); attention probabilities need the eager self-attention."""
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if output_retrieval is None:
            output_retrieval = output_attentions
        impl = self._attn_implementation_running()
        if output_attentions and impl == "sdpa":
            logger.warning_once("PlugLM: output_attentions=True runs the eager self-attention "
                                "(SDPA never materialises the probabilities); load with "
                                "attn_implementation='eager' to make that the default")
        return bool(output_attentions), bool(output_retrieval), bool(output_attentions) or impl == "eager"

    @staticmethod
    def _retrieval(memory, retrieval, knowledge):
        sources_of = getattr(memory, "sources_of", None)
        return tuple(PlugLMRetrieval(r.indices, r.scores,
                                     sources_of(r.indices) if callable(sources_of) else None, kp)
                     for r, kp in zip(retrieval, knowledge))


# --------------------------------------------------------------------------------- heads

class PlugLMPredictionHeadTransform(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self._act = _act(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self._act(self.dense(h)))


class PlugLMLMPredictionHead(nn.Module):
    """MLM head: ``logits = W . transform(h) + bias``. W is the word-embedding matrix itself
    (tied by construction, so no tied-weight bookkeeping that differs between transformers
    versions), except with compat="published" (that checkpoint's decoder is a matrix of its
    own) or ``tie_word_embeddings=False``: then W is ``decoder``, a bias-free Linear(d, V).
    ``bias`` is the head's only output bias and follows the vocabulary size on a resize."""

    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.transform = PlugLMPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # [V]
        if getattr(config, "compat", "paper") == "published":  # its differences decide
            untied = "untied_decoder" in config.published_differences
        else:
            untied = not getattr(config, "tie_word_embeddings", True)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied else None

    def fit_bias(self, V: int):
        """Pad (zeros) or cut ``bias`` to V entries (after a vocabulary resize)."""
        if self.bias.shape[0] != V:
            with torch.no_grad():
                new = self.bias.new_zeros(V)
                n = min(V, self.bias.shape[0])
                new[:n] = self.bias[:n]
            self.bias = nn.Parameter(new, requires_grad=self.bias.requires_grad)

    def forward(self, h, decoder_weight):
        w = decoder_weight if self.decoder is None else self.decoder.weight  # [V, d]
        return F.linear(self.transform(h), w, self.bias)  # [B, T, V]


class PlugLMOnlyMLMHead(nn.Module):
    def __init__(self, config: PlugLMConfig):
        super().__init__()
        self.predictions = PlugLMLMPredictionHead(config)


def _pack(return_dict, cls, loss, retrieval, **fields):
    if return_dict:
        return cls(loss=loss, retrieval=retrieval, **fields)
    out = tuple(v for v in fields.values() if v is not None)
    if retrieval is not None:
        out = out + (retrieval,)
    return ((loss,) + out) if loss is not None else out


_BACKBONE_ARGS = ("attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                  "output_hidden_states", "output_retrieval", "memory", "output_attentions")


class PlugLMForMaskedLM(PlugLMPreTrainedModel):
    """Masked LM: logits [B, T, vocab]; loss = cross-entropy over labels != -100."""

    def __init__(self, config: PlugLMConfig):
        super().__init__(config)
        self.bert = PlugLMModel(config, add_pooling_layer=False)
        self.cls = PlugLMOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self):
        """The untied decoder (compat="published", tie_word_embeddings=False); None when the
        decoder is the word-embedding matrix itself (resized with it)."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        if self.cls.predictions.decoder is None:
            raise ValueError("this model's MLM decoder is the word-embedding matrix itself: "
                             "use set_input_embeddings")
        if getattr(new_embeddings, "bias", None) is not None:
            raise ValueError("the MLM decoder has no bias of its own (cls.predictions.bias is "
                             "the head's bias): pass a Linear(hidden_size, V, bias=False)")
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.fit_bias(new_embeddings.weight.shape[0])

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize, plus the head's output bias (padded with zeros / cut)."""
        out = super().resize_token_embeddings(*args, **kwargs)
        head = self.cls.predictions
        w = head.decoder.weight if head.decoder is not None else self.get_input_embeddings().weight
        head.fit_bias(w.shape[0])
        return out

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_retrieval=None,
                return_dict=None, memory=None, output_attentions=None):
        return_dict = self._return_dict(return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states, output_retrieval, True, memory, output_attentions)
        logits = self.cls.predictions(out.last_hidden_state,
                                      self.bert.embeddings.word_embeddings.weight)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(),
                                   labels.to(logits.device).view(-1), ignore_index=-100)
        return _pack(return_dict, PlugLMMaskedLMOutput, loss, out.retrieval, logits=logits,
                     hidden_states=out.hidden_states, attentions=out.attentions)


class PlugLMForSequenceClassification(PlugLMPreTrainedModel):
    """Sequence classification / regression on the BERT pooler output ([CLS]).
    ``config.problem_type`` picks the loss as in BERT (inferred from labels when unset)."""

    def __init__(self, config: PlugLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = PlugLMModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_retrieval=None,
                return_dict=None, memory=None, output_attentions=None):
        return_dict = self._return_dict(return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states, output_retrieval, True, memory, output_attentions)
        logits = self.classifier(self.dropout(out.pooler_output))  # [B, num_labels]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) \
                    if self.num_labels == 1 else F.mse_loss(logits.float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return _pack(return_dict, PlugLMSequenceClassifierOutput, loss, out.retrieval,
                     logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class PlugLMForQuestionAnswering(PlugLMPreTrainedModel):
    """Extractive QA: start/end logits [B, T]; loss = mean of the two cross-entropies
    (positions clamped to [0, T], T ignored, as in BERT)."""

    def __init__(self, config: PlugLMConfig):
        super().__init__(config)
        self.bert = PlugLMModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None,
                output_hidden_states=None, output_retrieval=None, return_dict=None, memory=None,
                output_attentions=None):
        return_dict = self._return_dict(return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states, output_retrieval, True, memory, output_attentions)
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)  # [B, T] each
        start, end = start.contiguous(), end.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]
            sp = start_positions.to(start.device).view(-1).clamp(0, T)
            ep = end_positions.to(start.device).view(-1).clamp(0, T)
            loss = (F.cross_entropy(start.float(), sp, ignore_index=T)
                    + F.cross_entropy(end.float(), ep, ignore_index=T)) / 2
        return _pack(return_dict, PlugLMQuestionAnsweringOutput, loss, out.retrieval,
                     start_logits=start, end_logits=end, hidden_states=out.hidden_states, attentions=out.attentions)


class PlugLMForTokenClassification(PlugLMPreTrainedModel):
    """Token classification: logits [B, T, num_labels]; loss = cross-entropy (-100 ignored)."""

    def __init__(self, config: PlugLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = PlugLMModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_retrieval=None,
                return_dict=None, memory=None, output_attentions=None):
        return_dict = self._return_dict(return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states, output_retrieval, True, memory, output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # [B, T, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(),
                                   labels.to(logits.device).view(-1), ignore_index=-100)
        return _pack(return_dict, PlugLMTokenClassifierOutput, loss, out.retrieval,
                     logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def register_auto_classes() -> None:
    """Map ``model_type="pluglm"`` to these classes in ``AutoConfig``, ``AutoModel`` and the
    ``AutoModelFor*`` heads. Runs when this module is imported (so the Auto classes know
    PlugLM whenever its classes exist); calling it again replaces the entries."""
    import transformers

    transformers.AutoConfig.register(PlugLMConfig.model_type, PlugLMConfig, exist_ok=True)
    for auto, model in (("AutoModel", PlugLMModel), ("AutoModelForMaskedLM", PlugLMForMaskedLM),
                        ("AutoModelForSequenceClassification", PlugLMForSequenceClassification),
                        ("AutoModelForQuestionAnswering", PlugLMForQuestionAnswering),
                        ("AutoModelForTokenClassification", PlugLMForTokenClassification)):
        getattr(transformers, auto).register(PlugLMConfig, model, exist_ok=True)


register_auto_classes()

__all__ = [
    "PlugLMForMaskedLM",
    "PlugLMForQuestionAnswering",
    "PlugLMForSequenceClassification",
    "PlugLMForTokenClassification",
    "PlugLMModel",
    "PlugLMPreTrainedModel",
    "PlugLMRetrieval",
]
