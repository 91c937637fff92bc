"""AsyncKeyRefresher: re-encode every memory key while training goes on (docs/design.md, "Key refresh").

PlugLM trains with stale keys (search) and fresh keys (gradient), and re-encodes the whole
key table every ``interval`` optimizer steps. The published code does that synchronously,
through host numpy files; this does it in the background::

    refresher = AsyncKeyRefresher(model, memory, interval=200)
    for step in ...:
        loss.backward(); opt.step(); opt.zero_grad()
        refresher.step()            # or on_step(step): the training loop's refresh hook
    refresher.close()               # or use it as a context manager

Semantics
- ``step()`` (once per optimizer step, in the training thread) counts steps. It first
  swaps in a finished refresh (this is the step boundary: the memory's keys change here and
  nowhere else), or re-raises, in the training thread, an exception the refresh raised (the
  failed refresh is discarded; the next one starts on schedule). Then, every ``interval``
  steps, it starts a refresh. A refresh due while another still runs is *skipped* (counted
  in ``.skipped``), so the refresh cost per step is bounded by one refresh per interval;
  the next one starts at the next multiple of ``interval``. ``interval=0``: never automatic.
- Starting a refresh (in the calling thread, so the state is that of the step boundary):
  the encoder weights are copied (training keeps updating the live ones; the refresh sees
  only the copy), and the memory's current snapshot is taken (the entries to encode).
  Encoder copy: ``model.memory_encoder_snapshot()`` when the model has one (PlugLM models
  copy only the modules ``encode_memory`` reads: embeddings, doc pooler, W_k, W_v); any
  other encoder (an object with ``encode_memory``) is deep-copied (sharing the memory,
  never copying it); ``encoder_snapshot=`` overrides both.
- Every live entry of the snapshot is re-encoded, ``chunk`` entries at a time grouped by
  length, into a shadow key table (and value table), on the memory's device:
  * CUDA: a worker thread enqueues the chunks on a separate stream of the given
    ``priority`` ("low" and "normal": 0, CUDA's lowest, which is also the default
    stream's; "high": -1; or an int). For training to win contention for the SMs, run it on
    a higher-priority stream, e.g. ``torch.cuda.Stream(priority=-1)``. The refresh stream
    waits for an event recorded after the weight copy; at most two chunks are in flight
    (cancel is prompt, the host thread stays ahead); a final event marks completion, and
    ``step()`` swaps only once ``event.query()`` is true, so the training stream never
    waits for the refresh. Every tensor the refresh stream reads (weight copy,
    snapshot tables) is kept referenced until that event completes, and the shadow tables
    are ``record_stream``-ed on the training stream before the swap reads them, so the
    caching allocator never hands their memory out early. Memory on another GPU than the
    encoder: the shadow-table work there runs on a stream of that GPU which waits for the
    memory GPU's current stream at the start and which the final event waits for.
  * CPU: a background thread. Torch ops release the GIL, so training progresses. The thread
    runs with ``num_threads`` intra-op threads (default ``max(1, torch.get_num_threads() //
    4)``: on a machine whose cores training already uses, more only oversubscribes them;
    raise it when cores are idle). ``torch.set_num_threads`` in a thread also sets the value
    new threads start with, so it is restored when the refresh ends. ``priority="low"``
    also raises the thread's nice value by 10 (Linux; its OpenMP helpers inherit it): on
    oversubscribed cores the training thread's OpenMP team then keeps its cores (measured
    here: at equal priority a step stalled for the whole refresh). The refresh thread holds
    the GIL only between ops, briefly; if it is preempted while holding it, training waits
    for it to be rescheduled (use "normal" if that shows up as step-time spikes).
    A loop that ``wait()``s for each refresh gains nothing from "low" (training is idle
    meanwhile) and, on a loaded CPU, waits for a starved thread: use "normal" there.
- The swap is ``memory.set_keys(keys, values, snapshot=that snapshot)``: entries whose
  content changed during the refresh (update, or added) stay stale, per KnowledgeMemory's
  rules; a concurrent ``compact`` is handled (rows matched by revision). A search sees
  either the whole old table or the whole new one (KnowledgeMemory swaps one immutable
  snapshot), never a mix.
- ``wait()`` blocks until the running refresh is done and swaps it in; ``cancel()`` stops
  it between chunks and frees its buffers (a refresh error not yet raised is then dropped,
  kept in ``.last_error``); ``refresh_now(block=False)`` cancels a running refresh and
  starts one from the current weights; ``close()`` cancels and refuses further steps.
- Progress and timing: ``.running``, ``.progress`` (fraction), ``.entries_done`` /
  ``.entries_total``, ``.last_duration_s`` (start to completion, weight copy included),
  ``.last_entries_per_s``, ``.refreshes`` (swapped in), ``.skipped``, ``.steps``.
- ``values=True`` stores the re-encoded values too; ``values=False`` refreshes keys only
  (a memory that stores values keeps its old ones).

Peak extra memory of a refresh: one key table [M, key_dim] (+ one value table [M, d] with
values) on the memory's device, plus one chunk's working set (its token ids [chunk, L] and
whatever ``encode_memory`` allocates for ``chunk`` entries), plus the encoder weight copy
(for PlugLM: the embedding tables, pooler, W_k, W_v). The shadow tables are allocated once
per refresh and handed to the memory at the swap (searches may still hold the old table
until they finish).

When no entry was edited during the refresh, the shadow itself becomes the table (no copy).

Sharded memories: the refresher is agnostic to what it refreshes; it re-encodes whatever
memory object it is given. Give each rank's refresher its local shard (``mem.shard(rank,
world_size)``): each rank refreshes its own part, with no communication.

Not thread-safe itself: call ``step``/``wait``/``cancel`` from one (the training) thread.
"""
from __future__ import annotations

