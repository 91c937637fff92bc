"""Key refresh cases of the sweep (issue 6): what a full re-encode of the memory costs.

Rows:
- ``refresh`` (entries/s against M): ``KnowledgeMemory.encode`` (synchronous, our fused
  encoder), ``AsyncKeyRefresher`` with nothing else running (``refresh_now(block=True)``:
  the weight copy, the chunked encode into the shadow table and the swap), and the
  published path: an eager, unfused encode (``pluglm_kernels.reference.encode_knowledge`` +
  W_k), keys copied to the host as numpy, ``np.save`` to a file, ``np.load`` back and copied
  to the device.
- ``train step`` (one memory size): the step time of a PlugLM masked-LM training step
  (stale-key search + re-encode of the retrieved entries + backward + AdamW) with no
  refresh, with a synchronous refresh every ``interval`` steps (its cost spread over the
  interval), and with the asynchronous refresher; ``extra`` holds the mean step time, the
  overhead against no refresh, and the steps done while the asynchronous refresh ran.

The model is a PlugLM (BERT-base geometry on GPUs, documents of 288 tokens; a small one on
CPUs) with random weights and a memory of random token ids: the refresh cost does not
depend on what the tokens mean. Settings come from ``SweepConfig`` fields when present
(``refresh_M``, ``refresh_doc_len``, ``refresh_hidden``, ``refresh_layers``,
``refresh_chunk``, ``refresh_interval``, ``refresh_batch``), else from the defaults below.
"""
from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import pluglm_kernels as pk

from .measure import PeakMemory, time_fn
from .common import Row


def settings(cfg) -> dict:
    """The refresh bench's sizes for ``cfg`` (device, quick), overridable by cfg fields."""
    gpu = str(cfg.device).startswith("cuda")
    if gpu:
        s = dict(M=(100_000, 1_000_000), doc_len=288, hidden=768, layers=12, heads=12,
                 vocab=30522, key_dim=128, chunk=4096, interval=200, batch=(32, 128),
                 train_M=1_000_000)
        if cfg.quick:
            s.update(M=(100_000,), train_M=100_000, interval=50)
    else:
        s = dict(M=(10_000, 30_000, 100_000), doc_len=64, hidden=128, layers=2, heads=4,
                 vocab=4000, key_dim=64, chunk=2048, interval=40, batch=(8, 64), train_M=30_000)
        if cfg.quick:
            s.update(M=(2_000, 10_000), doc_len=32, hidden=64, vocab=1000, key_dim=32,
                     chunk=1024, interval=20, batch=(8, 32), train_M=10_000)
    for name in ("M", "doc_len", "hidden", "layers", "chunk", "interval", "batch"):
        v = getattr(cfg, f"refresh_{name}", None)
        if v:
            s[name] = tuple(v) if isinstance(v, (list, tuple)) else v
    s["train_M"] = min(s["train_M"], max(s["M"]))
    return s


def count_cases(cfg) -> int:
    return 3 * len(settings(cfg)["M"]) + 3


# ------------------------------------------------------------------------------ set-up


def random_memory(M: int, L: int, vocab: int, device, min_len: int | None = None):
    """A KnowledgeMemory of M entries of random token ids, lengths uniform in [L/2, L]."""
    from pluglm.memory import KnowledgeMemory, MemorySnapshot

    dev = torch.device(device)
    lo = max(2, L // 2) if min_len is None else min_len
    lengths = torch.randint(lo, L + 1, (M,), dtype=torch.int32)
    ids = torch.randint(5, vocab, (M, L), dtype=torch.int32)
    ids.masked_fill_(torch.arange(L)[None] >= lengths[:, None], 0)
    tdt = torch.int16 if vocab <= 2**15 else torch.int32
    ones = torch.ones(M, dtype=torch.bool, device=dev)
    snap = MemorySnapshot(
        token_ids=ids.to(tdt).to(dev), lengths=lengths.to(dev), keys=None, values=None,
        valid=ones, stale=ones.clone(), finite=ones.clone(),
        source_index=torch.zeros(M, dtype=torch.int32), sources=["bench"], texts=("",) * M,
        rev=torch.arange(M, dtype=torch.int64), version=0, vocab_size=vocab,
        tokenizer_name="random", pad_token_id=0, max_length=L)
    return KnowledgeMemory(snap)


def build_model(s: dict, device):
    from pluglm.configuration_pluglm import PlugLMConfig
    from pluglm.modeling_pluglm import PlugLMForMaskedLM

    d = s["hidden"]
    cfg = PlugLMConfig(vocab_size=s["vocab"], hidden_size=d, num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], intermediate_size=4 * d,
                       max_position_embeddings=max(512, s["doc_len"], s["batch"][1]),
                       num_memory_layers=1, key_dim=s["key_dim"], doc_max_length=s["doc_len"],
                       memory_ffn_dim=d)
    return PlugLMForMaskedLM(cfg).to(device)


