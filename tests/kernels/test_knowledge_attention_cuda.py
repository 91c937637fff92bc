"""CUDA knowledge attention (csrc/cuda/knowledge_attention.cu) against the float64 reference:
forward output and lse, every gradient, the Philox dropout mask bit for bit, the fused
gather with repeated indices, determinism, and argument errors. GPU only."""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels  # noqa: F401  (loads the extension, registers the ops)
from pluglm_kernels import functional as F
from pluglm_kernels import reference
from pluglm_kernels._backends import availability

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not availability("knowledge_attention", "cuda", "cuda")[0],
        reason="CUDA knowledge_attention kernels not built",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Gradients reduce over up to thousands of tokens in float32.
GTOL = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
_ID = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _ops():
    return torch.ops.pluglm


def _check(name, out, ref, tol):
    """||out - ref|| <= tol * ||ref||, with a tiny absolute floor for all-zero references."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out64 - ref64).norm().item()
    bound = tol * ref64.norm().item() + 1e-6 * ref64.numel() ** 0.5
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|ref|={ref64.norm().item():.3e})"


def _poison_allocator(nbytes=64 << 20):
    # The ops allocate their outputs with torch.empty: fill the caching allocator's free
    # blocks with NaN first so that any element a kernel fails to write shows up.
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _inputs(B, T, H, N, Dh, dtype, scale=1.0):
    dev = "cuda"
    q = (torch.randn(B, T, H, Dh, device=dev) * scale / Dh ** 0.5 * 3).to(dtype)
    k = torch.randn(B, N, H, Dh, device=dev).to(dtype)
    v = torch.randn(B, N, H, Dh, device=dev).to(dtype)
    bias = torch.rand(B, N, device=dev) * 2 - 1
    beta = torch.randn(H, device=dev)
    return q, k, v, bias, beta


def _ref_fwd_bwd(q, k, v, bias, beta, grad_out, p, seed):
    """float64 oracle: (out, lse, dq, dk, dv, dbias, dbeta)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias, beta)]
    out, lse = reference.knowledge_attention(*leaves, p, seed)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return (out.detach(), lse.detach(), *grads)


SHAPES = [  # (B, T, H)
    (2, 37, 3),
    (1, 1, 1),
    (3, 130, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ID.get)
@pytest.mark.parametrize("Dh", [32, 64, 128])
@pytest.mark.parametrize("N", [1, 5, 33, 256])
def test_forward_and_backward(dtype, Dh, N, fresh_seed):
    B, T, H = SHAPES[(Dh // 32 + N) % len(SHAPES)]
    q, k, v, bias, beta = _inputs(B, T, H, N, Dh, dtype)
    g = torch.randn(B, T, H, Dh, device="cuda").to(dtype)
    ref = _ref_fwd_bwd(q, k, v, bias, beta, g, 0.0, 0)

    _poison_allocator()
    out, lse = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _check("out", out, ref[0], TOL[dtype])
    _check("lse", lse, ref[1], 1e-5)

    _poison_allocator()
    grads = _ops()._C_knowledge_attention_bwd(g, q, k, v, bias, beta, out, lse, 0.0, 0)
    for name, got, want, dt in zip(("dq", "dk", "dv", "dbias", "dbeta"), grads, ref[2:],
                                   (dtype, dtype, dtype, torch.float32, torch.float32)):
        assert got.dtype == dt, f"{name} dtype {got.dtype}"
        _check(name, got, want, GTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ID.get)
def test_long_sequence(dtype, fresh_seed):
    B, T, H, N, Dh = 1, 8192, 2, 33, 64
    q, k, v, bias, beta = _inputs(B, T, H, N, Dh, dtype)
    g = torch.randn(B, T, H, Dh, device="cuda").to(dtype)
    ref = _ref_fwd_bwd(q, k, v, bias, beta, g, 0.1, 12345)
    out, lse = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.1, 12345)
    _check("out", out, ref[0], TOL[dtype])
    _check("lse", lse, ref[1], 1e-5)
    grads = _ops()._C_knowledge_attention_bwd(g, q, k, v, bias, beta, out, lse, 0.1, 12345)
    for name, got, want in zip(("dq", "dk", "dv", "dbias", "dbeta"), grads, ref[2:]):
        _check(name, got, want, GTOL[dtype])


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_bit_identical(seed, p):
    # With v[b, j, h] = e_j, out[b, t, h, j] = P_tj * keep_tj / (1 - p) for j < N: a zero
    # exactly where the element was dropped (logits are small, so no P underflows).
    B, T, H, N, Dh = 2, 41, 3, 33, 64
    q = torch.randn(B, T, H, Dh, device="cuda") * 0.05
    k = torch.randn(B, N, H, Dh, device="cuda")
    v = torch.zeros(B, N, H, Dh, device="cuda")
    v[:, torch.arange(N), :, torch.arange(N)] = 1.0
    bias = torch.rand(B, N, device="cuda") * 0.1
    beta = torch.ones(H, device="cuda")
    out, _ = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, p, seed)
    keep = reference.dropout_keep_mask(seed, p, (B, T, H, N), "cuda")
    got = out[..., :N] != 0
    assert torch.equal(got, keep), f"{(got != keep).sum().item()} mask bits differ"
    assert (out[..., N:] == 0).all()
    # kept values are P / (1 - p)
    ref, _ = reference.knowledge_attention(q.double(), k.double(), v.double(), bias.double(),
                                           beta.double(), p, seed)
    _check("out", out, ref, 1e-5)
    # the gather variant draws the same mask
    idx = torch.arange(B * N, device="cuda").view(B, N)
    out_g, _ = _ops()._C_gather_knowledge_attention_fwd(
        q, k.reshape(B * N, H, Dh), v.reshape(B * N, H, Dh), idx, bias, beta, p, seed)
    assert torch.equal(out_g[..., :N] != 0, keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ID.get)
def test_dropout_reproducible_and_backward_consistent(dtype, fresh_seed):
    B, T, H, N, Dh = 2, 53, 4, 17, 32
    q, k, v, bias, beta = _inputs(B, T, H, N, Dh, dtype)
    g = torch.randn(B, T, H, Dh, device="cuda").to(dtype)
    seed = 987654321987
    o1, l1 = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.3, seed)
    o2, l2 = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.3, seed)
    o3, _ = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.3, seed + 1)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert not torch.equal(o1, o3)
    ref = _ref_fwd_bwd(q, k, v, bias, beta, g, 0.3, seed)
    _check("out", o1, ref[0], TOL[dtype])
    grads = _ops()._C_knowledge_attention_bwd(g, q, k, v, bias, beta, o1, l1, 0.3, seed)
    for name, got, want in zip(("dq", "dk", "dv", "dbias", "dbeta"), grads, ref[2:]):
        _check(name, got, want, GTOL[dtype])


