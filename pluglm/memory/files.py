"""The on-disk format of a KnowledgeMemory (docs/design.md, "Memory files").

A directory with ``tensors.safetensors`` (token_ids, lengths, valid, stale, source_index,
text_offsets and, once encoded, keys, key_scales for int8 keys, and values unless the memory
keeps none), ``texts.bin`` (every entry's text, UTF-8, back to back; text i is bytes
text_offsets[i]:text_offsets[i + 1]) and ``manifest.json`` (format name and version, counts,
shapes, dtypes, the table layout, key/value widths, tokenizer name and vocab size, sources,
and the byte size and sha256 of each file). Format version 1 (texts in ``texts.jsonl``, one
JSON string per line, float keys only) is still read. A load maps both files: it costs
O(1) time and resident memory in M beyond O(M) mask checks (verify=False skips the
checksums, which read everything). Written
atomically through ``pluglm._io`` (a crash leaves the previous or the new complete version);
read from JSON and safetensors only (never pickle, never code), every size, checksum, shape,
dtype and index range checked, failures raised as :class:`MemoryFormatError` (a
``ValueError``) or ``FileNotFoundError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from pluglm_kernels import FLOAT_TABLE_DTYPES

from .. import _io
from .._version import __version__
from .placement import ROW_TABLES, Placement
from .snapshot import MemorySnapshot, TableLayout, finite_rows
from .texts import TextTable
from .tokenize import TOKEN_DTYPES, dtype_name, widen_tokens

FORMAT_NAME = "pluglm.knowledge_memory"
FORMAT_VERSION = 2
TENSORS_FILE = "tensors.safetensors"
TEXTS_FILE = "texts.bin"
TEXTS_FILE_V1 = "texts.jsonl"
MANIFEST_FILE = "manifest.json"


class MemoryFormatError(ValueError):
    """A saved memory is truncated, corrupted, inconsistent or from a newer format."""


def save_snapshot(s: MemorySnapshot, path: str | os.PathLike) -> None:
    """Write snapshot ``s`` to directory ``path`` atomically; an existing ``path`` is replaced
    only if it is a saved memory (or empty)."""
    target = _io.prepare_target(path, MANIFEST_FILE, "KnowledgeMemory")
    texts = s.texts
    tensors = {"token_ids": s.token_ids, "lengths": s.lengths, "valid": s.valid,
               "stale": s.stale, "source_index": s.source_index,
               "text_offsets": torch.from_numpy(texts.offsets - texts.offsets[0]),
               "finite": s.finite}
    if s.keys is not None:
        tensors["keys"] = s.keys
    if s.key_scales is not None:
        tensors["key_scales"] = s.key_scales
    if s.values is not None:
        tensors["values"] = s.values
    tensors = {n: t.detach() for n, t in tensors.items()}
    tmp = _io.temp_sibling(target)
    try:
        tpath = tmp / TENSORS_FILE
        tinfo = write_safetensors(tpath, tensors, {"format": FORMAT_NAME,
                                                   "format_version": str(FORMAT_VERSION)})
        xpath = tmp / TEXTS_FILE
        xinfo = write_chunks(xpath, _blob_chunks(texts.blob[texts.offsets[0]:texts.offsets[-1]]))
        _io.save_checkpoint("files_written")
        write_manifest(tmp, num_entries=len(s), num_valid=s.num_valid,
                       num_stale=int((s.valid & s.stale).sum()) if len(s) else 0,
                       max_length=s.max_length, token_width=s.token_ids.shape[1],
                       pad_token_id=s.pad_token_id, tokenizer_name=s.tokenizer_name,
                       vocab_size=s.vocab_size, key_dim=s.key_dim, value_dim=s.value_dim,
                       sources=list(s.sources), version=s.version, layout=s.layout,
                       specs={n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                       files={TENSORS_FILE: tinfo, TEXTS_FILE: xinfo})
        _io.fsync_dir(tmp)
        _io.save_checkpoint("before_swap")
        _io.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(tmp: Path, *, num_entries, num_valid, num_stale, max_length, token_width,
                   pad_token_id, tokenizer_name, vocab_size, key_dim, value_dim, sources,
                   version, layout, specs, files) -> None:
    """Write ``manifest.json`` (format 2) into the directory being saved."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "written_by": {"pluglm": __version__, "torch": torch.__version__},
        "num_entries": num_entries, "num_valid": num_valid, "num_stale": num_stale,
        "max_length": max_length, "token_width": token_width, "pad_token_id": pad_token_id,
        "tokenizer": {"name": tokenizer_name, "vocab_size": vocab_size},
        "key_dim": key_dim, "value_dim": value_dim, "sources": list(sources), "version": version,
        "layout": layout_to_json(layout),
        "tensors": {n: {"dtype": dtype_name(dt), "shape": list(shape)}
                    for n, (dt, shape) in specs.items()},
        "files": files,
    }
    _io.write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.uint16: "U16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_CHUNK_BYTES = 64 << 20  # bounded write buffers: a save never holds a second copy of a table


