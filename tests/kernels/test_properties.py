"""Property-based tests (hypothesis) of every public op in pluglm_kernels.

For shapes (1s and odd sizes), dtypes, devices, strides (transposed / sliced inputs) and
magnitudes (tiny to huge), every available backend either matches the float64 reference or
raises a clear TypeError / ValueError / RuntimeError; never a crash, a hang, or NaN from
valid input. Inputs are fresh each run (hypothesis draws the torch seed; a failure prints
the falsifying example, seed included, and the @reproduce_failure blob).

Native ops (torch.ops.pluglm._C_*) called directly with bad arguments must raise
RuntimeError (TORCH_CHECK): those run in a subprocess, so a crash fails one test instead of
killing pytest.

Triton runs under TRITON_INTERPRET=1 on CPU tensors (tiny shapes, few examples, in
``test_triton_interpreter_*``).
"""
from __future__ import annotations

import os

# TRITON_INTERPRET is set by tests/conftest.py where no GPU exists (before triton is imported)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pluglm_kernels as pk  # noqa: E402
from pluglm_kernels import _backends, reference  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()

# Fresh inputs every run (house rule: no derandomize); no deadline (first calls load
# kernels); health checks for slow data generation off (tensors are built from one seed).
settings.register_profile(
    "pluglm-properties", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
PROFILE = settings.get_profile("pluglm-properties")
# More examples for a soak run, e.g. PLUGLM_PROPERTY_SCALE=20 (CI keeps the file < 90 s).
_SCALE = float(os.environ.get("PLUGLM_PROPERTY_SCALE", "1"))


def _n(examples: int) -> int:
    return max(1, int(examples * _SCALE))

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Relative error ||out - ref|| / ||ref|| against float64 (STYLE.md §6).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CLEAR_ERRORS = (TypeError, ValueError, RuntimeError)
F32_EPS = 2.0 ** -23


def _cpu_backends(op: str) -> list[str]:
    return [b for b in ("cpu", "reference") if _backends.availability(op, b, "cpu")[0]]


def _cuda_backends(op: str) -> list[str]:
    if not HAS_CUDA:
        return []
    return [b for b in ("cuda", "triton", "auto")
            if _backends.availability(op, b, "cuda")[0] or b == "auto"]


def _cases(op: str, cpu_auto: bool = False):
    """(device, backend) pairs: every CPU backend, plus CUDA ones (gpu-marked) on a GPU.
    ``cpu_auto`` adds backend="auto" on CPU, where a test checks auto's routing."""
    out = [pytest.param("cpu", b, id=f"cpu-{b}") for b in _cpu_backends(op)]
    if cpu_auto:
        out.append(pytest.param("cpu", "auto", id="cpu-auto"))
    out += [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu)
            for b in _cuda_backends(op)]
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale: float = 1.0, dtype=torch.float32, device="cpu", layout="contig"):
    """A float tensor of ``shape`` with N(0, scale^2) values in one of three layouts with the
    same values: contiguous, "transposed" (last two dims swapped in storage) or "sliced"
    (every other element of a wider buffer along the last dim)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    x = x.to(dtype)
    if layout == "transposed" and len(shape) >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x.to(device)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, natural: float) -> None:
    """||out - ref|| <= rtol * max(||ref||, natural / 10): a pooled output that cancels to far
    below the magnitude of what it sums (``natural``, e.g. sqrt(numel) * max|x|) is held to the
    rounding error of the terms, not of the small result."""
    err = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    scale = max(ref.double().norm().item(), natural / 10)
    assert err <= rtol * scale, f"error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def _finite(t: torch.Tensor, what: str) -> None:
    assert bool(torch.isfinite(t).all()), f"{what}: non-finite output from valid input"


LAYOUTS = st.sampled_from(["contig", "transposed", "sliced"])


# ------------------------------------------------------------------------------ mips_topk


def _check_topk(scores, idx, q, keys, key_scales, valid, k, rtol):
    """Index sets equal the float64 oracle's except within the tolerance band of ties."""
    B = q.shape[0]
    assert scores.shape == (B, k) and idx.shape == (B, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    scores, idx = scores.cpu(), idx.cpu()
    kd = reference.dequantize_keys(keys.cpu(), None if key_scales is None else key_scales.cpu(),
                                   torch.float64)
    q64 = q.cpu().double()
    full = q64 @ kd.T  # [B, M], tiny
    mag = q64.abs() @ kd.abs().T  # [B, M]: bound on the rounding error of each score
    if valid is not None:
        full = full.masked_fill(~valid.cpu()[None, :], float("-inf"))
    kth = full.topk(k, dim=1).values[:, -1]  # [B]
    for b in range(B):
        tol = rtol * float(mag[b].max()) + 1e-30
        ib = idx[b]
        assert bool(((ib >= 0) & (ib < keys.shape[0])).all()), f"index out of range: {ib}"
        assert torch.unique(ib).numel() == k, f"duplicate indices: {ib}"
        got = full[b, ib]  # reference scores of what came back
        assert bool(torch.isfinite(got).all()), "returned a masked (invalid) row"
        _finite(scores[b], "mips_topk scores")
        assert bool((scores[b, :-1] >= scores[b, 1:]).all()), "scores not sorted descending"
        assert float((scores[b].double() - got).abs().max()) <= tol, (scores[b], got, tol)
        assert float(got.min()) >= float(kth[b]) - 2 * tol, "missed a better row"


@pytest.mark.parametrize("device,backend", _cases("mips_topk"))
@settings(PROFILE, max_examples=_n(60))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_mips_topk_property(device, backend, data, seed):
    gen = _gen(seed)
    B = data.draw(st.integers(1, 9), "B")
    M = data.draw(st.integers(1, 80), "M")
    d = data.draw(st.integers(1, 40), "d")
    kname = data.draw(st.sampled_from(["f32", "f16", "bf16", "int8"]), "keys dtype")
    q_same = data.draw(st.booleans(), "queries in the keys' dtype")
    wide = kname in ("f32", "bf16", "int8")  # exponent range of float32
    eq = data.draw(st.integers(-12, 12) if wide else st.integers(-3, 3), "log10 |queries|")
    ek = data.draw(st.integers(-12, 12) if kname in ("f32", "bf16") else st.integers(-3, 3),
                   "log10 |keys|")
    q_layout = data.draw(LAYOUTS, "queries layout")
    keys_bad_layout = data.draw(st.sampled_from([None, None, None, "rows", "cols"]), "keys layout")
    dup = data.draw(st.booleans(), "duplicate rows (ties)")
    use_valid = data.draw(st.booleans(), "valid mask")
    k = data.draw(st.integers(1, min(M, 16)), "k")

    qdt = DTYPES[kname] if (q_same and kname != "int8") else torch.float32
    q = _randn(gen, B, d, scale=10.0 ** eq, dtype=qdt, layout=q_layout).to(device)
    keys64 = torch.randn(M, d, generator=gen, dtype=torch.float64) * 10.0 ** ek
    if dup and M > 1:
        keys64[M // 2:] = keys64[: M - M // 2].clone()  # exact copies tie
    key_scales = None
    if kname == "int8":
        keys, key_scales = pk.quantize_keys(keys64.float())
        key_scales = key_scales.to(device)
    else:
        keys = keys64.to(DTYPES[kname])
    keys = keys.to(device)
    valid = None
    if use_valid:
        valid = (torch.rand(M, generator=gen) < 0.6).to(device)
    n_valid = M if valid is None else int(valid.sum())

    if keys_bad_layout == "rows":
        wide_keys = torch.zeros(2 * M, d, dtype=keys.dtype, device=device)
        wide_keys[::2] = keys
        keys = wide_keys[::2]
    elif keys_bad_layout == "cols":
        keys = keys.t().contiguous().t()
    if not keys.is_contiguous():
        with pytest.raises(ValueError, match="keys must be contiguous"):
            pk.mips_topk(q, keys, k, key_scales=key_scales, valid=valid, backend=backend)
        return
    if keys.stride(0) != d and M == 1:
        # One row with an odd leading stride is contiguous; the wrapper may refuse it (a
        # clear error) or use it, but must not misread it.
        try:
            pk.mips_topk(q, keys, min(k, n_valid) or 1, key_scales=key_scales, backend=backend)
        except ValueError as e:
            assert "contiguous" in str(e)
        keys = keys.clone(memory_format=torch.contiguous_format)
    if k > n_valid:
        with pytest.raises(ValueError, match="larger than the number of valid rows"):
            pk.mips_topk(q, keys, k, key_scales=key_scales, valid=valid, backend=backend)
        return
    s, i = pk.mips_topk(q, keys, k, key_scales=key_scales, valid=valid, backend=backend)
    rtol = 4e-5 if device == "cpu" else 2e-3  # tf32 / tensor-core rounding on GPUs
    _check_topk(s, i, q, keys, key_scales, valid, k, rtol)


@pytest.mark.parametrize("device,backend", _cases("mips_topk"))
@settings(PROFILE, max_examples=_n(15))
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), d=st.integers(1, 17),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_mips_topk_nonfinite_queries_raise(device, backend, seed, B, d, bad):
    gen = _gen(seed)
    q = torch.randn(B, d, generator=gen)
    q[torch.randint(0, B, (1,), generator=gen), torch.randint(0, d, (1,), generator=gen)] = bad
    with pytest.raises(ValueError, match="queries must be finite"):
        pk.mips_topk(q.to(device), torch.randn(7, d).to(device), 3, backend=backend)


def _nan_rows_cases():
    out = []
    for p in _cases("mips_topk"):
        out.append(p)
    return out


@pytest.mark.parametrize("device,backend", _nan_rows_cases())
# stop at the first failure (no shrinking): the reference case is an expected failure
@settings(PROFILE, max_examples=_n(20), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), M=st.integers(3, 40),
       d=st.integers(1, 17))
