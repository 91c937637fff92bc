"""Index backends: recall@k against latency, and sharded exact search against process count.

1. test_index_recall_latency — each faiss kind (pluglm.index) next to our exact search
   (kind "exact" = pluglm_kernels.mips_topk), float32, d=128, B=32, k=10, on clustered keys
   (2000 Gaussian centres, per-coordinate noise of the centres' scale, so a query's
   top-k spans several clusters; queries drawn the same way), with a sweep of each kind's speed/recall
   knob (ivf/ivfpq nprobe, hnsw efSearch). Recall@k is measured against mips_topk on the same
   queries. extra_info: build_s, recall, median/p20/p80 ms, queries/s. Default: M=1e5 for
   every kind, M=1e6 for exact/flat/ivf; PLUGLM_BENCH_FULL=1 adds hnsw and ivfpq at 1e6 (the
   HNSW build alone takes many minutes on 2 cores). IVF trains on 64 rows per list (nlist
   256 at 1e5, 1024 at 1e6) to keep the build time of the suite bounded.
2. test_sharded_search — pluglm.distributed.sharded_search over 1, 2 and 4 gloo processes on
   127.0.0.1 (this process is rank 0 and is timed; the others are spawned and run the same
   number of searches). Each rank holds M/world rows and uses max(1, cores // world)
   threads, so the total thread count stays at the core count. extra_info: queries/s.
   On a 2-core machine more processes cannot add compute: the point is the overhead of the
   all-gather + merge relative to the local search.

    python -m pytest benchmarks/bench_index.py --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import datetime
import os
import socket
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pluglm_kernels as pk
from pluglm.bench.measure import p20_p80
from pluglm import distributed as D
from pluglm.index import build_index

try:
    import faiss
except ImportError:  # GPU test machines have no faiss
    faiss = None

FULL = os.environ.get("PLUGLM_BENCH_FULL", "0") == "1"
D_KEY, B, K = 128, 32, 10
NOISE = 1.0  # per-coordinate noise around unit-variance centres: neighbours span clusters
NLIST = {100_000: 256, 1_000_000: 1024}
# (kind, build params, search-time knob name, knob values)
SWEEP = [("exact", {}, None, [None]),
         ("flat", {}, None, [None]),
         ("ivf", {}, "nprobe", [1, 8, 32, 128]),
         ("hnsw", {"M": 32, "efConstruction": 64}, "efSearch", [16, 64, 256]),
         ("ivfpq", {}, "nprobe", [8, 32])]
SIZES = [100_000, 1_000_000]
CASES = [(M, kind, params, knob, v) for M in SIZES for kind, params, knob, vals in SWEEP for v in vals
         if FULL or M == 100_000 or kind in ("exact", "flat", "ivf")]

_cache: dict = {}


def _data(M):
    """clustered keys [M, d] and queries [B, d] float32, with the exact top-k ids [B, K]."""
    if _cache.get("M") != M:
        _cache.clear()
        g = torch.Generator().manual_seed(M)
        cent = torch.randn(2000, D_KEY, generator=g)
        keys = torch.empty(M, D_KEY)
        for s in range(0, M, 1 << 17):  # in chunks: no [M, d] temporaries beyond the table
            n = min(1 << 17, M - s)
            keys[s:s + n] = cent[torch.randint(0, 2000, (n,), generator=g)] + \
                NOISE * torch.randn(n, D_KEY, generator=g)
        q = cent[torch.randint(0, 2000, (B,), generator=g)] + NOISE * torch.randn(B, D_KEY, generator=g)
        _cache.update(M=M, keys=keys, q=q, ref=pk.mips_topk(q, keys, K)[1], indexes={})
    return _cache["keys"], _cache["q"], _cache["ref"]


def _index(M, kind, params):
    keys, _, _ = _data(M)
    key = (kind, tuple(sorted(params.items())))
    if key not in _cache["indexes"]:
        extra = {}
        if kind in ("ivf", "ivfpq"):
            extra = {"nlist": NLIST[M], "train_size": 64 * NLIST[M]}
        t0 = time.perf_counter()
        index = build_index(kind, keys, **params, **extra)
        _cache["indexes"][key] = (index, time.perf_counter() - t0)
    return _cache["indexes"][key]


def _recall(ids, ref):
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref))
    return hits / ref.numel()


def _set_knob(index, knob, v):
    if knob is not None:
        index.set_search_params(**{knob: v})


def test_index_recall_latency(benchmark, M, kind, params, knob, v):
    if kind != "exact" and faiss is None:
        pytest.skip("faiss is not installed")
    benchmark.group = f"index f32 M={M} d={D_KEY} B={B} k={K}"
    keys, q, ref = _data(M)
    index, build_s = _index(M, kind, params)
    _set_knob(index, knob, v)

    def call():
        return index.search(q, K)

    rounds = 10 if M <= 100_000 else 5
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    data = benchmark.stats.stats.data
    med = statistics.median(data)
    p20, p80 = p20_p80(data)
    rec = _recall(call()[1], ref)
    benchmark.extra_info.update({
        "kind": kind, "M": M, "d": D_KEY, "B": B, "k": K, knob or "knob": v, "params": params,
        "nlist": getattr(index, "nlist", None), "pq_m": getattr(index, "m", None),
        "build_s": build_s, "recall": rec, "median_ms": med * 1e3, "p20_ms": p20 * 1e3,
        "p80_ms": p80 * 1e3, "queries_per_s": B / med, "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads() if faiss else None})
    print(f"\n{kind:6s} M={M:>8d} {knob or '':9s}{v if v is not None else '':>4} build {build_s:7.2f} s  "
          f"recall@{K} {rec:.3f}  median {med * 1e3:8.2f} ms")


# ------------------------------------------------------------------- sharded search

SHARD_M = 1_000_000 if not FULL else 4_000_000
WORLDS = [1, 2, 4]
SHARD_ROUNDS = 10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _shard_inputs(rank, world):
    a, b = D.shard_bounds(SHARD_M, rank, world)
    g = torch.Generator().manual_seed(1000 + rank)
    local = torch.randn(b - a, D_KEY, generator=g)  # [M_local, d]
    q = torch.randn(B, D_KEY, generator=torch.Generator().manual_seed(7))  # same on every rank
    return local, a, q


def _serve(rank, world, port, calls):
    """Ranks 1..world-1: join the group and take part in ``calls`` searches."""
    torch.set_num_threads(_threads(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    local, a, q = _shard_inputs(rank, world)
    dist.barrier()
    for _ in range(calls):
        D.sharded_search(q, K, local, a)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_search(benchmark, world):
    benchmark.group = f"sharded exact search f32 M={SHARD_M} d={D_KEY} B={B} k={K} (gloo)"
    port = _free_port()
    calls = SHARD_ROUNDS + 1  # warmup + rounds
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_serve, args=(r, world, port, calls)) for r in range(1, world)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(world))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        local, a, q = _shard_inputs(0, world)
        dist.barrier()
        benchmark.pedantic(lambda: D.sharded_search(q, K, local, a), rounds=SHARD_ROUNDS,
                           iterations=1, warmup_rounds=1)
        t0 = time.perf_counter()
        pk.mips_topk(q, local, K)
        local_s = time.perf_counter() - t0
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for p in procs:
            p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    data = benchmark.stats.stats.data
    med = statistics.median(data)
    p20, p80 = p20_p80(data)
    benchmark.extra_info.update({
        "world": world, "M": SHARD_M, "d": D_KEY, "B": B, "k": K, "threads_per_rank": _threads(world),
        "cpu_count": os.cpu_count(), "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
        "queries_per_s": B / med, "rank0_local_search_ms": local_s * 1e3})
    print(f"\nsharded world={world} ({_threads(world)} thr/rank): median {med * 1e3:.1f} ms, "
          f"{B / med:.0f} queries/s (rank 0 local search alone {local_s * 1e3:.1f} ms)")
