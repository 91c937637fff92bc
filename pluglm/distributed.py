"""A key table sharded across the ranks of a ``torch.distributed`` group (docs/design.md §4).

Each rank holds a contiguous row range [global_offset, global_offset + M_local) of the
global table (``shard_bounds`` gives the balanced split). ``sharded_search`` runs
``pluglm_kernels.mips_topk`` on the local shard, all-gathers the candidates [world, B, k]
and merges them into the exact global top-k, ordered (score desc, global id asc) — the
same ids as one ``mips_topk`` over the whole table (scores are per-row float32 dot
products, so they match bit for bit when both searches use the same batch size B).
``fetch_rows`` brings rows (values, token ids, ...) of retrieved global ids from their
owners. Collectives used: all_gather and all_reduce only, so gloo (CPU) and NCCL (CUDA)
both work; tensors travel on the local shard's device (CUDA for NCCL).

Collective contract: every rank of ``group`` calls these functions in the same order with
the same ``k`` (checked: a mismatch raises ValueError on every rank instead of hanging).
With ``queries_differ=False`` (default) every rank must pass the same queries and gets the
same result; with ``queries_differ=True`` ranks may pass different queries (even different
batch sizes) and each gets the results of its own — at the cost of searching every rank's
queries on every shard.

Files (``save_shards`` / ``save_local_shard`` / ``load_shard``): a directory with one
safetensors file per saved shard and ``manifest.json`` (format, global row count, tensor
names with dtype and trailing shape, per shard: file, row range, byte size, sha256). Files
are written to a temporary name, fsynced and renamed into place; the manifest goes last,
so a crash leaves the previous manifest naming its own (untouched) files. ``load_shard``
reads, for any world size, exactly the rows the rank owns from the overlapping files, so
N saved shards load into M ranks.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pluglm_kernels import MAX_K

from . import _io
from .topk import exact_topk, merge_topk

FORMAT_NAME = "pluglm.sharded_table"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class ShardFormatError(ValueError):
    """A sharded save is missing files, corrupted, or inconsistent with its manifest."""


def shard_bounds(M: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of ``rank`` in a balanced contiguous split of M rows: the first
    M % world_size ranks get one row more."""
    for name, v in (("M", M), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if M < 0:
        raise ValueError(f"M must be >= 0, got {M}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(M, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1  # no process group: this process holds the whole table
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """[*s] on every rank -> [world, *s] (same shape and dtype everywhere)."""
    if world == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _gather_meta(values: list[int], device, group, world: int) -> torch.Tensor:
    """Small int64 metadata of every rank: [world, len(values)] (on the CPU)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    return _all_gather(t, group, world).cpu()


def _comm_device(t: torch.Tensor, group) -> torch.device:
    # NCCL moves only CUDA tensors; gloo moves CPU tensors (and CUDA ones via the host).
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return t.device


def local_topk(queries: torch.Tensor, k: int, local_keys: torch.Tensor, global_offset: int,
               local_valid: torch.Tensor | None = None, *, key_scales: torch.Tensor | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's top-k with global ids, padded: (scores [B, k] f32, ids [B, k] int64)."""
    # queries already in the keys' (half) dtype are searched as they are, others in float32
    qdt = queries.dtype if queries.dtype == local_keys.dtype else torch.float32
    s, i = exact_topk(queries, local_keys, k, valid=local_valid, key_scales=key_scales,
                      backend=backend, query_dtype=qdt, pad=True)
    return s, torch.where(i >= 0, i + global_offset, i)


def sharded_search(queries: torch.Tensor, k: int, local_keys: torch.Tensor, global_offset: int, *,
                   group=None, local_valid: torch.Tensor | None = None, queries_differ: bool = False,
                   key_scales: torch.Tensor | None = None, backend: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact global top-k over a key table sharded across ``group`` (collective).

    queries:      [B, d] (same on every rank unless queries_differ=True)
    local_keys:   [M_local, d] this rank's rows, global ids global_offset + row
    local_valid:  optional bool [M_local], False rows are never returned
    Returns scores [B, k] float32 descending and global ids [B, k] int64 on the queries'
    device; equal scores lower global id first; with fewer than k valid rows in the whole
    table the tail is (-inf, -1).
    """
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError("queries must be a torch.Tensor [B, d]")
    if not isinstance(local_keys, torch.Tensor) or local_keys.dim() != 2:
        raise ValueError("local_keys must be a torch.Tensor [M_local, d]")
    if queries.shape[1] != local_keys.shape[1]:
        raise ValueError(f"queries [B, {queries.shape[1]}] and local_keys [M_local, "
                         f"{local_keys.shape[1]}] must have the same key width")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    if isinstance(global_offset, bool) or not isinstance(global_offset, int) or global_offset < 0:
        raise ValueError(f"global_offset must be an int >= 0, got {global_offset!r}")
    if local_valid is not None:
        if local_valid.dtype != torch.bool or tuple(local_valid.shape) != (local_keys.shape[0],):
            raise ValueError(f"local_valid must be bool [{local_keys.shape[0]}] (one flag per local row)")
        local_valid = local_valid.to(local_keys.device)
    rank, world = rank_world(group)
    dev = _comm_device(local_keys, group)
    B, d = queries.shape
    finite = int(bool(torch.isfinite(queries).all())) if queries.numel() else 1
    meta = _gather_meta([k, B, d, int(bool(queries_differ)), global_offset, local_keys.shape[0],
                         finite], dev, group, world)  # [world, 7]
    _check_meta(meta, queries_differ)
    out_dev = queries.device

    if queries_differ and world > 1:
        Bs = meta[:, 1].tolist()
        Bmax = max(Bs)
        qpad = torch.zeros(Bmax, d, dtype=torch.float32, device=dev)  # [Bmax, d]
        qpad[:B] = queries.detach().to(device=dev, dtype=torch.float32)
        allq = _all_gather(qpad, group, world).reshape(world * Bmax, d)
        s, i = local_topk(allq, k, local_keys, global_offset, local_valid,
                          key_scales=key_scales, backend=backend)  # [world * Bmax, k]
        s_all = _all_gather(s.to(dev), group, world)  # [world(owner), world * Bmax, k]
        i_all = _all_gather(i.to(dev), group, world)
        mine = slice(rank * Bmax, rank * Bmax + B)
        s_all = s_all[:, mine].permute(1, 0, 2).reshape(B, world * k)  # [B, world * k]
        i_all = i_all[:, mine].permute(1, 0, 2).reshape(B, world * k)
    else:
        s, i = local_topk(queries, k, local_keys, global_offset, local_valid,
                          key_scales=key_scales, backend=backend)  # [B, k]
        s_all = _all_gather(s.to(dev), group, world).permute(1, 0, 2).reshape(B, world * k)
        i_all = _all_gather(i.to(dev), group, world).permute(1, 0, 2).reshape(B, world * k)
    s, i = merge_topk(s_all, i_all, k)
    return s.to(out_dev), i.to(out_dev)


def _check_meta(meta: torch.Tensor, queries_differ: bool) -> None:
    # Every rank sees the same gathered table, so every rank raises together (no hang).
    ks = meta[:, 0].tolist()
    if len(set(ks)) != 1:
        raise ValueError(f"every rank must pass the same k, got {ks}")
    if len(set(meta[:, 2].tolist())) != 1:
        raise ValueError(f"every rank must have the same key width, got {meta[:, 2].tolist()}")
    if len(set(meta[:, 3].tolist())) != 1:
        raise ValueError("every rank must pass the same queries_differ")
    if not queries_differ and len(set(meta[:, 1].tolist())) != 1:
        raise ValueError(f"ranks passed different batch sizes {meta[:, 1].tolist()}: pass the same "
                         f"queries everywhere, or queries_differ=True")
    _check_partition(meta[:, 4].tolist(), meta[:, 5].tolist())
    bad = [r for r, f in enumerate(meta[:, 6].tolist()) if not f]
    if bad:
        raise ValueError(f"queries must be finite (found NaN or Inf on rank(s) {bad})")


def _check_partition(offsets: list[int], sizes: list[int]) -> int:
    """Shards must tile [0, global_size) without overlap; returns global_size."""
    spans = sorted((o, o + n) for o, n in zip(offsets, sizes) if n > 0)
    pos = 0
    for a, b in spans:
        if a != pos:
            raise ValueError(f"shards (global_offset, M_local) = {list(zip(offsets, sizes))} do not "
                             f"tile the global table: rows [{pos}, {a}) are {'missing' if a > pos else 'repeated'}")
        pos = b
    return pos


def fetch_rows(global_ids: torch.Tensor, local_rows: torch.Tensor, global_offset: int, *,
               group=None, ids_differ: bool = False) -> torch.Tensor:
    """Rows of ``global_ids`` from the ranks that own them (collective).

    global_ids:  [...] int64 global entry ids (-1 = none: a zero row)
    local_rows:  [M_local, *row] this rank's rows (values, token ids, ...; any dtype)
    Returns [..., *row] in local_rows' dtype on its device. With ids_differ=False every
    rank must pass the same ids (e.g. from sharded_search with the same queries); with
    ids_differ=True each rank gets its own ids' rows.

    Delivery is one all_reduce (sum) of a byte view in which each element is written by
    exactly one owner and zero elsewhere, so the sum is exact for any dtype (gloo has no
    all_to_all). Traffic: R x row bytes per rank (world x that with ids_differ=True).
    """
    if not isinstance(global_ids, torch.Tensor) or global_ids.dtype.is_floating_point \
            or global_ids.dtype == torch.bool:
        raise TypeError("global_ids must be an integer torch.Tensor")
    if not isinstance(local_rows, torch.Tensor) or local_rows.dim() < 1:
        raise TypeError("local_rows must be a torch.Tensor [M_local, ...]")
    rank, world = rank_world(group)
    dev = _comm_device(local_rows, group)
    ids = global_ids.detach().reshape(-1).to(device=dev, dtype=torch.int64)  # [R]
    R = ids.numel()
    M_local = local_rows.shape[0]
    meta = _gather_meta([R, global_offset, M_local, int(bool(ids_differ))], dev, group, world)
    if len(set(meta[:, 3].tolist())) != 1:
        raise ValueError("every rank must pass the same ids_differ")
    global_size = _check_partition(meta[:, 1].tolist(), meta[:, 2].tolist())
    if not ids_differ and len(set(meta[:, 0].tolist())) != 1:
        raise ValueError(f"ranks passed different numbers of ids {meta[:, 0].tolist()}: pass the "
                         f"same ids everywhere, or ids_differ=True")
    if R and (int(ids.min()) < -1 or int(ids.max()) >= global_size):
        raise ValueError(f"global_ids must be in [0, {global_size}) or -1, got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if ids_differ and world > 1:
        Rmax = int(meta[:, 0].max())
        req = torch.full((Rmax,), -1, dtype=torch.int64, device=dev)
        req[:R] = ids
        req = _all_gather(req, group, world).reshape(-1)  # [world * Rmax] every rank's ids
    else:
        Rmax, req = R, ids
    row_shape = tuple(local_rows.shape[1:])
    rows = local_rows.detach().to(dev)
    if rows.dtype == torch.uint16:  # uint16 token ids: torch has no index_put for them
        rows = rows.view(torch.int16)
    out = torch.zeros((req.numel(),) + row_shape, dtype=rows.dtype, device=dev)  # [world*Rmax, *row]
    mine = (req >= global_offset) & (req < global_offset + M_local)
    if bool(mine.any()):
        pos = mine.nonzero().squeeze(1)
        out[pos] = rows[req[pos] - global_offset]
    if world > 1:
        flat = out.reshape(-1).view(torch.uint8) if out.numel() else out.reshape(-1)
        if flat.numel():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if ids_differ and world > 1:
        out = out[rank * Rmax: rank * Rmax + R]
    return out.reshape(tuple(global_ids.shape) + row_shape).to(local_rows.device).view(
        local_rows.dtype)


# ----------------------------------------------------------------------------- files

def _shard_file(i: int, n: int, tag: str) -> str:
    return f"shard-{i:05d}-of-{n:05d}-{tag}.safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _io.write_bytes(tmp, data)  # written and fsynced
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _io.fsync_dir(path.parent)


def _check_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty dict name -> tensor [rows, ...]")
    rows = None
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor with a leading row dimension")
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise ValueError(f"all tensors must have the same number of rows; {name!r} has "
                             f"{t.shape[0]}, expected {rows}")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _write_shard(directory: Path, i: int, n: int, tag: str, tensors: dict[str, torch.Tensor],
                 start: int) -> dict:
    from safetensors.torch import save

    name = _shard_file(i, n, tag)
    data = save(tensors, metadata={"format": FORMAT_NAME, "row_start": str(start)})
    _write_atomic(directory / name, data)
    rows = next(iter(tensors.values())).shape[0]
    return {"file": name, "rows": [start, start + rows], "bytes": len(data),
            "sha256": _io.sha256_file(directory / name)}


def _tensor_specs(tensors: dict[str, torch.Tensor]) -> dict:
    return {n: {"dtype": str(t.dtype).replace("torch.", ""), "row_shape": list(t.shape[1:])}
            for n, t in tensors.items()}


def _write_manifest(directory: Path, shards: list[dict], specs: dict, global_size: int) -> None:
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "global_size": global_size,
                "tensors": specs, "shards": shards}
    try:
        old = _read_manifest(directory)
    except (OSError, ValueError):
        old = None
    _write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    if old is not None:  # the previous save's files are no longer named by any manifest
        keep = {s["file"] for s in shards}
        for s in old.get("shards", []):
            if s.get("file") not in keep:
                try:
                    (directory / s["file"]).unlink()
                except (OSError, KeyError, TypeError):
                    pass


def save_shards(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """Single process: split whole tables {name: [M, ...]} into num_shards balanced row
    ranges and save them (one safetensors file each + manifest.json)."""
    tensors = _check_tensors(tensors)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    M = next(iter(tensors.values())).shape[0]
    tag = uuid.uuid4().hex[:12]
    shards = []
    for i in range(num_shards):
        a, b = shard_bounds(M, i, num_shards)
        shards.append(_write_shard(directory, i, num_shards, tag,
                                   {n: t[a:b].contiguous() for n, t in tensors.items()}, a))
    _write_manifest(directory, shards, _tensor_specs(tensors), M)


def save_local_shard(directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     global_offset: int, *, group=None) -> None:
    """Collective: every rank saves its rows {name: [M_local, ...]} (global rows
    [global_offset, global_offset + M_local)) as one shard; rank 0 writes the manifest once
    all shards are on disk. The shards must tile the global table."""
    tensors = _check_tensors(tensors)
    rank, world = rank_world(group)
    directory = Path(directory)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    M_local = next(iter(tensors.values())).shape[0]
    probe = next(iter(tensors.values()))
    dev = torch.device("cuda", torch.cuda.current_device()) if (
        world > 1 and dist.get_backend(group) == "nccl") else probe.device
    meta = _gather_meta([global_offset, M_local], dev, group, world)  # [world, 2]
    global_size = _check_partition(meta[:, 0].tolist(), meta[:, 1].tolist())
    tag = [uuid.uuid4().hex[:12]]
    if world > 1:
        dist.broadcast_object_list(tag, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        dist.barrier(group=group)  # the directory exists
    entry = _write_shard(directory, rank, world, tag[0], tensors, global_offset)
    entries = [None] * world
    if world > 1:
        dist.all_gather_object(entries, (entry, _tensor_specs(tensors)), group=group)
    else:
        entries = [(entry, _tensor_specs(tensors))]
    specs = entries[0][1]
    if any(e[1] != specs for e in entries):
        raise ValueError("every rank must save the same tensor names, dtypes and row shapes")
    if rank == 0:
        shards = sorted((e[0] for e in entries if e[0]["rows"][1] > e[0]["rows"][0]),
                        key=lambda s: s["rows"][0])
        _write_manifest(directory, shards, specs, global_size)
    if world > 1:
        dist.barrier(group=group)  # the manifest is in place when anyone returns


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {directory}: not a sharded save (or not finished)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path}: unreadable manifest ({e})") from e
    if m.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: format {m.get('format')!r} is not {FORMAT_NAME!r}")
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        raise ShardFormatError(f"{path}: version {m.get('version')!r} is newer than this pluglm "
                               f"reads ({FORMAT_VERSION})")
    return m


@dataclass
class LoadedShard:
    """Rows [global_offset, global_offset + n) of every saved tensor, for one rank."""

    tensors: dict[str, torch.Tensor]
    global_offset: int
    global_size: int


def load_shard(directory: str | os.PathLike, rank: int = 0, world_size: int = 1, *,
               names: list[str] | None = None, device="cpu", verify: bool = True) -> LoadedShard:
    """The rows ``rank`` owns under ``shard_bounds(global_size, rank, world_size)``, read from
    whichever saved shard files overlap them (any saved shard count). ``names`` picks tensors
    (default all); ``verify`` checks size and sha256 of the files read."""
    from safetensors import safe_open

    directory = Path(directory)
    m = _read_manifest(directory)
    G = m.get("global_size")
    specs = m.get("tensors") or {}
    shards = m.get("shards") or []
    if not isinstance(G, int) or G < 0:
        raise ShardFormatError(f"{directory / MANIFEST_FILE}: bad global_size {G!r}")
    try:
        spans = [(int(s["rows"][0]), int(s["rows"][1])) for s in shards]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ShardFormatError(f"{directory / MANIFEST_FILE}: bad shard entry ({e})") from e
    try:
        if _check_partition([a for a, _ in spans], [b - a for a, b in spans]) != G:
            raise ValueError("shards end before global_size")
    except ValueError as e:
        raise ShardFormatError(f"{directory / MANIFEST_FILE}: {e}") from e
    names = list(specs) if names is None else list(names)
    for n in names:
        if n not in specs:
            raise KeyError(f"no tensor {n!r} in this save (it has {sorted(specs)})")
    start, stop = shard_bounds(G, rank, world_size)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for s, (a, b) in sorted(zip(shards, spans), key=lambda x: x[1][0]):
        lo, hi = max(a, start), min(b, stop)
        if lo >= hi:
            continue
        path = directory / s["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard file named by the manifest is missing")
        if verify:
            if path.stat().st_size != s.get("bytes") or _io.sha256_file(path) != s.get("sha256"):
                raise ShardFormatError(f"{path}: size or sha256 differs from the manifest (corrupted "
                                       f"or from another save)")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for n in names:
                sl = f.get_slice(n)
                if sl.get_shape()[0] != b - a:
                    raise ShardFormatError(f"{path}: tensor {n!r} has {sl.get_shape()[0]} rows, the "
                                           f"manifest says {b - a}")
                parts[n].append(sl[lo - a: hi - a])
    out = {}
    for n in names:
        spec = specs[n]
        dtype = getattr(torch, spec["dtype"])
        if parts[n]:
            t = torch.cat(parts[n]) if len(parts[n]) > 1 else parts[n][0]
        else:
            t = torch.empty((0, *spec["row_shape"]), dtype=dtype)
        if t.dtype != dtype or list(t.shape[1:]) != list(spec["row_shape"]):
            raise ShardFormatError(f"tensor {n!r}: file has {t.dtype} {tuple(t.shape[1:])}, manifest "
                                   f"says {spec['dtype']} {tuple(spec['row_shape'])}")
        out[n] = t.to(device)
    return LoadedShard(out, start, G)