def test_mips_topk_nan_key_rows_never_returned(device, backend, seed, B, M, d):
    """A key row holding NaN has no score: it is never selected (the C++ kernel's documented
    rule; KnowledgeMemory also masks such rows out before searching)."""
    gen = _gen(seed)
    keys = torch.randn(M, d, generator=gen)
    bad = torch.randperm(M, generator=gen)[: M // 3]
    keys[bad, 0] = float("nan")
    k = M - bad.numel()
    s, i = pk.mips_topk(torch.randn(B, d, generator=gen).to(device), keys.to(device), k,
                        backend=backend)
    assert not (set(i.flatten().tolist()) & set(bad.tolist())), "returned a NaN key row"
    _finite(s, "scores")


# -------------------------------------------------------------------- knowledge_attention


def _attn_check(out, ref, dtype, logits_max: float, v: torch.Tensor, ref_abs=None) -> None:
    """The dtype's relative tolerance (against the magnitude of v when the output cancels),
    plus the effect of float32 logit rounding: eps * |logit| per logit, times |v|, plus
    rounding the weights or products to the dtype: 4 u sum_j p_j |v_j| (``ref_abs``, the same
    attention over |v|), which a cancelling output of a few rows can exceed the first term by."""
    vmax = float(v.detach().abs().max().double())
    natural = math.sqrt(ref.numel()) * vmax
    logit_err = 8 * F32_EPS * (1.0 + logits_max) * natural
    err = (out.detach().double().cpu() - ref.double()).norm().item()
    bound = RTOL[dtype] * max(ref.double().norm().item(), natural / 10) + logit_err
    if ref_abs is not None and dtype != torch.float32:
        bound += 2 * torch.finfo(dtype).eps * ref_abs.double().norm().item()  # 4 u
    assert err <= bound, f"error {err:.3e} > {bound:.3e}"


def _attn_inputs(data, gen, device, *, gather: bool):
    B = data.draw(st.integers(1, 3), "B")
    T = data.draw(st.integers(1, 6), "T")
    H = data.draw(st.integers(1, 3), "H")
    Dh = data.draw(st.sampled_from([1, 2, 3, 7, 8, 16, 33]), "Dh")
    N = data.draw(st.sampled_from([1, 2, 3, 5, 8, 13]), "N")
    dname = data.draw(st.sampled_from(list(DTYPES)), "dtype")
    dt = DTYPES[dname]
    lo, hi = (-3, 2) if dt == torch.float16 else (-8, 3)
    eq = data.draw(st.integers(lo, hi), "log10 |q|")
    ek = data.draw(st.integers(lo, min(hi, 3 - eq)), "log10 |k|")  # |logits| <~ 1e4
    ev = data.draw(st.integers(-3, 3) if dt == torch.float16 else st.integers(-20, 20), "log10 |v|")
    layout = data.draw(LAYOUTS, "layout")
    p = data.draw(st.sampled_from([0.0, 0.0, 0.25]), "dropout_p")
    q = _randn(gen, B, T, H, Dh, scale=10.0 ** eq, dtype=dt, layout=layout)
    bias = _randn(gen, B, N, layout=layout).clamp_(-1, 1)
    beta = _randn(gen, H)
    if gather:
        M = data.draw(st.integers(1, 20), "M")
        k = _randn(gen, M, H, Dh, scale=10.0 ** ek, dtype=dt)
        v = _randn(gen, M, H, Dh, scale=10.0 ** ev, dtype=dt)
        idx = torch.randint(0, M, (B, N), generator=gen)  # repeats allowed
        idx = idx.to(data.draw(st.sampled_from([torch.int64, torch.int32]), "indices dtype"))
        if data.draw(st.booleans(), "indices transposed") and B > 1:
            idx = idx.t().contiguous().t()
        extra = (idx.to(device),)
    else:
        k = _randn(gen, B, N, H, Dh, scale=10.0 ** ek, dtype=dt, layout=layout)
        v = _randn(gen, B, N, H, Dh, scale=10.0 ** ev, dtype=dt, layout=layout)
        extra = ()
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k), to(v), extra, to(bias), to(beta), p, N, Dh


