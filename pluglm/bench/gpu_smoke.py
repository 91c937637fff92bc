"""The Python stages of ``benchmarks/gpu_suite.sh`` (one 10-minute call on a GPU machine).

Each stage writes its results to the output folder as soon as it has them (atomically,
complete JSON at every moment), so a run that is cut off still says the most::

    python3 -m pluglm.bench.gpu_smoke facts OUT/machine.json [--dry-run]
    python3 -m pluglm.bench.gpu_smoke smoke OUT/smoke.json --backends cuda,triton [--budget-s S]
    python3 -m pluglm.bench.gpu_smoke bench OUT/bench.json [--budget-s S] [--max-groups N]

- ``facts`` (stage 0): python / torch / triton / CUDA versions, the GPU, driver, SMs and
  L2, then two measured ceilings: device-to-device copy bandwidth (bytes read + written)
  and the bf16 matrix-product rate (8192^3, random data), as docs/design.md's performance
  notes use them. On a machine with no GPU (``--dry-run``) the same fields are measured on
  the CPU at small sizes.
- ``smoke`` (stage 1): every op family x backend x dtype at one shape, fresh random data,
  outputs and gradients against the float64 reference (``pluglm_kernels.reference``),
  with the caching allocator poisoned with NaN bytes before each call so an unwritten
  output element shows up. Prints one ``SMOKE <family> PASS|FAIL|SKIP`` line per family.
- ``bench`` (stage 3): the cases of ``pluglm bench --quick`` on the device, group by group
  (one M, or one attention shape), rewriting the results file after each group.

Exit status: 0 when nothing failed (skips allowed), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch


def _write_json(path: Path, obj) -> None:
    from .report import atomic_write

    atomic_write(Path(path), (json.dumps(obj, indent=1, default=str) + "\n").encode())


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ stage 0


def _nvidia_smi() -> dict:
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"query": q, "rows": out.splitlines()}


def _median_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matrix-product rate (TFLOP/s)."""
    gpu = device.type == "cuda"
    nbytes = (2 << 30) if gpu else (64 << 20)
    src = torch.rand(nbytes // 4, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, 20 if gpu else 5)
    out = {"copy_bytes": nbytes, "copy_ms": ms, "copy_gbs": 2 * nbytes / (ms * 1e-3) / 1e9}
    del src, dst
    n = 8192 if gpu else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, device, 10 if gpu else 3)
    out.update(gemm_n=n, gemm_dtype="bfloat16", gemm_ms=ms, gemm_tflops=2 * n**3 / (ms * 1e-3) / 1e12)
    return out


def cmd_facts(args) -> int:
    info = {"stage": "facts", "dry_run": args.dry_run, "python": sys.version.split()[0],
            "executable": sys.executable, "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # optional
        info["triton"] = f"unavailable: {e}"
    try:
        import faiss  # noqa: F401

        info["faiss"] = getattr(faiss, "__version__", "present")
    except Exception:
        info["faiss"] = None
    from .common import machine_info

    info["cpu"] = machine_info("cpu")["cpu"]
    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                    nvidia_smi=_nvidia_smi())
    else:
        info["gpu"] = None
    _write_json(args.out, info)  # the facts first: the measurements can still fail
    try:
        info["ceilings"] = {"device": str(device), **measure_ceilings(device)}
    except Exception as e:
        info["ceilings"] = {"device": str(device), "error": f"{type(e).__name__}: {e}"}
    _write_json(args.out, info)
    c = info["ceilings"]
    _log(f"FACTS python {info['python']} torch {info['torch']} triton {info['triton']} "
         f"gpu {info['gpu']} (cuda {info['torch_cuda']})")
    if "error" in c:
        _log(f"FACTS ceilings on {device}: ERROR {c['error']}")
        return 1
    _log(f"FACTS {device}: copy {c['copy_gbs']:.0f} GB/s (read+write), bf16 matmul "
         f"{c['gemm_n']}^3 {c['gemm_tflops']:.4g} TFLOP/s")
    return 0


# ------------------------------------------------------------------------------ stage 1

FAMILIES = ("mips_topk", "knowledge_attention", "gather_knowledge_attention", "attentive_pool",
            "encode_knowledge")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# ||out - ref|| / ||ref|| against float64 (outputs and gradients); float32 allows the tf32
