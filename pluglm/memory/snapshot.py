"""MemorySnapshot: one immutable version of a memory's tables, and every read on it.

A KnowledgeMemory never writes into a snapshot: each mutation builds new tensors and swaps
in a new snapshot, so a reader holding one sees a single consistent table (docs/design.md,
"The memory"). Search here is exact MIPS (``pluglm_kernels.mips_topk``) over the searchable
rows, ``valid & ~stale & finite``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..topk import exact_topk


def as_ids(name: str, ids, M: int, device=None) -> torch.Tensor:
    """Any int tensor / nested list / int -> int64 tensor (same shape), bounds-checked."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must be integer entry ids, got {ids.dtype}")
        t = ids.detach()
    else:
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be integer entry ids: {e}") from None
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            if t.numel() == 0:
                t = t.to(torch.int64)
            else:
                raise TypeError(f"{name} must be integer entry ids, got {t.dtype}")
    t = t.to(dtype=torch.int64, device=device if device is not None else t.device)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= M):
        raise ValueError(f"{name} must be entry ids in [0, {M}), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t


def _nested(ids: torch.Tensor, fn):
    lst = ids.tolist()

    def rec(x):
        return [rec(y) for y in x] if isinstance(x, list) else fn(x)

    return rec(lst)


class MemorySnapshot:
    """One immutable version of a memory's tables (see the module docstring for shapes).

    Everything here only reads; a KnowledgeMemory swaps in a new snapshot on each mutation.
    """

    __slots__ = ("token_ids", "lengths", "keys", "values", "valid", "stale", "finite",
                 "source_index", "sources", "texts", "rev", "version", "vocab_size",
                 "tokenizer_name", "pad_token_id", "max_length", "searchable", "num_searchable",
                 "num_valid", "key_rev", "__weakref__")

    def __init__(self, *, token_ids, lengths, keys, values, valid, stale, finite, source_index,
                 sources, texts, rev, version, vocab_size, tokenizer_name, pad_token_id, max_length,
                 key_rev=None):
        M = token_ids.shape[0]
        self.token_ids = token_ids            # [M, L] int16/int32
        self.lengths = lengths                # [M] int32
        self.keys = keys                      # [M, key_dim] or None
        self.values = values                  # [M, d] or None
        self.valid = valid                    # [M] bool
        self.stale = stale                    # [M] bool
        self.finite = finite                  # [M] bool
        self.source_index = source_index      # [M] int32, CPU
        self.sources = tuple(sources)
        self.texts = tuple(texts) if not isinstance(texts, tuple) else texts
        self.rev = rev                        # [M] int64, CPU: content revision per row
        # [M] int64, CPU: the version whose commit last wrote each row's key (0 = before any
        # recorded write). Search indexes catch up with `key_rev > version they reflect`.
        if key_rev is None:
            key_rev = torch.zeros(M, dtype=torch.int64)
        elif tuple(key_rev.shape) != (M,):
            raise ValueError(f"key_rev must have shape ({M},), got {tuple(key_rev.shape)}")
        self.key_rev = key_rev
        self.version = int(version)
        self.vocab_size = int(vocab_size)
        self.tokenizer_name = tokenizer_name
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)
        if keys is None:
            self.searchable = torch.zeros(M, dtype=torch.bool, device=token_ids.device)
        else:
            self.searchable = valid & ~stale & finite  # [M]
        self.num_searchable = int(self.searchable.sum()) if M else 0
        self.num_valid = int(valid.sum()) if M else 0

    def _replace(self, **changes) -> "MemorySnapshot":
        fields = {n: getattr(self, n) for n in (
            "token_ids", "lengths", "keys", "values", "valid", "stale", "finite", "source_index",
            "sources", "texts", "rev", "version", "vocab_size", "tokenizer_name", "pad_token_id",
            "max_length", "key_rev")}
        fields["version"] = self.version + 1
        fields.update(changes)
        M = fields["token_ids"].shape[0]
        if "key_rev" not in changes and M != len(self):
            # rows were sliced or renumbered by the caller: every key counts as rewritten
            fields["key_rev"] = torch.full((M,), fields["version"], dtype=torch.int64)
        return MemorySnapshot(**fields)

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    @property
    def key_dim(self) -> int | None:
        return None if self.keys is None else self.keys.shape[1]

    @property
    def value_dim(self) -> int | None:
        return None if self.values is None else self.values.shape[1]

    def attention_mask(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        pos = torch.arange(width, device=lengths.device)
        return (pos < lengths.unsqueeze(-1).to(pos.dtype)).to(torch.long)

    # ----------------------------------------------------------------------- search

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, key_dim] -> (scores [B, k] float32 descending, ids [B, k] int64), on
        the memory's device; only searchable rows (valid, encoded, not stale, finite)."""
        self.check_search(queries, k)
        return exact_topk(queries, self.keys, k, valid=self.searchable,
                          num_valid=self.num_searchable, backend=backend)

    def check_search(self, queries, k) -> None:
        """The argument checks of ``search`` (shared by every search backend)."""
        if self.keys is None:
            raise RuntimeError("memory is not encoded yet: call encode(encoder) before search")
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor [B, key_dim], got {type(queries).__name__}")
        if queries.dim() != 2:
            raise ValueError(f"queries must have shape [B, key_dim={self.key_dim}], got "
                             f"{tuple(queries.shape)}")
        if not queries.dtype.is_floating_point:
            raise TypeError(f"queries must be floating point, got {queries.dtype}")
        if queries.shape[1] != self.key_dim:
            raise ValueError(f"queries have {queries.shape[1]} columns but this memory's keys "
                             f"have key_dim={self.key_dim}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > self.num_searchable:
            M = len(self)
            n_removed = M - self.num_valid
            n_stale = int((self.valid & self.stale).sum()) if M else 0
            n_bad = int((self.valid & ~self.stale & ~self.finite).sum()) if M else 0
            raise ValueError(f"k={k} is larger than the number of searchable entries "
                             f"({self.num_searchable} of {M}: {n_removed} removed, {n_stale} stale "
                             f"awaiting encode(only_stale=True), {n_bad} with non-finite keys/values)")

    # ------------------------------------------------------------------------ reads

    def fetch_keys(self, ids) -> torch.Tensor:
        """Stored keys of ``ids`` [...]: [..., key_dim]."""
        if self.keys is None:
            raise RuntimeError("memory is not encoded yet: call encode(encoder) first")
        return self.keys[as_ids("ids", ids, len(self), self.keys.device)]

    def fetch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (keys [B, N, key_dim], values [B, N, d]) from the stored tables."""
        if self.keys is None:
            raise RuntimeError("memory is not encoded yet: call encode(encoder) first")
        if self.values is None:
            raise RuntimeError("this memory stores no values (its encoder returned none): "
                               "re-encode with an encoder that returns values")
        idx = as_ids("ids", ids, len(self), self.keys.device)
        return self.keys[idx], self.values[idx]

    def token_ids_of(self, ids, *, dtype: torch.dtype = torch.long, trim: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] -> (token ids [..., L] in ``dtype``, attention mask [..., L] long), on
        the memory's device (for re-encoding retrieved entries with a live encoder).
        trim=True cuts L to the longest entry among ``ids``."""
        idx = as_ids("ids", ids, len(self), self.device)
        lengths = self.lengths[idx]
        width = self.token_ids.shape[1]
        if trim and idx.numel():
            width = int(lengths.max())
        tok = self.token_ids[idx][..., :width].to(dtype)
        return tok, self.attention_mask(lengths, width)

    def texts_of(self, ids):
        """Texts of ``ids`` as nested lists shaped like ids (id -1, "no entry", gives None)."""
        idx = self._host_ids(ids)
        return _nested(idx, lambda i: None if i < 0 else self.texts[i])

    def sources_of(self, ids):
        """Source names of ``ids`` as nested lists shaped like ids (-1 gives None)."""
        idx = self._host_ids(ids)
        src = self.source_index.tolist()
        return _nested(idx, lambda i: None if i < 0 else self.sources[src[i]])

    def _host_ids(self, ids) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            t = ids.detach().cpu()
        else:
            t = ids
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            if t.numel():
                raise TypeError(f"ids must be integer entry ids, got {t.dtype}")
        t = t.to(torch.int64)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= len(self)):
            raise ValueError(f"ids must be entry ids in [0, {len(self)}) (or -1), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t


@dataclass(frozen=True)
class ValidationReport:
    """What ``KnowledgeMemory.validate()`` found; every field holds row ids (int64, CPU).

    nonfinite_keys / nonfinite_values: live (valid, encoded, not stale) rows with NaN/Inf,
    which search excludes. stale: live rows waiting for ``encode(only_stale=True)``.
    removed: tombstoned rows (reclaimed by ``compact``)."""

    nonfinite_keys: torch.Tensor
    nonfinite_values: torch.Tensor
    stale: torch.Tensor
    removed: torch.Tensor

    @property
    def ok(self) -> bool:
        """True when no live row has a non-finite key or value."""
        return self.nonfinite_keys.numel() == 0 and self.nonfinite_values.numel() == 0

    def as_dict(self) -> dict[str, list[int]]:
        return {"nonfinite_keys": self.nonfinite_keys.tolist(),
                "nonfinite_values": self.nonfinite_values.tolist(),
                "stale": self.stale.tolist(), "removed": self.removed.tolist()}



def finite_rows(t: torch.Tensor | None, M: int, device) -> torch.Tensor:
    """[M] bool: rows of t [M, n] free of NaN/Inf (all True when t is None)."""
    if t is None:
        return torch.ones(M, dtype=torch.bool, device=device)
    return torch.isfinite(t).all(dim=1) if t.shape[1] else torch.ones(M, dtype=torch.bool, device=device)


__all__ = ["MemorySnapshot", "ValidationReport", "as_ids", "finite_rows"]
