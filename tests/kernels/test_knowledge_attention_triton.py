"""Triton knowledge_attention / gather_knowledge_attention under TRITON_INTERPRET=1 (CPU
tensors, tiny shapes), and on CUDA tensors where a GPU exists.

Outputs and every gradient against the float64 reference; the Philox dropout mask
bit-identical with the reference; repeated gather indices; deterministic backward.
"""
from __future__ import annotations

# TRITON_INTERPRET is set by tests/conftest.py where no GPU exists

import pytest  # noqa: E402
import torch  # noqa: E402

import pluglm_kernels as pk  # noqa: E402
from pluglm_kernels import _backends  # noqa: E402
from pluglm_kernels import reference as R  # noqa: E402

from conftest import RTOL, lowp_tol, rel_err, triton_device  # noqa: E402

pytestmark = pytest.mark.triton

DEV = triton_device()

from pluglm_kernels.triton import knowledge_attention as TK  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, T, H, Dh, N, dtype):
    q = (torch.randn(B, T, H, Dh) * 0.5).to(dtype).to(DEV)
    k = torch.randn(B, N, H, Dh).to(dtype).to(DEV)
    v = torch.randn(B, N, H, Dh).to(dtype).to(DEV)
    return q, k, v, torch.randn(B, N, device=DEV), torch.randn(H, device=DEV)


def _ref_with_grads(q, k, v, bias, beta, go, p, seed):
    """float64 reference outputs and gradients, and the gradients of the reference run on
    the inputs as given (float32 accumulation), the yardstick of rounding in _grad_tol."""
    xs = [t.detach().cpu().to(torch.float64).requires_grad_() for t in (q, k, v, bias, beta)]
    out, lse = R.knowledge_attention(*xs, p, seed)
    out.backward(go.cpu().to(torch.float64))
    lows = [t.detach().cpu().clone().requires_grad_() for t in (q, k, v, bias, beta)]
    low, _ = R.knowledge_attention(*lows, p, seed)
    low.backward(go.cpu().to(low.dtype))
    return out.detach(), lse, [x.grad for x in xs], [x.grad for x in lows]


def _tol(dtype):
    return RTOL[dtype] if dtype == torch.float32 else 1e-2


def _grad_tol(dtype, low=None, ref=None):
    # Gradients are sums over B*T (dbeta over B*T*N) terms with cancellation, computed from
    # inputs rounded to the kernel dtype. dbeta's relative error follows the cancellation
    # (float32, N=256, 170 seeds: up to 2.9e-4; 5e-5 failed 1 run), so the floor rises
    # to 8x the error of the same reference run in the input dtype (``low``;
    # conftest.lowp_tol): largest error / tolerance 0.27. bf16 dq/dk/dv: up to 9.9e-3.
    floor = 5e-5 if dtype == torch.float32 else 2e-2
    return floor if low is None else lowp_tol(floor, low, ref)


