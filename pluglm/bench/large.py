"""``pluglm bench --large``: memories of 1e6 to 2e7 entries on one machine (docs/design.md,
"Out of core"; issue 14).

Per M (synthetic entries, d = 128 keys, 128-token int16 entries, no value table):
- a memory is built straight to disk with ``build_memory`` (int8 keys, int16 token ids),
  loaded memory-mapped (load wall time, resident memory added by the load, bytes on disk
  per entry), and searched through ``KnowledgeMemory.search`` on its mapped keys;
- exact search at B = 1, 32, 256 over in-memory key tables of every key dtype (int8,
  bfloat16; float32 up to 1e7), the case's peak extra memory;
- each search row's ``pct_roofline``: its time against the ceiling that bounds it — the
  bytes of keys it must read over the measured memory read bandwidth, or its 2·B·M·d flops
  over the measured float32 GEMM rate, whichever takes longer. Both ceilings are measured
  in the same run (``measure_ceilings``); a compute-bound case is timed in 3 rounds with
  the GEMM rate measured around each, and its percent is the median of the rounds' (a
  round's ceiling: the GEMM rate just before and after it; ``_roofline``);
- int8 / bf16 / fp16 recall against float32 on real sentence embeddings, and the ANN
  baselines (faiss IVF, HNSW; two operating points each) against our exact search on
  clustered anisotropic synthetic keys, isotropic ones and the real embeddings: recall@5/@10
  and single-query latency (``bench_ann``);
- the cost of a memory: a PlugLM-BERT-base forward against the dense one, and one memory
  layer against the dense FFN, each pair timed in alternating calls (``cost_pair_rows``,
  also the GPU suite's headline, ``pluglm.bench.headline``).
Rows are the quick sweep's (``pluglm.bench.common.Row``).
"""
from __future__ import annotations

import gc
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pluglm_kernels import quantize_keys

from .common import Row, machine_info, measure, mem_available
from .measure import copy_bandwidth_gbs, proc_status_kb, time_fn

LARGE_MS = (1_000_000, 4_000_000, 10_000_000, 20_000_000)
FLOAT32_MAX_M = 10_000_000


@dataclass
class LargeConfig:
    Ms: tuple = LARGE_MS
    Bs: tuple = (1, 32, 256)
    # (B, largest M timed at that B); () = every B at every M (the default: one B = 256
    # search over 2e7 int8 keys takes ~7 s on an idle 2-core machine, about a minute on a
    # shared one)
    B_limits: tuple = ()
    k: int = 5
    d: int = 128
    L: int = 128
    vocab: int = 30522
    dtypes: tuple = ("int8", "bfloat16", "float32")
    work_dir: str = ""
    budget_s: float = 1.0
    chunk: int = 500_000
    ceiling_bytes: int = 1 << 30  # the bandwidth probe's size: far beyond any cache
    cost_Ms: tuple = (1_000_000, 10_000_000)  # the cost-of-a-memory case (empty: skip)
    cost_Bs: tuple = (1, 8)
    recall_entries: int = 2000  # real sentence embeddings for the int8 recall case (0: skip)
    # ANN baselines (faiss IVF / HNSW) against exact search on clustered, anisotropic and on
    # isotropic synthetic keys of these sizes, and on the real embeddings above (empty:
    # skip; `make` sets 2e5: a faiss HNSW build of 1e6 keys takes many minutes here)
    ann_Ms: tuple = ()
    ann_queries: int = 256
    ann_clusters: int = 256
    cost_rounds: int = 9  # interleaved PlugLM / dense calls per cost-of-a-memory pair (at least)
    # ... and more while this much time per pair is not used up (at most 200): a B = 1 BERT-base
    # forward is ~0.12 s, and 9 calls of it left the ratio to dense within +-0.15 between runs
    # (1.07x in one, 1.24x in the next; 31 interleaved calls: 1.04x); None = budget_s
    cost_budget_s: float | None = 10.0
    cost_geometry: tuple = ()  # BertConfig overrides, e.g. (("hidden_size", 64), ...); () = base

    @classmethod
    def make(cls, max_m: int | None, work_dir: str) -> "LargeConfig":
        Ms = tuple(m for m in LARGE_MS if max_m is None or m <= max_m) or (int(max_m),)
        cost = tuple(m for m in (1_000_000, 10_000_000) if max_m is None or m <= max_m)
        ann = tuple(m for m in (200_000,) if max_m is None or m <= max_m) or (int(max_m),)
        return cls(Ms=Ms, work_dir=work_dir, cost_Ms=cost, ann_Ms=ann)


