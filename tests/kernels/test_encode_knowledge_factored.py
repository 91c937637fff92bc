"""encode_knowledge_factored (inference through precomputed pooler tables) against the
float64 reference of the unfactored encoder, and the model paths that use it.

Odd sizes, each table dtype, masks with empty rows, repeated ids, token types given or
absent, a position offset, every ISA clone of the C++ kernel, the tables' invalidation
when a weight changes, the no-gradient rule and the argument checks. The op has no
backward by design (it is what inference runs; training runs encode_knowledge), so there
is no gradient to check: the tests assert it refuses to run where one would be needed.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pluglm_kernels as pk
from pluglm_kernels import _backends
from pluglm_kernels import reference as R

from conftest import RTOL, cpu_has, lowp_tol, rel_err

HAS_CPU = _backends.availability("encode_knowledge_factored", "cpu", "cpu")[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="C++ kernel of encode_knowledge_factored not built")


def _inputs(E, T, D, Hp, V, P, Tt, dtype, with_tt, offset):
    ids = torch.randint(0, V, (E, T))
    ids[0, : T // 2] = 1  # repeated ids within and across entries
    lens = torch.randint(1, T + 1, (E,))
    mask = (torch.arange(T)[None] < lens[:, None]).to(torch.int64)
    if E > 1:
        mask[1] = 0  # an entry with no token pools to zeros
    tt = torch.randint(0, Tt, (E, T)).to(torch.int32) if with_tt else None
    emb = (torch.randn(V, D), 0.5 * torch.randn(P, D), 0.3 * torch.randn(Tt, D))
    ln = (1 + 0.2 * torch.randn(D), 0.1 * torch.randn(D))
    pool = (torch.randn(Hp, D) * D ** -0.5, 0.1 * torch.randn(Hp), torch.randn(Hp),
            torch.randn(1))
    return ids, mask, tt, [t.to(dtype) for t in emb], ln, pool


CASES = [(3, 7, 24, 5, 11, False, 0), (4, 9, 33, 7, 6, True, 2), (2, 1, 16, 3, 4, True, 0),
         (5, 40, 48, 17, 50, False, 3)]
CASE_IDS = ["E3T7D24", "E4T9D33-tt-off2", "E2T1D16-tt", "E5T40D48-off3"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("E,T,D,Hp,V,with_tt,offset", CASES, ids=CASE_IDS)
def test_factored_matches_float64_reference(fresh_seed, backend, dtype, E, T, D, Hp, V,
                                            with_tt, offset):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("C++ kernel not built")
    P, Tt = T + offset + 2, 3
    ids, mask, tt, emb, ln, pool = _inputs(E, T, D, Hp, V, P, Tt, dtype, with_tt, offset)
    w1, b1, w2, b2 = pool
    tables = pk.encoder_tables(*emb, *ln, w1, b1)
    assert all(t.dtype == torch.float32 for t in tables)
    out = pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, w2, b2, token_type_ids=tt,
                                       position_offset=offset, backend=backend)
    ref = R.encode_knowledge(ids, mask, *[t.double() for t in emb], *[t.double() for t in ln],
                             *[t.double() for t in pool], tt, 1e-12, offset)
    # the unfactored encoder in the same precision is the yardstick of the rounding allowed
    lowp = None if dtype == torch.float32 else R.encode_knowledge(ids, mask, *emb, *ln, *pool,
                                                                  tt, 1e-12, offset)
    assert out.dtype == dtype and out.shape == (E, D)
    assert torch.isfinite(out).all()
    tol = lowp_tol(RTOL[dtype] * 5, lowp, ref)
    assert rel_err(out, ref) < tol, (rel_err(out, ref), tol)
    if E > 1:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_factored_every_isa_clone(fresh_seed, monkeypatch, isa):
    if isa != "scalar" and not cpu_has({"avx2": "avx2", "avx512": "avx512bw"}[isa]):
        pytest.skip(f"this CPU has no {isa}")
    ids, mask, tt, emb, ln, pool = _inputs(6, 21, 40, 19, 30, 24, 2, torch.float32, True, 1)
    tables = pk.encoder_tables(*emb, *ln, *pool[:2])
    monkeypatch.setenv("PLUGLM_CPU_ISA", isa)
    out = pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, *pool[2:],
                                       token_type_ids=tt, position_offset=1, backend="cpu")
    ref = R.encode_knowledge(ids, mask, *[t.double() for t in (*emb, *ln, *pool)], tt, 1e-12, 1)
    assert rel_err(out, ref) < 5e-6


@needs_cpu
def test_factored_is_deterministic_across_thread_counts(fresh_seed):
    ids, mask, tt, emb, ln, pool = _inputs(9, 33, 64, 32, 40, 40, 2, torch.float32, False, 0)
    tables = pk.encoder_tables(*emb, *ln, *pool[:2])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, *pool[2:]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_cpu
def test_factored_large_scores_and_all_empty(fresh_seed):
    ids, mask, tt, emb, ln, pool = _inputs(3, 8, 16, 5, 9, 10, 1, torch.float16, False, 0)
    w1, b1, w2, b2 = pool
    w2 = w2 * 3000  # scores ~ 1e4: a raw exp overflows
    tables = pk.encoder_tables(*emb, *ln, w1, b1)
    out = pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, w2, b2)
    assert torch.isfinite(out).all()
    ref = R.encode_knowledge(ids, mask, *[t.double() for t in (*emb, *ln, w1, b1, w2, b2)])
    assert rel_err(out, ref) < 2e-2
    zeros = pk.encode_knowledge_factored(ids, torch.zeros_like(mask), *emb, *ln, tables, w2, b2)
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_encoder_tables_are_the_pooler_applied_to_each_row(fresh_seed):
    D, Hp = 12, 7
    emb = (torch.randn(5, D), torch.randn(4, D), torch.randn(2, D))
    lnw, lnb = torch.randn(D), torch.randn(D)
    w1, b1 = torch.randn(Hp, D), torch.randn(Hp)
    t = pk.encoder_tables(*emb, lnw, lnb, w1, b1, chunk_rows=2)
    f64 = [x.double() for x in (*emb, lnw, lnb, w1, b1)]
    for got, table in zip(t[:3], f64[:3]):
        assert rel_err(got, (table * f64[3]) @ f64[5].T) < 1e-7
    assert rel_err(t.gamma_u, f64[5] @ f64[3]) < 1e-7
    assert rel_err(t.bias_u, f64[5] @ f64[4] + f64[6]) < 1e-7


def test_factored_refuses_gradients_and_bad_arguments(fresh_seed):
    ids, mask, tt, emb, ln, pool = _inputs(3, 5, 8, 4, 6, 8, 2, torch.float32, False, 0)
    tables = pk.encoder_tables(*emb, *ln, *pool[:2])
    w = emb[0].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient"):
        pk.encode_knowledge_factored(ids, mask, w, *emb[1:], *ln, tables, *pool[2:])
    with torch.no_grad():  # the same call without grad mode runs
        pk.encode_knowledge_factored(ids, mask, w, *emb[1:], *ln, tables, *pool[2:])
    with pytest.raises(TypeError, match="tables must be an EncoderTables"):
        pk.encode_knowledge_factored(ids, mask, *emb, *ln, tuple(tables), *pool[2:])
    other = pk.encoder_tables(torch.randn(7, 8), *emb[1:], *ln, *pool[:2])
    with pytest.raises(ValueError, match="tables.word_u must have shape"):
        pk.encode_knowledge_factored(ids, mask, *emb, *ln, other, *pool[2:])
    with pytest.raises(ValueError, match="w2 must have shape"):
        pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, torch.randn(5), pool[3])
    with pytest.raises(ValueError, match="token_ids must be in"):
        pk.encode_knowledge_factored(ids + 100, mask, *emb, *ln, tables, *pool[2:])
    with pytest.raises(ValueError, match="backend must be"):
        pk.encode_knowledge_factored(ids, mask, *emb, *ln, tables, *pool[2:], backend="cuda")
    with pytest.raises(ValueError, match="w1 must have shape"):
        pk.encoder_tables(*emb, *ln, torch.randn(4, 9), pool[1])


@needs_cpu
def test_native_factored_op_checks_its_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3)
    word, pos, typ = torch.randn(4, 5), torch.randn(3, 5), torch.randn(1, 5)
    tab = pk.encoder_tables(word, pos, typ, torch.ones(5), torch.zeros(5), torch.randn(6, 5),
                            torch.zeros(6))
    op = torch.ops.pluglm._C_encode_knowledge_factored
    args = [ids, mask, None, word, pos, typ, torch.ones(5), torch.zeros(5), *tab,
            torch.randn(6), torch.zeros(1), 1e-12, 0]
    op(*args)
    bad = list(args)
    bad[8] = tab.word_u.double()
    with pytest.raises(RuntimeError, match="word_u must be float32"):
        op(*bad)
    bad = list(args)
    bad[0] = ids + 9
    with pytest.raises(RuntimeError, match="token_ids must be in"):
        op(*bad)
    bad = list(args)
    bad[1] = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        op(*bad)


# ------------------------------------------------------------------------------ model


def _tiny_model(**kw):
    from pluglm import PlugLMConfig, PlugLMModel

    cfg = PlugLMConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=40, key_dim=16,
                       doc_max_length=24, **kw)
    return PlugLMModel(cfg, add_pooling_layer=False)


@needs_cpu
def test_model_encode_memory_uses_tables_at_inference_only(fresh_seed):
    torch.manual_seed(fresh_seed)
    model = _tiny_model()
    ids = torch.randint(0, 53, (5, 24))
    mask = (torch.arange(24)[None] < torch.tensor([24, 3, 17, 1, 9])[:, None]).long()
    model.train()
    k_train, v_train = model.encode_memory(ids, mask)  # grad mode, training: the matmul path
    assert model.knowledge_encoder._tables._tables is None
    model.eval()
    with torch.no_grad():
        k_eval, v_eval = model.encode_memory(ids, mask)
    assert model.knowledge_encoder._tables._tables is not None
    assert rel_err(k_eval, k_train) < 1e-5 and rel_err(v_eval, v_train) < 1e-5
    # a weight changed in place (an optimizer step) rebuilds the tables
    first = model.knowledge_encoder._tables._tables
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(1.5)
        k2, _ = model.encode_memory(ids, mask)
    assert model.knowledge_encoder._tables._tables is not first
    model.knowledge_encoder.use_tables = False
    with torch.no_grad():
        k3, _ = model.encode_memory(ids, mask)
    assert rel_err(k2, k3) < 1e-5 and not torch.equal(k2, k_eval)
    # a deep copy (what a key-refresh snapshot is) starts without tables
    assert copy.deepcopy(model).knowledge_encoder._tables._tables is None
