"""GPU tests of mips_topk's cuda and triton backends at realistic sizes, against a float64
oracle (computed blockwise on the GPU). Index sets must match except where scores tie."""
import pytest
import torch

import pluglm_kernels
from pluglm_kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ["cuda", "triton"]
KDTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def _need(backend):
    ok, why = pluglm_kernels._backends.availability("mips_topk", backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")
    if backend == "triton":
        pytest.importorskip("triton")


def make_inputs(B, M, d, kdt, qdt=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, d, device="cuda", generator=g)
    keys = torch.randn(M, d, device="cuda", generator=g)
    scales = None
    if kdt == "int8":
        keys, scales = pluglm_kernels.quantize_keys(keys)
        q = q.to(qdt or torch.bfloat16)
    else:
        keys = keys.to(KDTYPES[kdt])
        q = q.to(qdt or KDTYPES[kdt])
    return q, keys, scales


def oracle_check(scores, idx, q, keys, k, scales=None, valid=None, rtol=2e-5):
    """Sets equal outside the tie band [kth - tol, kth + tol] of the float64 oracle."""
    B = q.shape[0]
    ref_s, _ = reference.mips_topk(q.double(), keys, k, scales, valid)  # [B, k] f32 of f64
    kth = ref_s[:, -1].double()
    qd = q.double()
    kmax = 0.0
    for start in range(0, keys.shape[0], 1 << 16):
        kb = reference.dequantize_keys(keys[start:start + (1 << 16)],
                                       None if scales is None else scales[start:start + (1 << 16)],
                                       torch.float64)
        kmax = max(kmax, float(kb.norm(dim=1).max()))
    tol = rtol * qd.norm(dim=1) * kmax + 1e-6 * kth.abs()  # [B]
    assert idx.shape == (B, k) and scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert bool((idx >= 0).all()), "missing rows although k <= valid rows"
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "scores not sorted descending"
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate indices"
    if valid is not None:
        assert bool(valid[idx].all()), "returned a deleted row"
    true = (qd[:, None, :] * reference.dequantize_keys(
        keys[idx.flatten()], None if scales is None else scales[idx.flatten()], torch.float64
    ).view(B, k, -1)).sum(-1)  # [B, k]
    assert bool(((scores.double() - true).abs() <= tol[:, None]).all()), "scores off"
    assert bool((true >= (kth - tol)[:, None]).all()), "returned a row below the k-th score"
    # every row strictly above the tie band must be present: count them blockwise
    above = torch.zeros(B, dtype=torch.int64, device=q.device)
    for start in range(0, keys.shape[0], 1 << 16):
        kb = reference.dequantize_keys(keys[start:start + (1 << 16)],
                                       None if scales is None else scales[start:start + (1 << 16)],
                                       torch.float64)
        s = qd @ kb.T
        if valid is not None:
            s = s.masked_fill(~valid[start:start + (1 << 16)][None, :], float("-inf"))
        above += (s > (kth + tol)[:, None]).sum(1)
    got_above = (true > (kth + tol)[:, None]).sum(1)
    assert torch.equal(above, got_above), "missed a row that beats the k-th score"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdt", list(KDTYPES))
@pytest.mark.parametrize("B,M,d,k", [(7, 100_003, 128, 5), (33, 250_001, 768, 64),
                                     (3, 60_017, 1000, 100), (64, 1_000_000, 128, 1)],
                         ids=lambda v: str(v))
def test_shapes_dtypes(backend, kdt, B, M, d, k):
    _need(backend)
    q, keys, scales = make_inputs(B, M, d, kdt)
    s, i = pluglm_kernels.mips_topk(q, keys, k, key_scales=scales, backend=backend)
    oracle_check(s, i, q, keys, k, scales)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdt", ["f32", "bf16", "int8"])
def test_k_2048(backend, kdt):
    _need(backend)
    q, keys, scales = make_inputs(5, 200_003, 128, kdt)
    s, i = pluglm_kernels.mips_topk(q, keys, 2048, key_scales=scales, backend=backend)
    oracle_check(s, i, q, keys, 2048, scales)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdt", ["f16", "bf16", "int8"])
def test_f32_queries(backend, kdt):
    _need(backend)
    q, keys, scales = make_inputs(9, 50_001, 96, kdt, qdt=torch.float32)
    s, i = pluglm_kernels.mips_topk(q, keys, 10, key_scales=scales, backend=backend)
    oracle_check(s, i, q, keys, 10, scales)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_mask_and_unaligned_d(backend):
    _need(backend)
    q, keys, _ = make_inputs(4, 30_011, 37, "f16")  # 37 * 2 bytes: no 16-byte loads
    valid = torch.rand(30_011, device="cuda") < 0.5
    s, i = pluglm_kernels.mips_topk(q, keys, 17, valid=valid, backend=backend)
    oracle_check(s, i, q, keys, 17, valid=valid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch(backend):
    _need(backend)
    q, keys, _ = make_inputs(1000, 20_000, 64, "bf16")
    s, i = pluglm_kernels.mips_topk(q, keys, 8, backend=backend)
    oracle_check(s, i, q, keys, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_tie_to_lower_index(backend):
    _need(backend)
    base = torch.randint(-4, 5, (50, 64), device="cuda").float()
    keys = base.repeat(401, 1)[:20_000].contiguous()  # row r duplicates row r % 50
    q = torch.randint(-3, 4, (6, 64), device="cuda").float()
    for kdt in (torch.float32, torch.bfloat16):
        s, i = pluglm_kernels.mips_topk(q.to(kdt), keys.to(kdt), 100, backend=backend)
        ref_s, ref_i = reference.mips_topk(q.to(kdt).double(), keys.to(kdt).double(), 100)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(s, ref_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_valid_rows(backend):
    _need(backend)
    q, keys, _ = make_inputs(3, 5_000, 128, "bf16")
    valid = torch.zeros(5_000, dtype=torch.bool, device="cuda")
    valid[torch.randperm(5_000, device="cuda")[:300]] = True
    s, i = pluglm_kernels.mips_topk(q, keys, 300, valid=valid, backend=backend)
    assert torch.equal(i.sort(dim=1).values[0], torch.nonzero(valid).flatten())
    oracle_check(s, i, q, keys, 300, valid=valid)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_m_times_d_above_2_31(backend):
    _need(backend)
    M, d = (1 << 21) + 3, 1024 + 8  # M*d > 2^31 elements; 2.2 GB of int8 keys
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * M * d:
        pytest.skip("not enough free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(1)
    keys = torch.randint(-127, 128, (M, d), device="cuda", dtype=torch.int8, generator=g)
    scales = torch.rand(M, device="cuda", generator=g) + 0.5
    q = torch.randn(2, d, device="cuda", generator=g).to(torch.bfloat16)
    planted = [M - 1, M // 2 + 7]  # rows near the end: their offsets pass 2^31
    keys[planted[0]] = 127
    keys[planted[1]] = 126
    scales[planted] = 100.0
    q = q.abs()
    s, i = pluglm_kernels.mips_topk(q, keys, 3, key_scales=scales, backend=backend)
    assert i[:, :2].tolist() == [planted, planted]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdt", list(KDTYPES))
def test_nan_key_rows_are_never_returned(backend, kdt):
    # A NaN score is the canonical NaN (sign bit clear), which the sortable packing maps
    # above +inf: before the fix both GPU kernels returned NaN rows first.
    _need(backend)
    B, M, d, k = 9, 20_011, 128, 16
    q, keys, scales = make_inputs(B, M, d, kdt, seed=int(torch.randint(0, 2**31, ())))
    bad = torch.randperm(M, device="cuda")[:37]
    if kdt == "int8":
        scales = scales.clone()
        scales[bad] = float("nan")
    else:
        keys = keys.clone()
        keys[bad, 5] = float("nan")
    s, i = pluglm_kernels.mips_topk(q, keys, k, key_scales=scales, backend=backend)
    assert not bool(torch.isin(i, bad).any()), "a NaN key row was returned"
    assert bool(torch.isfinite(s).all())
    valid = torch.ones(M, dtype=torch.bool, device="cuda")
    valid[bad] = False
    if kdt == "int8":
        scales = scales.masked_fill(~valid, 0.0)
    else:
        keys = keys.masked_fill(~valid[:, None], 0)
    oracle_check(s, i, q, keys, k, scales, valid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdt", ["f32", "bf16", "int8"])
def test_one_row_key_view_with_odd_row_stride(backend, kdt):
    # torch (and the Python wrapper) call an [1, d] view contiguous whatever its stride(0);
    # the CUDA kernel used to refuse it (stride(0) == d).
    _need(backend)
    q, table, scales = make_inputs(3, 6, 131, kdt, seed=int(torch.randint(0, 2**31, ())))
    keys = table[4:5, :77]
    q = q[:, :77].contiguous()
    sc = None if scales is None else scales[4:5].contiguous()
    assert keys.is_contiguous() and keys.stride(0) != 77
    s, i = pluglm_kernels.mips_topk(q, keys, 1, key_scales=sc, backend=backend)
    assert i.tolist() == [[0]] * 3
    want = (q.double() @ reference.dequantize_keys(keys, sc, torch.float64).T).float()
    torch.testing.assert_close(s, want, rtol=1e-4, atol=1e-4)