class Trainer:
    """One masked-LM training step of ``model`` on a fixed random batch (the memory plugged)."""

    def __init__(self, model, s: dict, device):
        self.model = model
        self.dev = torch.device(device)
        B, T = s["batch"]
        self.ids = torch.randint(5, s["vocab"], (B, T), device=self.dev)
        self.labels = torch.where(torch.rand(B, T, device=self.dev) < 0.15, self.ids,
                                  torch.full_like(self.ids, -100))
        self.labels[:, 0] = self.ids[:, 0]
        self.mask = torch.ones_like(self.ids)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(self):
        self.model.train()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.labels)
        out.loss.float().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -------------------------------------------------------------------- refresh paths


def sync_refresh(model, memory, chunk: int):
    """Our synchronous refresh: KnowledgeMemory.encode with the fused encoder."""
    was = model.training
    memory.encode(model, batch_size=chunk, progress=False)
    model.train(was)


@torch.no_grad()
def published_refresh(model, memory, chunk: int, path: str) -> torch.Tensor:
    """The published code's refresh: eager unfused encode -> host numpy -> np.save -> np.load
    -> device. Returns the reloaded keys [M, key_dim]."""
    plug = model._plug
    emb, ke = plug.embeddings, plug.knowledge_encoder
    s = memory.snapshot()
    dev = emb.word_embeddings.weight.device
    M, L = s.token_ids.shape
    outs = []
    for a in range(0, M, chunk):
        tok = s.token_ids[a:a + chunk].to(dev, torch.long)  # [n, L]
        mask = s.attention_mask(s.lengths[a:a + chunk].to(dev), L)  # [n, L]
        pooled = pk.reference.encode_knowledge(
            tok, mask, emb.word_embeddings.weight, emb.position_embeddings.weight,
            emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias,
            ke.pooler.w1, ke.pooler.b1, ke.pooler.w2, ke.pooler.b2, eps=emb.LayerNorm.eps)
        outs.append(ke.key_proj(pooled).float().cpu().numpy())
    np.save(path, np.concatenate(outs))
    return torch.from_numpy(np.load(path)).to(dev)


# ----------------------------------------------------------------------------- cases


def _row(bench, impl, shape, device, times_ms, unit_count, unit, peak, note="", extra=None):
    med = statistics.median(times_ms)
    q = sorted(times_ms)
    p = lambda f: q[min(len(q) - 1, int(f * (len(q) - 1) + 0.5))]  # noqa: E731
    return Row(bench, impl, shape, device, med, p(0.2), p(0.8), len(times_ms),
               unit_count / (med * 1e-3), unit, peak, None, note, extra or {})