import copy
import os
import threading
import time
import traceback
from typing import Callable

import torch
from torch import nn

from .memory.encode import check_encoded, encoder_device, length_batches, table_dtype

__all__ = ["AsyncKeyRefresher"]

# CUDA stream priorities: 0 is the lowest (and the default stream's), -1 a higher one on
# every CUDA GPU; torch maps more negative values onto the highest it has.
_PRIORITIES = {"low": 0, "normal": 0, "high": -1}


def _cuda_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _module_device(model) -> torch.device:
    return encoder_device(model) or torch.device("cpu")


@torch.no_grad()
def snapshot_encoder(model, memory=None, device: torch.device | None = None):
    """A frozen copy of ``model``'s memory encoder (anything with ``encode_memory``), in eval
    mode, on ``device`` (default: where the model is). See the module docstring for which
    parts are copied."""
    fn = getattr(model, "memory_encoder_snapshot", None)
    if callable(fn):
        enc = fn()
    else:
        memo = {} if memory is None else {id(memory): memory}  # never copy the knowledge
        enc = copy.deepcopy(model, memo)
    if isinstance(enc, nn.Module):
        for p in enc.parameters():
            p.requires_grad_(False)
        enc.eval()
        if device is not None and _module_device(enc) != device:
            enc.to(device)
    return enc


