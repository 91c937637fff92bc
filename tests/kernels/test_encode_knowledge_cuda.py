"""CUDA kernels of attentive_pool / encode_knowledge against the float64 reference (GPU only).

Outputs and every gradient, each dtype, empty rows, repeated ids, token types, a position
offset, fp16 stability, and that backend="auto" picks the CUDA kernels.
"""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels as pk
from pluglm_kernels import _backends

from conftest import RTOL, lowp_tol, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# float32 matmuls may run in TF32 when a user enables it; the kernels themselves are fp32.
GRAD_TOL = {torch.float32: 5e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
CANCELLING = {"b1", "w2"}  # sums whose terms cancel (see test_encode_knowledge.py)
CANCELLING_BF16 = 0.15
ENC_NAMES = ("word", "pos", "type", "ln_w", "ln_b", "w1", "b1", "w2", "b2")


@pytest.fixture(autouse=True)
def _need_cuda_kernels():
    ok, why = _backends.availability("encode_knowledge", "cuda", "cuda")
    if not ok:
        pytest.skip(why)


def _grads(fn, inputs, go):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, go.to(out.dtype))


def _lowp(ref_fn, inputs, go, dtype):
    """The reference run on the kernel's own float16/bfloat16 inputs: the yardstick of the
    rounding error allowed (conftest.lowp_tol); None for float32."""
    return None if dtype == torch.float32 else _grads(ref_fn, inputs, go)


def _check(out, grads, ref_out, ref_grads, dtype, names, lowp=None):
    lp_out, lp_grads = lowp if lowp is not None else (None, [None] * len(grads))
    assert torch.isfinite(out).all()
    tol = lowp_tol(max(RTOL[dtype], 1e-5 if dtype != torch.float32 else 5e-4), lp_out, ref_out)
    assert rel_err(out, ref_out) < tol, ("out", rel_err(out, ref_out), tol)
    for name, g, rg, lg in zip(names, grads, ref_grads, lp_grads):
        assert torch.isfinite(g).all(), name
        if rg.double().norm() < 1e-9:
            assert g.double().abs().max() < 1e-5, name
            continue
        floor = CANCELLING_BF16 if dtype == torch.bfloat16 and name in CANCELLING else GRAD_TOL[dtype]
        tol = lowp_tol(floor, lg, rg)
        assert rel_err(g, rg) < tol, (name, rel_err(g, rg), tol)


def _mask(B, T):
    mask = torch.ones(B, T, dtype=torch.int64, device="cuda")
    mask[0, T // 2 + 1:] = 0
    mask[1] = 0
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("B,T,D,Hp", [(3, 7, 24, 5), (4, 300, 768, 768), (2, 33, 130, 70)])
def test_attentive_pool_cuda_matches_reference(fresh_seed, dtype, B, T, D, Hp):
    x = torch.randn(B, T, D, device="cuda").to(dtype)
    params = [torch.randn(Hp, D) * D ** -0.5, torch.randn(Hp) * 0.1, torch.randn(Hp), torch.randn(1)]
    params = [p.to("cuda", dtype) for p in params]
    mask = _mask(B, T)
    go = torch.randn(B, D, device="cuda")
    out, grads = _grads(lambda x, *p: pk.attentive_pool(x, mask, *p, backend="cuda"),
                        (x, *params), go)
    ref = lambda x, *p: pk.attentive_pool(x, mask, *p, backend="reference")  # noqa: E731
    ref_out, ref_grads = _grads(ref, [t.double() for t in (x, *params)], go.double())
    _check(out, grads, ref_out, ref_grads, dtype, ("x", "w1", "b1", "w2", "b2"),
           _lowp(ref, (x, *params), go, dtype))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_attentive_pool_cuda_fp16_large_scores(fresh_seed):
    x = torch.randn(2, 9, 8, device="cuda").half()
    w1, b1 = torch.randn(3, 8, device="cuda").half(), torch.zeros(3, device="cuda").half()
    w2 = (torch.randn(3, device="cuda") * 3000).half()
    b2 = torch.full((1,), 3e4, device="cuda").half()
    out = pk.attentive_pool(x, torch.ones(2, 9, device="cuda"), w1, b1, w2, b2, backend="cuda")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("E,T,D,Hp,V,with_tt,offset", [
    (3, 7, 24, 5, 11, False, 0), (4, 9, 33, 7, 6, True, 2), (8, 288, 768, 768, 1000, True, 1),
])
def test_encode_knowledge_cuda_matches_reference(fresh_seed, dtype, E, T, D, Hp, V, with_tt, offset):
    P, Tt = T + offset + 2, 2
    ids = torch.randint(0, V, (E, T), device="cuda")
    ids[0, : T // 2] = 1
    tt = torch.randint(0, Tt, (E, T), device="cuda").to(torch.int32) if with_tt else None
    mask = _mask(E, T)
    params = [torch.randn(V, D), torch.randn(P, D), torch.randn(Tt, D), 1 + 0.1 * torch.randn(D),
              0.1 * torch.randn(D), torch.randn(Hp, D) * D ** -0.5, torch.randn(Hp) * 0.1,
              torch.randn(Hp), torch.randn(1)]
    params = [p.to("cuda", dtype) for p in params]
    go = torch.randn(E, D, device="cuda")

    def run(backend):
        return lambda *p: pk.encode_knowledge(ids, mask, *p, token_type_ids=tt,
                                              position_offset=offset, backend=backend)

    out, grads = _grads(run("cuda"), params, go)
    ref_out, ref_grads = _grads(run("reference"), [p.double() for p in params], go.double())
    _check(out, grads, ref_out, ref_grads, dtype, ENC_NAMES, _lowp(run("reference"), params, go, dtype))
    for g, p in zip(grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape


def test_auto_picks_cuda_and_opcheck():
    assert _backends.resolve("encode_knowledge", "auto", torch.device("cuda")) == "cuda"
    x = torch.randn(3, 6, 8, device="cuda", requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.int64, device="cuda")
    w = [torch.randn(5, 8, device="cuda", requires_grad=True)] + [
        torch.randn(n, device="cuda", requires_grad=True) for n in (5, 5, 1)]
    torch.library.opcheck(torch.ops.pluglm.attentive_pool.default, (x, mask, *w, "cuda"))
