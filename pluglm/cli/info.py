"""``pluglm info``: versions, devices, and which kernel backends are built and available here
(and why not)."""
from __future__ import annotations


def cmd_info(args) -> int:
    import platform

    import torch
    from rich.console import Console
    from rich.table import Table

    import pluglm_kernels as pk

    console = Console()
    mod, why = pk.load_extension()
    console.print(f"pluglm {pk.__version__}  python {platform.python_version()}  torch {torch.__version__}"
                  f" (CUDA {torch.version.cuda})")
    tstat, twhy = pk.triton_status()
    if tstat:
        import triton

        console.print(f"triton {triton.__version__}"
                      + ("  (TRITON_INTERPRET=1: Triton runs on CPU tensors)" if pk.triton_interpret() else ""))
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


def add_parser(sub) -> None:
    s = sub.add_parser("info", help="which backends are built and available here, and why not")
    s.set_defaults(func=cmd_info)
