"""knowledge_attention / gather_knowledge_attention: the C++ CPU kernels and the reference.

Every output and gradient (q, k, v, bias, beta, tables) against the float64 reference
(itself gradchecked), odd sizes, each dtype, dropout reproducibility and consistency of the
backward with the forward's mask, repeated gather indices, argument checks.
"""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels as pk
from pluglm_kernels import reference as R
from pluglm_kernels._backends import availability

from conftest import RTOL, cpu_has, lowp_tol, rel_err

HAS_CPU_KERNEL = availability("knowledge_attention", "cpu", "cpu")[0] and availability(
    "gather_knowledge_attention", "cpu", "cpu")[0]
needs_cpu = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ kernels not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
C = torch.ops.pluglm


def _inputs(B, T, H, Dh, N, dtype, scale=0.5):
    q = (torch.randn(B, T, H, Dh) * scale).to(dtype)
    k = torch.randn(B, N, H, Dh).to(dtype)
    v = torch.randn(B, N, H, Dh).to(dtype)
    bias = torch.randn(B, N)
    beta = torch.randn(H)
    return q, k, v, bias, beta


def _ref_with_grads(q, k, v, bias, beta, go, p, seed):
    """float64 reference outputs and the gradients of <out, go> w.r.t. every input, and the
    same gradients from the reference run on the inputs as given (float32 accumulation): the
    yardstick of rounding error in _grad_tol."""
    xs = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v, bias, beta)]
    out, lse = R.knowledge_attention(*xs, p, seed)
    out.backward(go.to(torch.float64))
    lows = [t.detach().clone().requires_grad_() for t in (q, k, v, bias, beta)]
    low, _ = R.knowledge_attention(*lows, p, seed)
    low.backward(go.to(low.dtype))
    return out.detach(), lse, [x.grad for x in xs], [x.grad for x in lows]


def _tol(dtype):
    return RTOL[dtype] if dtype == torch.float32 else 1e-2


def _grad_tol(dtype, low=None, ref=None):
    # Gradients are sums over B*T (dbeta over B*T*N) terms with cancellation, computed from
    # inputs rounded to the kernel dtype. dbeta's relative error follows the cancellation:
    # over 200 seeds per case it reached 2.2e-4 in float32 (N=256; 5e-5 failed 1.5% of runs
    # of that case) and 4.4e-4 in bf16, within 8x the same reference's error in the input
    # dtype (``low``; conftest.lowp_tol); the other gradients stayed below 7e-6 (f32) and
    # 2.1e-3 (bf16).
    floor = 5e-5 if dtype == torch.float32 else 2e-2
    return floor if low is None else lowp_tol(floor, low, ref)


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_reference_gradcheck(fresh_seed, p):
    q, k, v, bias, beta = (t.double().requires_grad_() for t in _inputs(2, 3, 2, 4, 3, torch.float64))
    f = lambda *a: R.knowledge_attention(*a, p, 7)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, bias, beta))


def test_reference_gather_gradcheck(fresh_seed):
    q, _, _, bias, beta = _inputs(2, 3, 2, 4, 3, torch.float64)
    tk, tv = torch.randn(4, 2, 4, dtype=torch.float64), torch.randn(4, 2, 4, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 2], [3, 0, 0]])
    args = [t.double().requires_grad_() for t in (q, tk, tv)]
    f = lambda q_, tk_, tv_, b_, be_: R.gather_knowledge_attention(q_, tk_, tv_, idx, b_, be_)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (*args, bias.double().requires_grad_(),
                                        beta.double().requires_grad_()))


def test_reference_philox_known_answer():
    # Random123 known-answer vector: Philox-4x32-10, counter 0, key 0 -> first word 0x6627e8d5
    assert int(R.philox_uint32(0, torch.tensor([0]))[0]) == 0x6627E8D5


# ------------------------------------------------------------------------- C++ kernels

