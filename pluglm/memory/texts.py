"""TextTable: a memory's entry texts as one UTF-8 byte blob plus offsets (docs/design.md,
"Memory files").

Millions of entries as Python strings cost ~50 bytes of object header each and make a
load O(M) in time and resident memory; a blob decodes one text per read instead, and can be
a memory map of the saved file (then a load reads nothing until a text is asked for). The
table is immutable like the snapshot that holds it: ``cat``, ``take`` and ``replace`` build
new tables with vectorised byte copies, never one Python object per entry.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class TextTable(Sequence):
    """M texts: ``blob`` (uint8 [nbytes], any buffer numpy can view: bytes, a numpy array, a
    memory map) and ``offsets`` (int64 [M + 1], text i = blob[offsets[i]:offsets[i + 1]])."""

    __slots__ = ("blob", "offsets")

    def __init__(self, blob, offsets):
        if isinstance(blob, (bytes, bytearray, memoryview)):
            blob = np.frombuffer(blob, dtype=np.uint8)
        elif not (isinstance(blob, np.ndarray) and blob.dtype == np.uint8):
            blob = np.asarray(blob, dtype=np.uint8)
        self.blob = blob  # a np.memmap stays one: nothing is read until a text is
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets.size < 1:
            raise ValueError("offsets must be a 1-d array of M + 1 positions")

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> "TextTable":
        parts = [t.encode("utf-8") for t in texts]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        if parts:
            np.cumsum([len(p) for p in parts], out=offsets[1:])
        return cls(b"".join(parts), offsets)

    @classmethod
    def of(cls, texts) -> "TextTable":
        """``texts`` as a TextTable (itself when it already is one)."""
        return texts if isinstance(texts, TextTable) else cls.from_strings(texts)

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"text index {i} out of range for {n} texts")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self.blob[a:b]).decode("utf-8")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, TextTable):
            if len(other) != len(self):
                return False
            la, lb = np.diff(self.offsets), np.diff(other.offsets)
            if not np.array_equal(la, lb):
                return False
            return np.array_equal(self.blob[self.offsets[0]:self.offsets[-1]],
                                  other.blob[other.offsets[0]:other.offsets[-1]])
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking buffer: equality only

    def __repr__(self) -> str:
        return f"TextTable({len(self)} texts, {self.nbytes} bytes)"

    # ------------------------------------------------------------------ building

    def cat(self, other: "TextTable | Sequence[str]") -> "TextTable":
        """self's texts then other's."""
        other = TextTable.of(other)
        a = self.blob[self.offsets[0]:self.offsets[-1]]
        b = other.blob[other.offsets[0]:other.offsets[-1]]
        blob = np.concatenate([a, b])
        offsets = np.concatenate([self.offsets - self.offsets[0],
                                  other.offsets[1:] - other.offsets[0] + a.size])
        return TextTable(blob, offsets)

    def take(self, rows) -> "TextTable":
        """The texts of ``rows`` (int array), in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = self.offsets[rows]
        lens = self.offsets[rows + 1] - starts
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        if total == 0:
            return TextTable(np.zeros(0, dtype=np.uint8), offsets)
        # byte j of output text r is blob[starts[r] + (j - offsets[r])]
        pos = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets[:-1], lens)
        return TextTable(self.blob[pos], offsets)

    def replace(self, rows, texts: Sequence[str]) -> "TextTable":
        """A copy with texts[j] at row rows[j]."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        order = np.arange(len(self), dtype=np.int64)
        order[rows] = len(self) + np.arange(rows.size, dtype=np.int64)
        return self.cat(TextTable.from_strings(texts)).take(order)


__all__ = ["TextTable"]
