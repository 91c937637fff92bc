"""What every sweep case shares: the result row, the sweep configuration, the machine
description, the timing + peak-memory measurement, and the published attention formulation
that several cases compare against."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

from .measure import PeakMemory, time_fn


@dataclass
class Row:
    bench: str
    impl: str
    shape: dict
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    throughput: float          # items per second (queries for search, tokens for attention)
    throughput_unit: str
    peak_mb: float | None
    pct_roofline: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class SweepConfig:
    device: str = "cpu"
    quick: bool = False
    search_M: tuple = ()
    search_d: tuple = (128,)
    search_B: tuple = (32,)
    search_k: tuple = (5,)
    search_dtypes: tuple = ("float32",)
    attn_shapes: tuple = ()     # (B, T, N)
    heads: int = 12
    head_dim: int = 64
    budget_s: float = 1.0

    @classmethod
    def make(cls, device: str, quick: bool) -> "SweepConfig":
        gpu = device.startswith("cuda")
        if quick:
            Ms = (10_000, 100_000, 1_000_000) if not gpu else (100_000, 1_000_000, 4_000_000)
            return cls(device=device, quick=True, search_M=Ms,
                       attn_shapes=((8, 128, 5), (32, 128, 5)), budget_s=0.5)
        if gpu:
            Ms = (100_000, 1_000_000, 4_000_000, 16_000_000, 64_000_000)
            return cls(device=device, search_M=Ms, search_d=(128, 768), search_B=(1, 64),
                       search_k=(5, 64), search_dtypes=("bfloat16", "float32"),
                       attn_shapes=((1, 128, 5), (8, 512, 5), (32, 128, 32), (32, 512, 32)))
        Ms = (10_000, 30_000, 100_000, 300_000, 1_000_000, 4_000_000)
        return cls(device=device, search_M=Ms, search_B=(1, 32, 256), search_k=(5, 100),
                   attn_shapes=((1, 128, 5), (8, 128, 5), (32, 128, 5), (8, 512, 32)))


def mem_available() -> int:
    """Bytes of host memory available now (/proc/meminfo MemAvailable; 8 GiB where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
            "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(fn, device, budget_s):
    """Timing after warm-up, then the peak extra memory of one more (warm) call."""
    t = time_fn(fn, device, budget_s=budget_s)
    with PeakMemory(device) as pm:
        fn()
    return t, (None if pm.peak_bytes is None else pm.peak_bytes / 2**20)


def published_attention(q, k, v, bias, beta):
    """The published PlugLM formulation: per-head bmm, additive bias, softmax, bmm."""
    B, T, H, Dh = q.shape
    N = k.shape[1]
    qh = q.permute(0, 2, 1, 3).reshape(B * H, T, Dh)
    kh = k.permute(0, 2, 1, 3).reshape(B * H, N, Dh)
    vh = v.permute(0, 2, 1, 3).reshape(B * H, N, Dh)
    scores = torch.bmm(qh, kh.transpose(1, 2)).view(B, H, T, N)
    scores = scores + beta.view(1, H, 1, 1) * bias.view(B, 1, 1, N)
    probs = torch.softmax(scores, dim=-1).view(B * H, T, N)
    return torch.bmm(probs, vh).view(B, H, T, Dh).permute(0, 2, 1, 3)


__all__ = ["Row", "SweepConfig", "machine_info", "measure", "published_attention"]
