"""Compile every Triton kernel of pluglm_kernels for real GPU targets, with no GPU.

The CPU test suite runs the Triton kernels under TRITON_INTERPRET=1, which accepts code a
GPU compile rejects (tl.dot shapes and dtypes, sorts, block sizes, shared memory). This
script takes the GPU path instead: it calls the real launchers on ``meta`` tensors (no
memory, any shape) with a stand-in Triton driver that reports a CUDA target, catches the
compile request each launch makes (signature, constexprs, divisibility attributes,
num_warps / num_stages: exactly what the launcher would compile on a card) through
``triton.knobs.runtime.jit_cache_hook``, and compiles it with ``triton.compile`` down to a
cubin with Triton's bundled ptxas, for sm_90 and sm_80. Nothing mirrors the launchers'
block-size choices, so a change there is picked up here.

Per compiled kernel it reports registers, spill bytes and stack (from ``ptxas -v``), the
dynamic shared memory Triton allocates (``metadata.shared``), and flags a kernel that
could not launch (shared memory over the card's per-block limit, registers x threads over
64K).

Usage: python tools/triton_aot_check.py [--subset test|quick|full] [--arch 90,80] [--jobs N]
       [--filter REGEX] [--json PATH] [--keep-cache]
Exit status: 0 all compiled and fit; 1 some failed; 77 the AOT path is unavailable here.
Must run without TRITON_INTERPRET (Triton decides interpretation when a kernel is
decorated), so it removes the variable before importing triton.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported, see the docstring

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

SKIP = 77
# Per-block limits that make a launch fail (cudaFuncSetAttribute / OutOfResources).
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}  # opt-in dynamic smem, bytes
REGS_PER_BLOCK = 65536

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unavailable(reason: str):
    print(f"SKIP: {reason}")
    sys.exit(SKIP)


# ---------------------------------------------------------------------------- capture


class _FakeDriver:
    """Just enough of a Triton driver for JITFunction.run to reach the compile step."""

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _HookAPIChanged(RuntimeError):
    """This Triton's jit_cache_hook does not pass what the capture needs."""


class _Request:
    """One compile request caught from a launch: what the launcher would compile."""

    def __init__(self, case, fn, compile_kw):
        self.case = case
        self.fn = fn  # the JITFunction
        self.signature = dict(compile_kw["signature"])
        self.constants = dict(compile_kw["constants"])
        self.attrs = dict(compile_kw["configs"][0])
        self.options = {k: compile_kw[k] for k in ("num_warps", "num_ctas", "num_stages",
                                                   "enable_fp_fusion") if k in compile_kw}
        self.cases = [case]

    @property
    def name(self):
        return self.fn.__name__

    def key(self):
        return (self.name, tuple(self.signature.items()), repr(sorted(self.constants.items())),
                repr(sorted(self.attrs.items())), tuple(sorted(self.options.items())))

    def constexpr_str(self):
        names = list(self.signature)
        parts = []
        for path, v in sorted(self.constants.items()):
            n = names[path[0]] if len(path) == 1 else str(path)
            if self.signature.get(n) != "constexpr":
                n += "(=spec)"  # a runtime int the launcher's value specialised (== 1)
            parts.append(f"{n}={int(v) if isinstance(v, bool) else v}")
        return " ".join(parts)

    def ptr_str(self):
        return ",".join(t for t in self.signature.values() if t.startswith("*"))


