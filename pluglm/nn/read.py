"""Reading a memory, the one way every memory layer does it (docs/design.md §1).

``search_entries`` asks the memory for the top N entries of each query (no gradient: the
search is a discrete choice); ``fetch_entries`` gets their keys and values, optionally
fetching each distinct entry once; both check what the memory returned. ``MemoryLayer``
(``pluglm.nn``) and ``apply_pluglm``'s ``MemoryRead`` (``pluglm.integrations``) then apply
the cosine bias and the knowledge attention.

``LiveEncodedMemory`` is the adapter behind "stale keys for the search, fresh keys for the
gradient": it searches the wrapped memory's stored keys and re-encodes the retrieved
entries from their token ids with a live encoder, so the result is differentiable in it.
"""
from __future__ import annotations

import torch


def search_entries(memory, q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, key_dim] -> (scores [R, n] as the memory returns them, indices [R, n] int64 on
    q's device)."""
    scores, indices = memory.search(q.detach(), n)
    R = q.shape[0]
    if tuple(indices.shape) != (R, n):
        raise ValueError(f"memory.search returned indices of shape {tuple(indices.shape)}, "
                         f"expected [{R}, {n}]")
    return scores, indices.to(device=q.device, dtype=torch.int64)


def _check_fetched(keys, values, R: int, N: int, key_dim: int, value_dim: int) -> None:
    if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (R, N, key_dim):
        raise ValueError(f"memory.fetch returned keys of shape {tuple(getattr(keys, 'shape', ()))}, "
                         f"expected [{R}, {N}, key_dim={key_dim}]")
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (R, N, value_dim):
        raise ValueError(f"memory.fetch returned values of shape "
                         f"{tuple(getattr(values, 'shape', ()))}, expected [{R}, {N}, {value_dim}]")


def fetch_entries(memory, indices: torch.Tensor, key_dim: int, value_dim: int, *,
                  dedupe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [R, N] -> (keys [R, N, key_dim], values [R, N, value_dim]) on indices' device.

    dedupe=True fetches (and, through a live-encoded memory, re-encodes) each distinct entry
    once and gathers: neighbouring tokens of a causal read mostly retrieve the same ones."""
    R, N = indices.shape
    if dedupe and R * N > 1:
        uniq, inverse = torch.unique(indices, return_inverse=True)  # [U], [R, N]
        keys, values = memory.fetch(uniq[None])  # [1, U, key_dim], [1, U, dv]
        _check_fetched(keys, values, 1, uniq.numel(), key_dim, value_dim)
        return keys[0].to(indices.device)[inverse], values[0].to(indices.device)[inverse]
    keys, values = memory.fetch(indices)
    _check_fetched(keys, values, R, N, key_dim, value_dim)
    return keys.to(indices.device), values.to(indices.device)


class LiveEncodedMemory:
    """Stale keys for the search, fresh keys for the gradient.

    Wraps a memory that can give its entries' tokens (``token_ids_of(ids [B, N]) ->
    (token ids [B, N, L], mask [B, N, L])``, as ``KnowledgeMemory`` does). ``search`` uses
    the stored keys; ``fetch`` re-encodes the retrieved entries with ``encoder.encode_memory``
    (each distinct entry once per call, padding columns that no retrieved entry uses cut
    off), so the gradient reaches the encoder. With ``always=False`` it does that only while
    the encoder is training with grad enabled and otherwise returns the stored keys and
    values; ``always=True`` re-encodes on every fetch (the caller decided). An encoder whose
    output is random per call (dropout) says so with a true ``stochastic`` attribute: every
    retrieved slot is then encoded separately. Other attributes (keys, values, version,
    sources_of, ...) are the wrapped memory's.
    """

    def __init__(self, memory, encoder, *, always: bool = False):
        if not callable(getattr(memory, "token_ids_of", None)):
            raise TypeError(f"LiveEncodedMemory needs a memory with token_ids_of(ids), got "
                            f"{type(memory).__name__}")
        if not callable(getattr(encoder, "encode_memory", None)):
            raise TypeError("encoder must have encode_memory(token_ids, attention_mask)")
        self.memory = memory
        self.encoder = encoder
        self.always = bool(always)

    def search(self, q: torch.Tensor, k: int):
        return self.memory.search(q, k)

    def fetch(self, indices: torch.Tensor):
        """indices [B, N] -> (keys [B, N, key_dim], values [B, N, d])."""
        enc = self.encoder
        if not self.always and not (torch.is_grad_enabled() and getattr(enc, "training", True)):
            return self.memory.fetch(indices)
        B, N = indices.shape
        compiling = torch.compiler.is_compiling()
        # compiling: data-dependent shapes would break the graph
        if compiling or getattr(enc, "stochastic", False):
            uniq, inv = indices.reshape(-1), None
        else:
            uniq, inv = torch.unique(indices.reshape(-1), return_inverse=True)  # [U], [B*N]
        ids, mask = self.memory.token_ids_of(uniq.view(1, -1))  # [1, U, L] each
        ids, mask = ids.reshape(uniq.shape[0], -1), mask.reshape(uniq.shape[0], -1)  # [U, L]
        device = getattr(enc, "device", None)
        if isinstance(device, torch.device):
            ids = ids.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
        if not compiling:
            # Drop columns that are padding in every retrieved entry (positions stay absolute,
            # so this is exact for any padding side): entries are usually far shorter than L.
            used = mask.ne(0).any(0).nonzero()
            last = int(used.max()) + 1 if used.numel() else 1
            ids, mask = ids[:, :last], mask[:, :last]
        keys, values = enc.encode_memory(ids, mask)  # [U, key_dim], [U, d]
        if inv is not None:
            keys, values = keys[inv], values[inv]
        return keys.view(B, N, -1), values.view(B, N, -1)

    def fetch_keys(self, indices: torch.Tensor):
        return self.memory.fetch_keys(indices)

    def __getattr__(self, name):  # keys, values, version, sources_of, ...: the memory's
        if name in ("memory", "encoder", "always"):
            raise AttributeError(name)
        return getattr(self.memory, name)


__all__ = ["LiveEncodedMemory", "fetch_entries", "search_entries"]