def test_registered():
    assert {"knowledge_attention", "gather_knowledge_attention"} <= _backends.TRITON_OPS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,p", [
    ((3, 7, 2, 32, 5), 0.0),
    ((3, 7, 2, 32, 5), 0.3),
    ((1, 70, 1, 64, 1), 0.2),   # two T tiles: backward splits T into partials
    ((1, 5, 2, 128, 33), 0.0),
    ((1, 3, 1, 32, 256), 0.1),
], ids=lambda x: "B{}T{}H{}D{}N{}".format(*x) if isinstance(x, tuple) else f"p{x}")
def test_forward_backward(fresh_seed, shape, p, dtype):
    q, k, v, bias, beta = _inputs(*shape, dtype)
    seed = 31 + (5 << 32)
    out, lse = TK.knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
    go = torch.randn_like(q)
    ref_out, ref_lse, ref_grads, low_grads = _ref_with_grads(q, k, v, bias, beta, go, p, seed)
    tol = _tol(dtype)
    assert out.dtype == dtype and rel_err(out.cpu(), ref_out) < tol
    assert rel_err(lse.cpu(), ref_lse) < 1e-5
    grads = TK.knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, p, seed)
    for name, g, r, lo, x in zip("dq dk dv dbias dbeta".split(), grads, ref_grads, low_grads,
                                 (q, k, v, bias, beta)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert rel_err(g.cpu(), r) < _grad_tol(dtype, lo, r), (name, rel_err(g.cpu(), r))


def test_backward_several_tiles_per_split(fresh_seed, monkeypatch):
    monkeypatch.setattr(TK, "_BWD_PROGRAMS", 2)  # 4 tiles of T over 2 programs
    q, k, v, bias, beta = _inputs(1, 200, 1, 32, 3, torch.float32)
    out, lse = TK.knowledge_attention_fwd(q, k, v, bias, beta, 0.1, 8)
    go = torch.randn_like(q)
    _, _, ref_grads, low_grads = _ref_with_grads(q, k, v, bias, beta, go, 0.1, 8)
    g1 = TK.knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, 0.1, 8)
    g2 = TK.knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, 0.1, 8)
    for a, b, r, lo in zip(g1, g2, ref_grads, low_grads):
        assert torch.equal(a, b)  # deterministic: no atomics
        assert rel_err(a.cpu(), r) < _grad_tol(torch.float32, lo, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gather", [False, True], ids=["dense", "gather"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda x: f"p{x}")
def test_chunked_over_n(fresh_seed, monkeypatch, dtype, gather, p):
    """N above the per-program row caps. Forward: an online softmax over chunks of N.
    Backward: dq by its own kernel (two passes over the chunks: exact D = sum P dP, then
    dq), dk/dv/dbias/dbeta by one program per chunk, T split in partials."""
    caps = {False: dict.fromkeys((16, 32, 64, 128), 16),
            True: dict.fromkeys((16, 32, 64, 128), 16)}
    monkeypatch.setattr(TK, "_BWD_MAX_ROWS", caps)
    monkeypatch.setattr(TK, "_FWD_MAX_ROWS", caps)
    monkeypatch.setattr(TK, "_BWD_PROGRAMS", 6)  # several splits of T per chunk
    B, T, H, Dh, N, M = 2, 37, 2, 32, 41, 50  # 3 chunks, the last one partial
    assert TK._bwd_blocks(N, Dh, dtype)[4]
    q, k, v, bias, beta = _inputs(B, T, H, Dh, N, dtype)
    seed = 77 + (3 << 40)
    go = torch.randn_like(q)
    if gather:
        tk = torch.randn(M, H, Dh).to(dtype).to(DEV)
        tv = torch.randn(M, H, Dh).to(dtype).to(DEV)
        idx = torch.randint(0, M, (B, N), device=DEV)
        idx[1, :5] = idx[0, 3]  # repeats, within and across sequences
        out, lse = TK.gather_knowledge_attention_fwd(q, tk, tv, idx, bias, beta, p, seed)
        run = lambda: TK.gather_knowledge_attention_bwd(go, q, tk, tv, idx, bias, beta, out,  # noqa: E731
                                                        lse, p, seed)
        k, v = tk[idx], tv[idx]
    else:
        out, lse = TK.knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
        run = lambda: TK.knowledge_attention_bwd(go, q, k, v, bias, beta, out, lse, p, seed)  # noqa: E731
    ref_out, ref_lse, ref_grads, low_grads = _ref_with_grads(q, k, v, bias, beta, go, p, seed)
    assert out.dtype == dtype and rel_err(out.cpu(), ref_out) < _tol(dtype)
    assert rel_err(lse.cpu(), ref_lse) < 1e-5
    g1, g2 = run(), run()
    for name, a, b, r, lo in zip("dq dk dv dbias dbeta".split(), g1, g2, ref_grads, low_grads):
        assert torch.equal(a, b), name  # deterministic
        assert rel_err(a.cpu(), r) < _grad_tol(dtype, lo, r), (name, rel_err(a.cpu(), r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_repeated_indices(fresh_seed, dtype):
    B, T, H, Dh, N, M = 2, 5, 2, 32, 4, 6
    q, _, _, bias, beta = _inputs(B, T, H, Dh, N, dtype)
    tk = torch.randn(M, H, Dh).to(dtype).to(DEV)
    tv = torch.randn(M, H, Dh).to(dtype).to(DEV)
    idx = torch.tensor([[1, 1, 3, 1], [3, 0, 1, 5]], device=DEV)
    out, lse = TK.gather_knowledge_attention_fwd(q, tk, tv, idx, bias, beta, 0.2, 3)
    go = torch.randn_like(q)
    ref_out, _, ref_grads, low_grads = _ref_with_grads(q, tk[idx], tv[idx], bias, beta, go, 0.2, 3)
    tol = _tol(dtype)
    assert rel_err(out.cpu(), ref_out) < tol
    grads = TK.gather_knowledge_attention_bwd(go, q, tk, tv, idx, bias, beta, out, lse, 0.2, 3)
    for name, g, r, lo in zip("dq dk_rows dv_rows dbias dbeta".split(), grads, ref_grads, low_grads):
        assert rel_err(g.cpu(), r) < _grad_tol(dtype, lo, r), name


def test_public_op_autograd_tables(fresh_seed):
    """backend="triton" through torch.ops.pluglm.*: table grads accumulate via index_add."""
    B, T, H, Dh, N, M = 2, 3, 2, 32, 3, 4
    q, _, _, bias, beta = _inputs(B, T, H, Dh, N, torch.float32)
    tk, tv = torch.randn(M, H, Dh, device=DEV), torch.randn(M, H, Dh, device=DEV)
    idx = torch.tensor([[2, 2, 0], [2, 3, 3]], device=DEV)
    leaves = [t.clone().requires_grad_() for t in (q, tk, tv, bias, beta)]
    out = pk.gather_knowledge_attention(*leaves[:3], idx, *leaves[3:], dropout_p=0.1, seed=1,
                                        backend="triton")
    go = torch.randn_like(out)
    out.backward(go)
    xs = [t.detach().cpu().double().requires_grad_() for t in (q, tk, tv, bias, beta)]
    ref, _ = R.gather_knowledge_attention(xs[0], xs[1], xs[2], idx.cpu(), xs[3], xs[4], 0.1, 1)
    ref.backward(go.cpu().double())
    assert rel_err(out.cpu(), ref) < 1e-5
    for a, x in zip(leaves, xs):
        assert rel_err(a.grad.cpu(), x.grad) < 1e-5


def test_dropout_mask_bitwise_and_reproducible(fresh_seed):
    B, T, H, N = 2, 9, 2, 6
    q, k, _, bias, beta = _inputs(B, T, H, 32, N, torch.float32)
    v = torch.zeros(B, N, H, 32, device=DEV)
    for j in range(N):
        v[:, j, :, j] = 1.0  # out[..., j] = P_j after dropout: dropped entries are exact zeros
    seed = 0xDEADBEEF12345
    a, _ = TK.knowledge_attention_fwd(q, k, v, bias, beta, 0.4, seed)
    b, _ = TK.knowledge_attention_fwd(q, k, v, bias, beta, 0.4, seed)
    c, _ = TK.knowledge_attention_fwd(q, k, v, bias, beta, 0.4, seed + 1)
    keep = R.dropout_keep_mask(seed, 0.4, (B, T, H, N), "cpu")
    assert torch.equal((a[..., :N] != 0).cpu(), keep)
    assert torch.equal(a, b) and not torch.equal(a, c)
