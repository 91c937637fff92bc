"""A PlugLM memory layer usable in any model (docs/design.md §1), and a simple tensor memory.

``MemoryLayer(...)(A, attention_mask, memory)`` with A [B, T, d] the output of the
self-attention block and attention_mask [B, T] the raw 0/1 padding mask (not the -10000
extended mask):
```
q        = BatchNorm(W_q AttnPool(A, mask))            # [B, key_dim]
scores,I = memory.search(q, N)                         # exact MIPS on stored keys, no grad
k_j, v_j = memory.fetch(I)                             # [B, N, key_dim], [B, N, dv]
c_j      = cos(q, k_j)                                 # [B, N]
Mem      = KnowledgeAttention(A, v_j, c)               # [B, T, d]
F        = Dropout(W2 act(W1 A))                       # memory_ffn_dim wide; 0 = no FFN
out      = LayerNorm(A + F + Mem)
```
Gradients reach A, every parameter, and whatever ``fetch`` returns: a memory that
re-encodes the retrieved entries with the live encoder in ``fetch`` (stale keys for the
search, fresh keys for the gradient) trains that encoder through this layer.

The memory is any object with
  ``search(q [B, key_dim], k) -> (scores [B, k] float32, indices [B, k] int64)`` and
  ``fetch(indices [B, N]) -> (keys [B, N, key_dim], values [B, N, dv])``;
optionally ``fetch_keys(indices)`` (stored keys only), ``values`` [M, dv] (needed by the
precomputed tables) and an int ``version`` that changes on every mutation.
``TensorMemory`` is the plain in-tensor implementation.

Inference option: ``precompute_tables(memory)`` projects every stored value once into
``table_k = W_K v_i`` and ``table_v = W_V v_i`` ([M, H, Dh] each, 2·M·d elements: memory
traded for latency) and eval-mode forwards then read them with the fused gather op.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from ..topk import exact_topk
from .activations import activation
from .knowledge_attention import ATTENTION_TYPES, KnowledgeAttention, cosine_bias
from .pooling import AttentivePool
from .read import LiveEncodedMemory, fetch_entries, search_entries


class RetrievalOutput(NamedTuple):
    """What a memory layer retrieved, for interpretability: indices [B, N] int64 (memory
    rows) and scores [B, N] float32 (q . k_i on the searched keys), best first."""

    indices: torch.Tensor
    scores: torch.Tensor


@runtime_checkable
class Memory(Protocol):
    """The retrieval interface a MemoryLayer reads (see the module docstring)."""

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _tensor_version(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter (and cannot be mutated)
        return 0


class TensorMemory:
    """A memory held in tensors: keys [M, key_dim], values [M, dv], valid [M] bool.

    search: exact top-k with ``pluglm_kernels.mips_topk`` on ``keys`` (deleted rows, valid =
    False, are never returned). fetch: rows of keys and values by index, differentiable
    when those tensors require grad; or, with ``fetch_fn``, whatever
    ``fetch_fn(indices [B, N]) -> (keys [B, N, key_dim], values [B, N, dv])`` returns — the
    training hook that re-encodes the retrieved entries with the live encoder while the
    search keeps using the stored (stale) keys. ``values`` may be None when ``fetch_fn``
    supplies them.

    ``version`` strictly increases on every mutation: through ``update``/``remove``/``add``/
    ``replace``, and also on an in-place write to the tensors themselves (it folds in their
    autograd version counters). Writes through ``.data`` bypass those counters; call
    ``touch()`` after such a write.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, *, fetch_fn=None, backend: str = "auto"):
        self._base = 0
        self._keys = self._values = self._valid = None
        self.fetch_fn = fetch_fn
        self.backend = backend
        self._set(keys, values, valid)

    # -------------------------------------------------------------------------- state

    def _set(self, keys, values, valid):
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[0] < 1:
            raise ValueError(f"keys must be a non-empty [M, key_dim] tensor, got "
                             f"{tuple(getattr(keys, 'shape', ()))}")
        M = keys.shape[0]
        if values is None and self.fetch_fn is None:
            raise ValueError("values [M, dv] is required unless fetch_fn supplies them")
        if values is not None and (not isinstance(values, torch.Tensor) or values.dim() != 2
                                   or values.shape[0] != M):
            raise ValueError(f"values must have shape [M={M}, dv], got {tuple(getattr(values, 'shape', ()))}")
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (M,):
                got = f"{getattr(valid, 'dtype', type(valid))} {tuple(getattr(valid, 'shape', ()))}"
                raise ValueError(f"valid must be a bool tensor of shape [{M}], got {got}")
            if valid.device != keys.device:
                raise ValueError(f"valid must be on the keys' device {keys.device}, got {valid.device}")
        # Fold the outgoing tensors' counters into the base so the version never repeats.
        self._base += sum(_tensor_version(t) for t in (self._keys, self._values, self._valid)) + 1
        self._keys, self._values, self._valid = keys, values, valid

    @property
    def keys(self) -> torch.Tensor:
        return self._keys

    @property
    def values(self) -> torch.Tensor | None:
        return self._values

    @property
    def valid(self) -> torch.Tensor | None:
        return self._valid

    @property
    def version(self) -> int:
        return self._base + sum(_tensor_version(t) for t in (self._keys, self._values, self._valid))

    def touch(self) -> None:
        """Mark the memory changed (after a write the version counters cannot see)."""
        self._base += 1

    def __len__(self) -> int:
        return self._keys.shape[0]

    # ------------------------------------------------------------------------- reading

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, key_dim] -> (scores [B, k] float32 descending, indices [B, k] int64).

        No gradient. q is moved to the keys' device and compared in float32 (float64 for
        float64 keys, which only the reference backend runs).
        """
        return exact_topk(q, self._keys, k, valid=self._valid, backend=self.backend)

    def fetch_keys(self, indices: torch.Tensor) -> torch.Tensor:
        """Stored keys of ``indices`` [B, N]: [B, N, key_dim]."""
        return self._keys[indices.to(self._keys.device)]

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices [B, N] -> (keys [B, N, key_dim], values [B, N, dv])."""
        if self.fetch_fn is not None:
            return self.fetch_fn(indices)
        idx = indices.to(self._keys.device)
        return self._keys[idx], self._values[idx.to(self._values.device)]

    # ------------------------------------------------------------------------ mutation

    def _ids(self, name, ids):
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids, dtype=torch.int64)
        ids = ids.reshape(-1).to(device=self._keys.device, dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise ValueError(f"{name} must be in [0, {len(self)})")
        return ids

    @torch.no_grad()
    def update(self, indices, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        """Overwrite rows ``indices`` [n] with keys [n, key_dim] and/or values [n, dv] in place."""
        ids = self._ids("indices", indices)
        if keys is not None:
            self._keys.index_copy_(0, ids, keys.to(self._keys))
        if values is not None:
            if self._values is None:
                raise ValueError("this memory holds no values (fetch_fn supplies them)")
            self._values.index_copy_(0, ids.to(self._values.device), values.to(self._values))
        self._base += 1

    @torch.no_grad()
    def remove(self, indices) -> None:
        """Tombstone rows ``indices``: search never returns them again."""
        ids = self._ids("indices", indices)
        if self._valid is None:
            self._valid = torch.ones(len(self), dtype=torch.bool, device=self._keys.device)
        self._valid[ids] = False
        self._base += 1

    def add(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Append entries; returns their ids [n] int64. Copies the tables (O(M) once)."""
        M = len(self)
        n = keys.shape[0]
        if (values is None) != (self._values is None):
            raise ValueError("values must be given exactly when this memory stores values")
        new_values = None if values is None else torch.cat([self._values, values.to(self._values)])
        new_valid = None
        if self._valid is not None:
            new_valid = torch.cat([self._valid, torch.ones(n, dtype=torch.bool, device=self._valid.device)])
        self._set(torch.cat([self._keys, keys.to(self._keys)]), new_values, new_valid)
        return torch.arange(M, M + n, dtype=torch.int64)

    def replace(self, keys: torch.Tensor, values: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> None:
        """Swap in new tables (e.g. after a key refresh)."""
        self._set(keys, values, valid)

    def __repr__(self) -> str:
        dv = None if self._values is None else self._values.shape[1]
        return (f"TensorMemory(M={len(self)}, key_dim={self._keys.shape[1]}, dv={dv}, "
                f"version={self.version})")


# ---------------------------------------------------------------------------------- layer


class LinearAct(nn.Linear):
    """act(W x + b): the published ``LinearActivation`` (same state-dict names)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu"):
        super().__init__(in_features, out_features)
        self._fn = activation(act, "ffn_act")
        self.act = act

    def forward(self, x):
        return self._fn(super().forward(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"


def _weights_fingerprint(params) -> tuple:
    # Any optimizer step, load_state_dict or in-place write bumps _version; .to()/.half()
    # change data_ptr/dtype/device. Writes through .data bypass this: invalidate_tables().
    return tuple((id(p), _tensor_version(p), p.data_ptr(), p.dtype, p.device) for p in params)


def _memory_token(memory) -> tuple:
    version = getattr(memory, "version", None)
    values = getattr(memory, "values", None)
    vt = None
    if isinstance(values, torch.Tensor):
        vt = (id(values), _tensor_version(values), values.data_ptr(), tuple(values.shape))
    return version, vt


class MemoryLayer(nn.Module):
    """Plug-in memory layer (docs/design.md §1): retrieval + knowledge attention + reduced FFN.

    Args:
      hidden_size: d. num_heads: heads of the knowledge attention. key_dim: query/key width.
      memory_k: N, entries retrieved per sequence. memory_ffn_dim: the reduced FFN width
      (0 = no FFN). ffn_act: "gelu" (erf), "gelu_new"/"gelu_tanh", "relu", "silu".
      attention_type: "multi_head" or "sentence_level". dropout: FFN output dropout and,
      unless attention_dropout is given, the attention-probability dropout.
      layer_norm_eps: of the output LayerNorm. backend: for the pluglm_kernels ops.
      value_dim: width of a memory value (default d). pool_hidden: attentive-pool width
      (default d). query_batchnorm: BatchNorm1d on the query (published default True).
      head_major_output, pool_denominator_eps: the published code's knowledge-attention
      layout and pooling denominator (``KnowledgeAttention`` / ``AttentivePool``); off by default.

    Submodules: pooler (AttentivePool), query_proj Linear(d, key_dim), batch_norm
    BatchNorm1d(key_dim), knowledge_attention (KnowledgeAttention), ffn (Sequential of
    LinearAct(d, f), Linear(f, d), Dropout; the published layout) or None, layer_norm.
    """

    def __init__(self, hidden_size: int = 768, num_heads: int = 12, key_dim: int = 128,
                 memory_k: int = 5, memory_ffn_dim: int = 768, ffn_act: str = "gelu",
                 attention_type: str = "multi_head", dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, backend: str = "auto", *,
                 value_dim: int | None = None, attention_dropout: float | None = None,
                 pool_hidden: int | None = None, query_batchnorm: bool = True, memory=None,
                 head_major_output: bool = False, pool_denominator_eps: float | None = None):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("key_dim", key_dim), ("memory_k", memory_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(memory_ffn_dim, bool) or not isinstance(memory_ffn_dim, int) or memory_ffn_dim < 0:
            raise ValueError(f"memory_ffn_dim must be an int >= 0 (0 = no FFN), got {memory_ffn_dim!r}")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.hidden_size = hidden_size
        self.key_dim = key_dim
        self.memory_k = memory_k
        self.memory_ffn_dim = memory_ffn_dim
        self.backend = backend
        self.value_dim = hidden_size if value_dim is None else value_dim

        self.pooler = AttentivePool(hidden_size, pool_hidden, backend=backend,
                                    denominator_eps=pool_denominator_eps)
        self.query_proj = nn.Linear(hidden_size, key_dim)
        self.batch_norm = nn.BatchNorm1d(key_dim) if query_batchnorm else nn.Identity()
        self.knowledge_attention = KnowledgeAttention(
            hidden_size, num_heads, value_dim=self.value_dim, attention_type=attention_type,
            dropout=dropout if attention_dropout is None else attention_dropout, backend=backend,
            head_major_output=head_major_output)
        if memory_ffn_dim > 0:
            self.ffn = nn.Sequential(LinearAct(hidden_size, memory_ffn_dim, ffn_act),
                                     nn.Linear(memory_ffn_dim, hidden_size), nn.Dropout(dropout))
        else:
            self.ffn = None
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

        self._use_tables = False
        self._tables = None
        self.set_memory(memory)

    # ------------------------------------------------------------------------ memory

    @property
    def memory(self):
        return self.__dict__["_memory"]

    def set_memory(self, memory) -> None:
        """Plug in the memory read when forward() gets none. Kept out of the module tree:
        the layer never owns the knowledge (no state_dict entry, .to() leaves it alone)."""
        if memory is not None and not isinstance(memory, Memory):
            raise TypeError(f"memory must have search(q, k) and fetch(indices), got {type(memory).__name__}")
        self.__dict__["_memory"] = memory
        self._tables = None

    # ----------------------------------------------------------------------- forward

    def compute_query(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """q = BatchNorm(W_q AttnPool(A, mask)): [B, T, d] -> [B, key_dim]."""
        pooled = self.pooler(hidden_states, attention_mask)  # [B, d]
        return self.batch_norm(self.query_proj(pooled))  # [B, key_dim]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                memory=None, *, return_retrieval: bool = False):
        """hidden_states A: [B, T, d]; attention_mask: [B, T] raw 0/1 or bool (None = all tokens);
        memory: overrides the plugged-in one. Returns out [B, T, d], or (out, RetrievalOutput)
        with return_retrieval=True."""
        A = hidden_states
        if not isinstance(A, torch.Tensor) or A.dim() != 3 or A.shape[2] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [B, T, {self.hidden_size}], got "
                             f"{tuple(getattr(A, 'shape', ()))}")
        B, T, _ = A.shape
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be the raw [B={B}, T={T}] 0/1 padding mask "
                                 f"(not the extended -10000 mask), got "
                                 f"{tuple(getattr(attention_mask, 'shape', ()))}")
            attention_mask = attention_mask.to(A.device)
        memory = self.memory if memory is None else memory
        if memory is None:
            raise ValueError("no memory: pass memory= or call set_memory(memory) first")

        q = self.compute_query(A, attention_mask)  # [B, key_dim]
        N = self.memory_k
        scores, indices = search_entries(memory, q, N)  # [B, N] each, no grad
        # a memory re-encoded on every read (reencode=True) never reads precomputed tables
        if self._tables_usable() and not (isinstance(memory, LiveEncodedMemory) and memory.always):
            tables = self._ensure_tables(memory)
            keys = (memory.fetch_keys(indices) if hasattr(memory, "fetch_keys")
                    else memory.fetch(indices)[0])
            bias = cosine_bias(q, self._check_keys(keys, B, N).to(A.device))  # [B, N]
            mem = self.knowledge_attention.forward_gathered(A, tables[0], tables[1], indices, bias)
        else:
            keys, values = fetch_entries(memory, indices, self.key_dim, self.value_dim)
            bias = cosine_bias(q, keys)  # [B, N]
            mem = self.knowledge_attention(A, values.to(dtype=A.dtype), bias)

        h = A + mem
        if self.ffn is not None:
            h = h + self.ffn(A)
        out = self.layer_norm(h)
        if return_retrieval:
            return out, RetrievalOutput(indices, scores.to(A.device))
        return out

    def _check_keys(self, keys, B, N):
        if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (B, N, self.key_dim):
            raise ValueError(f"memory returned keys of shape {tuple(getattr(keys, 'shape', ()))}, "
                             f"expected [B={B}, N={N}, key_dim={self.key_dim}]")
        return keys

    # -------------------------------------------------------------- precomputed tables

    def precompute_tables(self, memory=None, *, dtype: torch.dtype | None = None,
                          chunk_size: int = 65536) -> "MemoryLayer":
        """Inference option: project every stored value once, table_k = W_K v_i and
        table_v = W_V v_i ([M, H, Dh] each), and read them with the fused gather op in eval.

        Extra memory 2·M·d elements (in ``dtype``, default the projections' dtype); per-step
        work no longer touches the N retrieved values' projections. Needs a multi_head layer
        and a memory exposing ``values`` [M, dv]. Returns self.

        The tables are used only in eval mode, and only when no gradient must reach W_K/W_V
        (grad disabled, or their parameters frozen): otherwise the normal path runs and its
        gradients are exact. They are rebuilt automatically (one O(M) projection) at the
        next eval forward after any invalidation:
          * the memory changed: another memory object, or its ``version`` (or the identity /
            version counter of its ``values`` tensor) changed;
          * W_K/W_V changed: an optimizer step, load_state_dict, any in-place write (they
            bump the parameters' version counters), or a move/cast (.to, .half);
          * the module was put into train mode (the tables are freed then).
        Writes through ``param.data`` are invisible to version counters: call
        ``invalidate_tables()`` after them. ``release_tables()`` turns the option off.
        """
        if self.knowledge_attention.attention_type != "multi_head":
            raise ValueError("precompute_tables needs attention_type='multi_head' (sentence_level "
                             "reads the values directly: there is nothing to project)")
        if memory is not None:
            self.set_memory(memory)
        if self.memory is None:
            raise ValueError("no memory: pass it to precompute_tables(memory) or call set_memory first")
        if not isinstance(getattr(self.memory, "values", None), torch.Tensor):
            raise TypeError("precompute_tables needs a memory that stores its values "
                            "(memory.values [M, dv] tensor)")
        self._use_tables = True
        self._table_dtype = dtype
        self._table_chunk = chunk_size
        self._tables = None
        self._ensure_tables(self.memory)
        return self

    def invalidate_tables(self) -> None:
        """Drop the tables; they are rebuilt at the next eval forward if the option is on."""
        self._tables = None

    def release_tables(self) -> None:
        """Turn the precomputed-table option off and free the tables."""
        self._use_tables = False
        self._tables = None

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table_k, table_v) [M, H, Dh] if built and still valid for the plugged-in memory."""
        if self._tables is None or self.memory is None or not self._tables_fresh(self.memory):
            return None
        return self._tables["k"], self._tables["v"]

    def train(self, mode: bool = True):
        if mode:
            self._tables = None  # the weights are about to change; free the memory now
        return super().train(mode)

    def _table_params(self):
        ka = self.knowledge_attention
        return [p for p in (ka.k_proj.weight, ka.k_proj.bias, ka.v_proj.weight, ka.v_proj.bias)
                if p is not None]

    def _tables_usable(self) -> bool:
        if not self._use_tables or self.training:
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._table_params()):
            return False
        return True

    def _tables_fresh(self, memory) -> bool:
        t = self._tables
        return (t is not None and t["memory"]() is memory and t["token"] == _memory_token(memory)
                and t["weights"] == _weights_fingerprint(self._table_params()))

    def _ensure_tables(self, memory):
        if getattr(memory, "is_sharded", False):
            # values hold this rank's rows only, indexed by global ids: tables built from them
            # would be silently wrong
            raise ValueError("precompute_tables needs the whole value table; it is not "
                             "supported with a sharded memory")
        if not self._tables_fresh(memory):
            values = getattr(memory, "values", None)
            if not isinstance(values, torch.Tensor):
                raise TypeError("precomputed tables need memory.values [M, dv]; this memory has none")
            dev = getattr(memory, "device", values.device)
            if isinstance(dev, torch.device) and values.device != dev:
                # values placed on the host (docs/design.md, "Placement"): tables of 2·M·d
                # would have to live where the search results are read
                raise ValueError(f"precomputed tables need the values on the memory's device "
                                 f"({dev}), they are on {values.device}: with values on the "
                                 f"host, read them through fetch (release_tables())")
            with torch.inference_mode(False):  # the tables must be usable outside inference mode
                tk, tv = self.knowledge_attention.project_tables(
                    values.detach(), dtype=self._table_dtype, chunk_size=self._table_chunk)
            try:
                ref = weakref.ref(memory)
            except TypeError:  # not weak-referenceable: hold it (the layer already holds it)
                ref = (lambda m: (lambda: m))(memory)
            self._tables = {"k": tk, "v": tv, "memory": ref, "token": _memory_token(memory),
                            "weights": _weights_fingerprint(self._table_params())}
        return self._tables["k"], self._tables["v"]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, key_dim={self.key_dim}, memory_k={self.memory_k}, "
                f"memory_ffn_dim={self.memory_ffn_dim}, value_dim={self.value_dim}")
