"""KnowledgeMemory: the editable key-value knowledge store of a PlugLM model (DESIGN.md §4).

An entry is one tokenised text chunk (at most ``max_length`` tokens, special tokens
included) with its original text span, a source name, and — once encoded — a key
[key_dim] and optionally a value [d]. Tables (M entries, L = longest entry):

  token_ids     [M, L] int16 (vocab <= 32768 ids) or int32, padded with the tokenizer's pad id
  lengths       [M]    int32, tokens per entry (attention mask = arange(L) < lengths)
  keys          [M, key_dim] float32/float16/bfloat16, None until ``encode``
  values        [M, d]       optional (whatever the encoder returns)
  valid         [M]    bool, False = removed (tombstone)
  stale         [M]    bool, True = tokens changed since the key was computed (or never encoded)
  finite        [M]    bool, key and value rows are free of NaN/Inf
  source_index  [M]    int32 (CPU) into ``sources``, the distinct source names
  texts         M Python strings
All device tables live on the memory's ``device``.

Search (``pluglm_kernels.mips_topk``) only returns *searchable* rows:
``valid & ~stale & finite``. (``stale`` is about an entry's *content*: its tokens changed
after its key was computed. Keys computed by an older encoder — the "stale keys" that PlugLM
training searches between refreshes — are not stale in this sense; a refresher replaces
them with ``set_keys``.) So a removed entry, an entry whose text was replaced by
``update`` but not re-encoded yet (its old key would answer for the new text), and an entry
with a non-finite key or value are never returned; ``encode(..., only_stale=True)`` makes
updated and added entries searchable again, and ``validate()`` lists the excluded rows.

Ids are row numbers. ``add`` appends, ``update`` and ``remove`` keep every id; only
``compact`` renumbers (it returns the old -> new mapping).

Search backends: exact ``mips_topk`` (default), or ``backend="faiss"`` with a cached
``pluglm.index`` faiss index per (kind, build options), synced lazily with the snapshot at
the first search after a mutation: rows whose key was written since (tracked per row in
``key_rev``, the version of the commit that wrote it — no old key table is kept), rows
that became or stopped being searchable; a compaction rebuilds. ``set_search_backend``
makes a backend the default of plain ``search(q, k)`` calls (what a PlugLM model makes).
``shard(rank, world_size)`` gives a :class:`pluglm.sharded_memory.ShardedKnowledgeMemory`
for exact search across ``torch.distributed`` ranks.

Thread-safety. All state is one immutable :class:`MemorySnapshot`. Every mutation (add,
update, remove, compact, encode's commit, set_keys, validate's repair) builds new tensors —
never writing into the previous snapshot's — and swaps the single ``_snap`` reference under
a lock; mutations are therefore serialised. Reads (search, fetch, texts_of, save, ...) take
one reference and work on that snapshot, so a search running concurrently with mutations
sees exactly one consistent table, and never blocks. ``encode`` computes outside the lock
and commits only the rows whose content did not change meanwhile (matched by a per-row
revision number, so commits survive a concurrent ``compact``); rows updated during an
encode stay stale. The price of copy-on-write: a mutation copies the tables it changes
(``add`` all of them, O(M) — batch additions into one call; ``update`` the token table;
``remove`` only the [M] masks). For several reads that must agree with each other (search, then
fetch/texts_of of the result) across a concurrent ``compact``, read from one
``mem.snapshot()``. The tensors exposed (``keys``, ``token_ids``, ...) are shared with
snapshots: treat them as read-only (use ``set_keys`` to write keys).

Files (``save`` / ``load``): a directory with ``tensors.safetensors``, ``texts.jsonl`` (one
JSON string per line) and ``manifest.json`` (format name and version, counts, shapes,
dtypes, key/value widths, tokenizer name and vocab size, sources table, and the byte size
and sha256 of each file). A save is atomic (see ``pluglm._io``): a crash at any point leaves
the previous or the new complete version. Loading reads only JSON and safetensors (never
pickle, never code), checks sizes and checksums, shapes, dtypes and index ranges, and raises
:class:`MemoryFormatError` (a ``ValueError``) or ``FileNotFoundError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import pluglm_kernels

from . import _io

FORMAT_NAME = "pluglm.knowledge_memory"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
TEXTS_FILE = "texts.jsonl"
MANIFEST_FILE = "manifest.json"

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TOKENIZE_BATCH = 1024


class MemoryFormatError(ValueError):
    """A saved memory is truncated, corrupted, inconsistent or from a newer format."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2**15 else torch.int32


# ---------------------------------------------------------------------------- tokenising


def _check_texts(name: str, texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of str, got a single str (wrap it: [text])")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def _check_sources(source, n: int) -> list[str]:
    if isinstance(source, str):
        names = [source] * n
    else:
        names = list(source)
        if len(names) != n:
            raise ValueError(f"source must be a str or one name per text ({n}), got {len(names)}")
    for s in names:
        if not isinstance(s, str) or not s:
            raise ValueError(f"source names must be non-empty str, got {s!r}")
    return names


def _vocab_size(tokenizer) -> int:
    try:
        return int(len(tokenizer))
    except TypeError:
        v = getattr(tokenizer, "vocab_size", None)
        if isinstance(v, int):
            return v
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer (len() = vocab size), got "
                    f"{type(tokenizer).__name__}")


def _tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps one sequence with: (prefix, suffix).

    Probed by tokenising a text with and without special tokens, which works for fast and
    slow tokenizers of every family ([CLS] x [SEP], <s> x </s>, BOS x, or nothing)."""
    probe = "memory"
    with_sp = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    body = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(body)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i:i + n] == body:
            return with_sp[:i], with_sp[i + n:]
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds "
                     f"(tokenising {probe!r} gave {with_sp} with and {body} without them)")


@dataclass
class _Chunks:
    """Tokenised entries before they join a memory."""

    ids: list[list[int]]      # one token list per entry, special tokens included
    texts: list[str]          # the entry's text span
    owner: list[int]          # which input text each entry came from


def _tokenize(texts: list[str], tokenizer, max_length: int, stride: int | None,
              *, single: bool = False, truncate: bool = False) -> _Chunks:
    """Split each text into entries of at most max_length tokens (specials included);
    consecutive chunks of one text overlap by ``stride`` tokens."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    prefix, suffix = _special_layout(tokenizer)
    body_max = max_length - len(prefix) - len(suffix)
    if body_max < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after the "
                         f"{len(prefix) + len(suffix)} special tokens")
    stride = 0 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < body_max:
        raise ValueError(f"stride (tokens shared by consecutive chunks) must be an int in "
                         f"[0, {body_max}), got {stride!r}")
    step = body_max - stride
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    out = _Chunks([], [], [])
    for b0 in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[b0:b0 + _TOKENIZE_BATCH]
        enc = tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False,
                        return_offsets_mapping=use_offsets)
        for j, text in enumerate(batch):
            i = b0 + j
            ids = list(enc["input_ids"][j])
            if not ids:
                raise ValueError(f"texts[{i}] produces no tokens (empty or whitespace only)")
            if len(ids) > body_max and (single or truncate):
                if not truncate:
                    raise ValueError(f"texts[{i}] has {len(ids) + len(prefix) + len(suffix)} tokens, "
                                     f"more than max_length={max_length}: an update replaces one "
                                     f"entry by one entry (pass truncate=True, or remove + add)")
                ids = ids[:body_max]
                offs = enc["offset_mapping"][j] if use_offsets else None
                span = (text[offs[0][0]:offs[body_max - 1][1]] if offs is not None
                        else tokenizer.decode(ids, skip_special_tokens=True))
                out.ids.append(prefix + ids + suffix)
                out.texts.append(span)
                out.owner.append(i)
                continue
            if len(ids) <= body_max:
                out.ids.append(prefix + ids + suffix)
                out.texts.append(text)
                out.owner.append(i)
                continue
            offs = enc["offset_mapping"][j] if use_offsets else None
            start = 0
            while True:
                end = min(start + body_max, len(ids))
                piece = ids[start:end]
                if offs is not None:
                    span = text[offs[start][0]:offs[end - 1][1]]
                else:
                    span = tokenizer.decode(piece, skip_special_tokens=True)
                out.ids.append(prefix + piece + suffix)
                out.texts.append(span)
                out.owner.append(i)
                if end >= len(ids):
                    break
                start += step
    return out


