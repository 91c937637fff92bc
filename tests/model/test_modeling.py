"""PlugLM model classes (issue 5 items 1, 2, 5, 8): config, the model against a
straightforward reference implementation of docs/design.md §1 (outputs and every gradient, eval
with stored values and training with stale-key search + fresh re-encode), heads, Auto-class
round trips, memory plumbing, SyncBatchNorm conversion, explain() and torch.compile.

float64 runs use backend="reference" (tight tolerances); float32 runs use "auto" (whatever
kernels are built) against the same reference evaluated in float64 on a copy of the weights.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pluglm_kernels
from pluglm.auto import register
from pluglm.configuration_pluglm import PlugLMConfig
from pluglm.modeling_pluglm import (
    PlugLMForMaskedLM,
    PlugLMForQuestionAnswering,
    PlugLMForSequenceClassification,
    PlugLMForTokenClassification,
    PlugLMModel,
    PlugLMRetrieval,
)
from pluglm.nn import LiveEncodedMemory, TensorMemory

RTOL = {torch.float64: 1e-10, torch.float32: 5e-5}
# Gradients pass back through three post-LN layers and a training-mode BatchNorm over five
# queries (it divides by their batch std): float32 rounding grows to ~1e-4 there.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 5e-4}
ZERO = {torch.float64: 1e-9, torch.float32: 1e-4}
BACKEND = {torch.float64: "reference", torch.float32: "auto"}


def rel_err(out, ref):
    out64, ref64 = out.detach().double(), ref.detach().double()
    d = ref64.norm().item()
    return (out64 - ref64).norm().item() / (d if d > 0 else 1.0)


def assert_close(out, ref, dtype, what="", rtol=None):
    rtol = RTOL[dtype] if rtol is None else rtol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    if ref.detach().double().norm() < ZERO[dtype]:
        noise = out.detach().double().norm().item()
        assert noise < ZERO[dtype], f"{what}: expected ~0, got norm {noise:.3e}"
        return
    err = rel_err(out, ref)
    assert err <= rtol, f"{what}: rel err {err:.3e} > {rtol:.1e}"


def tiny_config(**kw) -> PlugLMConfig:
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
                num_memory_layers=1, memory_k=3, key_dim=16, doc_max_length=13,
                memory_ffn_dim=24)
    base.update(kw)
    return PlugLMConfig(**base)


def randomize_(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Non-trivial weights everywhere (init leaves LayerNorm/BatchNorm/beta at 1/0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "layer_norm.weight", "batch_norm.weight", "beta")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model


class IdsMemory:
    """A small memory following the protocol KnowledgeMemory implements: doc token ids and
    masks, stored keys/values, texts, sources, search/fetch/fetch_keys/token_ids_of."""

    def __init__(self, token_ids, mask, keys, values, texts=None, sources=None):
        self.token_ids = token_ids  # [M, L] int16
        self.mask = mask  # [M, L] 0/1
        self.keys = keys  # [M, key_dim]
        self.values = values  # [M, d] or None
        M = keys.shape[0]
        self.texts = texts if texts is not None else [f"doc {i}" for i in range(M)]
        self.sources = sources if sources is not None else ["wiki"] * M
        self.version = 0

    def __len__(self):
        return self.keys.shape[0]

    def search(self, q, k):
        backend = "reference" if self.keys.dtype == torch.float64 else "auto"
        return pluglm_kernels.mips_topk(q.detach().to(self.keys.dtype), self.keys, k, backend=backend)

    def fetch_keys(self, idx):
        return self.keys[idx]

    def fetch(self, idx):
        return self.keys[idx], self.values[idx]

    def token_ids_of(self, idx):
        return self.token_ids[idx], self.mask[idx]

    def texts_of(self, idx):
        return [[self.texts[i] for i in row] for row in idx.tolist()]

    def sources_of(self, idx):
        return [[self.sources[i] for i in row] for row in idx.tolist()]


def random_docs(M, L, vocab, min_len=2):
    lengths = torch.randint(min_len, L + 1, (M,))
    mask = (torch.arange(L)[None] < lengths[:, None]).long()  # [M, L]
    ids = torch.randint(5, vocab, (M, L)) * mask  # pad id 0
    return ids.to(torch.int16), mask


def build_memory(model, M=20, L=None, stale_noise=0.0):
    """Memory of M random docs encoded with the model; stale_noise perturbs the stored keys
    (as if encoded by an older encoder) so search (stale) and bias (fresh) differ."""
    L = L or model.config.doc_max_length
    ids, mask = random_docs(M, L, model.config.vocab_size)
    with torch.no_grad():
        keys, values = model.encode_memory(ids, mask)
    noise = torch.randn_like(keys) / math.sqrt(keys.shape[1])  # ~unit norm per row
    keys = keys + stale_noise * keys.norm(dim=1, keepdim=True) * noise
    return IdsMemory(ids, mask, keys.contiguous(), values.contiguous())


def batch(B=4, T=7, vocab=100, pad=True):
    ids = torch.randint(5, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B):
            mask[b, T - b:] = 0
    ids = ids * mask
    return ids, mask


# ---------------------------------------------------------------- reference model (§1)

def ref_pool(x, mask, w1, b1, w2, b2):
    s = torch.tanh(x @ w1.T + b1) @ w2.reshape(-1) + b2.reshape(())  # [B, T]
    s = s.masked_fill(mask == 0, float("-inf"))
    a = torch.softmax(s, dim=1)
    return (a[..., None] * x).sum(1)


def ref_embed(P, ids, eps, token_type_ids=None):
    T = ids.shape[1]
    tt = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
    # the pad row gets no gradient, as with BERT's nn.Embedding(padding_idx=pad)
    x = (F.embedding(ids.long(), P["bert.embeddings.word_embeddings.weight"], padding_idx=0)
         + P["bert.embeddings.position_embeddings.weight"][:T]
         + P["bert.embeddings.token_type_embeddings.weight"][tt.long()])
    return F.layer_norm(x, x.shape[-1:], P["bert.embeddings.LayerNorm.weight"],
                        P["bert.embeddings.LayerNorm.bias"], eps)


def ref_linear(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def ref_ln(P, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"], eps)


def ref_attention(P, pre, x, mask, H, eps):
    B, T, d = x.shape
    Dh = d // H
    q, k, v = (ref_linear(P, f"{pre}.self.{n}", x).view(B, T, H, Dh).permute(0, 2, 1, 3)
               for n in ("query", "key", "value"))
    logits = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # [B, H, T, T]
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    ctx = (torch.softmax(logits, -1) @ v).permute(0, 2, 1, 3).reshape(B, T, d)
    return ref_ln(P, f"{pre}.output.LayerNorm", ref_linear(P, f"{pre}.output.dense", ctx) + x, eps)


def ref_encode_docs(P, ids, mask, eps):
    E = ref_pool(ref_embed(P, ids, eps), mask, P["bert.knowledge_encoder.pooler.w1"],
                 P["bert.knowledge_encoder.pooler.b1"], P["bert.knowledge_encoder.pooler.w2"],
                 P["bert.knowledge_encoder.pooler.b2"])
    return (ref_linear(P, "bert.knowledge_encoder.key_proj", E),
            ref_linear(P, "bert.knowledge_encoder.value_proj", E))


def ref_model(model, ids, mask, memory, training):
    """Last hidden state [B, T, d], MLM logits [B, T, V] and the retrieved indices per memory
    layer, written out from docs/design.md §1 with the model's own parameter tensors."""
    cfg = model.config
    P = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    eps, H = cfg.layer_norm_eps, cfg.num_attention_heads
    x = ref_embed(P, ids, eps)
    first_mem = cfg.num_hidden_layers - cfg.num_memory_layers
    retrieved = []
    for i in range(cfg.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}"
        a = ref_attention(P, f"{pre}.attention", x, mask, H, eps)
        if i < first_mem:
            h = F.gelu(ref_linear(P, f"{pre}.intermediate.dense", a))
            x = ref_ln(P, f"{pre}.output.LayerNorm", ref_linear(P, f"{pre}.output.dense", h) + a, eps)
            continue
        m = f"{pre}.memory"
        pooled = ref_pool(a, mask, P[f"{m}.pooler.w1"], P[f"{m}.pooler.b1"], P[f"{m}.pooler.w2"],
                          P[f"{m}.pooler.b2"])
        qm = ref_linear(P, f"{m}.query_proj", pooled)
        bn_w, bn_b = P[f"{m}.batch_norm.weight"], P[f"{m}.batch_norm.bias"]
        if training:
            qm = F.batch_norm(qm, None, None, bn_w, bn_b, training=True, eps=1e-5)
        else:
            qm = F.batch_norm(qm, bufs[f"{m}.batch_norm.running_mean"],
                              bufs[f"{m}.batch_norm.running_var"], bn_w, bn_b, training=False, eps=1e-5)
        # exact MIPS over the stored (stale) keys
        scores = qm.detach().to(memory.keys.dtype) @ memory.keys.T  # [B, M]
        I = scores.topk(cfg.memory_k, dim=1).indices  # [B, N]
        retrieved.append(I)
        if training:
            B, N = I.shape
            kj, vj = ref_encode_docs(P, memory.token_ids[I].reshape(B * N, -1),
                                     memory.mask[I].reshape(B * N, -1), eps)
            kj, vj = kj.view(B, N, -1), vj.view(B, N, -1)
        else:
            kj, vj = memory.keys[I].to(a.dtype), memory.values[I].to(a.dtype)
        c = F.cosine_similarity(qm[:, None, :], kj, dim=-1)  # [B, N]
        ka = f"{m}.knowledge_attention"
        if cfg.knowledge_attention == "multi_head":
            B, T, d = a.shape
            N, Dh = kj.shape[1], d // H
            Q = ref_linear(P, f"{ka}.q_proj", a).view(B, T, H, Dh)
            K = ref_linear(P, f"{ka}.k_proj", vj).view(B, N, H, Dh)
            V = ref_linear(P, f"{ka}.v_proj", vj).view(B, N, H, Dh)
            logits = torch.einsum("bthd,bnhd->bhtn", Q, K) / math.sqrt(Dh) \
                + P[f"{ka}.beta"][None, :, None, None] * c[:, None, None, :]
            p = torch.softmax(logits, dim=-1)
            ctx = torch.einsum("bhtn,bnhd->bthd", p, V).reshape(B, T, d)
            mem = ref_linear(P, f"{ka}.out_proj", ctx)
        else:
            w = torch.softmax(c, dim=-1)  # [B, N]
            mem = (w[..., None] * vj).sum(1)[:, None, :].expand_as(a)
        h = a + mem
        if cfg.memory_ffn_dim > 0:
            h = h + ref_linear(P, f"{m}.ffn.1", F.gelu(ref_linear(P, f"{m}.ffn.0", a)))
        x = ref_ln(P, f"{m}.layer_norm", h, eps)
    t = ref_ln(P, "cls.predictions.transform.LayerNorm",
               F.gelu(ref_linear(P, "cls.predictions.transform.dense", x)), eps)
    logits = t @ P["bert.embeddings.word_embeddings.weight"].T + P["cls.predictions.bias"]
    return x, logits, retrieved