def _attn_reference(q, k, v, extra, bias, beta, p, seed):
    kk, vv = (k[extra[0].long()], v[extra[0].long()]) if extra else (k, v)
    f64 = lambda t: t.detach().double().cpu()  # noqa: E731
    out, _ = reference.knowledge_attention(f64(q), f64(kk), f64(vv), f64(bias), f64(beta), p, seed)
    out_abs, _ = reference.knowledge_attention(f64(q), f64(kk), f64(vv).abs(), f64(bias), f64(beta),
                                               p, seed)
    logits = torch.einsum("bthd,bjhd->bthj", f64(q), f64(kk)) \
        + f64(beta)[None, None, :, None] * f64(bias)[:, None, None, :]
    return out, float(logits.abs().max()), out_abs


def _expect_native_refusal(device, backend, Dh) -> bool:
    # The CUDA kernels take head sizes 32/64/128 only (a clear RuntimeError otherwise) when
    # named; "auto" routes other head sizes to Triton (or the reference) instead.
    return device == "cuda" and backend == "cuda" and Dh not in (32, 64, 128)


@pytest.mark.parametrize("gather", [False, True], ids=["dense", "gather"])
@pytest.mark.parametrize("device,backend", _cases("knowledge_attention"))
@settings(PROFILE, max_examples=_n(40))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), dseed=st.integers(0, 2**63 - 1))
def test_knowledge_attention_property(device, backend, gather, data, seed, dseed):
    gen = _gen(seed)
    q, k, v, extra, bias, beta, p, N, Dh = _attn_inputs(data, gen, device, gather=gather)
    fn = pk.gather_knowledge_attention if gather else pk.knowledge_attention
    if _expect_native_refusal(device, backend, Dh):
        with pytest.raises(RuntimeError, match="Dh"):
            fn(q, k, v, *extra, bias, beta, dropout_p=p, seed=dseed, backend=backend)
        return
    out = fn(q, k, v, *extra, bias, beta, dropout_p=p, seed=dseed, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ref, lmax, ref_abs = _attn_reference(q, k, v, extra, bias, beta, p, dseed)
    _finite(out, "knowledge_attention")
    _attn_check(out, ref, q.dtype, lmax, v, ref_abs)

    # Gradients (float32, moderate logits): every input against the float64 reference.
    if q.dtype != torch.float32 or lmax > 50 or device != "cpu":
        return
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias, beta)]
    out = fn(leaves[0], leaves[1], leaves[2], *extra, leaves[3], leaves[4], dropout_p=p,
             seed=dseed, backend=backend)
    go = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, go)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias, beta)]
    kk, vv = leaves64[1], leaves64[2]
    if extra:
        kk, vv = kk[extra[0].long()], vv[extra[0].long()]
    ref_out, _ = reference.knowledge_attention(leaves64[0], kk, vv, leaves64[3], leaves64[4], p, dseed)
    ref_grads = torch.autograd.grad(ref_out, leaves64, go.double())
    # Gradients cancel (p_j (v_j - out)), so the error is measured against the natural
    # scale of each gradient, not only its own norm.
    mx = lambda t: float(t.detach().abs().max())  # noqa: E731
    g_v = go.norm().item() * mx(v)
    natural = {"dq": g_v * mx(k), "dk": g_v * mx(q), "dv": go.norm().item(),
               "dbias": g_v * mx(beta), "dbeta": g_v * mx(bias)}
    for name, g, r in zip(("dq", "dk", "dv", "dbias", "dbeta"), grads, ref_grads):
        _finite(g, name)
        err = (g.double() - r).norm().item()
        assert err <= 1e-4 * r.norm().item() + 1e-5 * (1 + lmax) * natural[name], name


@pytest.mark.parametrize("device,backend", _cases("knowledge_attention", cpu_auto=True))
@settings(PROFILE, max_examples=_n(10))
@given(seed=st.integers(0, 2**32 - 1), N=st.sampled_from([256, 257, 300]))
def test_knowledge_attention_large_n(device, backend, seed, N):
    """N up to 256 works on every backend; above, a kernel named explicitly refuses with a
    clear error, while "auto" routes to the reference (which has no limit)."""
    gen = _gen(seed)
    B, T, H, Dh = 1, 2, 1, 32
    q, k, v = (_randn(gen, *s).to(device) for s in ((B, T, H, Dh), (B, N, H, Dh), (B, N, H, Dh)))
    bias, beta = torch.rand(B, N, generator=gen).to(device), torch.ones(H, device=device)
    if N > 256 and backend not in ("reference", "auto"):
        with pytest.raises(CLEAR_ERRORS, match="N"):
            pk.knowledge_attention(q, k, v, bias, beta, backend=backend)
        return
    out = pk.knowledge_attention(q, k, v, bias, beta, backend=backend)
    ref, lmax, _ = _attn_reference(q, k, v, (), bias, beta, 0.0, 0)
    _attn_check(out, ref, torch.float32, lmax, v)


@pytest.mark.parametrize("device,backend", _cases("gather_knowledge_attention"))
@settings(PROFILE, max_examples=_n(20))
@given(seed=st.integers(0, 2**32 - 1), M=st.integers(1, 9),
       bad=st.sampled_from(["M", "-1", "huge", "-huge"]))
def test_gather_out_of_range_indices_raise(device, backend, seed, M, bad):
    gen = _gen(seed)
    B, T, H, Dh, N = 2, 3, 2, 32, 4
    q = _randn(gen, B, T, H, Dh).to(device)
    table = _randn(gen, M, H, Dh).to(device)
    idx = torch.randint(0, M, (B, N), generator=gen)
    idx[1, 2] = {"M": M, "-1": -1, "huge": 2**40, "-huge": -(2**62)}[bad]
    with pytest.raises(ValueError, match=r"indices must be in \[0, "):
        pk.gather_knowledge_attention(q, table, table, idx.to(device), torch.zeros(B, N, device=device),
                                      torch.ones(H, device=device), backend=backend)


# -------------------------------------------------------------------------- attentive_pool


def _mask(data, gen, B, T):
    kind = data.draw(st.sampled_from(["bool", "long", "float", "float-nonbinary"]), "mask kind")
    m = torch.rand(B, T, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 1.0]), "mask density")
    if data.draw(st.booleans(), "one empty row") and B > 1:
        m[0] = False  # pools to zeros
    if kind == "bool":
        return m
    if kind == "long":
        return m.long()
    if kind == "float":
        return m.float()
    return m.float() * 0.5  # any non-zero value counts as a token