def _tensor_chunks(t: torch.Tensor):
    """The bytes of ``t`` (row-major, little-endian as safetensors stores them) in chunks of
    about _CHUNK_BYTES, read row block by row block (a mapped table is paged in, not copied)."""
    if t.numel() == 0:
        return
    t = t.detach()
    rows = t.shape[0] if t.dim() else 1
    per_row = max(1, t.numel() // max(rows, 1)) * t.element_size()
    step = max(1, _CHUNK_BYTES // per_row)
    flat = t.reshape(rows, -1) if t.dim() else t.reshape(1, 1)
    for a in range(0, rows, step):
        block = flat[a:a + step].to("cpu").contiguous()
        yield block.reshape(-1).view(torch.uint8).numpy().tobytes()


def _blob_chunks(blob):
    for a in range(0, blob.size, _CHUNK_BYTES):
        yield blob[a:a + _CHUNK_BYTES].tobytes()


def write_chunks(path: Path, chunks) -> dict:
    """Write byte ``chunks`` to ``path`` (fsynced) -> {"bytes", "sha256"} computed on the way."""
    h = hashlib.sha256()
    n = 0
    with open(path, "wb") as f:
        for c in chunks:
            h.update(c)
            f.write(c)
            n += len(c)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": n, "sha256": h.hexdigest()}


def safetensors_header(specs: dict, metadata: dict) -> bytes:
    """The safetensors header for tensors ``specs`` {name: (dtype, shape)} stored in this
    order, back to back (8-byte length, then JSON padded to a multiple of 8)."""
    header, off = {"__metadata__": dict(metadata)}, 0
    for n, (dt, shape) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
        header[n] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> dict:
    """Stream ``tensors`` into a safetensors file at ``path`` in bounded chunks (readable by
    ``safetensors.safe_open``) -> {"bytes", "sha256"}."""
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}

    def chunks():
        yield safetensors_header(specs, metadata)
        for t in tensors.values():
            yield from _tensor_chunks(t)

    return write_chunks(path, chunks())


def layout_to_json(layout: TableLayout) -> dict:
    name = lambda d: None if d is None else dtype_name(d)  # noqa: E731
    return {"key_dtype": name(layout.key_dtype), "value_dtype": name(layout.value_dtype),
            "store_values": layout.store_values}


def layout_from_json(d, mpath: Path) -> TableLayout:
    if d is None:
        return TableLayout()
    try:
        dt = lambda n: None if n is None else _DTYPE_BY_NAME[n]  # noqa: E731
        return TableLayout(dt(d.get("key_dtype")), dt(d.get("value_dtype")),
                           d.get("store_values", True))
    except (KeyError, TypeError, AttributeError) as e:
        raise MemoryFormatError(f"{mpath}: bad table layout {d!r}: {e}") from None


_DTYPE_BY_NAME = {dtype_name(d): d for d in (torch.float32, torch.float16, torch.bfloat16,
                                             torch.int8)}


def locate(path: str | os.PathLike) -> Path:
    """The directory to load for ``path``: finishes or rolls back an interrupted swap, and
    falls back (with a warning) to the previous version when a save died mid-swap."""
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
                          stacklevel=3)  # the caller of KnowledgeMemory.load
            root = prev[0]
    return root


