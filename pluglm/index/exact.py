"""The search-index interface, and its exact backend over ``pluglm_kernels.mips_topk``.

Every backend (this one and the faiss ones in :mod:`pluglm.index.faiss_index`) indexes a
key table whose row numbers are the entry ids:

  keys   [M, d]  float32/float16/bfloat16 (any device)
  valid  [M]     bool, optional: False rows (removed entries) are never returned

and answers ``search(queries [B, d], k) -> (scores [B, k] float32, ids [B, k] int64)`` on
the queries' device, sorted by score descending with equal scores lower id first; with
fewer than k live rows the tail is (score -inf, id -1), as in ``mips_topk``. Mutations keep
ids stable: ``add(keys) -> ids`` appends ids M, M+1, ...; ``update(ids, keys)`` replaces the
key of existing ids (and makes removed ones live again: an upsert); ``remove(ids)`` makes
them unreachable; ``rebuild(keys, valid)`` starts over from a new table (the key-refresh
path). ``update_policy`` says how a backend keeps itself in step (see ``UPDATE_POLICIES``)
and ``needs_rebuild`` turns True when it is time for ``rebuild``.

The exact backend never copies the caller's table until the first mutation (copy-on-write),
so wrapping a memory's keys costs nothing; mutations write into its own buffer, which grows
geometrically on ``add``.
"""
from __future__ import annotations

import abc
import math

import numpy as np
import torch

from pluglm_kernels import MAX_K
from pluglm_kernels import FLOAT_TABLE_DTYPES

from ..topk import exact_topk
METRICS = ("ip",)

UPDATE_POLICIES = {
    "in_place": "add/update/remove change the index in place; results always reflect them; "
                "no rebuild ever needed",
    "in_place_stale_centroids": "add/update/remove change the inverted lists in place "
                                "(results reflect them), but the coarse centroids (and PQ "
                                "codebooks) stay those trained at build time; needs_rebuild "
                                "turns True once more than retrain_fraction of the rows were "
                                "added or re-keyed since training; rebuild (retrain) on a key "
                                "refresh",
    "tombstone": "the graph cannot delete: remove/update leave tombstones that searches filter "
                 "out (never returned); updated keys are inserted as new nodes; the index is "
                 "compacted (rebuilt from its live vectors) once tombstones exceed "
                 "compact_at of the nodes",
}


