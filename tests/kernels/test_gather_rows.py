"""pluglm_kernels.gather_rows: the row gather behind zero-copy reads of host tables
(docs/design.md, "Placement"). Triton under TRITON_INTERPRET=1 (CPU tensors) or on CUDA
(tables on the device and in pinned host memory), against the reference; every table dtype
a memory stores, odd widths (one block and several), strided rows, empty gathers, errors."""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels as pk

from conftest import triton_device

pytestmark = pytest.mark.triton

DEV = triton_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16,
          torch.uint16, torch.int32, torch.int64]


def _table(M, C, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(M, C, generator=gen).to(dtype)
    hi = 60000 if dtype == torch.uint16 else min(torch.iinfo(dtype).max, 2**31 - 1)
    return torch.randint(0, hi, (M, C), generator=gen, dtype=torch.int64).to(dtype)


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.uint16 else t


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("C", [1, 7, 769, 2053])
def test_matches_reference(dtype, C):
    gen = torch.Generator().manual_seed(C)
    M = 37
    table = _table(M, C, dtype, gen)
    idx = torch.randint(0, M, (3, 5), generator=gen)
    idx[0, :2] = torch.tensor([0, M - 1])  # both ends, and repeats below
    idx[2] = idx[1]
    tab = table if DEV == "cpu" else table.pin_memory()
    got = pk.gather_rows(tab, idx.to(DEV), backend="triton")
    want = pk.gather_rows(table, idx, backend="reference")
    assert got.shape == (3, 5, C) and got.dtype == dtype and got.device.type == DEV
    assert torch.equal(_bits(got.cpu()), _bits(want))
    assert torch.equal(_bits(want), _bits(table[idx]))


def test_strided_rows_empty_and_auto():
    gen = torch.Generator().manual_seed(1)
    wide = _table(20, 300, torch.int16, gen)
    cut = wide[:, :17]  # a column slice of a token table: row stride 300
    idx = torch.tensor([19, 0, 4])
    got = pk.gather_rows(cut if DEV == "cpu" else cut.pin_memory(), idx.to(DEV), backend="triton")
    assert torch.equal(got.cpu(), cut[idx])
    empty = pk.gather_rows(wide, torch.zeros(0, 2, dtype=torch.int64), backend="triton") \
        if DEV == "cpu" else None
    assert empty is None or empty.shape == (0, 2, 300)
    # "auto" on host tables with host ids is the reference path (nothing to read remotely)
    assert torch.equal(pk.gather_rows(wide, idx), wide[idx])


def test_errors_name_the_argument():
    t = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        pk.gather_rows(t, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        pk.gather_rows(t, torch.tensor([-1]), backend="triton")
    with pytest.raises(TypeError, match="indices must have dtype"):
        pk.gather_rows(t, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="table must have 2 dimensions"):
        pk.gather_rows(torch.randn(10), torch.tensor([1]))
    with pytest.raises(TypeError, match="table must have dtype"):
        pk.gather_rows(torch.ones(10, 2, dtype=torch.bool), torch.tensor([1]))
    with pytest.raises(ValueError, match="backend must be"):
        pk.gather_rows(t, torch.tensor([1]), backend="cuda")
    with pytest.raises(ValueError, match="contiguous columns"):
        pk.gather_rows(torch.randn(4, 10).t(), torch.tensor([1]), backend="triton") \
            if DEV == "cpu" else pk.gather_rows(torch.randn(4, 10, device="cuda").t(),
                                                torch.tensor([1], device="cuda"), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_table_read_from_the_device_without_host_sync():
    """The table stays in pinned host memory; ids stay on the device; rows land there."""
    table = torch.randn(100_000, 256).pin_memory()
    idx = torch.randint(0, 100_000, (64, 5), device="cuda")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = pk.gather_rows(table, idx)  # auto: the Triton zero-copy path
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 20
    assert torch.equal(got.cpu(), table[idx.cpu()])
    with pytest.raises(ValueError, match="pinned"):
        pk.gather_rows(torch.randn(10, 4), idx.clamp(max=9), backend="triton")
