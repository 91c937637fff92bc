"""The op registry: every op exists in torch.ops.pluglm, passes opcheck, compiles without
graph breaks, dispatches by backend, and has a correct, differentiable reference."""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels as pk
from pluglm_kernels import _backends

OPS = ("mips_topk", "knowledge_attention", "gather_knowledge_attention", "attentive_pool",
       "encode_knowledge")
# what backend_report lists: the ops, and encode_knowledge_factored (a plain function over a
# native kernel, no torch.ops.pluglm op of its own: it has no autograd rule to register)
REPORTED = OPS + ("encode_knowledge_factored",)


def _attn_args(dtype, B=2, T=5, H=3, Dh=8, N=4, requires_grad=False):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    q = torch.randn(B, T, H, Dh, **g)
    k = torch.randn(B, N, H, Dh, **g)
    v = torch.randn(B, N, H, Dh, **g)
    bias = torch.randn(B, N, dtype=torch.float32 if dtype != torch.float64 else dtype,
                       requires_grad=requires_grad)
    beta = torch.randn(H, dtype=bias.dtype, requires_grad=requires_grad)
    return q, k, v, bias, beta


def _pool_args(dtype, B=3, T=6, D=8, Hp=5, requires_grad=False):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    x = torch.randn(B, T, D, **g)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, 4:] = 0
    mask[1, 1:] = 0
    return x, mask, torch.randn(Hp, D, **g), torch.randn(Hp, **g), torch.randn(Hp, **g), torch.randn(1, **g)


def _enc_args(dtype, E=3, T=6, V=11, P=9, D=8, Hp=5, requires_grad=False):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    ids = torch.randint(0, V, (E, T))
    mask = torch.ones(E, T, dtype=torch.int64)
    mask[2, 3:] = 0
    params = (torch.randn(V, D, **g), torch.randn(P, D, **g), torch.randn(2, D, **g),
              torch.randn(D, **g), torch.randn(D, **g), torch.randn(Hp, D, **g),
              torch.randn(Hp, **g), torch.randn(Hp, **g), torch.randn(1, **g))
    return ids, mask, params


