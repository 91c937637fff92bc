"""Render sweep results: a terminal table, JSON, Markdown and PNG plots."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={_fmt_num(v)}" for k, v in shape.items())


def _fmt_num(v):
    if isinstance(v, int) and v >= 10_000:
        return f"{v:.0e}".replace("e+0", "e")
    return str(v)


def _fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}g}"


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        out.append([r["bench"], _shape_str(r["shape"]), r["impl"], _fmt(r["median_ms"]),
                    f"{_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])}", f"{r['throughput']:.3g} {r['throughput_unit']}",
                    _fmt(r["peak_mb"]), _fmt(r["pct_roofline"]),
                    _fmt(r.get("extra", {}).get("recall_at_k")),
                    _fmt(r.get("extra", {}).get("ratio_to_dense"))])
    return out


HEADERS = ["bench", "shape", "implementation", "median ms", "p20-p80 ms", "throughput",
           "peak MB", "% roofline", "recall@k", "x dense"]


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result["machine"]
    title = f"pluglm bench on {m.get('gpu') or m['cpu']} ({m['threads']} threads, torch {m['torch']})"
    t = Table(title=title)
    for h in HEADERS:
        t.add_column(h, justify="right" if h not in ("bench", "shape", "implementation") else "left")
    for row in table_rows(result):
        t.add_row(*row)
    console.print(t)


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m.get('gpu') or m['cpu']}, {m['threads']} threads; torch {m['torch']}, "
             f"triton {m.get('triton')}; python {m['python']}", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per benchmark that varies M: latency and peak memory against M, log-log, one
    line per implementation (for the most common setting of the other shape parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = result["machine"].get("gpu") or result["machine"]["cpu"]
    written = []
    for bench in dict.fromkeys(r["bench"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["bench"] == bench and "M" in r["shape"]]
        if len({r["shape"]["M"] for r in rows}) < 2:
            continue
        rest = lambda r: tuple(sorted((k, v) for k, v in r["shape"].items() if k != "M"))  # noqa: E731
        groups: dict = {}
        for r in rows:
            groups.setdefault(rest(r), []).append(r)
        key = _pick_group(groups)
        sel = groups[key]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, label in ((axes[0], "median_ms", "latency, median (ms)"),
                                  (axes[1], "peak_mb", "peak extra memory (MB)")):
            for impl in dict.fromkeys(r["impl"] for r in sel):
                pts = sorted((r["shape"]["M"], r[metric]) for r in sel
                             if r["impl"] == impl and r[metric] is not None and r[metric] > 0)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("memory size M (entries)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{bench} — {', '.join(f'{k}={v}' for k, v in key)}\n{machine}", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / (bench.replace(" ", "_").replace("(", "").replace(")", "")
                                .replace("+", "_").replace("-", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _pick_group(groups: dict):
    # the configuration of the headline targets (d=128, B=32, k=5) if present, else the
    # one with the most points
    for g in groups:
        if dict(g).get("d") == 128 and dict(g).get("B") == 32 and dict(g).get("k") == 5:
            return g
    return max(groups, key=lambda g: len(groups[g]))


def write_results(result: dict, out_dir, stem: str, to_markdown, plot) -> list[Path]:
    """``stem``.json and ``stem``.md (atomically) and the plots into out_dir; the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, data in ((".json", json.dumps(result, indent=1)), (".md", to_markdown(result))):
        p = out_dir / f"{stem}{suffix}"
        atomic_write(p, data.encode())
        written.append(p)
    try:
        written += plot(result, out_dir)
    except ImportError:
        pass  # matplotlib is an optional extra: the table, JSON and Markdown still stand
    return written


def write_all(result: dict, out_dir: Path) -> list[Path]:
    return write_results(result, out_dir, "results", to_markdown, plot)
