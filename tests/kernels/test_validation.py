"""Bad input to every public op raises TypeError/ValueError naming the argument, before any
kernel runs."""
from __future__ import annotations

import pytest
import torch

import pluglm_kernels as pk


def _mips(**over):
    a = dict(queries=torch.randn(3, 8), keys=torch.randn(20, 8), k=4)
    a.update(over)
    return lambda: pk.mips_topk(a.pop("queries"), a.pop("keys"), a.pop("k"), **a)


@pytest.mark.parametrize("case,exc,match", [
    (dict(queries=torch.randn(8)), ValueError, "queries must have 2 dimensions"),
    (dict(queries=torch.randn(3, 8).long()), TypeError, "queries must have dtype"),
    (dict(queries=[[1.0]]), TypeError, "queries must be a torch.Tensor"),
    (dict(keys=torch.randn(20, 9)), ValueError, "keys must have 8 columns"),
    (dict(keys=torch.randn(8, 20).T), ValueError, "keys must be contiguous"),
    (dict(keys=torch.randn(0, 8)), ValueError, "keys must have at least one row"),
    (dict(queries=torch.randn(3, 8).bfloat16(), keys=torch.randn(20, 8).half()), TypeError,
     "queries must be float32 or the keys' dtype"),
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=21), ValueError, "k must be in"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(valid=torch.ones(19, dtype=torch.bool)), ValueError, "valid must have shape"),
    (dict(valid=torch.ones(20)), TypeError, "valid must have dtype"),
    (dict(valid=torch.arange(20) < 3), ValueError, "larger than the number of valid rows"),
    (dict(queries=torch.full((3, 8), float("nan"))), ValueError, "queries must be finite"),
    (dict(keys=torch.randint(-5, 5, (20, 8), dtype=torch.int8)), ValueError, "key_scales"),
    (dict(key_scales=torch.ones(20)), ValueError, "key_scales is only for int8"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_mips_topk_bad_input(case, exc, match):
    with pytest.raises(exc, match=match):
        _mips(**case)()


def test_mips_topk_int8_scales_checked():
    kq, ks = pk.quantize_keys(torch.randn(20, 8))
    with pytest.raises(ValueError, match="key_scales must have shape"):
        pk.mips_topk(torch.randn(2, 8), kq, 3, key_scales=ks[:5])
    with pytest.raises(TypeError, match="key_scales must have dtype"):
        pk.mips_topk(torch.randn(2, 8), kq, 3, key_scales=ks.double())


def test_mips_topk_num_valid_skips_the_count():
    q, keys = torch.randn(3, 8), torch.randn(20, 8)
    valid = torch.arange(20) % 3 != 0  # 13 valid rows
    want = pk.mips_topk(q, keys, 5, valid=valid)
    got = pk.mips_topk(q, keys, 5, valid=valid, num_valid=13)
    assert all(map(torch.equal, want, got))
    with pytest.raises(ValueError, match="larger than the number of valid rows"):
        pk.mips_topk(q, keys, 14, valid=valid, num_valid=13)
    with pytest.raises(ValueError, match="pass valid with it"):
        pk.mips_topk(q, keys, 5, num_valid=20)
    with pytest.raises(ValueError, match="num_valid must be in"):
        pk.mips_topk(q, keys, 5, valid=valid, num_valid=21)
    with pytest.raises(TypeError, match="num_valid must be an int"):
        pk.mips_topk(q, keys, 5, valid=valid, num_valid=13.0)
    # the finiteness check still runs when the count is given
    with pytest.raises(ValueError, match="queries must be finite"):
        pk.mips_topk(torch.full((3, 8), float("inf")), keys, 5, valid=valid, num_valid=13)


def _attn(B=2, T=3, H=2, Dh=4, N=3, dtype=torch.float32):
    return dict(q=torch.randn(B, T, H, Dh, dtype=dtype), k=torch.randn(B, N, H, Dh, dtype=dtype),
                v=torch.randn(B, N, H, Dh, dtype=dtype), bias=torch.randn(B, N), beta=torch.ones(H))


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.randn(2, 3, 8)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 3, 3, 4)), ValueError, "k must have shape"),
    (dict(v=torch.randn(2, 4, 2, 4)), ValueError, "v must have shape"),
    (dict(v=torch.randn(2, 3, 2, 4).half()), TypeError, "k and v must have q's dtype"),
    (dict(bias=torch.randn(2, 4)), ValueError, "bias must have shape"),
    (dict(beta=torch.ones(3)), ValueError, "beta must have shape"),
    (dict(q=torch.randn(2, 3, 2, 4).long()), TypeError, "q must have dtype"),
])
def test_knowledge_attention_bad_input(over, exc, match):
    a = _attn()
    a.update(over)
    with pytest.raises(exc, match=match):
        pk.knowledge_attention(**a)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_range(p):
    with pytest.raises(ValueError, match="dropout_p must be in"):
        pk.knowledge_attention(**_attn(), dropout_p=p)