def _pool_params(gen, D, Hp, dt_params):
    # Pooler weights at a moderate scale: the score's sensitivity to rounding is |w2|_1.
    w1 = _randn(gen, Hp, D, scale=0.5).to(dt_params)
    b1 = _randn(gen, Hp, scale=0.5).to(dt_params)
    w2 = _randn(gen, Hp, scale=0.5).to(dt_params)
    b2 = _randn(gen, 1).to(dt_params)
    return w1, b1, w2, b2


def _pool_with_rounded_u(x, mask, w1, b1, w2, b2, dt):
    """reference.attentive_pool in float64 except that u = x W1^T + b1 is rounded to ``dt``,
    the rounding the kernels make by design in 16-bit dtypes (ops._pooler_u: an addmm in x's
    dtype, so W1 and b1 are rounded to it first)."""
    r = lambda t: t.to(dt).double()  # noqa: E731
    u = r(x @ r(w1).T + r(b1))
    s = torch.tanh(u) @ w2.reshape(-1) + b2.reshape(())
    keep = mask.to(torch.bool)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.max(dim=1, keepdim=True).values
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m))) * keep
    alpha = e / e.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return (alpha[..., None] * x).sum(dim=1)


@pytest.mark.parametrize("device,backend", _cases("attentive_pool"))
@settings(PROFILE, max_examples=_n(50))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_attentive_pool_property(device, backend, data, seed):
    gen = _gen(seed)
    B = data.draw(st.integers(1, 4), "B")
    T = data.draw(st.integers(1, 9), "T")
    D = data.draw(st.integers(1, 33), "D")
    Hp = data.draw(st.integers(1, 9), "Hp")
    dt = DTYPES[data.draw(st.sampled_from(list(DTYPES)), "dtype")]
    ex = data.draw(st.integers(-3, 3) if dt == torch.float16 else st.integers(-20, 20), "log10 |x|")
    layout = data.draw(LAYOUTS, "layout")
    params_f32 = data.draw(st.booleans(), "float32 pooler params")
    w2_2d = data.draw(st.booleans(), "w2 as [1, Hp]")
    x = _randn(gen, B, T, D, scale=10.0 ** ex, dtype=dt, layout=layout).to(device)
    mask = _mask(data, gen, B, T).to(device)
    w1, b1, w2, b2 = (t.to(device) for t in _pool_params(gen, D, Hp, torch.float32 if params_f32 else dt))
    if w2_2d:
        w2 = w2.reshape(1, Hp)
    out = pk.attentive_pool(x, mask, w1, b1, w2, b2, backend=backend)
    assert out.shape == (B, D) and out.dtype == x.dtype and out.device == x.device
    _finite(out, "attentive_pool")
    f64 = lambda t: t.detach().double().cpu()  # noqa: E731
    ref = reference.attentive_pool(f64(x), mask.cpu(), f64(w1), f64(b1), f64(w2), f64(b2))
    empty = ~mask.cpu().bool().any(1)
    assert bool((out.cpu()[empty] == 0).all()), "a row with no token must pool to zeros"
    natural = math.sqrt(out.numel()) * float(x.abs().max())
    if dt == torch.float32:
        _assert_close(out, ref, 2e-5, natural)
    else:
        # u = x W1^T + b1 is rounded to x's dtype (a matmul in that dtype), by design. With
        # large |x| the tanh saturates and a rounded u near 0 flips a score by 2|w2_j|, which
        # moves the softmax weights by O(1): an ill-conditioned instance, not a kernel error.
        # So the yardstick is the float64 pool with only that rounding applied to u.
        ref_u = _pool_with_rounded_u(f64(x), mask.cpu(), f64(w1), f64(b1), f64(w2), f64(b2), dt)
        budget = (ref_u - ref).norm().item()
        err = (out.detach().double().cpu() - ref).norm().item()
        assert err <= 2e-2 * max(ref.norm().item(), natural / 10) + 4 * budget, (err, budget)

    if dt != torch.float32 or device != "cpu" or not 1e-6 < 10.0 ** ex <= 10:
        return
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    go = torch.randn(B, D, generator=gen)
    grads = torch.autograd.grad(pk.attentive_pool(leaves[0], mask, *leaves[1:], backend=backend),
                                leaves, go)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    ref_grads = torch.autograd.grad(reference.attentive_pool(leaves64[0], mask, *leaves64[1:]),
                                    leaves64, go.double())
    # float32 tanh' = 1 - tanh^2 has an absolute error ~eps: measure each gradient against
    # its natural scale |g| |x|^2 |w1| |w2| sqrt(T D), not only its own norm (db2 is zero in
    # exact arithmetic: softmax is shift invariant).
    mx = lambda t: max(1.0, float(t.detach().abs().max()))  # noqa: E731
    natural = go.norm().item() * mx(x) ** 2 * mx(w1) * mx(w2) * math.sqrt(T * D)
    for name, g, r in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads):
        _finite(g, name)
        assert g.shape == r.shape, name
        err = (g.double() - r).norm().item()
        assert err <= 1e-4 * r.norm().item() + 1e-6 * natural, name


def _nan_pool_cases():
    out = []
    for p in _cases("attentive_pool"):
        for all_nan in (False, True):
            marks = list(p.marks)
            out.append(pytest.param(*p.values, all_nan, marks=marks,
                                    id=f"{p.id}-{'all' if all_nan else 'one'}-nan"))
    return out


@pytest.mark.parametrize("device,backend,all_nan", _nan_pool_cases())
@settings(PROFILE, max_examples=_n(10), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), T=st.integers(2, 6),
       D=st.integers(1, 9))
def test_attentive_pool_nan_input_propagates(device, backend, seed, B, T, D, all_nan):
    """NaN in a row's tokens gives NaN in that row's output: never a silently finite value
    (which would make a broken memory entry look valid to KnowledgeMemory.validate)."""
    gen = _gen(seed)
    x = _randn(gen, B, T, D)
    if all_nan:
        x[0] = float("nan")
    else:
        x[0, torch.randint(0, T, (1,), generator=gen), 0] = float("nan")
    w1, b1, w2, b2 = _pool_params(gen, D, 3, torch.float32)
    out = pk.attentive_pool(x.to(device), torch.ones(B, T, device=device), w1.to(device),
                            b1.to(device), w2.to(device), b2.to(device), backend=backend)
    assert bool(torch.isnan(out[0]).any()), f"NaN input pooled to {out[0]}"
    assert bool(torch.isfinite(out[1:]).all()), "NaN leaked into other rows"


# ------------------------------------------------------------------------ encode_knowledge


