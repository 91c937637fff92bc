"""pluglm.nn modules against hand-written formulations (docs/design.md §1, issue 4).

The oracles are written out by hand the way the published PlugLM code does it (separate
nn.Linear projections, torch.bmm for q.k, additive beta*cos bias, softmax, dropout, bmm,
output projection) — with one deliberate fix: the published BiasedMultiHeadAttention
reshapes [B*H, T, Dh] straight to [B, T, d] without moving the head axis back, which mixes
heads and tokens; docs/design.md's ``W_O concat_h`` is the intended math, so the oracle
transposes. float64 runs use backend="reference" (tight tolerances); float32 runs use
"auto" (whatever kernels are built).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pluglm.nn import (AttentivePool, KnowledgeAttention, Memory, MemoryLayer, RetrievalOutput,
                       TensorMemory, cosine_bias)
from pluglm_kernels import reference

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
ZERO = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1}
BACKEND = {torch.float64: "reference", torch.float32: "auto"}


def rel_err(out, ref):
    out64, ref64 = out.detach().double(), ref.detach().double()
    d = ref64.norm().item()
    return (out64 - ref64).norm().item() / (d if d > 0 else 1.0)


def assert_close(out, ref, dtype, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    if ref.detach().double().norm() < ZERO[dtype]:
        # Mathematically zero (e.g. the gradient of a bias that shifts every softmax logit
        # equally): both sides hold rounding noise only, so compare absolutely.
        noise = out.detach().double().norm().item()
        assert noise < ZERO[dtype], f"{what}: expected ~0, got norm {noise:.3e}"
        return
    err = rel_err(out, ref)
    assert err <= RTOL[dtype], f"{what}: rel err {err:.3e} > {RTOL[dtype]:.1e}"


def clone_linear(src: nn.Linear) -> nn.Linear:
    dst = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    dtype=src.weight.dtype)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


def randomize_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    # Default inits leave biases tiny and beta = 1; random values exercise every term.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


# --------------------------------------------------------------------- published oracles


class PublishedMultiHead(nn.Module):
    """The published BiasedMultiHeadAttention + beta, written out (head transpose fixed)."""

    def __init__(self, ka: KnowledgeAttention):
        super().__init__()
        self.H, self.Dh, self.d = ka.num_heads, ka.head_dim, ka.hidden_size
        self.q_proj = clone_linear(ka.q_proj)
        self.k_proj = clone_linear(ka.k_proj)
        self.v_proj = clone_linear(ka.v_proj)
        self.out_proj = clone_linear(ka.out_proj)
        self.beta = nn.Parameter(ka.beta.detach().clone())

    def _shape(self, x, bsz):  # [B, L, d] -> [B*H, L, Dh]
        return x.view(bsz, -1, self.H, self.Dh).transpose(1, 2).reshape(bsz * self.H, -1, self.Dh)

    def forward(self, hidden, kg_value, sentence_sim, keep=None, p=0.0):
        bsz, tgt_len, _ = hidden.shape
        src_len = kg_value.shape[1]
        bias = (self.beta[None, :, None, None].expand(bsz, -1, tgt_len, src_len)
                * sentence_sim[:, None, None, :].expand(-1, self.H, tgt_len, -1))
        q = self._shape(self.q_proj(hidden) * self.Dh ** -0.5, bsz)
        k = self._shape(self.k_proj(kg_value), bsz)
        v = self._shape(self.v_proj(kg_value), bsz)
        w = torch.bmm(q, k.transpose(1, 2))  # [B*H, T, N]
        w = w + bias.reshape(bsz * self.H, tgt_len, src_len).to(w.dtype)
        w = torch.softmax(w, dim=-1)
        if keep is not None:  # keep: [B, T, H, N] from the shared Philox definition
            w = w * keep.permute(0, 2, 1, 3).reshape_as(w) / (1.0 - p)
        o = torch.bmm(w, v)  # [B*H, T, Dh]
        o = o.view(bsz, self.H, tgt_len, self.Dh).transpose(1, 2).reshape(bsz, tgt_len, self.d)
        return self.out_proj(o)


def published_cos(query, kg_key):
    return F.cosine_similarity(query.unsqueeze(1), kg_key, dim=-1)


def hand_attentive_pool(x, mask, w1, b1, w2, b2):
    s = torch.tanh(x @ w1.T + b1) @ w2 + b2  # [B, T]
    s = s.masked_fill(mask == 0, float("-inf"))
    a = torch.softmax(s, dim=1)
    return torch.bmm(x.transpose(1, 2), a[..., None])[..., 0]


def param_grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


# ---------------------------------------------------------------------- KnowledgeAttention

SHAPES = [  # (B, T, d, H, N, dv)
    (2, 5, 32, 4, 5, None),
    (3, 7, 48, 3, 1, 20),
    (1, 1, 24, 2, 7, 24),
    (2, 13, 40, 5, 11, 33),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64-ref", "f32-auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}d{}H{}N{}dv{}".format(*s))
def test_multi_head_matches_published(shape, dtype):
    B, T, d, H, N, dv = shape
    dv_ = d if dv is None else dv
    ka = randomize_(KnowledgeAttention(d, H, value_dim=dv, dropout=0.0,
                                       backend=BACKEND[dtype]).to(dtype))
    pub = PublishedMultiHead(ka)
    hidden = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    values = torch.randn(B, N, dv_, dtype=dtype, requires_grad=True)
    query = torch.randn(B, 16, dtype=dtype, requires_grad=True)
    keys = torch.randn(B, N, 16, dtype=dtype, requires_grad=True)

    out = ka(hidden, values, cosine_bias(query, keys))
    ref = pub(hidden, values, published_cos(query, keys))
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "forward")

    g = torch.randn_like(ref)
    inputs = (hidden, values, query, keys)
    got = torch.autograd.grad(out, inputs + tuple(ka.parameters()), g)
    exp = torch.autograd.grad(ref, inputs + tuple(pub.parameters()), g)
    names = ["hidden", "values", "query", "keys"] + [n for n, _ in ka.named_parameters()]
    assert names[4:] == [n for n, _ in pub.named_parameters()]
    for name, a, b in zip(names, got, exp):
        assert_close(a, b, dtype, f"grad {name}")


def test_multi_head_dropout_matches_published_mask():
    torch.manual_seed(1234)
    B, T, d, H, N, p = 2, 6, 24, 3, 4, 0.3
    ka = randomize_(KnowledgeAttention(d, H, dropout=p, backend="reference").double()).train()
    pub = PublishedMultiHead(ka)
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(B, N, dtype=torch.float64).tanh()

    # The module draws its seed from the CPU generator: replay the draw.
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2**62, (), device="cpu"))
    torch.set_rng_state(state)
    out = ka(hidden, values, bias)
    keep = reference.dropout_keep_mask(seed, p, (B, T, H, N), hidden.device)
    assert 0 < keep.float().mean() < 1
    ref = pub(hidden, values, bias, keep=keep, p=p)
    assert_close(out, ref, torch.float64, "dropout forward")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (hidden, values, *ka.parameters()), g)
    exp = torch.autograd.grad(ref, (hidden, values, *pub.parameters()), g)
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float64, "dropout grad")

    # Same global seed -> same output; eval mode -> no dropout at all.
    torch.set_rng_state(state)
    again = ka(hidden, values, bias)
    assert torch.equal(out, again)
    ka.eval()
    no_drop = ka(hidden, values, bias)
    assert_close(no_drop, pub(hidden, values, bias), torch.float64, "eval")


@pytest.mark.parametrize("dv", [None, 19], ids=["dv=d", "dv!=d"])
def test_sentence_level_matches_formula(dv):
    B, T, d, N = 3, 5, 16, 6
    dv_ = d if dv is None else dv
    ka = KnowledgeAttention(d, 4, value_dim=dv, attention_type="sentence_level").double()
    n_params = sum(p.numel() for p in ka.parameters())
    if dv is None:
        assert n_params == 0  # published: the values are used directly
    hidden = torch.randn(B, T, d, dtype=torch.float64)
    values = torch.randn(B, N, dv_, dtype=torch.float64, requires_grad=True)
    sim = torch.randn(B, N, dtype=torch.float64, requires_grad=True)
    out = ka(hidden, values, sim)
    ref = torch.bmm(torch.softmax(sim, dim=-1).unsqueeze(1), values)  # [B, 1, dv]
    if dv is not None:
        ref = ka.out_proj(ref)
    ref = ref.expand(-1, T, -1)
    assert_close(out, ref, torch.float64, "sentence_level")
    g = torch.randn(B, T, d, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (values, sim), g), torch.autograd.grad(ref, (values, sim), g)):
        assert_close(a, b, torch.float64, "sentence_level grad")
    with pytest.raises(ValueError, match="multi_head"):
        ka.project_tables(torch.randn(4, dv_, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64-ref", "f32-auto"])
def test_forward_gathered_equals_forward(dtype):
    B, T, d, H, N, M, dv = 3, 7, 36, 3, 5, 23, 29
    ka = randomize_(KnowledgeAttention(d, H, value_dim=dv, dropout=0.0,
                                       backend=BACKEND[dtype]).to(dtype)).eval()
    table_values = torch.randn(M, dv, dtype=dtype)
    tk, tv = ka.project_tables(table_values, chunk_size=5)  # several chunks
    assert tk.shape == (M, H, d // H) and not tk.requires_grad
    idx = torch.randint(0, M, (B, N))
    idx[0, 1] = idx[0, 0]  # a repeated row
    hidden = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    bias = torch.randn(B, N, dtype=dtype)
    out = ka.forward_gathered(hidden, tk, tv, idx, bias)
    ref = ka(hidden, table_values[idx], bias)
    assert_close(out, ref, dtype, "gathered forward")
    g = torch.randn_like(ref)
    assert_close(torch.autograd.grad(out, hidden, g)[0], torch.autograd.grad(ref, hidden, g)[0],
                 dtype, "gathered grad hidden")


def test_knowledge_attention_errors():
    ka = KnowledgeAttention(16, 4)
    h, v, b = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5)
    with pytest.raises(ValueError, match="values"):
        ka(h, torch.randn(2, 5, 8), b)
    with pytest.raises(ValueError, match="bias"):
        ka(h, v, torch.randn(2, 4))
    with pytest.raises(ValueError, match="hidden"):
        ka(torch.randn(2, 3, 15), v, b)
    with pytest.raises(ValueError, match="divisible"):
        KnowledgeAttention(16, 5)
    with pytest.raises(ValueError, match="attention_type"):
        KnowledgeAttention(16, 4, attention_type="single_head")
    with pytest.raises(ValueError, match="dropout"):
        KnowledgeAttention(16, 4, dropout=1.0)
    with pytest.raises(ValueError, match="key_dim"):
        cosine_bias(torch.randn(2, 8), torch.randn(2, 5, 7))


# --------------------------------------------------------------------------- AttentivePool


@pytest.mark.parametrize("pool_hidden", [None, 7])
def test_attentive_pool_matches_formula(pool_hidden):
    B, T, D = 4, 9, 12
    pool = randomize_(AttentivePool(D, pool_hidden, backend="reference").double(), 0.5)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(B, T) > 0.3).long()
    mask[:, 0] = 1
    out = pool(x, mask)
    ref = hand_attentive_pool(x, mask, pool.w1, pool.b1, pool.w2, pool.b2)
    assert_close(out, ref, torch.float64, "pool")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, *pool.parameters()), g)
    exp = torch.autograd.grad(ref, (x, *pool.parameters()), g)
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float64, "pool grad")
    assert_close(pool(x), hand_attentive_pool(x, torch.ones(B, T), pool.w1, pool.b1, pool.w2, pool.b2),
                 torch.float64, "no mask")


# ------------------------------------------------------------------------------ MemoryLayer


def hand_memory_layer(layer: MemoryLayer, A, mask, keys_table, values_table, *, training,
                      running):
    """docs/design.md §1 written out the published way, reading the layer's own parameters (so
    every parameter gradient can be compared directly)."""
    pool = layer.pooler
    pooled = hand_attentive_pool(A, mask, pool.w1, pool.b1, pool.w2, pool.b2)
    q = F.linear(pooled, layer.query_proj.weight, layer.query_proj.bias)
    bn = layer.batch_norm
    rm, rv = running
    q = F.batch_norm(q, rm, rv, bn.weight, bn.bias, training, bn.momentum, bn.eps)
    I = torch.topk(q.detach().double() @ keys_table.detach().double().T, layer.memory_k).indices
    kg_key, kg_value = keys_table[I], values_table[I]  # [B, N, key_dim], [B, N, d]
    sim = published_cos(q, kg_key)  # [B, N]
    ka = layer.knowledge_attention
    B, T, d = A.shape
    N = kg_value.shape[1]
    if ka.attention_type == "multi_head":
        H, Dh = ka.num_heads, ka.head_dim

        def shape(x):  # [B, L, d] -> [B*H, L, Dh]
            return x.view(B, -1, H, Dh).transpose(1, 2).reshape(B * H, -1, Dh)

        qs = shape(F.linear(A, ka.q_proj.weight, ka.q_proj.bias) * Dh ** -0.5)
        ks = shape(F.linear(kg_value, ka.k_proj.weight, ka.k_proj.bias))
        vs = shape(F.linear(kg_value, ka.v_proj.weight, ka.v_proj.bias))
        bias = ka.beta[None, :, None, None] * sim[:, None, None, :].expand(-1, H, T, -1)
        w = torch.bmm(qs, ks.transpose(1, 2)) + bias.reshape(B * H, T, N).to(A.dtype)
        o = torch.bmm(torch.softmax(w, dim=-1), vs)
        o = o.view(B, H, T, Dh).transpose(1, 2).reshape(B, T, d)
        mem = F.linear(o, ka.out_proj.weight, ka.out_proj.bias)
    else:
        mem = torch.bmm(torch.softmax(sim, -1).unsqueeze(1).to(A.dtype), kg_value).expand(-1, T, -1)
    lin1, lin2 = layer.ffn[0], layer.ffn[1]
    ffn = F.linear(F.gelu(F.linear(A, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    ln = layer.layer_norm
    out = F.layer_norm(A + ffn + mem, (d,), ln.weight, ln.bias, ln.eps)
    return out, I


def make_layer(dtype, *, d=32, H=4, key_dim=12, N=3, ffn=20, attention_type="multi_head"):
    layer = MemoryLayer(d, H, key_dim, N, ffn, attention_type=attention_type, dropout=0.0,
                        backend=BACKEND.get(dtype, "auto"))
    randomize_(layer)
    with torch.no_grad():
        layer.batch_norm.running_var.uniform_(0.5, 2.0)
        layer.batch_norm.running_mean.normal_()
    return layer.to(dtype)


@pytest.mark.parametrize("attention_type", ["multi_head", "sentence_level"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64-ref", "f32-auto"])
def test_memory_layer_matches_hand(dtype, training, attention_type):
    B, T, d, key_dim, M, N = 3, 7, 32, 12, 41, 3
    layer = make_layer(dtype, d=d, key_dim=key_dim, N=N, attention_type=attention_type)
    layer.train(training)
    keys_table = torch.randn(M, key_dim, dtype=dtype, requires_grad=True)
    values_table = torch.randn(M, d, dtype=dtype, requires_grad=True)
    memory = TensorMemory(keys_table, values_table)
    A = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0

    running = (layer.batch_norm.running_mean.clone(), layer.batch_norm.running_var.clone())
    out, retrieval = layer(A, mask, memory, return_retrieval=True)
    ref, I = hand_memory_layer(layer, A, mask, keys_table, values_table, training=training,
                               running=running)
    assert isinstance(retrieval, RetrievalOutput)
    assert retrieval.indices.dtype == torch.int64 and retrieval.scores.dtype == torch.float32
    assert torch.equal(retrieval.indices.sort(1).values, I.sort(1).values)
    assert_close(out, ref, dtype, "memory layer forward")
    if training:
        assert_close(layer.batch_norm.running_mean, running[0], dtype, "running_mean")
        assert_close(layer.batch_norm.running_var, running[1], dtype, "running_var")

    g = torch.randn_like(ref)
    inputs = [A, keys_table, values_table]
    params = [p for _, p in layer.named_parameters()]
    got = torch.autograd.grad(out, inputs + params, g, allow_unused=True)
    exp = torch.autograd.grad(ref, inputs + params, g, allow_unused=True)
    names = ["A", "keys", "values"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, exp):
        assert a is not None, f"no gradient for {name}"
        if b is None:
            b = torch.zeros_like(a)
        assert_close(a, b, dtype, f"grad {name}")
    # Only the retrieved rows of the memory get a gradient (re-encoding reaches the encoder).
    touched = torch.zeros(M, dtype=torch.bool)
    touched[I.reshape(-1)] = True
    assert got[2][~touched].abs().max() == 0 and got[2][touched].abs().sum() > 0
    assert got[1][touched].abs().sum() > 0


def test_fetch_fn_reencoding_reaches_encoder():
    # Stale keys for the search, fresh (re-encoded) keys/values for the gradient.
    torch.manual_seed(0)
    M, doc_dim, d, key_dim = 30, 10, 32, 12
    docs = torch.randn(M, doc_dim)
    enc_k, enc_v = nn.Linear(doc_dim, key_dim), nn.Linear(doc_dim, d)
    stale_keys = torch.randn(M, key_dim)  # deliberately unrelated to the encoder
    calls = []

    def fetch_fn(indices):
        calls.append(indices.clone())
        rows = docs[indices]  # [B, N, doc_dim]
        return enc_k(rows), enc_v(rows)

    memory = TensorMemory(stale_keys, None, fetch_fn=fetch_fn)
    assert isinstance(memory, Memory)
    layer = MemoryLayer(d, 4, key_dim, 4, 0, dropout=0.0).train()
    A = torch.randn(3, 6, d, requires_grad=True)
    out, r = layer(A, None, memory, return_retrieval=True)
    q = layer.compute_query(A).detach()
    assert torch.equal(r.indices.sort(1).values,
                       torch.topk(q @ stale_keys.T, 4).indices.sort(1).values)
    assert len(calls) == 1 and torch.equal(calls[0], r.indices)
    out.square().mean().backward()
    for p in (enc_k.weight, enc_k.bias, enc_v.weight, enc_v.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.ffn is None


# ------------------------------------------------------------------ precomputed tables


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64-ref", "f32-auto"])
def test_precomputed_tables_equal_normal_path(dtype):
    B, T, d, key_dim, M, dv = 3, 5, 32, 12, 37, 27
    layer = MemoryLayer(d, 4, key_dim, 5, 16, value_dim=dv, backend=BACKEND[dtype])
    layer = randomize_(layer).to(dtype).eval()
    memory = TensorMemory(torch.randn(M, key_dim, dtype=dtype), torch.randn(M, dv, dtype=dtype))
    A = torch.randn(B, T, d, dtype=dtype)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    with torch.no_grad():
        base = layer(A, mask, memory)
        layer.precompute_tables(memory, chunk_size=8)
        assert layer.tables is not None and layer.tables[0].shape == (M, 4, d // 4)
        fast, r = layer(A, mask, return_retrieval=True)
    assert_close(fast, base, dtype, "tables vs normal")

    # The tables really are what gets read: corrupt them and the output moves.
    with torch.no_grad():
        layer._tables["v"].zero_()
        assert rel_err(layer(A, mask), base) > 1e-3
    layer.invalidate_tables()
    with torch.no_grad():
        assert_close(layer(A, mask), base, dtype, "rebuilt after invalidate_tables")


def test_precomputed_tables_invalidation():
    torch.manual_seed(7)
    dtype = torch.float64
    B, T, d, key_dim, M = 2, 4, 24, 8, 29
    layer = randomize_(MemoryLayer(d, 3, key_dim, 4, 0, backend="reference")).double().eval()
    memory = TensorMemory(torch.randn(M, key_dim, dtype=dtype), torch.randn(M, d, dtype=dtype))
    A = torch.randn(B, T, d, dtype=dtype)

    def normal():
        layer.release_tables()
        with torch.no_grad():
            out = layer(A, None, memory)
        layer.precompute_tables(memory)
        return out

    def fast():
        with torch.no_grad():
            return layer(A, None)

    layer.precompute_tables(memory)
    assert_close(fast(), normal(), dtype, "initial")
    _, r = layer(A, None, return_retrieval=True)
    hit = r.indices[0, 0]

    # 1. memory mutation through the API bumps version -> tables stale, rebuilt on use.
    v0 = memory.version
    memory.update(hit[None], values=torch.randn(1, d, dtype=dtype) * 5)
    assert memory.version > v0 and layer.tables is None
    out = fast()
    assert layer.tables is not None
    assert_close(out, normal(), dtype, "after update")
    # 2. in-place write straight into the values tensor.
    v0 = memory.version
    memory.values[hit] += 1.0
    assert memory.version > v0 and layer.tables is None
    assert_close(fast(), normal(), dtype, "after in-place write")
    # 3. remove / add.
    memory.remove(r.indices[0, :1])
    assert layer.tables is None
    assert_close(fast(), normal(), dtype, "after remove")
    v0 = memory.version
    memory.add(torch.randn(3, key_dim, dtype=dtype) * 10, torch.randn(3, d, dtype=dtype))
    assert memory.version > v0 and len(memory) == M + 3
    assert_close(fast(), normal(), dtype, "after add")
    assert layer.tables[0].shape[0] == M + 3
    # 4. weights change: optimizer step on W_V / W_K, then load_state_dict.
    fast()
    opt = torch.optim.SGD(layer.knowledge_attention.v_proj.parameters(), lr=0.5)
    for p in layer.knowledge_attention.v_proj.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert layer.tables is None
    assert_close(fast(), normal(), dtype, "after optimizer step")
    sd = {k: v + 0.1 if "k_proj" in k else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd)
    assert layer.tables is None
    assert_close(fast(), normal(), dtype, "after load_state_dict")
    # 5. a different memory object.
    other = TensorMemory(torch.randn(M, key_dim, dtype=dtype), torch.randn(M, d, dtype=dtype))
    layer.set_memory(other)
    with torch.no_grad():
        got = layer(A)
    layer.release_tables()
    with torch.no_grad():
        assert_close(got, layer(A, None, other), dtype, "other memory")
    layer.precompute_tables(memory)
    # 6. train mode frees the tables; eval forwards rebuild them.
    layer.train()
    assert layer._tables is None
    layer.eval()
    fast()
    assert layer.tables is not None


def test_precomputed_tables_keep_exact_gradients():
    # Eval with grad enabled and trainable W_K/W_V: the normal path runs, gradients exact.
    dtype = torch.float64
    layer = randomize_(MemoryLayer(16, 2, 8, 3, 8, backend="reference")).double().eval()
    memory = TensorMemory(torch.randn(20, 8, dtype=dtype), torch.randn(20, 16, dtype=dtype))
    layer.precompute_tables(memory)
    ka = layer.knowledge_attention
    calls = []
    gathered = ka.forward_gathered
    ka.forward_gathered = lambda *a: calls.append(1) or gathered(*a)
    A = torch.randn(2, 3, 16, dtype=dtype, requires_grad=True)
    layer(A).sum().backward()
    assert not calls and ka.k_proj.weight.grad is not None
    with torch.no_grad():
        layer(A)
    assert len(calls) == 1
    # Frozen W_K/W_V: the tables path runs and the input gradient is still exact.
    for p in ka.parameters():
        p.requires_grad_(False)
    A.grad = None
    layer(A).sum().backward()
    assert len(calls) == 2
    g_tables = A.grad.clone()
    A.grad = None
    layer.release_tables()
    layer(A).sum().backward()
    assert len(calls) == 2
    assert_close(g_tables, A.grad, dtype, "dA via tables")
    with pytest.raises(ValueError, match="multi_head"):
        MemoryLayer(16, 2, 8, 3, 8, attention_type="sentence_level").precompute_tables(memory)


# -------------------------------------------------------------------------- misc / errors


def test_memory_layer_bf16_smoke():
    torch.manual_seed(3)
    B, T, d, key_dim, M = 3, 9, 32, 12, 50
    ref_layer = make_layer(torch.float64, d=d, key_dim=key_dim).eval()
    layer = make_layer(torch.float64, d=d, key_dim=key_dim)
    layer.load_state_dict(ref_layer.state_dict())
    layer = layer.to(torch.bfloat16).eval()
    for m in layer.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    keys = torch.randn(M, key_dim, dtype=torch.float64)
    values = torch.randn(M, d, dtype=torch.float64)
    A = torch.randn(B, T, d, dtype=torch.float64)
    ref, r_ref = ref_layer(A, None, TensorMemory(keys, values), return_retrieval=True)
    mem16 = TensorMemory(keys.bfloat16(), values.bfloat16())
    A16 = A.bfloat16().requires_grad_()
    out, r = layer(A16, None, mem16, return_retrieval=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    if torch.equal(r.indices.sort(1).values, r_ref.indices.sort(1).values):
        assert rel_err(out, ref) < 3e-2
    out.float().square().sum().backward()
    assert torch.isfinite(A16.grad).all()
    layer.precompute_tables(mem16)
    with torch.no_grad():
        fast = layer(A16, None)
    assert fast.dtype == torch.bfloat16 and torch.isfinite(fast).all()

    # float32 layer under CPU autocast, memory stored in bfloat16.
    layer32 = make_layer(torch.float64, d=d, key_dim=key_dim).float().train()
    for m in layer32.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    A32 = A.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer32(A32, None, mem16)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(A32.grad).all()


def test_memory_layer_errors_and_state():
    layer = MemoryLayer(16, 2, 8, 3, 0)
    memory = TensorMemory(torch.randn(10, 8), torch.randn(10, 16))
    A = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="no memory"):
        layer(A)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(A, torch.zeros(2, 1, 1, 4), memory)  # the extended mask is refused
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 4, 15), None, memory)
    with pytest.raises(ValueError, match="values"):
        layer(A, None, TensorMemory(torch.randn(10, 8), torch.randn(10, 12)))
    with pytest.raises(TypeError, match="search"):
        layer.set_memory(object())
    with pytest.raises(ValueError, match="memory_ffn_dim"):
        MemoryLayer(16, 2, 8, 3, -1)
    with pytest.raises(ValueError, match="ffn_act"):
        MemoryLayer(16, 2, 8, 3, 4, ffn_act="tanhh")
    with pytest.raises(ValueError, match="valid"):
        TensorMemory(torch.randn(10, 8), torch.randn(10, 16), valid=torch.ones(9, dtype=torch.bool))
    layer.set_memory(memory)
    assert not any("memory" in k and "memory_" not in k for k in layer.state_dict())
    assert layer.memory is memory
    # Removed entries are never retrieved.
    memory.remove(torch.arange(0, 7))
    _, r = layer.eval()(A, None, return_retrieval=True)
    assert bool((r.indices >= 7).all())


def test_pluglm_nn_imports_alone_without_transformers():
    # Load pluglm.nn with an empty stand-in for the pluglm package, so only pluglm.nn's own
    # imports run (the lead's pluglm/__init__ may legitimately import transformers).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, types; pkg = types.ModuleType('pluglm'); "
            f"pkg.__path__ = [{os.path.join(root, 'pluglm')!r}]; sys.modules['pluglm'] = pkg; "
            "import pluglm.nn as m; m.MemoryLayer(16, 2, 8, 3, 8); "
            "assert 'transformers' not in sys.modules, 'pluglm.nn imported transformers'")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_memory_layer_train_dropout_reproducible():
    layer = randomize_(MemoryLayer(24, 3, 8, 4, 12, dropout=0.3)).train()
    memory = TensorMemory(torch.randn(30, 8), torch.randn(30, 24))
    A = torch.randn(4, 5, 24)
    torch.manual_seed(11)
    a = layer(A, None, memory)
    torch.manual_seed(11)
    b = layer(A, None, memory)
    c = layer(A, None, memory)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_memory_layer_cuda_matches_cpu_reference(dtype):
    B, T, d, key_dim, M = 5, 33, 64, 16, 1000
    ref_layer = make_layer(torch.float64, d=d, key_dim=key_dim, N=5).eval()
    layer = make_layer(torch.float64, d=d, key_dim=key_dim, N=5)
    layer.load_state_dict(ref_layer.state_dict())
    layer = layer.to(device="cuda", dtype=dtype).eval()
    for m in layer.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    keys, values = torch.randn(M, key_dim, dtype=torch.float64), torch.randn(M, d, dtype=torch.float64)
    A = torch.randn(B, T, d, dtype=torch.float64)
    ref, r_ref = ref_layer(A, None, TensorMemory(keys, values), return_retrieval=True)
    mem = TensorMemory(keys.to("cuda", dtype), values.to("cuda", dtype))
    A_dev = A.to("cuda", dtype).requires_grad_()
    out, r = layer(A_dev, None, mem, return_retrieval=True)
    tol = 5e-4 if dtype == torch.float32 else 3e-2
    if torch.equal(r.indices.sort(1).values.cpu(), r_ref.indices.sort(1).values):
        assert rel_err(out.cpu(), ref) < tol
    out.float().square().sum().backward()
    assert torch.isfinite(A_dev.grad).all()
    layer.precompute_tables(mem)
    with torch.no_grad():
        fast = layer(A_dev.detach(), None)
    assert rel_err(fast, out) < tol