def test_backward_deterministic():
    B, T, H, N, Dh = 3, 700, 5, 40, 64
    q, k, v, bias, beta = _inputs(B, T, H, N, Dh, torch.float32)
    g = torch.randn_like(q)
    out, lse = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.1, 5)
    a = _ops()._C_knowledge_attention_bwd(g, q, k, v, bias, beta, out, lse, 0.1, 5)
    b = _ops()._C_knowledge_attention_bwd(g, q, k, v, bias, beta, out, lse, 0.1, 5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ID.get)
@pytest.mark.parametrize("Dh,N", [(32, 5), (64, 33), (128, 256)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gather_repeated_indices(dtype, Dh, N, p, fresh_seed):
    B, T, H, M = 3, 29, 2, 11
    dev = "cuda"
    q = (torch.randn(B, T, H, Dh, device=dev) / Dh ** 0.5 * 3).to(dtype).requires_grad_(True)
    table_k = torch.randn(M, H, Dh, device=dev).to(dtype).requires_grad_(True)
    table_v = torch.randn(M, H, Dh, device=dev).to(dtype).requires_grad_(True)
    indices = torch.randint(0, M, (B, N), device=dev)
    indices[:, 0] = 3  # repeats across the batch (and within rows: N > M for N >= 33)
    if N > 1:
        indices[0, 1] = 3
    bias = (torch.rand(B, N, device=dev) * 2 - 1).requires_grad_(True)
    beta = torch.randn(H, device=dev).requires_grad_(True)
    seed = 424242

    out = F.gather_knowledge_attention(q, table_k, table_v, indices, bias, beta, dropout_p=p,
                                       seed=seed, backend="cuda")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, table_k, table_v, bias, beta), g)

    leaves = [t.detach().double().requires_grad_(True) for t in (q, table_k, table_v, bias, beta)]
    ref_out, _ = reference.gather_knowledge_attention(leaves[0], leaves[1], leaves[2], indices,
                                                      leaves[3], leaves[4], p, seed)
    ref_grads = torch.autograd.grad(ref_out, leaves, g.double())
    _check("out", out, ref_out, TOL[dtype])
    for name, got, want in zip(("dq", "dtable_k", "dtable_v", "dbias", "dbeta"), grads, ref_grads):
        _check(name, got, want, GTOL[dtype])

    # the fused gather equals the plain kernel on gathered rows, bit for bit
    ko, kl = _ops()._C_knowledge_attention_fwd(q.detach(), table_k.detach()[indices],
                                               table_v.detach()[indices], bias.detach(),
                                               beta.detach(), p, seed)
    go, gl = _ops()._C_gather_knowledge_attention_fwd(q.detach(), table_k.detach(),
                                                      table_v.detach(), indices, bias.detach(),
                                                      beta.detach(), p, seed)
    assert torch.equal(ko, go) and torch.equal(kl, gl)