def capture(cases, target):
    """Run each (case name, thunk) launcher call on meta tensors; return unique requests."""
    import triton
    from triton import knobs

    got = []

    def hook(**kw):
        fn = getattr(kw.get("fn"), "jit_function", None)
        req = kw.get("compile") or {}
        if fn is None or not {"signature", "constants", "configs"} <= set(req):
            raise _HookAPIChanged(f"jit_cache_hook got {sorted(kw)} / {sorted(req)}")
        got.append((fn, req))
        return True  # "handled": JITFunction.run returns before compiling or launching

    old_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    triton.runtime.driver.set_active(_FakeDriver(target))
    uniq, errors = {}, []
    try:
        for name, thunk in cases:
            got.clear()
            try:
                thunk()
            except _HookAPIChanged:
                raise
            except Exception as e:  # a launcher bug shows here, before any compile
                errors.append((name, f"{type(e).__name__}: {e}"))
                continue
            if not got:
                errors.append((name, "launcher made no kernel launch"))
            for fn, kw in got:
                r = _Request(name, fn, kw)
                if r.key() in uniq:
                    uniq[r.key()].cases.append(name)
                else:
                    uniq[r.key()] = r
    finally:
        knobs.runtime.jit_cache_hook = old_hook
    return list(uniq.values()), errors


# ---------------------------------------------------------------------------- compile

_REQUESTS: list = []  # filled before the worker pool forks; workers index into it

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(job):
    i, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    r = _REQUESTS[i]
    res = dict(index=i, kernel=r.name, arch=arch, case=r.case, n_cases=len(r.cases),
               constexprs=r.constexpr_str(), ptrs=r.ptr_str(), ok=False, compiled=False,
               error=None,
               regs=None, spill_st=None, spill_ld=None, stack=None, smem=None,
               num_warps=r.options.get("num_warps"), num_stages=r.options.get("num_stages"))
    src = ASTSource(r.fn, r.signature, r.constants, r.attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        # ptxas' -v log is print()-ed when dump_ptxas_log is on; a failing ptxas prints the
        # whole PTX, which stays in this buffer instead of the table.
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=r.options)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        res["seconds"] = round(time.perf_counter() - t0, 2)
        return res
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["compiled"] = True
    md = ck.metadata
    res["smem"] = int(md.shared)
    text = log.getvalue()
    m = _PTXAS_REGS.search(text)
    if m:
        res["regs"] = int(m.group(1))
    m = _PTXAS_SPILL.search(text)
    if m:
        res["stack"], res["spill_st"], res["spill_ld"] = map(int, m.groups())
    if res["regs"] is None:
        res["regs"] = _regs_from_cubin(ck.asm["cubin"])
    problems = []
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and res["smem"] > limit:
        problems.append(f"shared memory {res['smem']} B > {limit} B per block on sm_{arch}")
    threads = md.num_warps * 32 * getattr(md, "num_ctas", 1)
    if res["regs"] is not None and res["regs"] * threads > REGS_PER_BLOCK:
        problems.append(f"{res['regs']} regs x {threads} threads > {REGS_PER_BLOCK}")
    res["ok"] = not problems
    res["error"] = "; ".join(problems) or None
    return res


def _regs_from_cubin(cubin: bytes):
    """Fallback when the ptxas log was not captured (e.g. another Triton version)."""
    import subprocess

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- cases