def _memory_as(mem, dtype):
    return IdsMemory(mem.token_ids, mem.mask, mem.keys.to(dtype), mem.values.to(dtype))


# ------------------------------------------------------------------------------ config

def test_config_defaults():
    c = PlugLMConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.intermediate_size, c.max_position_embeddings, c.type_vocab_size) == \
        (30522, 768, 12, 12, 3072, 512, 2)
    assert c.layer_norm_eps == 1e-12 and c.hidden_dropout_prob == 0.1
    assert c.attention_probs_dropout_prob == 0.1
    assert (c.num_memory_layers, c.memory_k, c.key_dim, c.doc_max_length, c.memory_ffn_dim) == \
        (1, 5, 128, 288, 768)
    assert c.knowledge_attention == "multi_head" and c.refresh_interval == 200
    assert c.memory_attention_dropout == 0.1 and c.kernel_backend == "auto"
    assert c.model_type == "pluglm"


def test_config_keeps_falsy_values(tmp_path):
    register()
    from transformers import AutoConfig
    falsy = dict(memory_ffn_dim=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 memory_attention_dropout=0.0, num_memory_layers=0, classifier_dropout=0.0)
    c = tiny_config(**falsy)
    c.save_pretrained(tmp_path)
    c2 = AutoConfig.from_pretrained(tmp_path)
    assert type(c2) is PlugLMConfig
    for k, v in falsy.items():
        assert getattr(c, k) == v and getattr(c2, k) == v, k
    # and the model honours them: no FFN in the memory layer, no dropout anywhere
    m = PlugLMModel(tiny_config(memory_ffn_dim=0, hidden_dropout_prob=0.0))
    assert m.memory_layers()[0].ffn is None
    assert all(mod.p == 0.0 for mod in m.modules() if isinstance(mod, nn.Dropout))


