"""The sweep: each case times our op and every baseline on the same inputs in one run.

Cases (``--quick`` keeps the scaling trend with fewer points):
- search: ``mips_topk`` vs ``torch.topk(q @ K.T, k)`` vs faiss Flat / IVF / HNSW (with
  recall@k against our exact result) over M;
- attention: ``knowledge_attention`` vs the eager reference, ``torch.compile`` of it and the
  published formulation (separate bmm, additive bias, softmax, bmm), forward and
  forward + backward;
- gather + attention, one memory layer, a full PlugLM forward (``model_bench``);
- the key refresh: synchronous, asynchronous and the published file round trip, and the
  training-step time while refreshing (``refresh_bench``).
"""
from __future__ import annotations

import gc
import math
from dataclasses import asdict

import torch

import pluglm_kernels as pk

from . import model_bench, refresh_bench
from .common import Row, SweepConfig, machine_info, measure, mem_available, published_attention
from .measure import copy_bandwidth_gbs


def _search_impls(device: str, faiss_ok: bool, M: int, quick: bool):
    impls = []
    dev = torch.device(device)
    for be in ("cuda", "triton", "cpu"):
        if pk.availability("mips_topk", be, dev.type)[0]:
            impls.append((f"pluglm[{be}]", be))
    if not impls:
        impls.append(("pluglm[reference]", "reference"))
    impls.append(("torch.topk(q@K.T)", "torch"))
    if faiss_ok and dev.type == "cpu" and _have_faiss():
        impls.append(("faiss.IndexFlatIP", "faiss-flat"))
        # approximate indexes: their build cost grows fast, so the quick sweep stops earlier
        if M <= (100_000 if quick else 4_000_000):
            impls.append(("faiss.IVFFlat(nprobe=16)", "faiss-ivf"))
        if M <= (100_000 if quick else 1_000_000):
            impls.append(("faiss.HNSW32(ef=64)", "faiss-hnsw"))
    return impls


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _build_faiss(kind: str, keys: torch.Tensor):
    """(index, build seconds). Inner-product metric throughout."""
    import time

    import faiss

    x = keys.float().contiguous().numpy()
    M, d = x.shape
    t0 = time.perf_counter()
    if kind == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "faiss-ivf":
        nlist = max(16, int(4 * M ** 0.5))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = x[torch.randperm(M)[: min(M, 40 * nlist)].numpy()]
        index.train(train)
        index.nprobe = 16
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = 64
    index.add(x)
    return index, time.perf_counter() - t0


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / exact.numel()


def bench_search(cfg: SweepConfig, progress=None, task=None) -> list[Row]:
    rows: list[Row] = []
    dev = torch.device(cfg.device)
    bw = copy_bandwidth_gbs(dev) if dev.type == "cuda" else None
    for dtype_name in cfg.search_dtypes:
        dtype = getattr(torch, dtype_name)
        for d in cfg.search_d:
            for M in cfg.search_M:
                if M * d * dtype.itemsize > _memory_budget(dev) / 3:
                    continue
                keys = torch.randn(M, d, device=dev).to(dtype)
                indexes: dict = {}
                for B in cfg.search_B:
                    for k in cfg.search_k:
                        q = torch.randn(B, d, device=dev).to(dtype)
                        exact = None
                        for label, impl in _search_impls(cfg.device, dtype == torch.float32, M, cfg.quick):
                            extra = {}
                            if impl.startswith("faiss"):
                                if impl not in indexes:
                                    indexes[impl] = _build_faiss(impl, keys)
                                index, build_s = indexes[impl]
                                extra["build_s"] = round(build_s, 3)
                            else:
                                index = None
                            fn = _search_fn(impl, q, keys, k, index)
                            t, peak = measure(fn, dev, cfg.budget_s)
                            found = _indices_of(impl, fn())
                            if exact is None:  # the first implementation is our exact search
                                exact = found
                            extra["recall_at_k"] = round(_recall(found, exact), 4)
                            pct = None
                            if bw is not None:
                                pct = 100.0 * (M * d * dtype.itemsize / (t.median_ms * 1e-3) / 1e9) / bw
                            rows.append(Row("search", label, dict(M=M, d=d, B=B, k=k, dtype=dtype_name),
                                            cfg.device, t.median_ms, t.p20_ms, t.p80_ms, t.repeats,
                                            B / (t.median_ms * 1e-3), "queries/s", peak, pct,
                                            extra=extra))
                            if progress is not None:
                                progress.advance(task)
                del keys, indexes
                gc.collect()
    return rows


