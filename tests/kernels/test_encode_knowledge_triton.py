"""Triton attentive_pool / encode_knowledge under TRITON_INTERPRET=1 (CPU tensors, tiny
shapes), and on CUDA tensors where a GPU exists.

Outputs and every gradient against the float64 reference; empty rows, repeated ids, token
types given or absent, a position offset, fp16 stability.
"""
from __future__ import annotations

# TRITON_INTERPRET is set by tests/conftest.py where no GPU exists

import pytest  # noqa: E402
import torch  # noqa: E402

import pluglm_kernels as pk  # noqa: E402

from conftest import RTOL, lowp_tol, rel_err, triton_device  # noqa: E402

pytestmark = pytest.mark.triton

DEV = triton_device()

from pluglm_kernels.triton import encode_knowledge as TE  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
CANCELLING = {"b1", "w2"}  # see test_encode_knowledge.py: sums whose terms cancel
CANCELLING_BF16 = 0.15


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
    tol = lowp_tol(RTOL[dtype], lp_out, ref_out)
    assert rel_err(out.cpu(), ref_out.cpu()) < tol, ("out", rel_err(out.cpu(), ref_out.cpu()), tol)
    for name, g, rg, lg in zip(names, grads, ref_grads, lp_grads):
        assert torch.isfinite(g).all(), name
        if rg.double().norm() < 1e-9:
            assert g.double().abs().max() < 1e-6, name
            continue
        floor = CANCELLING_BF16 if dtype == torch.bfloat16 and name in CANCELLING else GRAD_TOL[dtype]
        tol = lowp_tol(floor, lg, rg)
        assert rel_err(g.cpu(), rg.cpu()) < tol, (name, rel_err(g.cpu(), rg.cpu()), tol)


