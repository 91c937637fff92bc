"""The on-disk format of a KnowledgeMemory (docs/design.md, "Memory files").

A directory with ``tensors.safetensors`` (token_ids, lengths, valid, stale, source_index and,
once encoded, keys and values), ``texts.jsonl`` (one JSON string per line) and
``manifest.json`` (format name and version, counts, shapes, dtypes, key/value widths,
tokenizer name and vocab size, sources, and the byte size and sha256 of each file). Written
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
from .snapshot import MemorySnapshot, finite_rows
from .tokenize import dtype_name

FORMAT_NAME = "pluglm.knowledge_memory"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
TEXTS_FILE = "texts.jsonl"
MANIFEST_FILE = "manifest.json"


class MemoryFormatError(ValueError):
    """A saved memory is truncated, corrupted, inconsistent or from a newer format."""


def save_snapshot(s: MemorySnapshot, path: str | os.PathLike) -> None:
    """Write snapshot ``s`` to directory ``path`` atomically; an existing ``path`` is replaced
    only if it is a saved memory (or empty)."""
    from safetensors.torch import save_file

    target = _io.prepare_target(path, MANIFEST_FILE, "KnowledgeMemory")
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
            "tensors": {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
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
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def read_snapshot(root: Path, device: torch.device, mmap: bool, verify: bool) -> MemorySnapshot:
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
        _io.check_listed_file(root / name, files.get(name), mpath, MemoryFormatError, verify=verify)

    tpath = root / TENSORS_FILE
    want = {"token_ids", "lengths", "valid", "stale", "source_index"}
    if key_dim is not None:
        want.add("keys")
    if value_dim is not None:
        want.add("values")
    tensors = _read_tensors(tpath, want, device, mmap)
    for name, t in tensors.items():
        spec = specs.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") != dtype_name(t.dtype) \
                or spec.get("shape") != list(t.shape):
            raise MemoryFormatError(f"{tpath}: tensor {name!r} is {dtype_name(t.dtype)} "
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
            raise bad(f"{name} must be {dtype_name(dt)} [{M}], got {dtype_name(t.dtype)} {list(t.shape)}")
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
        if t is not None and (t.dtype not in FLOAT_TABLE_DTYPES or list(t.shape) != [M, width]):
            raise bad(f"{name} must be float [{M}, {width}], got {dtype_name(t.dtype)} {list(t.shape)}")

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
    finite = finite_rows(keys, M, dev) & finite_rows(values, M, dev)
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


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_FILE", "MemoryFormatError", "TENSORS_FILE",
           "TEXTS_FILE", "locate", "read_snapshot", "save_snapshot"]