class SearchIndex(abc.ABC):
    """Base of the index backends: id bookkeeping, argument checks, result finishing."""

    kind: str = ""
    update_policy: str = ""

    def __init__(self, dim: int, metric: str = "ip"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS} (normalise keys and queries for "
                             f"cosine similarity), got {metric!r}")
        self.metric = metric
        self.dim = int(dim)
        self.version = 0
        self._alive = np.zeros(0, dtype=bool)  # [size] live flag per entry id
        self._size = 0
        self._num_valid = 0

    # --------------------------------------------------------------------- bookkeeping

    @property
    def size(self) -> int:
        """Number of entry ids ever assigned (removed ones included): ids are in [0, size)."""
        return self._size

    @property
    def num_valid(self) -> int:
        """Number of live (searchable) entries."""
        return self._num_valid

    def __len__(self) -> int:
        return self._size

    @property
    def needs_rebuild(self) -> bool:
        return False

    def valid_mask(self) -> torch.Tensor:
        """[size] bool (CPU): which ids are live."""
        return torch.from_numpy(self._alive[: self._size].copy())

    def _reset_ids(self, valid_np: np.ndarray) -> None:
        self._alive = valid_np.astype(bool, copy=True)
        self._size = int(valid_np.shape[0])
        self._num_valid = int(self._alive.sum())
        self.version += 1

    def _grow_ids(self, n: int) -> np.ndarray:
        start = self._size
        if start + n > self._alive.shape[0]:
            cap = max(start + n, int(self._alive.shape[0] * 1.5) + 16)
            alive = np.zeros(cap, dtype=bool)
            alive[:start] = self._alive[:start]
            self._alive = alive
        self._alive[start:start + n] = True
        self._size += n
        self._num_valid += n
        self.version += 1
        return np.arange(start, start + n, dtype=np.int64)

    def _set_alive(self, ids: np.ndarray, alive: bool) -> None:
        before = int(self._alive[ids].sum())
        self._alive[ids] = alive
        self._num_valid += (len(ids) - before) if alive else -before
        self.version += 1

    # ------------------------------------------------------------------------- checks

    def _check_keys(self, name: str, keys, n: int | None = None) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [n, {self.dim}], got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {tuple(keys.shape)}")
        if keys.dtype not in FLOAT_TABLE_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16, got {keys.dtype}")
        if n is not None and keys.shape[0] != n:
            raise ValueError(f"{name} must have one row per id ({n}), got {keys.shape[0]}")
        if keys.numel() and not bool(torch.isfinite(keys).all()):
            raise ValueError(f"{name} must be finite (found NaN or Inf)")
        return keys

    def _check_ids(self, ids, *, unique: bool) -> np.ndarray:
        t = torch.as_tensor(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"ids must be integer entry ids, got {t.dtype}")
        a = t.reshape(-1).to(torch.int64).numpy()
        if a.size and (a.min() < 0 or a.max() >= self._size):
            raise ValueError(f"ids must be in [0, {self._size}) (add() assigns new ids), got "
                             f"values in [{a.min()}, {a.max()}]")
        if unique and np.unique(a).size != a.size:
            raise ValueError("ids must not repeat (which key would win?)")
        return a

    def _check_queries(self, queries, k) -> torch.Tensor:
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor [B, {self.dim}], got {type(queries).__name__}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [B, {self.dim}], got {tuple(queries.shape)}")
        if not queries.dtype.is_floating_point:
            raise TypeError(f"queries must be floating point, got {queries.dtype}")
        if queries.shape[0] < 1:
            raise ValueError("queries must hold at least one row")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries must be finite (found NaN or Inf)")
        return queries

    # ------------------------------------------------------------------------ interface

    @abc.abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Implemented by each index kind."""

    @abc.abstractmethod
    def add(self, keys: torch.Tensor) -> torch.Tensor:
        """Implemented by each index kind."""

    @abc.abstractmethod
    def update(self, ids, keys: torch.Tensor) -> None:
        """Implemented by each index kind."""

    @abc.abstractmethod
    def remove(self, ids) -> None:
        """Implemented by each index kind."""

    @abc.abstractmethod
    def rebuild(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Implemented by each index kind."""

    def set_search_params(self, **params) -> None:
        """Search-time knobs (faiss: nprobe, efSearch); the exact index has none."""
        if params:
            raise TypeError(f"kind {self.kind!r} has no search parameters, got {sorted(params)}")

    def _reserve(self, n: int) -> None:
        """Append n ids with no live entry (rows of the table that are not searchable yet)."""
        ids = self._grow_ids(n)
        self._set_alive(ids, False)

    def sync(self, keys: torch.Tensor, valid: torch.Tensor | None = None, changed=None, *,
             rebuild_fraction: float = 0.5) -> None:
        """Bring the index in step with the table's current keys [M', d] / valid [M'].

        Rows past ``size`` get new ids (live where valid); rows that turned invalid are
        removed; rows that turned valid, and valid rows listed in ``changed`` (ids whose key
        changed), are upserted from ``keys``. When more than ``rebuild_fraction`` of the
        rows would be upserted (a key refresh), it rebuilds instead, and after the changes it
        rebuilds when ``needs_rebuild``. Ids are never renumbered: a table that shrank (a
        compaction) needs ``rebuild``.
        """
        self._check_keys("keys", keys)
        M = keys.shape[0]
        valid_np = check_valid(valid, M)
        if M < self._size:
            raise ValueError(f"the table has {M} rows but the index has ids up to {self._size}: "
                             f"ids were renumbered (compaction?), call rebuild(keys, valid)")
        changed_np = np.zeros(M, dtype=bool)
        if changed is not None:
            t = torch.as_tensor(changed.detach().cpu() if isinstance(changed, torch.Tensor) else changed)
            if t.dtype == torch.bool:
                if tuple(t.shape) != (M,):
                    raise ValueError(f"changed as a mask must have shape ({M},), got {tuple(t.shape)}")
                changed_np = t.numpy().copy()
            else:
                a = t.reshape(-1).to(torch.int64).numpy()
                if a.size and (a.min() < 0 or a.max() >= M):
                    raise ValueError(f"changed ids must be in [0, {M}), got [{a.min()}, {a.max()}]")
                changed_np[a] = True
        was = np.zeros(M, dtype=bool)
        was[: self._size] = self._alive[: self._size]
        drop = np.flatnonzero(was & ~valid_np)
        up = np.flatnonzero(valid_np & (~was | changed_np))
        if up.size > rebuild_fraction * max(1, M):
            self.rebuild(keys, valid_np_to_tensor(valid_np))
            return
        if M > self._size:
            self._reserve(M - self._size)
        if drop.size:
            self.remove(torch.from_numpy(drop))
        if up.size:
            idx = torch.from_numpy(up)
            self.update(idx, keys.index_select(0, idx.to(keys.device)))
        if self.needs_rebuild:
            self.rebuild(keys, valid_np_to_tensor(valid_np))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, size={self._size}, "
                f"valid={self._num_valid}, update_policy={self.update_policy!r})")