def cases(subset: str):
    """(name, thunk) pairs: each thunk calls one real launcher on meta tensors.

    subset "test": one or two launches per kernel, picked for cheap compiles that still
    cover every kernel, dtype family and code path (the pytest run); "quick": the shapes
    most likely to hit a limit; "full": the sweep (tens of minutes on 2 cores)."""
    import torch

    from pluglm_kernels.triton import encode_knowledge as tek
    from pluglm_kernels.triton import knowledge_attention as tka
    from pluglm_kernels.triton.mips_topk import mips_topk_triton

    def E(shape, dtype=torch.float32):  # no storage: shapes can be realistic
        return torch.empty(shape, dtype=dtype, device="meta")

    f32, f16, bf16, i8 = torch.float32, torch.float16, torch.bfloat16, torch.int8
    short = {f32: "f32", f16: "f16", bf16: "bf16", i8: "int8"}
    out = []

    # ---- mips_topk: memory of 1M keys; key_dim 128 (the default) and 768 (BERT width)
    # (q dtype, keys dtype, B, d, k, valid)
    if subset == "full":
        pairs = [(f32, f32), (f16, f16), (bf16, bf16), (f32, f16), (f32, bf16), (f16, i8),
                 (bf16, i8), (f32, i8)]
        mips = [(qd, kd, B, d, k, v) for qd, kd in pairs for B in (1, 32, 256)
                for d in (128, 768) for k in (5, 100, 1024, 2048) for v in (False, True)]
    elif subset == "quick":
        pairs = [(f32, f32), (f16, f16), (bf16, bf16), (f32, f16), (f16, i8), (bf16, i8),
                 (f32, i8)]
        mips = [(qd, kd, B, d, k, True) for qd, kd in pairs
                for B, d, k in ((1, 128, 5), (256, 768, 5), (32, 128, 100), (4, 128, 2048))]
    else:
        mips = [(f16, f16, 1, 128, 5, True), (bf16, i8, 256, 768, 5, False),
                (f32, f32, 32, 128, 100, False)]
    for qd, kd, B, d, k, has_valid in mips:
        def run(qd=qd, kd=kd, B=B, d=d, k=k, has_valid=has_valid):
            M = 1_000_003
            scales = E((M,)) if kd == i8 else None
            valid = E((M,), torch.bool) if has_valid else None
            mips_topk_triton(E((B, d), qd), E((M, d), kd), k, scales, valid)
        out.append((f"mips q={short[qd]} keys={short[kd]} B={B} d={d} k={k}"
                    f"{' valid' if has_valid else ''}", run))

    # ---- knowledge attention (+ gather): B=8 sequences of T=128, H heads of Dh
    # (dtype, N, H, Dh, dropout_p, seed, gather, direction)
    big_seed = 2**63 + 5  # both seed words >= 2^31: i64 arguments, not i32
    if subset == "full":
        ka = [(dt, N, H, Dh, p, 1234, g, dr) for dt in (f32, f16, bf16)
              for N in (5, 32, 100, 256) for H, Dh in ((16, 32), (12, 64), (8, 128))
              for p in (0.0, 0.1) for g in (False, True) for dr in ("fwd", "bwd")]
        # argument types of the RNG inputs (p=0.6: the threshold passes 2^31), one shape
        ka += [(dt, 32, 12, 64, p, seed, g, dr) for dt in (f32, f16, bf16)
               for p, seed in ((0.6, 1234), (0.1, big_seed), (0.6, big_seed))
               for g in (False, True) for dr in ("fwd", "bwd")]
    elif subset == "quick":
        ka = [(dt, N, H, Dh, 0.1, big_seed, True, dr) for dt in (f32, f16, bf16)
              for N, H, Dh in ((5, 12, 64), (256, 8, 128)) for dr in ("fwd", "bwd")]
    else:
        ka = [(f32, 5, 12, 64, 0.0, 0, False, "fwd"), (f32, 5, 12, 64, 0.0, 0, False, "bwd"),
              (bf16, 32, 12, 64, 0.1, big_seed, True, "fwd"),
              (bf16, 32, 12, 64, 0.1, big_seed, True, "bwd"),
              (f16, 100, 12, 64, 0.6, 1234, False, "bwd"),
              # the largest tiles (the backward splits N into chunks: two kernels)
              (f32, 256, 8, 128, 0.0, 0, False, "fwd"), (f16, 256, 8, 128, 0.0, 0, False, "bwd"),
              (f32, 256, 8, 128, 0.1, 0, True, "bwd")]
    for dt, N, H, Dh, p, seed, gather, direction in ka:
        def launch(dt=dt, N=N, H=H, Dh=Dh, p=p, seed=seed, gather=gather, direction=direction):
            B, T, M = 8, 128, 100_000
            q, go, o = E((B, T, H, Dh), dt), E((B, T, H, Dh), dt), E((B, T, H, Dh), dt)
            bias, beta, lse = E((B, N)), E((H,)), E((B, T, H))
            if gather:
                tk, tv, idx = E((M, H, Dh), dt), E((M, H, Dh), dt), E((B, N), torch.int64)
                if direction == "fwd":
                    tka.gather_knowledge_attention_fwd(q, tk, tv, idx, bias, beta, p, seed)
                else:
                    tka.gather_knowledge_attention_bwd(go, q, tk, tv, idx, bias, beta, o, lse, p,
                                                       seed)
            else:
                k, v = E((B, N, H, Dh), dt), E((B, N, H, Dh), dt)
                if direction == "fwd":
                    tka.knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
                else:
                    tka.knowledge_attention_bwd(go, q, k, v, bias, beta, o, lse, p, seed)
        out.append((f"ka {direction} {short[dt]} N={N} H={H} Dh={Dh} p={p}"
                    f"{' seed>=2^31' if seed >= 2**31 else ''}{' gather' if gather else ''}",
                    launch))

    # ---- knowledge encoder: docs of T=288 tokens, BERT tables (V=30522, D=768), Hp = D
    # (dtype, D, ids dtype, token types, position offset)
    if subset == "full":
        enc = [(dt, D, idt, tt, off) for dt in (f32, f16, bf16) for D in (768, 1024)
               for idt in (torch.int64, torch.int32) for tt in (False, True) for off in (0, 2)]
    elif subset == "quick":
        enc = [(dt, 768, torch.int64, True, 2) for dt in (f32, f16, bf16)]
    else:
        enc = [(f32, 768, torch.int64, True, 2), (bf16, 768, torch.int32, False, 0),
               (f16, 1024, torch.int64, True, 0)]
    for dt, D, idt, has_tt, off in enc:
        def encode(dt=dt, D=D, idt=idt, has_tt=has_tt, off=off):
            Edocs, T, V, P = 64, 288, 30522, 512 + off
            ids = E((Edocs, T), idt)
            tt = E((Edocs, T), idt) if has_tt else None
            word, pos, typ = E((V, D), dt), E((P, D), dt), E((2, D), dt)
            lnw, lnb = E((D,)), E((D,))
            h, mean, rstd = tek.embed_layernorm_fwd(ids, tt, word, pos, typ, lnw, lnb, 1e-12, off)
            tek.embed_layernorm_bwd(h, ids, tt, word, pos, typ, lnw, mean, rstd, off)
            mask = E((Edocs, T), torch.int64)
            u, w2, b2 = E((Edocs, T, D), dt), E((D,)), E((1,))
            pooled, alpha = tek.attentive_pool_fwd(h, mask, u, w2, b2)
            tek.attentive_pool_bwd(E((Edocs, D), dt), h, mask, u, w2, alpha)
        out.append((f"encode {short[dt]} D={D} ids={str(idt)[6:]}"
                    f"{' tt' if has_tt else ''} off={off}", encode))

    # ---- row gather (zero-copy reads of host tables): B*N = 1280 rows of a 1e6-row table
    # (dtype, columns, row stride): values of width 768 / 1024, a column slice of a token table
    i16, i32 = torch.int16, torch.int32
    short.update({i16: "int16", i32: "int32"})
    if subset == "full":
        gat = [(dt, C, C) for dt in (f32, f16, bf16) for C in (768, 1024, 4096)]
        gat += [(dt, w, 128) for dt in (i16, i32) for w in (17, 128)]
    else:
        gat = [(f32, 768, 768), (bf16, 1024, 1024), (i16, 17, 128), (i32, 128, 128)]
    for dt, C, stride in gat:
        def gather(dt=dt, C=C, stride=stride):
            from pluglm_kernels.triton.gather_rows import gather_rows_fwd

            table = E((1_000_000, stride), dt)[:, :C]
            gather_rows_fwd(table, E((1280,), torch.int64), E((1280, C), dt))
        out.append((f"gather {short[dt]} C={C} stride={stride}", gather))
    return out


