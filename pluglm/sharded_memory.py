"""ShardedKnowledgeMemory: one rank's contiguous part of a KnowledgeMemory (docs/design.md §4).

A memory of G entries is split over the ranks of a ``torch.distributed`` group: rank r
holds rows ``[global_offset, global_offset + M_local)`` (``pluglm.distributed.shard_bounds``)
as a local :class:`~pluglm.memory.KnowledgeMemory` (``.local``, local row i = global id
global_offset + i). Every id this class takes or returns is a *global* id.

Collective (every rank of the group calls them in the same order, like any collective):
  search(q, k)            exact global top-k (``pluglm.distributed.sharded_search``): each
                          rank searches its shard, candidates are all-gathered and merged by
                          (score desc, global id asc) — the ids of one exact search over the
                          whole memory (bit-identical scores where the kernel sees the same
                          batch, see ``queries_differ``)
  fetch(ids), fetch_keys(ids), token_ids_of(ids)
                          rows of global ids from their owning ranks (``fetch_rows``)
  texts_of(ids), sources_of(ids)   via ``all_gather_object``
  save(path)              one shard per rank, atomically (below)
Local (no communication): encode (this rank's shard only), set_keys / snapshot (so an
``AsyncKeyRefresher`` given this object refreshes this rank's shard), remove, validate.

``queries_differ`` (default True) says ranks may pass different queries / ids, as under
DDP where every rank has its own batch: each rank then gets the answer for its own queries
(every shard searches every rank's queries). With False, every rank must pass the same
queries (cheaper; scores then match a single-process search bit for bit). The model's
memory layers work unchanged with a sharded memory (``model.set_memory(shard)``): training
searches the stored keys across ranks, fetches the retrieved entries' token ids from their
owners and re-encodes them with the live encoder; eval fetches stored keys/values.
``values``/``keys`` are this rank's rows only: ``precompute_tables`` (which projects
``memory.values`` as the whole table) must not be used with a sharded memory.

Requirements: every rank's shard is encoded (a rank holding unencoded entries makes search
raise RuntimeError on every rank), with the same encoder (same key/value widths and
dtypes); token tables have the same width on every rank (``shard``/``load`` guarantee it).

Files: ``save(path)`` writes a directory holding the tensors as ``pluglm.distributed``
shards (``manifest.json`` + one safetensors file per rank: token ids, lengths, valid,
stale, source index into the global source table, keys, values), one ``texts-*.json`` per
rank (a JSON list of that shard's texts), and ``memory.json`` (format, global metadata,
source names, the texts files with row ranges, sizes and sha256). All of it goes into a
temporary sibling directory that rank 0 swaps into place once every rank is done
(``pluglm._io``), so a crash leaves the previous or the new complete save. ``load(path,
rank, world_size)`` reads exactly the rows the rank owns for any world size (N shards
saved, loaded into M ranks); it is not collective.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pluglm_kernels import FLOAT_TABLE_DTYPES

from . import _io
from .distributed import fetch_rows, load_shard, rank_world, save_local_shard, shard_bounds, \
    sharded_search
from .memory import KnowledgeMemory, MemoryFormatError, MemorySnapshot
from .memory.snapshot import finite_rows
from .memory.tokenize import widen_tokens

FORMAT_NAME = "pluglm.sharded_knowledge_memory"
FORMAT_VERSION = 1
META_FILE = "memory.json"

_DEFAULT = object()  # "the group this memory was made with"


def _group_rank0(group) -> int:
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def _all_gather_object(obj, group, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(error: str | None, group, world: int) -> None:
    """Raise on every rank when any rank failed (so no rank is left waiting)."""
    errors = _all_gather_object(error, group, world)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise RuntimeError("; ".join(f"rank {r}: {e}" for r, e in bad))


class ShardedKnowledgeMemory:
    """One rank's part of a memory; global ids kept (see the module docstring).

    Build with ``KnowledgeMemory.shard(rank, world_size)`` or :meth:`load`.
    local: the shard's rows as a KnowledgeMemory (local ids 0..M_local-1).
    global_offset / global_size: where those rows sit in the whole memory.
    group: the process group of the collectives (None = the default group).
    """

    is_sharded = True

    def __init__(self, local: KnowledgeMemory, global_offset: int, global_size: int, *,
                 group=None, queries_differ: bool = True):
        if not isinstance(local, KnowledgeMemory):
            raise TypeError(f"local must be a KnowledgeMemory, got {type(local).__name__}")
        for name, v in (("global_offset", global_offset), ("global_size", global_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if global_offset + len(local) > global_size:
            raise ValueError(f"rows [{global_offset}, {global_offset + len(local)}) do not fit in "
                             f"a memory of global_size={global_size}")
        self.local = local
        self.global_offset = global_offset
        self.global_size = global_size
        self.group = group
        self.queries_differ = bool(queries_differ)

    @classmethod
    def from_memory(cls, memory: KnowledgeMemory, rank: int, world_size: int, *, device=None,
                    group=None, queries_differ: bool = True) -> "ShardedKnowledgeMemory":
        """Rows ``shard_bounds(len(memory), rank, world_size)`` of ``memory`` (copied)."""
        s = memory.snapshot()
        if isinstance(world_size, int) and len(s) < world_size:
            raise ValueError(f"a memory of {len(s)} entries cannot be sharded over {world_size} "
                             f"ranks: every shard needs at least one entry")
        a, b = shard_bounds(len(s), rank, world_size)
        dev = torch.device(device) if device is not None else s.device
        cut = lambda t: None if t is None else t[a:b].to(dev).clone()  # noqa: E731
        local = MemorySnapshot(
            # a shard searches float keys (sharded_search has no int8 path): int8 dequantised
            token_ids=cut(s.token_ids), lengths=cut(s.lengths),
            keys=None if s.keys is None else cut(s.float_keys()),
            values=cut(s.values), valid=cut(s.valid), stale=cut(s.stale), finite=cut(s.finite),
            source_index=s.source_index[a:b].clone(), sources=s.sources, texts=s.texts[a:b],
            rev=torch.arange(b - a, dtype=torch.int64), version=s.version,
            vocab_size=s.vocab_size, tokenizer_name=s.tokenizer_name,
            pad_token_id=s.pad_token_id, max_length=s.max_length,
            key_rev=s.key_rev[a:b].clone())
        return cls(KnowledgeMemory(local, memory._tokenizer), a, len(s), group=group,
                   queries_differ=queries_differ)

    # ------------------------------------------------------------------ properties

    def snapshot(self) -> MemorySnapshot:
        """The local shard's current snapshot (local row ids)."""
        return self.local.snapshot()

    def __len__(self) -> int:
        """The global number of entries (ids are in [0, len))."""
        return self.global_size

    @property
    def num_local(self) -> int:
        return len(self.local)

    @property
    def local_range(self) -> tuple[int, int]:
        """Global ids [start, stop) held by this rank."""
        return self.global_offset, self.global_offset + len(self.local)

    @property
    def version(self) -> int:
        """The local shard's version (increases on every local mutation)."""
        return self.local.version

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def keys(self) -> torch.Tensor | None:
        """[M_local, key_dim]: this rank's rows only."""
        return self.local.keys

    @property
    def values(self) -> torch.Tensor | None:
        """[M_local, d]: this rank's rows only (read retrieved rows with ``fetch``)."""
        return self.local.values

    @property
    def valid(self) -> torch.Tensor:
        return self.local.valid

    @property
    def searchable(self) -> torch.Tensor:
        return self.local.searchable

    @property
    def token_ids(self) -> torch.Tensor:
        return self.local.token_ids

    @property
    def lengths(self) -> torch.Tensor:
        return self.local.lengths

    @property
    def key_dim(self) -> int | None:
        return self.local.key_dim

    @property
    def value_dim(self) -> int | None:
        return self.local.value_dim

    @property
    def vocab_size(self) -> int:
        return self.local.vocab_size

    @property
    def max_length(self) -> int:
        return self.local.max_length

    @property
    def pad_token_id(self) -> int:
        return self.local.pad_token_id

    def check_compatible(self, **sizes) -> None:
        self.local.check_compatible(**sizes)

    def __repr__(self) -> str:
        a, b = self.local_range
        return (f"ShardedKnowledgeMemory(rows=[{a}, {b}) of {self.global_size}, "
                f"local={self.local!r})")

    # ----------------------------------------------------------------- id helpers

    def _group(self, group):
        return self.group if group is _DEFAULT else group

    def _differ(self, flag):
        return self.queries_differ if flag is None else bool(flag)

    def _global_ids(self, ids, *, allow_none: bool = False) -> torch.Tensor:
        """Any int tensor / nested list -> int64 (same shape), in [0, global_size) (or -1)."""
        t = ids.detach() if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            if t.numel():
                raise TypeError(f"ids must be integer entry ids, got {t.dtype}")
        t = t.to(torch.int64)
        lo = -1 if allow_none else 0
        if t.numel() and (int(t.min()) < lo or int(t.max()) >= self.global_size):
            raise ValueError(f"ids must be global entry ids in [0, {self.global_size})"
                             f"{' (or -1)' if allow_none else ''}, got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t

    def _owned_local(self, ids) -> torch.Tensor:
        """Global ids [n] -> the local rows of those this rank owns."""
        t = self._global_ids(ids).reshape(-1)
        a, b = self.local_range
        return t[(t >= a) & (t < b)] - a

    # ---------------------------------------------------------------------- search

    def search(self, queries: torch.Tensor, k: int, group=_DEFAULT, *,
               queries_differ: bool | None = None, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: queries [B, key_dim] -> exact global top-k (scores [B, k] float32
        descending, global ids [B, k] int64) on this shard's device; equal scores lower
        global id first; only searchable rows. Raises ValueError (on every rank) when the
        whole memory has fewer than k searchable rows, RuntimeError when a rank's shard is
        not encoded."""
        group = self._group(group)
        snap = self.snapshot()
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 \
                or not queries.dtype.is_floating_point:
            raise ValueError(f"queries must be a float tensor [B, key_dim], got "
                             f"{tuple(getattr(queries, 'shape', ()))}")
        if snap.keys is not None and queries.shape[1] != snap.key_dim:
            raise ValueError(f"queries have {queries.shape[1]} columns but this memory's keys "
                             f"have key_dim={snap.key_dim}")
        q = queries.detach().to(torch.float32)
        keys, valid = _search_table(snap, q.shape[1])
        try:
            scores, ids = sharded_search(q, k, keys, self.global_offset, group=group,
                                         local_valid=valid, queries_differ=self._differ(queries_differ),
                                         backend=backend)
        except ValueError as e:
            if "do not tile" in str(e):  # a rank passed no keys: its shard is not encoded
                raise RuntimeError(f"a shard of this memory is not encoded (every rank must call "
                                   f"encode(encoder) on its shard before search): {e}") from None
            raise
        # With fewer than k searchable rows in the whole memory every query gets -1 tails,
        # so every rank sees this alike and raises together.
        if ids.numel() and bool((ids < 0).any()):
            if snap.keys is None and snap.num_valid > 0:  # no rank had keys to search
                raise RuntimeError("this memory is not encoded: every rank must call "
                                   "encode(encoder) on its shard before search")
            raise ValueError(f"k={k} is larger than the number of searchable entries of the "
                             f"whole memory (this rank holds {snap.num_searchable})")
        return scores.to(snap.device), ids.to(snap.device)

    # ---------------------------------------------------------------------- fetch

    def _fetch(self, ids: torch.Tensor, table: torch.Tensor | None, group, differ) -> torch.Tensor:
        # A rank without the table passes no rows: the partition check then fails on every
        # rank (instead of one rank raising and the others waiting).
        rows = table if table is not None else torch.empty(0, dtype=torch.float32,
                                                           device=self.device)
        try:
            return fetch_rows(ids, rows, self.global_offset, group=group, ids_differ=differ)
        except ValueError as e:
            if "do not tile" in str(e):
                raise RuntimeError(f"a shard of this memory is not encoded (every rank must call "
                                   f"encode(encoder) on its shard first): {e}") from None
            raise

    def fetch_keys(self, ids, group=_DEFAULT, *, ids_differ: bool | None = None) -> torch.Tensor:
        """Collective: stored keys of global ``ids`` [...] -> [..., key_dim]."""
        idx = self._global_ids(ids)
        return self._fetch(idx, self.snapshot().keys, self._group(group), self._differ(ids_differ))

    def fetch(self, ids, group=_DEFAULT, *, ids_differ: bool | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: ids [B, N] -> (keys [B, N, key_dim], values [B, N, d]) from the
        owning ranks' stored tables (the MemoryLayer protocol)."""
        snap = self.snapshot()
        if snap.keys is not None and snap.values is None:
            raise RuntimeError("this memory stores no values (its encoder returned none): "
                               "re-encode with an encoder that returns values")
        idx = self._global_ids(ids)
        group, differ = self._group(group), self._differ(ids_differ)
        keys = self._fetch(idx, snap.keys, group, differ)
        values = self._fetch(idx, snap.values, group, differ)
        return keys, values

    def token_ids_of(self, ids, *, dtype: torch.dtype = torch.long, trim: bool = False,
                     group=_DEFAULT, ids_differ: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: global ids [...] -> (token ids [..., L] in ``dtype``, attention mask
        [..., L] long) on this shard's device, fetched from the owning ranks. trim=True cuts
        L to the longest entry among this rank's ``ids``."""
        snap = self.snapshot()
        idx = self._global_ids(ids)
        group, differ = self._group(group), self._differ(ids_differ)
        tok = fetch_rows(idx, snap.token_ids, self.global_offset, group=group, ids_differ=differ)
        lengths = fetch_rows(idx, snap.lengths, self.global_offset, group=group, ids_differ=differ)
        width = snap.token_ids.shape[1]
        if trim and idx.numel():
            width = int(lengths.max())
        return widen_tokens(tok[..., :width], dtype), snap.attention_mask(lengths, width)

    def _lookup(self, ids, fn, group):
        """Collective: nested lists shaped like ``ids`` of fn(snapshot, local row), -1 -> None."""
        group = self._group(group)
        _, world = rank_world(group)
        idx = self._global_ids(ids, allow_none=True)
        flat = idx.reshape(-1).tolist()
        snap = self.snapshot()
        a, b = self.local_range
        requests = _all_gather_object(flat, group, world)  # every rank's ids
        answers = [{j: fn(snap, g - a) for j, g in enumerate(req) if a <= g < b}
                   for req in requests]
        rank, _ = rank_world(group)
        got: dict[int, object] = {}
        for per_requester in _all_gather_object(answers, group, world):
            got.update(per_requester[rank])
        vals = [got.get(j) for j in range(len(flat))]
        it = iter(vals)

        def rec(x):
            return [rec(y) for y in x] if isinstance(x, list) else next(it)

        return rec(idx.tolist())

    def texts_of(self, ids, group=_DEFAULT):
        """Collective: texts of global ``ids``, nested lists shaped like ids (-1 -> None)."""
        return self._lookup(ids, lambda s, i: s.texts[i], group)

    def sources_of(self, ids, group=_DEFAULT):
        """Collective: source names of global ``ids``, nested lists shaped like ids."""
        return self._lookup(ids, lambda s, i: s.sources[int(s.source_index[i])], group)

    # -------------------------------------------------------------- local changes

    def encode(self, encoder, batch_size: int = 256, progress: bool = True, *,
               only_stale: bool = False, key_dtype: torch.dtype | None = None) -> int:
        """Encode this rank's shard only (not collective); see ``KnowledgeMemory.encode``."""
        return self.local.encode(encoder, batch_size, progress, only_stale=only_stale,
                                 key_dtype=key_dtype)

    def set_keys(self, keys: torch.Tensor, values: torch.Tensor | None = None, *, ids=None,
                 snapshot: MemorySnapshot | None = None, adopt: bool = False) -> int:
        """Install keys [E, key_dim] (values [E, d]) for this rank's rows: ``ids`` are global
        ids owned by this rank (default: every local row of ``snapshot``, which is a local
        snapshot from ``snapshot()``). The AsyncKeyRefresher's swap."""
        local_ids = None
        if ids is not None:
            t = self._global_ids(ids).reshape(-1)
            a, b = self.local_range
            if t.numel() and (int(t.min()) < a or int(t.max()) >= b):
                raise ValueError(f"ids must be owned by this rank (global ids [{a}, {b}))")
            local_ids = t - a
        return self.local.set_keys(keys, values, ids=local_ids, snapshot=snapshot, adopt=adopt)

    def remove(self, ids) -> None:
        """Tombstone global ``ids`` (those this rank owns; others are ignored, so every rank
        can pass the same ids). Not collective."""
        rows = self._owned_local(ids)
        if rows.numel():
            self.local.remove(rows)

    def validate(self):
        """``KnowledgeMemory.validate`` of this rank's rows (local row ids)."""
        return self.local.validate()

    def to(self, device) -> "ShardedKnowledgeMemory":
        return ShardedKnowledgeMemory(self.local.to(device), self.global_offset, self.global_size,
                                      group=self.group, queries_differ=self.queries_differ)

    # ---------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike, group=_DEFAULT) -> None:
        """Collective: write every rank's shard into directory ``path`` (module docstring)."""
        group = self._group(group)
        rank, world = rank_world(group)
        snap = self.snapshot()
        target = Path(path).absolute()
        status: list = [None, None]  # [error, temporary directory]
        if rank == 0:
            try:
                _io.prepare_target(target, META_FILE, "sharded memory")
                status[1] = str(_io.temp_sibling(target))
            except OSError as e:
                status[0] = f"{type(e).__name__}: {e}"
        if world > 1:
            dist.broadcast_object_list(status, src=_group_rank0(group), group=group)
        if status[0]:
            raise RuntimeError(f"cannot save to {target}: {status[0]}")
        tmp = Path(status[1])
        try:
            # one global source table: every rank's names, in rank order
            table: list[str] = []
            for names in _all_gather_object(list(snap.sources), group, world):
                for n in names:
                    if n not in table:
                        table.append(n)
            pos = torch.tensor([table.index(n) for n in snap.sources] or [0], dtype=torch.int32)
            tensors = {"token_ids": snap.token_ids, "lengths": snap.lengths, "valid": snap.valid,
                       "stale": snap.stale,
                       "source_index": pos[snap.source_index.long()] if len(snap) else snap.source_index}
            if snap.keys is not None:
                tensors["keys"] = snap.keys
            if snap.values is not None:
                tensors["values"] = snap.values
            widths = _all_gather_object((snap.token_ids.shape[1], snap.token_ids.dtype), group, world)
            if len(set(widths)) != 1:
                raise ValueError(f"every rank's token table must have the same width and dtype, "
                                 f"got {widths}")
            save_local_shard(tmp, tensors, self.global_offset, group=group)
            error, entry = None, None
            try:
                a, b = self.local_range
                name = f"texts-{rank:05d}-of-{world:05d}.json"
                data = json.dumps(list(snap.texts), ensure_ascii=False).encode("utf-8")
                _io.write_bytes(tmp / name, data)
                entry = {"file": name, "rows": [a, b], "bytes": len(data),
                         "sha256": _io.sha256_file(tmp / name)}
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            entries = _all_gather_object((error, entry, snap.version), group, world)
            bad = [(r, e[0]) for r, e in enumerate(entries) if e[0]]
            if bad:
                raise RuntimeError("; ".join(f"rank {r}: {e}" for r, e in bad))
            if rank == 0:
                try:
                    meta = {
                        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "global_size": self.global_size, "saved_world_size": world,
                        "max_length": snap.max_length, "pad_token_id": snap.pad_token_id,
                        "tokenizer": {"name": snap.tokenizer_name, "vocab_size": snap.vocab_size},
                        "key_dim": snap.key_dim, "value_dim": snap.value_dim, "sources": table,
                        "version": max(e[2] for e in entries),
                        "texts": sorted((e[1] for e in entries if e[1]["rows"][1] > e[1]["rows"][0]),
                                        key=lambda t: t["rows"][0]),
                    }
                    _io.write_bytes(tmp / META_FILE, json.dumps(meta, indent=1).encode("utf-8"))
                    _io.fsync_dir(tmp)
                    _io.replace_dir(tmp, target)
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
            _agree(error, group, world)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, rank: int = 0, world_size: int = 1, *,
             device: str | torch.device = "cpu", group=None, queries_differ: bool = True,
             verify: bool = True) -> "ShardedKnowledgeMemory":
        """Rank ``rank`` of ``world_size``'s rows of a memory saved by ``save`` (with any
        number of shards). Not collective. verify=True checks the sha256 of every file read
        and every token id against the vocabulary. Raises FileNotFoundError or
        MemoryFormatError naming the file."""
        root = Path(path)
        if not root.is_dir():
            _io.recover_dir(root.absolute())
        mpath = root / META_FILE
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath}: missing (not a saved ShardedKnowledgeMemory?)")
        try:
            meta = json.loads(mpath.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MemoryFormatError(f"{mpath}: not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise MemoryFormatError(f"{mpath}: not a {FORMAT_NAME} file")
        fv = meta.get("format_version")
        if not isinstance(fv, int) or not 1 <= fv <= FORMAT_VERSION:
            raise MemoryFormatError(f"{mpath}: format_version {fv!r} is not one this pluglm reads "
                                    f"(up to {FORMAT_VERSION})")
        try:
            G = int(meta["global_size"])
            sources = list(meta["sources"])
            vocab = int(meta["tokenizer"]["vocab_size"])
            texts_files = list(meta["texts"])
            key_dim, value_dim = meta["key_dim"], meta["value_dim"]
            max_length, pad = int(meta["max_length"]), int(meta["pad_token_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise MemoryFormatError(f"{mpath}: missing or bad field ({e})") from None
        names = ["token_ids", "lengths", "valid", "stale", "source_index"]
        names += (["keys"] if key_dim is not None else []) + (["values"] if value_dim is not None else [])
        try:
            sh = load_shard(root, rank, world_size, names=names, device="cpu", verify=verify)
        except (KeyError, ValueError) as e:
            raise MemoryFormatError(f"{root}: {e}") from None
        if sh.global_size != G:
            raise MemoryFormatError(f"{root}: tensors hold {sh.global_size} rows, {META_FILE} says {G}")
        t = sh.tensors
        start = sh.global_offset
        stop = start + t["token_ids"].shape[0]
        if G < world_size:
            raise ValueError(f"a memory of {G} entries cannot be loaded into {world_size} ranks: "
                             f"every shard needs at least one entry")
        texts: list[str] = []
        for entry in texts_files:
            try:
                a, b = (int(x) for x in entry["rows"])
                fpath = root / entry["file"]
            except (KeyError, TypeError, ValueError) as e:
                raise MemoryFormatError(f"{mpath}: bad texts entry ({e})") from None
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            if not fpath.is_file():
                raise FileNotFoundError(f"{fpath}: missing (listed in {META_FILE})")
            data = fpath.read_bytes()
            if len(data) != entry.get("bytes") or (verify and _io.sha256_file(fpath) != entry.get("sha256")):
                raise MemoryFormatError(f"{fpath}: size or sha256 differs from {META_FILE}")
            try:
                part = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MemoryFormatError(f"{fpath}: not valid JSON: {e}") from None
            if not isinstance(part, list) or len(part) != b - a or not all(isinstance(x, str) for x in part):
                raise MemoryFormatError(f"{fpath}: expected a list of {b - a} strings")
            texts.extend(part[lo - a: hi - a])
        M = stop - start
        if len(texts) != M:
            raise MemoryFormatError(f"{mpath}: the texts files cover {len(texts)} of rows "
                                    f"[{start}, {stop})")
        tok, lengths, src = t["token_ids"], t["lengths"], t["source_index"]
        if M:
            if int(lengths.min()) < 1 or int(lengths.max()) > tok.shape[1]:
                raise MemoryFormatError(f"{root}: lengths must be in [1, {tok.shape[1]}]")
            if int(src.min()) < 0 or int(src.max()) >= len(sources):
                raise MemoryFormatError(f"{root}: source_index must be in [0, {len(sources)})")
            if verify and (int(tok.min()) < 0 or int(tok.max()) >= vocab):
                raise MemoryFormatError(f"{root}: token ids must be in [0, {vocab})")
        keys, values = t.get("keys"), t.get("values")
        for name, x in (("keys", keys), ("values", values)):
            if x is not None and x.dtype not in FLOAT_TABLE_DTYPES:
                raise MemoryFormatError(f"{root}: {name} must be float32/float16/bfloat16")
        dev = torch.device(device)
        mv = lambda x: None if x is None else x.to(dev)  # noqa: E731
        stale = t["stale"] if keys is not None else torch.ones(M, dtype=torch.bool)
        keys, values = mv(keys), mv(values)
        snap = MemorySnapshot(
            token_ids=mv(tok), lengths=mv(lengths), keys=keys, values=values, valid=mv(t["valid"]),
            stale=mv(stale), finite=finite_rows(keys, M, dev) & finite_rows(values, M, dev),
            source_index=src.to(torch.int32), sources=sources, texts=tuple(texts),
            rev=torch.arange(M, dtype=torch.int64), version=int(meta.get("version", 0)),
            vocab_size=vocab, tokenizer_name=str(meta["tokenizer"].get("name", "")),
            pad_token_id=pad, max_length=max_length)
        return cls(KnowledgeMemory(snap), start, G, group=group, queries_differ=queries_differ)


def _search_table(snap: MemorySnapshot, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(local keys [M_local or 0, d], valid mask or None) for sharded_search.

    An unencoded shard with live entries passes no rows, so the partition check fails on
    every rank; one with no live entry passes zero keys that are never searchable."""
    M = len(snap)
    if snap.keys is None:
        if M == 0 or snap.num_valid > 0:
            return torch.empty(0, d, dtype=torch.float32, device=snap.device), None
        return (torch.zeros(M, d, dtype=torch.float32, device=snap.device),
                torch.zeros(M, dtype=torch.bool, device=snap.device))
    return snap.keys, (None if snap.num_searchable == M else snap.searchable)


__all__ = ["ShardedKnowledgeMemory", "FORMAT_VERSION"]