def read_snapshot(root: Path, placement: Placement, mmap: bool, verify: bool) -> MemorySnapshot:
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

    texts_file = TEXTS_FILE if fv >= 2 else TEXTS_FILE_V1
    for name in (TENSORS_FILE, texts_file):
        _io.check_listed_file(root / name, files.get(name), mpath, MemoryFormatError, verify=verify)
    layout = layout_from_json(manifest.get("layout"), mpath) if fv >= 2 else TableLayout()

    tpath = root / TENSORS_FILE
    want = {"token_ids", "lengths", "valid", "stale", "source_index"}
    if fv >= 2:
        want |= {"text_offsets", "finite"}
    if key_dim is not None:
        want.add("keys")
        kspec = specs.get("keys")
        if fv >= 2 and isinstance(kspec, dict) and kspec.get("dtype") == "int8":
            want.add("key_scales")
    if value_dim is not None:
        want.add("values")
    # split placement: read on the host, then each table to its home
    tensors = _read_tensors(tpath, want, torch.device("cpu") if placement.split
                            else placement.keys, mmap)
    for name, t in tensors.items():
        spec = specs.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") != dtype_name(t.dtype) \
                or spec.get("shape") != list(t.shape):
            raise MemoryFormatError(f"{tpath}: tensor {name!r} is {dtype_name(t.dtype)} "
                                    f"{list(t.shape)}, the manifest says {spec}")

    def bad(msg):
        return MemoryFormatError(f"{tpath}: {msg}")

    tok = tensors["token_ids"]
    if tok.dim() != 2 or tok.shape[0] != M or tok.dtype not in TOKEN_DTYPES:
        raise bad(f"token_ids must be int16/uint16/int32 [{M}, L], got {tok.dtype} "
                  f"{list(tok.shape)}")
    for name, dt in (("lengths", torch.int32), ("valid", torch.bool), ("stale", torch.bool),
                     ("source_index", torch.int32)):
        t = tensors[name]
        if t.dtype != dt or list(t.shape) != [M]:
            raise bad(f"{name} must be {dtype_name(dt)} [{M}], got {dtype_name(t.dtype)} {list(t.shape)}")
    lengths = tensors["lengths"]
    src = tensors["source_index"].to("cpu")
    if M:
        if int(lengths.min()) < 1 or int(lengths.max()) > tok.shape[1]:
            raise bad(f"lengths must be in [1, {tok.shape[1]}]")
        if int(src.min()) < 0 or int(src.max()) >= len(sources):
            raise bad(f"source_index must be in [0, {len(sources)})")
        if verify and not _ids_in_range(tok, vocab):
            raise bad(f"token ids must be in [0, {vocab})")
    keys = tensors.get("keys")
    values = tensors.get("values")
    scales = tensors.get("key_scales")
    for name, t, width in (("keys", keys, key_dim), ("values", values, value_dim)):
        ok = FLOAT_TABLE_DTYPES + ((torch.int8,) if name == "keys" and fv >= 2 else ())
        if t is not None and (t.dtype not in ok or list(t.shape) != [M, width]):
            raise bad(f"{name} must be float{'/int8' if len(ok) > 3 else ''} [{M}, {width}], "
                      f"got {dtype_name(t.dtype)} {list(t.shape)}")
    if scales is not None and (scales.dtype != torch.float32 or list(scales.shape) != [M]):
        raise bad(f"key_scales must be float32 [{M}], got {dtype_name(scales.dtype)} "
                  f"{list(scales.shape)}")
    if fv >= 2:
        texts = _read_text_table(root / TEXTS_FILE, tensors["text_offsets"], M, mmap, verify)
    else:
        texts = _read_texts_v1(root / TEXTS_FILE_V1, M)

    dev = placement.keys
    mapped = {n for n in ROW_TABLES if n in tensors and mmap and placement.rows.type == "cpu"}

    def mv(name, t):
        return placement.place(name, t, mapped=name in mapped)

    stale = mv("stale", tensors["stale"])
    if keys is None:
        stale = torch.ones(M, dtype=torch.bool, device=dev)
    keys, values, scales = mv("keys", keys), mv("values", values), mv("key_scales", scales)
    stored_finite = tensors.get("finite")
    if stored_finite is not None and (stored_finite.dtype != torch.bool
                                      or list(stored_finite.shape) != [M]):
        raise bad(f"finite must be bool [{M}], got {dtype_name(stored_finite.dtype)} "
                  f"{list(stored_finite.shape)}")
    if stored_finite is not None and not verify:
        # trusted (the file is not verified anyway): no O(M * d) scan of the mapped tables
        finite = mv("finite", stored_finite)
    else:
        finite = finite_rows(keys, M, dev) & finite_rows(values, M, dev).to(dev)
        if scales is not None:
            finite &= torch.isfinite(scales)
    return MemorySnapshot(
        token_ids=mv("token_ids", tok), lengths=mv("lengths", lengths), keys=keys, values=values,
        key_scales=scales, valid=mv("valid", tensors["valid"]), stale=stale, finite=finite,
        source_index=src, sources=sources, texts=texts, rev=torch.arange(M, dtype=torch.int64),
        version=version, vocab_size=vocab, tokenizer_name=str(tokinfo.get("name", "")),
        pad_token_id=pad, max_length=max_length, layout=layout, placement=placement,
        mapped=frozenset(mapped))