# ---------------------------------------------------------------------------- main


def _table(results):
    hdr = (f"{'kernel':<20} {'sm':>3} {'ok':<4} {'warps':>5} {'stg':>3} {'regs':>4} "
           f"{'spill st/ld':>11} {'stack':>5} {'smem B':>7} {'sec':>5}  "
           "constexprs [ptrs] (first case, +n more)")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        spill = ("-" if r["spill_st"] is None else f"{r['spill_st']}/{r['spill_ld']}")
        lines.append(
            f"{r['kernel']:<20} {r['arch']:>3} {'ok' if r['ok'] else 'FAIL':<4} "
            f"{r['num_warps'] or '-':>5} {r['num_stages'] or '-':>3} "
            f"{r['regs'] if r['regs'] is not None else '-':>4} "
            f"{spill:>11} {r['stack'] if r['stack'] is not None else '-':>5} "
            f"{r['smem'] if r['smem'] is not None else '-':>7} {r['seconds']:>5}  "
            f"{r['constexprs']} [{r['ptrs']}] ({r['case']}"
            f"{', +%d' % (r['n_cases'] - 1) if r['n_cases'] > 1 else ''})")
        if r["error"]:
            lines.append("    -> " + r["error"].strip().splitlines()[0][:300])
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", choices=("test", "quick", "full"), default="quick")
    ap.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default=None, help="regex on case names")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the normal Triton cache (default: a fresh one, so all compile)")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]

    cache = None
    if not args.keep_cache:
        cache = tempfile.mkdtemp(prefix="triton-aot-")
        os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    sys.path.insert(0, ROOT)
    try:
        try:
            import torch  # noqa: F401
            import triton
            from triton import knobs
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource  # noqa: F401
        except Exception as e:  # old or missing triton
            _unavailable(f"triton AOT API unavailable: {type(e).__name__}: {e}")
        if not hasattr(knobs, "runtime") or not hasattr(knobs.runtime, "jit_cache_hook"):
            _unavailable(f"triton {triton.__version__} has no knobs.runtime.jit_cache_hook")
        if "nvidia" not in triton.backends.backends:
            _unavailable("triton has no CUDA backend")
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90).path
        except Exception as e:
            _unavailable(f"no ptxas: {e}")
        if not ptxas or not os.path.exists(ptxas):
            _unavailable(f"no ptxas at {ptxas!r}")

        all_cases = cases(args.subset)
        if args.filter:
            all_cases = [c for c in all_cases if re.search(args.filter, c[0])]
        t0 = time.perf_counter()
        try:
            reqs, launch_errors = capture(all_cases, GPUTarget("cuda", archs[0], 32))
        except _HookAPIChanged as e:
            _unavailable(f"triton {triton.__version__}: {e}")
        _REQUESTS[:] = reqs
        jobs = [(i, a) for i in range(len(reqs)) for a in archs]
        print(f"triton {triton.__version__}, ptxas {ptxas}: {len(all_cases)} launcher cases -> "
              f"{len(reqs)} distinct kernels x sm_{'/sm_'.join(map(str, archs))} "
              f"= {len(jobs)} compiles, {args.jobs} jobs", flush=True)
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # fork: workers inherit _REQUESTS (JITFunctions do not pickle)
            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as ex:
                results = list(ex.map(_compile_one, jobs))
        else:
            results = [_compile_one(j) for j in jobs]
        results.sort(key=lambda r: (r["kernel"], r["index"], -r["arch"]))
        wall = time.perf_counter() - t0
        print(_table(results))
        for name, err in launch_errors:
            print(f"LAUNCHER ERROR {name}: {err}")
        n_bad = sum(not r["ok"] for r in results) + len(launch_errors)
        n_ok = sum(r["ok"] for r in results)
        print(f"{n_ok}/{len(results)} compiled and fit; "
              f"{len(launch_errors)} launcher errors; {wall:.1f} s wall")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(triton=triton.__version__, results=results,
                               launch_errors=launch_errors, wall_s=wall), f, indent=1)
        return 1 if n_bad else 0
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
