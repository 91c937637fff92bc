"""Search-index backends behind one interface (docs/design.md §4).

    index = build_index(kind, keys, valid=None, *, metric="ip", device=None, **params)
    scores, ids = index.search(queries, k)   # [B, k] float32 desc, [B, k] int64; (-inf, -1) tails
    new_ids = index.add(keys); index.update(ids, keys); index.remove(ids)
    index.rebuild(keys, valid)               # on a key refresh
    index.sync(keys, valid, changed=ids)     # catch up with an edited table (or rebuild)
    index.set_search_params(nprobe=..., efSearch=...)
    index.update_policy, index.needs_rebuild # how it keeps in step (UPDATE_POLICIES)

kind: "exact" (``pluglm_kernels.mips_topk``, no faiss needed), or the faiss kinds "flat",
"ivf" (nlist, nprobe), "hnsw" (M, efSearch, efConstruction), "ivfpq" (nlist, nprobe, m,
nbits); see :mod:`pluglm.index.faiss_index`. keys [M, d] float32/float16/bfloat16 on any
device; ids are row numbers. faiss is imported only when a faiss kind is built; without it
that raises :class:`FaissNotInstalledError` (an ImportError).
"""
from __future__ import annotations

import torch

from .exact import UPDATE_POLICIES, ExactIndex, SearchIndex
from .faiss_index import KINDS as FAISS_KINDS
from .faiss_index import FaissIndex, FaissNotInstalledError, import_faiss

KINDS = ("exact",) + FAISS_KINDS
SEARCH_PARAMS = ("nprobe", "efSearch")  # set per search, never trigger a rebuild

__all__ = ["build_index", "SearchIndex", "ExactIndex", "FaissIndex", "FaissNotInstalledError",
           "KINDS", "SEARCH_PARAMS", "UPDATE_POLICIES", "import_faiss"]


def build_index(kind: str, keys: torch.Tensor, valid: torch.Tensor | None = None, *,
                metric: str = "ip", device=None, **params) -> SearchIndex:
    """Build a search index of ``kind`` over keys [M, d] (valid [M] bool: False rows excluded).

    ``device``: where the exact index keeps its keys, or, for faiss kinds, a CUDA device to
    search on a GPU replica when the installed faiss has GPUs (CPU otherwise). ``params`` are
    the kind's options (exact: backend; ivf: nlist, nprobe; hnsw: M, efSearch,
    efConstruction, compact_at; ivfpq: nlist, nprobe, m, nbits; ivf/ivfpq: retrain_fraction,
    train_size, seed). Unknown options raise TypeError.
    """
    if kind == "exact":
        return ExactIndex(keys, valid, metric=metric, device=device, **params)
    if kind in FAISS_KINDS:
        return FaissIndex(kind, keys, valid, metric=metric, device=device, **params)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