@pytest.mark.parametrize("device,backend", _cases("encode_knowledge"))
@settings(PROFILE, max_examples=_n(50))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_encode_knowledge_property(device, backend, data, seed):
    gen = _gen(seed)
    E = data.draw(st.integers(1, 4), "E")
    T = data.draw(st.integers(1, 8), "T")
    V = data.draw(st.integers(1, 60), "V")
    D = data.draw(st.integers(1, 24), "D")
    Hp = data.draw(st.integers(1, 7), "Hp")
    Tt = data.draw(st.integers(1, 3), "Tt")
    off = data.draw(st.integers(0, 3), "position_offset")
    P = T + off + data.draw(st.integers(0, 3), "spare positions")
    dt = DTYPES[data.draw(st.sampled_from(list(DTYPES)), "dtype")]
    id_dt = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]), "ids dtype")
    if id_dt == torch.uint8:
        V = min(V, 256)
    es = data.draw(st.integers(-2, 2) if dt == torch.float16 else st.integers(-4, 4), "log10 |tables|")
    offset = data.draw(st.sampled_from([0.0, 0.0, 100.0]), "common offset")  # LayerNorm mean >> std
    use_tt = data.draw(st.booleans(), "token_type_ids")
    eps = data.draw(st.sampled_from([1e-12, 1e-5]), "eps")
    ids_t = data.draw(st.booleans(), "token_ids transposed")

    s = 10.0 ** es
    word = (_randn(gen, V, D, scale=s) + offset * s).to(dt)
    pos = _randn(gen, P, D, scale=s).to(dt)
    typ = _randn(gen, Tt, D, scale=s).to(dt)
    ln_w, ln_b = _randn(gen, D).add_(1.0), _randn(gen, D, scale=0.1)
    w1, b1, w2, b2 = _pool_params(gen, D, Hp, torch.float32)
    ids = torch.randint(0, V, (E, T), generator=gen).to(id_dt)
    if ids_t and E > 1:
        ids = ids.t().contiguous().t()
    tt = torch.randint(0, Tt, (E, T), generator=gen).to(id_dt) if use_tt else None
    mask = _mask(data, gen, E, T)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    tensors = [to(t) for t in (word, pos, typ, ln_w, ln_b, w1, b1, w2, b2)]
    out = pk.encode_knowledge(to(ids), to(mask), *tensors, token_type_ids=to(tt), eps=eps,
                              position_offset=off, backend=backend)
    assert out.shape == (E, D) and out.dtype == dt
    _finite(out, "encode_knowledge")
    f64 = lambda t: t.detach().double()  # noqa: E731
    params64 = [f64(t) for t in (word, pos, typ, ln_w, ln_b, w1, b1, w2, b2)]
    ref = reference.encode_knowledge(ids, mask, *params64,
                                     token_type_ids=tt, eps=eps, position_offset=off)
    # LayerNorm amplifies the float32 rounding of word + pos + type by |mean| / std of a row
    sums = reference.embed(ids, *(f64(t) for t in (word, pos, typ)), torch.ones(D, dtype=torch.float64),
                           torch.zeros(D, dtype=torch.float64), token_type_ids=tt, eps=eps,
                           position_offset=off)  # [E, T, D]: the magnitude of what gets pooled
    raw = f64(word)[ids.long()] + f64(pos)[off:off + T][None] + f64(typ)[
        torch.zeros_like(ids, dtype=torch.long) if tt is None else tt.long()]
    cond = float((raw.mean(-1).abs() / raw.std(-1, unbiased=False).clamp_min(1e-300)).max())
    tol = (2e-5 if dt == torch.float32 else 3e-2) + 16 * F32_EPS * cond
    _assert_close(out, ref, tol, math.sqrt(out.numel()) * float(sums.abs().max()))


@pytest.mark.parametrize("device,backend", _cases("encode_knowledge"))
@settings(PROFILE, max_examples=_n(15))
@given(seed=st.integers(0, 2**32 - 1), V=st.integers(1, 20),
       bad=st.sampled_from(["V", "-1", "huge", "type"]))
def test_encode_knowledge_out_of_range_ids_raise(device, backend, seed, V, bad):
    gen = _gen(seed)
    E, T, D, Hp = 2, 3, 8, 4
    ids = torch.randint(0, V, (E, T), generator=gen)
    tt = None
    if bad == "type":
        tt = torch.zeros(E, T, dtype=torch.long)
        tt[1, 1] = 2
    else:
        ids[1, 2] = {"V": V, "-1": -1, "huge": 2**40}[bad]
    tensors = [_randn(gen, V, D), _randn(gen, T, D), _randn(gen, 2, D), torch.ones(D), torch.zeros(D),
               *_pool_params(gen, D, Hp, torch.float32)]
    with pytest.raises(ValueError, match="must be in"):
        pk.encode_knowledge(ids.to(device), torch.ones(E, T, device=device),
                            *(t.to(device) for t in tensors),
                            token_type_ids=None if tt is None else tt.to(device), backend=backend)


# ------------------------------------------------------------- Triton under the interpreter

_TRITON_CPU = _backends.triton_interpret() and _backends.triton_status()[0]
TRITON_EXAMPLES = 6


@pytest.mark.parametrize("op", ["mips_topk", "knowledge_attention", "gather_knowledge_attention",
                                "attentive_pool", "encode_knowledge"])
@pytest.mark.triton
@pytest.mark.skipif(not _TRITON_CPU, reason="needs triton under TRITON_INTERPRET=1 (set before "
                    "triton was imported)")
