"""Knowledge-encoder throughput: the fused encode_knowledge op vs the eager reference and a
plain PyTorch composition (nn.Embedding x3 + LayerNorm + attentive pooling as separate ops).

Metric: entries encoded per second (E / median time), for the refresh path (forward, no
grad) and the re-encode training path (forward + backward). extra_info holds median,
p20/p80, entries/s, peak memory (CUDA: max_memory_allocated; CPU: the peak RSS increase of
one call, measured in a fresh child process) and the machine.

    pytest benchmarks/bench_encode.py --benchmark-only              # subset (a few minutes on CPU)
    PLUGLM_BENCH_FULL=1 pytest benchmarks/bench_encode.py ...       # E in {64, 256}, T in {64, 288}
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import time

import pytest
import torch
from torch import nn

import pluglm_kernels as pk

FULL = os.environ.get("PLUGLM_BENCH_FULL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, P, TT, HP_RATIO = 30522, 512, 2, 1  # BERT vocabulary; pooler hidden = D (published model)

if FULL:
    CASES = [(E, T, D, mode) for E in (64, 256) for T in (64, 288) for D in (768, 128)
             for mode in ("fwd", "fwd+bwd")]
else:
    CASES = [(64, 64, 768, "fwd"), (64, 288, 768, "fwd"), (64, 288, 128, "fwd"),
             (64, 288, 768, "fwd+bwd")]
IMPLS = ("fused", "reference", "composition")


class Composition(nn.Module):
    """What a user would write: separate embedding lookups, LayerNorm, then pooling ops."""

    def __init__(self, params, eps):
        super().__init__()
        word, pos, typ, lw, lb, w1, b1, w2, b2 = params
        self.word = nn.Embedding.from_pretrained(word, freeze=False)
        self.pos = nn.Embedding.from_pretrained(pos, freeze=False)
        self.typ = nn.Embedding.from_pretrained(typ, freeze=False)
        self.ln = nn.LayerNorm(word.shape[1], eps=eps)
        self.ln.weight, self.ln.bias = nn.Parameter(lw), nn.Parameter(lb)
        self.fc1 = nn.Linear(word.shape[1], w1.shape[0])
        self.fc1.weight, self.fc1.bias = nn.Parameter(w1), nn.Parameter(b1)
        self.fc2 = nn.Linear(w1.shape[0], 1)
        self.fc2.weight, self.fc2.bias = nn.Parameter(w2[None]), nn.Parameter(b2)

    def forward(self, ids, mask):
        T = ids.shape[1]
        h = self.ln(self.word(ids) + self.pos(torch.arange(T, device=ids.device))[None]
                    + self.typ(torch.zeros_like(ids)))
        s = self.fc2(torch.tanh(self.fc1(h))).squeeze(-1).masked_fill(mask == 0, float("-inf"))
        a = torch.softmax(s, dim=1).nan_to_num(0.0)
        return torch.bmm(a[:, None], h).squeeze(1)


def _inputs(E, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (E, T), generator=g)
    lens = torch.randint(T // 4, T + 1, (E,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).to(torch.int64)
    Hp = D * HP_RATIO
    params = [torch.randn(V, D, generator=g) * 0.02, torch.randn(P, D, generator=g) * 0.02,
              torch.randn(TT, D, generator=g) * 0.02, torch.ones(D), torch.zeros(D),
              torch.randn(Hp, D, generator=g) * 0.02, torch.zeros(Hp),
              torch.randn(Hp, generator=g) * 0.02, torch.zeros(1)]
    dev = torch.device(DEVICE)
    return ids.to(dev), mask.to(dev), [p.to(dev, dtype) for p in params]


def _make_fn(impl, E, T, D, mode):
    ids, mask, params = _inputs(E, T, D)
    train = mode == "fwd+bwd"
    if train:
        params = [p.requires_grad_(True) for p in params]
    if impl == "composition":
        mod = Composition([p.detach().clone() for p in params], 1e-12).to(DEVICE)
        mod.requires_grad_(train)

        def enc():
            return mod(ids, mask)
        leaves = list(mod.parameters())
    else:
        backend = "auto" if impl == "fused" else "reference"

        def enc():
            return pk.encode_knowledge(ids, mask, *params, backend=backend)
        leaves = params

    def run():
        if train:
            out = enc()
            torch.autograd.grad(out.sum(), leaves)
        else:
            with torch.no_grad():
                enc()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return run


def _child_peak(q, impl, E, T, D, mode, threads):
    torch.set_num_threads(threads)
    run = _make_fn(impl, E, T, D, mode)
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    q.put(max(0, peak - rss_before))


def _peak_memory_mb(impl, E, T, D, mode, run):
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(q, impl, E, T, D, mode, torch.get_num_threads()))
    p.start()
    p.join(300)
    return q.get(timeout=5) / 2**20 if p.exitcode == 0 else float("nan")


def _machine():
    info = {"device": DEVICE, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@pytest.mark.benchmark(group="encode_knowledge")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("E,T,D,mode", CASES, ids=[f"E{e}-T{t}-D{d}-{m}" for e, t, d, m in CASES])
def test_encode_throughput(benchmark, impl, E, T, D, mode):
    run = _make_fn(impl, E, T, D, mode)
    run()  # warm-up (first-call allocations, Triton compilation)
    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    rounds = max(3, min(15, int(4.0 / max(once, 1e-4))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    st = benchmark.stats.stats
    data = sorted(st.data)
    pct = lambda q: data[min(len(data) - 1, int(q * (len(data) - 1) + 0.5))]  # noqa: E731
    benchmark.extra_info.update({
        "impl": impl, "E": E, "T": T, "D": D, "mode": mode,
        "median_s": st.median, "p20_s": pct(0.2), "p80_s": pct(0.8),
        "entries_per_s": E / st.median,
        "peak_mem_mb": _peak_memory_mb(impl, E, T, D, mode, run),
        **_machine(),
    })