def test_every_op_is_registered():
    for name in OPS:
        assert hasattr(torch.ops.pluglm, name), name
        assert callable(getattr(pk, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_opcheck(dtype, backend):
    q = torch.randn(3, 16, dtype=dtype)
    keys = torch.randn(50, 16, dtype=dtype)
    valid = torch.rand(50) > 0.2
    torch.library.opcheck(torch.ops.pluglm.mips_topk.default, (q, keys, 4, None, valid, backend))
    kq, ks = pk.quantize_keys(keys.float())
    torch.library.opcheck(torch.ops.pluglm.mips_topk.default, (q.float(), kq, 4, ks, None, backend))

    q, k, v, bias, beta = _attn_args(dtype, requires_grad=True)
    for p, seed in ((0.0, 0), (0.3, 123)):
        torch.library.opcheck(torch.ops.pluglm.knowledge_attention.default,
                              (q, k, v, bias, beta, p, seed, backend))
    table_k = torch.randn(7, 3, 8, dtype=dtype, requires_grad=True)
    table_v = torch.randn(7, 3, 8, dtype=dtype, requires_grad=True)
    idx = torch.tensor([[0, 6, 6, 2], [1, 1, 3, 5]])
    torch.library.opcheck(torch.ops.pluglm.gather_knowledge_attention.default,
                          (q, table_k, table_v, idx, bias, beta, 0.2, 7, backend))

    x, mask, w1, b1, w2, b2 = _pool_args(dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.pluglm.attentive_pool.default,
                          (x, mask, w1, b1, w2, b2, backend))

    ids, emask, params = _enc_args(dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.pluglm.encode_knowledge.default,
                          (ids, emask, *params, None, 1e-12, 0, backend))


def test_compile_fullgraph_every_op():
    torch._dynamo.reset()
    q = torch.randn(3, 16)
    keys = torch.randn(50, 16)
    qa, k, v, bias, beta = _attn_args(torch.float32, requires_grad=True)
    table = torch.randn(7, 3, 8)
    idx = torch.tensor([[0, 6, 6, 2], [1, 1, 3, 5]])
    x, mask, w1, b1, w2, b2 = _pool_args(torch.float32, requires_grad=True)
    ids, emask, params = _enc_args(torch.float32)

    def f(q, keys, qa, k, v, bias, beta, x, w1):
        s, i = pk.mips_topk(q, keys, 5)
        o1 = pk.knowledge_attention(qa, k, v, bias, beta, dropout_p=0.1, seed=3)
        o2 = pk.gather_knowledge_attention(qa, table, table, idx, bias, beta)
        o3 = pk.attentive_pool(x, mask, w1, b1, w2, b2)
        o4 = pk.encode_knowledge(ids, emask, *params)
        return s.sum() + i.sum() + o1.sum() + o2.sum() + o3.sum() + o4.sum()

    args = (q, keys, qa, k, v, bias, beta, x, w1)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    ref = f(*args)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert qa.grad is not None and w1.grad is not None


def test_named_backend_unavailable_raises_with_reason(monkeypatch):
    q, keys = torch.randn(2, 8), torch.randn(20, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for mips_topk on cpu"):
        pk.mips_topk(q, keys, 3, backend="cuda")
    # as on a machine without the interpreter switch (the env var itself must stay: Triton
    # reads it when kernels are first imported)
    monkeypatch.setattr(_backends, "triton_interpret", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        pk.mips_topk(q, keys, 3, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.mips_topk(q, keys, 3, backend="fast")


def test_auto_picks_the_cpp_kernel_when_built():
    dev = torch.device("cpu")
    for op in OPS:
        chosen = _backends.resolve(op, "auto", dev)
        ok_cpu, _ = _backends.availability(op, "cpu", "cpu")
        assert chosen == ("cpu" if ok_cpu else "reference"), (op, chosen)


def test_resolve_is_cached_and_reads_triton_interpret_at_each_call(monkeypatch):
    dev = torch.device("cpu")
    first = _backends.resolve("knowledge_attention", "auto", dev)
    hits = _backends._resolve.cache_info().hits
    assert _backends.resolve("knowledge_attention", "auto", dev) == first
    assert _backends._resolve.cache_info().hits == hits + 1
    # the interpreter switch is part of the cache key, not frozen at the first call (only
    # switched off here: switching it on would make Triton interpret kernels on GPUs too)
    before = _backends.availability("mips_topk", "triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backends.availability("mips_topk", "triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backends.resolve("mips_topk", "triton", dev)
    monkeypatch.undo()
    assert _backends.availability("mips_topk", "triton", "cpu") == before


def test_limits_have_one_definition():
    from pluglm_kernels import _validate, functional

    assert pk.MAX_K == functional.MAX_K == _validate.MAX_K == 2048
    assert pk.FLOAT_TABLE_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    mod, why = _backends.load_extension()
    if mod is None:
        pytest.skip(why)
    assert mod.max_k() == pk.MAX_K  # csrc/kernel_limits.h
    assert mod.cpu_isa() in ("scalar", "avx2", "avx512")


def test_backend_report_explains_every_missing_backend():
    rows = pk.backend_report()
    assert {(r["op"], r["backend"]) for r in rows} == {
        (op, b) for op in REPORTED for b in ("cpu", "cuda", "triton", "reference")}
    for r in rows:
        assert r["available"] or r["why"], r


# ----------------------------------------------------------------- the references themselves


def test_reference_mips_topk_matches_bruteforce_and_breaks_ties_low():
    q = torch.randn(4, 6, dtype=torch.float64)
    keys = torch.randn(300, 6, dtype=torch.float64)
    keys[7] = keys[7] * 100  # far the largest inner product with q[0] ...
    keys[100] = keys[7]  # ... and an exact tie: index 7 must come first
    q[0] = keys[7]
    s, i = pk.reference.mips_topk(q, keys, 10)
    full = (q[:, None, :] * keys[None, :, :]).sum(-1)
    want = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(i, want.indices[:, :10])
    torch.testing.assert_close(s, want.values[:, :10].float())
    assert i[0, 0] == 7 and i[0, 1] == 100


def test_reference_mips_topk_blocks_keep_ties_in_index_order(monkeypatch):
    from pluglm_kernels import reference

    monkeypatch.setattr(reference, "_MIPS_BLOCK", 7)
    keys = torch.ones(40, 3, dtype=torch.float64)
    q = torch.ones(2, 3, dtype=torch.float64)
    valid = torch.ones(40, dtype=torch.bool)
    valid[:5] = False
    _, i = reference.mips_topk(q, keys, 9, valid=valid)
    assert i.tolist() == [list(range(5, 14))] * 2


def _attention_by_loops(q, k, v, bias, beta):
    B, T, H, Dh = q.shape
    N = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                logits = torch.stack([q[b, t, h] @ k[b, j, h] + beta[h] * bias[b, j] for j in range(N)])
                p = torch.softmax(logits, 0)
                out[b, t, h] = sum(p[j] * v[b, j, h] for j in range(N))
    return out


def test_reference_knowledge_attention_matches_the_formula():
    q, k, v, bias, beta = _attn_args(torch.float64, B=2, T=3, H=2, Dh=4, N=3)
    out, lse = pk.reference.knowledge_attention(q, k, v, bias, beta)
    torch.testing.assert_close(out, _attention_by_loops(q, k, v, bias, beta))
    logits = torch.einsum("bthd,bjhd->bthj", q, k) + beta[None, None, :, None] * bias[:, None, None, :]
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1).float())


def test_reference_dropout_is_reproducible_and_unbiased():
    q, k, v, bias, beta = _attn_args(torch.float64, B=4, T=64, H=4, Dh=8, N=16)
    a, _ = pk.reference.knowledge_attention(q, k, v, bias, beta, 0.25, 99)
    b, _ = pk.reference.knowledge_attention(q, k, v, bias, beta, 0.25, 99)
    c, _ = pk.reference.knowledge_attention(q, k, v, bias, beta, 0.25, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = pk.reference.dropout_keep_mask(5, 0.25, (4, 64, 4, 16), "cpu")
    assert abs(keep.double().mean().item() - 0.75) < 0.02


def test_philox_known_answer():
    # Random123's published known-answer vectors for philox4x32-10.
    assert pk.reference.philox_uint32(0, torch.tensor([0])).item() == 0x6627E8D5


@pytest.mark.parametrize("op", ["knowledge_attention", "gather", "attentive_pool", "encode"])
def test_reference_gradients_gradcheck(op):
    if op == "knowledge_attention":
        args = _attn_args(torch.float64, B=2, T=3, H=2, Dh=4, N=3, requires_grad=True)
        fn = lambda *a: pk.knowledge_attention(*a, dropout_p=0.3, seed=11, backend="reference")  # noqa: E731
    elif op == "gather":
        q, _, _, bias, beta = _attn_args(torch.float64, B=2, T=3, H=2, Dh=4, N=3, requires_grad=True)
        tk = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
        tv = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
        idx = torch.tensor([[4, 4, 0], [2, 3, 4]])
        args = (q, tk, tv, bias, beta)
        fn = lambda q, tk, tv, bias, beta: pk.gather_knowledge_attention(  # noqa: E731
            q, tk, tv, idx, bias, beta, backend="reference")
    elif op == "attentive_pool":
        x, mask, *w = _pool_args(torch.float64, requires_grad=True)
        args = (x, *w)
        fn = lambda x, *w: pk.attentive_pool(x, mask, *w, backend="reference")  # noqa: E731
    else:
        ids, emask, params = _enc_args(torch.float64, requires_grad=True)
        args = params
        fn = lambda *p: pk.encode_knowledge(ids, emask, *p, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_attentive_pool_is_stable_in_fp16_and_empty_rows_pool_to_zero():
    x, mask, w1, b1, w2, b2 = _pool_args(torch.float16)
    b2 = torch.full((1,), 3e4, dtype=torch.float16)  # raw exp would overflow
    out = pk.attentive_pool(x, mask, w1, b1, w2 * 100, b2, backend="reference")
    assert torch.isfinite(out).all()
    mask = torch.zeros_like(mask)
    out = pk.attentive_pool(x, mask, w1, b1, w2, b2, backend="reference")
    assert torch.equal(out, torch.zeros_like(out))


def test_encode_knowledge_reference_is_embed_then_pool():
    ids, mask, params = _enc_args(torch.float64)
    we, pe, te, lw, lb, w1, b1, w2, b2 = params
    out = pk.encode_knowledge(ids, mask, *params, position_offset=2, backend="reference")
    pos = torch.arange(2, 2 + ids.shape[1])
    h = torch.nn.functional.layer_norm(we[ids] + pe[pos] + te[0], (we.shape[1],), lw, lb, 1e-12)
    torch.testing.assert_close(out, pk.attentive_pool(h, mask, w1, b1, w2, b2, backend="reference"))