# level (a tf32 slip in an exact kernel is caught by the tests, not this smoke check).
TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _poison(device: torch.device) -> None:
    """Fill freed allocator blocks with 0xFF bytes (NaN as float, -1 as int) so an output
    the kernel does not write shows up as NaN: a large block and small-pool blocks."""
    if device.type != "cuda":
        return
    big = torch.empty(256 << 20, dtype=torch.uint8, device=device).fill_(255)
    small = [torch.empty(512 << 10, dtype=torch.uint8, device=device).fill_(255) for _ in range(16)]
    del big, small


def _rel(out, ref) -> float:
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def _gen(device):
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device="cpu").manual_seed(seed), seed


def _randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def _grads_check(name_out, outs, refs, dtype) -> list[str]:
    bad = []
    for name, o, r in zip(name_out, outs, refs):
        e = _rel(o, r)
        if not e <= TOL[dtype]:
            bad.append(f"{name} rel err {e:.2e} > {TOL[dtype]:.0e}")
    return bad


def _case_mips(backend, qname, kname, device):
    import pluglm_kernels as pk
    from pluglm_kernels import reference

    gen, seed = _gen(device)
    B, M, d, k = 33, 5003, 128, 16
    q = _randn(gen, B, d, dtype=FLOATS[qname], device=device)
    k32 = _randn(gen, M, d)
    scales = None
    if kname == "int8":
        keys, scales = pk.quantize_keys(k32)
        keys, scales = keys.to(device), scales.to(device)
    else:
        keys = k32.to(FLOATS[kname]).to(device)
    _poison(device)
    s, i = pk.mips_topk(q, keys, k, key_scales=scales, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    s, i = s.cpu(), i.cpu()
    qd = q.double().cpu()
    kd = reference.dequantize_keys(keys.cpu(), None if scales is None else scales.cpu(), torch.float64)
    ref_s, _ = reference.mips_topk(qd, kd, k)
    tol = 2e-5 * qd.norm(dim=1) * kd.norm(dim=1).max()  # [B]
    problems = []
    if not bool(torch.isfinite(s).all()):
        problems.append("non-finite scores (unwritten output?)")
    if not bool(((i >= 0) & (i < M)).all()):
        problems.append("indices out of [0, M) (unwritten output?)")
        return problems, seed
    if not bool((s[:, :-1] >= s[:, 1:]).all()):
        problems.append("scores not sorted")
    srt = i.sort(dim=1).values
    if not bool((srt[:, 1:] != srt[:, :-1]).all()):
        problems.append("duplicate indices")
    true = (qd[:, None, :] * kd[i]).sum(-1)  # [B, k]
    if not bool(((s.double() - true).abs() <= tol[:, None]).all()):
        problems.append(f"scores off by up to {float((s.double() - true).abs().max()):.3g}")
    if not bool((true >= ref_s[:, -1:].double() - tol[:, None]).all()):
        problems.append("returned a row below the k-th best")
    return problems, seed


def _case_attention(backend, dname, device, gather):
    import pluglm_kernels as pk
    from pluglm_kernels import reference

    dtype = FLOATS[dname]
    gen, seed = _gen(device)
    B, T, H, Dh, N, M = 3, 37, 4, 64, 7, 50
    p, dseed = 0.1, int.from_bytes(os.urandom(7), "little")
    q = _randn(gen, B, T, H, Dh, dtype=dtype, device=device, scale=Dh ** -0.5)
    bias = _randn(gen, B, N, device=device)
    beta = _randn(gen, H, device=device).abs()
    if gather:
        tk = _randn(gen, M, H, Dh, dtype=dtype, device=device)
        tv = _randn(gen, M, H, Dh, dtype=dtype, device=device)
        idx = torch.randint(0, M, (B, N), generator=gen).to(device)
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, tk, tv, bias, beta)]
        _poison(device)
        out = pk.gather_knowledge_attention(leaves[0], leaves[1], leaves[2], idx, leaves[3],
                                            leaves[4], dropout_p=p, seed=dseed, backend=backend)
    else:
        kk = _randn(gen, B, N, H, Dh, dtype=dtype, device=device)
        vv = _randn(gen, B, N, H, Dh, dtype=dtype, device=device)
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, kk, vv, bias, beta)]
        _poison(device)
        out = pk.knowledge_attention(*leaves, dropout_p=p, seed=dseed, backend=backend)
    go = _randn(gen, *out.shape, dtype=dtype, device=device)
    _poison(device)
    grads = torch.autograd.grad(out, leaves, go)
    l64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    if gather:
        i64 = idx.cpu()
        ref = reference.knowledge_attention(l64[0], l64[1][i64], l64[2][i64], l64[3], l64[4], p,
                                            dseed)[0]
    else:
        ref = reference.knowledge_attention(*l64, p, dseed)[0]
    ref_grads = torch.autograd.grad(ref, l64, go.double().cpu())
    names = ("out", "dq", "dk", "dv", "dbias", "dbeta")
    return _grads_check(names, (out, *grads), (ref, *ref_grads), dtype), seed


