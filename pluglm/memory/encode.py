"""The length-grouped encode loop shared by ``KnowledgeMemory.encode`` and the key refresher.

Entries are sorted by length (stable) and cut into batches, so each batch is padded only to
its own longest entry; ``encode_memory(token_ids [n, Lb] long, attention_mask [n, Lb] long)
-> (keys [n, key_dim], values [n, d] or None)`` is checked the same way for both callers.
What is done with the keys (a compact [E] table committed at the end, or a shadow [M] table
filled in place on a refresh stream) stays with the caller.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from pluglm_kernels import FLOAT_TABLE_DTYPES, quantize_keys

from .snapshot import MemorySnapshot
from .tokenize import widen_tokens


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a key/value table stores for encoder output of ``dtype`` (float64 and other
    dtypes the kernels do not read become float32)."""
    return dtype if dtype in FLOAT_TABLE_DTYPES else torch.float32


def encoder_device(encoder) -> torch.device | None:
    """Where ``encoder`` runs: its ``device`` attribute, else its first parameter/buffer."""
    dev = getattr(encoder, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(encoder, nn.Module):
        for p in encoder.parameters():
            return p.device
        for b in encoder.buffers():
            return b.device
    return None


def length_batches(snap: MemorySnapshot, rows: torch.Tensor, batch_size: int, device
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """rows [E] (CPU) of ``snap`` -> batches (start, rows [n], token_ids [n, Lb] long,
    attention_mask [n, Lb] long) on ``device``, rows grouped by length; ``start`` is the
    batch's position in the length order (so start + n entries are done after it)."""
    lengths = snap.lengths.cpu()[rows]
    order = torch.argsort(lengths, stable=True)
    rows, lengths = rows[order], lengths[order]
    for b0 in range(0, rows.numel(), batch_size):
        r = rows[b0:b0 + batch_size]
        n = r.numel()
        Lb = int(lengths[b0:b0 + n].max())
        tok = widen_tokens(snap.token_ids[r.to(snap.row_device), :Lb].to(device))  # [n, Lb] long
        mask = snap.attention_mask(lengths[b0:b0 + n].to(device), Lb)  # [n, Lb]
        yield b0, r, tok, mask


def _check_table(name: str, t, n: int, width: int | None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != n \
            or not t.dtype.is_floating_point or (width is not None and t.shape[1] != width):
        want = f"[{n}, {('key_dim' if name == 'keys' else 'd') if width is None else width}] float"
        raise ValueError(f"encode_memory returned {name} of shape "
                         f"{tuple(getattr(t, 'shape', ()))}, expected {want}")


def check_encoded(out, n: int, first: tuple[int, int | None] | None = None, *,
                  values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check one batch's ``encode_memory`` output for n entries -> (keys, values or None).

    first: (key width, value width or None) of the first batch, which every later batch
    must repeat. values=False drops (and does not check) the values."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("encoder.encode_memory must return (keys, values or None)")
    k, v = out
    _check_table("keys", k, n, None if first is None else first[0])
    if not values:
        return k, None
    if first is not None and (v is None) != (first[1] is None):
        raise ValueError("encode_memory returned values for some batches and None for others")
    if v is not None:
        _check_table("values", v, n, None if first is None else first[1])
    return k, v


def store_keys(keys: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float keys [E, d] in a table's stored form: (keys in ``dtype``, None), or for int8
    (``pluglm_kernels.quantize_keys``: int8 [E, d], per-row float32 scales [E])."""
    if dtype == torch.int8:
        if not keys.dtype.is_floating_point:
            raise TypeError(f"keys to quantise must be floating point, got {keys.dtype}")
        # A non-finite row gets a zero key and a NaN scale: the scale keeps the record that
        # the row is not finite (validate() re-derives finiteness from the tables).
        bad = ~torch.isfinite(keys).all(dim=1) if keys.shape[1] else None
        if bad is not None and bool(bad.any()):
            q, sc = quantize_keys(keys.masked_fill(bad[:, None], 0))
            return q, sc.masked_fill(bad, float("nan"))
        return quantize_keys(keys)
    return keys.to(dtype), None


__all__ = ["check_encoded", "encoder_device", "length_batches", "store_keys", "table_dtype"]
