"""The ``pluglm`` command: ``info`` (backends, devices, versions), ``bench`` (the sweep), and
the memory commands ``build-memory``, ``query``, ``explain``, ``add``, ``remove``, ``demo``
(``pluglm.cli_memory``, ``pluglm.demo``).

Expected errors (missing file, bad format, incompatible memory, bad arguments) print one line,
``pluglm <command>: error: ...``, and exit non-zero; set PLUGLM_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block + error), like the runtime ones."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def cmd_info(args) -> int:
    import platform

    import torch
    from rich.console import Console
    from rich.table import Table

    import pluglm_kernels as pk
    from pluglm_kernels import _backends

    console = Console()
    mod, why = _backends.load_extension()
    console.print(f"pluglm {pk.__version__}  python {platform.python_version()}  torch {torch.__version__}"
                  f" (CUDA {torch.version.cuda})")
    tstat, twhy = _backends.triton_status()
    if tstat:
        import triton

        console.print(f"triton {triton.__version__}"
                      + ("  (TRITON_INTERPRET=1: Triton runs on CPU tensors)" if _backends.triton_interpret() else ""))
    else:
        console.print(f"triton: missing ({twhy})")
    if mod is None:
        console.print(f"extension pluglm_kernels._C: missing ({why})")
    else:
        console.print(f"extension pluglm_kernels._C: built; CPU kernels with OpenMP "
                      f"({mod.openmp_max_threads()} threads); CUDA kernels "
                      + ("compiled" if mod.cuda_built() else "not compiled (no nvcc or CPU-only torch at build time)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            console.print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        console.print("CUDA devices: none")
    t = Table(title="backends per op")
    for col in ("op", "backend", "status", "why"):
        t.add_column(col)
    for r in pk.backend_report():
        status = "available" if r["available"] else ("built" if r["built"] else "missing")
        t.add_row(r["op"], r["backend"], status, r["why"])
    console.print(t)
    return 0


def cmd_bench(args) -> int:
    if args.quality:  # the trained-model experiment, not the latency sweep
        from .bench.quality import main as quality_main

        return quality_main(args)
    import torch
    from rich.console import Console

    from .bench import report
    from .bench.sweep import SweepConfig, run_sweep

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


def build_parser() -> argparse.ArgumentParser:
    from .cli_memory import add_parsers

    p = _Parser(prog="pluglm", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="which backends are built and available here, and why not")
    s.set_defaults(func=cmd_info)
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
    add_parsers(sub)
    return p


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        # ids typed after an option (remove DIR --source X 3 4) are still ids
        field = getattr(args, "extra_ints", None)
        if field and all(x.lstrip("-").isdigit() for x in extra):
            setattr(args, field, getattr(args, field) + [int(x) for x in extra])
        else:
            print(f"pluglm {args.command}: error: unrecognized arguments: {' '.join(extra)} "
                  f"(see 'pluglm {args.command} --help')", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from .cli_memory import one_line

        msg = one_line(e)
        if msg is None or os.environ.get("PLUGLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"pluglm {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
