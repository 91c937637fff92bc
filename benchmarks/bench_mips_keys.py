"""Exact search per key dtype, side by side in one process (issue 14: int8 keys at B = 1
must be >= 3x faster than float32 keys; int8 keys also through the float path, to compare
the VNNI integer path of B = 1 with it). Every round calls each case once, so all cases see
the same load of a shared machine; medians over the rounds, and each ratio also as the
median of the per-round ratios. Prints the load average before and after.

    python benchmarks/bench_mips_keys.py [--M 1000000] [--d 128] [--k 5] [--rounds 31]
                                         [--B 1 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import pluglm_kernels as pk


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--M", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--B", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    f32 = torch.randn(a.M, a.d)
    i8, sc = pk.quantize_keys(f32)
    # "int8-float": the same int8 table through the float path (PLUGLM_CPU_VNNI=0, read per
    # call), to show what the VNNI integer path of B = 1 gives on the same minute
    tables = {"float32": (f32, None), "bfloat16": (f32.to(torch.bfloat16), None),
              "int8": (i8, sc), "int8-float": (i8, sc)}
    op = torch.ops.pluglm._C_mips_topk

    def call(q, keys, scales, vnni):
        os.environ["PLUGLM_CPU_VNNI"] = vnni
        return op(q, keys, a.k, scales, None)

    cases = {}
    for B in a.B:
        q = torch.randn(B, a.d)
        for name, (keys, scales) in tables.items():
            vnni = "0" if name == "int8-float" else "1"
            cases[(B, name)] = (lambda q=q, keys=keys, scales=scales, vnni=vnni:
                                call(q, keys, scales, vnni))
    for fn in cases.values():
        fn()
    print(f"load average before: {os.getloadavg()}, threads {torch.get_num_threads()}, "
          f"M={a.M} d={a.d} k={a.k}")
    times = {c: [] for c in cases}
    for _ in range(a.rounds):
        for c, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[c].append((time.perf_counter() - t0) * 1e3)
    os.environ.pop("PLUGLM_CPU_VNNI", None)
    print(f"load average after: {os.getloadavg()}")
    for (B, name), ts in times.items():
        nbytes = a.M * (a.d * tables[name][0].element_size() + (4 if "int8" in name else 0))
        med = statistics.median(ts)
        print(f"B={B:<4d} {name:9s} median {med:8.2f} ms  p20-p80 "
              f"{statistics.quantiles(ts, n=5)[0]:.2f}-{statistics.quantiles(ts, n=5)[3]:.2f}"
              f"  min {min(ts):8.2f}  {nbytes / med / 1e6:5.1f} GB/s of keys")
    for B in a.B:
        base = times[(B, "float32")]
        for name in ("int8", "int8-float", "bfloat16"):
            per_round = [x / y for x, y in zip(base, times[(B, name)])]
            print(f"B={B}: float32 / {name} = "
                  f"{statistics.median(base) / statistics.median(times[(B, name)]):.2f}x "
                  f"(ratio of medians), {statistics.median(per_round):.2f}x (median of the "
                  f"{a.rounds} per-round ratios)")


if __name__ == "__main__":
    main()