def bench_refresh(cfg, progress=None, task=None) -> list[Row]:
    from pluglm.refresh import AsyncKeyRefresher

    s = settings(cfg)
    dev = torch.device(cfg.device)
    rows: list[Row] = []
    torch.manual_seed(0)
    model = build_model(s, dev)
    tmp = tempfile.mkdtemp(prefix="pluglm-refresh-bench-")
    npy = os.path.join(tmp, "keys.npy")
    budget = max(cfg.budget_s, 0.5)

    def advance():
        if progress is not None:
            progress.advance(task)

    try:
        for M in s["M"]:
            mem = random_memory(M, s["doc_len"], s["vocab"], dev)
            shape = dict(M=M, L=s["doc_len"], d=s["hidden"], key_dim=s["key_dim"], chunk=s["chunk"])
            sync_refresh(model, mem, s["chunk"])  # keys exist: every path replaces a table
            refresher = AsyncKeyRefresher(model, mem, interval=0, chunk=s["chunk"])
            cases = [
                ("KnowledgeMemory.encode (sync)", lambda: sync_refresh(model, mem, s["chunk"])),
                ("AsyncKeyRefresher (idle)", lambda: refresher.refresh_now(block=True)),
                ("published (eager encode -> numpy -> np.save -> np.load)",
                 lambda: published_refresh(model, mem, s["chunk"], npy)),
            ]
            for label, fn in cases:
                def run(fn=fn):
                    fn()
                    _sync(dev)
                t = time_fn(run, dev, warmup=1, min_repeats=3, max_repeats=10, budget_s=budget)
                with PeakMemory(dev) as pm:
                    run()
                peak = None if pm.peak_bytes is None else pm.peak_bytes / 2**20
                rows.append(Row("refresh", label, shape, cfg.device, t.median_ms, t.p20_ms,
                                t.p80_ms, t.repeats, M / (t.median_ms * 1e-3), "entries/s", peak))
                advance()
            refresher.close()
            mem = refresher = cases = None  # free this M's tables before the next
            gc.collect()
        rows += _train_step_rows(model, s, dev, cfg.device)
        for _ in range(3):
            advance()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def step_times(trainer: Trainer, n: int, hook=None, until=None) -> list[float]:
    """Milliseconds of each of ``n`` training steps (``hook(step)`` after each, timed with
    it), continuing past n while ``until()`` is false."""
    dev = trainer.dev
    times = []
    i = 0
    while i < n or (until is not None and not until()):
        i += 1
        t0 = time.perf_counter()
        trainer.step()
        if hook is not None:
            hook(i)
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _train_step_rows(model, s: dict, dev: torch.device, device: str) -> list[Row]:
    from pluglm.refresh import AsyncKeyRefresher

    M, interval, chunk = s["train_M"], s["interval"], s["chunk"]
    mem = random_memory(M, s["doc_len"], s["vocab"], dev)
    sync_refresh(model, mem, chunk)
    model.set_memory(mem)
    trainer = Trainer(model, s, dev)
    B, T = s["batch"]
    shape = dict(M=M, L=s["doc_len"], d=s["hidden"], layers=s["layers"], B=B, T=T,
                 interval=interval)
    step_times(trainer, 3)  # warm-up
    rows = []
    base = step_times(trainer, interval)
    base_mean = statistics.fmean(base)

    def row(impl, times, extra):
        extra = dict(extra, mean_ms=round(statistics.fmean(times), 3),
                     overhead_pct=round(100.0 * (statistics.fmean(times) / base_mean - 1.0), 2))
        return _row("train step", impl, shape, device, times, B * T, "tokens/s", None,
                    extra=extra)

    rows.append(row("no refresh", base, {}))
    sync_ms = []

    def sync_hook(i):
        if i % interval == 0:
            t0 = time.perf_counter()
            sync_refresh(model, mem, chunk)
            _sync(dev)
            sync_ms.append((time.perf_counter() - t0) * 1e3)

    times = step_times(trainer, interval, hook=sync_hook)
    rows.append(row(f"sync refresh every {interval} steps", times,
                    {"refresh_ms": round(sync_ms[0], 1), "steps_during_refresh": 0}))
    with AsyncKeyRefresher(model, mem, interval=0, chunk=chunk) as r:
        # One refresh, started after the first step; the steps run until it is swapped in
        # (at least ``interval`` of them), and ``swap_step`` is the step that swapped it.
        swap_step = []

        def async_hook(i):
            if i == 1:
                r.refresh_now()
            r.step(i)
            if r.refreshes and not swap_step:
                swap_step.append(i)

        times = step_times(trainer, interval, hook=async_hook, until=lambda: r.refreshes >= 1)
        rows.append(row(f"AsyncKeyRefresher every {interval} steps", times,
                        {"refresh_s": round(r.last_duration_s or float("nan"), 3),
                         "steps_during_refresh": swap_step[0] - 1, "steps_timed": len(times)}))
    model.set_memory(None)
    return rows
