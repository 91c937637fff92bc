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
    s.add_argument("--quality", action="store_true",
                   help="train a small PlugLM and measure that it reads, updates and swaps its "
                        "knowledge (writes quality.json/.md and plots; --quick: CI size)")
    s.add_argument("--seed", type=int, default=0, help="--quality: seed of the knowledge base and first run")
    s.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.quality:  # the trained-model experiment, not the latency sweep
        from ..bench.quality import main as quality_main

        return quality_main(args)
    import torch
    from rich.console import Console

    from ..bench import report
    from ..bench.sweep import SweepConfig, run_sweep

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
