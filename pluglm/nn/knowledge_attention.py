"""Knowledge attention module (docs/design.md §1): every token reads its sequence's N retrieved
memory entries, with a per-head additive bias ``beta_h * c_j`` where ``c_j = cos(q, k_j)``.

``KnowledgeAttention.forward(hidden [B, T, d], values [B, N, dv], bias [B, N]) -> [B, T, d]``

* ``attention_type="multi_head"`` (the published default):
  ``logit_tj = (W_Q a_t)_h . (W_K v_j)_h / sqrt(Dh) + beta_h c_j``, ``p = dropout(softmax_j)``,
  ``Mem = W_O concat_h sum_j p_tj (W_V v_j)_h``. Runs on the fused op
  ``pluglm_kernels.knowledge_attention`` (q pre-scaled by 1/sqrt(Dh) before the op).
  Differentiable in hidden, values, bias and every parameter.
* ``attention_type="sentence_level"``: ``Mem_t = sum_j softmax(c)_j v_j`` for every t, the
  retrieved values used directly, with no parameters, exactly as the published code does.
  The published model always has dv = d; when ``value_dim != hidden_size`` an identity is
  impossible, so (only then) a ``W_O = Linear(dv, d)`` maps the mixed value to d.
  The result is a broadcast view [B, T, d] of one [B, 1, d] row per sequence.

``attention_probs(hidden, values, bias)`` (and ``attention_probs_gathered`` for the table
path) returns the probabilities [B, T, H, N] themselves, for ``output_attentions``.

``head_major_output=True`` reproduces the published code's layout slip (its checkpoint was
trained with it): the per-head output, head-major ``[B, H, T, Dh]``, is read as ``[B, T, d]``
by a plain reshape, so the row W_O sees for token t holds pieces of neighbouring tokens'
heads. A fixed permutation within each sequence, applied before W_O on every backend and
path (the ops write ``[B, T, H, Dh]``; the permute costs one copy of that output).

``forward_gathered(hidden, table_k, table_v, indices, bias)`` is the inference path over
per-entry projected tables ``table_k = W_K v_i``, ``table_v = W_V v_i`` ([M, H, Dh], see
``project_tables``), using the fused gather op ``pluglm_kernels.gather_knowledge_attention``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import pluglm_kernels

ATTENTION_TYPES = ("multi_head", "sentence_level")


def cosine_bias(query: torch.Tensor, keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """c_j = cos(query, key_j), in float32 (float64 for float64 inputs).

    query: [B, key_dim]; keys: [B, N, key_dim]. Returns [B, N]. Differentiable in both.
    Computed in float32 whatever the inputs' precision, since fp16 norms of 128-d keys lose
    most of the bias' resolution and the fused op accumulates the bias in float32 anyway.
    """
    if query.dim() != 2:
        raise ValueError(f"query must have shape [B, key_dim], got {tuple(query.shape)}")
    if keys.dim() != 3 or keys.shape[0] != query.shape[0] or keys.shape[2] != query.shape[1]:
        raise ValueError(f"keys must have shape [B={query.shape[0]}, N, key_dim={query.shape[1]}], "
                         f"got {tuple(keys.shape)}")
    acc = torch.float64 if torch.float64 in (query.dtype, keys.dtype) else torch.float32
    return F.cosine_similarity(query.to(acc)[:, None, :], keys.to(acc), dim=-1, eps=eps)


def _draw_seed() -> int:
    # From the default CPU generator so a run is reproducible under torch.manual_seed.
    return int(torch.randint(0, 2**62, (), device="cpu"))


class KnowledgeAttention(nn.Module):
    """Biased attention of tokens over retrieved memory entries.

    Args:
      hidden_size: d, the token state width.
      num_heads: H; d must be divisible by H (Dh = d / H).
      value_dim: dv, the width of a memory value (default d).
      attention_type: "multi_head" or "sentence_level" (see the module docstring).
      dropout: attention-probability dropout used in training mode (0.1 in the published model).
      backend: passed to the pluglm_kernels ops ("auto" picks the fastest available).
      head_major_output: the published layout (see the module docstring); multi_head only.

    Parameters (multi_head): q_proj Linear(d, d), k_proj Linear(dv, d), v_proj Linear(dv, d),
    out_proj Linear(d, d), beta [H] initialised to 1. sentence_level: out_proj Linear(dv, d)
    only when dv != d, otherwise none.
    """

    def __init__(self, hidden_size: int, num_heads: int, value_dim: int | None = None,
                 attention_type: str = "multi_head", dropout: float = 0.1, backend: str = "auto",
                 bias: bool = True, *, head_major_output: bool = False):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        for name, v in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        value_dim = hidden_size if value_dim is None else value_dim
        if isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1:
            raise ValueError(f"value_dim must be a positive int, got {value_dim!r}")
        if attention_type == "multi_head" and hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.value_dim = value_dim
        self.attention_type = attention_type
        self.dropout = float(dropout)
        self.backend = backend
        self.head_major_output = bool(head_major_output)
        if attention_type == "multi_head":
            self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.k_proj = nn.Linear(value_dim, hidden_size, bias=bias)
            self.v_proj = nn.Linear(value_dim, hidden_size, bias=bias)
            self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.beta = nn.Parameter(torch.ones(num_heads))  # [H]
        elif value_dim != hidden_size:
            self.out_proj = nn.Linear(value_dim, hidden_size, bias=bias)
        else:
            self.out_proj = None

    # ------------------------------------------------------------------ checks and helpers

    def _check(self, hidden: torch.Tensor, bias: torch.Tensor, N: int) -> tuple[int, int]:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[2] != self.hidden_size:
            raise ValueError(f"hidden must have shape [B, T, {self.hidden_size}], got "
                             f"{tuple(getattr(hidden, 'shape', ()))}")
        B, T, _ = hidden.shape
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (B, N):
            raise ValueError(f"bias must have shape [B={B}, N={N}] (cos(query, key_j)), got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        return B, T

    def _dropout_args(self) -> tuple[float, int]:
        p = self.dropout if self.training else 0.0
        return p, (_draw_seed() if p > 0.0 else 0)

    def _scaled_query(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        q = self.q_proj(hidden) * (1.0 / math.sqrt(self.head_dim))  # [B, T, d]
        return q.view(B, T, self.num_heads, self.head_dim)  # [B, T, H, Dh]

    def _output(self, out: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """out [B, T, H, Dh] -> W_O applied per token row -> [B, T, d]."""
        B, T = hidden.shape[:2]
        if self.head_major_output:
            # one pass that both permutes to [B, H, T, Dh] and casts
            hm = torch.empty(B, self.num_heads, T, self.head_dim, dtype=hidden.dtype, device=out.device)
            out = hm.copy_(out.transpose(1, 2))
        return self.out_proj(out.reshape(B, T, self.hidden_size).to(hidden.dtype))

    # ----------------------------------------------------------------------------- forward

    def forward(self, hidden: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d]; values: [B, N, dv] (retrieved v_j); bias: [B, N] (c_j = cos(q, k_j)).

        Returns Mem [B, T, d] in hidden's dtype.
        """
        if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[2] != self.value_dim:
            raise ValueError(f"values must have shape [B, N, {self.value_dim}], got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        B, T = self._check(hidden, bias, values.shape[1])
        if values.shape[0] != B:
            raise ValueError(f"values must have shape [B={B}, N, {self.value_dim}], "
                             f"got {tuple(values.shape)}")
        if self.attention_type == "sentence_level":
            return self._sentence_level(hidden, values, bias)
        N, H, Dh = values.shape[1], self.num_heads, self.head_dim
        q = self._scaled_query(hidden)  # [B, T, H, Dh]
        # values may come from a memory stored in another precision; the op wants one dtype.
        k = self.k_proj(values).view(B, N, H, Dh).to(q.dtype)  # [B, N, H, Dh]
        v = self.v_proj(values).view(B, N, H, Dh).to(q.dtype)  # [B, N, H, Dh]
        p, seed = self._dropout_args()
        out = pluglm_kernels.knowledge_attention(q, k, v, bias, self.beta, dropout_p=p, seed=seed,
                                                 backend=self.backend)  # [B, T, H, Dh]
        return self._output(out, hidden)

    def _sentence_level(self, hidden, values, bias):
        B, T, _ = hidden.shape
        w = torch.softmax(bias.to(torch.promote_types(bias.dtype, torch.float32)), dim=-1)  # [B, N]
        mixed = torch.bmm(w.to(values.dtype)[:, None, :], values)  # [B, 1, dv]
        if self.out_proj is not None:
            mixed = self.out_proj(mixed.to(self.out_proj.weight.dtype))
        return mixed.to(hidden.dtype).expand(B, T, self.hidden_size)

    # ------------------------------------------------------------ attention weights

    def attention_probs(self, hidden: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
                        ) -> torch.Tensor:
        """The knowledge-attention probabilities ``forward`` mixes with: [B, T, H, N] float32.

        hidden: [B, T, d]; values: [B, N, dv]; bias: [B, N]. multi_head: softmax over the N
        entries of ``q.k_j / sqrt(Dh) + beta_h c_j`` per token and head, before dropout (the
        fused op draws its dropout mask inside; in eval there is none). sentence_level:
        ``softmax(c)`` [B, N], the same for every token and head (an expanded view).
        Differentiable like ``forward``.
        """
        if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[2] != self.value_dim:
            raise ValueError(f"values must have shape [B, N, {self.value_dim}], got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        B, T = self._check(hidden, bias, values.shape[1])
        if self.attention_type == "sentence_level":
            return self._sentence_probs(bias, T)
        N, H, Dh = values.shape[1], self.num_heads, self.head_dim
        k = self.k_proj(values.to(self.k_proj.weight.dtype)).view(B, N, H, Dh)  # [B, N, H, Dh]
        return self._probs(self._scaled_query(hidden), k, bias)

    def attention_probs_gathered(self, hidden: torch.Tensor, table_k: torch.Tensor,
                                 indices: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``attention_probs`` of the precomputed-table path: keys ``table_k[indices]``
        ([M, H, Dh] table, [B, N] indices). Returns [B, T, H, N] float32."""
        if self.attention_type != "multi_head":
            raise ValueError("attention_probs_gathered needs attention_type='multi_head'")
        self._check(hidden, bias, indices.shape[1])
        return self._probs(self._scaled_query(hidden), table_k[indices.to(table_k.device)], bias)

    def _probs(self, q, k, bias):
        # float32 like the fused op's accumulation (float64 stays float64)
        acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, bias.dtype) else torch.float32
        logits = torch.einsum("bthd,bjhd->bthj", q.to(acc), k.to(device=q.device, dtype=acc))
        logits = logits + self.beta.to(acc)[None, None, :, None] * bias.to(acc)[:, None, None, :]
        return torch.softmax(logits, dim=-1)  # [B, T, H, N]

    def _sentence_probs(self, bias, T):
        w = torch.softmax(bias.to(torch.promote_types(bias.dtype, torch.float32)), dim=-1)  # [B, N]
        B, N = w.shape
        return w[:, None, None, :].expand(B, T, self.num_heads, N)

    # ------------------------------------------------------------ precomputed-table path

    @torch.no_grad()
    def project_tables(self, values: torch.Tensor, *, dtype: torch.dtype | None = None,
                       device=None, chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry projected tables of a fixed memory: (W_K v_i, W_V v_i), each [M, H, Dh].

        values: [M, dv] on any device (projected chunk by chunk, so the extra memory beyond
        the two tables is one chunk). dtype defaults to the projections' dtype, device to
        theirs. Not differentiable (the tables are for inference).
        """
        if self.attention_type != "multi_head":
            raise ValueError("project_tables needs attention_type='multi_head' (sentence_level "
                             "reads the values directly and has no per-entry projections)")
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != self.value_dim:
            raise ValueError(f"values must have shape [M, {self.value_dim}], got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        w = self.k_proj.weight
        dtype = w.dtype if dtype is None else dtype
        device = w.device if device is None else torch.device(device)
        M, H, Dh = values.shape[0], self.num_heads, self.head_dim
        table_k = torch.empty(M, H, Dh, dtype=dtype, device=device)
        table_v = torch.empty(M, H, Dh, dtype=dtype, device=device)
        for s in range(0, M, chunk_size):
            e = min(M, s + chunk_size)
            chunk = values[s:e].to(device=w.device, dtype=w.dtype)  # [c, dv]
            table_k[s:e] = self.k_proj(chunk).view(e - s, H, Dh).to(device=device, dtype=dtype)
            table_v[s:e] = self.v_proj(chunk).view(e - s, H, Dh).to(device=device, dtype=dtype)
        return table_k, table_v

    def forward_gathered(self, hidden: torch.Tensor, table_k: torch.Tensor, table_v: torch.Tensor,
                         indices: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Mem from precomputed tables: the same result as ``forward(hidden, values[indices], bias)``.

        hidden: [B, T, d]; table_k, table_v: [M, H, Dh] (from ``project_tables``);
        indices: [B, N] int64 rows of the tables; bias: [B, N]. Returns [B, T, d].
        The query is cast to the tables' dtype for the op and the result back to hidden's.
        """
        if self.attention_type != "multi_head":
            raise ValueError("forward_gathered needs attention_type='multi_head'")
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
            raise ValueError(f"indices must have shape [B, N], got {tuple(getattr(indices, 'shape', ()))}")
        self._check(hidden, bias, indices.shape[1])
        q = self._scaled_query(hidden).to(table_k.dtype)  # [B, T, H, Dh]
        p, seed = self._dropout_args()
        out = pluglm_kernels.gather_knowledge_attention(q, table_k, table_v, indices, bias, self.beta,
                                                        dropout_p=p, seed=seed,
                                                        backend=self.backend)  # [B, T, H, Dh]
        return self._output(out, hidden)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, value_dim={self.value_dim}, "
                f"attention_type={self.attention_type!r}, dropout={self.dropout}, backend={self.backend!r}"
                + (", head_major_output=True" if self.head_major_output else ""))
