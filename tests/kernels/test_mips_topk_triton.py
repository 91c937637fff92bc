"""Triton mips_topk launcher on CPU tensors under TRITON_INTERPRET=1 (tiny shapes), against
the float64 reference. Index sets must match except where reference scores tie."""
import os

# TRITON_INTERPRET is set by tests/conftest.py where no GPU exists

import pytest  # noqa: E402
import torch  # noqa: E402

import pluglm_kernels  # noqa: E402
from pluglm_kernels import reference  # noqa: E402

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="triton was imported before TRITON_INTERPRET=1 could be set"),
]

from pluglm_kernels.triton.mips_topk import mips_topk_triton  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def make_inputs(B, M, d, kdt, qdt=None, gen=None):
    """queries [B, d], keys [M, d] (+ scales [M] for int8) with fresh random values."""
    q = torch.randn(B, d, generator=gen)
    keys = torch.randn(M, d, generator=gen)
    scales = None
    if kdt == "int8":
        keys, scales = pluglm_kernels.quantize_keys(keys)
        q = q.to(qdt or torch.float32)
    else:
        keys = keys.to(DTYPES[kdt])
        q = q.to(qdt or DTYPES[kdt])
    return q, keys, scales


def check_topk(scores, idx, q, keys, k, scales=None, valid=None, rtol=2e-5):
    """Index sets equal to the float64 oracle's, except within the tolerance band of ties."""
    B = q.shape[0]
    assert scores.shape == (B, k) and idx.shape == (B, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    full = q.double() @ reference.dequantize_keys(keys, scales, torch.float64).T  # [B, M] tiny
    if valid is not None:
        full = full.masked_fill(~valid[None, :], float("-inf"))
    ref_s, ref_i = reference.mips_topk(q.double(), keys if scales is None else keys, k, scales,
                                       valid)
    n_valid = int(valid.sum()) if valid is not None else keys.shape[0]
    tol = rtol * (q.double().norm(dim=1, keepdim=True)
                  * reference.dequantize_keys(keys, scales, torch.float64).norm(dim=1).max())
    for b in range(B):
        got = idx[b]
        real = got[got >= 0]
        assert real.numel() == min(k, n_valid)
        assert torch.unique(real).numel() == real.numel(), "duplicate indices"
        assert bool((got[real.numel():] == -1).all())
        assert bool(torch.isneginf(scores[b, real.numel():]).all())
        s = scores[b, : real.numel()]
        assert bool((s[:-1] >= s[1:]).all()), "scores not sorted descending"
        true = full[b, real]
        assert bool(torch.isfinite(true).all()), "returned an invalid row"
        torch.testing.assert_close(s.double(), true, atol=float(tol[b]), rtol=0)
        kth = ref_s[b, real.numel() - 1].double()
        must = torch.nonzero(full[b] > kth + tol[b]).flatten()
        assert bool(torch.isin(must, real).all()), "missed a row that beats the k-th score"
        assert bool((true >= kth - tol[b]).all()), "returned a row below the k-th score"


@pytest.mark.parametrize("kdt", ["f32", "f16", "bf16", "int8"])
@pytest.mark.parametrize("B,M,d,k", [(3, 257, 37, 5), (1, 300, 40, 1), (5, 131, 19, 17)],
                         ids=lambda v: str(v))
def test_dtypes_odd_sizes(kdt, B, M, d, k):
    q, keys, scales = make_inputs(B, M, d, kdt)
    s, i = mips_topk_triton(q, keys, k, scales, None)
    check_topk(s, i, q, keys, k, scales)


@pytest.mark.parametrize("qdt", [torch.float16, torch.bfloat16], ids=["q_f16", "q_bf16"])
def test_int8_keys_half_queries(qdt):
    q, keys, scales = make_inputs(2, 203, 33, "int8", qdt=qdt)
    s, i = mips_topk_triton(q, keys, 9, scales, None)
    check_topk(s, i, q, keys, 9, scales)


@pytest.mark.parametrize("kdt", ["f16", "bf16"])
def test_f32_queries_half_keys(kdt):
    q, keys, _ = make_inputs(3, 150, 24, kdt, qdt=torch.float32)
    s, i = mips_topk_triton(q, keys, 7, None, None)
    check_topk(s, i, q, keys, 7)


def test_valid_mask_k_equals_valid_rows():
    q, keys, _ = make_inputs(2, 97, 21, "f32")
    valid = torch.rand(97) < 0.3
    valid[3] = True
    n_valid = int(valid.sum())
    s, i = mips_topk_triton(q, keys, n_valid, None, valid)
    check_topk(s, i, q, keys, n_valid, valid=valid)
    assert bool(valid[i].all())
    assert set(i[0].tolist()) == set(torch.nonzero(valid).flatten().tolist())


def test_fewer_valid_rows_than_k_pads_with_minus_one():
    # the op's wrapper raises here; the kernel's defined behaviour pads (torch.compile path)
    q, keys, _ = make_inputs(2, 40, 8, "f32")
    valid = torch.zeros(40, dtype=torch.bool)
    valid[[5, 17, 33]] = True
    s, i = mips_topk_triton(q, keys, 6, None, valid)
    check_topk(s, i, q, keys, 6, valid=valid)
    assert bool((i[:, 3:] == -1).all())


def test_k_equals_m_all_rows():
    q, keys, _ = make_inputs(2, 70, 16, "f16")
    s, i = mips_topk_triton(q, keys, 70, None, None)
    check_topk(s, i, q, keys, 70)
    assert sorted(i[0].tolist()) == list(range(70))


def test_k_larger_than_a_tile():
    q, keys, _ = make_inputs(2, 300, 12, "f32")
    s, i = mips_topk_triton(q, keys, 150, None, None)  # buffer 256 > the 128-row tile
    check_topk(s, i, q, keys, 150)


def test_duplicate_keys_tie_to_lower_index():
    # small integers: every summation order gives the same float, so duplicates tie exactly
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (10, 16), generator=g).float()
    keys = base.repeat(23, 1)[:229].contiguous()  # row r duplicates row r % 10
    q = torch.randint(-3, 4, (3, 16), generator=g).float()
    for kdt in (torch.float32, torch.float16):
        s, i = mips_topk_triton(q.to(kdt), keys.to(kdt), 30, None, None)
        ref_s, ref_i = reference.mips_topk(q.to(kdt).double(), keys.to(kdt).double(), 30)
        assert torch.equal(i, ref_i), "ties must go to the lower index, deterministically"
        torch.testing.assert_close(s, ref_s, atol=1e-4, rtol=1e-5)