def _indices_of(impl: str, result) -> torch.Tensor:
    if impl.startswith("faiss"):
        return torch.from_numpy(result[1])
    if impl == "torch":
        return result.indices.cpu()
    return result[1].cpu()


def _memory_budget(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return mem_available()


def _search_fn(impl, q, keys, k, index):
    if impl == "torch":
        return lambda: torch.topk(q @ keys.T, k, dim=1)
    if impl.startswith("faiss"):
        qn = q.float().numpy()
        return lambda: index.search(qn, k)
    return lambda: pk.mips_topk(q, keys, k, backend=impl)


_COMPILED = None


def _compiled_reference():
    """torch.compile of the eager reference, compiled once per process (dynamic shapes)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(lambda *a: pk.reference.knowledge_attention(*a)[0], dynamic=True)
    return _COMPILED


def bench_attention(cfg: SweepConfig, progress=None, task=None) -> list[Row]:
    rows: list[Row] = []
    dev = torch.device(cfg.device)
    H, Dh = cfg.heads, cfg.head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for B, T, N in cfg.attn_shapes:
        q = torch.randn(B, T, H, Dh, device=dev, dtype=dtype) / math.sqrt(Dh)
        k = torch.randn(B, N, H, Dh, device=dev, dtype=dtype)
        v = torch.randn(B, N, H, Dh, device=dev, dtype=dtype)
        bias = torch.rand(B, N, device=dev) * 2 - 1
        beta = torch.ones(H, device=dev)
        impls = {
            "pluglm[auto]": lambda *a: pk.knowledge_attention(*a),
            "eager reference": lambda *a: pk.reference.knowledge_attention(*a)[0],
            "torch.compile(reference)": _compiled_reference(),
            "published (bmm+softmax)": published_attention,
        }
        for mode in ("forward", "forward+backward"):
            for label, f in impls.items():
                if mode == "forward":
                    def fn(f=f):
                        with torch.no_grad():
                            f(q, k, v, bias, beta)
                else:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias, beta)]

                    def fn(f=f, leaves=leaves):
                        f(*leaves).float().sum().backward()
                t, peak = measure(fn, dev, cfg.budget_s)
                nbytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()
                pct = None
                if dev.type == "cuda" and mode == "forward":
                    pct = 100.0 * nbytes / (t.median_ms * 1e-3) / 1e9 / copy_bandwidth_gbs(dev)
                rows.append(Row(f"attention {mode}", label,
                                dict(B=B, T=T, N=N, H=H, Dh=Dh, dtype=str(dtype).replace("torch.", "")),
                                cfg.device, t.median_ms, t.p20_ms, t.p80_ms, t.repeats,
                                B * T / (t.median_ms * 1e-3), "tokens/s", peak, pct))
                if progress is not None:
                    progress.advance(task)
    return rows


def count_cases(cfg: SweepConfig) -> int:
    n_search = 0
    dev = torch.device(cfg.device)
    for dtype_name in cfg.search_dtypes:
        for d in cfg.search_d:
            for M in cfg.search_M:
                if M * d * getattr(torch, dtype_name).itemsize <= _memory_budget(dev) / 3:
                    n_impl = len(_search_impls(cfg.device, dtype_name == "float32", M, cfg.quick))
                    n_search += n_impl * len(cfg.search_B) * len(cfg.search_k)
    return n_search + len(cfg.attn_shapes) * 2 * 4


def run_sweep(cfg: SweepConfig, show_progress: bool = True) -> dict:
    """Run every case; returns {"machine": ..., "config": ..., "rows": [...]}."""
    from rich.progress import Progress

    torch.manual_seed(0)
    total = (count_cases(cfg) + 2 * len(cfg.attn_shapes)
             + 2 * len(model_bench.memory_layer_sizes(cfg)) + 2 * len(model_bench.model_sizes(cfg))
             + refresh_bench.count_cases(cfg))
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("pluglm bench", total=total)
        rows = (bench_search(cfg, progress, task) + bench_attention(cfg, progress, task)
                + model_bench.bench_gather_attention(cfg, progress, task)
                + model_bench.bench_memory_layer(cfg, progress, task)
                + model_bench.bench_model_forward(cfg, progress, task)
                + refresh_bench.bench_refresh(cfg, progress, task))
    return {"machine": machine_info(cfg.device), "config": asdict(cfg),
            "rows": [asdict(r) for r in rows]}