@settings(PROFILE, max_examples=_n(TRITON_EXAMPLES))
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_triton_interpreter_property(op, data, seed):
    """The same properties on the Triton kernels (CPU tensors, interpreter, tiny shapes)."""
    if not _backends.availability(op, "triton", "cpu")[0]:
        pytest.skip(_backends.availability(op, "triton", "cpu")[1])
    gen = _gen(seed)
    if op == "mips_topk":
        B, M, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 24)), data.draw(st.integers(1, 9))
        kname = data.draw(st.sampled_from(["f32", "f16", "bf16", "int8"]))
        k = data.draw(st.integers(1, min(M, 5)))
        q = _randn(gen, B, d, layout=data.draw(LAYOUTS))
        keys64 = torch.randn(M, d, generator=gen, dtype=torch.float64)
        ks = None
        if kname == "int8":
            keys, ks = pk.quantize_keys(keys64.float())
        else:
            keys = keys64.to(DTYPES[kname])
        valid = None
        if data.draw(st.booleans()):
            valid = torch.rand(M, generator=gen) < 0.7
            valid[:k] = True
        s, i = pk.mips_topk(q, keys, k, key_scales=ks, valid=valid, backend="triton")
        _check_topk(s, i, q, keys, ks, valid, k, 4e-5)
    elif op in ("knowledge_attention", "gather_knowledge_attention"):
        gather = op.startswith("gather")
        q, k, v, extra, bias, beta, p, N, Dh = _attn_inputs(data, gen, "cpu", gather=gather)
        fn = pk.gather_knowledge_attention if gather else pk.knowledge_attention
        out = fn(q, k, v, *extra, bias, beta, dropout_p=p, seed=seed, backend="triton")
        ref, lmax, ref_abs = _attn_reference(q, k, v, extra, bias, beta, p, seed)
        _finite(out, op)
        _attn_check(out, ref, q.dtype, lmax, v, ref_abs)
    elif op == "attentive_pool":
        B, T, D, Hp = (data.draw(st.integers(1, n)) for n in (3, 6, 9, 5))
        dt = DTYPES[data.draw(st.sampled_from(list(DTYPES)))]
        x = _randn(gen, B, T, D, dtype=dt, layout=data.draw(LAYOUTS))
        mask = _mask(data, gen, B, T)
        w1, b1, w2, b2 = _pool_params(gen, D, Hp, torch.float32)
        out = pk.attentive_pool(x, mask, w1, b1, w2, b2, backend="triton")
        f64 = lambda t: t.detach().double()  # noqa: E731
        ref = reference.attentive_pool(f64(x), mask, f64(w1), f64(b1), f64(w2), f64(b2))
        _finite(out, op)
        _assert_close(out, ref, 2e-5 if dt == torch.float32 else 2e-2,
                      math.sqrt(out.numel()) * float(x.abs().max()))
    else:
        E, T, V, D, Hp = (data.draw(st.integers(1, n)) for n in (3, 5, 20, 9, 4))
        dt = DTYPES[data.draw(st.sampled_from(list(DTYPES)))]
        tables = [_randn(gen, V, D).to(dt), _randn(gen, T, D).to(dt), _randn(gen, 2, D).to(dt),
                  torch.ones(D), torch.zeros(D), *_pool_params(gen, D, Hp, torch.float32)]
        ids = torch.randint(0, V, (E, T), generator=gen)
        tt = torch.randint(0, 2, (E, T), generator=gen)
        mask = _mask(data, gen, E, T)
        out = pk.encode_knowledge(ids, mask, *tables, token_type_ids=tt, backend="triton")
        ref = reference.encode_knowledge(ids, mask, *(t.double() for t in tables), token_type_ids=tt)
        _finite(out, op)
        _assert_close(out, ref, 2e-5 if dt == torch.float32 else 3e-2, math.sqrt(out.numel()) * 3.0)


# ------------------------------------------------------ native ops: bad arguments, isolated