@pytest.mark.parametrize("field,value", [
    ("memory_ffn_dim", -1), ("memory_k", 0), ("key_dim", 0), ("num_memory_layers", 3),
    ("knowledge_attention", "sparse"), ("kernel_backend", "gpu"), ("hidden_dropout_prob", 1.0),
    ("memory_attention_dropout", -0.1), ("doc_max_length", 41), ("num_attention_heads", 5),
    ("memory_k", 2.5),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "num_attention_heads" else "divisible"):
        tiny_config(**{field: value})


# ------------------------------------------------------------------- reference: eval

@pytest.mark.parametrize("attention", ["multi_head", "sentence_level"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_eval_matches_reference(fresh_seed, dtype, attention):
    model = randomize_(PlugLMForMaskedLM(tiny_config(
        knowledge_attention=attention, kernel_backend=BACKEND[dtype]))).to(dtype).eval()
    mem = build_memory(model, stale_noise=0.3)
    model.set_memory(mem)
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_retrieval=True, output_hidden_states=True)
        model64 = copy.deepcopy(model).double()
        ref_h, ref_logits, ref_I = ref_model(model64, ids, mask, _memory_as(mem, torch.float64), False)
    assert_close(out.hidden_states[-1], ref_h, dtype, "last hidden")
    assert_close(out.logits, ref_logits, dtype, "logits")
    assert len(out.retrieval) == 1 and isinstance(out.retrieval[0], PlugLMRetrieval)
    assert torch.equal(out.retrieval[0].indices, ref_I[0])
    assert out.retrieval[0].sources == mem.sources_of(ref_I[0])


# --------------------------------------------------------------- reference: training

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_training_reencode_matches_reference(fresh_seed, dtype):
    """Stale-key search + fresh re-encode: outputs and every parameter gradient match the
    reference; the document encoder (embeddings, embedding LayerNorm, doc pooler, W_k,
    W_v) gets non-zero gradients through the retrieved entries."""
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      memory_attention_dropout=0.0, kernel_backend=BACKEND[dtype],
                      num_hidden_layers=3, num_memory_layers=2)
    model = randomize_(PlugLMForMaskedLM(cfg)).to(dtype)
    # docs longer than the query sequences: position rows T.. get gradient only via the docs
    mem = build_memory(model, M=20, L=13, stale_noise=0.5)
    model.set_memory(mem).train()
    ids, mask = batch(B=5, T=7)
    w = torch.randn(5, 7, cfg.vocab_size, dtype=dtype)

    model64 = copy.deepcopy(model).double()
    ref_h, ref_logits, ref_I = ref_model(model64, ids, mask, _memory_as(mem, torch.float64), True)
    params64 = [p for _, p in model64.named_parameters()]
    ref_grads = torch.autograd.grad((ref_logits * w.double()).sum(), params64, allow_unused=True)

    out = model(ids, attention_mask=mask, output_retrieval=True, output_hidden_states=True)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad((out.logits * w).sum(), params, allow_unused=True)

    assert_close(out.hidden_states[-1], ref_h, dtype, "last hidden")
    assert_close(out.logits, ref_logits, dtype, "logits")
    for r, I in zip(out.retrieval, ref_I):
        assert torch.equal(r.indices, I)  # searched with the stale keys
    for n, p, g, rg in zip(names, params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        rg = torch.zeros_like(p, dtype=torch.float64) if rg is None else rg
        assert_close(g, rg, dtype, f"grad {n}", rtol=GRAD_RTOL[dtype])
    G = dict(zip(names, grads))
    T = ids.shape[1]
    for n in ("bert.knowledge_encoder.key_proj.weight", "bert.knowledge_encoder.key_proj.bias",
              "bert.knowledge_encoder.value_proj.weight", "bert.knowledge_encoder.value_proj.bias",
              "bert.knowledge_encoder.pooler.w1", "bert.knowledge_encoder.pooler.w2",
              "bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight"):
        assert G[n] is not None and G[n].abs().sum() > 0, n
    used_len = int(mem.mask[torch.cat([r.indices for r in out.retrieval]).unique()].sum(1).max())
    assert used_len > T  # some retrieved doc is longer than the queries
    assert G["bert.embeddings.position_embeddings.weight"][T:used_len].abs().sum() > 0


def test_training_without_token_ids_uses_fetch(fresh_seed):
    """A memory without token ids (TensorMemory) trains through whatever fetch returns."""
    model = randomize_(PlugLMForSequenceClassification(tiny_config(num_labels=3))).train()
    keys = torch.randn(20, 16, requires_grad=True)
    values = torch.randn(20, 32, requires_grad=True)
    model.set_memory(TensorMemory(keys, values))
    ids, mask = batch()
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    assert keys.grad.abs().sum() > 0 and values.grad.abs().sum() > 0
    assert model.bert.knowledge_encoder.key_proj.weight.grad is None


def test_live_fetch_dedups_repeats_exactly(fresh_seed):
    model = randomize_(PlugLMModel(tiny_config(kernel_backend="reference"))).double()
    mem = build_memory(model)
    idx = torch.tensor([[3, 7, 3], [7, 7, 0]])
    keys, values = LiveEncodedMemory(mem, model, always=True).fetch(idx)
    rk, rv = model.encode_memory(mem.token_ids[idx].reshape(6, -1), mem.mask[idx].reshape(6, -1))
    assert_close(keys, rk.view(2, 3, -1), torch.float64, "keys")
    assert_close(values, rv.view(2, 3, -1), torch.float64, "values")
    w = model.knowledge_encoder.value_proj.weight
    g1, = torch.autograd.grad(values.sum(), w)
    g2, = torch.autograd.grad(rv.sum(), w)
    assert_close(g1, g2, torch.float64, "grad W_v")


@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32, torch.int64])
def test_encode_memory_token_dtypes(fresh_seed, id_dtype):
    model = randomize_(PlugLMModel(tiny_config())).double()
    model.config.kernel_backend = "reference"
    ids, mask = random_docs(6, 13, 100)
    k, v = model.encode_memory(ids.to(id_dtype), mask)
    P = {"bert." + n: p for n, p in model.named_parameters()}
    rk, rv = ref_encode_docs(P, ids, mask, model.config.layer_norm_eps)
    assert k.shape == (6, 16) and v.shape == (6, 32)
    assert_close(k, rk, torch.float64, "keys")
    assert_close(v, rv, torch.float64, "values")
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_memory(ids, mask[:, :5])


