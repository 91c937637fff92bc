"""Building a large memory straight to disk (docs/design.md, "Out of core").

``build_memory`` streams its input — an iterable of texts, or of ready tensor chunks — and
writes every table in bounded chunks, so the corpus is never held in Python lists nor the
tables in RAM: each table goes to a raw file next to the target as rows arrive, then the
raw files are assembled into the format-2 ``tensors.safetensors`` (checksummed on the way)
and the directory is swapped in atomically like ``KnowledgeMemory.save`` does. Peak disk
use is about twice the memory's size (the raw files and the assembled file).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .. import _io
from .encode import check_encoded, encoder_device, store_keys, table_dtype
from .files import (MANIFEST_FILE, TENSORS_FILE, TEXTS_FILE, FORMAT_NAME, FORMAT_VERSION,
                    safetensors_header, write_manifest)
from .snapshot import TableLayout, finite_rows
from .tokenize import (check_sources, pack, token_dtype, tokenize, tokenizer_name_of,
                       vocab_size_of)

_COPY_BYTES = 64 << 20


class _RawTables:
    """Append-only raw files, one per table, in a temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, object] = {}
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.rows: dict[str, int] = {}

    def append(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        spec = (t.dtype, tuple(t.shape[1:]))
        if name not in self.files:
            self.files[name] = open(self.root / f"{name}.raw", "wb")
            self.specs[name] = spec
            self.rows[name] = 0
        elif self.specs[name] != spec:
            raise ValueError(f"chunk {name!r} is {spec[0]} with rows {list(spec[1])}, earlier "
                             f"chunks were {self.specs[name][0]} with rows "
                             f"{list(self.specs[name][1])}: every chunk needs the same layout")
        if t.numel():
            self.files[name].write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.rows[name] += t.shape[0]

    def assemble(self, path: Path, order: list[str], extra: dict[str, torch.Tensor]) -> dict:
        """Write ``tensors.safetensors`` from the raw tables (and small ``extra`` tensors),
        deleting each raw file once copied -> {"bytes", "sha256"}."""
        for f in self.files.values():
            f.close()
        specs = {}
        for n in order:
            if n in extra:
                specs[n] = (extra[n].dtype, tuple(extra[n].shape))
            elif n in self.specs:
                dt, row = self.specs[n]
                specs[n] = (dt, (self.rows[n],) + row)
        h = hashlib.sha256()
        size = 0
        with open(path, "wb") as out:
            head = safetensors_header(specs, {"format": FORMAT_NAME,
                                              "format_version": str(FORMAT_VERSION)})
            h.update(head)
            out.write(head)
            size += len(head)
            for n in specs:
                if n in extra:
                    b = extra[n].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    h.update(b)
                    out.write(b)
                    size += len(b)
                    continue
                raw = self.root / f"{n}.raw"
                with open(raw, "rb") as f:
                    while True:
                        b = f.read(_COPY_BYTES)
                        if not b:
                            break
                        h.update(b)
                        out.write(b)
                        size += len(b)
                raw.unlink()
            out.flush()
            os.fsync(out.fileno())
        return {"bytes": size, "sha256": h.hexdigest()}, specs


def _peek(items: Iterable):
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("items must contain at least one text or chunk") from None
    return first, itertools.chain([first], it)


def _batched(it, n):
    while True:
        b = list(itertools.islice(it, n))
        if not b:
            return
        yield b


@torch.no_grad()
def build_memory(path, items: Iterable, *, tokenizer=None, encoder=None, max_length: int = 288,
                 stride: int | None = None, source: str = "wiki",
                 key_dtype: torch.dtype | None = None, value_dtype: torch.dtype | None = None,
                 store_values: bool = True, chunk_size: int = 4096, batch_size: int = 256,
                 vocab_size: int | None = None, pad_token_id: int = 0, tokenizer_name: str = "",
                 total: int | None = None, progress: bool = True) -> Path:
    """Write a saved memory at ``path`` from ``items``, streamed (module docstring).

    items: an iterable of str (entry texts, tokenised ``chunk_size`` texts at a time with
    ``tokenizer`` like ``KnowledgeMemory.from_texts``, each entry padded to ``max_length``),
    or of dict chunks of ready tensors: ``token_ids`` [n, L] int (same L in every chunk),
    ``lengths`` [n] int, optionally ``keys`` [n, key_dim] float (or int8 with
    ``key_scales`` [n] float32), ``values`` [n, d], ``texts`` (n str; default empty).
    Chunks need ``vocab_size`` (and ``pad_token_id``) when no tokenizer is given. With an
    ``encoder`` (``encode_memory(ids, mask) -> (keys, values)``) the entries are encoded as
    they stream. Tables take the layout ``key_dtype`` / ``value_dtype`` / ``store_values``.
    ``total``: the number of items, for the progress bar only. Returns the target path.
    """
    from tqdm.auto import tqdm

    layout = TableLayout(key_dtype, value_dtype, store_values)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_sources(source, 1)
    first, items = _peek(items)
    texts_in = isinstance(first, str)
    if texts_in and tokenizer is None:
        raise ValueError("tokenizer is required to build a memory from texts")
    if not texts_in and not isinstance(first, dict):
        raise TypeError(f"items must be str texts or dict chunks of tensors, got "
                        f"{type(first).__name__}")
    if tokenizer is not None:
        vocab_size = vocab_size_of(tokenizer)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tokenizer_name = tokenizer_name_of(tokenizer)
    if vocab_size is None:
        raise ValueError("vocab_size is required when items are tensor chunks and no "
                         "tokenizer is given")
    tdt = token_dtype(vocab_size)

    target = _io.prepare_target(path, MANIFEST_FILE, "KnowledgeMemory")
    tmp = _io.temp_sibling(target)
    raw = _RawTables(tmp)
    enc_dev = encoder_device(encoder) if encoder is not None else None
    was_training = isinstance(encoder, torch.nn.Module) and encoder.training
    if was_training:
        encoder.eval()
    width = None
    offsets = [np.zeros(1, dtype=np.int64)]
    nbytes = 0
    M = 0
    kd = vd = None
    try:
        bar = tqdm(total=total, desc="build memory", unit="entry" if not texts_in else "text",
                   disable=not progress)
        with open(tmp / TEXTS_FILE, "wb") as tf:
            th = hashlib.sha256()
            groups = _batched(items, chunk_size) if texts_in else ([c] for c in items)
            for group in groups:
                if texts_in:
                    for i, t in enumerate(group):
                        if not isinstance(t, str):
                            raise TypeError(f"items must all be str, got {type(t).__name__}")
                    ch = tokenize(group, tokenizer, max_length, stride)
                    width = max_length
                    tok, lengths = pack(ch.ids, width, pad_token_id, tdt, torch.device("cpu"))
                    texts, keys, scales, values = ch.texts, None, None, None
                    n_items = len(group)
                else:
                    c = group[0]
                    tok, lengths = c.get("token_ids"), c.get("lengths")
                    if not isinstance(tok, torch.Tensor) or tok.dim() != 2 \
                            or tok.dtype.is_floating_point:
                        raise ValueError("chunk['token_ids'] must be an int tensor [n, L]")
                    n = tok.shape[0]
                    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (n,):
                        raise ValueError(f"chunk['lengths'] must be a tensor [{n}]")
                    if width is None:
                        width = tok.shape[1]
                    elif tok.shape[1] != width:
                        raise ValueError(f"every chunk's token_ids must have L={width}, got "
                                         f"{tok.shape[1]}")
                    if n and (int(lengths.min()) < 1 or int(lengths.max()) > width):
                        raise ValueError(f"chunk['lengths'] must be in [1, {width}]")
                    tok, lengths = tok.to(tdt), lengths.to(torch.int32)
                    keys, scales, values = c.get("keys"), c.get("key_scales"), c.get("values")
                    texts = c.get("texts") or [""] * n
                    if len(texts) != n:
                        raise ValueError(f"chunk['texts'] must hold {n} texts, got {len(texts)}")
                    n_items = n
                n = tok.shape[0]
                if encoder is not None:
                    keys, values = _encode_chunk(encoder, enc_dev, tok, lengths, batch_size)
                finite = torch.ones(n, dtype=torch.bool)
                if keys is not None:
                    if keys.dtype == torch.int8:
                        if scales is None or tuple(scales.shape) != (n,):
                            raise ValueError(f"int8 keys need chunk['key_scales'] [{n}] float32")
                        if layout.key_dtype not in (None, torch.int8):
                            keys = keys.float() * scales.float()[:, None]
                            scales = None
                    if keys.dtype != torch.int8:
                        finite &= finite_rows(keys, n, keys.device).cpu()
                        keys, scales = store_keys(
                            keys, layout.key_dtype or table_dtype(keys.dtype))
                    else:
                        finite &= torch.isfinite(scales.float()).cpu()
                    if kd is None:
                        kd = keys.shape[1]
                    raw.append("keys", keys)
                    if scales is not None:
                        raw.append("key_scales", scales.to(torch.float32))
                    if values is not None and layout.store_values:
                        finite &= finite_rows(values, n, values.device).cpu()
                        values = values.to(layout.value_dtype or table_dtype(values.dtype))
                        vd = values.shape[1]
                        raw.append("values", values)
                elif M and "keys" in raw.specs:
                    raise ValueError("some chunks have keys and some not: give every chunk keys")
                raw.append("token_ids", tok)
                raw.append("lengths", lengths)
                raw.append("finite", finite)
                enc = [t.encode("utf-8") for t in texts]
                for b in enc:
                    th.update(b)
                    tf.write(b)
                lens = np.fromiter((len(b) for b in enc), dtype=np.int64, count=len(enc))
                offsets.append(nbytes + np.cumsum(lens))
                nbytes += int(lens.sum())
                M += n
                bar.update(n_items)
            tf.flush()
            os.fsync(tf.fileno())
        bar.close()
        for name in ("keys", "values"):
            if name in raw.rows and raw.rows[name] != M:
                raise ValueError(f"some chunks have {name} and some not: give every chunk {name}")
        encoded = "keys" in raw.specs
        stale = torch.zeros(M, dtype=torch.bool) if encoded else torch.ones(M, dtype=torch.bool)
        extra = {"valid": torch.ones(M, dtype=torch.bool), "stale": stale,
                 "source_index": torch.zeros(M, dtype=torch.int32),
                 "text_offsets": torch.from_numpy(np.concatenate(offsets))}
        order = ["token_ids", "lengths", "valid", "stale", "source_index", "text_offsets",
                 "finite", "keys", "key_scales", "values"]
        tinfo, specs = raw.assemble(tmp / TENSORS_FILE, order, extra)
        _io.save_checkpoint("files_written")
        write_manifest(tmp, num_entries=M, num_valid=M, num_stale=0 if encoded else M,
                       max_length=max_length if texts_in else max(width or 1, 1),
                       token_width=width or 1, pad_token_id=pad_token_id,
                       tokenizer_name=tokenizer_name, vocab_size=vocab_size,
                       key_dim=kd, value_dim=vd, sources=[source], version=0, layout=layout,
                       specs=specs, files={TENSORS_FILE: tinfo, TEXTS_FILE: {
                           "bytes": nbytes, "sha256": th.hexdigest()}})
        _io.fsync_dir(tmp)
        _io.save_checkpoint("before_swap")
        _io.replace_dir(tmp, target)
    except BaseException:
        for f in raw.files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if was_training:
            encoder.train(True)
    return target


def _encode_chunk(encoder, dev, tok, lengths, batch_size):
    """Keys and values of one chunk's entries, in order, batches grouped by length."""
    n = tok.shape[0]
    order = torch.argsort(lengths, stable=True)
    keys = values = None
    for a in range(0, n, batch_size):
        r = order[a:a + batch_size]
        L = int(lengths[r].max())
        ids = tok[r, :L].long()
        mask = (torch.arange(L)[None] < lengths[r, None]).long()
        if dev is not None:
            ids, mask = ids.to(dev), mask.to(dev)
        k, v = check_encoded(encoder.encode_memory(ids, mask), r.numel())
        if keys is None:
            keys = torch.empty(n, k.shape[1], dtype=k.dtype)
            values = None if v is None else torch.empty(n, v.shape[1], dtype=v.dtype)
        keys[r] = k.detach().cpu()
        if v is not None:
            values[r] = v.detach().cpu()
    return keys, values


__all__ = ["build_memory"]
