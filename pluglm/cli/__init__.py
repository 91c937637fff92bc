"""The ``pluglm`` command: ``info`` (backends, devices, versions), ``bench`` (the sweep), the
memory commands ``build-memory``, ``query``, ``explain``, ``add``, ``remove``, ``demo``, and
``convert-published``.

One module per command group (``info``, ``bench``, ``memory``, ``demo``, ``convert``), each
with an ``add_parser(sub)`` that registers its commands; what they share is in ``common``.

Expected errors (missing file, bad format, incompatible memory, bad arguments) print one line,
``pluglm <command>: error: ...``, and exit non-zero; set PLUGLM_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import bench, convert, demo, info, memory
from .common import Parser, one_line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pluglm", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info.add_parser(sub)
    bench.add_parser(sub)
    memory.add_parser(sub)
    demo.add_parser(sub)
    convert.add_parser(sub)
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
        msg = one_line(e)
        if msg is None or os.environ.get("PLUGLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"pluglm {args.command}: error: {msg}", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