class _Job:
    """Everything one refresh touches. The worker thread holds this, never the refresher,
    so dropping the refresher (or the job after a swap) frees everything."""

    def __init__(self, snapshot, encoder, device, memory_device, chunk, key_dtype, value_dtype,
                 want_values):
        self.snapshot = snapshot
        self.encoder = encoder
        self.device = device                  # where encode_memory runs
        self.memory_device = memory_device    # where the shadow tables live
        self.chunk = chunk
        self.key_dtype = key_dtype            # None = the encoder's float dtype
        self.value_dtype = value_dtype
        self.want_values = want_values
        self.keys: torch.Tensor | None = None     # shadow [M, key_dim]
        self.values: torch.Tensor | None = None   # shadow [M, d]
        self.allocations = 0                  # shadow tables allocated (tests: once per refresh)
        self.total = 0
        self.done = 0
        self.cancel = threading.Event()
        self.finished = threading.Event()     # the worker thread has returned
        self.error: BaseException | None = None
        self.stream = None                    # CUDA: the refresh stream
        self.ready_event = None               # CUDA: after the weight copy, on the training stream
        # CUDA memory on another GPU than the encoder: the shadow-table work runs on this
        # stream of the memory's GPU (the done event waits for it), after mem_ready_event
        self.mem_stream = None
        self.mem_ready_event = None
        self.done_event = None                # CUDA: after the last chunk, on the refresh stream
        self.t_start = time.perf_counter()
        self.t_end: float | None = None
        self.thread: threading.Thread | None = None

    def release(self):
        self.snapshot = self.encoder = self.keys = self.values = self.error = None
        self.stream = self.ready_event = self.done_event = None
        self.mem_stream = self.mem_ready_event = None

    def synchronize(self):
        # chunks still queued read tensors the caller is about to free
        for st in (self.stream, self.mem_stream):
            if st is not None:
                st.synchronize()


def _encode_all(job: _Job) -> None:
    """The refresh body (worker thread): every live snapshot row -> the shadow tables."""
    s = job.snapshot
    M = len(s)
    rows = s.valid.cpu().nonzero().squeeze(1)  # [E] live entries
    E = rows.numel()
    job.total = E
    cuda = job.stream is not None
    inflight: list[tuple[object, int]] = []  # CUDA: (event, entries done once it fires)
    for a, r, tok, mask in length_batches(s, rows, job.chunk, job.device):
        if job.cancel.is_set():
            return
        n = r.numel()
        first = None if job.keys is None else (
            job.keys.shape[1], None if job.values is None else job.values.shape[1])
        k, v = check_encoded(job.encoder.encode_memory(tok, mask), n, first,
                             values=job.want_values)
        if job.keys is None:
            # Allocated once, here, when the widths are known: M rows so that ids are row
            # numbers; removed rows are never encoded and get zeros (they are never searched).
            alloc = torch.zeros if E < M else torch.empty
            job.keys = alloc(M, k.shape[1], dtype=job.key_dtype or table_dtype(k.dtype),
                             device=job.memory_device)
            if v is not None:
                # the value table's home (the host when values are placed there: docs/design.md,
                # "Placement"), not the keys' device
                job.values = alloc(M, v.shape[1], dtype=job.value_dtype or table_dtype(v.dtype),
                                   device=s.row_device)
            job.allocations += 1
        idx = r.to(job.memory_device)
        job.keys.index_copy_(0, idx, k.detach().to(device=job.memory_device, dtype=job.keys.dtype))
        if v is not None:
            job.values.index_copy_(0, r.to(job.values.device), v.detach().to(
                device=job.values.device, dtype=job.values.dtype))
        del k, v, tok, mask
        if cuda:
            ev = torch.cuda.Event()
            ev.record(job.stream)
            inflight.append((ev, a + n))
            if len(inflight) > 1:  # at most two chunks queued: cancel stays prompt
                first_ev, done = inflight.pop(0)
                first_ev.synchronize()  # releases the GIL
                job.done = done
        else:
            job.done = a + n