SHAPES = [  # (B, T, H, Dh, N)
    (3, 7, 2, 32, 5),
    (2, 33, 3, 64, 1),
    (1, 5, 2, 128, 33),
    (1, 130, 2, 64, 5),   # several forward chunks, and T split into partials in backward
    (2, 3, 1, 32, 256),
    (2, 9, 3, 24, 7),     # the C++ path takes any Dh
]


def _ids(s):
    return "B{}T{}H{}D{}N{}".format(*s)


@needs_cpu
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_cpu_forward_backward(fresh_seed, shape, dtype, p):
    q, k, v, bias, beta = _inputs(*shape, dtype)
    seed = 12345 + (1 << 33)  # both key words non-zero
    out, lse = C._C_knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
    assert out.dtype == dtype and lse.dtype == torch.float32
    go = torch.randn_like(q)
    ref_out, ref_lse, ref_grads, low_grads = _ref_with_grads(q, k, v, bias, beta, go, p, seed)
    tol = _tol(dtype)
    assert rel_err(out, ref_out) < tol
    assert rel_err(lse, ref_lse) < 1e-5
    grads = C._C_knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, p, seed)
    for name, g, r, lo, x in zip("dq dk dv dbias dbeta".split(), grads, ref_grads, low_grads,
                                 (q, k, v, bias, beta)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < _grad_tol(dtype, lo, r), (name, rel_err(g, r))


@needs_cpu
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_gather_matches_reference(fresh_seed, dtype, p):
    B, T, H, Dh, N, M = 3, 11, 2, 32, 6, 9
    q, _, _, bias, beta = _inputs(B, T, H, Dh, N, dtype)
    tk, tv = torch.randn(M, H, Dh).to(dtype), torch.randn(M, H, Dh).to(dtype)
    idx = torch.randint(0, M, (B, N))
    idx[0, :3] = 4  # repeated rows inside one sequence and across sequences
    idx[1, 0] = 4
    out, lse = C._C_gather_knowledge_attention_fwd(q, tk, tv, idx, bias, beta, p, 99)
    go = torch.randn_like(q)
    ref_out, ref_lse, ref_grads, low_grads = _ref_with_grads(q, tk[idx], tv[idx], bias, beta, go, p, 99)
    tol = _tol(dtype)
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < 1e-5
    grads = C._C_gather_knowledge_attention_bwd(go, q, tk, tv, idx, bias, beta, out, lse, p, 99)
    assert grads[1].shape == (B, N, H, Dh) and grads[2].shape == (B, N, H, Dh)
    for name, g, r, lo in zip("dq dk_rows dv_rows dbias dbeta".split(), grads, ref_grads, low_grads):
        assert rel_err(g, r) < _grad_tol(dtype, lo, r), name


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_gather_table_grads_accumulate(fresh_seed, dtype):
    """Autograd through torch.ops.pluglm.gather_knowledge_attention: table grads via index_add."""
    B, T, H, Dh, N, M = 2, 5, 3, 32, 4, 6
    q, _, _, bias, beta = _inputs(B, T, H, Dh, N, dtype)
    tk, tv = torch.randn(M, H, Dh).to(dtype), torch.randn(M, H, Dh).to(dtype)
    idx = torch.tensor([[1, 1, 3, 1], [3, 0, 1, 5]])  # row 1 four times, row 3 twice
    leaves = [t.clone().requires_grad_() for t in (q, tk, tv, bias, beta)]
    out = pk.gather_knowledge_attention(leaves[0], leaves[1], leaves[2], idx, leaves[3], leaves[4],
                                        dropout_p=0.1, seed=5, backend="cpu")
    go = torch.randn_like(out)
    out.backward(go)
    xs = [t.detach().double().requires_grad_() for t in (q, tk, tv, bias, beta)]
    ref, _ = R.gather_knowledge_attention(xs[0], xs[1], xs[2], idx, xs[3], xs[4], 0.1, 5)
    ref.backward(go.double())
    tol = _tol(dtype)
    assert rel_err(out, ref) < tol
    for name, a, x in zip(("q", "table_k", "table_v", "bias", "beta"), leaves, xs):
        assert a.grad.dtype == a.dtype, name
        assert rel_err(a.grad, x.grad) < _grad_tol(dtype), name
    assert leaves[1].grad[[2, 4]].abs().max() == 0  # rows never retrieved get no gradient


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_wrapper_autograd(fresh_seed, dtype):
    q, k, v, bias, beta = _inputs(3, 7, 2, 32, 5, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias, beta)]
    out = pk.knowledge_attention(*leaves, dropout_p=0.15, seed=2024, backend="cpu")
    go = torch.randn_like(out)
    out.backward(go)
    ref_out, _, ref_grads, low_grads = _ref_with_grads(q, k, v, bias, beta, go, 0.15, 2024)
    tol = _tol(dtype)
    assert rel_err(out, ref_out) < tol
    for a, r, lo in zip(leaves, ref_grads, low_grads):
        assert rel_err(a.grad, r) < _grad_tol(dtype, lo, r)