def _pack(ids: list[list[int]], width: int, pad: int, dtype: torch.dtype, device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (token_ids [n, width] dtype, lengths [n] int32) on device."""
    n = len(ids)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > torch.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {_dtype_name(dtype)} "
                         f"(min {int(flat.min())}, max {int(flat.max())})")
    out = torch.full((n, width), pad, dtype=dtype)
    out[torch.arange(width)[None, :] < lengths[:, None]] = flat.to(dtype)
    return out.to(device), lengths.to(device)


def _repad(token_ids: torch.Tensor, lengths: torch.Tensor, width: int, pad: int,
           dtype: torch.dtype) -> torch.Tensor:
    """[M, L] -> [M, width] (width >= max length) in dtype, pad id after each entry's end."""
    M, L = token_ids.shape
    out = torch.full((M, width), pad, dtype=dtype, device=token_ids.device)
    w = min(L, width)
    out[:, :w] = token_ids[:, :w].to(dtype)
    pos = torch.arange(width, device=token_ids.device)
    out.masked_fill_(pos[None, :] >= lengths[:, None].to(pos.dtype), pad)
    return out


# ------------------------------------------------------------------------------ snapshot


def _as_ids(name: str, ids, M: int, device=None) -> torch.Tensor:
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
        mask = None if self.num_searchable == len(self) else self.searchable
        q = queries.detach().to(device=self.keys.device, dtype=torch.float32)
        return pluglm_kernels.mips_topk(q, self.keys, k, valid=mask, backend=backend)

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
        return self.keys[_as_ids("ids", ids, len(self), self.keys.device)]

    def fetch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (keys [B, N, key_dim], values [B, N, d]) from the stored tables."""
        if self.keys is None:
            raise RuntimeError("memory is not encoded yet: call encode(encoder) first")
        if self.values is None:
            raise RuntimeError("this memory stores no values (its encoder returned none): "
                               "re-encode with an encoder that returns values")
        idx = _as_ids("ids", ids, len(self), self.keys.device)
        return self.keys[idx], self.values[idx]

    def token_ids_of(self, ids, *, dtype: torch.dtype = torch.long, trim: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] -> (token ids [..., L] in ``dtype``, attention mask [..., L] long), on
        the memory's device (for re-encoding retrieved entries with a live encoder).
        trim=True cuts L to the longest entry among ``ids``."""
        idx = _as_ids("ids", ids, len(self), self.device)
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


# -------------------------------------------------------------------------------- memory


def _encoder_device(encoder) -> torch.device | None:
    dev = getattr(encoder, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(encoder, nn.Module):
        for p in encoder.parameters():
            return p.device
        for b in encoder.buffers():
            return b.device
    return None


def _finite_rows(t: torch.Tensor | None, M: int, device) -> torch.Tensor:
    if t is None:
        return torch.ones(M, dtype=torch.bool, device=device)
    return torch.isfinite(t).all(dim=1) if t.shape[1] else torch.ones(M, dtype=torch.bool, device=device)


_KIND_KNOBS = {"flat": (), "ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("efSearch",)}


class _IndexEntry:
    """One cached faiss index and the memory version it reflects."""

    __slots__ = ("lock", "index", "version", "knobs")

    def __init__(self):
        self.lock = threading.Lock()  # held across sync + search: faiss indexes are mutable
        self.index = None
        self.version = -1
        self.knobs: dict = {}  # the build-time search knobs, restored when a call names none


def _check_faiss_params(kind: str, params: dict) -> None:
    import inspect

    from .index import FaissIndex, SEARCH_PARAMS

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


def _finite_keys(snap: MemorySnapshot) -> torch.Tensor:
    """The key table with non-finite rows (never searchable) zeroed: indexes refuse NaN/Inf.
    Copies only when such a row exists."""
    if snap.keys is None or bool(snap.finite.all()):
        return snap.keys
    return snap.keys.masked_fill(~snap.finite[:, None], 0)


class KnowledgeMemory:
    """Editable knowledge store: texts -> token ids -> keys/values, searched with exact MIPS.

    Build with :meth:`from_texts` or :meth:`load`; see the module docstring for the tables,
    what search returns, the thread-safety and the file guarantees.
    """

    def __init__(self, snapshot: MemorySnapshot, tokenizer=None):
        self._lock = threading.Lock()
        self._snap = snapshot
        self._next_rev = int(snapshot.rev.max()) + 1 if len(snapshot) else 0
        self._tokenizer = tokenizer
        self._search_config: tuple[str, str | None, dict] = ("auto", None, {})
        self._indexes: dict[tuple, _IndexEntry] = {}  # (kind, build params) -> cached index
        self._index_lock = threading.Lock()  # guards the dict only; each entry has its own

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, source: str | Sequence[str] = "wiki",
                   max_length: int = 288, stride: int | None = None, *,
                   device: str | torch.device = "cpu") -> "KnowledgeMemory":
        """Tokenise ``texts`` with any Hugging Face tokenizer (fast or slow) into entries.

        A text longer than ``max_length`` tokens (special tokens included) becomes several
        entries, consecutive ones sharing ``stride`` tokens (default 0); each keeps the
        text's source and its own span of the text. ``source`` is one name or one per text.
        """
        texts = _check_texts("texts", texts)
        if not texts:
            raise ValueError("texts must contain at least one text")
        sources = _check_sources(source, len(texts))
        chunks = _tokenize(texts, tokenizer, max_length, stride)
        vocab = _vocab_size(tokenizer)
        pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        dtype = _token_dtype(vocab)
        width = max(len(x) for x in chunks.ids)
        token_ids, lengths = _pack(chunks.ids, width, pad, dtype, torch.device(device))
        table = list(dict.fromkeys(sources))
        pos = {s: i for i, s in enumerate(table)}
        M = len(chunks.ids)
        dev = token_ids.device
        snap = MemorySnapshot(
            token_ids=token_ids, lengths=lengths, keys=None, values=None,
            valid=torch.ones(M, dtype=torch.bool, device=dev),
            stale=torch.ones(M, dtype=torch.bool, device=dev),
            finite=torch.ones(M, dtype=torch.bool, device=dev),
            source_index=torch.tensor([pos[sources[o]] for o in chunks.owner], dtype=torch.int32),
            sources=table, texts=tuple(chunks.texts), rev=torch.arange(M, dtype=torch.int64),
            version=0, vocab_size=vocab, tokenizer_name=_tokenizer_name(tokenizer),
            pad_token_id=pad, max_length=max_length)
        return cls(snap, tokenizer)

    @classmethod
    def concat(cls, memories: Sequence["KnowledgeMemory"]) -> "KnowledgeMemory":
        """One memory holding the entries of ``memories`` in order (ids of the second are
        offset by len(first), ...), with their sources and texts; on the first's device.

        All must share the tokenizer's vocabulary size; encoded ones must share key_dim
        (keys are cast to the first encoded memory's dtype) and store values alike. Entries
        of a memory that is not encoded come in stale (search skips them until encode)."""
        mems = list(memories)
        if not mems:
            raise ValueError("memories must not be empty")
        for m in mems:
            if not isinstance(m, KnowledgeMemory):
                raise TypeError(f"can only concatenate KnowledgeMemory, got {type(m).__name__}")
        snaps = [m.snapshot() for m in mems]
        first = snaps[0]
        dev = first.device
        for i, s in enumerate(snaps):
            if s.vocab_size != first.vocab_size:
                raise ValueError(f"memory {i} was tokenised with vocab size {s.vocab_size}, memory 0 "
                                 f"with {first.vocab_size}: one memory needs one tokenizer")
        encoded = [(i, s) for i, s in enumerate(snaps) if s.keys is not None]
        keys = values = None
        if encoded:
            i0, s0 = encoded[0]
            kd, kdt = s0.key_dim, s0.keys.dtype
            has_v = s0.values is not None
            dv = s0.value_dim
            vdt = s0.values.dtype if has_v else None
            for i, s in encoded:
                if s.key_dim != kd:
                    raise ValueError(f"memory {i} has key_dim {s.key_dim}, memory {i0} has {kd}")
                if (s.values is not None) != has_v or (has_v and s.value_dim != dv):
                    raise ValueError(f"memory {i} stores values of width {s.value_dim}, memory {i0} "
                                     f"of width {dv}: re-encode them with one encoder")
            keys = torch.cat([s.keys.to(dev, kdt) if s.keys is not None
                              else torch.zeros(len(s), kd, dtype=kdt, device=dev) for s in snaps])
            if has_v:
                values = torch.cat([s.values.to(dev, vdt) if s.values is not None
                                    else torch.zeros(len(s), dv, dtype=vdt, device=dev) for s in snaps])
        dtype = max((s.token_ids.dtype for s in snaps), key=lambda d: torch.iinfo(d).bits)
        width = max(s.token_ids.shape[1] for s in snaps)
        pad = first.pad_token_id
        token_ids = torch.cat([_repad(s.token_ids.to(dev), s.lengths.to(dev), width, pad, dtype)
                               for s in snaps])
        table: list[str] = []
        pos: dict[str, int] = {}
        src_parts = []
        for s in snaps:
            remap = []
            for name in s.sources:
                if name not in pos:
                    pos[name] = len(table)
                    table.append(name)
                remap.append(pos[name])
            remap_t = torch.tensor(remap, dtype=torch.int32)
            src_parts.append(remap_t[s.source_index.long()] if len(s) else s.source_index)
        M = token_ids.shape[0]
        snap = MemorySnapshot(
            token_ids=token_ids, lengths=torch.cat([s.lengths.to(dev) for s in snaps]),
            keys=keys, values=values,
            valid=torch.cat([s.valid.to(dev) for s in snaps]),
            stale=torch.cat([s.stale.to(dev) if s.keys is not None
                             else torch.ones(len(s), dtype=torch.bool, device=dev) for s in snaps]),
            finite=torch.cat([s.finite.to(dev) for s in snaps]),
            source_index=torch.cat(src_parts).to(torch.int32), sources=table,
            texts=tuple(t for s in snaps for t in s.texts), rev=torch.arange(M, dtype=torch.int64),
            version=0, vocab_size=first.vocab_size, tokenizer_name=first.tokenizer_name,
            pad_token_id=pad, max_length=max(s.max_length for s in snaps))
        return cls(snap, mems[0]._tokenizer)

    def __add__(self, other: "KnowledgeMemory") -> "KnowledgeMemory":
        if not isinstance(other, KnowledgeMemory):
            return NotImplemented
        return KnowledgeMemory.concat([self, other])

    def to(self, device: str | torch.device) -> "KnowledgeMemory":
        """A copy of this memory with its device tables on ``device``."""
        s = self.snapshot()
        dev = torch.device(device)
        mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
        snap = s._replace(token_ids=mv(s.token_ids), lengths=mv(s.lengths), keys=mv(s.keys),
                          values=mv(s.values), valid=mv(s.valid), stale=mv(s.stale),
                          finite=mv(s.finite), version=s.version)
        return KnowledgeMemory(snap, self._tokenizer)

    # ------------------------------------------------------------------------ copying

    def __copy__(self) -> "KnowledgeMemory":
        """``copy.copy``: a new memory over the same current snapshot. The tables are shared
        (no copy: every mutation of either memory writes a new snapshot, so neither sees the
        other's later edits); the tokenizer is shared; the copy gets its own locks and an
        empty faiss-index cache (built again at its first faiss search)."""
        return self._copy_with(self._snap, self._tokenizer, {})

    def __deepcopy__(self, memo) -> "KnowledgeMemory":
        """``copy.deepcopy``: a fully independent memory. Every table is copied (so even
        writes into the exposed tensors do not reach the copy), the tokenizer is deep-copied;
        own locks, empty faiss-index cache, same version and search setting."""
        import copy

        return self._copy_with(copy.deepcopy(self._snap, memo),
                               copy.deepcopy(self._tokenizer, memo), memo)

    def _copy_with(self, snapshot: MemorySnapshot, tokenizer, memo) -> "KnowledgeMemory":
        import copy

        new = type(self)(snapshot, tokenizer)  # fresh locks and index cache
        memo[id(self)] = new
        new._next_rev = self._next_rev
        new._search_config = copy.deepcopy(self._search_config, memo)
        return new

    # ------------------------------------------------------------------ properties

    def snapshot(self) -> MemorySnapshot:
        """The current immutable version of the tables (reads on it always agree)."""
        return self._snap

    def __len__(self) -> int:
        return len(self._snap)

    @property
    def version(self) -> int:
        """Increases by one on every mutation (add, update, remove, compact, encode, set_keys)."""
        return self._snap.version

    @property
    def device(self) -> torch.device:
        return self._snap.device

    @property
    def keys(self) -> torch.Tensor | None:
        """[M, key_dim] (read-only; rows that are stale or removed hold no current key)."""
        return self._snap.keys

    @property
    def values(self) -> torch.Tensor | None:
        """[M, d] or None."""
        return self._snap.values

    @property
    def valid(self) -> torch.Tensor:
        """[M] bool, False for removed entries."""
        return self._snap.valid

    @property
    def stale(self) -> torch.Tensor:
        """[M] bool, True for entries whose key does not match their tokens (yet)."""
        return self._snap.stale

    @property
    def searchable(self) -> torch.Tensor:
        """[M] bool: valid & encoded & not stale & finite — the rows search can return."""
        return self._snap.searchable

    @property
    def token_ids(self) -> torch.Tensor:
        """[M, L] int16/int32, padded with pad_token_id."""
        return self._snap.token_ids

    @property
    def lengths(self) -> torch.Tensor:
        """[M] int32."""
        return self._snap.lengths

    @property
    def sources(self) -> tuple[str, ...]:
        """Distinct source names (``source_index`` points into it)."""
        return self._snap.sources

    @property
    def source_index(self) -> torch.Tensor:
        """[M] int32 (CPU)."""
        return self._snap.source_index

    @property
    def texts(self) -> tuple[str, ...]:
        return self._snap.texts

    @property
    def key_dim(self) -> int | None:
        return self._snap.key_dim

    @property
    def value_dim(self) -> int | None:
        return self._snap.value_dim

    @property
    def vocab_size(self) -> int:
        return self._snap.vocab_size

    @property
    def max_length(self) -> int:
        return self._snap.max_length

    @property
    def pad_token_id(self) -> int:
        return self._snap.pad_token_id

    @property
    def tokenizer_name(self) -> str:
        return self._snap.tokenizer_name

    @property
    def num_valid(self) -> int:
        return self._snap.num_valid

    @property
    def num_searchable(self) -> int:
        return self._snap.num_searchable

    def __repr__(self) -> str:
        s = self._snap
        return (f"KnowledgeMemory(entries={len(s)}, valid={s.num_valid}, "
                f"searchable={s.num_searchable}, key_dim={s.key_dim}, value_dim={s.value_dim}, "
                f"sources={list(s.sources)}, device={s.device}, version={s.version})")

    def check_compatible(self, *, key_dim: int | None = None, value_dim: int | None = None,
                         vocab_size: int | None = None) -> None:
        """Raise ValueError when this memory does not fit a model with these sizes."""
        s = self._snap
        if key_dim is not None and s.key_dim is not None and s.key_dim != key_dim:
            raise ValueError(f"memory keys have key_dim={s.key_dim}, the model expects {key_dim}")
        if value_dim is not None and s.value_dim is not None and s.value_dim != value_dim:
            raise ValueError(f"memory values have width {s.value_dim}, the model expects {value_dim}")
        if vocab_size is not None and s.vocab_size > vocab_size:
            raise ValueError(f"memory was tokenised with a vocabulary of {s.vocab_size} tokens, "
                             f"larger than the model's {vocab_size}")

    # ------------------------------------------------------------------------ reads

    def search(self, queries: torch.Tensor, k: int, backend: str | None = None, *,
               index: str | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, key_dim] -> (scores [B, k] float32 descending, ids [B, k] int64), on
        the memory's device; only searchable rows (never removed, stale or non-finite ones).

        backend: None = this memory's default (``set_search_backend``; initially exact
        "auto"); a kernel backend ("auto", "cpu", "cuda", "triton", "reference") = exact MIPS
        with ``pluglm_kernels.mips_topk``, queries compared in float32; "faiss" = a cached
        faiss index of kind ``index`` ("flat", "ivf", "hnsw", "ivfpq"; default "flat") built
        with ``params`` (see ``pluglm.index.build_index``; ``nprobe``/``efSearch`` are
        per-search knobs that never rebuild). With backend=None, ``index``/``params`` given
        here override the default's.

        The faiss index is kept in step lazily: the first search after a mutation syncs it
        with the current snapshot (rows whose key was written since, rows that became or
        stopped being searchable; ``pluglm.index`` decides in-place update vs rebuild per
        kind); a ``compact`` (renumbering) or a change of key width rebuilds it. The result
        is exactly that index's answer over one snapshot: the one current when the search
        took the index's lock. A query for which the approximate index finds fewer than k
        entries (e.g. IVF lists probed hold fewer) is answered by exact search instead.

        Raises RuntimeError if not encoded; ValueError on a key_dim mismatch or k larger
        than the number of searchable rows; ``pluglm.index.FaissNotInstalledError`` (an
        ImportError) for backend="faiss" without faiss.
        """
        if backend is None:
            backend, kind, defaults = self._search_config
            if index is not None or params:
                if backend != "faiss" and index is not None:
                    backend = "faiss"
                    defaults = {}
                if index is not None and index != kind:
                    defaults = {}  # the default's options belong to another index kind
                kind = index if index is not None else kind
                params = {**defaults, **params}
            else:
                params = dict(defaults)
        else:
            kind = index
        if backend != "faiss":
            if kind is not None or params:
                raise TypeError(f"index= and index options apply to backend='faiss', not "
                                f"backend={backend!r} (got index={kind!r}, {sorted(params)})")
            return self._snap.search(queries, k, backend=backend)
        return self._faiss_search(queries, k, kind or "flat", params)

    def set_search_backend(self, backend: str = "auto", index: str | None = None,
                           **params) -> "KnowledgeMemory":
        """Set what ``search(q, k)`` (with no backend) uses — so a model that calls
        ``memory.search(q, k)`` searches with it. ``set_search_backend("faiss", index="ivf",
        nprobe=16)``: approximate search with a cached IVF index; ``set_search_backend()``:
        back to exact search. Options are checked now (unknown names raise TypeError, a
        missing faiss raises FaissNotInstalledError); the index is built at the first
        search. Returns self."""
        if backend == "faiss":
            from .index import FAISS_KINDS, import_faiss

            kind = "flat" if index is None else index
            if kind not in FAISS_KINDS:
                raise ValueError(f"index must be one of {FAISS_KINDS} for backend='faiss', "
                                 f"got {kind!r}")
            import_faiss()
            _check_faiss_params(kind, params)
            self._search_config = ("faiss", kind, dict(params))
            return self
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if index is not None or params:
            raise TypeError(f"index= and index options apply to backend='faiss', not {backend!r}")
        self._search_config = (backend, None, {})
        return self

    @property
    def search_backend(self) -> dict:
        """What ``search(q, k)`` uses: {"backend", "index", "params"}."""
        backend, kind, params = self._search_config
        return {"backend": backend, "index": kind, "params": dict(params)}

    def clear_search_indexes(self) -> None:
        """Free every cached faiss index (the next faiss search builds its own again)."""
        with self._index_lock:
            self._indexes.clear()

    def _faiss_search(self, queries, k, kind: str, params: dict):
        from .index import FAISS_KINDS, SEARCH_PARAMS, build_index

        if kind not in FAISS_KINDS:
            raise ValueError(f"index must be one of {FAISS_KINDS} for backend='faiss', got {kind!r}")
        params = dict(params)
        knobs = {n: params.pop(n) for n in SEARCH_PARAMS if n in params}
        _check_faiss_params(kind, {**params, **knobs})
        key = (kind, _freeze(params))
        with self._index_lock:
            entry = self._indexes.get(key)
            if entry is None:
                entry = self._indexes[key] = _IndexEntry()
        with entry.lock:
            # The snapshot is read under the entry's lock, so the index only ever moves
            # forward in versions and the search below sees exactly this snapshot.
            snap = self._snap
            snap.check_search(queries, k)
            ix = entry.index
            if ix is None or ix.dim != snap.key_dim:
                entry.index = None  # a failed build leaves no half-made index behind
                ix = build_index(kind, _finite_keys(snap), snap.searchable, **params)
                entry.index = ix
                entry.knobs = {n: ix.params[n] for n in SEARCH_PARAMS if n in _KIND_KNOBS[kind]}
            elif entry.version != snap.version:
                if len(snap) < ix.size:  # compacted: ids were renumbered
                    ix.rebuild(_finite_keys(snap), snap.searchable)
                else:
                    changed = (snap.key_rev > entry.version).nonzero().squeeze(1)  # [n] CPU
                    ix.sync(_finite_keys(snap), snap.searchable, changed=changed)
            entry.version = snap.version
            ix.set_search_params(**{**entry.knobs, **knobs})
            q = queries.detach().to(torch.float32)
            scores, ids = ix.search(q, k)  # [B, k] on q's device
        miss = (ids < 0).any(1)  # [B]
        if bool(miss.any()):
            es, ei = snap.search(q[miss], k)
            scores[miss], ids[miss] = es.to(scores.device), ei.to(ids.device)
        return scores.to(snap.device), ids.to(snap.device)

    def fetch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (keys [B, N, key_dim], values [B, N, d]) (MemoryLayer protocol)."""
        return self._snap.fetch(ids)

    def fetch_keys(self, ids) -> torch.Tensor:
        """ids [B, N] -> stored keys [B, N, key_dim]."""
        return self._snap.fetch_keys(ids)

    def token_ids_of(self, ids, *, dtype: torch.dtype = torch.long, trim: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (token ids [B, N, L], attention mask [B, N, L]) on the memory's device."""
        return self._snap.token_ids_of(ids, dtype=dtype, trim=trim)

    def texts_of(self, ids):
        """Texts of ``ids``, nested lists shaped like ids."""
        return self._snap.texts_of(ids)

    def sources_of(self, ids):
        """Source names of ``ids``, nested lists shaped like ids."""
        return self._snap.sources_of(ids)

    # --------------------------------------------------------------------- mutation

    def _resolve_tokenizer(self, tokenizer):
        tok = tokenizer if tokenizer is not None else self._tokenizer
        if tok is None:
            raise ValueError("tokenizer is required (this memory was loaded from disk and has "
                             "not seen a tokenizer yet)")
        vocab = _vocab_size(tok)
        if vocab != self._snap.vocab_size:
            raise ValueError(f"tokenizer has a vocabulary of {vocab} tokens but this memory was "
                             f"built with {self._snap.vocab_size} ({self._snap.tokenizer_name}): "
                             f"one memory needs one tokenizer")
        self._tokenizer = tok
        return tok

    def _new_revs(self, n: int) -> torch.Tensor:
        r = torch.arange(self._next_rev, self._next_rev + n, dtype=torch.int64)
        self._next_rev += n
        return r

    def add(self, texts: Sequence[str], tokenizer=None, source: str | Sequence[str] = "user", *,
            stride: int | None = None) -> torch.Tensor:
        """Append ``texts`` (chunked like from_texts) -> ids [n] int64 (CPU) of the new entries.

        New entries are stale (not searchable) until ``encode(encoder, only_stale=True)``.
        ``tokenizer`` defaults to the one this memory last used.
        """
        texts = _check_texts("texts", texts)
        sources = _check_sources(source, len(texts))
        if not texts:
            return torch.zeros(0, dtype=torch.int64)
        tok = self._resolve_tokenizer(tokenizer)
        chunks = _tokenize(texts, tok, self._snap.max_length, stride)
        pad_new = max(len(x) for x in chunks.ids)
        with self._lock:
            s = self._snap
            dev = s.device
            dtype = s.token_ids.dtype
            width = max(s.token_ids.shape[1], pad_new)
            new_tok, new_len = _pack(chunks.ids, width, s.pad_token_id, dtype, dev)
            old_tok = (s.token_ids if width == s.token_ids.shape[1]
                       else _repad(s.token_ids, s.lengths, width, s.pad_token_id, dtype))
            table = list(s.sources)
            pos = {name: i for i, name in enumerate(table)}
            for name in sources:
                if name not in pos:
                    pos[name] = len(table)
                    table.append(name)
            n = len(chunks.ids)
            M = len(s)
            ones = torch.ones(n, dtype=torch.bool, device=dev)
            keys = values = None
            if s.keys is not None:
                keys = torch.cat([s.keys, s.keys.new_zeros(n, s.key_dim)])
            if s.values is not None:
                values = torch.cat([s.values, s.values.new_zeros(n, s.value_dim)])
            self._snap = s._replace(
                token_ids=torch.cat([old_tok, new_tok]), lengths=torch.cat([s.lengths, new_len]),
                keys=keys, values=values, valid=torch.cat([s.valid, ones]),
                stale=torch.cat([s.stale, ones]), finite=torch.cat([s.finite, ones]),
                source_index=torch.cat([s.source_index, torch.tensor(
                    [pos[sources[o]] for o in chunks.owner], dtype=torch.int32)]),
                sources=table, texts=s.texts + tuple(chunks.texts),
                rev=torch.cat([s.rev, self._new_revs(n)]),
                key_rev=torch.cat([s.key_rev, torch.zeros(n, dtype=torch.int64)]))
        return torch.arange(M, M + n, dtype=torch.int64)

    def add_examples(self, texts: Sequence[str], labels: Sequence, template: str = "{text} It was {label}.",
                     source: str = "examples", *, tokenizer=None, label_names=None) -> torch.Tensor:
        """In-task knowledge prompting: add one entry per labelled example, formatted with
        ``template.format(text=..., label=...)``. ``label_names`` (a list or dict) maps
        label values (e.g. class ids) to words. Returns the new ids like ``add``."""
        texts = _check_texts("texts", texts)
        labels = list(labels)
        if len(labels) != len(texts):
            raise ValueError(f"labels must have one label per text ({len(texts)}), got {len(labels)}")
        if "{text}" not in template:
            raise ValueError(f"template must contain '{{text}}', got {template!r}")
        words = []
        for lab in labels:
            if label_names is not None:
                try:
                    lab = label_names[lab]
                except (KeyError, IndexError, TypeError):
                    raise ValueError(f"label {lab!r} is not in label_names") from None
            words.append(str(lab))
        formatted = [template.format(text=t, label=w) for t, w in zip(texts, words)]
        return self.add(formatted, tokenizer, source=source)

    def update(self, ids, texts: Sequence[str], tokenizer=None, *, source: str | Sequence[str] | None = None,
               truncate: bool = False) -> None:
        """Replace the text (and tokens) of entries ``ids`` in place, one text per id.

        The ids keep their place; each new text must fit one entry (``truncate=True`` cuts
        it). Their keys become stale: search skips these entries until they are re-encoded
        (``encode(encoder, only_stale=True)``), so an old key never answers for a new text.
        ``source`` (default: keep each entry's) renames their source. Removed ids cannot
        be updated.
        """
        texts = _check_texts("texts", texts)
        idx = _as_ids("ids", ids, len(self._snap), torch.device("cpu")).reshape(-1)
        if idx.numel() != len(texts):
            raise ValueError(f"update needs one text per id: {idx.numel()} ids, {len(texts)} texts")
        if idx.numel() == 0:
            return
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("ids must not repeat in one update")
        sources = None if source is None else _check_sources(source, len(texts))
        tok = self._resolve_tokenizer(tokenizer)
        chunks = _tokenize(texts, tok, self._snap.max_length, None, single=True, truncate=truncate)
        with self._lock:
            s = self._snap
            M = len(s)
            if int(idx.max()) >= M:
                raise ValueError(f"ids must be entry ids in [0, {M})")
            dev = s.device
            idx_d = idx.to(dev)
            if not bool(s.valid[idx_d].all()):
                dead = idx[~s.valid[idx_d].cpu()].tolist()
                raise ValueError(f"cannot update removed entries {dead[:10]} (add them instead)")
            width = max(s.token_ids.shape[1], max(len(x) for x in chunks.ids))
            dtype = s.token_ids.dtype
            new_tok, new_len = _pack(chunks.ids, width, s.pad_token_id, dtype, dev)
            tok_t = _repad(s.token_ids, s.lengths, width, s.pad_token_id, dtype) \
                if width != s.token_ids.shape[1] else s.token_ids.clone()
            tok_t[idx_d] = new_tok
            lengths = s.lengths.clone()
            lengths[idx_d] = new_len
            stale = s.stale.clone()
            stale[idx_d] = True
            texts_l = list(s.texts)
            for i, t in zip(idx.tolist(), chunks.texts):
                texts_l[i] = t
            table, src = list(s.sources), s.source_index
            if sources is not None:
                pos = {name: i for i, name in enumerate(table)}
                for name in sources:
                    if name not in pos:
                        pos[name] = len(table)
                        table.append(name)
                src = src.clone()
                src[idx] = torch.tensor([pos[x] for x in sources], dtype=torch.int32)
            rev = s.rev.clone()
            rev[idx] = self._new_revs(idx.numel())
            self._snap = s._replace(token_ids=tok_t, lengths=lengths, stale=stale,
                                    texts=tuple(texts_l), source_index=src, sources=table, rev=rev)

    def remove(self, ids) -> None:
        """Tombstone entries ``ids``: search never returns them again. Removing a removed
        entry is a no-op. ``compact()`` reclaims their space (and renumbers)."""
        idx = _as_ids("ids", ids, len(self._snap), torch.device("cpu")).reshape(-1)
        with self._lock:
            s = self._snap
            if idx.numel() and int(idx.max()) >= len(s):
                raise ValueError(f"ids must be entry ids in [0, {len(s)})")
            valid = s.valid.clone()
            valid[idx.to(s.device)] = False
            self._snap = s._replace(valid=valid)

    def compact(self) -> torch.Tensor:
        """Drop removed entries and renumber the rest in order.

        Returns the mapping old id -> new id, [M_old] int64 (CPU), -1 for dropped entries.
        Unused source names are dropped and the token table is trimmed to its longest entry.
        """
        with self._lock:
            s = self._snap
            keep_d = s.valid
            keep = keep_d.cpu()
            M = len(s)
            mapping = torch.full((M,), -1, dtype=torch.int64)
            kept = keep.nonzero().squeeze(1)
            mapping[kept] = torch.arange(kept.numel(), dtype=torch.int64)
            lengths = s.lengths[keep_d]
            width = int(lengths.max()) if lengths.numel() else 1
            tok = s.token_ids[keep_d][:, :width].contiguous()
            src_old = s.source_index[keep]
            used = torch.unique(src_old).tolist() if src_old.numel() else []
            remap = torch.full((max(len(s.sources), 1),), -1, dtype=torch.int32)
            for new, old in enumerate(used):
                remap[old] = new
            sel = lambda t: None if t is None else t[keep_d].contiguous()  # noqa: E731
            self._snap = s._replace(
                token_ids=tok, lengths=lengths, keys=sel(s.keys), values=sel(s.values),
                valid=s.valid[keep_d], stale=s.stale[keep_d], finite=s.finite[keep_d],
                source_index=remap[src_old.long()] if src_old.numel() else src_old,
                sources=[s.sources[i] for i in used],
                texts=tuple(s.texts[i] for i in kept.tolist()), rev=s.rev[keep],
                key_rev=torch.full((kept.numel(),), s.version + 1, dtype=torch.int64))
        return mapping

    # --------------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode(self, encoder, batch_size: int = 256, progress: bool = True, *,
               only_stale: bool = False, key_dtype: torch.dtype | None = None) -> int:
        """Compute keys (and values) of every live entry with ``encoder``.

        ``encoder`` is any object with ``encode_memory(token_ids [E, L] long, attention_mask
        [E, L] long) -> (keys [E, key_dim], values [E, d] or None)``; it runs under
        torch.no_grad (an nn.Module in eval mode, restored afterwards) on the encoder's
        device, ``batch_size`` entries at a time, entries grouped by length so that L is
        each batch's longest entry. ``only_stale=True`` encodes just the stale entries
        (added or updated since the last encode). Keys are stored in ``key_dtype`` (default:
        the encoder's float dtype; float64 becomes float32). Returns the number of entries
        whose new keys were committed (an entry updated during the encode stays stale).
        """
        if not callable(getattr(encoder, "encode_memory", None)):
            raise TypeError(f"encoder must have encode_memory(token_ids, attention_mask) -> "
                            f"(keys, values), got {type(encoder).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if key_dtype is not None and key_dtype not in _KEY_DTYPES:
            raise TypeError(f"key_dtype must be one of {_KEY_DTYPES}, got {key_dtype}")
        s = self._snap
        todo = (s.valid & s.stale) if only_stale else s.valid
        rows = todo.nonzero().squeeze(1).cpu()  # [E]
        if rows.numel() == 0:
            return 0
        lengths = s.lengths.cpu()[rows]
        order = torch.argsort(lengths, stable=True)
        rows, lengths = rows[order], lengths[order]
        dev = _encoder_device(encoder) or s.device
        was_training = encoder.training if isinstance(encoder, nn.Module) else None
        if was_training:
            encoder.eval()
        E = rows.numel()
        keys_out = values_out = None
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=E, desc="encode memory", unit="entry", disable=not progress)
            for b0 in range(0, E, batch_size):
                r = rows[b0:b0 + batch_size]
                n = r.numel()
                Lb = int(lengths[b0:b0 + n].max())
                tok = s.token_ids[r.to(s.device), :Lb].to(device=dev, dtype=torch.long)  # [n, Lb]
                mask = s.attention_mask(lengths[b0:b0 + n].to(dev), Lb)  # [n, Lb]
                out = encoder.encode_memory(tok, mask)
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise TypeError("encoder.encode_memory must return (keys, values or None)")
                k, v = out
                if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[0] != n \
                        or not k.dtype.is_floating_point:
                    raise ValueError(f"encode_memory returned keys of shape "
                                     f"{tuple(getattr(k, 'shape', ()))}, expected [{n}, key_dim] float")
                if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2
                                      or v.shape[0] != n or not v.dtype.is_floating_point):
                    raise ValueError(f"encode_memory returned values of shape "
                                     f"{tuple(getattr(v, 'shape', ()))}, expected [{n}, d] float or None")
                if keys_out is None:
                    kdt = key_dtype or (k.dtype if k.dtype in _KEY_DTYPES else torch.float32)
                    keys_out = torch.empty(E, k.shape[1], dtype=kdt, device=s.device)
                    if v is not None:
                        vdt = v.dtype if v.dtype in _KEY_DTYPES else torch.float32
                        values_out = torch.empty(E, v.shape[1], dtype=vdt, device=s.device)
                elif k.shape[1] != keys_out.shape[1] or (v is None) != (values_out is None) or \
                        (v is not None and v.shape[1] != values_out.shape[1]):
                    raise ValueError("encode_memory returned different key/value shapes across batches")
                keys_out[b0:b0 + n] = k.detach().to(device=s.device, dtype=keys_out.dtype)
                if v is not None:
                    values_out[b0:b0 + n] = v.detach().to(device=s.device, dtype=values_out.dtype)
                bar.update(n)
            bar.close()
        finally:
            if was_training:
                encoder.train(True)
        return self._commit(s, rows, keys_out, values_out)

    def set_keys(self, keys: torch.Tensor, values: torch.Tensor | None = None, *, ids=None,
                 snapshot: MemorySnapshot | None = None, adopt: bool = False) -> int:
        """Install keys [E, key_dim] (and values [E, d]) computed elsewhere, e.g. by a key
        refresher, for entries ``ids`` [E] of ``snapshot`` (default: all entries of the
        current one). Entries whose content changed since ``snapshot`` stay stale. Returns
        the number of entries committed.

        adopt=True hands the tensors over: when they cover every current row in order (a
        full refresh with no edit meanwhile) they become the table itself instead of being
        copied into a new one, so the swap needs no third table. The caller must not write
        to them afterwards."""
        s = self._snap if snapshot is None else snapshot
        if not isinstance(s, MemorySnapshot):
            raise TypeError("snapshot must come from KnowledgeMemory.snapshot()")
        rows = (torch.arange(len(s), dtype=torch.int64) if ids is None
                else _as_ids("ids", ids, len(s), torch.device("cpu")).reshape(-1))
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[0] != rows.numel() \
                or not keys.dtype.is_floating_point:
            raise ValueError(f"keys must be a float tensor [{rows.numel()}, key_dim], got "
                             f"{tuple(getattr(keys, 'shape', ()))}")
        if values is not None and (not isinstance(values, torch.Tensor) or values.dim() != 2
                                   or values.shape[0] != rows.numel()
                                   or not values.dtype.is_floating_point):
            raise ValueError(f"values must be a float tensor [{rows.numel()}, d], got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        kdt = keys.dtype if keys.dtype in _KEY_DTYPES else torch.float32
        keys = keys.detach().to(device=s.device, dtype=kdt)
        if values is not None:
            vdt = values.dtype if values.dtype in _KEY_DTYPES else torch.float32
            values = values.detach().to(device=s.device, dtype=vdt)
        return self._commit(s, rows, keys, values, adopt=adopt)

    def _commit(self, base: MemorySnapshot, rows: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor | None, adopt: bool = False) -> int:
        """Write keys/values computed from ``base`` rows [E] into the current snapshot, at
        the rows whose content revision is unchanged (compact-proof: matched by revision)."""
        finite_new = _finite_rows(keys, keys.shape[0], keys.device) & \
            _finite_rows(values, keys.shape[0], keys.device)  # [E]
        with self._lock:
            s = self._snap
            M = len(s)
            if M == 0:
                return 0
            enc_rev = base.rev[rows]  # [E]
            cur_sorted, order = torch.sort(s.rev)
            pos = torch.searchsorted(cur_sorted, enc_rev).clamp_(max=M - 1)
            hit = cur_sorted[pos] == enc_rev
            tgt = order[pos[hit]].to(s.device)  # current rows to fill
            src = hit.nonzero().squeeze(1).to(keys.device)  # their positions in keys
            same_layout = (
                s.keys is not None and s.keys.shape[1] == keys.shape[1] and s.keys.dtype == keys.dtype
                and (s.values is None) == (values is None)
                and (values is None or (s.values.shape[1] == values.shape[1]
                                        and s.values.dtype == values.dtype)))
            whole = (adopt and same_layout and tgt.numel() == M == keys.shape[0]
                     and bool((tgt.cpu() == torch.arange(M)).all())
                     and bool((src.cpu() == torch.arange(M)).all()))
            if whole:  # every row, in order: the handed-over tensors become the table
                key_rev = s.key_rev.clone()
                key_rev[:] = s.version + 1
                self._snap = s._replace(
                    keys=keys, values=values, stale=torch.zeros_like(s.stale),
                    finite=finite_new.to(s.device), key_rev=key_rev)
                return M
            if same_layout:
                new_keys = s.keys.clone()
                new_values = None if values is None else s.values.clone()
                stale, finite = s.stale.clone(), s.finite.clone()
                key_rev = s.key_rev.clone()
                key_rev[tgt.cpu()] = s.version + 1
            else:
                # A new width/dtype/values layout: rows this commit does not cover have no key
                # in it, so they are stale until encoded.
                new_keys = keys.new_zeros(M, keys.shape[1])
                new_values = None if values is None else values.new_zeros(M, values.shape[1])
                stale = torch.ones(M, dtype=torch.bool, device=s.device)
                finite = torch.ones(M, dtype=torch.bool, device=s.device)
                key_rev = torch.full((M,), s.version + 1, dtype=torch.int64)
            new_keys[tgt] = keys[src]
            if values is not None:
                new_values[tgt] = values[src]
            stale[tgt] = False
            finite[tgt] = finite_new[src].to(s.device)
            self._snap = s._replace(keys=new_keys, values=new_values, stale=stale, finite=finite,
                                    key_rev=key_rev)
            return int(tgt.numel())

    # ------------------------------------------------------------------- sharding

    def shard(self, rank: int, world_size: int, *, device: str | torch.device | None = None,
              group=None, queries_differ: bool = True):
        """This rank's part of the memory for search across a ``torch.distributed`` group:
        the contiguous rows ``pluglm.distributed.shard_bounds(len(self), rank, world_size)``
        (copied, so this memory can be freed), global ids kept. ``device``: where the
        shard's tables go (default: this memory's device). See
        :class:`pluglm.sharded_memory.ShardedKnowledgeMemory`."""
        from .sharded_memory import ShardedKnowledgeMemory

        return ShardedKnowledgeMemory.from_memory(self, rank, world_size, device=device,
                                                  group=group, queries_differ=queries_differ)

    # ------------------------------------------------------------------- validation

    def validate(self) -> ValidationReport:
        """Report live rows with NaN/Inf keys or values (search excludes them), stale rows
        and removed rows. Re-checks the tables themselves; if it finds a non-finite row that
        search did not yet exclude (an in-place write to the tables), it excludes it now."""
        with self._lock:
            s = self._snap
            M = len(s)
            fk = _finite_rows(s.keys, M, s.device)
            fv = _finite_rows(s.values, M, s.device)
            live = s.valid & ~s.stale if s.keys is not None else torch.zeros_like(s.valid)
            if s.keys is not None and not torch.equal(fk & fv, s.finite):
                self._snap = s._replace(finite=fk & fv)
            ids = lambda m: m.nonzero().squeeze(1).cpu()  # noqa: E731
            return ValidationReport(nonfinite_keys=ids(live & ~fk), nonfinite_values=ids(live & ~fv),
                                    stale=ids(s.valid & s.stale), removed=ids(~s.valid))

    # ------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write this memory to directory ``path`` atomically (module docstring: Files).

        An existing ``path`` is replaced only if it is a saved memory (or empty)."""
        from safetensors.torch import save_file

        from . import __version__

        s = self._snap
        target = Path(path).absolute()
        if target.exists():
            if not target.is_dir():
                raise FileExistsError(f"{target} exists and is not a directory")
            if any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
                raise FileExistsError(f"{target} exists and is not a saved KnowledgeMemory "
                                      f"(no {MANIFEST_FILE}); refusing to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        _io.recover_dir(target)
        _io.cleanup_leftovers(target)
        tensors = {"token_ids": s.token_ids, "lengths": s.lengths, "valid": s.valid,
                   "stale": s.stale, "source_index": s.source_index}
        if s.keys is not None:
            tensors["keys"] = s.keys
        if s.values is not None:
            tensors["values"] = s.values
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        tmp = _io.temp_sibling(target)
        try:
            tpath = tmp / TENSORS_FILE
            save_file(tensors, str(tpath), metadata={"format": FORMAT_NAME,
                                                     "format_version": str(FORMAT_VERSION)})
            _io.fsync_file(tpath)
            h = hashlib.sha256()
            xpath = tmp / TEXTS_FILE
            with open(xpath, "wb") as f:
                for t in s.texts:
                    line = (json.dumps(t, ensure_ascii=False) + "\n").encode("utf-8")
                    h.update(line)
                    f.write(line)
                f.flush()
                os.fsync(f.fileno())
            _io.save_checkpoint("files_written")
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "written_by": {"pluglm": __version__, "torch": torch.__version__},
                "num_entries": len(s), "num_valid": s.num_valid,
                "num_stale": int((s.valid & s.stale).sum()) if len(s) else 0,
                "max_length": s.max_length, "token_width": s.token_ids.shape[1],
                "pad_token_id": s.pad_token_id,
                "tokenizer": {"name": s.tokenizer_name, "vocab_size": s.vocab_size},
                "key_dim": s.key_dim, "value_dim": s.value_dim,
                "sources": list(s.sources), "version": s.version,
                "tensors": {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                            for n, t in tensors.items()},
                "files": {
                    TENSORS_FILE: {"bytes": tpath.stat().st_size, "sha256": _io.sha256_file(tpath)},
                    TEXTS_FILE: {"bytes": xpath.stat().st_size, "sha256": h.hexdigest()},
                },
            }
            _io.write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
            _io.fsync_dir(tmp)
            _io.save_checkpoint("before_swap")
            _io.replace_dir(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mmap: bool = True,
             *, verify: bool = True) -> "KnowledgeMemory":
        """Read a memory saved by ``save``.

        device: where the tables go. mmap=True maps the tensor file (CPU tables stay backed
        by it until a mutation copies them; the file can be replaced by a later save
        meanwhile); mmap=False reads it into memory. verify=True checks each file's sha256
        and every token id against the vocabulary (reads everything once); sizes, shapes,
        dtypes and the other index ranges are always checked.
        """
        root = Path(path)
        if not root.is_dir():
            if _io.recover_dir(root.absolute()):
                pass
            else:
                prev = _io.interrupted_versions(root.absolute())
                if not prev:
                    raise FileNotFoundError(f"no saved memory at {root}")
                warnings.warn(f"{root} is missing because a save was interrupted mid-swap; "
                              f"loading the previous version from {prev[0]}", RuntimeWarning,
                              stacklevel=2)
                root = prev[0]
        return cls(_read(root, torch.device(device), mmap, verify))


# ---------------------------------------------------------------------------- loading


def _read(root: Path, device: torch.device, mmap: bool, verify: bool) -> MemorySnapshot:
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: missing (not a saved KnowledgeMemory?)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoryFormatError(f"{mpath}: not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(manifest, dict):
        raise MemoryFormatError(f"{mpath}: expected a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise MemoryFormatError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    fv = manifest.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise MemoryFormatError(f"{mpath}: bad format_version {fv!r}")
    if fv > FORMAT_VERSION:
        raise MemoryFormatError(f"{mpath}: written in format version {fv} by a newer pluglm; this "
                                f"version reads up to {FORMAT_VERSION} (upgrade pluglm)")

    def field(name, types, *, optional=False):
        v = manifest.get(name)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, types):
            raise MemoryFormatError(f"{mpath}: field {name!r} is missing or has the wrong type ({v!r})")
        return v

    M = field("num_entries", int)
    max_length = field("max_length", int)
    pad = field("pad_token_id", int)
    key_dim = field("key_dim", int, optional=True)
    value_dim = field("value_dim", int, optional=True)
    version = field("version", int)
    sources = field("sources", list)
    if not all(isinstance(x, str) for x in sources):
        raise MemoryFormatError(f"{mpath}: sources must be a list of str")
    tokinfo = field("tokenizer", dict)
    vocab = tokinfo.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise MemoryFormatError(f"{mpath}: tokenizer.vocab_size is missing or invalid")
    files = field("files", dict)
    specs = field("tensors", dict)

    for name in (TENSORS_FILE, TEXTS_FILE):
        fpath = root / name
        info = files.get(name)
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) \
                or not isinstance(info.get("sha256"), str):
            raise MemoryFormatError(f"{mpath}: no size/checksum entry for {name}")
        if not fpath.is_file():
            raise FileNotFoundError(f"{fpath}: missing (listed in {MANIFEST_FILE})")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise MemoryFormatError(f"{fpath}: {size} bytes but the manifest says {info['bytes']} "
                                    f"(truncated or modified)")
        if verify and _io.sha256_file(fpath) != info["sha256"]:
            raise MemoryFormatError(f"{fpath}: sha256 checksum mismatch (corrupted or modified)")

    tpath = root / TENSORS_FILE
    want = {"token_ids", "lengths", "valid", "stale", "source_index"}
    if key_dim is not None:
        want.add("keys")
    if value_dim is not None:
        want.add("values")
    tensors = _read_tensors(tpath, want, device, mmap)
    for name, t in tensors.items():
        spec = specs.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") != _dtype_name(t.dtype) \
                or spec.get("shape") != list(t.shape):
            raise MemoryFormatError(f"{tpath}: tensor {name!r} is {_dtype_name(t.dtype)} "
                                    f"{list(t.shape)}, the manifest says {spec}")

    def bad(msg):
        return MemoryFormatError(f"{tpath}: {msg}")

    tok = tensors["token_ids"]
    if tok.dim() != 2 or tok.shape[0] != M or tok.dtype not in (torch.int16, torch.int32):
        raise bad(f"token_ids must be int16/int32 [{M}, L], got {tok.dtype} {list(tok.shape)}")
    for name, dt in (("lengths", torch.int32), ("valid", torch.bool), ("stale", torch.bool),
                     ("source_index", torch.int32)):
        t = tensors[name]
        if t.dtype != dt or list(t.shape) != [M]:
            raise bad(f"{name} must be {_dtype_name(dt)} [{M}], got {_dtype_name(t.dtype)} {list(t.shape)}")
    lengths = tensors["lengths"]
    src = tensors["source_index"].to("cpu")
    if M:
        if int(lengths.min()) < 1 or int(lengths.max()) > tok.shape[1]:
            raise bad(f"lengths must be in [1, {tok.shape[1]}]")
        if int(src.min()) < 0 or int(src.max()) >= len(sources):
            raise bad(f"source_index must be in [0, {len(sources)})")
        if verify and (int(tok.min()) < 0 or int(tok.max()) >= vocab):
            raise bad(f"token ids must be in [0, {vocab})")
    keys = tensors.get("keys")
    values = tensors.get("values")
    for name, t, width in (("keys", keys, key_dim), ("values", values, value_dim)):
        if t is not None and (t.dtype not in _KEY_DTYPES or list(t.shape) != [M, width]):
            raise bad(f"{name} must be float [{M}, {width}], got {_dtype_name(t.dtype)} {list(t.shape)}")

    xpath = root / TEXTS_FILE
    try:
        lines = xpath.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise MemoryFormatError(f"{xpath}: not UTF-8: {e}") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != M:
        raise MemoryFormatError(f"{xpath}: {len(lines)} texts for {M} entries")
    texts = []
    for i, line in enumerate(lines):
        try:
            t = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemoryFormatError(f"{xpath}: line {i + 1} is not a JSON string: {e}") from None
        if not isinstance(t, str):
            raise MemoryFormatError(f"{xpath}: line {i + 1} is not a JSON string")
        texts.append(t)

    dev = device
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    stale = mv(tensors["stale"])
    if keys is None:
        stale = torch.ones(M, dtype=torch.bool, device=dev)
    keys, values = mv(keys), mv(values)
    finite = _finite_rows(keys, M, dev) & _finite_rows(values, M, dev)
    return MemorySnapshot(
        token_ids=mv(tok), lengths=mv(lengths), keys=keys, values=values,
        valid=mv(tensors["valid"]), stale=stale, finite=finite, source_index=src,
        sources=sources, texts=tuple(texts), rev=torch.arange(M, dtype=torch.int64),
        version=version, vocab_size=vocab, tokenizer_name=str(tokinfo.get("name", "")),
        pad_token_id=pad, max_length=max_length)


def _read_tensors(tpath: Path, want: set[str], device: torch.device, mmap: bool
                  ) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as load_bytes

    try:
        if mmap:
            out = {}
            # safe_open maps the file; CPU tensors stay backed by the (private) mapping.
            with safe_open(str(tpath), framework="pt", device=str(device)) as f:
                names = set(f.keys())
                _check_names(tpath, names, want)
                for n in want:
                    out[n] = f.get_tensor(n)
            return out
        out = load_bytes(tpath.read_bytes())
        _check_names(tpath, set(out), want)
        return {n: out[n].to(device) for n in want}
    except MemoryFormatError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise MemoryFormatError(f"{tpath}: cannot read safetensors data (corrupted?): {e}") from None


def _check_names(tpath: Path, names: set[str], want: set[str]) -> None:
    missing = want - names
    extra = names - want
    if missing or extra:
        raise MemoryFormatError(f"{tpath}: tensors {sorted(names)} do not match the manifest "
                                f"(missing {sorted(missing)}, unexpected {sorted(extra)})")


__all__ = ["KnowledgeMemory", "MemorySnapshot", "ValidationReport", "MemoryFormatError",
           "FORMAT_VERSION"]