def _worker(job: _Job, num_threads: int | None, nice: int, restore_threads: int) -> None:
    try:
        if job.stream is not None:
            with torch.cuda.device(job.device), torch.cuda.stream(job.stream), torch.no_grad():
                job.stream.wait_event(job.ready_event)
                prev_mem_stream = None
                if job.mem_stream is not None:
                    # The memory's GPU runs this thread's shadow-table work (allocation,
                    # index_copy_, the snapshot reads) on its current stream: make that
                    # mem_stream. Current streams are per device and per thread, and setting
                    # one inside a device guard leaves the current device as it was.
                    with torch.cuda.device(job.mem_stream.device):
                        prev_mem_stream = torch.cuda.current_stream()
                        torch.cuda.set_stream(job.mem_stream)
                    job.mem_stream.wait_event(job.mem_ready_event)
                try:
                    _encode_all(job)
                    if job.mem_stream is not None:  # the done event covers both GPUs' work
                        mem_done = torch.cuda.Event()
                        mem_done.record(job.mem_stream)
                        job.stream.wait_event(mem_done)
                finally:
                    if prev_mem_stream is not None:
                        with torch.cuda.device(prev_mem_stream.device):
                            torch.cuda.set_stream(prev_mem_stream)
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(job.stream)
                job.done_event = ev
        else:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            if nice > 0 and hasattr(os, "setpriority"):
                try:
                    tid = threading.get_native_id()
                    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
                except OSError:
                    pass  # not permitted here: run at normal priority
            with torch.no_grad():
                _encode_all(job)
    except BaseException as e:  # noqa: BLE001 - handed to the training thread
        job.keys = job.values = None  # free the shadow now, not when the error is raised
        # The traceback's frames hold the snapshot, the encoder copy and a chunk's tensors:
        # clear their locals so keeping the exception (.last_error) keeps none of them.
        traceback.clear_frames(e.__traceback__)
        job.error = e
    finally:
        if job.stream is None and num_threads is not None:
            torch.set_num_threads(restore_threads)
        job.t_end = time.perf_counter()
        job.finished.set()