def test_zero_scores_signed_zero_ties():
    # +0.0 and -0.0 scores are equal: the lower index must still come first
    keys = torch.zeros(50, 8)
    keys[7, 0] = -1.0
    keys[9, 0] = 1.0
    q = torch.zeros(1, 8)
    q[0, 0] = -0.0
    s, i = mips_topk_triton(q, keys, 5, None, None)
    assert i[0].tolist() == [0, 1, 2, 3, 4]


def test_multi_chunk_d():
    q, keys, _ = make_inputs(2, 90, 150, "f16")  # d > one 128-wide chunk, not a multiple
    s, i = mips_topk_triton(q, keys, 4, None, None)
    check_topk(s, i, q, keys, 4)


def test_public_op_dispatches_to_triton():
    q, keys, _ = make_inputs(2, 120, 24, "f32")
    s, i = pluglm_kernels.mips_topk(q, keys, 6, backend="triton")
    check_topk(s, i, q, keys, 6)


def _nan_inputs(kdt, gen):
    """Keys with NaN rows (in a float dtype: the row itself; int8: its scale), fresh values."""
    B, M, d, k = 3, 211, 20, 7
    q, keys, scales = make_inputs(B, M, d, kdt, gen=gen)
    bad = torch.randperm(M, generator=gen)[:9]
    if kdt == "int8":
        scales = scales.clone()
        scales[bad] = float("nan")
    else:
        keys = keys.clone()
        keys[bad, torch.randint(0, d, (9,), generator=gen)] = float("nan")
    return q, keys, scales, bad, k


@pytest.mark.parametrize("kdt", ["f32", "f16", "bf16", "int8"])
def test_nan_key_rows_are_never_returned(kdt):
    # A NaN score packs above +inf (canonical NaN, sign bit clear): it used to come first.
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, keys, scales, bad, k = _nan_inputs(kdt, gen)
    s, i = mips_topk_triton(q, keys, k, scales, None)
    assert not bool(torch.isin(i, bad).any()), "a NaN key row was returned"
    assert bool(torch.isfinite(s).all())
    ok = torch.ones(keys.shape[0], dtype=torch.bool)
    ok[bad] = False
    clean_keys = keys.clone()
    if kdt == "int8":
        clean_scales = scales.clone()
        clean_scales[bad] = 0.0
    else:
        clean_keys[bad] = 0
        clean_scales = None
    check_topk(s, i, q, clean_keys, k, clean_scales, valid=ok)


def test_one_row_key_view_with_odd_row_stride():
    # torch calls a [1, d] view contiguous whatever its stride(0): every backend takes it
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    table = torch.randn(5, 23, generator=gen)
    keys = table[2:3, :17]  # stride (23, 1)
    assert keys.is_contiguous() and keys.stride(0) != keys.shape[1]
    q = torch.randn(2, 17, generator=gen)
    s, i = mips_topk_triton(q, keys, 1, None, None)
    assert i.tolist() == [[0], [0]]
    torch.testing.assert_close(s.double(), q.double() @ keys.double().T, rtol=1e-5, atol=1e-5)