# Each case calls one torch.ops.pluglm._C_* op with bad arguments and must raise
# RuntimeError; the child prints one line per case so a crash names the case it died in.
_NATIVE_CASES = r'''
import sys, torch
import pluglm_kernels  # registers the native ops
O = torch.ops.pluglm
dev = sys.argv[1]
f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
def r(*s, dtype=f32):
    return torch.randn(*s, dtype=dtype, device=dev)
def ints(lo, hi, *s, dtype=torch.long):
    return torch.randint(lo, hi, s, dtype=dtype, device=dev)
B, T, H, Dh, N, M = 2, 3, 2, 32, 4, 6
q, kk, vv = r(B, T, H, Dh), r(B, N, H, Dh), r(B, N, H, Dh)
bias, beta = r(B, N), r(H)
tab = r(M, H, Dh)
idx = ints(0, M, B, N)
out, lse = O._C_knowledge_attention_fwd(q, kk, vv, bias, beta, 0.0, 0)
gout, gl = O._C_gather_knowledge_attention_fwd(q, tab, tab, idx, bias, beta, 0.0, 0)
E, L, V, P, D, Hp = 2, 5, 10, 6, 8, 4
ids, word, pos, typ = ints(0, V, E, L), r(V, D), r(P, D), r(2, D)
lnw, lnb = r(D), r(D)
h, mean, rstd = O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb, 1e-12, 0)
x, mask, u, w2, b2 = r(E, L, D), torch.ones(E, L, device=dev), r(E, L, Hp), r(Hp), r(1)
pooled, alpha = O._C_attentive_pool_fwd(x, mask, u, w2, b2)
qm, km = r(3, 8), r(20, 8)
k8 = torch.randint(-5, 5, (20, 8), dtype=torch.int8, device=dev)
nanq = qm.clone(); nanq[1, 2] = float("nan")
ids_oob = ids.clone(); ids_oob[1, 3] = V
ids_neg = ids.clone(); ids_neg[0, 0] = -1
idx_oob = idx.clone(); idx_oob[1, 1] = M
idx_neg = idx.clone(); idx_neg[0, 0] = -1
idx_huge = idx.clone(); idx_huge[0, 0] = 2**40
CASES = {
  "mips: queries int64": lambda: O._C_mips_topk(qm.long(), km, 3, None, None),
  "mips: queries float64": lambda: O._C_mips_topk(qm.double(), km, 3, None, None),
  "mips: keys float64": lambda: O._C_mips_topk(qm, km.double(), 3, None, None),
  "mips: queries 1-D": lambda: O._C_mips_topk(qm[0], km, 3, None, None),
  "mips: keys 3-D": lambda: O._C_mips_topk(qm, km[None], 3, None, None),
  "mips: d mismatch": lambda: O._C_mips_topk(qm, r(20, 9), 3, None, None),
  "mips: k = 0": lambda: O._C_mips_topk(qm, km, 0, None, None),
  "mips: k < 0": lambda: O._C_mips_topk(qm, km, -5, None, None),
  "mips: k > M": lambda: O._C_mips_topk(qm, km, 21, None, None),
  "mips: k > 2048": lambda: O._C_mips_topk(qm, r(3000, 8), 2049, None, None),
  "mips: M = 0": lambda: O._C_mips_topk(qm, r(0, 8), 1, None, None),
  "mips: B = 0": lambda: O._C_mips_topk(r(0, 8), km, 1, None, None),
  "mips: d = 0": lambda: O._C_mips_topk(r(3, 0), r(20, 0), 1, None, None),
  "mips: keys non-contiguous": lambda: O._C_mips_topk(qm, r(8, 20).t(), 3, None, None),
  "mips: queries non-contiguous": lambda: O._C_mips_topk(r(8, 3).t(), km, 3, None, None),
  "mips: f16 queries, bf16 keys": lambda: O._C_mips_topk(qm.half(), km.bfloat16(), 3, None, None),
  "mips: int8 keys, no scales": lambda: O._C_mips_topk(qm, k8, 3, None, None),
  "mips: int8 scales wrong shape": lambda: O._C_mips_topk(qm, k8, 3, r(19), None),
  "mips: int8 scales float64": lambda: O._C_mips_topk(qm, k8, 3, r(20).double(), None),
  "mips: scales with float keys": lambda: O._C_mips_topk(qm, km, 3, r(20), None),
  "mips: valid float": lambda: O._C_mips_topk(qm, km, 3, None, torch.ones(20, device=dev)),
  "mips: valid wrong shape": lambda: O._C_mips_topk(qm, km, 3, None, torch.ones(19, dtype=torch.bool, device=dev)),
  "mips: valid non-contiguous": lambda: O._C_mips_topk(qm, km, 3, None, torch.ones(40, dtype=torch.bool, device=dev)[::2]),
  "mips: NaN query": lambda: O._C_mips_topk(nanq, km, 3, None, None),
  "mips: keys on meta": lambda: O._C_mips_topk(qm, torch.empty(20, 8, device="meta"), 3, None, None),
  "ka: q 3-D": lambda: O._C_knowledge_attention_fwd(q[0], kk, vv, bias, beta, 0.0, 0),
  "ka: q float64": lambda: O._C_knowledge_attention_fwd(q.double(), kk.double(), vv.double(), bias, beta, 0.0, 0),
  "ka: q int": lambda: O._C_knowledge_attention_fwd(q.long(), kk.long(), vv.long(), bias, beta, 0.0, 0),
  "ka: k dtype differs": lambda: O._C_knowledge_attention_fwd(q, kk.half(), vv, bias, beta, 0.0, 0),
  "ka: v shape differs": lambda: O._C_knowledge_attention_fwd(q, kk, r(B, N + 1, H, Dh), bias, beta, 0.0, 0),
  "ka: k H differs": lambda: O._C_knowledge_attention_fwd(q, r(B, N, H + 1, Dh), r(B, N, H + 1, Dh), bias, beta, 0.0, 0),
  "ka: k B differs": lambda: O._C_knowledge_attention_fwd(q, r(B + 1, N, H, Dh), r(B + 1, N, H, Dh), bias, beta, 0.0, 0),
  "ka: N = 0": lambda: O._C_knowledge_attention_fwd(q, r(B, 0, H, Dh), r(B, 0, H, Dh), r(B, 0), beta, 0.0, 0),
  "ka: N = 257": lambda: O._C_knowledge_attention_fwd(q, r(B, 257, H, Dh), r(B, 257, H, Dh), r(B, 257), beta, 0.0, 0),
  "ka: H = 0": lambda: O._C_knowledge_attention_fwd(r(B, T, 0, Dh), r(B, N, 0, Dh), r(B, N, 0, Dh), bias, r(0), 0.0, 0),
  "ka: Dh = 0": lambda: O._C_knowledge_attention_fwd(r(B, T, H, 0), r(B, N, H, 0), r(B, N, H, 0), bias, beta, 0.0, 0),
  "ka: bias float16": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias.half(), beta, 0.0, 0),
  "ka: bias wrong shape": lambda: O._C_knowledge_attention_fwd(q, kk, vv, r(B, N + 1), beta, 0.0, 0),
  "ka: beta wrong shape": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias, r(H + 1), 0.0, 0),
  "ka: beta 2-D": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias, r(1, H), 0.0, 0),
  "ka: dropout 1.0": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias, beta, 1.0, 0),
  "ka: dropout -0.1": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias, beta, -0.1, 0),
  "ka: dropout NaN": lambda: O._C_knowledge_attention_fwd(q, kk, vv, bias, beta, float("nan"), 0),
  "ka: q non-contiguous": lambda: O._C_knowledge_attention_fwd(r(B, H, T, Dh).transpose(1, 2), kk, vv, bias, beta, 0.0, 0),
  "ka: k non-contiguous": lambda: O._C_knowledge_attention_fwd(q, r(B, H, N, Dh).transpose(1, 2), vv, bias, beta, 0.0, 0),
  "ka bwd: grad_out wrong shape": lambda: O._C_knowledge_attention_bwd(r(B, T, H, Dh + 1), q, kk, vv, bias, beta, out, lse, 0.0, 0),
  "ka bwd: grad_out dtype": lambda: O._C_knowledge_attention_bwd(out.half(), q, kk, vv, bias, beta, out, lse, 0.0, 0),
  "ka bwd: lse float16": lambda: O._C_knowledge_attention_bwd(out, q, kk, vv, bias, beta, out, lse.half(), 0.0, 0),
  "ka bwd: lse wrong shape": lambda: O._C_knowledge_attention_bwd(out, q, kk, vv, bias, beta, out, r(B, T), 0.0, 0),
  "ka bwd: out wrong shape": lambda: O._C_knowledge_attention_bwd(out, q, kk, vv, bias, beta, out[:1], lse, 0.0, 0),
  "gka: index = M": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx_oob, bias, beta, 0.0, 0),
  "gka: index = -1": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx_neg, bias, beta, 0.0, 0),
  "gka: index = 2**40": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx_huge, bias, beta, 0.0, 0),
  "gka: indices int32": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx.int(), bias, beta, 0.0, 0),
  "gka: indices float": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx.float(), bias, beta, 0.0, 0),
  "gka: indices 1-D": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx[0], bias, beta, 0.0, 0),
  "gka: indices B differs": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, idx[:1], bias, beta, 0.0, 0),
  "gka: indices non-contiguous": lambda: O._C_gather_knowledge_attention_fwd(q, tab, tab, ints(0, M, N, B).t(), bias, beta, 0.0, 0),
  "gka: table 4-D": lambda: O._C_gather_knowledge_attention_fwd(q, tab[None], tab[None], idx, bias, beta, 0.0, 0),
  "gka: table_v differs": lambda: O._C_gather_knowledge_attention_fwd(q, tab, r(M + 1, H, Dh), idx, bias, beta, 0.0, 0),
  "gka: table Dh differs": lambda: O._C_gather_knowledge_attention_fwd(q, r(M, H, Dh + 1), r(M, H, Dh + 1), idx, bias, beta, 0.0, 0),
  "gka: M = 0": lambda: O._C_gather_knowledge_attention_fwd(q, r(0, H, Dh), r(0, H, Dh), idx, bias, beta, 0.0, 0),
  "gka: table non-contiguous": lambda: O._C_gather_knowledge_attention_fwd(q, r(H, M, Dh).transpose(0, 1), tab, idx, bias, beta, 0.0, 0),
  "gka bwd: index = M": lambda: O._C_gather_knowledge_attention_bwd(gout, q, tab, tab, idx_oob, bias, beta, gout, gl, 0.0, 0),
  "gka bwd: index = -1": lambda: O._C_gather_knowledge_attention_bwd(gout, q, tab, tab, idx_neg, bias, beta, gout, gl, 0.0, 0),
  "gka bwd: lse wrong shape": lambda: O._C_gather_knowledge_attention_bwd(gout, q, tab, tab, idx, bias, beta, gout, gl[:, :1], 0.0, 0),
  "emb: id = V": lambda: O._C_embed_layernorm_fwd(ids_oob, None, word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: id = -1": lambda: O._C_embed_layernorm_fwd(ids_neg, None, word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: type id = 2": lambda: O._C_embed_layernorm_fwd(ids, torch.full_like(ids, 2), word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: type id = -1": lambda: O._C_embed_layernorm_fwd(ids, torch.full_like(ids, -1), word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: type ids wrong shape": lambda: O._C_embed_layernorm_fwd(ids, ids[:, :2], word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: ids float": lambda: O._C_embed_layernorm_fwd(ids.float(), None, word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: ids bool": lambda: O._C_embed_layernorm_fwd(ids > 3, None, word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: ids 1-D": lambda: O._C_embed_layernorm_fwd(ids[0], None, word, pos, typ, lnw, lnb, 1e-12, 0),
  "emb: too few positions": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos[:4], typ, lnw, lnb, 1e-12, 0),
  "emb: offset pushes past P": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb, 1e-12, 2),
  "emb: negative offset": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb, 1e-12, -1),
  "emb: eps = 0": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb, 0.0, 0),
  "emb: eps NaN": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb, float("nan"), 0),
  "emb: ln_w wrong size": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, r(D + 1), lnb, 1e-12, 0),
  "emb: ln_b int": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, typ, lnw, lnb.long(), 1e-12, 0),
  "emb: type table empty": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos, r(0, D), lnw, lnb, 1e-12, 0),
  "emb: tables dtype mix": lambda: O._C_embed_layernorm_fwd(ids, None, word, pos.half(), typ, lnw, lnb, 1e-12, 0),
  "emb: tables float64": lambda: O._C_embed_layernorm_fwd(ids, None, word.double(), pos.double(), typ.double(), lnw, lnb, 1e-12, 0),
  "emb: pos D differs": lambda: O._C_embed_layernorm_fwd(ids, None, word, r(P, D + 1), typ, lnw, lnb, 1e-12, 0),
  "emb: word 1-D": lambda: O._C_embed_layernorm_fwd(ids, None, word[0], pos, typ, lnw, lnb, 1e-12, 0),
  "emb: D = 0": lambda: O._C_embed_layernorm_fwd(ids, None, r(V, 0), r(P, 0), r(2, 0), r(0), r(0), 1e-12, 0),
  "emb bwd: id = V": lambda: O._C_embed_layernorm_bwd(h, ids_oob, None, word, pos, typ, lnw, mean, rstd, 0),
  "emb bwd: dh wrong shape": lambda: O._C_embed_layernorm_bwd(h[:, :2], ids, None, word, pos, typ, lnw, mean, rstd, 0),
  "emb bwd: dh dtype": lambda: O._C_embed_layernorm_bwd(h.half(), ids, None, word, pos, typ, lnw, mean, rstd, 0),
  "emb bwd: mean float16": lambda: O._C_embed_layernorm_bwd(h, ids, None, word, pos, typ, lnw, mean.half(), rstd, 0),
  "emb bwd: rstd wrong shape": lambda: O._C_embed_layernorm_bwd(h, ids, None, word, pos, typ, lnw, mean, rstd[:1], 0),
  "pool: x 2-D": lambda: O._C_attentive_pool_fwd(x[0], mask, u, w2, b2),
  "pool: x float64": lambda: O._C_attentive_pool_fwd(x.double(), mask, u.double(), w2, b2),
  "pool: x int": lambda: O._C_attentive_pool_fwd(x.long(), mask, u.long(), w2, b2),
  "pool: u wrong shape": lambda: O._C_attentive_pool_fwd(x, mask, u[:, :2], w2, b2),
  "pool: u dtype": lambda: O._C_attentive_pool_fwd(x, mask, u.half(), w2, b2),
  "pool: Hp = 0": lambda: O._C_attentive_pool_fwd(x, mask, r(E, L, 0), r(0), b2),
  "pool: w2 wrong size": lambda: O._C_attentive_pool_fwd(x, mask, u, r(Hp + 1), b2),
  "pool: w2 int": lambda: O._C_attentive_pool_fwd(x, mask, u, w2.long(), b2),
  "pool: b2 wrong size": lambda: O._C_attentive_pool_fwd(x, mask, u, w2, r(2)),
  "pool: mask wrong shape": lambda: O._C_attentive_pool_fwd(x, mask[:, :2], u, w2, b2),
  "pool: mask 1-D": lambda: O._C_attentive_pool_fwd(x, mask[0], u, w2, b2),
  "pool bwd: grad wrong shape": lambda: O._C_attentive_pool_bwd(r(E, D + 1), x, mask, u, w2, alpha),
  "pool bwd: grad int": lambda: O._C_attentive_pool_bwd(pooled.long(), x, mask, u, w2, alpha),
  "pool bwd: alpha float16": lambda: O._C_attentive_pool_bwd(pooled, x, mask, u, w2, alpha.half()),
  "pool bwd: alpha wrong shape": lambda: O._C_attentive_pool_bwd(pooled, x, mask, u, w2, alpha[:, :2]),
}
# On CUDA, out-of-range ids end in a device-side assert that poisons the context for every
# later case; those are exercised through the wrappers (which check them) instead.
skip = {n for n in CASES if dev == "cuda" and ("index =" in n or "id =" in n)}
for name, fn in CASES.items():
    if name in skip:
        continue
    print("CASE", name, flush=True)
    try:
        res = fn()
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print("RAISED", "RuntimeError", msg[:200], flush=True)
    except Exception as e:
        print("RAISED", type(e).__name__, str(e)[:200].replace("\n", " "), flush=True)
    else:
        if dev == "cuda":
            torch.cuda.synchronize()
        print("RETURNED", flush=True)
print("DONE", flush=True)
'''