def _ids_in_range(tok: torch.Tensor, vocab: int) -> bool:
    if tok.dtype != torch.uint16:
        return int(tok.min()) >= 0 and int(tok.max()) < vocab
    step = max(1, (16 << 20) // max(1, tok.shape[1]))  # torch has no uint16 min/max: widen in blocks
    return all(int(widen_tokens(tok[a:a + step], torch.int32).max()) < vocab
               for a in range(0, tok.shape[0], step))


def _read_text_table(xpath: Path, offsets: torch.Tensor, M: int, mmap: bool, verify: bool
                     ) -> TextTable:
    import numpy as np

    if offsets.dtype != torch.int64 or list(offsets.shape) != [M + 1]:
        raise MemoryFormatError(f"{xpath.parent / TENSORS_FILE}: text_offsets must be int64 "
                                f"[{M + 1}], got {dtype_name(offsets.dtype)} {list(offsets.shape)}")
    size = xpath.stat().st_size
    off = offsets.numpy()
    if int(off[0]) != 0 or int(off[-1]) != size or (verify and M and bool((np.diff(off) < 0).any())):
        raise MemoryFormatError(f"{xpath}: text offsets do not tile its {size} bytes "
                                f"(corrupted?)")
    if size == 0:
        blob = np.zeros(0, dtype=np.uint8)
    elif mmap:
        blob = np.memmap(xpath, dtype=np.uint8, mode="r")
    else:
        blob = np.fromfile(xpath, dtype=np.uint8)
    if verify:
        try:
            bytes(blob).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MemoryFormatError(f"{xpath}: not UTF-8: {e}") from None
    return TextTable(blob, off)


def _read_texts_v1(xpath: Path, M: int) -> TextTable:
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
    return TextTable.from_strings(texts)


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


__all__ = ["write_chunks", "write_manifest", "write_safetensors", "safetensors_header",
           "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_FILE", "MemoryFormatError", "TENSORS_FILE",
           "TEXTS_FILE", "locate", "read_snapshot", "save_snapshot"]