def test_reencode_option_and_memory_without_values(fresh_seed):
    model = randomize_(PlugLMModel(tiny_config(kernel_backend="reference"))).double().eval()
    mem = build_memory(model)
    ids, mask = batch()
    with torch.no_grad():
        stored = model(ids, attention_mask=mask, memory=mem).last_hidden_state
        # values are exactly what the encoder produces, so re-encoding gives the same result
        # up to the cosine bias (fresh keys == stored keys here: no stale noise)
        model.set_memory(mem, reencode=True)
        fresh = model(ids, attention_mask=mask).last_hidden_state
        no_values = IdsMemory(mem.token_ids, mem.mask, mem.keys, None)
        model.set_memory(no_values)
        auto = model(ids, attention_mask=mask).last_hidden_state
    assert_close(fresh, stored, torch.float64, "reencode=True")
    assert_close(auto, stored, torch.float64, "memory without values")
    with pytest.raises(ValueError, match="token_ids_of"):
        model.set_memory(TensorMemory(mem.keys, mem.values), reencode=True)


# ----------------------------------------------------------------------- eval paths

def test_padding_uses_raw_mask(fresh_seed):
    """Padding never leaks: a padded sequence gives the same states on its real tokens as
    the same sequence alone (BatchNorm in eval is per-sequence)."""
    model = randomize_(PlugLMModel(tiny_config())).eval()
    mem = build_memory(model)
    model.set_memory(mem)
    ids, mask = batch(B=3, T=9)
    with torch.no_grad():
        full = model(ids, attention_mask=mask.bool()).last_hidden_state
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, :n]).last_hidden_state
            assert_close(full[b, :n], alone[0], torch.float32, f"seq {b}")