def test_public_api_autograd_matches_reference():
    B, T, H, N, Dh = 2, 65, 12, 5, 64
    q, k, v, bias, beta = _inputs(B, T, H, N, Dh, torch.bfloat16)
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, bias, beta)]
    out = F.knowledge_attention(*ts, dropout_p=0.1, seed=3, backend="cuda")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ts, g)
    ref = _ref_fwd_bwd(q, k, v, bias, beta, g, 0.1, 3)
    _check("out", out, ref[0], 1e-2)
    for name, got, want in zip(("dq", "dk", "dv", "dbias", "dbeta"), grads, ref[2:]):
        _check(name, got, want, 1e-2)


def test_misaligned_views_are_handled():
    # contiguous views whose data pointer is not 16-byte aligned
    B, T, H, N, Dh = 2, 9, 2, 7, 32
    q_, k_, v_, bias, beta = _inputs(B, T, H, N, Dh, torch.float16)
    qbuf = torch.empty(q_.numel() + 1, dtype=q_.dtype, device="cuda")
    qbuf[1:] = q_.reshape(-1)
    q = qbuf[1:].view_as(q_)
    assert q.data_ptr() % 16 != 0 and q.is_contiguous()
    out, lse = _ops()._C_knowledge_attention_fwd(q, k_, v_, bias, beta, 0.0, 0)
    ref, _ = reference.knowledge_attention(q_.double(), k_.double(), v_.double(), bias.double(),
                                           beta.double())
    _check("out", out, ref, 1e-2)


def _good(N=5, Dh=32, dtype=torch.float32):
    return _inputs(2, 3, 2, N, Dh, dtype)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(0, a[0].double()), "float32, float16 or bfloat16"),
    (lambda a: a.__setitem__(1, a[1].half()), "k must have q's dtype"),
    (lambda a: a.__setitem__(3, a[3].half()), "bias must be float32"),
    (lambda a: a.__setitem__(4, a[4][:1]), r"beta must be \[H\]"),
    (lambda a: a.__setitem__(3, a[3][:, :2].contiguous()), r"bias must be \[B, N\]"),
    (lambda a: a.__setitem__(2, a[2][:, :3]), "v must have k's shape"),
    (lambda a: a.__setitem__(1, a[1].transpose(1, 2).contiguous().transpose(1, 2)), "k must be contiguous"),
    (lambda a: a.__setitem__(1, a[1].cpu()), "k must be a CUDA tensor"),
    (lambda a: a.__setitem__(0, a[0][..., :16]), "must be contiguous|Dh must be 32, 64 or 128"),
    (lambda a: a.append(1.0), "dropout_p must be in"),
])
def test_forward_errors(mutate, match):
    args = list(_good())
    mutate(args)
    p = args.pop() if len(args) == 6 else 0.0
    with pytest.raises(RuntimeError, match=match):
        _ops()._C_knowledge_attention_fwd(*args, p, 0)


def test_shape_limits():
    q, k, v, bias, beta = _good(N=257)
    with pytest.raises(RuntimeError, match="N .* must be in"):
        _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 0)
    q, k, v, bias, beta = _inputs(1, 2, 1, 3, 48, torch.float32)
    with pytest.raises(RuntimeError, match="Dh must be 32, 64 or 128"):
        _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 0)


def test_gather_and_backward_errors():
    q, k, v, bias, beta = _good()
    table = torch.randn(9, 2, 32, device="cuda")
    idx = torch.randint(0, 9, (2, 5), device="cuda")
    with pytest.raises(RuntimeError, match="indices must be int64"):
        _ops()._C_gather_knowledge_attention_fwd(q, table, table, idx.int(), bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"table_k must be \[M, H, Dh\]"):
        _ops()._C_gather_knowledge_attention_fwd(q, table[:, :1].contiguous(), table, idx, bias,
                                                 beta, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"indices must be \[B=2, N\]"):
        _ops()._C_gather_knowledge_attention_fwd(q, table, table, idx[:1], bias, beta, 0.0, 0)
    out, lse = _ops()._C_knowledge_attention_fwd(q, k, v, bias, beta, 0.0, 0)
    with pytest.raises(RuntimeError, match="grad_out must have q's shape"):
        _ops()._C_knowledge_attention_bwd(out[:1].contiguous(), q, k, v, bias, beta, out, lse, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"lse must be \[B, T, H\]"):
        _ops()._C_knowledge_attention_bwd(out, q, k, v, bias, beta, out, lse[:, :1].contiguous(), 0.0, 0)
    with pytest.raises(RuntimeError, match="out must have q's dtype"):
        _ops()._C_knowledge_attention_bwd(out, q, k, v, bias, beta, out.half(), lse, 0.0, 0)
