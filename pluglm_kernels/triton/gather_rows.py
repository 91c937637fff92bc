"""Triton row gather: ``out[r] = table[idx[r]]``, for tables in pinned host memory.

Semantics: ``pluglm_kernels.reference.gather_rows``. The point is where the table may live:
a CUDA launch may be given a table in pinned (page-locked) host memory, whose address is a
valid device address under unified virtual addressing (Triton's launcher accepts such a
pointer), so the kernel reads the retrieved rows straight over the bus: no copy of the ids
to the host, no staging copy. That is the zero-copy read of a memory whose values live on
the host (docs/design.md, "Placement").

- ``gather_rows_fwd(table [M, C], idx [n] int64, out [n, C])``: table rows may be strided
  (unit column stride: a column slice of a token table); one program per (row, block of
  columns). Out-of-range ids store zero rows (and trip ``tl.device_assert`` under
  TRITON_DEBUG=1); the public wrapper checks them first.

Plain launcher that runs on CUDA tensors (the table: CUDA or pinned host), or on CPU tensors
under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pluglm_kernels.triton._device import on_tensor_device

_MAX_BLOCK = 1024


@triton.jit
def _gather_rows_kernel(T, IDX, OUT, C, stride_t, M, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(IDX + r).to(tl.int64)
    ok = (i >= 0) & (i < M)
    tl.device_assert(ok, "row id out of range")
    inside = cols < C
    x = tl.load(T + i * stride_t + cols, mask=inside & ok, other=0)
    tl.store(OUT + r * C + cols, x, mask=inside)


@on_tensor_device
def gather_rows_fwd(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n, C = out.shape
    if n == 0 or C == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(C))
    grid = (n, triton.cdiv(C, block))
    _gather_rows_kernel[grid](table, idx, out, C, table.stride(0), table.shape[0], BLOCK=block,
                              num_warps=4 if block >= 512 else 1)
    return out


__all__ = ["gather_rows_fwd"]
