"""MemorySnapshot: one immutable version of a memory's tables, and every read on it.

A KnowledgeMemory never writes into a snapshot: each mutation builds new tensors and swaps
in a new snapshot, so a reader holding one sees a single consistent table (docs/design.md,
"The memory"). Search here is exact MIPS (``pluglm_kernels.mips_topk``) over the searchable
rows, ``valid & ~stale & finite``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pluglm_kernels import gather_rows, triton_interpret, triton_status

from ..topk import exact_topk
from .placement import KEY_TABLES, ROW_TABLES, Placement, RowStager
from .texts import TextTable
from .tokenize import widen_tokens


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
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: the host check below is a data-dependent guard (a
        # graph break, or an export error); check inside the graph instead, no host sync
        if t.numel():
            torch._assert_async(((t >= 0) & (t < M)).all(), f"{name} must be entry ids in [0, {M})")
        return t
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
                 "num_valid", "key_rev", "key_scales", "layout", "placement", "stager", "mapped",
                 "__weakref__")

    def __init__(self, *, token_ids, lengths, keys, values, valid, stale, finite, source_index,
                 sources, texts, rev, version, vocab_size, tokenizer_name, pad_token_id, max_length,
                 key_rev=None, key_scales=None, layout=None, placement=None, stager=None,
                 mapped=frozenset()):
        M = token_ids.shape[0]
        self.token_ids = token_ids            # [M, L] int16/uint16/int32
        self.lengths = lengths                # [M] int32
        self.keys = keys                      # [M, key_dim] float or int8, or None
        # [M] float32 with int8 keys (key i ~= keys[i] * key_scales[i]), else None
        if (keys is not None and keys.dtype == torch.int8) != (key_scales is not None):
            raise ValueError("int8 keys need key_scales [M] float32 (and only they)")
        self.key_scales = key_scales
        # the table dtypes the memory's owner chose (TableLayout); kept in the file
        self.layout = layout if layout is not None else TableLayout()
        self.values = values                  # [M, d] or None
        self.valid = valid                    # [M] bool
        self.stale = stale                    # [M] bool
        self.finite = finite                  # [M] bool
        self.source_index = source_index      # [M] int32, CPU
        self.sources = tuple(sources)
        self.texts = TextTable.of(texts)    # M texts, one byte blob + offsets
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
        # where the tables live (docs/design.md, "Placement"); default: all on token_ids'
        # device, as a memory built in one place is
        self.placement = placement if placement is not None else Placement(
            valid.device, token_ids.device)
        self.stager = stager if stager is not None else RowStager()
        # names of the tables still backed by the memory-mapped file (never pinned)
        self.mapped = frozenset(mapped)
        if keys is None:
            self.searchable = torch.zeros(M, dtype=torch.bool, device=valid.device)
        else:
            self.searchable = valid & ~stale & finite  # [M]
        self.num_searchable = int(self.searchable.sum()) if M else 0
        self.num_valid = int(valid.sum()) if M else 0

    def _replace(self, **changes) -> "MemorySnapshot":
        fields = {n: getattr(self, n) for n in (
            "token_ids", "lengths", "keys", "values", "valid", "stale", "finite", "source_index",
            "sources", "texts", "rev", "version", "vocab_size", "tokenizer_name", "pad_token_id",
            "max_length", "key_rev", "key_scales", "layout", "placement", "stager")}
        fields["version"] = self.version + 1
        fields.update(changes)
        # a table a mutation rebuilt goes to its home (pinned if asked); one it kept stays
        pl = fields["placement"]
        mapped = set()
        for name in KEY_TABLES + ROW_TABLES:
            t = fields[name]
            same = t is not None and t is getattr(self, name)
            if same and name in self.mapped and t.device == (pl.rows if name in ROW_TABLES
                                                             else pl.keys):
                mapped.add(name)
            fields[name] = pl.place(name, t, mapped=name in mapped, unchanged=same
                                    and fields["placement"] == self.placement)
        fields["mapped"] = frozenset(mapped)
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
        """Where search runs and every read returns its result: the keys' device."""
        return self.valid.device

    @property
    def row_device(self) -> torch.device:
        """Where the values, token ids and lengths live (the host with values="pinned")."""
        return self.token_ids.device

    @property
    def key_dim(self) -> int | None:
        return None if self.keys is None else self.keys.shape[1]

    @property
    def value_dim(self) -> int | None:
        return None if self.values is None else self.values.shape[1]

    @property
    def key_dtype(self) -> torch.dtype | None:
        """The stored key dtype (float32/float16/bfloat16/int8), None before encode."""
        return None if self.keys is None else self.keys.dtype

    def float_keys(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Keys of rows ``idx`` [...] (default: all) as [..., key_dim]: int8 keys dequantised
        to float32, float keys as stored."""
        keys = self.keys if idx is None else self.keys[idx]
        if self.key_scales is None:
            return keys
        scales = self.key_scales if idx is None else self.key_scales[idx]
        return keys.to(torch.float32) * scales.unsqueeze(-1)

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
                          num_valid=self.num_searchable, key_scales=self.key_scales,
                          backend=backend)

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
        return self.float_keys(as_ids("ids", ids, len(self), self.keys.device))

    def fetch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (keys [B, N, key_dim], values [B, N, d]) from the stored tables."""
        if self.keys is None:
            raise RuntimeError("memory is not encoded yet: call encode(encoder) first")
        if self.values is None:
            raise RuntimeError("this memory stores no values (values on demand, or its encoder "
                               "returned none): read it through a model, which re-encodes the "
                               "retrieved entries, or re-encode with store_values=True")
        if self.placement.split:
            if self._zero_copy("values"):
                idx = self._device_ids(ids)
                values = gather_rows(self.values, idx.reshape(-1), backend="triton")
                return self.float_keys(idx), values.view(*idx.shape, -1)
            idx_h, idx = self._split_ids(ids)
            values = self.stager.gather("values", self.values, idx_h.reshape(-1), self.device)
            return self.float_keys(idx), values.view(*idx.shape, -1)
        idx = as_ids("ids", ids, len(self), self.keys.device)
        return self.float_keys(idx), self.values[idx]

    def _zero_copy(self, name: str) -> bool:
        """Read table ``name`` with the zero-copy kernel: asked for, pinned in-memory rows
        and a CUDA target (or, under TRITON_INTERPRET=1, host rows and a host target: the
        same code path for tests)."""
        t = getattr(self, name)
        if not self.placement.zero_copy or name in self.mapped or t.device.type != "cpu" \
                or not triton_status()[0]:
            return False
        if self.device.type == "cuda":
            return t.is_pinned()
        return self.device.type == "cpu" and triton_interpret()

    def _device_ids(self, ids) -> torch.Tensor:
        """ids -> int64 on the keys' device; ids already there are checked on the device
        (by gather_rows: no host sync), others on the host."""
        if isinstance(ids, torch.Tensor) and ids.device == self.device \
                and ids.dtype == torch.int64 and self.device.type != "cpu":
            return ids
        return as_ids("ids", ids, len(self), self.device)

    def _split_ids(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ids -> (on the row device, on the keys' device), bounds-checked once. Ids that
        a device search returned come to the host in one small copy ([B, N] int64): the
        same host sync the bounds check of the one-device path makes."""
        idx_h = as_ids("ids", ids, len(self), self.row_device)
        if isinstance(ids, torch.Tensor) and ids.device == self.device and ids.dtype == torch.int64:
            return idx_h, ids
        return idx_h, idx_h.to(self.device, non_blocking=True)

    def token_ids_of(self, ids, *, dtype: torch.dtype = torch.long, trim: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] -> (token ids [..., L] in ``dtype``, attention mask [..., L] long), on
        the memory's device (for re-encoding retrieved entries with a live encoder).
        trim=True cuts L to the longest entry among ``ids``."""
        if self.placement.split and self._zero_copy("token_ids"):
            idx = self._device_ids(ids)
            flat = idx.reshape(-1)
            lengths = gather_rows(self.lengths.view(-1, 1), flat, backend="triton").view(-1)
            width = self.token_ids.shape[1]
            if trim and flat.numel():
                width = int(lengths.max())  # one sync, as the one-device path makes
            tok = gather_rows(self.token_ids[:, :width], flat, backend="triton")
            shape = tuple(idx.shape)
            return (widen_tokens(tok, dtype).view(*shape, width),
                    self.attention_mask(lengths, width).view(*shape, width))
        if self.placement.split:
            idx_h, _ = self._split_ids(ids)
            flat = idx_h.reshape(-1)
            lengths_h = self.lengths.index_select(0, flat)
            width = self.token_ids.shape[1]
            if trim and flat.numel():
                width = int(lengths_h.max())  # on the host: no device sync
            tok = self.stager.gather("token_ids", self.token_ids[:, :width], flat, self.device)
            lengths = lengths_h.to(self.device, non_blocking=True)
            shape = tuple(idx_h.shape)
            return (widen_tokens(tok, dtype).view(*shape, width),
                    self.attention_mask(lengths, width).view(*shape, width))
        idx = as_ids("ids", ids, len(self), self.device)
        lengths = self.lengths[idx]
        width = self.token_ids.shape[1]
        if trim and idx.numel():
            width = int(lengths.max())
        tok = widen_tokens(self.token_ids[idx][..., :width], dtype)
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


_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TableLayout:
    """The table dtypes a memory's owner chose (docs/design.md, "Compact tables").

    key_dtype: float32/float16/bfloat16, or int8 (per-row float32 scales, searched by
    ``mips_topk(key_scales=)``); None = the encoder's float dtype. value_dtype: a float
    dtype, None = the encoder's. store_values=False: keep no value table (values on demand:
    a model re-encodes the retrieved entries from their token ids)."""

    key_dtype: torch.dtype | None = None
    value_dtype: torch.dtype | None = None
    store_values: bool = True

    def __post_init__(self):
        if self.key_dtype is not None and self.key_dtype not in _KEY_DTYPES:
            raise TypeError(f"key_dtype must be one of {_KEY_DTYPES} or None, got {self.key_dtype!r}")
        if self.value_dtype is not None and self.value_dtype not in _VALUE_DTYPES:
            raise TypeError(f"value_dtype must be one of {_VALUE_DTYPES} or None, got "
                            f"{self.value_dtype!r}")
        if not isinstance(self.store_values, bool):
            raise TypeError(f"store_values must be a bool, got {self.store_values!r}")


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
    """[M] bool: rows of t [M, n] free of NaN/Inf (all True when t is None or integer; an
    int8 key table's finiteness is its scales')."""
    if t is None or not t.dtype.is_floating_point:
        return torch.ones(M, dtype=torch.bool, device=device)
    return torch.isfinite(t).all(dim=1) if t.shape[1] else torch.ones(M, dtype=torch.bool, device=device)


__all__ = ["MemorySnapshot", "TableLayout", "ValidationReport", "as_ids", "finite_rows"]