def valid_np_to_tensor(valid_np: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(valid_np, dtype=bool))


def check_valid(valid, M: int) -> np.ndarray:
    """valid: None or bool [M] (any device) -> numpy bool [M]."""
    if valid is None:
        return np.ones(M, dtype=bool)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool torch.Tensor [{M}], got "
                        f"{getattr(valid, 'dtype', type(valid).__name__)}")
    if tuple(valid.shape) != (M,):
        raise ValueError(f"valid must have shape ({M},) (one flag per key row), got {tuple(valid.shape)}")
    return valid.detach().cpu().numpy().copy()


class ExactIndex(SearchIndex):
    """Exact MIPS over the key table with ``pluglm_kernels.mips_topk`` (kind "exact").

    keys [M, d] stay on ``device`` (default: their own); removed rows are excluded with the
    kernel's ``valid`` mask. ``backend`` is passed to ``mips_topk``.
    """

    kind = "exact"
    update_policy = "in_place"

    def __init__(self, keys: torch.Tensor, valid: torch.Tensor | None = None, *, metric: str = "ip",
                 device=None, backend: str = "auto"):
        super().__init__(keys.shape[1] if isinstance(keys, torch.Tensor) and keys.dim() == 2 else 0,
                         metric)
        self.backend = backend
        self.device = torch.device(device) if device is not None else None
        self.rebuild(keys, valid)

    def rebuild(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self._check_keys("keys", keys)
        M = keys.shape[0]
        valid_np = check_valid(valid, M)
        dev = self.device or keys.device
        self._buf = keys.detach().to(dev).contiguous()  # [capacity, d]; rows >= size unused
        # A private copy already (moved or made contiguous)? Then mutations may write into it.
        self._owned = M == 0 or self._buf.data_ptr() != keys.data_ptr()
        self._vbuf = torch.from_numpy(valid_np).to(dev)  # [capacity] bool
        self._reset_ids(valid_np)

    @property
    def keys(self) -> torch.Tensor:
        """[size, d] the current key table (read-only view)."""
        return self._buf[: self._size]

    def _own(self, extra: int = 0) -> None:
        """Copy-on-write, and room for ``extra`` more rows (geometric growth)."""
        need = self._size + extra
        if self._owned and need <= self._buf.shape[0]:
            return
        cap = need if need <= self._buf.shape[0] else max(need, int(self._buf.shape[0] * 1.5) + 16)
        buf = self._buf.new_empty((cap, self.dim))
        buf[: self._size] = self._buf[: self._size]
        vbuf = torch.zeros(cap, dtype=torch.bool, device=buf.device)
        vbuf[: self._size] = self._vbuf[: self._size]
        self._buf, self._vbuf, self._owned = buf, vbuf, True

    def add(self, keys: torch.Tensor) -> torch.Tensor:
        self._check_keys("keys", keys)
        n = keys.shape[0]
        self._own(n)
        start = self._size
        self._buf[start:start + n] = keys.to(device=self._buf.device, dtype=self._buf.dtype)
        self._vbuf[start:start + n] = True
        return torch.from_numpy(self._grow_ids(n))

    def _reserve(self, n: int) -> None:
        self._own(n)
        start = self._size
        self._buf[start:start + n] = 0  # never searched (valid False) but kept finite
        self._vbuf[start:start + n] = False
        super()._reserve(n)

    def update(self, ids, keys: torch.Tensor) -> None:
        a = self._check_ids(ids, unique=True)
        self._check_keys("keys", keys, n=a.size)
        if not a.size:
            return
        self._own()
        idx = torch.from_numpy(a).to(self._buf.device)
        self._buf.index_copy_(0, idx, keys.to(device=self._buf.device, dtype=self._buf.dtype))
        self._vbuf[idx] = True
        self._set_alive(a, True)

    def remove(self, ids) -> None:
        a = self._check_ids(ids, unique=False)
        if not a.size:
            return
        self._own()
        self._vbuf[torch.from_numpy(a).to(self._vbuf.device)] = False
        self._set_alive(a, False)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_queries(queries, k)
        s, i = exact_topk(queries, self.keys, k, valid=self._vbuf[: self._size],
                          num_valid=self._num_valid, backend=self.backend, pad=True)
        return s.to(queries.device), i.to(queries.device)


def default_nlist(n: int) -> int:
    """~4 sqrt(n) inverted lists, but at least 39 training points per list (k-means)."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39))