def test_precomputed_tables_path(fresh_seed, monkeypatch):
    model = randomize_(PlugLMForMaskedLM(tiny_config(num_hidden_layers=3, num_memory_layers=2))).eval()
    mem = build_memory(model)
    model.set_memory(mem)
    ids, mask = batch()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        calls = []
        real = pluglm_kernels.gather_knowledge_attention
        monkeypatch.setattr(pluglm_kernels, "gather_knowledge_attention",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        model.precompute_tables()
        fused = model(ids, attention_mask=mask).logits
    assert len(calls) == 2  # one per memory layer
    assert all(layer.tables is not None for layer in model.memory_layers())
    assert_close(fused, plain, torch.float32, "tables vs plain")
    model.release_tables()
    assert all(layer.tables is None for layer in model.memory_layers())


# --------------------------------------------------------------------------- heads

def test_heads_outputs_losses_and_retrieval(fresh_seed):
    cfg = tiny_config(num_labels=3)
    mem = None
    ids, mask = batch()
    B, T = ids.shape
    cases = [
        (PlugLMForMaskedLM, dict(labels=torch.where(mask.bool(), ids, -100)), "logits", (B, T, 100)),
        (PlugLMForSequenceClassification, dict(labels=torch.tensor([0, 2, 1, 1])), "logits", (B, 3)),
        (PlugLMForQuestionAnswering, dict(start_positions=torch.tensor([0, 1, 2, 9]),
                                          end_positions=torch.tensor([1, 2, 3, 4])), "start_logits", (B, T)),
        (PlugLMForTokenClassification, dict(labels=torch.randint(0, 3, (B, T))), "logits", (B, T, 3)),
        (PlugLMModel, {}, "last_hidden_state", (B, T, 32)),
    ]
    for cls, labels, field, shape in cases:
        model = cls(cfg).train()
        if mem is None:
            mem = build_memory(model)
        model.set_memory(mem)
        out = model(ids, attention_mask=mask, output_retrieval=True, **labels)
        assert getattr(out, field).shape == shape, cls.__name__
        if labels:
            assert torch.isfinite(out.loss)
            out.loss.backward()
            assert model.bert.knowledge_encoder.value_proj.weight.grad.abs().sum() > 0
        r = out.retrieval[0]
        assert r.indices.shape == (B, 3) and r.scores.dtype == torch.float32
        assert r.sources == [["wiki"] * 3] * B
        model.eval()
        with torch.no_grad():
            assert model(ids, attention_mask=mask).retrieval is None
            tup = model(ids, attention_mask=mask, return_dict=False, output_retrieval=True, **labels)
        assert isinstance(tup, tuple) and isinstance(tup[-1], tuple)
        assert isinstance(tup[-1][0], PlugLMRetrieval)


def test_regression_and_multilabel_losses(fresh_seed):
    ids, mask = batch()
    for n, labels, kind in ((1, torch.randn(4), "regression"),
                            (3, torch.randint(0, 2, (4, 3)).float(), "multi_label_classification")):
        model = PlugLMForSequenceClassification(tiny_config(num_labels=n))
        model.set_memory(build_memory(model))
        out = model(ids, attention_mask=mask, labels=labels)
        assert torch.isfinite(out.loss) and model.config.problem_type == kind


# ------------------------------------------------------------------- memory plumbing

def test_memory_is_plugged_not_owned(fresh_seed):
    model = PlugLMForMaskedLM(tiny_config()).eval()
    ids, mask = batch()
    with pytest.raises(ValueError, match="set_memory"):
        model(ids, attention_mask=mask)
    mem = build_memory(model)
    before = set(model.state_dict())
    model.set_memory(mem)
    assert model.memory is mem and model.bert.memory is mem
    assert set(model.state_dict()) == before
    assert all(not isinstance(m, IdsMemory) for m in model.modules())
    keys = mem.keys
    model.double()  # .to() leaves the memory alone
    assert mem.keys is keys and mem.keys.dtype == torch.float32
    model.float()
    with torch.no_grad():
        r1 = model(ids, attention_mask=mask, output_retrieval=True).retrieval[0].indices
        other = build_memory(model, M=8)
        r2 = model(ids, attention_mask=mask, output_retrieval=True, memory=other).retrieval[0].indices
    assert int(r2.max()) < 8 and model.memory is mem
    assert r1.shape == r2.shape
    with pytest.raises(TypeError, match="search"):
        model.set_memory(object())


def test_no_memory_layers_is_plain_bert(fresh_seed):
    model = PlugLMModel(tiny_config(num_memory_layers=0)).eval()
    ids, mask = batch()
    out = model(ids, attention_mask=mask, output_retrieval=True)
    assert out.last_hidden_state.shape == (4, 7, 32) and out.retrieval == ()


def test_input_errors():
    model = PlugLMModel(tiny_config())
    model.set_memory(build_memory(model))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 1, 1, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(2, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_convert_sync_batchnorm(fresh_seed):
    model = randomize_(PlugLMForMaskedLM(tiny_config(num_hidden_layers=3, num_memory_layers=2)))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.convert_sync_batchnorm() is model
    bns = [layer.batch_norm for layer in model.memory_layers()]
    assert len(bns) == 2 and all(type(b) is nn.SyncBatchNorm for b in bns)
    assert not any(type(m) is nn.BatchNorm1d for m in model.modules())
    sd2 = model.state_dict()
    assert set(sd2) == set(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    model.set_memory(build_memory(model)).eval()
    ids, mask = batch()
    with torch.no_grad():  # eval SyncBatchNorm uses the running stats and runs anywhere
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


# ------------------------------------------------------------------------ Auto classes

@pytest.mark.parametrize("auto_name,cls", [
    ("AutoModel", PlugLMModel), ("AutoModelForMaskedLM", PlugLMForMaskedLM),
    ("AutoModelForSequenceClassification", PlugLMForSequenceClassification),
    ("AutoModelForQuestionAnswering", PlugLMForQuestionAnswering),
    ("AutoModelForTokenClassification", PlugLMForTokenClassification),
])
def test_auto_roundtrip_bit_exact(tmp_path, fresh_seed, auto_name, cls):
    register()
    import transformers
    auto = getattr(transformers, auto_name)
    cfg = tiny_config(num_labels=3, memory_ffn_dim=0, hidden_dropout_prob=0.0)
    model = randomize_(cls(cfg))
    mem = build_memory(model)
    model.set_memory(mem)
    model.train()
    ids, mask = batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # moves the BatchNorm running stats off their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert loaded.config.memory_ffn_dim == 0 and loaded.config.hidden_dropout_prob == 0.0
    assert loaded.memory is None
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    loaded.set_memory(mem).eval()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, output_retrieval=True)
        b = loaded(ids, attention_mask=mask, output_retrieval=True)
    for fa, fb in zip(a.to_tuple(), b.to_tuple()):
        if isinstance(fa, torch.Tensor):
            assert torch.equal(fa, fb)
    assert torch.equal(a.retrieval[0].indices, b.retrieval[0].indices)


def test_auto_config_and_model_from_config():
    register()
    register()  # idempotent
    from transformers import AutoConfig, AutoModelForMaskedLM
    cfg = AutoConfig.for_model("pluglm", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=48, key_dim=16,
                               max_position_embeddings=40, doc_max_length=13)
    assert isinstance(cfg, PlugLMConfig)
    assert type(AutoModelForMaskedLM.from_config(cfg)) is PlugLMForMaskedLM


def test_init_weights():
    model = PlugLMForMaskedLM(tiny_config())
    layer = model.memory_layers()[0]
    assert torch.equal(layer.knowledge_attention.beta, torch.ones(2))
    assert torch.equal(layer.batch_norm.running_var, torch.ones(16))
    std = model.bert.encoder.layer[0].attention.self.query.weight.std().item()
    assert 0.01 < std < 0.03
    assert model.bert.embeddings.word_embeddings.weight[0].abs().sum() == 0  # pad row
    assert model.cls.predictions.bias.abs().sum() == 0


# ----------------------------------------------------------------------------- explain

def _tokenizer(tmp_path, words):
    from transformers import BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    with open(os.path.join(tmp_path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(str(tmp_path))  # same call on transformers 4.x and 5.x
    assert tok.tokenize("w3 w4") == ["w3", "w4"]
    return tok


def test_explain(tmp_path, fresh_seed):
    words = [f"w{i}" for i in range(90)]
    tok = _tokenizer(tmp_path, words)
    model = randomize_(PlugLMForMaskedLM(tiny_config(num_hidden_layers=3, num_memory_layers=2)))
    texts = [" ".join(words[i:i + 5]) for i in range(0, 80, 4)]  # 20 entries
    enc = tok(texts, padding="max_length", max_length=13, truncation=True, return_tensors="pt")
    with torch.no_grad():
        keys, values = model.encode_memory(enc["input_ids"], enc["attention_mask"])
    mem = IdsMemory(enc["input_ids"].to(torch.int16), enc["attention_mask"], keys, values,
                    texts=texts, sources=["wiki"] * 10 + ["news"] * 10)
    model.set_memory(mem).train()
    queries = ["w3 w4 w5", "w70 w71 w2 w9"]
    res = model.explain(queries, tok, k=4)
    assert model.training  # mode restored
    assert len(res) == 2 and all(len(r) == 2 for r in res)  # per text, per memory layer
    model.eval()
    q_enc = tok(queries, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**q_enc, output_retrieval=True)
    for b in range(2):
        for layer in range(2):
            entries = res[b][layer]
            assert len(entries) == 4
            scores = [e["score"] for e in entries]
            assert scores == sorted(scores, reverse=True)
            for e in entries:
                assert e["text"] == texts[e["index"]]
                assert e["source"] == ("wiki" if e["index"] < 10 else "news")
            # the top memory_k entries are the ones the forward retrieved
            assert [e["index"] for e in entries[:3]] == out.retrieval[layer].indices[b].tolist()
    with pytest.raises(ValueError, match="k must be"):
        model.explain(queries, tok, k=0)


# ---------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("tables", [
    False,
    pytest.param(True, marks=pytest.mark.xfail(
        reason="MemoryLayer._tables_fresh compares data_ptr() (a graph break under dynamo)",
        strict=False)),
], ids=["stored", "tables"])
def test_compile_eval_fullgraph(fresh_seed, tables):
    """The eval forward compiles as one graph (no graph break anywhere, the memory layer's
    search, gather and knowledge attention included)."""
    torch._dynamo.reset()
    model = randomize_(PlugLMForMaskedLM(tiny_config())).eval()
    mem = TensorMemory(torch.randn(20, 16), torch.randn(20, 32))
    model.set_memory(mem)
    if tables:
        model.precompute_tables()
    ids, mask = batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(ids, attention_mask=mask).logits
    assert_close(got, eager, torch.float32, "compiled vs eager")


def test_compile_eval_tables_path_runs(fresh_seed):
    """The precomputed-table eval path compiles (graph breaks allowed) and matches eager."""
    torch._dynamo.reset()
    model = randomize_(PlugLMForMaskedLM(tiny_config())).eval()
    model.set_memory(TensorMemory(torch.randn(20, 16), torch.randn(20, 32))).precompute_tables()
    ids, mask = batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask).logits
    assert_close(got, eager, torch.float32, "compiled vs eager")


def test_knowledge_memory_training_and_eval(tmp_path, fresh_seed):
    """pluglm.memory.KnowledgeMemory plugs in: the same entries give the same loss and every
    gradient as the test's IdsMemory (training re-encodes from its int16 token ids), and
    eval reports its sources."""
    memory_mod = pytest.importorskip("pluglm.memory")
    words = [f"w{i}" for i in range(90)]
    tok = _tokenizer(tmp_path, words)
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      memory_attention_dropout=0.0)
    model = randomize_(PlugLMForMaskedLM(cfg))
    texts = [" ".join(words[i:i + 3 + i % 5]) for i in range(0, 80, 4)]  # 20 entries, lengths vary
    km = memory_mod.KnowledgeMemory.from_texts(texts, tok, source=["wiki"] * 12 + ["news"] * 8,
                                               max_length=cfg.doc_max_length)
    km.encode(model, progress=False)
    assert km.token_ids.dtype == torch.int16
    ids_l, mask_l = km.token_ids_of(torch.arange(20)[None])
    mine = IdsMemory(ids_l[0].to(torch.int16), mask_l[0], km.keys.clone(), km.values.clone())
    ids, mask = batch()
    labels = torch.where(mask.bool(), ids, -100)

    grads = []
    for mem in (km, mine):
        model.set_memory(mem).train()
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, output_retrieval=True)
        out.loss.backward()
        grads.append((out.loss.detach(), out.retrieval[0].indices,
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, i1, g1), (l2, i2, g2) = grads
    assert torch.equal(i1, i2)
    assert_close(l1, l2, torch.float32, "loss")
    assert set(g1) == set(g2)
    for n in g1:
        assert_close(g1[n], g2[n], torch.float32, n, rtol=GRAD_RTOL[torch.float32])
    assert g1["bert.knowledge_encoder.key_proj.weight"].abs().sum() > 0
    model.set_memory(km).eval()
    with torch.no_grad():
        r = model(ids, attention_mask=mask, output_retrieval=True).retrieval[0]
    assert r.sources == km.sources_of(r.indices)


@pytest.mark.parametrize("model_dtype,mem_dtype", [(torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.float32),
                                                   (torch.float32, torch.bfloat16)],
                         ids=["f32-model-f16-mem", "bf16-model-f32-mem", "f32-model-bf16-mem"])
def test_mixed_precision_memory_without_autocast(fresh_seed, model_dtype, mem_dtype):
    """A memory stored in another precision than the model works without autocast (the
    published code needed autocast for fp32 queries against fp16 keys)."""
    model = randomize_(PlugLMForMaskedLM(tiny_config())).eval()
    mem = build_memory(model)
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, memory=mem, output_retrieval=True)
        low = IdsMemory(mem.token_ids, mem.mask, mem.keys.to(mem_dtype), mem.values.to(mem_dtype))
        model.to(model_dtype)
        out = model(ids, attention_mask=mask, memory=low, output_retrieval=True)
        model.train()
        loss = model(ids, attention_mask=mask, memory=low, labels=ids).loss  # re-encode path
    assert out.logits.dtype == model_dtype and torch.isfinite(out.logits).all()
    assert torch.isfinite(loss)
    # rows whose low-precision search hit a near tie may retrieve another set: compare the rest
    same = (out.retrieval[0].indices.sort(1).values == ref.retrieval[0].indices.sort(1).values).all(1)
    assert same.sum() >= 2
    assert rel_err(out.logits[same].float(), ref.logits[same]) < 5e-2
