"""Per-call overhead of the public ops on tiny inputs (where the kernel itself is ~free):
argument checks, backend resolution, custom-op dispatch and host syncs.

Prints the median and p20/p80 microseconds of process CPU time per call over many calls,
one thread, for each case: CPU time, not wall time, so that other processes on a shared
machine inflate it far less. To compare two trees, run it with each on PYTHONPATH in turn
(same machine, same run):

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/tree python benchmarks/bench_dispatch.py
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

import pluglm_kernels as pk


def _time(fn, reps: int, rounds: int) -> tuple[float, float, float]:
    for _ in range(50):
        fn()
    per = []
    for _ in range(rounds):
        t0 = time.process_time_ns()
        for _ in range(reps):
            fn()
        per.append((time.process_time_ns() - t0) / reps / 1e3)
    per.sort()
    return statistics.median(per), per[len(per) // 5], per[(4 * len(per)) // 5]


def cases():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 16, generator=g), torch.randn(64, 16, generator=g)
    valid = torch.ones(64, dtype=torch.bool)
    valid[::3] = False
    B, T, H, Dh, N = 1, 2, 2, 32, 4
    qa = torch.randn(B, T, H, Dh, generator=g)
    ka, va = torch.randn(B, N, H, Dh, generator=g), torch.randn(B, N, H, Dh, generator=g)
    bias, beta = torch.randn(B, N, generator=g), torch.ones(H)
    table = torch.randn(16, H, Dh, generator=g)
    idx = torch.randint(0, 16, (B, N), generator=g)
    qg = qa.clone().requires_grad_(True)
    x, mask = torch.randn(2, 4, 16, generator=g), torch.ones(2, 4)
    w1, b1, w2, b2 = torch.randn(8, 16), torch.randn(8), torch.randn(8), torch.randn(1)
    n_valid = int(valid.sum())
    out = {
        "mips_topk B=1 M=64 k=4": lambda: pk.mips_topk(q, keys, 4),
        "mips_topk + valid": lambda: pk.mips_topk(q, keys, 4, valid=valid),
    }
    import inspect

    if "num_valid" in inspect.signature(pk.mips_topk).parameters:
        out["mips_topk + valid, num_valid given"] = lambda: pk.mips_topk(
            q, keys, 4, valid=valid, num_valid=n_valid)
    out.update({
        "knowledge_attention fwd": lambda: pk.knowledge_attention(qa, ka, va, bias, beta),
        "gather_knowledge_attention fwd": lambda: pk.gather_knowledge_attention(
            qa, table, table, idx, bias, beta),
        "knowledge_attention fwd+bwd": lambda: pk.knowledge_attention(
            qg, ka, va, bias, beta).sum().backward(),
        "attentive_pool fwd": lambda: pk.attentive_pool(x, mask, w1, b1, w2, b2),
        "resolve (auto, cpu)": lambda: pk.resolve("knowledge_attention", "auto",
                                                  torch.device("cpu")),
    })
    return out


def main() -> None:
    torch.set_num_threads(1)
    reps, rounds = int(os.environ.get("REPS", "400")), int(os.environ.get("ROUNDS", "15"))
    print(f"# {platform.processor() or platform.machine()} {platform.node()}, torch "
          f"{torch.__version__}, 1 thread, tree {os.path.dirname(os.path.dirname(pk.__file__))}")
    print(f"# median (p20-p80) us of CPU time per call over {rounds} rounds x {reps} calls")
    for name, fn in cases().items():
        med, p20, p80 = _time(fn, reps, rounds)
        print(f"{name:38s} {med:8.1f}  ({p20:.1f}-{p80:.1f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