class AsyncKeyRefresher:
    """Re-encode all memory keys every ``interval`` steps in the background (module docstring).

    Args:
      model: the model whose memory encoder produces the keys (a PlugLM model, or any object
        with ``encode_memory(token_ids [E, L], attention_mask [E, L]) -> (keys, values)``).
      memory: the KnowledgeMemory (or this rank's shard) to refresh.
      interval: steps between refreshes (0 = only on ``refresh_now``).
      chunk: entries encoded per chunk (the working set; also how often cancel is checked).
      device: where to encode (default: the model's device; the weight copy goes there).
      priority: "low" (default), "normal", "high", or an int CUDA stream priority.
      values: also refresh the value table.
      num_threads: CPU intra-op threads of the refresh thread (default max(1, threads // 4)).
      encoder_snapshot: a callable returning a frozen encoder copy (overrides the default).
    """

    def __init__(self, model, memory, interval: int = 200, chunk: int = 4096, *,
                 device: str | torch.device | None = None, priority: str | int = "low",
                 values: bool = True, num_threads: int | None = None,
                 encoder_snapshot: Callable[[], object] | None = None):
        if not callable(getattr(model, "encode_memory", None)) and encoder_snapshot is None:
            raise TypeError(f"model must have encode_memory(token_ids, attention_mask), got "
                            f"{type(model).__name__}")
        for name in ("snapshot", "set_keys"):
            if not callable(getattr(memory, name, None)):
                raise TypeError(f"memory must be a KnowledgeMemory (needs {name}()), got "
                                f"{type(memory).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"interval must be an int >= 0 (0 = never automatic), got {interval!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        if isinstance(priority, str):
            if priority not in _PRIORITIES:
                raise ValueError(f"priority must be one of {sorted(_PRIORITIES)} or an int, got {priority!r}")
        elif isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be one of {sorted(_PRIORITIES)} or an int, got {priority!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        if encoder_snapshot is not None and not callable(encoder_snapshot):
            raise TypeError("encoder_snapshot must be a callable returning an encoder copy")
        self.model = model
        self.memory = memory
        self.interval = interval
        self.chunk = chunk
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.priority = priority
        self.values = bool(values)
        self.num_threads = num_threads
        self._encoder_snapshot = encoder_snapshot
        self._stream = None  # CUDA refresh stream, created once and reused
        self._mem_stream = None  # CUDA stream on the memory's GPU when it is not the encoder's
        self._job: _Job | None = None
        self._closed = False
        self.steps = 0
        self.refreshes = 0
        self.skipped = 0
        self.last_duration_s: float | None = None
        self.last_entries_per_s: float | None = None
        self.last_committed: int | None = None
        self.last_error: BaseException | None = None

    # ---------------------------------------------------------------- the hook

    def step(self, step: int | None = None) -> None:
        """Once per optimizer step: swap in a finished refresh (or raise its error), then start
        one every ``interval`` steps. ``step``: the step number (default: count calls)."""
        self._check_open()
        if step is None:
            self.steps += 1
        else:
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step must be an int, got {type(step).__name__}")
            self.steps = step
        self._poll()
        if self.interval and self.steps > 0 and self.steps % self.interval == 0:
            if self._job is None:
                self._start()
            else:
                self.skipped += 1

    def on_step(self, step: int) -> None:
        """The training-loop hook of ``examples/pretrain_mlm.py``: ``step(step)``."""
        self.step(step)

    # ------------------------------------------------------------- controls

    def refresh_now(self, block: bool = False) -> int | None:
        """Start a refresh from the current weights (cancelling a running one, whose weights
        are older). block=True waits and swaps it in, returning the entries committed."""
        self._check_open()
        self.cancel()
        self._start()
        return self.wait() if block else None

    def _set_keys(self, keys, values, snapshot, adopt: bool) -> int:
        import inspect

        try:
            takes_adopt = "adopt" in inspect.signature(self.memory.set_keys).parameters
        except (TypeError, ValueError):
            takes_adopt = False
        if takes_adopt:
            return self.memory.set_keys(keys, values, snapshot=snapshot, adopt=adopt)
        return self.memory.set_keys(keys, values, snapshot=snapshot)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the running refresh is complete, swap it in and return the number of
        entries committed (None if none was running, or the timeout passed first)."""
        job = self._job
        if job is None:
            return None
        if not job.finished.wait(timeout):
            return None
        if job.error is None and job.done_event is not None:
            job.done_event.synchronize()
        return self._poll()

    def cancel(self) -> bool:
        """Stop the running refresh between chunks and free its buffers. True if one ran."""
        job = self._job
        if job is None:
            return False
        job.cancel.set()
        job.thread.join()
        job.synchronize()  # chunks still queued read tensors we are about to free
        if job.error is not None:
            self.last_error = job.error
        self._job = None
        job.release()
        return True

    def close(self) -> None:
        """Cancel any running refresh; further steps raise."""
        self.cancel()
        self._closed = True

    def __enter__(self) -> "AsyncKeyRefresher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- progress

    @property
    def running(self) -> bool:
        return self._job is not None

    @property
    def entries_total(self) -> int:
        job = self._job
        return 0 if job is None else job.total

    @property
    def entries_done(self) -> int:
        job = self._job
        return 0 if job is None else job.done

    @property
    def progress(self) -> float:
        """Fraction of the running refresh done (1.0 when none runs)."""
        job = self._job
        if job is None:
            return 1.0
        if job.finished.is_set() and job.error is None and not job.cancel.is_set() \
                and (job.done_event is None or job.done_event.query()):
            return 1.0
        return job.done / job.total if job.total else 0.0

    def __repr__(self) -> str:
        state = f"running {self.progress:.0%}" if self.running else "idle"
        return (f"AsyncKeyRefresher(interval={self.interval}, chunk={self.chunk}, "
                f"device={self.device}, {state}, refreshes={self.refreshes})")

    # ------------------------------------------------------------- internals

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this AsyncKeyRefresher is closed")

    def _start(self) -> None:
        snap = self.memory.snapshot()
        dev = self.device
        if self._encoder_snapshot is not None:
            enc = self._encoder_snapshot()
            if not callable(getattr(enc, "encode_memory", None)):
                raise TypeError("encoder_snapshot() must return an object with encode_memory")
        else:
            enc = snapshot_encoder(self.model, self.memory, dev)
        kdt = snap.keys.dtype if snap.keys is not None else None
        if kdt == torch.int8:  # the shadow holds float keys; set_keys quantises them
            kdt = torch.float32
        vdt = snap.values.dtype if snap.values is not None else None
        job = _Job(snap, enc, dev, snap.device, self.chunk, kdt, vdt, self.values)
        job.total = int(snap.num_valid)  # known now, so progress reads right from the start
        if dev.type == "cuda":
            if self._stream is None:
                prio = _PRIORITIES[self.priority] if isinstance(self.priority, str) else self.priority
                self._stream = torch.cuda.Stream(device=dev, priority=prio)
            job.stream = self._stream
            job.ready_event = torch.cuda.Event(enable_timing=True)
            job.ready_event.record(torch.cuda.current_stream(dev))  # after the weight copy
            mem_dev = snap.device
            if mem_dev.type == "cuda" and _cuda_index(mem_dev) != _cuda_index(dev):
                # Memory on another GPU: its current stream is neither the refresh stream
                # nor covered by the done event, so the shadow-table work gets a stream of
                # its own there, which the done event waits for (issue 13).
                if self._mem_stream is None or self._mem_stream.device != torch.device(
                        "cuda", _cuda_index(mem_dev)):
                    prio = _PRIORITIES[self.priority] if isinstance(self.priority, str) \
                        else self.priority
                    self._mem_stream = torch.cuda.Stream(device=mem_dev, priority=prio)
                job.mem_stream = self._mem_stream
                job.mem_ready_event = torch.cuda.Event()
                job.mem_ready_event.record(torch.cuda.current_stream(mem_dev))
        nice = 10 if self.priority == "low" else 0
        threads = self.num_threads if self.num_threads is not None else \
            max(1, torch.get_num_threads() // 4)
        job.thread = threading.Thread(target=_worker, args=(job, threads, nice, torch.get_num_threads()),
                                      name="pluglm-key-refresh", daemon=True)
        self._job = job
        job.thread.start()

    def _poll(self) -> int | None:
        """Swap a complete refresh in, or raise its error. Returns entries committed."""
        job = self._job
        if job is None or not job.finished.is_set():
            return None
        # The worker is only returning now; joining it lets the next refresh's thread reuse
        # its stack (glibc caches exited threads' stacks: resident pages otherwise pile up).
        job.thread.join()
        if job.error is not None:
            err = job.error
            self._job = None
            job.synchronize()  # queued chunks still read the tensors released here
            job.release()
            self.last_error = err
            if hasattr(err, "add_note"):
                err.add_note("(raised by the AsyncKeyRefresher's background refresh; "
                             "the refresh was discarded)")
            raise err
        if job.done_event is not None and not job.done_event.query():
            return None
        self._job = None
        try:
            committed = 0
            if job.keys is not None:
                if job.stream is not None and job.memory_device.type == "cuda":
                    cur = torch.cuda.current_stream(job.memory_device)
                    cur.wait_event(job.done_event)
                    job.keys.record_stream(cur)
                    if job.values is not None:
                        job.values.record_stream(cur)
                values = job.values if self.values else job.snapshot.values
                # the shadow is ours alone: let a full, unedited refresh become the table
                committed = self._set_keys(job.keys, values, job.snapshot,
                                           adopt=values is None or values is job.values)
            if job.stream is None:
                self.last_duration_s = job.t_end - job.t_start
            else:  # GPU time from the weight copy's event to the last chunk's
                self.last_duration_s = job.ready_event.elapsed_time(job.done_event) / 1e3
            self.last_entries_per_s = job.total / self.last_duration_s if self.last_duration_s > 0 else None
            self.last_committed = committed
            self.refreshes += 1
            return committed
        finally:
            job.release()
