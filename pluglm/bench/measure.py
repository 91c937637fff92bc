"""Timing and peak-memory measurement.

CPU time: perf_counter around each call after warm-up. CUDA time: CUDA events after
warm-up. Peak memory: on CUDA, the caching allocator's peak above the starting allocation;
on CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
the resident set at the start — it sees every allocation (torch, faiss, numpy), not only
torch's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"


def _proc_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS so a later allocation shows up in the RSS peak
    (otherwise glibc reuses resident free chunks and the peak undercounts)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...), None where unreadable."""
    return _proc_kb(field)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` (extra over the start)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self._start = _proc_kb("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            hwm = _proc_kb("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm - self._start) * 1024
        return False


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_fn(fn, device: torch.device | str = "cpu", *, warmup: int = 2, min_repeats: int = 5,
            max_repeats: int = 50, budget_s: float = 1.0) -> Timing:
    """Median and p20/p80 of ``fn()`` in milliseconds, repeating until ``budget_s`` is used."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats
                                        or time.perf_counter() - t_start < budget_s):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def time_interleaved(fns, device: torch.device | str = "cpu", *, rounds: int = 9,
                     warmup: int = 1, budget_s: float = 0.0, max_rounds: int = 200) -> list[Timing]:
    """Median and p20/p80 (ms) of each of ``fns``, timed in alternating calls: round r calls
    every function once, in order on even rounds and in reverse on odd ones, so all of them
    see the same machine (a shared machine's load changes by the minute: two cases timed
    minutes apart are not comparable, two interleaved ones are). At least ``rounds`` rounds,
    more while ``budget_s`` is not used up. CUDA: event timing of each call."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    t_start = time.perf_counter()
    r = 0
    while r < max_rounds and (r < rounds or time.perf_counter() - t_start < budget_s):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[i]()
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[i]()
                times[i].append((time.perf_counter() - t0) * 1e3)
        r += 1
    return [Timing(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), len(t))
            for t in times]


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, min_repeats=10, budget_s=0.5)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def peak_extra_bytes(call, device: torch.device | str = "cpu") -> int | None:
    """Peak extra memory of one ``call()`` (see ``PeakMemory``); None where unmeasurable."""
    with PeakMemory(device) as pm:
        call()
    return pm.peak_bytes


def torch_alloc_peak_bytes(call, device: torch.device | str = "cpu") -> int:
    """Peak bytes held by torch's allocator during one ``call()`` above what was live before:
    CUDA allocator statistics on GPUs, torch profiler memory events on the CPU (sees torch
    tensors only, but also memory that malloc reuses without touching the RSS peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def p20_p80(data: list[float]) -> tuple[float, float]:
    """The 20th and 80th percentiles of ``data`` (pytest-benchmark records only IQR)."""
    return _quantile(list(data), 0.2), _quantile(list(data), 0.8)
