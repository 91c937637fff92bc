"""Large-B exact search on the CPU: the register-blocked kernel against the BLAS GEMM path
(csrc/cpu/mips_topk.cpp, search_gemm) and against the float32 GEMM probe of
`pluglm bench --large` (a 2048^3 `a @ b`), interleaved (issue 14: B = 256 float32 keys
must reach >= 80% of the probe).

Each round times the probe, then every case once with each path (PLUGLM_CPU_MIPS_GEMM=0 /
=1, read per call), so all see the same load of a shared machine. Reported per case:
GFLOP/s = 2 B M d / t (median over rounds, from wall time, and for one thread also from
process CPU time, which other processes inflate far less), and the fraction of the probe
(median of the per-round ratios, the probe timed the same way). Prints the load average
before and after.

    python benchmarks/bench_mips_gemm.py [--M 1000000] [--d 128] [--k 5] [--rounds 7]
                                         [--B 32 64 256 1024] [--threads 1]
                                         [--dtype-B 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import pluglm_kernels as pk


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--M", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--B", type=int, nargs="+", default=[32, 64, 256, 1024])
    ap.add_argument("--dtype-B", type=int, nargs="*", default=[256],
                    help="B values also run with bfloat16 and int8 keys")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    f32 = torch.randn(a.M, a.d)
    i8, sc = pk.quantize_keys(f32)
    tables = {"float32": (f32, None), "bfloat16": (f32.to(torch.bfloat16), None),
              "int8": (i8, sc)}
    cases = [("float32", B) for B in a.B]
    cases += [(t, B) for B in a.dtype_B for t in ("bfloat16", "int8")]
    queries = {B: torch.randn(B, a.d) for _, B in cases}
    op = torch.ops.pluglm._C_mips_topk
    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    probe_flops = 2 * n ** 3

    def probe() -> tuple[float, float]:
        x @ y  # warm
        runs = [_timed(lambda: x @ y) for _ in range(3)]
        return min(r[0] for r in runs), min(r[1] for r in runs)

    def search(dtype, B, path):
        os.environ["PLUGLM_CPU_MIPS_GEMM"] = path
        keys, scales = tables[dtype]
        return _timed(lambda: op(queries[B], keys, a.k, scales, None))

    for dtype, B in cases:  # warm every path once
        for path in ("0", "1"):
            search(dtype, B, path)
    print(f"host {platform.node()} {platform.processor()} threads={a.threads} M={a.M} "
          f"d={a.d} k={a.k} rounds={a.rounds} loadavg before {os.getloadavg()}", flush=True)
    rec = {(c, p): [] for c in cases for p in ("0", "1")}
    probes = []
    for _ in range(a.rounds):
        pw, pc = probe()
        probes.append((probe_flops / pw / 1e9, probe_flops / pc / 1e9 / a.threads))
        for c in cases:
            for p in ("0", "1"):
                w, cpu = search(*c, p)
                fl = 2 * c[1] * a.M * a.d
                rec[(c, p)].append((fl / w / 1e9, fl / cpu / 1e9 / a.threads,
                                    fl / w / 1e9 / probes[-1][0],
                                    fl / cpu / 1e9 / a.threads / probes[-1][1]))
    med = statistics.median
    print(f"probe (2048^3 a @ b): {med(p[0] for p in probes):.0f} GFLOP/s wall, "
          f"{med(p[1] for p in probes):.0f} per core-second of CPU time "
          f"(range {min(p[0] for p in probes):.0f}-{max(p[0] for p in probes):.0f} wall)")
    print("keys      B     path     GFLOP/s(wall)  frac(wall)  GFLOP/s/core(cpu)  frac(cpu)")
    for c in cases:
        for p in ("0", "1"):
            r = rec[(c, p)]
            print(f"{c[0]:9s} {c[1]:<5d} {'gemm' if p == '1' else 'blocked':8s} "
                  f"{med(v[0] for v in r):13.0f}  {med(v[2] for v in r):10.2f}  "
                  f"{med(v[1] for v in r):17.0f}  {med(v[3] for v in r):9.2f}")
    print(f"loadavg after {os.getloadavg()}", flush=True)
    os.environ.pop("PLUGLM_CPU_MIPS_GEMM", None)


if __name__ == "__main__":
    main()