@needs_cpu
def test_opcheck_cpu_registrations(fresh_seed):
    q, k, v, bias, beta = _inputs(2, 3, 2, 32, 3, torch.float32)
    for t in (q, k, v, bias, beta):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pluglm.knowledge_attention.default,
                          (q, k, v, bias, beta, 0.1, 3, "cpu"))
    tk, tv = torch.randn(5, 2, 32, requires_grad=True), torch.randn(5, 2, 32, requires_grad=True)
    idx = torch.tensor([[0, 4, 4], [2, 1, 0]])
    torch.library.opcheck(torch.ops.pluglm.gather_knowledge_attention.default,
                          (q, tk, tv, idx, bias, beta, 0.0, 0, "cpu"))


# ------------------------------------------------------------------------------ dropout


@needs_cpu
def test_dropout_reproducible(fresh_seed):
    q, k, v, bias, beta = _inputs(2, 17, 3, 32, 8, torch.float32)
    a, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.5, 11)
    b, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.5, 11)
    c, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.5, 12)
    d, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.5, 11 + (1 << 32))
    nodrop, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 11)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)  # both seed words matter
    assert not torch.equal(a, nodrop)
    # p = 0 ignores the seed
    e, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 999)
    assert torch.equal(nodrop, e)


@needs_cpu
def test_dropout_mask_matches_reference_bitwise(fresh_seed):
    """With v = one-hot rows, out exposes every dropped probability as an exact zero."""
    B, T, H, N = 2, 9, 2, 6
    q, _, _, bias, beta = _inputs(B, T, H, 32, N, torch.float32)
    k = torch.randn(B, N, H, 32)
    v = torch.zeros(B, N, H, 32)
    for j in range(N):
        v[:, j, :, j] = 1.0
    out, _ = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.4, 77)
    keep = R.dropout_keep_mask(77, 0.4, (B, T, H, N), "cpu")
    assert torch.equal(out[..., :N] != 0, keep)


@needs_cpu
def test_backward_deterministic_and_thread_independent(fresh_seed):
    q, k, v, bias, beta = _inputs(1, 300, 1, 64, 5, torch.float32)  # T split into partials
    out, lse = C._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.1, 4)
    go = torch.randn_like(q)
    g1 = C._C_knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, 0.1, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g2 = C._C_knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, 0.1, 4)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Dh,N", [(32, 1), (64, 5), (128, 33)], ids=lambda v: str(v))
