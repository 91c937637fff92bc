"""``pluglm bench``: the latency and memory sweep (``pluglm.bench``) with its table, JSON,
Markdown and plots. Its options are all declared in :func:`add_parser`."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    """The ``bench`` command and every option it takes."""
    s = sub.add_parser("bench", help="latency and memory sweep against the baselines")
    s.add_argument("--quick", action="store_true", help="fewer points (< 3 minutes on 2 CPU cores)")
    s.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    s.add_argument("--out", default="bench-out", help="folder for results.json/.md and plots")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--large", action="store_true",
                   help="memories of 1e6..2e7 entries on the CPU: built on disk, mapped, searched")
    s.add_argument("--max-m", type=int, default=None, help="with --large: largest M (entries)")
    s.add_argument("--quality", action="store_true",
                   help="train a small PlugLM and measure that it reads, updates and swaps its "
                        "knowledge (writes quality.json/.md and plots; --quick: one seed, "
                        "no ablation)")
    s.add_argument("--seed", type=int, default=0, help="--quality: seed of the knowledge base and first run")
    s.add_argument("--jobs", type=_positive_int, default=None,
                   help="--quality: worker processes, one torch thread each, running the seeds, "
                        "ablation runs and backend check side by side (default: one per core; "
                        "1: everything in this process with torch's default threads)")
    s.set_defaults(func=cmd_bench)


def _positive_int(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of worker processes, got {text!r}")
    return n


def cmd_bench(args) -> int:
    if args.quality:  # the trained-model experiment, not the latency sweep
        from ..bench.quality import main as quality_main

        return quality_main(args)
    import torch
    from rich.console import Console

    from ..bench import report
    from ..bench.sweep import SweepConfig, run_sweep

    if getattr(args, "large", False):
        return _cmd_large(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("pluglm bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    # a wide table even when piped to a file or a CI log
    console = Console(width=None if sys.stdout.isatty() else 200)
    cfg = SweepConfig.make(device, args.quick)
    result = run_sweep(cfg, show_progress=not args.no_progress)
    report.print_table(result, console)
    written = report.write_all(result, Path(args.out))
    console.print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_large(args) -> int:
    from rich.console import Console

    from ..bench import report
    from ..bench.large import LargeConfig, run_large

    if args.max_m is not None and args.max_m < 1:
        print(f"pluglm bench: error: --max-m must be a positive number of entries, got "
              f"{args.max_m}", file=sys.stderr)
        return 2
    out = Path(args.out)
    console = Console(width=None if sys.stdout.isatty() else 200)
    cfg = LargeConfig.make(args.max_m, str(out / "memories"))
    partial = lambda res: report.atomic_write(  # noqa: E731
        out / "results.partial.json", __import__("json").dumps(res, indent=1).encode())
    result = run_large(cfg, show_progress=not args.no_progress, log=console.print, partial=partial)
    report.print_table(result, console)
    written = report.write_all(result, out)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return 0