def _mask(B, T):
    mask = torch.ones(B, T, dtype=torch.int64, device=DEV)
    mask[0, T // 2 + 1:] = 0
    if B > 1:
        mask[1] = 0  # empty row
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_attentive_pool_triton_matches_reference(fresh_seed, dtype):
    B, T, D, Hp = 3, 7, 24, 5
    x = torch.randn(B, T, D, device=DEV).to(dtype)
    params = [(torch.randn(Hp, D) * D ** -0.5), torch.randn(Hp) * 0.1, torch.randn(Hp),
              torch.randn(1)]
    params = [p.to(DEV, dtype) for p in params]
    mask = _mask(B, T)
    go = torch.randn(B, D, device=DEV)
    out, grads = _grads(lambda x, *p: pk.attentive_pool(x, mask, *p, backend="triton"),
                        (x, *params), go)
    ref = lambda x, *p: pk.attentive_pool(x, mask, *p, backend="reference")  # noqa: E731
    ref_out, ref_grads = _grads(ref, [t.double() for t in (x, *params)], go.double())
    _check(out, grads, ref_out, ref_grads, dtype, ("x", "w1", "b1", "w2", "b2"),
           _lowp(ref, (x, *params), go, dtype))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_attentive_pool_triton_fp16_large_scores(fresh_seed):
    B, T, D, Hp = 2, 5, 8, 3
    x = torch.randn(B, T, D, device=DEV).half()
    w1, b1 = torch.randn(Hp, D, device=DEV).half(), torch.zeros(Hp, device=DEV).half()
    w2 = (torch.randn(Hp, device=DEV) * 3000).half()
    b2 = torch.full((1,), 3e4, device=DEV).half()
    mask = torch.ones(B, T, device=DEV)
    out = pk.attentive_pool(x, mask, w1, b1, w2, b2, backend="triton")
    ref = pk.attentive_pool(x.double(), mask, w1.double(), b1.double(), w2.double(), b2.double(),
                            backend="reference")
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref.cpu()) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("with_tt,offset", [(False, 0), (True, 2)], ids=["plain", "tt-off2"])
def test_encode_knowledge_triton_matches_reference(fresh_seed, dtype, with_tt, offset):
    E, T, D, Hp, V, Tt = 3, 6, 20, 4, 7, 2
    P = T + offset + 1
    ids = torch.randint(0, V, (E, T), device=DEV)
    ids[0, :3] = 2  # repeated ids
    ids[2, 0] = 2
    tt = torch.randint(0, Tt, (E, T), device=DEV).to(torch.int16) if with_tt else None
    mask = _mask(E, T)
    params = [torch.randn(V, D), torch.randn(P, D), torch.randn(Tt, D), 1 + 0.1 * torch.randn(D),
              0.1 * torch.randn(D), torch.randn(Hp, D) * D ** -0.5, torch.randn(Hp) * 0.1,
              torch.randn(Hp), torch.randn(1)]
    params = [p.to(DEV, dtype) for p in params]
    go = torch.randn(E, D, device=DEV)

    def run(backend):
        return lambda *p: pk.encode_knowledge(ids, mask, *p, token_type_ids=tt,
                                              position_offset=offset, backend=backend)

    out, grads = _grads(run("triton"), params, go)
    ref_out, ref_grads = _grads(run("reference"), [p.double() for p in params], go.double())
    assert out.dtype == dtype
    _check(out, grads, ref_out, ref_grads, dtype,
           ("word", "pos", "type", "ln_w", "ln_b", "w1", "b1", "w2", "b2"),
           _lowp(run("reference"), params, go, dtype))
    for g, p in zip(grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape


def test_triton_embed_layernorm_forward_statistics(fresh_seed):
    E, T, D, V = 2, 5, 12, 6
    ids = torch.randint(0, V, (E, T), device=DEV)
    word, pos, typ = (torch.randn(V, D, device=DEV), torch.randn(T + 1, D, device=DEV),
                      torch.randn(1, D, device=DEV))
    lw, lb = torch.randn(D, device=DEV), torch.randn(D, device=DEV)
    h, mean, rstd = TE.embed_layernorm_fwd(ids, None, word, pos, typ, lw, lb, 1e-5, 1)
    x = (word[ids] + pos[1:T + 1] + typ[0]).double()
    assert rel_err(mean.cpu(), x.mean(-1).cpu()) < 1e-6
    assert rel_err(rstd.cpu(), (x.var(-1, unbiased=False) + 1e-5).rsqrt().cpu()) < 1e-5
    want = torch.nn.functional.layer_norm(x, (D,), lw.double(), lb.double(), 1e-5)
    assert rel_err(h.cpu(), want.cpu()) < 1e-6


_TTIR_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # before triton: compile, do not interpret
sys.path.insert(0, sys.argv[1])
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if "nvidia" not in triton.backends.backends:
        raise ImportError("triton has no CUDA backend")
except Exception as e:
    print("SKIP", e)
    sys.exit(77)
from pluglm_kernels.triton import encode_knowledge as TE
sig = {"G": "*fp32", "X": "*fp32", "ALPHA": "*fp32", "DS": "*fp32", "T": "i32", "D": "i32",
       "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
src = ASTSource(TE._pool_ds_kernel, sig, {(6,): 16, (7,): 128}, {})
ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(ck.asm["ttir"])
"""


def test_pool_ds_kernel_orders_its_store_before_the_read_back(tmp_path):
    """_pool_ds_kernel stores g.x_t to DS, then reads DS back in another layout: a GPU
    compile must put a CTA barrier between (the interpreter runs sequentially and cannot
    show the race). Compiled to TTIR for sm_90 in a subprocess (no GPU needed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT, str(root)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    stores = [i for i, ln in enumerate(lines) if "tt.store" in ln]
    loads = [i for i, ln in enumerate(lines) if "tt.load" in ln]
    barriers = [i for i, ln in enumerate(lines) if "barrier" in ln and "=" not in ln.split("barrier")[0]]
    assert stores and loads
    assert any(stores[0] < b < loads[-1] for b in barriers), \
        "no barrier between the store of DS and its read-back:\n" + proc.stdout[-4000:]
