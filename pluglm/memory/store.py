"""KnowledgeMemory: the editable key-value knowledge store of a PlugLM model (docs/design.md).

An entry is one tokenised text chunk (at most ``max_length`` tokens, special tokens
included) with its original text span, a source name, and — once encoded — a key
[key_dim] and optionally a value [d]. Tables (M entries, L = longest entry):

  token_ids     [M, L] int16 (vocab <= 2**15), uint16 (<= 2**16) or int32, padded with the pad id
  lengths       [M]    int32, tokens per entry (attention mask = arange(L) < lengths)
  keys          [M, key_dim] float32/float16/bfloat16, None until ``encode``
  values        [M, d]       optional (whatever the encoder returns)
  valid         [M]    bool, False = removed (tombstone)
  stale         [M]    bool, True = tokens changed since the key was computed (or never encoded)
  finite        [M]    bool, key and value rows are free of NaN/Inf
  source_index  [M]    int32 (CPU) into ``sources``, the distinct source names
  texts         M Python strings
Keys, key scales and the masks live on the memory's ``device`` (where search runs and reads
return); values, token ids and lengths live there too unless ``place`` / ``load`` put them
elsewhere, e.g. in pinned host memory (docs/design.md, "Placement").

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

Files (``save`` / ``load``): a directory written atomically and read back with every size,
checksum, shape, dtype and index range checked; see :mod:`pluglm.memory.files`.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

import torch
from torch import nn

from pluglm_kernels import FLOAT_TABLE_DTYPES

from ..index import FAISS_KINDS, import_faiss
from .encode import check_encoded, encoder_device, length_batches, store_keys, table_dtype
from .faiss_cache import FaissIndexCache, check_faiss_options
from .files import locate, read_snapshot, save_snapshot
from .placement import Placement, parse_device
from .snapshot import MemorySnapshot, TableLayout, ValidationReport, as_ids, finite_rows
from .tokenize import (check_sources, check_texts, pack, repad, token_bits, token_dtype, tokenize,
                       tokenizer_name_of, vocab_size_of, wider_token_dtype)


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
        self._faiss = FaissIndexCache()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, source: str | Sequence[str] = "wiki",
                   max_length: int = 288, stride: int | None = None, *,
                   device: str | torch.device = "cpu", key_dtype: torch.dtype | None = None,
                   value_dtype: torch.dtype | None = None, store_values: bool = True
                   ) -> "KnowledgeMemory":
        """Tokenise ``texts`` with any Hugging Face tokenizer (fast or slow) into entries.

        A text longer than ``max_length`` tokens (special tokens included) becomes several
        entries, consecutive ones sharing ``stride`` tokens (default 0); each keeps the
        text's source and its own span of the text. ``source`` is one name or one per text.
        key_dtype / value_dtype / store_values: the memory's table dtypes, kept in its file
        (:class:`pluglm.memory.snapshot.TableLayout`; int8 keys for large memories,
        store_values=False for values on demand).
        """
        layout = TableLayout(key_dtype, value_dtype, store_values)
        texts = check_texts("texts", texts)
        if not texts:
            raise ValueError("texts must contain at least one text")
        sources = check_sources(source, len(texts))
        chunks = tokenize(texts, tokenizer, max_length, stride)
        vocab = vocab_size_of(tokenizer)
        pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        dtype = token_dtype(vocab)
        width = max(len(x) for x in chunks.ids)
        token_ids, lengths = pack(chunks.ids, width, pad, dtype, torch.device(device))
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
            version=0, vocab_size=vocab, tokenizer_name=tokenizer_name_of(tokenizer),
            pad_token_id=pad, max_length=max_length, layout=layout)
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
        keys = values = scales = None
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
            keys, scales = store_keys(torch.cat([
                s.float_keys().to(dev, torch.float32) if s.keys is not None
                else torch.zeros(len(s), kd, dtype=torch.float32, device=dev) for s in snaps]), kdt)
            if has_v:
                values = torch.cat([s.values.to(dev, vdt) if s.values is not None
                                    else torch.zeros(len(s), dv, dtype=vdt, device=dev) for s in snaps])
        dtype = snaps[0].token_ids.dtype
        for s in snaps[1:]:
            dtype = wider_token_dtype(dtype, s.token_ids.dtype)
        width = max(s.token_ids.shape[1] for s in snaps)
        pad = first.pad_token_id
        token_ids = torch.cat([repad(s.token_ids.to(dev), s.lengths, width, pad, dtype)
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
            keys=keys, values=values, key_scales=scales if encoded else None, layout=first.layout,
            valid=torch.cat([s.valid.to(dev) for s in snaps]),
            stale=torch.cat([s.stale.to(dev) if s.keys is not None
                             else torch.ones(len(s), dtype=torch.bool, device=dev) for s in snaps]),
            finite=torch.cat([s.finite.to(dev) for s in snaps]),
            source_index=torch.cat(src_parts).to(torch.int32), sources=table,
            texts=_cat_texts([s.texts for s in snaps]), rev=torch.arange(M, dtype=torch.int64),
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
                          finite=mv(s.finite), key_scales=mv(s.key_scales), version=s.version,
                          placement=Placement(dev, dev))
        return KnowledgeMemory(snap, self._tokenizer)

    def place(self, keys: str | torch.device | None = None,
              values: str | torch.device | None = None, *, zero_copy: bool | None = None
              ) -> "KnowledgeMemory":
        """Move this memory's tables in place (docs/design.md, "Placement"); returns self.

        keys: device of the keys, int8 key scales and the [M] masks — search runs there and
        search / fetch / token_ids_of return there (``memory.device``). values: device of
        the values, token ids and lengths, or ``"pinned"``: page-locked host memory, from
        which reads copy only the retrieved rows (through a pinned staging buffer,
        asynchronously) to the keys' device. None keeps a table group where it is.

        Without CUDA, "pinned" keeps plain host memory (the read path is the same; see
        ``placement``). Memory-mapped tables are never pinned: they stay mapped and only
        the rows read are paged in. Ids, contents and ``version`` are unchanged. Raises
        ValueError / TypeError naming ``keys`` or ``values`` for a bad device.

        zero_copy=True (with values="pinned"): reads from a CUDA device let the
        ``pluglm_kernels.gather_rows`` kernel read the retrieved rows straight from pinned
        host memory (no trip of the ids to the host, no staging copy); mapped tables and
        machines without CUDA/Triton keep the staged path. Compiled and interpreter-tested,
        not yet measured on a GPU, hence off by default."""
        with self._lock:
            s = self._snap
            pl = Placement.of(keys, values, zero_copy=zero_copy, base=s.placement)
            if pl != s.placement:
                self._snap = s._replace(placement=pl, version=s.version)
        return self

    @property
    def placement(self) -> dict:
        """{"keys": device, "values": device or "pinned", "pinned_pages": whether host row
        tables are really page-locked (False without CUDA or for mapped tables)}."""
        s = self._snap
        d = s.placement.describe()
        d["pinned_pages"] = bool(d["pinned_pages"] and s.values is not None
                                 and "values" not in s.mapped and s.values.is_pinned())
        return d

    def with_layout(self, key_dtype: torch.dtype | None = None,
                    value_dtype: torch.dtype | None = None, store_values: bool = True
                    ) -> "KnowledgeMemory":
        """A copy of this memory with other table dtypes (see ``from_texts``): keys cast or
        quantised to ``key_dtype`` (int8 from float keys: per-row scales), values cast to
        ``value_dtype`` or dropped (store_values=False). Ids, texts and masks are kept."""
        layout = TableLayout(key_dtype, value_dtype, store_values)
        s = self.snapshot()
        keys, scales, values = s.keys, s.key_scales, s.values
        if keys is not None and key_dtype is not None and key_dtype != keys.dtype:
            keys, scales = store_keys(s.float_keys(), key_dtype)
        if values is not None:
            values = None if not store_values else (
                values if value_dtype is None else values.to(value_dtype))
        snap = s._replace(keys=keys, key_scales=scales, values=values, layout=layout,
                          version=s.version)
        return KnowledgeMemory(snap, self._tokenizer)

    # ------------------------------------------------------------------------ copying

    def __copy__(self) -> "KnowledgeMemory":
        """``copy.copy``: a new memory over the same current snapshot. The tables are shared
        (no copy: every mutation of either memory writes a new snapshot, so neither sees the
        other's later edits); the tokenizer is shared; the copy gets its own lock and an
        empty faiss-index cache (built again at its first faiss search)."""
        return self._copy_with(self._snap, self._tokenizer, {})

    def __deepcopy__(self, memo) -> "KnowledgeMemory":
        """``copy.deepcopy``: a fully independent memory. Every table is copied (so even
        writes into the exposed tensors do not reach the copy), the tokenizer is deep-copied;
        own lock, empty faiss-index cache, same version and search setting."""
        import copy

        return self._copy_with(copy.deepcopy(self._snap, memo),
                               copy.deepcopy(self._tokenizer, memo), memo)

    def _copy_with(self, snapshot: MemorySnapshot, tokenizer, memo) -> "KnowledgeMemory":
        import copy

        new = type(self)(snapshot, tokenizer)  # fresh lock and index cache
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
        """[M, d] or None (None with store_values=False: values on demand)."""
        return self._snap.values

    @property
    def key_scales(self) -> torch.Tensor | None:
        """[M] float32 per-row scales of int8 keys (key i ~= keys[i] * key_scales[i]), else None."""
        return self._snap.key_scales

    @property
    def layout(self) -> TableLayout:
        """The table dtypes chosen for this memory (key_dtype, value_dtype, store_values)."""
        return self._snap.layout

    @property
    def key_dtype(self) -> torch.dtype | None:
        """The stored key dtype (int8, float32, ...), else the chosen one, None if neither."""
        s = self._snap
        return s.keys.dtype if s.keys is not None else s.layout.key_dtype

    @property
    def value_dtype(self) -> torch.dtype | None:
        s = self._snap
        return s.values.dtype if s.values is not None else s.layout.value_dtype

    @property
    def store_values(self) -> bool:
        return self._snap.layout.store_values

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
        """[M, L] int16/uint16/int32, padded with pad_token_id (uint16: widen before min/max)."""
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
        return self._faiss.search(self.snapshot, queries, k, kind or "flat", params)

    def set_search_backend(self, backend: str = "auto", index: str | None = None,
                           **params) -> "KnowledgeMemory":
        """Set what ``search(q, k)`` (with no backend) uses — so a model that calls
        ``memory.search(q, k)`` searches with it. ``set_search_backend("faiss", index="ivf",
        nprobe=16)``: approximate search with a cached IVF index; ``set_search_backend()``:
        back to exact search. Options are checked now (unknown names raise TypeError, a
        missing faiss raises FaissNotInstalledError); the index is built at the first
        search. Returns self."""
        if backend == "faiss":
            kind = "flat" if index is None else index
            if kind not in FAISS_KINDS:
                raise ValueError(f"index must be one of {FAISS_KINDS} for backend='faiss', "
                                 f"got {kind!r}")
            import_faiss()
            check_faiss_options(kind, params)
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
        self._faiss.clear()

    @property
    def _indexes(self) -> dict:
        """The cached faiss indexes, (kind, build options) -> entry (for tests and tools)."""
        return self._faiss.entries

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
        vocab = vocab_size_of(tok)
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
        texts = check_texts("texts", texts)
        sources = check_sources(source, len(texts))
        if not texts:
            return torch.zeros(0, dtype=torch.int64)
        tok = self._resolve_tokenizer(tokenizer)
        chunks = tokenize(texts, tok, self._snap.max_length, stride)
        pad_new = max(len(x) for x in chunks.ids)
        with self._lock:
            s = self._snap
            dev = s.device
            dtype = s.token_ids.dtype
            width = max(s.token_ids.shape[1], pad_new)
            new_tok, new_len = pack(chunks.ids, width, s.pad_token_id, dtype, s.row_device)
            old_tok = (s.token_ids if width == s.token_ids.shape[1]
                       else repad(s.token_ids, s.lengths, width, s.pad_token_id, dtype))
            table = list(s.sources)
            pos = {name: i for i, name in enumerate(table)}
            for name in sources:
                if name not in pos:
                    pos[name] = len(table)
                    table.append(name)
            n = len(chunks.ids)
            M = len(s)
            ones = torch.ones(n, dtype=torch.bool, device=dev)
            keys = values = scales = None
            if s.keys is not None:
                keys = torch.cat([s.keys, s.keys.new_zeros(n, s.key_dim)])
            if s.key_scales is not None:
                scales = torch.cat([s.key_scales, s.key_scales.new_ones(n)])
            if s.values is not None:
                values = torch.cat([s.values, s.values.new_zeros(n, s.value_dim)])
            self._snap = s._replace(
                token_ids=torch.cat([old_tok, new_tok]), lengths=torch.cat([s.lengths, new_len]),
                keys=keys, values=values, key_scales=scales, valid=torch.cat([s.valid, ones]),
                stale=torch.cat([s.stale, ones]), finite=torch.cat([s.finite, ones]),
                source_index=torch.cat([s.source_index, torch.tensor(
                    [pos[sources[o]] for o in chunks.owner], dtype=torch.int32)]),
                sources=table, texts=s.texts.cat(chunks.texts),
                rev=torch.cat([s.rev, self._new_revs(n)]),
                key_rev=torch.cat([s.key_rev, torch.zeros(n, dtype=torch.int64)]))
        return torch.arange(M, M + n, dtype=torch.int64)

    def add_examples(self, texts: Sequence[str], labels: Sequence, template: str = "{text} It was {label}.",
                     source: str = "examples", *, tokenizer=None, label_names=None) -> torch.Tensor:
        """In-task knowledge prompting: add one entry per labelled example, formatted with
        ``template.format(text=..., label=...)``. ``label_names`` (a list or dict) maps
        label values (e.g. class ids) to words. Returns the new ids like ``add``."""
        texts = check_texts("texts", texts)
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
        texts = check_texts("texts", texts)
        idx = as_ids("ids", ids, len(self._snap), torch.device("cpu")).reshape(-1)
        if idx.numel() != len(texts):
            raise ValueError(f"update needs one text per id: {idx.numel()} ids, {len(texts)} texts")
        if idx.numel() == 0:
            return
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("ids must not repeat in one update")
        sources = None if source is None else check_sources(source, len(texts))
        tok = self._resolve_tokenizer(tokenizer)
        chunks = tokenize(texts, tok, self._snap.max_length, None, single=True, truncate=truncate)
        with self._lock:
            s = self._snap
            M = len(s)
            if int(idx.max()) >= M:
                raise ValueError(f"ids must be entry ids in [0, {M})")
            dev = s.device
            idx_d = idx.to(dev)
            idx_r = idx.to(s.row_device)
            if not bool(s.valid[idx_d].all()):
                dead = idx[~s.valid[idx_d].cpu()].tolist()
                raise ValueError(f"cannot update removed entries {dead[:10]} (add them instead)")
            width = max(s.token_ids.shape[1], max(len(x) for x in chunks.ids))
            dtype = s.token_ids.dtype
            new_tok, new_len = pack(chunks.ids, width, s.pad_token_id, dtype, s.row_device)
            tok_t = repad(s.token_ids, s.lengths, width, s.pad_token_id, dtype) \
                if width != s.token_ids.shape[1] else s.token_ids.clone()
            token_bits(tok_t)[idx_r] = token_bits(new_tok)
            lengths = s.lengths.clone()
            lengths[idx_r] = new_len
            stale = s.stale.clone()
            stale[idx_d] = True
            texts_new = s.texts.replace(idx.numpy(), chunks.texts)
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
                                    texts=texts_new, source_index=src, sources=table, rev=rev)

    def remove(self, ids) -> None:
        """Tombstone entries ``ids``: search never returns them again. Removing a removed
        entry is a no-op. ``compact()`` reclaims their space (and renumbers)."""
        idx = as_ids("ids", ids, len(self._snap), torch.device("cpu")).reshape(-1)
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
            keep_r = keep_d.to(s.row_device)
            lengths = s.lengths[keep_r]
            width = int(lengths.max()) if lengths.numel() else 1
            tok = s.token_ids[keep_r][:, :width].contiguous()
            src_old = s.source_index[keep]
            used = torch.unique(src_old).tolist() if src_old.numel() else []
            remap = torch.full((max(len(s.sources), 1),), -1, dtype=torch.int32)
            for new, old in enumerate(used):
                remap[old] = new
            sel = lambda t: None if t is None else t[keep_d.to(t.device)].contiguous()  # noqa: E731
            self._snap = s._replace(
                token_ids=tok, lengths=lengths, keys=sel(s.keys), values=sel(s.values),
                key_scales=sel(s.key_scales),
                valid=s.valid[keep_d], stale=s.stale[keep_d], finite=s.finite[keep_d],
                source_index=remap[src_old.long()] if src_old.numel() else src_old,
                sources=[s.sources[i] for i in used],
                texts=s.texts.take(kept.numpy()), rev=s.rev[keep],
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
        the memory's layout, else the encoder's float dtype; float64 becomes float32; int8 =
        quantised per row), values in the layout's value dtype, or not at all with
        store_values=False. Returns the number of entries whose new keys were committed (an
        entry updated during the encode stays stale).
        """
        if not callable(getattr(encoder, "encode_memory", None)):
            raise TypeError(f"encoder must have encode_memory(token_ids, attention_mask) -> "
                            f"(keys, values), got {type(encoder).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if key_dtype is not None and key_dtype not in FLOAT_TABLE_DTYPES + (torch.int8,):
            raise TypeError(f"key_dtype must be one of {FLOAT_TABLE_DTYPES + (torch.int8,)}, "
                            f"got {key_dtype}")
        s = self._snap
        layout = s.layout
        key_dtype = key_dtype or layout.key_dtype
        todo = (s.valid & s.stale) if only_stale else s.valid
        rows = todo.nonzero().squeeze(1).cpu()  # [E]
        if rows.numel() == 0:
            return 0
        dev = encoder_device(encoder) or s.device
        was_training = encoder.training if isinstance(encoder, nn.Module) else None
        if was_training:
            encoder.eval()
        E = rows.numel()
        order = torch.empty(E, dtype=torch.int64)  # entry rows in the order they are encoded
        keys_out = values_out = scales_out = None
        finite_out = torch.ones(E, dtype=torch.bool, device=s.device)
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=E, desc="encode memory", unit="entry", disable=not progress)
            for b0, r, tok, mask in length_batches(s, rows, batch_size, dev):
                n = r.numel()
                first = None if keys_out is None else (
                    keys_out.shape[1], None if values_out is None else values_out.shape[1])
                # values=False: a memory keeping no values does not check (or keep) them, so
                # the batches after the first are not compared against an absent table
                k, v = check_encoded(encoder.encode_memory(tok, mask), n, first,
                                     values=layout.store_values)
                if keys_out is None:
                    kdt = key_dtype or table_dtype(k.dtype)
                    keys_out = torch.empty(E, k.shape[1], dtype=kdt, device=s.device)
                    if kdt == torch.int8:
                        scales_out = torch.empty(E, dtype=torch.float32, device=s.device)
                    if v is not None:
                        vdt = layout.value_dtype or table_dtype(v.dtype)
                        values_out = torch.empty(E, v.shape[1], dtype=vdt, device=s.row_device)
                order[b0:b0 + n] = r
                k = k.detach().to(s.device)
                finite_out[b0:b0 + n] = (finite_rows(k, n, s.device)
                                         & finite_rows(v, n, s.device).to(s.device))
                kq, sc = store_keys(k, keys_out.dtype)
                keys_out[b0:b0 + n] = kq
                if sc is not None:
                    scales_out[b0:b0 + n] = sc
                if v is not None:
                    values_out[b0:b0 + n] = v.detach().to(device=s.row_device,
                                                          dtype=values_out.dtype)
                bar.update(n)
            bar.close()
        finally:
            if was_training:
                encoder.train(True)
        return self._commit(s, order, keys_out, values_out, scales=scales_out, finite=finite_out)

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
                else as_ids("ids", ids, len(s), torch.device("cpu")).reshape(-1))
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[0] != rows.numel() \
                or not keys.dtype.is_floating_point:
            raise ValueError(f"keys must be a float tensor [{rows.numel()}, key_dim], got "
                             f"{tuple(getattr(keys, 'shape', ()))}")
        if values is not None and (not isinstance(values, torch.Tensor) or values.dim() != 2
                                   or values.shape[0] != rows.numel()
                                   or not values.dtype.is_floating_point):
            raise ValueError(f"values must be a float tensor [{rows.numel()}, d], got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        layout = self._snap.layout
        if not layout.store_values:
            values = None
        finite = finite_rows(keys, keys.shape[0], keys.device) & \
            finite_rows(values, keys.shape[0], keys.device).to(keys.device)
        cur = self._snap.keys
        # an int8 table stays int8 (a refresher hands over float keys) even when int8 came
        # from encode(key_dtype=) rather than from the layout
        kdt = layout.key_dtype or (torch.int8 if cur is not None and cur.dtype == torch.int8
                                   else table_dtype(keys.dtype))
        keys, scales = store_keys(keys.detach().to(s.device), kdt)
        if values is not None:
            values = values.detach().to(device=s.row_device,
                                        dtype=layout.value_dtype or table_dtype(values.dtype))
        return self._commit(s, rows, keys, values, adopt=adopt, scales=scales, finite=finite)

    def _commit(self, base: MemorySnapshot, rows: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor | None, adopt: bool = False, *,
                scales: torch.Tensor | None = None, finite: torch.Tensor | None = None) -> int:
        """Write keys/values computed from ``base`` rows [E] into the current snapshot, at
        the rows whose content revision is unchanged (compact-proof: matched by revision).
        keys are in their stored form (int8 ones with ``scales`` [E]); ``finite`` [E]: rows
        free of NaN/Inf before quantisation (default: computed from keys and values)."""
        finite_new = finite if finite is not None else (
            finite_rows(keys, keys.shape[0], keys.device)
            & finite_rows(values, keys.shape[0], keys.device).to(keys.device))  # [E]
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
                    keys=keys, values=values, key_scales=scales, stale=torch.zeros_like(s.stale),
                    finite=finite_new.to(s.device), key_rev=key_rev)
                return M
            if same_layout:
                new_keys = s.keys.clone()
                new_scales = None if scales is None else s.key_scales.clone()
                new_values = None if values is None else s.values.clone()
                stale, finite = s.stale.clone(), s.finite.clone()
                key_rev = s.key_rev.clone()
                key_rev[tgt.cpu()] = s.version + 1
            else:
                # A new width/dtype/values layout: rows this commit does not cover have no key
                # in it, so they are stale until encoded.
                new_keys = keys.new_zeros(M, keys.shape[1])
                new_scales = None if scales is None else scales.new_ones(M)
                new_values = None if values is None else values.new_zeros(
                    M, values.shape[1], device=s.row_device)
                stale = torch.ones(M, dtype=torch.bool, device=s.device)
                finite = torch.ones(M, dtype=torch.bool, device=s.device)
                key_rev = torch.full((M,), s.version + 1, dtype=torch.int64)
            new_keys[tgt] = keys[src]
            if scales is not None:
                new_scales[tgt] = scales[src]
            if values is not None:
                new_values[tgt.to(new_values.device)] = values[src.to(values.device)].to(
                    new_values.device)
            stale[tgt] = False
            finite[tgt] = finite_new[src].to(s.device)
            self._snap = s._replace(keys=new_keys, values=new_values, key_scales=new_scales,
                                    stale=stale, finite=finite, key_rev=key_rev)
            return int(tgt.numel())

    # ------------------------------------------------------------------- sharding

    def shard(self, rank: int, world_size: int, *, device: str | torch.device | None = None,
              group=None, queries_differ: bool = True):
        """This rank's part of the memory for search across a ``torch.distributed`` group:
        the contiguous rows ``pluglm.distributed.shard_bounds(len(self), rank, world_size)``
        (copied, so this memory can be freed), global ids kept. ``device``: where the
        shard's tables go (default: this memory's device). See
        :class:`pluglm.sharded_memory.ShardedKnowledgeMemory`."""
        from ..sharded_memory import ShardedKnowledgeMemory

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
            fk = finite_rows(s.keys, M, s.device)
            if s.key_scales is not None:
                fk = fk & torch.isfinite(s.key_scales)
            fv = finite_rows(s.values, M, s.device).to(s.device)
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
        save_snapshot(self._snap, path)

    @classmethod
    def build(cls, path: str | os.PathLike, items, *, tokenizer=None, encoder=None,
              verify: bool = False, **options) -> "KnowledgeMemory":
        """Build a memory on disk at ``path`` from streamed ``items`` (texts or tensor
        chunks, never held in memory at once; see :func:`pluglm.memory.build.build_memory`
        for ``options``) and return it loaded memory-mapped."""
        from .build import build_memory

        build_memory(path, items, tokenizer=tokenizer, encoder=encoder, **options)
        mem = cls.load(path, verify=verify)
        mem._tokenizer = tokenizer
        return mem

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mmap: bool = True,
             *, verify: bool = True, keys_device: str | torch.device | None = None,
             values_device: str | torch.device | None = None) -> "KnowledgeMemory":
        """Read a memory saved by ``save``.

        device: where the tables go, unless ``keys_device`` (keys, key scales, masks: where
        search runs) or ``values_device`` (values, token ids, lengths; ``"pinned"`` for
        page-locked host memory) say otherwise — see :meth:`place`. With mmap=True, host
        row tables stay mapped (never pinned). mmap=True maps the tensor file (CPU tables stay backed
        by it until a mutation copies them; the file can be replaced by a later save
        meanwhile); mmap=False reads it into memory. verify=True checks each file's sha256
        and every token id against the vocabulary (reads everything once); sizes, shapes,
        dtypes and the other index ranges are always checked.
        """
        dev = parse_device("device", device, allow_pinned=False)[0]
        base = Placement(dev, dev)
        placement = Placement.of(keys_device, values_device, base=base,
                                 names=("keys_device", "values_device"))
        return cls(read_snapshot(locate(path), placement, mmap, verify))


def _cat_texts(tables):
    out = tables[0]
    for t in tables[1:]:
        out = out.cat(t)
    return out


__all__ = ["KnowledgeMemory"]
