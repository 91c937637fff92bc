"""Cached faiss indexes over a memory's snapshots, kept in step lazily.

One index per (kind, build options). The first search after a mutation syncs the index
with the current snapshot: rows whose key was written since (``MemorySnapshot.key_rev``, the
version of the commit that wrote each key, so no old key table is kept), and rows that
became or stopped being searchable; a compaction (renumbering) or a new key width rebuilds
it. ``pluglm.index`` decides in-place update vs rebuild per kind. See docs/design.md,
"Search".
"""
from __future__ import annotations

import inspect
import threading
from typing import Callable

import torch

from ..index import FAISS_KINDS, SEARCH_PARAMS, FaissIndex, build_index
from .snapshot import MemorySnapshot

# The per-search knobs each kind has (set per call, never a rebuild).
_KIND_KNOBS = {"flat": (), "ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("efSearch",)}


class _IndexEntry:
    """One cached faiss index and the memory version it reflects."""

    __slots__ = ("lock", "index", "version", "knobs")

    def __init__(self):
        self.lock = threading.Lock()  # held across sync + search: faiss indexes are mutable
        self.index = None
        self.version = -1
        self.knobs: dict = {}  # the build-time search knobs, restored when a call names none


def check_faiss_options(kind: str, params: dict) -> None:
    """Raise ValueError for an unknown kind, TypeError for an option ``kind`` does not take."""
    if kind not in FAISS_KINDS:
        raise ValueError(f"index must be one of {FAISS_KINDS} for backend='faiss', got {kind!r}")
    allowed = set(inspect.signature(FaissIndex.__init__).parameters) - {
        "self", "kind", "keys", "valid", "metric"}
    for name in params:
        if name not in allowed:
            raise TypeError(f"unknown faiss index option {name!r} (options: {sorted(allowed)})")
        if name in SEARCH_PARAMS and name not in _KIND_KNOBS[kind]:
            raise TypeError(f"{name} applies to index kinds "
                            f"{[k for k, v in _KIND_KNOBS.items() if name in v]}, not {kind!r}")


def _freeze(params: dict) -> tuple:
    return tuple(sorted((n, repr(v)) for n, v in params.items()))


def finite_keys(snap: MemorySnapshot) -> torch.Tensor:
    """The key table with non-finite rows (never searchable) zeroed: indexes refuse NaN/Inf.
    Copies only when such a row exists."""
    if snap.keys is None:
        return None
    keys = snap.float_keys()  # faiss indexes float32: int8 keys dequantised
    if bool(snap.finite.all()):
        return keys
    return keys.masked_fill(~snap.finite[:, None], 0)


class FaissIndexCache:
    """The faiss indexes of one memory: ``entries`` maps (kind, frozen build options) to an
    entry holding the index, the snapshot version it reflects and its own lock."""

    def __init__(self):
        self.entries: dict[tuple, _IndexEntry] = {}
        self._lock = threading.Lock()  # guards the dict only; each entry has its own

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def search(self, current: Callable[[], MemorySnapshot], queries: torch.Tensor, k: int,
               kind: str, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Search the index of ``kind``/``params`` synced to ``current()`` (read under the
        entry's lock, so the index only moves forward in versions and the search sees
        exactly that snapshot). Queries for which the index finds fewer than k entries are
        answered by exact search over the same snapshot."""
        params = dict(params)
        knobs = {n: params.pop(n) for n in SEARCH_PARAMS if n in params}
        check_faiss_options(kind, {**params, **knobs})
        key = (kind, _freeze(params))
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = _IndexEntry()
        with entry.lock:
            snap = current()
            snap.check_search(queries, k)
            ix = entry.index
            if ix is None or ix.dim != snap.key_dim:
                entry.index = None  # a failed build leaves no half-made index behind
                ix = build_index(kind, finite_keys(snap), snap.searchable, **params)
                entry.index = ix
                entry.knobs = {n: ix.params[n] for n in SEARCH_PARAMS if n in _KIND_KNOBS[kind]}
            elif entry.version != snap.version:
                if len(snap) < ix.size:  # compacted: ids were renumbered
                    ix.rebuild(finite_keys(snap), snap.searchable)
                else:
                    changed = (snap.key_rev > entry.version).nonzero().squeeze(1)  # [n] CPU
                    ix.sync(finite_keys(snap), snap.searchable, changed=changed)
            entry.version = snap.version
            ix.set_search_params(**{**entry.knobs, **knobs})
            q = queries.detach().to(torch.float32)
            scores, ids = ix.search(q, k)  # [B, k] on q's device
        miss = (ids < 0).any(1)  # [B]
        if bool(miss.any()):
            es, ei = snap.search(q[miss], k)
            scores[miss], ids[miss] = es.to(scores.device), ei.to(ids.device)
        return scores.to(snap.device), ids.to(snap.device)


__all__ = ["FaissIndexCache", "check_faiss_options", "finite_keys"]