def test_seed_checked():
    with pytest.raises(ValueError, match="seed must be in"):
        pk.knowledge_attention(**_attn(), dropout_p=0.1, seed=-1)


def test_gather_bad_input():
    a = _attn()
    tk = torch.randn(6, 2, 4)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    call = lambda **o: pk.gather_knowledge_attention(  # noqa: E731
        **{**dict(q=a["q"], table_k=tk, table_v=tk, indices=idx, bias=a["bias"], beta=a["beta"]), **o})
    with pytest.raises(ValueError, match=r"indices must be in \[0, 6\)"):
        call(indices=torch.tensor([[0, 1, 6], [3, 4, 5]]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 6\)"):
        call(indices=torch.tensor([[0, 1, -1], [3, 4, 5]]))
    with pytest.raises(TypeError, match="indices must have dtype"):
        call(indices=idx.float())
    with pytest.raises(ValueError, match="table_v must have shape"):
        call(table_v=torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="table_k must be contiguous"):
        call(table_k=torch.randn(2, 6, 4).transpose(0, 1))
    with pytest.raises(ValueError, match="indices must have shape"):
        call(indices=idx[:1])


def test_attentive_pool_bad_input():
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    w1, b1, w2, b2 = torch.randn(4, 8), torch.randn(4), torch.randn(4), torch.randn(1)
    with pytest.raises(ValueError, match="mask must have shape"):
        pk.attentive_pool(x, torch.ones(2, 4), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1 must have shape \[Hp, 8\]"):
        pk.attentive_pool(x, mask, torch.randn(4, 7), b1, w2, b2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        pk.attentive_pool(x, mask, w1, torch.randn(3), w2, b2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        pk.attentive_pool(x, mask, w1, b1, torch.randn(5), b2)
    with pytest.raises(ValueError, match="b2 must hold one value"):
        pk.attentive_pool(x, mask, w1, b1, w2, torch.randn(2))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        pk.attentive_pool(x[0], mask, w1, b1, w2, b2)


def test_encode_knowledge_bad_input():
    E, T, V, P, D, Hp = 2, 5, 10, 6, 8, 4
    ids, mask = torch.randint(0, V, (E, T)), torch.ones(E, T)
    params = [torch.randn(V, D), torch.randn(P, D), torch.randn(2, D), torch.ones(D), torch.zeros(D),
              torch.randn(Hp, D), torch.randn(Hp), torch.randn(Hp), torch.randn(1)]
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 10\)"):
        pk.encode_knowledge(ids.clone().fill_(10), mask, *params)
    with pytest.raises(TypeError, match="token_ids must have dtype"):
        pk.encode_knowledge(ids.float(), mask, *params)
    with pytest.raises(ValueError, match="position_embeddings has 6 rows"):
        pk.encode_knowledge(ids, mask, *params, position_offset=2)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        pk.encode_knowledge(ids, mask[:, :3], *params)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        pk.encode_knowledge(ids, mask, *params, eps=0.0)
    bad = list(params)
    bad[3] = torch.ones(D + 1)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        pk.encode_knowledge(ids, mask, *bad)
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        pk.encode_knowledge(ids, mask, *params, token_type_ids=torch.full((E, T), 2))


def test_quantize_keys_roundtrip():
    keys = torch.randn(50, 16)
    keys[3] = 0
    q, s = pk.quantize_keys(keys)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (50,)
    assert (q.float() * s[:, None] - keys).abs().max() <= s.max() / 2 + 1e-6
    assert torch.equal(q[3], torch.zeros(16, dtype=torch.int8))
