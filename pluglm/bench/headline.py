"""The headline case of the one-call GPU suite (``benchmarks/gpu_suite.sh``, its HEADLINE
HOOK; issue 14): what a memory costs per forward pass on the device. The pair of
``pluglm bench --large``'s "cost of a memory" rows (``large.cost_pair_rows``): a PlugLM
forward in BERT-base geometry (T = 128, the top FFN block a memory layer) against the dense
BERT-base forward, and one memory layer against the dense FFN sublayer it replaces, each
pair timed in alternating calls after a warm-up (CUDA events per call on a GPU), medians,
peak memory per case; int8 and float32 keys, values on demand and stored, M = 1e6 then 1e7.

    python3 benchmarks/gpu_headline.py OUT_JSON --budget-s S [--dry-run] [--device cpu --tiny]

OUT_JSON is read (the suite's bench.json, ``pluglm bench``'s results format, or absent) and
rewritten atomically after every case with the new rows appended to its "rows" and one
entry per case in its "headline" list, so a run cut off keeps what it measured. A case is
started only when its predicted time (the previous case's, times 1.5) fits what is left of
S. ``--dry-run`` (or ``--device cpu --tiny``): a 2-layer d = 64 model, tiny memories, two
rounds, on the CPU, so CI exercises the code path anywhere.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128}
# (M, key dtype, stored values), most important first: the headline row is the first
CASES = ((1_000_000, torch.int8, False), (1_000_000, torch.float32, False),
         (1_000_000, torch.float32, True), (10_000_000, torch.int8, False))
TINY_CASES = ((2_000, torch.int8, False), (2_000, torch.float32, True))


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    doc.setdefault("rows", [])
    doc.setdefault("headline", [])
    return doc


def _write(path: Path, doc: dict) -> None:
    from .report import atomic_write

    atomic_write(path, (json.dumps(doc, indent=1, default=str) + "\n").encode())


def run(out: Path, budget_s: float, device: str, tiny: bool, dtype: torch.dtype,
        rounds: int, log=print) -> int:
    from .common import machine_info
    from .large import cost_models, cost_pair_rows, synthetic_memory

    t_end = time.monotonic() + budget_s
    dev = torch.device(device)
    doc = _load(out)
    doc["headline_machine"] = machine_info(device)
    _write(out, doc)
    t0 = time.perf_counter()
    dense, plug = cost_models(TINY if tiny else None, device=dev, dtype=dtype)
    setup_s = time.perf_counter() - t0
    hidden, key_dim = dense.config.hidden_size, plug.config.key_dim
    log(f"HEADLINE models on {dev} ({dtype}) in {setup_s:.1f}s")
    status, last_s, last_M, first = 0, None, 1, True
    for M, kdt, values in (TINY_CASES if tiny else CASES):
        kname = str(kdt).replace("torch.", "")
        name = f"M={M} {kname} keys, " + ("stored values" if values else "values on demand")
        left = t_end - time.monotonic()
        need = 20.0 if last_s is None else 1.5 * last_s * (M / last_M if M > last_M else 1)
        if left < need:
            doc["headline"].append({"case": name, "status": "SKIP",
                                    "why": f"{left:.0f}s left, ~{need:.0f}s needed"})
            log(f"HEADLINE {name}: skipped ({left:.0f}s left, ~{need:.0f}s needed)")
            _write(out, doc)
            continue
        t0 = time.perf_counter()
        try:
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                need_b = M * (key_dim * kdt.itemsize + 128 * 2 + (hidden * 4 if values else 0))
                if 2 * need_b > free:
                    raise MemoryError(f"{need_b / 1e9:.1f} GB of tables, {free / 1e9:.1f} GB free")
            mem = synthetic_memory(M, key_dim, key_dtype=kdt, vocab=dense.config.vocab_size,
                                   value_dim=hidden if values else None).to(dev)
            if values and dtype != torch.float32:
                mem = mem.with_layout(value_dtype=dtype)
            rows = []
            for B in (1, 8):
                rows += cost_pair_rows(
                    dense, plug, mem, B, 128, device=dev, rounds=rounds,
                    budget_s=0.0, dense_rows=first, kind=name.split(" ", 1)[1], log=log,
                    shape_extra=dict(M=M, dtype=kname, values="stored" if values else "on demand",
                                     model_dtype=str(dtype).replace("torch.", "")))
            for r in rows:
                r.note = "gpu_headline: interleaved pair, " + (
                    "CUDA events" if dev.type == "cuda" else "wall clock")
            first = False
            doc["rows"] += [asdict(r) for r in rows]
            last_s, last_M = time.perf_counter() - t0, M
            doc["headline"].append({"case": name, "status": "OK", "rows": len(rows),
                                    "seconds": round(last_s, 1)})
            for r in rows:
                log(f"HEADLINE {r.impl} | {r.shape} | {r.median_ms:.3f} ms | "
                    f"peak {r.peak_mb} MB | {r.extra.get('ratio_to_dense', '')}")
            del mem
        except Exception as e:  # one case's failure must not lose the others
            status = 1
            last_s, last_M = time.perf_counter() - t0, M
            doc["headline"].append({"case": name, "status": "ERROR",
                                    "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-3000:]})
            log(f"HEADLINE {name}: ERROR {type(e).__name__}: {e}")
        _write(out, doc)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 benchmarks/gpu_headline.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the JSON file to read and rewrite (bench.json)")
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny model and memories (what CI and the suite's dry run use)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer d=64 model, 2000-entry memories")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the models' dtype (both of them)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved calls per pair (default 25 on a GPU, 2 with --tiny)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        device = "cpu"
    tiny = args.tiny or args.dry_run
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_headline: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    if device == "cpu" and not tiny:
        print("gpu_headline: note: BERT-base on the CPU takes minutes (pluglm bench --large "
              "has these rows for the CPU)", file=sys.stderr)
    rounds = args.rounds or (2 if tiny else 25)
    return run(Path(args.out), args.budget_s, device, tiny, getattr(torch, args.dtype), rounds)


__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
