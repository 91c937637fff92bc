"""Exact MIPS top-k: our backends against what a user would otherwise run.

Compared, float32 keys and queries (CPU) or bfloat16 (GPU):
  ours-<backend>  pluglm_kernels.mips_topk (cpu here; cuda and triton on GPUs)
  torch           torch.topk(q @ K.T, k): writes and re-reads a [B, M] score matrix
  faiss           faiss IndexFlatIP.search (CPU only; skipped where faiss is not installed)
Default: a subset that includes the issue's target point (f32, d=128, B=32, M=1e6, k=5:
ours >= 1.3x torch and >= 2.5x faiss, peak extra memory <= 64 MB). PLUGLM_BENCH_FULL=1
sweeps M in {1e5, 1e6, 4e6} x d in {128, 768} x B in {1, 32, 256} x k in {5, 100}
(faiss is skipped where its copy of the keys would not fit in memory).

Each benchmark records median (pytest-benchmark), p20/p80 and peak extra memory of one call
in extra_info. Peak memory on CPU is the process's resident-set high-water mark: we reset
it (write 5 to /proc/self/clear_refs), run one call and read VmHWM from /proc/self/status,
minus VmRSS before the call. That counts every allocation (torch's allocator, std::vector
in C++, faiss's internal buffers, OpenMP stacks), unlike the torch profiler which sees only
torch's allocator. It misses allocations served from memory the process already holds
(freed earlier and kept by malloc, typically blocks < 32 MB), so peak_torch_alloc_mb also
records the torch profiler's peak of torch-allocator bytes during the call (which misses
C++ std::vector buffers; ours are analytically <= threads x (192 KB + B*k*12 B) + B*d*4 B).
On GPUs it is torch.cuda.max_memory_allocated() above the live bytes.

    python -m pytest benchmarks/bench_mips.py --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import os
import re
import statistics

import pytest
import torch

import pluglm_kernels as pk
from pluglm.bench.measure import p20_p80, peak_extra_bytes, time_fn, torch_alloc_peak_bytes
from pluglm_kernels import availability

try:
    import faiss
except ImportError:  # GPU test machines have no faiss
    faiss = None

FULL = os.environ.get("PLUGLM_BENCH_FULL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TARGET = (1_000_000, 128, 32, 5)  # (M, d, B, k)

if FULL:
    SHAPES = [(M, d, B, k) for M in (100_000, 1_000_000, 4_000_000) for d in (128, 768)
              for B in (1, 32, 256) for k in (5, 100)]
elif DEVICE == "cuda":
    SHAPES = [TARGET, (4_000_000, 128, 32, 5), (4_000_000, 768, 64, 64)]
else:
    SHAPES = [TARGET, (1_000_000, 128, 1, 5), (100_000, 768, 256, 100)]

OURS = [b for b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))
        if availability("mips_topk", b, DEVICE)[0]]
IMPLS = [f"ours-{b}" for b in OURS] + ["torch"] + (["faiss"] if faiss and DEVICE == "cpu" else [])
# shape-major order, so one shape's keys are built once and freed before the next
CASES = [(shape, impl) for shape in SHAPES for impl in IMPLS]


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) * 1024


_cache: dict = {}


def _inputs(M, d, B):
    """queries [B, d], keys [M, d] (and the faiss index over them), cached per shape."""
    key = (M, d, B)
    if _cache.get("key") != key:
        _cache.clear()
        g = torch.Generator(device=DEVICE).manual_seed(M + d + B)
        _cache["keys"] = torch.randn(M, d, generator=g, device=DEVICE, dtype=DTYPE)
        _cache["q"] = torch.randn(B, d, generator=g, device=DEVICE, dtype=DTYPE)
        _cache["key"] = key
    return _cache["q"], _cache["keys"]


def _faiss_index(keys):
    if "faiss" not in _cache:
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(keys.numpy())
        _cache["faiss"] = index
    return _cache["faiss"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _make_call(impl, M, d, B, k):
    q, keys = _inputs(M, d, B)
    if impl.startswith("ours-"):
        backend = impl.split("-", 1)[1]

        def call():
            pk.mips_topk(q, keys, k, backend=backend)
            _sync()
    elif impl == "torch":
        def call():
            torch.topk(q @ keys.T, k, dim=1)
            _sync()
    else:
        if 2 * keys.numel() * keys.element_size() > 0.8 * _mem_total_bytes():
            pytest.skip("faiss's copy of the keys would not fit in memory")
        index, qn = _faiss_index(keys), q.numpy()

        def call():
            index.search(qn, k)
    return call


def _peak_extra_bytes(call) -> int:
    """Peak memory of one call above what was resident (CPU) or allocated (GPU) before it."""
    peak = peak_extra_bytes(call, DEVICE)
    return -1 if peak is None else peak  # -1: unmeasurable here (recorded as unknown)


def _peak_torch_alloc_bytes(call) -> int:
    return torch_alloc_peak_bytes(call, DEVICE)


def _rounds(M, d, B):
    work = M * d * max(B, 8)
    return 20 if DEVICE == "cuda" else max(3, min(10, int(3e10 / work)))


@pytest.mark.parametrize("shape,impl", CASES, ids=lambda v: "M{}-d{}-B{}-k{}".format(*v)
                         if isinstance(v, tuple) else v)
def test_mips_topk(benchmark, shape, impl):
    M, d, B, k = shape
    benchmark.group = f"mips_topk {str(DTYPE).replace('torch.', '')} M={M} d={d} B={B} k={k}"
    call = _make_call(impl, M, d, B, k)
    benchmark.pedantic(call, rounds=_rounds(M, d, B), iterations=1, warmup_rounds=1)
    data = benchmark.stats.stats.data
    p20, p80 = p20_p80(data)
    med = statistics.median(data)
    bytes_read = M * d * torch.finfo(DTYPE).bits // 8
    benchmark.extra_info.update({
        "impl": impl, "M": M, "d": d, "B": B, "k": k,
        "dtype": str(DTYPE).replace("torch.", ""), "device": DEVICE,
        "device_name": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
        "key_read_GBps": bytes_read / med / 1e9,
        "peak_extra_mb": _peak_extra_bytes(call) / 2**20,
    })
    if DEVICE == "cpu":
        benchmark.extra_info["peak_torch_alloc_mb"] = _peak_torch_alloc_bytes(call) / 2**20


def _median_time(call, rounds):
    """Median seconds of ``rounds`` calls after one warm-up (a baseline timed beside the
    benchmarked call, in the same process)."""
    return time_fn(call, DEVICE, warmup=1, min_repeats=rounds, max_repeats=rounds).median_ms / 1e3


@pytest.mark.skipif(DEVICE != "cpu" or "cpu" not in OURS, reason="CPU target (C++ kernel)")
def test_target_cpu_speedup(benchmark):
    """The issue's CPU target, side by side in one process: f32, d=128, B=32, M=1e6, k=5."""
    M, d, B, k = TARGET
    ours = _make_call("ours-cpu", M, d, B, k)
    base = _make_call("torch", M, d, B, k)
    benchmark.group = "target"
    benchmark.pedantic(ours, rounds=15, iterations=1, warmup_rounds=2)
    t_ours = statistics.median(benchmark.stats.stats.data)
    t_torch = _median_time(base, 7)
    info = {"ours_median_ms": t_ours * 1e3, "torch_median_ms": t_torch * 1e3,
            "speedup_vs_torch": t_torch / t_ours,
            "ours_peak_extra_mb": _peak_extra_bytes(ours) / 2**20,
            "torch_peak_extra_mb": _peak_extra_bytes(base) / 2**20}
    line = (f"\nCPU mips_topk M={M} d={d} B={B} k={k}: ours {t_ours * 1e3:.1f} ms "
            f"({info['ours_peak_extra_mb']:.1f} MB), torch {t_torch * 1e3:.1f} ms "
            f"({info['torch_peak_extra_mb']:.1f} MB), {t_torch / t_ours:.2f}x (target 1.3x)")
    if faiss is not None:
        fcall = _make_call("faiss", M, d, B, k)
        t_faiss = _median_time(fcall, 5)
        info.update({"faiss_median_ms": t_faiss * 1e3, "speedup_vs_faiss": t_faiss / t_ours,
                     "faiss_peak_extra_mb": _peak_extra_bytes(fcall) / 2**20})
        line += f"; faiss {t_faiss * 1e3:.1f} ms, {t_faiss / t_ours:.2f}x (target 2.5x)"
    benchmark.extra_info.update(info)
    print(line)
