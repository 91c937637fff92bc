"""Where a memory's tables live, and reading host rows for a device (docs/design.md, "Placement").

A memory has two homes. The *search* tables — keys, int8 key scales and the [M] masks
(valid, stale, finite) — live on ``keys``: search runs there, and search, ``fetch`` and
``token_ids_of`` return their results there (``memory.device``). The *row* tables — values,
token ids and lengths, by far the largest — live on ``rows``, which may be the host while
the keys are on a GPU; ``pinned=True`` asks for page-locked host memory. Only the N
retrieved rows per query ever leave the host: :class:`RowStager` gathers them into a
reusable staging buffer (pinned when CUDA is available) and copies that to the device with
``non_blocking=True`` on the current stream.

Rules (chosen so that a CPU-only machine runs the same code path):

* ``pinned`` without CUDA (``torch.cuda.is_available()`` false: page-locking needs the
  driver) keeps plain host memory. The placement still says ``pinned=True`` (what was
  asked); ``Placement.pins`` says whether pages are really locked.
* A memory-mapped table (``load(..., mmap=True)``) is never pinned: page-locking a 30 GB
  mapping would read and lock the whole file. It stays mapped; the rows a read needs are
  paged in and gathered into the pinned staging buffer like any host table's. A table that
  a mutation rebuilds in anonymous memory (``add``, ``update``) is pinned then.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

PINNED = "pinned"
KEY_TABLES = ("keys", "key_scales", "valid", "stale", "finite")
ROW_TABLES = ("values", "token_ids", "lengths")


def parse_device(name: str, value, *, allow_pinned: bool) -> tuple[torch.device, bool]:
    """A device argument -> (device, pinned). ``"pinned"`` (only where allowed) is the host
    in page-locked memory; anything else must be a torch device or its name."""
    if isinstance(value, str) and value == PINNED:
        if not allow_pinned:
            raise ValueError(f"{name}={PINNED!r} is not supported: only values (and token ids) "
                             f"can live in pinned host memory; keys need a device to be "
                             f"searched on")
        return torch.device("cpu"), True
    if isinstance(value, torch.device):
        dev = value
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{name} must be a device ('cpu', 'cuda:0', ...)"
                             f"{' or ' + repr(PINNED) if allow_pinned else ''}, got {value!r}: {e}"
                             ) from None
    else:
        raise TypeError(f"{name} must be a torch.device or a device name"
                        f"{' or ' + repr(PINNED) if allow_pinned else ''}, got "
                        f"{type(value).__name__}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}: CUDA is not available on this machine")
    return dev, False


@dataclass(frozen=True)
class Placement:
    """keys: device of the search tables (and of every read's result); rows: device of the
    values, token ids and lengths; pinned: rows asked for page-locked host memory;
    zero_copy: reads of pinned rows from a CUDA device go through ``gather_rows`` (the
    kernel reads the host rows itself) instead of the staging buffer."""

    keys: torch.device = torch.device("cpu")
    rows: torch.device = torch.device("cpu")
    pinned: bool = False
    zero_copy: bool = False

    @property
    def split(self) -> bool:
        """Reads gather rows on the row device and move them: rows not on the keys' device,
        or pinned (so the staged path is the same with or without CUDA)."""
        return self.pinned or self.rows != self.keys

    @property
    def pins(self) -> bool:
        """Whether in-memory row tables are really page-locked (pinned and CUDA available)."""
        return self.pinned and torch.cuda.is_available()

    @classmethod
    def of(cls, keys=None, values=None, *, zero_copy=None, base: "Placement | None" = None,
           names: tuple[str, str] = ("keys", "values")) -> "Placement":
        """A placement from user arguments (None = keep ``base``'s, default all on the CPU);
        ``names``: the argument names errors cite."""
        base = base if base is not None else cls()
        kdev = base.keys if keys is None else parse_device(names[0], keys, allow_pinned=False)[0]
        if values is None:
            rdev, pinned = base.rows, base.pinned
        else:
            rdev, pinned = parse_device(names[1], values, allow_pinned=True)
        if zero_copy is None:
            zero_copy = base.zero_copy and pinned
        elif not isinstance(zero_copy, bool):
            raise TypeError(f"zero_copy must be a bool, got {zero_copy!r}")
        if zero_copy and not pinned:
            raise ValueError("zero_copy=True reads values from pinned host memory: it needs "
                             "values='pinned'")
        return cls(kdev, rdev, pinned, zero_copy)

    def describe(self) -> dict:
        return {"keys": str(self.keys), "values": PINNED if self.pinned else str(self.rows),
                "pinned_pages": self.pins, "zero_copy": self.zero_copy}

    def place(self, name: str, t: torch.Tensor | None, *, mapped: bool = False,
              unchanged: bool = False) -> torch.Tensor | None:
        """Table ``name`` on its home. ``unchanged``: the same tensor as the previous
        snapshot's (already placed; a mapped one is never pinned)."""
        if t is None:
            return None
        dev = self.keys if name in KEY_TABLES else self.rows
        if t.device != dev:
            t = t.to(dev)
            mapped = False
        elif unchanged:
            return t
        if name in ROW_TABLES and self.pins and not mapped and not t.is_pinned():
            t = t.pin_memory()
        return t


class RowStager:
    """Gathers rows of host tables for a device through reusable staging buffers.

    ``gather(name, table, idx, device)``: ``table.index_select(0, idx)`` written into a
    buffer of this stager (one per table name, grown to the largest request, pinned when CUDA
    is available), then copied to ``device`` with ``non_blocking=True`` on the current stream
    (a CPU target gets a copy of the buffer). Before a buffer is refilled, the host waits
    for the previous copy out of it (a CUDA event), so an in-flight copy never reads rows of
    the next call. Work per call is O(rows gathered), never O(M), and the table itself is
    never copied. One lock serialises the calls (a buffer is shared state)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[str, torch.Tensor] = {}
        self._events: dict[str, object] = {}

    def __deepcopy__(self, memo):
        return RowStager()  # buffers are scratch space: a copy starts with none

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def gather(self, name: str, table: torch.Tensor, idx: torch.Tensor, device: torch.device
               ) -> torch.Tensor:
        """table [M, ...] (on the host: staged), idx [n] int64 on the table's device ->
        rows [n, ...] on device."""
        if table.device.type != "cpu":  # rows on another device: no host staging to do
            return table.index_select(0, idx.to(table.device)).to(device)
        n = idx.numel()
        shape = (n,) + tuple(table.shape[1:])
        dtype = table.dtype
        # copy kernels of every device handle int16; not every one handles uint16
        src = table.view(torch.int16) if dtype == torch.uint16 else table
        with self._lock:
            buf = self._buffer(name, src.dtype, max(1, torch.Size(shape).numel()))
            out_buf = buf[:torch.Size(shape).numel()].view(shape)
            torch.index_select(src, 0, idx, out=out_buf)
            if device.type == "cpu":
                out = out_buf.clone()
            else:
                # asynchronous only where an event can say when the buffer is free again
                out = torch.empty(shape, dtype=src.dtype, device=device)
                out.copy_(out_buf, non_blocking=device.type == "cuda")
                if device.type == "cuda":
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(device))
                    self._events[name] = ev
        return out.view(dtype) if dtype == torch.uint16 else out

    def _buffer(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        ev = self._events.pop(name, None)
        if ev is not None:
            ev.synchronize()  # the previous non-blocking copy still reads this buffer
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            cap = 1 << max(10, (numel - 1).bit_length())  # doubling: few reallocations
            buf = torch.empty(cap, dtype=dtype, pin_memory=torch.cuda.is_available())
            self._buffers[name] = buf
        return buf

    @property
    def staged_bytes(self) -> int:
        """Bytes held by the staging buffers (for tests and tools)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


__all__ = ["KEY_TABLES", "PINNED", "Placement", "ROW_TABLES", "RowStager", "parse_device"]
