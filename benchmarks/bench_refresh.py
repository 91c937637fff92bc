"""Full key refresh: training-step time without / with a synchronous / with the asynchronous
refresh, and refresh throughput (entries/s) against M, side by side with the published path.

Compared (helpers in ``pluglm.bench.refresh_bench``, shared with ``pluglm bench``):
  step-none     a PlugLM masked-LM training step (stale-key search, re-encode of the
                retrieved entries, backward, AdamW), no refresh
  step-sync     the same with ``KnowledgeMemory.encode`` every ``interval`` steps (blocking)
  step-async    the same with ``AsyncKeyRefresher`` (one refresh, started at the first step;
                rounds continue until it is swapped in); extra_info: steps done during it
  refresh-sync       KnowledgeMemory.encode of all M entries
  refresh-async      AsyncKeyRefresher.refresh_now(block=True) with nothing else running
  refresh-published  eager unfused encode -> host numpy -> np.save -> np.load -> device
Model: small PlugLM on CPU (d=64, 2 layers, documents of <= 32 tokens); BERT-base geometry
with documents of 288 tokens on GPUs. Default: M in {2e3, 1e4} on CPU (1e5 on GPU), a
few minutes at most; PLUGLM_BENCH_FULL=1: M in {1e4, 3e4, 1e5} on CPU (1e5, 1e6 on GPU)
with a bigger CPU model.

    python -m pytest benchmarks/bench_refresh.py --benchmark-columns=median,mean,rounds
"""
from __future__ import annotations

import os
import statistics
import tempfile

import pytest
import torch

from pluglm.bench import refresh_bench as rb

FULL = os.environ.get("PLUGLM_BENCH_FULL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Cfg:
    device = DEVICE
    quick = not FULL
    budget_s = 1.0


S = rb.settings(_Cfg)
_cache: dict = {}


def _model():
    if "model" not in _cache:
        torch.manual_seed(0)
        _cache["model"] = rb.build_model(S, DEVICE)
    return _cache["model"]


def _memory(M):
    """An encoded random memory of M entries, cached (one at a time)."""
    if _cache.get("M") != M:
        _cache.pop("mem", None)
        mem = rb.random_memory(M, S["doc_len"], S["vocab"], DEVICE)
        rb.sync_refresh(_model(), mem, S["chunk"])
        _cache.update(M=M, mem=mem)
    return _cache["mem"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _info(benchmark, **kw):
    data = benchmark.stats.stats.data
    qs = statistics.quantiles(data, n=10) if len(data) >= 2 else [data[0]] * 9
    benchmark.extra_info.update({
        "device": DEVICE, "device_name": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_ms": statistics.median(data) * 1e3, "mean_ms": statistics.fmean(data) * 1e3,
        "p20_ms": qs[1] * 1e3, "p80_ms": qs[7] * 1e3, **S, **kw})


@pytest.mark.parametrize("M", S["M"], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("impl", ["sync", "async", "published"])
def test_refresh_throughput(benchmark, impl, M):
    benchmark.group = f"refresh M={M} L={S['doc_len']} d={S['hidden']}"
    model, mem = _model(), _memory(M)
    if impl == "sync":
        def call():
            rb.sync_refresh(model, mem, S["chunk"])
            _sync()
    elif impl == "async":
        from pluglm.refresh import AsyncKeyRefresher

        refresher = AsyncKeyRefresher(model, mem, interval=0, chunk=S["chunk"])

        def call():
            refresher.refresh_now(block=True)
            _sync()
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="pluglm-bench-"), "keys.npy")

        def call():
            rb.published_refresh(model, mem, S["chunk"], path)
            _sync()
    rounds = 3 if FULL or M > 5_000 else 5
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    med = statistics.median(benchmark.stats.stats.data)
    _info(benchmark, impl=impl, M=M, entries_per_s=M / med)
    if impl == "async":
        refresher.close()
        benchmark.extra_info["last_duration_s"] = refresher.last_duration_s


@pytest.mark.parametrize("mode", ["none", "sync", "async"])
def test_train_step(benchmark, mode):
    """One round = one training step (+ the refresh hook). The refresh's cost shows in the
    mean (sync: one blocking refresh per ``interval`` rounds)."""
    from pluglm.refresh import AsyncKeyRefresher

    M, interval = S["train_M"], S["interval"]
    model, mem = _model(), _memory(M)
    model.set_memory(mem)
    trainer = rb.Trainer(model, S, DEVICE)
    for _ in range(3):
        trainer.step()
    benchmark.group = f"train step M={M} B,T={S['batch']} interval={interval}"
    state = {"i": 0, "swap_step": None, "base": 0}
    refresher = AsyncKeyRefresher(model, mem, interval=0, chunk=S["chunk"]) if mode == "async" else None

    def call():
        state["i"] += 1
        i = state["i"]
        trainer.step()
        if mode == "sync" and i % interval == 0:
            rb.sync_refresh(model, mem, S["chunk"])
        elif mode == "async":
            if i == 1:
                refresher.refresh_now()
            refresher.step(i)
            if refresher.refreshes > state["base"] and state["swap_step"] is None:
                state["swap_step"] = i
        _sync()

    rounds = interval
    if mode == "async":
        # a dry run sizes the rounds so the timed run covers the whole refresh
        call()
        while refresher.running:
            call()
        rounds = max(interval, 2 * state["i"])
        state.update(i=0, swap_step=None, base=refresher.refreshes)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    extra = {"mode": mode, "M": M}
    if mode == "async":
        refresher.wait()
        refresher.close()
        extra.update(steps_during_refresh=(state["swap_step"] or rounds) - 1,
                     refresh_s=refresher.last_duration_s, refreshes=refresher.refreshes)
    _info(benchmark, **extra)
    model.set_memory(None)