def measure_ceilings(nbytes: int = 1 << 30) -> dict:
    """This machine's memory read bandwidth (reductions over a ``nbytes`` float32 tensor, far
    larger than any cache), copy bandwidth, and float32 GEMM rate, measured now.

    The read ceiling is the best of three plain reads: ``sum``, one sum per thread over
    ``threads`` contiguous slices, and MKL's ``dot``. ``x.sum()`` alone under-reads on two
    threads (13 GB/s on the quiet 2-core Xeon while a float32 B=1 search streamed its keys at
    20 GB/s: 159% of "the ceiling"); the best of several probes is still a lower bound on the
    true bandwidth, so a percentage over 100 means the probe, not the search, fell short."""
    x = torch.ones(nbytes // 4)
    threads = max(1, torch.get_num_threads())
    sliced = x[: x.numel() // threads * threads].view(threads, -1)
    probes = (lambda: x.sum(), lambda: sliced.sum(1), lambda: torch.dot(x, x))
    best_ms = min(time_fn(f, "cpu", warmup=2, min_repeats=5, budget_s=1.0).median_ms
                  for f in probes)
    read_gbs = nbytes / (best_ms * 1e-3) / 1e9
    del x
    gc.collect()
    return {"read_gbs": round(read_gbs, 2), "copy_gbs": round(copy_bandwidth_gbs("cpu"), 2),
            "gemm_f32_gflops": round(gemm_rate(), 1)}


def gemm_rate(n: int = 2048, budget_s: float = 1.0) -> float:
    """float32 GEMM rate now, GFLOP/s: the median of ``n``^3 ``a @ b`` calls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_fn(lambda: a @ b, "cpu", warmup=2, min_repeats=5, budget_s=budget_s)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e9


def _compute_bound(M: int, d: int, B: int, key_bytes: float, ceil: dict) -> bool:
    return 2.0 * B * M * d / ceil["gemm_f32_gflops"] >= M * key_bytes / ceil["read_gbs"]


def _roofline(ms: float, M: int, d: int, B: int, key_bytes: float, ceil: dict,
              rounds: list | None = None) -> tuple[float, dict]:
    """Percent of the ceiling that bounds the case. ``rounds`` (compute-bound cases): per
    round (case ms, GEMM rate around it); the percent is then the median over rounds of the
    round's rate against the GEMM rate measured just before and after it. This host's speed
    moves by up to ~40% within minutes (other tenants), so a rate measured at the start of a
    12-minute run is not the rate a case ran beside (benchmarks/NOTES.md, issue 14: the same
    kernel at 0.67 of the run's probe, 0.86-0.94 of probes in the same minute)."""
    nbytes = M * key_bytes
    flops = 2.0 * B * M * d
    t_mem = nbytes / (ceil["read_gbs"] * 1e9)
    t_cmp = flops / (ceil["gemm_f32_gflops"] * 1e9)
    pct = 100.0 * max(t_mem, t_cmp) / (ms * 1e-3)
    ex = {"bound": "compute" if rounds or _compute_bound(M, d, B, key_bytes, ceil) else "memory",
          "achieved_gbs": round(nbytes / (ms * 1e-3) / 1e9, 2),
          "achieved_gflops": round(flops / (ms * 1e-3) / 1e9, 1)}
    if rounds:
        ex["pct_of_run_gemm"] = round(pct, 1)
        ex["rounds_ms_gemm"] = [[round(r_ms, 2), round(g, 1)] for r_ms, g in rounds]
        pct = statistics.median(100.0 * flops / (g * 1e9) / (r_ms * 1e-3) for r_ms, g in rounds)
    return pct, ex


def _measure_case(fn, budget_s: float, compute_bound: bool, rounds: int = 3):
    """``_measure(fn)``; a compute-bound case is timed in ``rounds`` rounds with the GEMM
    rate measured before, between and after them -> (timing of the median round, peak MB,
    [(round ms, mean GEMM rate around it)] or None)."""
    if not compute_bound:
        t, peak = _measure(fn, budget_s)
        return t, peak, None
    gemm = [gemm_rate(budget_s=0.3)]
    timed, peaks = [], []
    for _ in range(rounds):
        t, peak = _measure(fn, budget_s / 2)
        timed.append(t)
        peaks.append(peak)
        gemm.append(gemm_rate(budget_s=0.3))
    med = sorted(timed, key=lambda x: x.median_ms)[len(timed) // 2]
    peak = max((p for p in peaks if p is not None), default=None)
    return med, peak, [(t.median_ms, 0.5 * (gemm[i] + gemm[i + 1])) for i, t in enumerate(timed)]


def _measure(fn, budget_s: float):
    """``common.measure``, except that a call of over half a second is timed on its own
    calls after one warm-up (at M = 2e7, B = 256 one search takes tens of seconds here)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 < 0.5:
        return measure(fn, "cpu", budget_s)
    t = time_fn(fn, "cpu", warmup=0, min_repeats=2, max_repeats=2, budget_s=0)
    from .measure import PeakMemory

    with PeakMemory("cpu") as pm:
        fn()
    return t, (None if pm.peak_bytes is None else pm.peak_bytes / 2**20)


def _batch_sizes(cfg: LargeConfig, M: int) -> list[int]:
    limits = dict(cfg.B_limits)
    return [B for B in cfg.Bs if M <= limits.get(B, M)]


def _rss_kb() -> int:
    return proc_status_kb("VmRSS") or 0


def _chunks(M: int, cfg: LargeConfig, gen: torch.Generator):
    """Synthetic entries streamed to the builder: int16 token ids, int8 keys + scales."""
    for a in range(0, M, cfg.chunk):
        n = min(cfg.chunk, M - a)
        tok = torch.randint(0, cfg.vocab, (n, cfg.L), dtype=torch.int16, generator=gen)
        lengths = torch.full((n,), cfg.L, dtype=torch.int32)
        q, s = quantize_keys(torch.randn(n, cfg.d, generator=gen))
        yield {"token_ids": tok, "lengths": lengths, "keys": q, "key_scales": s}


def bench_memory_file(M: int, cfg: LargeConfig, ceil: dict, progress: bool) -> list[Row]:
    """Build, load (mapped) and search one int8 / int16 / no-values memory of M entries."""
    from ..memory import KnowledgeMemory, build_memory

    path = Path(cfg.work_dir) / f"large-{M}"
    gen = torch.Generator().manual_seed(M)
    t0 = time.perf_counter()
    build_memory(path, _chunks(M, cfg, gen), vocab_size=cfg.vocab, key_dtype=torch.int8,
                 store_values=False, total=M, progress=progress)
    build_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir())
    rows = []
    try:
        gc.collect()
        rss0 = _rss_kb()
        t0 = time.perf_counter()
        mem = KnowledgeMemory.load(path, verify=False)
        load_s = time.perf_counter() - t0
        added_mb = (_rss_kb() - rss0) / 1024
        shape = dict(M=M, d=cfg.d, L=cfg.L, dtype="int8", tokens="int16", values="none")
        extra = {"size_gb": round(size / 1e9, 3), "bytes_per_entry": round(size / M, 1),
                 "added_rss_mb": round(added_mb, 1), "build_s": round(build_s, 1)}
        rows.append(Row("memory load (mapped)", "KnowledgeMemory.load", shape, "cpu",
                        load_s * 1e3, load_s * 1e3, load_s * 1e3, 1, M / load_s, "entries/s",
                        added_mb, None, note="verify=False; RSS added by the load", extra=extra))
        q1 = torch.randn(1, cfg.d)
        t0 = time.perf_counter()
        mem.search(q1, cfg.k)  # first search: pages the mapped keys in
        first_ms = (time.perf_counter() - t0) * 1e3
        for B in _batch_sizes(cfg, M):
            q = torch.randn(B, cfg.d)
            t, peak, local = _measure_case(lambda: mem.search(q, cfg.k), cfg.budget_s,
                                           _compute_bound(M, cfg.d, B, cfg.d + 4, ceil))
            pct, ex = _roofline(t.median_ms, M, cfg.d, B, cfg.d + 4, ceil, local)
            ex["first_search_ms"] = round(first_ms, 1) if B == cfg.Bs[0] else None
            rows.append(Row("search (mapped memory)", "KnowledgeMemory.search", dict(
                M=M, d=cfg.d, B=B, k=cfg.k, dtype="int8"), "cpu", t.median_ms, t.p20_ms,
                t.p80_ms, t.repeats, B / (t.median_ms * 1e-3), "queries/s", peak, pct, extra=ex))
        del mem
    finally:
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
    return rows


def bench_search_dtypes(M: int, cfg: LargeConfig, ceil: dict, skip=(), log=print) -> list[Row]:
    """Exact search over in-memory key tables of each dtype (but those in ``skip``)."""
    from ..topk import exact_topk

    rows = []
    gen = torch.Generator().manual_seed(M + 1)
    for name in cfg.dtypes:
        if (name == "float32" and M > FLOAT32_MAX_M) or name in skip:
            continue
        dtype = getattr(torch, name)
        need = M * cfg.d * dtype.itemsize
        if need > mem_available() / 2:
            log(f"M={M} {name}: in-memory table of {need / 1e9:.1f} GB skipped "
                f"({mem_available() / 1e9:.1f} GB available on this shared machine)")
            continue
        # filled chunk by chunk: neither the float32 source nor a second copy ever exists whole
        keys = torch.empty(M, cfg.d, dtype=dtype)
        sc = torch.empty(M, dtype=torch.float32) if name == "int8" else None
        for a in range(0, M, cfg.chunk):
            k = torch.randn(min(cfg.chunk, M - a), cfg.d, generator=gen)
            if name == "int8":
                keys[a:a + k.shape[0]], sc[a:a + k.shape[0]] = quantize_keys(k)
            else:
                keys[a:a + k.shape[0]] = k
        key_bytes = keys.element_size() * cfg.d + (4 if sc is not None else 0)
        for B in _batch_sizes(cfg, M):
            q = torch.randn(B, cfg.d)
            fn = lambda: exact_topk(q, keys, cfg.k, key_scales=sc)  # noqa: E731
            t, peak, local = _measure_case(fn, cfg.budget_s, _compute_bound(M, cfg.d, B, key_bytes, ceil))
            pct, ex = _roofline(t.median_ms, M, cfg.d, B, key_bytes, ceil, local)
            rows.append(Row("search (large)", "pluglm mips_topk[auto]", dict(
                M=M, d=cfg.d, B=B, k=cfg.k, dtype=name), "cpu", t.median_ms, t.p20_ms, t.p80_ms,
                t.repeats, B / (t.median_ms * 1e-3), "queries/s", peak, pct, extra=ex))
        del keys, sc
        gc.collect()
    return rows


def bench_recall_real(cfg: LargeConfig, log=print, ann: bool = True) -> list[Row]:
    """Search quality of compact keys on real sentence embeddings: all-MiniLM-L6-v2 keys of
    Python's own documentation (``pluglm demo``'s corpus, ``recall_entries`` entries of at
    most 32 tokens), queried with the documented names (``json.dumps``, ...); recall@k of
    int8 / bfloat16 / float16 keys against float32 exact search; with ``ann``, the ANN
    baselines on the same float32 keys and queries (``bench_ann``, keys="real")."""
    from ..cli.demo import corpus
    from ..encoders import EncoderUnavailable, SentenceEncoder
    from ..memory import KnowledgeMemory

    try:
        enc = SentenceEncoder.minilm()
    except EncoderUnavailable as e:
        log(f"int8 recall on real embeddings skipped: {e}")
        return []
    docs = [d for cat in corpus().values() for d in cat]
    names = [src.split(":", 1)[-1] for src, _ in docs]
    texts = [text for _, text in docs]
    mem = KnowledgeMemory.from_texts(texts, enc.tokenizer, max_length=32)
    if len(mem) > cfg.recall_entries:
        mem.remove(torch.arange(cfg.recall_entries, len(mem)))
        mem.compact()
    t0 = time.perf_counter()
    mem.encode(enc, batch_size=64, progress=False)
    enc_s = time.perf_counter() - t0
    queries = enc.encode_queries(names[:256])
    M, B = len(mem), queries.shape[0]
    rows = []
    for k in (5, 10):
        _, exact = mem.search(queries, k)
        for name in ("int8", "bfloat16", "float16"):
            other = mem.with_layout(key_dtype=getattr(torch, name))
            t, peak = _measure(lambda: other.search(queries, k), 0.2)
            _, found = other.search(queries, k)
            hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
            rows.append(Row("recall vs float32 (real embeddings)", f"pluglm {name} keys", dict(
                M=M, d=mem.key_dim, B=B, k=k, dtype=name), "cpu", t.median_ms, t.p20_ms,
                t.p80_ms, t.repeats, B / (t.median_ms * 1e-3), "queries/s", peak, None,
                note="all-MiniLM-L6-v2 keys of Python's documentation",
                extra={"recall_at_k": round(hits / exact.numel(), 4),
                       "encode_s": round(enc_s, 1)}))
    if ann:
        rows += bench_ann(mem.snapshot().float_keys(), queries, "real", cfg, log)
    return rows


def clustered_keys(M: int, d: int, n_queries: int, *, clusters: int = 256, seed: int = 0,
                   chunk: int = 250_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered, anisotropic synthetic keys [M, d] float32 and queries [n_queries, d] near
    them: a Gaussian mixture of ``clusters`` centres of unequal sizes, the centres and the
    within-cluster noise both drawn with a decaying spectrum (standard deviation of
    principal direction i proportional to (i + 1)^-0.75), rotated by one random orthogonal
    matrix; each query is a random key plus noise of a quarter of the within-cluster spread.
    Sentence embeddings look like this (a few hundred topics, most variance in a few
    directions), isotropic random keys do not: on those no index can do better than chance."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    spec = torch.arange(1, d + 1, dtype=torch.float32) ** -0.75
    centres = torch.randn(clusters, d, generator=g) * spec * 2.0
    sizes = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float32) ** 0.5
    keys = torch.empty(M, d)
    for a in range(0, M, chunk):
        n = min(chunk, M - a)
        which = torch.multinomial(sizes, n, replacement=True, generator=g)
        keys[a:a + n] = (centres[which] + torch.randn(n, d, generator=g) * spec * 0.5) @ rot.T
    pick = torch.randint(0, M, (n_queries,), generator=g)
    queries = keys[pick] + (torch.randn(n_queries, d, generator=g) * spec * 0.125) @ rot.T
    return keys, queries


# (label, kind, search-time parameter): two operating points per index
ANN_IMPLS = (("faiss.IVFFlat(nprobe=16)", "ivf", 16), ("faiss.IVFFlat(nprobe=64)", "ivf", 64),
             ("faiss.HNSW32(ef=64)", "hnsw", 64), ("faiss.HNSW32(ef=256)", "hnsw", 256))


def _build_ann(kind: str, x, faiss):
    """(index, build seconds): IVF-Flat with ~4 sqrt(M) lists (at least 39 training rows
    each), trained on <= 40 rows per list; HNSW with 32 links, efConstruction 40. Inner
    product throughout (the quick sweep's baselines, pluglm.bench.sweep)."""
    M, d = x.shape
    t0 = time.perf_counter()
    if kind == "ivf":
        nlist = max(1, min(max(16, int(4 * M ** 0.5)), M // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x[torch.randperm(M)[: min(M, 40 * nlist)].numpy()])
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
    index.add(x)
    return index, time.perf_counter() - t0


def bench_ann(keys: torch.Tensor, queries: torch.Tensor, dist: str, cfg: LargeConfig,
              log=print) -> list[Row]:
    """faiss IVF / HNSW against our exact search on keys [M, d] float32: recall@5 and @10
    over all ``queries`` (against exact top-k), and single-query (B = 1) latency of each
    index and of ``pluglm_kernels.mips_topk``, medians over the queries taken in turn."""
    from ..topk import exact_topk

    try:
        import faiss
    except ImportError:
        log(f"ANN baselines on {dist} keys skipped: faiss is not installed")
        return []
    keys = keys.float().contiguous()
    queries = queries.float().contiguous()
    M, d = keys.shape
    nq = queries.shape[0]
    x, qn = keys.numpy(), queries.numpy()
    exact = {k: exact_topk(queries, keys, k)[1] for k in (5, 10)}
    rows: list[Row] = []

    def single(search):
        it = iter(range(1 << 62))
        return lambda: search(next(it) % nq)

    def add(label, k, search_one, search_all, build_s=None):
        t, peak = _measure(single(search_one), min(cfg.budget_s, 1.0))
        t_all = time_fn(search_all, "cpu", warmup=0, min_repeats=1, max_repeats=1, budget_s=0)
        found = torch.as_tensor(search_all())
        hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact[k]))
        extra = {"recall_at_k": round(hits / exact[k].numel(), 4), "recall_queries": nq,
                 "keys": dist, f"batch_{nq}_ms": round(t_all.median_ms, 2)}
        if build_s is not None:
            extra["build_s"] = round(build_s, 1)
        rows.append(Row("ANN vs exact search", label, dict(M=M, d=d, B=1, k=k, dtype="float32",
                        keys=dist), "cpu", t.median_ms, t.p20_ms, t.p80_ms, t.repeats,
                        1.0 / (t.median_ms * 1e-3), "queries/s", peak, None, extra=extra))
        log(f"ANN {dist:10s} M={M} k={k} {label:26s} recall {extra['recall_at_k']:.3f} "
            f"B=1 {t.median_ms:.3f} ms")

    for k in (5, 10):
        add("pluglm mips_topk (exact)", k,
            lambda i, k=k: exact_topk(queries[i:i + 1], keys, k),
            lambda k=k: exact_topk(queries, keys, k)[1])
    built: dict = {}
    for label, kind, param in ANN_IMPLS:
        if kind not in built:
            built[kind] = _build_ann(kind, x, faiss)
        index, build_s = built[kind]
        if kind == "ivf":
            index.nprobe = param
        else:
            index.hnsw.efSearch = param
        for k in (5, 10):
            if kind == "hnsw":
                index.hnsw.efSearch = max(param, k)
            add(label, k, lambda i, k=k, ix=index: ix.search(qn[i:i + 1], k),
                lambda k=k, ix=index: ix.search(qn, k)[1], build_s)
    del built
    gc.collect()
    return rows


def synthetic_memory(M: int, key_dim: int, *, L: int = 128, vocab: int = 30522,
                     key_dtype=torch.int8, value_dim: int | None = None, seed: int = 0):
    """An encoded in-memory KnowledgeMemory of M synthetic entries (random int16 token ids of
    L tokens, random keys in ``key_dtype``, values [M, value_dim] float32 or none), built
    without a tokenizer (the tables are made directly)."""
    import numpy as np

    from ..memory import KnowledgeMemory, MemorySnapshot, TableLayout, TextTable

    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (M, L), dtype=torch.int16, generator=gen)
    keys = torch.empty(M, key_dim, dtype=key_dtype)
    scales = torch.empty(M, dtype=torch.float32) if key_dtype == torch.int8 else None
    for a in range(0, M, 500_000):
        k = torch.randn(min(500_000, M - a), key_dim, generator=gen)
        if key_dtype == torch.int8:
            keys[a:a + k.shape[0]], scales[a:a + k.shape[0]] = quantize_keys(k)
        else:
            keys[a:a + k.shape[0]] = k
    values = None if value_dim is None else torch.randn(M, value_dim, generator=gen)
    snap = MemorySnapshot(
        token_ids=tok, lengths=torch.full((M,), L, dtype=torch.int32), keys=keys,
        key_scales=scales, values=values,
        valid=torch.ones(M, dtype=torch.bool), stale=torch.zeros(M, dtype=torch.bool),
        finite=torch.ones(M, dtype=torch.bool), source_index=torch.zeros(M, dtype=torch.int32),
        sources=["synthetic"], texts=TextTable(b"", np.zeros(M + 1, dtype=np.int64)),
        rev=torch.arange(M), version=0, vocab_size=vocab, tokenizer_name="synthetic",
        pad_token_id=0, max_length=L,
        layout=TableLayout(key_dtype, None, value_dim is not None))
    return KnowledgeMemory(snap)


def cost_models(geometry: dict | None = None, device="cpu", dtype=torch.float32):
    """(dense BertModel, PlugLMModel) in BERT-base geometry (``geometry`` overrides
    BertConfig fields, e.g. a tiny model for tests), eval mode, no pooler, same seed; the
    PlugLM model's top FFN block is a memory layer reading 128-token entries."""
    from transformers import BertConfig, BertModel

    from ..configuration_pluglm import PlugLMConfig
    from ..modeling_pluglm import PlugLMModel

    g = dict(geometry or {})
    torch.manual_seed(0)
    dense = BertModel(BertConfig(**g), add_pooling_layer=False).eval()
    hidden = g.get("hidden_size", 768)
    plug = PlugLMModel(PlugLMConfig(doc_max_length=128, memory_ffn_dim=hidden, **g),
                       add_pooling_layer=False).eval()
    return dense.to(device, dtype), plug.to(device, dtype)


def cost_pair_rows(dense, plug, mem, B: int, T: int, *, device="cpu", rounds: int = 9,
                   budget_s: float = 0.0, dense_rows: bool = True, shape_extra=None,
                   kind: str = "", log=print) -> list[Row]:
    """The cost of a memory at batch B: the PlugLM forward timed in alternation with the
    dense forward, and its memory layer in alternation with the dense FFN sublayer it
    replaces (``measure.time_interleaved``: same calls, same minutes, medians), so each
    PlugLM row's ``extra.ratio_to_dense`` is a ratio of two medians of one interleaved
    run. ``dense_rows``: also a row per dense case (its median from the same run)."""
    from .measure import PeakMemory, time_interleaved

    dev = torch.device(device)
    dtype = next(plug.parameters()).dtype
    hidden = dense.config.hidden_size
    ids = torch.randint(1000, min(30000, dense.config.vocab_size), (B, T), device=dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    h = torch.randn(B, T, hidden, device=dev, dtype=dtype)
    ffn = dense.encoder.layer[-1]
    layer = plug.memory_layers()[0]
    plug.set_memory(mem)
    reading = plug._reading_memory(mem)

    @torch.no_grad()
    def fd():
        dense(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def ff():  # the FFN sublayer the memory layer replaces: W2 gelu(W1 h) + LayerNorm
        ffn.output(ffn.intermediate(h), h)

    @torch.no_grad()
    def fp():
        plug(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def fl():
        layer(h, mask, reading)

    def peak(fn):
        with PeakMemory(dev) as pm:
            fn()
        return None if pm.peak_bytes is None else pm.peak_bytes / 2**20

    rows: list[Row] = []
    base = dict(B=B, T=T, **(shape_extra or {}))
    for (name, fn), (dname, dfn), dshape in (
            (("PlugLM forward (BERT-base)", fp), ("dense BERT-base forward", fd), dict(B=B, T=T)),
            (("memory layer", fl), ("dense FFN sublayer", ff),
             dict(B=B, T=T, d=hidden, d_ff=dense.config.intermediate_size))):
        tp, td = time_interleaved([fn, dfn], dev, rounds=rounds, warmup=1, budget_s=budget_s)
        ratio = tp.median_ms / td.median_ms
        for lbl, t, shape, f, ex in (
                (f"pluglm {name}: {kind}", tp, base, fn,
                 {"ratio_to_dense": round(ratio, 4), "dense_median_ms": round(td.median_ms, 6),
                  "timing": f"interleaved with {dname}, {tp.repeats} calls each"}),
                (f"transformers BertModel: {dname}", td, dshape, dfn,
                 {"timing": f"interleaved with the {name} row, {td.repeats} calls each"})):
            if lbl.startswith("transformers") and not dense_rows:
                continue
            rows.append(Row("cost of a memory", lbl, dict(shape), str(dev.type), t.median_ms,
                            t.p20_ms, t.p80_ms, t.repeats, B * T / (t.median_ms * 1e-3),
                            "tokens/s", peak(f), extra=ex))
        log(f"{name:28s} {base} {kind}: {tp.median_ms:.1f} ms vs {dname} {td.median_ms:.1f} ms "
            f"= {ratio:.2f}x ({tp.repeats} interleaved calls each)")
    plug.set_memory(None)
    return rows


def bench_cost_of_memory(cfg: LargeConfig, log=print) -> list[Row]:
    """What a memory costs per forward pass: a PlugLM forward in BERT-base geometry (12 layers,
    d = 768, the top FFN block a memory layer, T = 128) against the dense BERT-base forward
    (transformers ``BertModel``, same geometry, every layer an FFN), and one memory layer
    against the dense FFN it replaces, each pair timed interleaved (``cost_pair_rows``);
    each PlugLM row carries ``extra.ratio_to_dense``. The dense rows come from the pair of
    the first memory kind at each B."""
    geometry = dict(cfg.cost_geometry)
    dense, plug = cost_models(geometry)
    hidden = dense.config.hidden_size
    key_dim = plug.config.key_dim
    rows: list[Row] = []
    T = 128
    first = True
    for M in cfg.cost_Ms:
        for kdt, values in ((torch.int8, False), (torch.float32, False), (torch.float32, True)):
            need = M * (key_dim * kdt.itemsize + 128 * 2 + (hidden * 4 if values else 0))
            if need > mem_available() / 2:
                log(f"cost of a memory, M={M}, {kdt} keys, values {values}: {need / 1e9:.1f} GB "
                    f"of tables skipped ({mem_available() / 1e9:.1f} GB available)")
                continue
            mem = synthetic_memory(M, key_dim, key_dtype=kdt, vocab=dense.config.vocab_size,
                                   value_dim=hidden if values else None)
            dname = str(kdt).replace("torch.", "")
            kind = f"{dname} keys, " + ("stored values" if values else "values on demand")
            for B in cfg.cost_Bs:
                budget = cfg.budget_s if cfg.cost_budget_s is None else cfg.cost_budget_s
                rows += cost_pair_rows(
                    dense, plug, mem, B, T, rounds=cfg.cost_rounds, budget_s=budget,
                    dense_rows=first, kind=kind, log=log,
                    shape_extra=dict(M=M, dtype=dname, values="stored" if values else "on demand"))
            first = False
            del mem
            gc.collect()
    return rows


def run_large(cfg: LargeConfig, show_progress: bool = True, log=print, partial=None) -> dict:
    """Every case of the large sweep; returns {"machine", "config", "ceilings", "rows"}."""
    torch.manual_seed(0)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cfg.work_dir).free
    ceil = measure_ceilings(cfg.ceiling_bytes)
    log(f"ceilings: {ceil}")
    rows: list[Row] = []
    for M in cfg.Ms:
        need = M * (cfg.L * 2 + cfg.d + 16) * 2.1  # raw files + assembled file
        skip = ()
        if need < free:
            rows += bench_memory_file(M, cfg, ceil, show_progress)
            skip = ("int8",)  # the mapped memory's search rows are the int8 case
        else:
            log(f"M={M}: skipping the memory file ({need / 1e9:.1f} GB needed, "
                f"{free / 1e9:.1f} GB free in {cfg.work_dir})")
        rows += bench_search_dtypes(M, cfg, ceil, skip, log)
        if partial is not None:  # a long run keeps what it measured so far
            partial({"machine": machine_info("cpu"), "config": asdict(cfg), "ceilings": ceil,
                     "rows": [asdict(r) for r in rows]})
        for r in rows:
            if r.shape.get("M") == M:
                log(f"{r.bench:24s} {r.impl:24s} {r.shape} {r.median_ms:10.2f} ms "
                    f"pct={None if r.pct_roofline is None else round(r.pct_roofline, 1)} "
                    f"peak_mb={r.peak_mb}")
    if cfg.recall_entries:
        rows += bench_recall_real(cfg, log, ann=bool(cfg.ann_Ms))
    for M in cfg.ann_Ms:
        keys, queries = clustered_keys(M, cfg.d, cfg.ann_queries, clusters=cfg.ann_clusters)
        rows += bench_ann(keys, queries, "clustered", cfg, log)
        gen = torch.Generator().manual_seed(M + 2)
        keys, queries = torch.randn(M, cfg.d, generator=gen), torch.randn(cfg.ann_queries, cfg.d,
                                                                          generator=gen)
        rows += bench_ann(keys, queries, "isotropic", cfg, log)
        del keys, queries
        gc.collect()
    if cfg.cost_Ms:
        rows += bench_cost_of_memory(cfg, log)
    for r in rows[-40:]:
        if r.bench != "search (large)" and r.bench not in ("memory load (mapped)",
                                                           "search (mapped memory)"):
            log(f"{r.bench:24s} {r.impl:40s} {r.shape} {r.median_ms:10.2f} ms {r.extra}")
    info = machine_info("cpu")
    info["peak_rss_mb"] = round((proc_status_kb("VmHWM") or 0) / 1024, 1)
    info["note"] = os.environ.get("PLUGLM_BENCH_NOTE", "")
    return {"machine": info, "config": asdict(cfg), "ceilings": ceil,
            "rows": [asdict(r) for r in rows]}


__all__ = ["LargeConfig", "bench_ann", "clustered_keys", "measure_ceilings", "run_large"]
