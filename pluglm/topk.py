"""Exact top-k over a key table, and merging top-k candidate lists: the one implementation
behind every exact search of the package (``TensorMemory``, ``MemorySnapshot``, the "exact"
index kind, a shard's local search) and every merge (sharded search, faiss results).

Results are ordered by (score descending, id ascending); where fewer than k rows qualify
the tail is (-inf, -1). See docs/design.md §3 (``mips_topk``) and §4 (search).
"""
from __future__ import annotations

import torch

import pluglm_kernels


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *,
               valid: torch.Tensor | None = None, num_valid: int | None = None,
               key_scales: torch.Tensor | None = None, backend: str = "auto",
               query_dtype: torch.dtype = torch.float32, pad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [B, d] against keys [M, d] -> (scores [B, k] float32, ids [B, k] int64) on the
    keys' device, with ``pluglm_kernels.mips_topk``; no gradient.

    valid: [M] bool (False rows are never returned). num_valid: its count when the caller
    already knows it (saves a host sync); when every row is valid the mask is dropped.
    Queries are compared in ``query_dtype`` (float64 keys, which only the reference backend
    reads, compare in float64 and make "auto" mean "reference"). pad=True: k may exceed
    the valid rows, the tail is (-inf, -1); otherwise the kernel raises for such a k.
    """
    if keys.dtype == torch.float64:
        query_dtype = torch.float64
        backend = "reference" if backend == "auto" else backend
    M = keys.shape[0]
    if valid is not None:
        valid = valid.to(keys.device)
        if num_valid is None and pad:
            num_valid = int(valid.sum())
        if num_valid == M:
            valid = None
    n = M if valid is None else num_valid
    kk = min(k, n) if pad and n is not None else k
    if kk == 0:
        B = queries.shape[0]
        return (torch.full((B, k), float("-inf"), dtype=torch.float32, device=keys.device),
                torch.full((B, k), -1, dtype=torch.int64, device=keys.device))
    q = queries.detach().to(device=keys.device, dtype=query_dtype)
    s, i = pluglm_kernels.mips_topk(q, keys, kk, key_scales=key_scales, valid=valid,
                                    num_valid=None if valid is None else num_valid,
                                    backend=backend)
    return pad_topk(s, i, k) if kk < k else (s, i)


def pad_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad sorted [B, k'] results to [B, k] with (-inf, -1)."""
    B, kk = ids.shape
    if kk == k:
        return scores, ids
    s = torch.full((B, k), float("-inf"), dtype=torch.float32, device=scores.device)
    i = torch.full((B, k), -1, dtype=torch.int64, device=ids.device)
    s[:, :kk] = scores
    i[:, :kk] = ids
    return s, i


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, live: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates [B, c] -> the top k [B, k] by (score desc, id asc), padded with (-inf, -1).

    live: [B, c] bool, False = not a result (default: ids >= 0, so (-inf, -1) padding of
    earlier searches stays padding)."""
    if live is None:
        live = ids >= 0
    B, c = ids.shape
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=scores.device)
    s = torch.where(live, scores.to(torch.float32), neg_inf)
    # Two stable sorts give the lexicographic order (score desc, id asc), dead ones last.
    big = torch.iinfo(torch.int64).max
    order = torch.sort(torch.where(live, ids, torch.full_like(ids, big)), dim=1, stable=True).indices
    s, i, m = s.gather(1, order), ids.gather(1, order), live.gather(1, order)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    s, i, m = s.gather(1, order), i.gather(1, order), m.gather(1, order)
    i = torch.where(m, i, torch.full_like(i, -1))
    s = torch.where(m, s, neg_inf)
    return pad_topk(s.contiguous(), i.contiguous(), k)


__all__ = ["exact_topk", "merge_topk", "pad_topk"]
