"""The memory read that ``apply_pluglm`` adds to a host model's FFN block.

``MemoryRead(x [B, T, d]) -> Mem [B, T, d]``: pool a query from x, search the plugged-in
memory (stale keys, no gradient), fetch the retrieved keys/values (differentiable; a memory
that re-encodes them with the live encoder trains that encoder), knowledge attention with the
cosine bias. It is the retrieval half of ``pluglm.nn.MemoryLayer`` and reads the memory
through the same ``pluglm.nn.read`` functions; the host block supplies the residual, the FFN
and the normalisation (see ``apply.py`` for the per-family wiring).

Two query modes:

* ``"sequence"`` (encoders; docs/design.md §1): one query per sequence,
  ``q = norm(W_q AttnPool(x, mask))`` over the sequence's real tokens; all its tokens read the
  same N entries. With ``query_norm="batch"`` this is exactly MemoryLayer's query.
* ``"causal"`` (decoders): one query per token, pooled over that token's prefix only,
  ``q_t = norm(W_q AttnPool(x_{<=t}, mask_{<=t}))``, and token t reads its own N entries.
  No token sees a later one (through the query, the retrieval or the bias), so training
  matches left-to-right generation, and a KV-cached decode gives the same result as a full
  recompute: the prefix pool is carried across calls as a running log-sum-exp state
  (max, denominator, weighted sum; [B] + [B] + [B, d] floats per layer).

Decoders (``stateful=True``) carry that running state in both modes: in ``"sequence"`` mode a
decoding step's single query pools over every token so far. The state is reset by a call with
no past (``past_len == 0``); a call whose past length does not match the state (another
caller interleaved, a cache cropped) pools over its current chunk only and warns once.
Beam search reorders the KV cache but not this state: use greedy or sampling decoding.

The mask and past length come from a ``ReadContext`` that a forward pre-hook on the top-level
model fills (HF FFN blocks never receive the attention mask); with no context every token is
real and there is no past.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from pluglm.nn import AttentivePool, KnowledgeAttention, Memory, RetrievalOutput
from pluglm.nn.knowledge_attention import ATTENTION_TYPES, cosine_bias
from pluglm.nn.read import fetch_entries, search_entries

QUERY_MODES = ("sequence", "causal")
QUERY_NORMS = ("batch", "layer", "none")

# Rows of the causal prefix-pool weight matrix built at once: bounds its extra memory to
# ~_POOL_BLOCK_ELEMS floats whatever B and T are.
_POOL_BLOCK_ELEMS = 1 << 22


class ReadContext:
    """What the top-level model's forward pre-hook saw, for the FFN-level memory reads.

    A stack, because a wrapped model (``BertForMaskedLM`` -> ``BertModel``) fires the hook
    at both levels; entries are popped by an always-called forward hook.
    """

    def __init__(self):
        self.stack: list[tuple[torch.Tensor | None, int]] = []

    def current(self) -> tuple[torch.Tensor | None, int]:
        """(attention_mask [B, past + T] raw 0/1 or None, past_len)."""
        return self.stack[-1] if self.stack else (None, 0)


class MemoryRead(nn.Module):
    """Retrieval + knowledge attention for one host layer.

    Args:
      hidden_size: d. num_heads: heads of the knowledge attention (d % H == 0).
      key_dim: query/key width. memory_k: N, entries read per query.
      attention_type: "multi_head" or "sentence_level" (KnowledgeAttention).
      dropout: attention-probability dropout in training.
      query_mode: "sequence" or "causal" (module docstring).
      query_norm: "batch" (BatchNorm1d, the published choice), "layer" (LayerNorm over
        key_dim: no statistics shared across tokens, so causal-safe and identical in train,
        eval and generation), or "none".
      stateful: carry the running prefix pool across calls (decoders with a KV cache).
      eps: the norm's epsilon. init_std: N(0, init_std) init of every weight (the host's
        initializer_range), zero biases; None keeps torch's defaults.

    Parameters: pooler (AttentivePool), query_proj Linear(d, key_dim), query_norm,
    knowledge_attention. The memory is held outside the module tree (``set_memory``).
    """

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int = 128, memory_k: int = 5,
                 attention_type: str = "multi_head", dropout: float = 0.1,
                 query_mode: str = "sequence", query_norm: str = "batch", stateful: bool = False,
                 eps: float = 1e-12, init_std: float | None = 0.02, backend: str = "auto",
                 pool_hidden: int | None = None):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("key_dim", key_dim), ("memory_k", memory_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        self.hidden_size = hidden_size
        self.key_dim = key_dim
        self.memory_k = memory_k
        self.query_mode = query_mode
        self.stateful = bool(stateful)
        self.pooler = AttentivePool(hidden_size, pool_hidden, backend=backend,
                                    init_std=0.02 if init_std is None else init_std)
        self.query_proj = nn.Linear(hidden_size, key_dim)
        if query_norm == "batch":
            self.query_norm = nn.BatchNorm1d(key_dim)
        elif query_norm == "layer":
            self.query_norm = nn.LayerNorm(key_dim, eps=eps)
        else:
            self.query_norm = nn.Identity()
        self.knowledge_attention = KnowledgeAttention(hidden_size, num_heads,
                                                      attention_type=attention_type,
                                                      dropout=dropout, backend=backend)
        if init_std is not None:
            for m in (self.query_proj, *self.knowledge_attention.modules()):
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)
        # Plain attributes, never state: the knowledge and the per-call bookkeeping.
        self.__dict__["_memory"] = None
        self.__dict__["_context"] = None
        self._state = None  # running prefix pool: (m [B], l [B], acc [B, d], n_tokens)
        self._warned = False
        self.last_retrieval: RetrievalOutput | None = None

    # -------------------------------------------------------------------------- memory

    @property
    def memory(self):
        return self.__dict__["_memory"]

    def set_memory(self, memory) -> None:
        """Plug in a memory (anything with search/fetch); None unplugs. Not module state."""
        if memory is not None and not isinstance(memory, Memory):
            raise TypeError(f"memory must have search(q, k) and fetch(indices), got {type(memory).__name__}")
        keys = getattr(memory, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 2 and keys.shape[1] != self.key_dim:
            raise ValueError(f"memory keys have width {keys.shape[1]}, but this layer's key_dim is {self.key_dim}")
        self.__dict__["_memory"] = memory

    def reset_state(self) -> None:
        """Forget the running prefix pool (the next call starts a new sequence)."""
        self._state = None

    # ------------------------------------------------------------------------- forward

    def _mask_and_past(self, B: int, T: int, device) -> tuple[torch.Tensor | None, int]:
        ctx = self.__dict__["_context"]
        mask, past = ctx.current() if ctx is not None else (None, 0)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < T:
                raise ValueError(f"apply_pluglm needs the raw [B={B}, past+T>={T}] 0/1 attention_mask "
                                 f"(not an extended or 4-D mask), got "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            mask = mask[:, mask.shape[1] - T:].to(device=device)  # [B, T] this chunk's tokens
        return mask, int(past)

    def forward(self, x: torch.Tensor, memory=None) -> torch.Tensor:
        """x: [B, T, d] (the FFN block's input). Returns Mem [B, T, d] in x's dtype.

        The retrieval is kept in ``last_retrieval`` (indices and scores, [B, N] in sequence
        mode, [B, T, N] in causal mode).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.hidden_size:
            raise ValueError(f"hidden states must have shape [B, T, {self.hidden_size}], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        memory = self.memory if memory is None else memory
        if memory is None:
            raise ValueError("no memory plugged in: pass one to apply_pluglm(model, memory) or "
                             "call pluglm.integrations.set_memory(model, memory)")
        B, T, d = x.shape
        mask, past = self._mask_and_past(B, T, x.device)
        causal = self.query_mode == "causal"

        if self.stateful:
            pooled = self._running_pool(x, mask, past, causal)  # [B, T, d] or [B, d]
        else:
            pooled = self.pooler(x, mask)  # [B, d]
        if causal:
            pooled = pooled.reshape(B * T, d)
        w = self.query_proj.weight
        q = self.query_norm(self.query_proj(pooled.to(w.dtype)))  # [R, key_dim], R = B or B*T
        N = self.memory_k
        scores, indices = search_entries(memory, q, N)  # [R, N] each, no grad
        keys, values = fetch_entries(memory, indices, self.key_dim, self.hidden_size, dedupe=causal)
        bias = cosine_bias(q, keys)  # [R, N]
        hidden = x.reshape(B * T, 1, d) if causal else x
        mem = self.knowledge_attention(hidden, values.to(dtype=x.dtype), bias)  # [R, T or 1, d]
        if causal:
            self.last_retrieval = RetrievalOutput(indices.view(B, T, N), scores.to(x.device).view(B, T, N))
        else:
            self.last_retrieval = RetrievalOutput(indices, scores.to(x.device))
        return mem.reshape(B, T, d)

    # ------------------------------------------------------------- running prefix pool

    def _pool_scores(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """s_t = w2 . tanh(W1 x_t + b1) + b2 in float32, -inf on padding: [B, T]."""
        p = self.pooler
        acc = torch.promote_types(x.dtype, torch.float32)
        s = torch.tanh(x.to(acc) @ p.w1.to(acc).T + p.b1.to(acc)) @ p.w2.to(acc) + p.b2.to(acc)
        if mask is not None:
            s = s.masked_fill(~mask.to(torch.bool), float("-inf"))
        return s

    def _previous_state(self, B: int, past: int, device):
        if past == 0:
            return None
        st = self._state
        if st is not None and st[3] == past and st[0].shape[0] == B and st[0].device == device:
            return st
        if not self._warned:
            warnings.warn(f"MemoryRead: called with {past} past tokens but the running query pool "
                          f"holds {None if st is None else st[3]}; pooling over the current chunk only",
                          stacklevel=3)
            self._warned = True
        return None

    def _running_pool(self, x: torch.Tensor, mask: torch.Tensor | None, past: int, causal: bool):
        """Attentive pool over (carried prefix) + this chunk.

        causal: pooled [B, T, d], row t over tokens <= t; else pooled [B, d] over all.
        Stable: every weight is exp(s - running max) <= 1. The max is detached (the pool is
        invariant to it, so the gradient is exact).
        """
        B, T, d = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        s = self._pool_scores(x, mask)  # [B, T]
        prev = self._previous_state(B, past, x.device)
        M = torch.cummax(s.detach(), dim=1).values  # [B, T] running max within the chunk
        if prev is not None:
            M = torch.maximum(M, prev[0][:, None])
        M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # [B, T]
        xa = x.to(acc)
        rows = torch.arange(T, device=x.device) if causal else torch.tensor([T - 1], device=x.device)
        cols = torch.arange(T, device=x.device)
        block = max(1, _POOL_BLOCK_ELEMS // max(1, B * T))
        nums, dens = [], []
        for r0 in range(0, rows.numel(), block):
            r = rows[r0:r0 + block]  # [R]
            arg = s[:, None, :] - M_safe[:, r, None]  # [B, R, T]
            arg = arg.masked_fill(cols[None, None, :] > r[None, :, None], float("-inf"))
            w = torch.exp(arg)  # [B, R, T], <= 1
            nums.append(torch.bmm(w, xa))  # [B, R, d]
            dens.append(w.sum(-1))  # [B, R]
        num = torch.cat(nums, dim=1)  # [B, R, d]
        den = torch.cat(dens, dim=1)  # [B, R]
        if prev is not None:
            m_prev, l_prev, acc_prev, _ = prev
            c = torch.exp(m_prev[:, None] - M_safe[:, rows])  # [B, R], 0 when m_prev = -inf
            num = num + c[..., None] * acc_prev[:, None, :]
            den = den + c * l_prev[:, None]
        pooled = num / den.clamp_min(torch.finfo(acc).tiny)[..., None]  # [B, R, d]; no token -> 0
        if self.stateful:
            self._state = (M[:, -1].detach(), den[:, -1].detach(), num[:, -1].detach(), past + T)
        pooled = pooled.to(x.dtype)
        return pooled if causal else pooled[:, 0]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, key_dim={self.key_dim}, memory_k={self.memory_k}, "
                f"query_mode={self.query_mode!r}, stateful={self.stateful}")