def test_cpu_every_isa_path(fresh_seed, monkeypatch, isa, dtype, Dh, N):
    """PLUGLM_CPU_ISA caps the kernels' instruction set: the portable build (4-wide rows in
    the backward), the AVX2+FMA clone (8-wide) and the AVX-512 clone (16-wide), each
    against the float64 reference; N = 1 gives exact zeros for dq, dk, dbias, dbeta."""
    if isa != "scalar" and not cpu_has({"avx2": "avx2", "avx512": "avx512f"}[isa]):
        pytest.skip(f"CPU lacks {isa}")
    monkeypatch.setenv("PLUGLM_CPU_ISA", isa)
    B, T, H = 2, 21, 3  # T not a multiple of any row block
    q, k, v, bias, beta = _inputs(B, T, H, Dh, N, dtype)
    tk, tv = torch.randn(7, H, Dh).to(dtype), torch.randn(7, H, Dh).to(dtype)
    idx = torch.randint(0, 7, (B, N))
    seed, p = 99 + (7 << 32), 0.2
    go = torch.randn_like(q)
    for gather in (False, True):
        kk, vv = (tk[idx], tv[idx]) if gather else (k, v)
        if gather:
            out, lse = C._C_gather_knowledge_attention_fwd(q, tk, tv, idx, bias, beta, p, seed)
            grads = C._C_gather_knowledge_attention_bwd(go, q, tk, tv, idx, bias, beta, out, lse,
                                                        p, seed)
        else:
            out, lse = C._C_knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
            grads = C._C_knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, p, seed)
        ref_out, ref_lse, ref_grads, low_grads = _ref_with_grads(q, kk, vv, bias, beta, go, p, seed)
        assert rel_err(out, ref_out) < _tol(dtype) and rel_err(lse, ref_lse) < 1e-5
        for name, g, r, lo in zip("dq dk dv dbias dbeta".split(), grads, ref_grads, low_grads):
            if N == 1 and name != "dv":
                assert not g.any(), (isa, gather, name)
            else:
                assert rel_err(g, r) < _grad_tol(dtype, lo, r), (isa, gather, name, rel_err(g, r))


# ------------------------------------------------------------------------ argument checks


@needs_cpu
def test_cpu_argument_checks():
    q, k, v, bias, beta = _inputs(2, 3, 2, 32, 4, torch.float32)
    fwd = C._C_knowledge_attention_fwd
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        fwd(q.transpose(1, 2), k, v, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="q must be float32"):
        fwd(q.double(), k.double(), v.double(), bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        fwd(q, k.half(), v, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        fwd(q, k, v[:, :3].contiguous(), bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"k must be \[B=2"):
        fwd(q, k[:, :, :1].contiguous(), v, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        fwd(q, k, v, bias.double(), beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        fwd(q, k, v, bias[:, :2].contiguous(), beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="beta must be"):
        fwd(q, k, v, bias, beta[:1].contiguous(), 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        fwd(q, k, v, bias, beta, 1.0, 0)
    big = torch.randn(2, 257, 2, 32)
    with pytest.raises(RuntimeError, match="N .* must be in"):
        fwd(q, big, big, torch.randn(2, 257), beta, 0.0, 0)
    out, lse = fwd(q, k, v, bias, beta, 0.0, 0)
    bwd = C._C_knowledge_attention_bwd
    with pytest.raises(RuntimeError, match="lse must be float32"):
        bwd(q, q, k, v, bias, beta, out, lse[:, :1].contiguous(), 0.0, 0)
    with pytest.raises(RuntimeError, match="grad_out must match q"):
        bwd(q.half(), q, k, v, bias, beta, out, lse, 0.0, 0)

    tk = torch.randn(5, 2, 32)
    gfwd = C._C_gather_knowledge_attention_fwd
    idx = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])
    gfwd(q, tk, tk, idx, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"indices must be in \[0, 5\)"):
        gfwd(q, tk, tk, idx + 1, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"indices must be in \[0, 5\)"):
        gfwd(q, tk, tk, idx - 1, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        gfwd(q, tk, tk, idx.int(), bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="table_k must be"):
        gfwd(q, tk[:, :1].contiguous(), tk[:, :1].contiguous(), idx, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"indices must be \[B=2"):
        gfwd(q, tk, tk, idx[:1].contiguous(), bias, beta, 0.0, 0)


@needs_cpu
def test_public_wrapper_errors():
    q, k, v, bias, beta = _inputs(2, 3, 2, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="indices"):
        pk.gather_knowledge_attention(q, k[0], v[0], torch.tensor([[0, 9, 1, 1], [0, 0, 0, 0]]),
                                      bias, beta, backend="cpu")
    with pytest.raises(TypeError, match="k and v"):
        pk.knowledge_attention(q, k.half(), v, bias, beta, backend="cpu")
