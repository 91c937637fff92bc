"""Knowledge attention: the fused op against what a user would otherwise run.

Compared, forward and forward+backward, H=12, Dh=64, dropout 0 (inference / eval), f32 on
CPU, bf16 on GPU:
  fused      pluglm_kernels.knowledge_attention (backend cpu here; triton and cuda on GPUs)
  eager      pluglm_kernels.reference.knowledge_attention
  compile    torch.compile of that reference
  published  the published model's formulation: bmm, additive bias, softmax, dropout, bmm
Sweep B in {1, 8, 32}, T in {128, 512}, N in {5, 32} with PLUGLM_BENCH_FULL=1; by default
a subset that includes the target point (CPU: fused >= 1.5x eager forward at B=32, T=128,
N=5). Each benchmark records the median (pytest-benchmark), p20/p80 and the peak extra
memory of one call in extra_info; test_target_cpu_forward_speedup records the ratio.

    python -m pytest benchmarks/bench_attention.py --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch.nn.functional as F

import pluglm_kernels as pk
from pluglm.bench.measure import p20_p80, time_fn, torch_alloc_peak_bytes
from pluglm_kernels import reference as R
from pluglm_kernels import availability

H, DH = 12, 64
FULL = os.environ.get("PLUGLM_BENCH_FULL", "0") == "1"
TARGET = (32, 128, 5)  # (B, T, N)
if FULL:
    SHAPES = [(B, T, N) for B in (1, 8, 32) for T in (128, 512) for N in (5, 32)]
else:
    SHAPES = [TARGET, (8, 512, 32)]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
FUSED = [b for b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))
         if availability("knowledge_attention", b, DEVICE)[0]]
IMPLS = [f"fused-{b}" for b in FUSED] + ["eager", "compile", "published"]


def published(q, k, v, bias, beta, dropout_p=0.0):
    """The published PlugLM knowledge attention: heads-first bmm, additive bias, softmax,
    dropout, bmm. q [B, T, H, Dh]; k, v [B, N, H, Dh]; bias [B, N]; beta [H]."""
    B, N = bias.shape
    qh = q.transpose(1, 2)                          # [B, H, T, Dh]
    kh = k.permute(0, 2, 3, 1)                      # [B, H, Dh, N]
    vh = v.transpose(1, 2)                          # [B, H, N, Dh]
    scores = torch.matmul(qh, kh)                   # [B, H, T, N]
    scores = scores + beta.view(1, -1, 1, 1) * bias.view(B, 1, 1, N)
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, vh).transpose(1, 2).contiguous()  # [B, T, H, Dh]


_compiled = {}


def _impl(name):
    if name.startswith("fused-"):
        backend = name.split("-", 1)[1]
        return lambda q, k, v, bias, beta: pk.knowledge_attention(q, k, v, bias, beta,
                                                                  backend=backend)
    if name == "eager":
        return lambda *a: R.knowledge_attention(*a)[0]
    if name == "compile":
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(R.knowledge_attention, dynamic=False)
        f = _compiled["f"]
        return lambda *a: f(*a)[0]
    return published


def _inputs(B, T, N, grad):
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + T + N)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    q = (mk(B, T, H, DH) * DH ** -0.5).to(DTYPE)
    k, v = mk(B, N, H, DH).to(DTYPE), mk(B, N, H, DH).to(DTYPE)
    bias, beta = mk(B, N), torch.ones(H, device=DEVICE)
    xs = [q, k, v, bias, beta]
    if grad:
        xs = [t.requires_grad_() for t in xs]
    return xs


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _make_call(impl, B, T, N, mode):
    f = _impl(impl)
    xs = _inputs(B, T, N, grad=mode == "fwd+bwd")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                f(*xs)
            _sync()
    else:
        go = torch.randn(B, T, H, DH, device=DEVICE).to(DTYPE)

        def call():
            for t in xs:
                t.grad = None
            f(*xs).backward(go)
            _sync()
    return call


def _peak_extra_bytes(call) -> int:
    """Peak bytes torch allocates during one call above what was live before it."""
    return torch_alloc_peak_bytes(call, DEVICE)


def _record(benchmark, impl, B, T, N, mode, call):
    data = benchmark.stats.stats.data
    p20, p80 = p20_p80(data)
    benchmark.extra_info.update({
        "impl": impl, "B": B, "T": T, "N": N, "H": H, "Dh": DH, "mode": mode,
        "dtype": str(DTYPE).replace("torch.", ""), "device": DEVICE,
        "device_name": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_ms": statistics.median(data) * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
        "peak_extra_mb": _peak_extra_bytes(call) / 2**20,
    })


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T,N", SHAPES, ids=lambda x: str(x))
def test_knowledge_attention(benchmark, B, T, N, impl, mode):
    benchmark.group = f"knowledge_attention {mode} B={B} T={T} N={N}"
    call = _make_call(impl, B, T, N, mode)
    rounds = 20 if DEVICE == "cuda" else 8
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)
    _record(benchmark, impl, B, T, N, mode, call)


def _median_time(call, rounds):
    """Median seconds of ``rounds`` calls after one warm-up (a baseline timed beside the
    benchmarked call, in the same process)."""
    return time_fn(call, DEVICE, warmup=1, min_repeats=rounds, max_repeats=rounds).median_ms / 1e3


@pytest.mark.skipif(DEVICE != "cpu" or "cpu" not in FUSED, reason="CPU target (C++ kernels)")
def test_target_cpu_forward_speedup(benchmark):
    """The issue's CPU target: C++ forward >= 1.5x eager at B=32, T=128, N=5 (f32)."""
    B, T, N = TARGET
    fused = _make_call("fused-cpu", B, T, N, "fwd")
    eager = _make_call("eager", B, T, N, "fwd")
    benchmark.group = "target"
    benchmark.pedantic(fused, rounds=15, iterations=1, warmup_rounds=2)
    t_eager = _median_time(eager, 15)
    t_fused = statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info.update({"eager_median_ms": t_eager * 1e3,
                                 "fused_median_ms": t_fused * 1e3,
                                 "speedup_vs_eager": t_eager / t_fused})
    print(f"\nCPU forward B={B} T={T} N={N}: fused {t_fused * 1e3:.2f} ms, eager "
          f"{t_eager * 1e3:.2f} ms, speedup {t_eager / t_fused:.1f}x (target 1.5x)")