def _case_pool(backend, dname, device):
    import pluglm_kernels as pk
    from pluglm_kernels import reference

    dtype = FLOATS[dname]
    gen, seed = _gen(device)
    B, T, D, Hp = 5, 29, 96, 80
    x = _randn(gen, B, T, D, dtype=dtype, device=device)
    mask = (torch.rand(B, T, generator=gen) < 0.8).to(torch.long)
    mask[0] = 0  # an empty row pools to zeros
    mask[1, 0] = 1
    mask = mask.to(device)
    params = [_randn(gen, Hp, D, dtype=dtype, device=device, scale=D ** -0.5),
              _randn(gen, Hp, dtype=dtype, device=device), _randn(gen, Hp, dtype=dtype, device=device),
              _randn(gen, 1, dtype=dtype, device=device)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    _poison(device)
    out = pk.attentive_pool(leaves[0], mask, *leaves[1:], backend=backend)
    go = _randn(gen, *out.shape, dtype=dtype, device=device)
    _poison(device)
    grads = torch.autograd.grad(out, leaves, go)
    l64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref = reference.attentive_pool(l64[0], mask.cpu(), *l64[1:])
    ref_grads = torch.autograd.grad(ref, l64, go.double().cpu())
    names = ("out", "dx", "dw1", "db1", "dw2", "db2")
    # db2 is identically zero (softmax shift invariance): compare it by magnitude only
    problems = _grads_check(names[:5], (out, *grads[:4]), (ref, *ref_grads[:4]), dtype)
    if not bool(torch.isfinite(grads[4]).all()) or float(grads[4].abs().max()) > 1e-3:
        problems.append(f"db2 should be ~0, got {grads[4].flatten()[:3].tolist()}")
    return problems, seed


def _case_encode(backend, dname, device):
    import pluglm_kernels as pk
    from pluglm_kernels import reference

    dtype = FLOATS[dname]
    gen, seed = _gen(device)
    E, T, V, P, D = 6, 21, 300, 40, 96
    ids = torch.randint(0, V, (E, T), generator=gen).to(device)
    tt = torch.randint(0, 2, (E, T), generator=gen).to(device)
    mask = torch.ones(E, T, dtype=torch.long)
    mask[:, 15:] = 0
    mask = mask.to(device)
    tables = [_randn(gen, V, D, dtype=dtype, device=device), _randn(gen, P, D, dtype=dtype, device=device),
              _randn(gen, 2, D, dtype=dtype, device=device)]
    ln = [(1 + 0.1 * _randn(gen, D)).to(dtype).to(device), _randn(gen, D, dtype=dtype, device=device)]
    pool = [_randn(gen, D, D, dtype=dtype, device=device, scale=D ** -0.5),
            _randn(gen, D, dtype=dtype, device=device), _randn(gen, D, dtype=dtype, device=device),
            _randn(gen, 1, dtype=dtype, device=device)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (*tables, *ln, *pool)]
    _poison(device)
    out = pk.encode_knowledge(ids, mask, *leaves, token_type_ids=tt, position_offset=2,
                              backend=backend)
    go = _randn(gen, *out.shape, dtype=dtype, device=device)
    _poison(device)
    grads = torch.autograd.grad(out, leaves[:5], go)  # tables and LayerNorm
    l64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref = reference.encode_knowledge(ids.cpu(), mask.cpu(), *l64, token_type_ids=tt.cpu(),
                                     position_offset=2)
    ref_grads = torch.autograd.grad(ref, l64[:5], go.double().cpu())
    names = ("out", "dword", "dpos", "dtype", "dln_w", "dln_b")
    return _grads_check(names, (out, *grads), (ref, *ref_grads), dtype), seed


def smoke_cases(backends):
    """(family, backend, label, thunk(device)) in the order they run."""
    out = []
    for be in backends:
        for qn, kn in (("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("f32", "int8"),
                       ("bf16", "int8"), ("f32", "f16")):
            out.append(("mips_topk", be, f"q={qn} keys={kn}",
                        lambda dev, be=be, qn=qn, kn=kn: _case_mips(be, qn, kn, dev)))
        for dn in FLOATS:
            out.append(("knowledge_attention", be, dn,
                        lambda dev, be=be, dn=dn: _case_attention(be, dn, dev, False)))
            out.append(("gather_knowledge_attention", be, dn,
                        lambda dev, be=be, dn=dn: _case_attention(be, dn, dev, True)))
            out.append(("attentive_pool", be, dn, lambda dev, be=be, dn=dn: _case_pool(be, dn, dev)))
            out.append(("encode_knowledge", be, dn,
                        lambda dev, be=be, dn=dn: _case_encode(be, dn, dev)))
    return out


def _summary(results) -> dict:
    fams = {}
    for fam in FAMILIES:
        rs = [r for r in results if r["family"] == fam]
        st = {r["status"] for r in rs}
        fams[fam] = "FAIL" if "FAIL" in st else ("PASS" if "PASS" in st else "SKIP")
    return fams


def cmd_smoke(args) -> int:
    import pluglm_kernels as pk

    t_end = time.monotonic() + args.budget_s
    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    backends = [b for b in args.backends.split(",") if b]
    doc = {"stage": "smoke", "device": str(device), "backends": backends, "dry_run": args.dry_run,
           "results": [], "families": {}}
    prev = {}
    if args.append and Path(args.out).exists():  # a second pass (after the build) adds to the first
        prev = json.loads(Path(args.out).read_text())
        doc["results"] = prev.get("results", [])
        doc["backends"] = prev.get("backends", []) + backends
    for fam, be, label, thunk in smoke_cases(backends):
        r = {"family": fam, "backend": be, "case": label, "device": str(device)}
        ok, why = pk.availability(fam, be, device.type)
        if not ok:
            r.update(status="SKIP", why=why)
        elif time.monotonic() > t_end:
            r.update(status="SKIP", why=f"stage budget of {args.budget_s:.0f} s used up")
        else:
            t0 = time.perf_counter()
            try:
                problems, seed = thunk(device)
                r.update(status="FAIL" if problems else "PASS", problems=problems, seed=seed)
            except Exception as e:
                r.update(status="FAIL", problems=[f"{type(e).__name__}: {e}"],
                         traceback=traceback.format_exc()[-3000:])
            r["seconds"] = round(time.perf_counter() - t0, 3)
        doc["results"].append(r)
        doc["families"] = _summary(doc["results"])
        _write_json(args.out, doc)
        if r["status"] == "FAIL":
            _log(f"  smoke FAIL {fam} [{be}] {label}: {'; '.join(r['problems'])[:400]}")
    doc["families"] = _summary(doc["results"])
    _write_json(args.out, doc)
    for fam, st in doc["families"].items():
        rs = [r for r in doc["results"] if r["family"] == fam]
        per = {}
        for r in rs:
            per.setdefault(r["backend"], []).append(r)
        detail = "; ".join(
            f"{be}: " + ", ".join(f"{x['case']} {x['status'].lower()}" for x in xs)
            if any(x["status"] != "SKIP" for x in xs) else f"{be}: skip ({xs[0].get('why', '')[:60]})"
            for be, xs in per.items())
        _log(f"SMOKE {fam:<27} {st}  ({detail})")
    return 1 if "FAIL" in doc["families"].values() else 0


# ------------------------------------------------------------------------------ stage 3


def bench_groups(cfg):
    """(name, callable() -> rows) per group of ``pluglm bench``'s cases, in its order."""
    from . import model_bench, refresh_bench, sweep

    groups = []
    for M in cfg.search_M:
        groups.append((f"search M={M}", lambda M=M: sweep.bench_search(replace(cfg, search_M=(M,)))))
    for shape in cfg.attn_shapes:
        groups.append((f"attention {shape}",
                       lambda s=shape: sweep.bench_attention(replace(cfg, attn_shapes=(s,)))))
    for shape in cfg.attn_shapes:
        groups.append((f"gather attention {shape}",
                       lambda s=shape: model_bench.bench_gather_attention(replace(cfg, attn_shapes=(s,)))))
    for M in model_bench.memory_layer_sizes(cfg):
        groups.append((f"memory layer M={M}",
                       lambda M=M: model_bench.bench_memory_layer(replace(cfg, search_M=(M,)))))
    for M in model_bench.model_sizes(cfg):
        groups.append((f"model forward M={M}",
                       lambda M=M: model_bench.bench_model_forward(replace(cfg, search_M=(M,)))))
    groups.append(("refresh", lambda: refresh_bench.bench_refresh(cfg)))
    return groups


def cmd_bench(args) -> int:
    from .common import SweepConfig, machine_info

    t_end = time.monotonic() + args.budget_s
    gpu = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if gpu else "cpu"
    cfg = SweepConfig.make(device, quick=True)
    torch.manual_seed(0)
    doc = {"machine": machine_info(device), "config": asdict(cfg), "rows": [], "groups": [],
           "note": "pluglm bench --quick, written after each group (benchmarks/gpu_suite.sh)"}
    if args.append:  # keep what an earlier stage wrote there (the headline hook's rows)
        try:
            old = json.loads(Path(args.out).read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict):
            doc = {**old, **doc, "rows": list(old.get("rows", [])),
                   "groups": list(old.get("groups", []))}
    _write_json(args.out, doc)
    status = 0
    groups = bench_groups(cfg)
    if args.only:
        import re

        groups = [g for g in groups if re.search(args.only, g[0])]
    if args.max_groups is not None:
        groups = groups[: args.max_groups]
    for name, fn in groups:
        left = t_end - time.monotonic()
        if left < args.min_group_s:
            doc["groups"].append({"group": name, "status": "SKIP", "why": "stage budget used up"})
            _log(f"BENCH {name}: skipped (budget)")
            continue
        t0 = time.perf_counter()
        try:
            rows = fn()
            doc["rows"] += [asdict(r) for r in rows]
            doc["groups"].append({"group": name, "status": "OK", "rows": len(rows),
                                  "seconds": round(time.perf_counter() - t0, 2)})
            for r in rows:
                _log(f"BENCH {r.bench} | {r.impl} | {r.shape} | {r.median_ms:.3f} ms"
                     + (f" | {r.pct_roofline:.0f}% of copy bw" if r.pct_roofline else ""))
        except Exception as e:
            status = 1
            doc["groups"].append({"group": name, "status": "ERROR",
                                  "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]})
            _log(f"BENCH {name}: ERROR {type(e).__name__}: {e}")
        _write_json(args.out, doc)
        if gpu:
            torch.cuda.empty_cache()
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m pluglm.bench.gpu_smoke",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("facts", "smoke", "bench"):
        s = sub.add_parser(name)
        s.add_argument("out", help="the JSON file to write")
        s.add_argument("--dry-run", action="store_true", help="CPU only, even where a GPU exists")
        s.add_argument("--budget-s", type=float, default=120.0)
        if name == "smoke":
            s.add_argument("--backends", default="cuda,triton")
            s.add_argument("--append", action="store_true", help="add to an existing file")
        if name == "bench":
            s.add_argument("--max-groups", type=int, default=None)
            s.add_argument("--append", action="store_true",
                           help="keep the rows already in the file and add to them")
            s.add_argument("--only", default=None, help="regex on group names")
            s.add_argument("--min-group-s", type=float, default=10.0,
                           help="start no group with less time than this left")
    args = ap.parse_args(argv)
    return {"facts": cmd_facts, "smoke": cmd_smoke, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
