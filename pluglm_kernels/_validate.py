"""Argument checks of the public wrappers, and the limits they state.

Where validation lives (one place per call): the public functions of
``pluglm_kernels.functional`` check every argument here, before any kernel launch, with a
``TypeError`` / ``ValueError`` naming the argument and what was expected, and do the
data-dependent checks (finite queries, index ranges) with at most one host sync per call.
The ``torch.ops.pluglm.*`` custom ops behind them only dispatch; called directly, bad
input is refused by the kernel they reach (the native ``_C_*`` ops keep O(1) metadata
guards, ``TORCH_CHECK`` -> ``RuntimeError``, because they index raw pointers; the Triton
launchers and the references raise too). See docs/design.md.

The limits below are the only copies in ``pluglm_kernels``; ``csrc/kernel_limits.h`` states
``MAX_K`` for the native kernels and a test checks that the two agree.
"""
from __future__ import annotations

import torch

from ._backends import BACKENDS

# Float dtypes the kernels take for activations and tables (int8 keys need per-row scales:
# quantize_keys); float64 runs through backend="reference" only.
FLOAT_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_FLOAT_DTYPES = FLOAT_TABLE_DTYPES + (torch.float64,)
# Largest k of mips_topk on every backend (csrc/kernel_limits.h: kMaxK).
MAX_K = 2048


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    if t.shape != expected:  # torch.Size compares equal to a tuple of the same ints
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def integer(name: str, v, *, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.SymInt):
            return v
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must be in {rng}{extra}, got {v}")
    return v


def probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def backend(name: str, b) -> str:
    if b not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {b!r}")
    return b