def _run_native_cases(device: str) -> dict[str, tuple[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _NATIVE_CASES, device], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    results: dict[str, tuple[str, str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            current = line[5:]
            results[current] = ("CRASHED", "")
        elif line.startswith("RAISED ") and current:
            _, kind, *msg = line.split(" ", 2)
            results[current] = (kind, msg[0] if msg else "")
        elif line == "RETURNED" and current:
            results[current] = ("RETURNED", "")
    assert "DONE" in proc.stdout, (
        f"the child died (exit {proc.returncode}) in case {current!r}:\n{proc.stderr[-3000:]}")
    return results


def _native_built(device: str) -> bool:
    mod, _ = _backends.load_extension()
    if mod is None:
        return False
    return device == "cpu" or (HAS_CUDA and mod.cuda_built())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_native_ops_bad_arguments_raise_runtime_error(device):
    """torch.ops.pluglm._C_* with bad arguments: TORCH_CHECK (RuntimeError), never a crash
    and never a silent result. Run in a subprocess so a segfault fails only this test."""
    if not _native_built(device):
        pytest.skip(f"native {device} kernels not built")
    results = _run_native_cases(device)
    assert results, "no case ran"
    returned = [n for n, (kind, _) in results.items() if kind == "RETURNED"]
    other = {n: r for n, r in results.items() if r[0] not in ("RuntimeError", "RETURNED")}
    empty = [n for n, (kind, msg) in results.items() if kind == "RuntimeError" and not msg]
    assert not returned, f"accepted bad arguments silently: {returned}"
    assert not other, f"raised something other than RuntimeError: {other}"
    assert not empty, f"RuntimeError without a message: {empty}"
