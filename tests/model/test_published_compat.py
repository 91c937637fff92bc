"""compat="published" and the converter of the published checkpoint (issue 17).

A checkpoint with the published model's parameter names and shapes (BERT geometry shrunk,
random weights) is built here, converted with ``pluglm.convert``, and the converted model
is checked against ``published_forward`` below: an independent re-implementation of what
the published ``RetrievalBertForMaskedLM`` computes, written from a reading of its code and
working on the published state dict directly (float64; eval and train with dropout 0; stale
search + fresh re-encode; every gradient). Then: ``compat="paper"`` and
``compat="published"`` differ by exactly the four documented points — with all four
switched off the two are identical, and each one alone makes a difference.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pluglm import convert
from pluglm.configuration_pluglm import PUBLISHED_DIFFERENCES, PlugLMConfig
from pluglm.modeling_pluglm import PlugLMForMaskedLM
from pluglm.nn import AttentivePool, KnowledgeAttention, TensorMemory

GEOM = dict(V=61, d=24, H=4, L=3, nm=1, key=10, ffn=14, inter=30, P=40, types=2)
M_DOCS, DOC_LEN, K = 37, 11, 3
TOL = 1e-12


# ------------------------------------------------------------------ published checkpoint

def published_names(g=GEOM) -> dict[str, tuple]:
    """Canonical parameter/buffer names and shapes of a published RetrievalBertForMaskedLM
    (word-embedding document encoder, attentive poolers, multi-head knowledge attention,
    query BatchNorm)."""
    V, d, L, nm, key, ffn, inter, P = (g[k] for k in ("V", "d", "L", "nm", "key", "ffn", "inter", "P"))
    s = {"bert.embeddings.word_embeddings.weight": (V, d),
         "bert.embeddings.position_embeddings.weight": (P, d),
         "bert.embeddings.token_type_embeddings.weight": (g["types"], d),
         "bert.embeddings.LayerNorm.weight": (d,), "bert.embeddings.LayerNorm.bias": (d,)}
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[p + f"attention.self.{n}.weight"], s[p + f"attention.self.{n}.bias"] = (d, d), (d,)
        s[p + "attention.output.dense.weight"], s[p + "attention.output.dense.bias"] = (d, d), (d,)
        s[p + "attention.output.LayerNorm.weight"] = s[p + "attention.output.LayerNorm.bias"] = (d,)
        if i < L - nm:
            s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (inter, d), (inter,)
            s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (d, inter), (d,)
            s[p + "output.LayerNorm.weight"] = s[p + "output.LayerNorm.bias"] = (d,)
            continue
        s[p + "ffn.0.weight"], s[p + "ffn.0.bias"] = (ffn, d), (ffn,)
        s[p + "ffn.1.weight"], s[p + "ffn.1.bias"] = (d, ffn), (d,)
        s[p + "LayerNorm.weight"] = s[p + "LayerNorm.bias"] = (d,)
        m = p + "memory_layer."
        s[m + "pooler.pooler.att_fc1.weight"], s[m + "pooler.pooler.att_fc1.bias"] = (d, d), (d,)
        s[m + "pooler.pooler.att_fc2.weight"], s[m + "pooler.pooler.att_fc2.bias"] = (1, d), (1,)
        s[m + "know_attn.beta"] = (g["H"],)
        for n in ("q", "k", "v", "out"):
            s[m + f"know_attn.biased_multihead_attn.{n}_proj.weight"] = (d, d)
            s[m + f"know_attn.biased_multihead_attn.{n}_proj.bias"] = (d,)
        s[m + "query_proj.weight"], s[m + "query_proj.bias"] = (key, d), (key,)
        for n in ("weight", "bias", "running_mean", "running_var"):
            s[m + f"batch_norm.{n}"] = (key,)
        s[m + "batch_norm.num_batches_tracked"] = ()
    r = "bert.encoder.retriever."
    s[r + "key_proj.weight"], s[r + "key_proj.bias"] = (key, d), (key,)
    s[r + "value_proj.weight"], s[r + "value_proj.bias"] = (d, d), (d,)
    s[r + "document_encoder.pooler.pooler.att_fc1.weight"] = (d, d)
    s[r + "document_encoder.pooler.pooler.att_fc1.bias"] = (d,)
    s[r + "document_encoder.pooler.pooler.att_fc2.weight"] = (1, d)
    s[r + "document_encoder.pooler.pooler.att_fc2.bias"] = (1,)
    s["cls.predictions.bias"] = (V,)
    s["cls.predictions.transform.dense.weight"], s["cls.predictions.transform.dense.bias"] = (d, d), (d,)
    s["cls.predictions.transform.LayerNorm.weight"] = s["cls.predictions.transform.LayerNorm.bias"] = (d,)
    s["cls.predictions.decoder.weight"] = (V, d)
    return s


def random_published(seed: int, g=GEOM, *, aliases=True, position_ids=False) -> dict:
    """Random float64 weights under the published names; with ``aliases`` also the copies
    its state_dict() holds (shared retriever under each memory layer, shared embedding
    under the document encoder, the decoder's bias alias)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in published_names(g).items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7, dtype=torch.int64)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        elif name.endswith(("LayerNorm.weight", "batch_norm.weight", "know_attn.beta")):
            sd[name] = 1.0 + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            sd[name] = 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if aliases:
        for name in list(sd):
            if name.startswith("bert.encoder.retriever."):
                for i in range(g["L"] - g["nm"], g["L"]):
                    sd[f"bert.encoder.layer.{i}.memory_layer.retriever." + name[len("bert.encoder.retriever."):]] = sd[name]
            if name.startswith("bert.embeddings."):
                tail = name[len("bert.embeddings."):]
                sd["bert.encoder.retriever.document_encoder.embedding." + tail] = sd[name]
                for i in range(g["L"] - g["nm"], g["L"]):
                    sd[f"bert.encoder.layer.{i}.memory_layer.retriever.document_encoder.embedding." + tail] = sd[name]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    if position_ids:
        sd["bert.embeddings.position_ids"] = torch.arange(g["P"])[None]
    return sd


def random_docs(seed: int, M=M_DOCS, Ld=DOC_LEN, V=GEOM["V"]) -> np.ndarray:
    """Knowledge base as the published tokenized_wiki.npy holds it: ids padded with 0."""
    rng = np.random.default_rng(seed)
    docs = np.zeros((M, Ld), dtype=np.int16)
    for i in range(M):
        n = int(rng.integers(1, Ld + 1))
        docs[i, :n] = rng.integers(1, V, size=n)
    return docs


# ------------------------------------------------------ the published forward, re-written

def published_forward(P, ids, mask, stale_keys, docs, *, train, k=K, g=GEOM):
    """What the published RetrievalBertForMaskedLM computes (dropout 0), on its own state
    dict ``P`` (canonical names). Returns (logits [B, T, V], retrieved ids per memory layer).

    Read from their src/modeling.py: BERT embeddings and layers; a memory layer pools the
    attention output with exp(s) * mask / (sum + 1e-8), projects and batch-normalises the
    query, takes the top-k of query . stale key, re-embeds the retrieved token rows with the
    shared embedding module (mask = ids != 0), pools them the same way, projects keys and
    values, biases each head's logits with beta_h * cos(query, key), and turns the
    head-major [B*H, T, Dh] attention output into [B, T, d] with a plain reshape."""
    d, H, L, nm = g["d"], g["H"], g["L"], g["nm"]
    Dh = d // H
    eps_ln = 1e-12

    def lin(x, n):
        return x @ P[n + ".weight"].T + P[n + ".bias"]

    def ln(x, n):
        return F.layer_norm(x, (d,), P[n + ".weight"], P[n + ".bias"], eps_ln)

    def embed(t):
        x = (P["bert.embeddings.word_embeddings.weight"][t]
             + P["bert.embeddings.token_type_embeddings.weight"][torch.zeros_like(t)]
             + P["bert.embeddings.position_embeddings.weight"][torch.arange(t.shape[1])][None])
        return ln(x, "bert.embeddings.LayerNorm")

    def pool(x, m, n):
        w = torch.exp(lin(torch.tanh(lin(x, n + ".att_fc1")), n + ".att_fc2"))  # [B, T, 1]
        w = w * m[..., None]
        w = w / (w.sum(1, keepdim=True) + 1e-8)
        return torch.bmm(x.transpose(1, 2), w).reshape(x.shape[0], -1)

    B, T = ids.shape
    x = embed(ids)
    ext = (1.0 - mask[:, None, None, :].double()) * -10000.0  # [B, 1, 1, T]
    retrieved = []
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        q, kk, v = (lin(x, p + f"attention.self.{n}").view(B, T, H, Dh).transpose(1, 2)
                    for n in ("query", "key", "value"))
        s = q @ kk.transpose(-1, -2) / math.sqrt(Dh) + ext
        ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, d)
        a = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        if i < L - nm:
            x = ln(lin(F.gelu(lin(a, p + "intermediate.dense")), p + "output.dense") + a,
                   p + "output.LayerNorm")
            continue
        m = p + "memory_layer."
        m01 = 1 - ext.squeeze(1).squeeze(1) / -10000.0
        qy = lin(pool(a, m01, m + "pooler.pooler"), m + "query_proj")
        qy = F.batch_norm(qy, P[m + "batch_norm.running_mean"].clone(),
                          P[m + "batch_norm.running_var"].clone(), P[m + "batch_norm.weight"],
                          P[m + "batch_norm.bias"], training=train, momentum=0.1, eps=1e-5)
        _, I = torch.topk(qy.detach() @ stale_keys.T, k)  # [B, k]
        retrieved.append(I)
        dt = docs[I.reshape(-1)]  # [B*k, Ld]
        de = pool(embed(dt), (dt != 0).double(), "bert.encoder.retriever.document_encoder.pooler.pooler")
        key = lin(de, "bert.encoder.retriever.key_proj").view(B, k, -1)
        val = lin(de, "bert.encoder.retriever.value_proj").view(B, k, -1)
        sim = F.cosine_similarity(qy[:, None, :], key, dim=-1)  # [B, k]
        bias = (P[m + "know_attn.beta"][None, :, None, None].expand(B, H, T, k)
                * sim[:, None, None, :].expand(B, H, T, k))  # [B, H, T, k]
        mha = m + "know_attn.biased_multihead_attn."
        qs = (lin(a, mha + "q_proj") * Dh ** -0.5).view(B, T, H, Dh).transpose(1, 2).reshape(B * H, T, Dh)
        ks = lin(val, mha + "k_proj").view(B, k, H, Dh).transpose(1, 2).reshape(B * H, k, Dh)
        vs = lin(val, mha + "v_proj").view(B, k, H, Dh).transpose(1, 2).reshape(B * H, k, Dh)
        w = torch.softmax(torch.bmm(qs, ks.transpose(1, 2)) + bias.reshape(B * H, T, k), -1)
        mem = lin(torch.bmm(w, vs).reshape(B, T, d), mha + "out_proj")
        f = lin(F.gelu(lin(a, p + "ffn.0")), p + "ffn.1")
        x = ln(a + f + mem, p + "LayerNorm")
    t = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    return t @ P["cls.predictions.decoder.weight"].T + P["cls.predictions.bias"], retrieved


# ------------------------------------------------------------------------------ helpers

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def converted(sd, **over):
    over = {"kernel_backend": "reference", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "memory_attention_dropout": 0.0,
            "memory_k": K, **over}
    model, _ = convert.from_published(dict(sd), **over)
    return model


def memory_with_stale_keys(docs, seed):
    mem = convert.knowledge_memory_from_token_ids(docs, vocab_size=GEOM["V"], chunk_rows=8)
    gen = torch.Generator().manual_seed(seed)
    mem.set_keys(torch.randn(len(mem), GEOM["key"], generator=gen))  # "stale": any old encoder
    return mem


def batch(seed, B=4, T=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, GEOM["V"], (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return ids, mask


# -------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_model_matches_published_forward_and_gradients(train):
    seed = int(torch.randint(0, 2**31, ()))
    sd = random_published(seed)
    model = converted(sd)
    assert model.config.compat == "published"
    assert model.config.published_differences == frozenset(PUBLISHED_DIFFERENCES)
    docs = random_docs(seed)
    mem = memory_with_stale_keys(docs, seed + 1)
    model.set_memory(mem, reencode=True)  # the published model re-encodes in eval too
    model.train(train)
    ids, mask = batch(seed)

    P = {n: t.clone().requires_grad_(t.is_floating_point() and "running" not in n)
         for n, t in random_published(seed, aliases=False).items()}
    stale = mem.keys.double()
    ref, ref_I = published_forward(P, ids, mask, stale, torch.from_numpy(docs.astype(np.int64)),
                                   train=train)
    out = model(ids, attention_mask=mask, output_retrieval=True)
    assert [r.indices.tolist() for r in out.retrieval] == [I.tolist() for I in ref_I]
    assert rel(out.logits, ref) < TOL

    w = torch.randn(ref.shape, dtype=torch.float64)
    (ref * w).sum().backward()
    (out.logits * w).sum().backward()
    checked = 0
    # some gradients are exactly zero in exact arithmetic (self-attention key bias): those
    # are compared to the scale of the whole gradient
    scale = max(t.grad.norm().item() for t in P.values() if t.grad is not None)
    for name, p in model.named_parameters():
        pub = convert._published_name(name)
        g_ref = P[pub].grad
        assert g_ref is not None, pub
        g = p.grad.reshape(g_ref.shape) if p.grad is not None else torch.zeros_like(g_ref)
        err = (g - g_ref).norm().item()
        assert err <= 1e-10 * g_ref.norm().item() + 1e-13 * scale, f"grad {name} <- {pub}: {err:.2e}"
        checked += 1
    assert checked == sum(1 for t in P.values() if t.requires_grad)
    # the published pooling gives its output bias a gradient (the exact softmax would not)
    assert model.bert.knowledge_encoder.pooler.b2.grad.abs().item() > 0


def test_converted_memory_and_checkpoint_round_trip(tmp_path):
    """The converter with a knowledge base: memory encoded by the converted model, checkpoint
    loadable through the Auto classes in compat="published", same outputs."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from pluglm import KnowledgeMemory
    from pluglm.auto import register

    register()
    seed = int(torch.randint(0, 2**31, ()))
    sd = random_published(seed, position_ids=True)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "step": 8000}, tmp_path / "ckpt.pt")
    docs = random_docs(seed)
    np.save(tmp_path / "wiki.npy", docs)
    model, mem = convert.from_published(tmp_path / "ckpt.pt", tmp_path / "out", knowledge=tmp_path / "wiki.npy",
                                        progress=False, chunk_rows=5, memory_k=K,
                                        kernel_backend="reference")
    assert AutoConfig.from_pretrained(tmp_path / "out").compat == "published"
    assert model.config.doc_max_length == DOC_LEN
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(loaded) is PlugLMForMaskedLM and loaded.cls.predictions.decoder is not None
    # loaded untied, with the published decoder (not tied to the word embeddings on load)
    assert torch.equal(loaded.cls.predictions.decoder.weight, sd["cls.predictions.decoder.weight"])
    assert not torch.equal(loaded.cls.predictions.decoder.weight,
                           loaded.bert.embeddings.word_embeddings.weight)
    mem2 = KnowledgeMemory.load(tmp_path / "out" / "memory")
    assert len(mem2) == M_DOCS and mem2.lengths.tolist() == (docs != 0).sum(1).tolist()
    # keys and values are what the converted model encodes
    ids = torch.from_numpy(docs.astype(np.int64))
    with torch.no_grad():
        k_ref, v_ref = model.encode_memory(ids, (ids != 0).long())
    assert rel(mem2.keys, k_ref) < 1e-6 and rel(mem2.values, v_ref) < 1e-6  # stored as float32
    ids, mask = batch(seed)
    loaded.set_memory(mem2, reencode=True)
    model.set_memory(mem, reencode=True)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = loaded(ids, attention_mask=mask).logits
        # fast path: stored (float32) keys and values instead of re-encoding
        loaded.set_memory(mem2)
        c = loaded(ids, attention_mask=mask).logits
    assert rel(b, a) < TOL
    assert rel(c, a) < 1e-5


def test_cli_convert_published(tmp_path, capsys):
    from pluglm import KnowledgeMemory
    from pluglm.cli import main

    sd = random_published(3)
    torch.save(sd, tmp_path / "ckpt.pt")
    docs = random_docs(3)
    np.save(tmp_path / "wiki.npy", docs)
    # a vocabulary file like the published vocab/vocab: one token per line
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, GEOM["V"])]
    (tmp_path / "vocab").write_text("\n".join(words) + "\n")
    rc = main(["convert-published", str(tmp_path / "ckpt.pt"), "--knowledge", str(tmp_path / "wiki.npy"),
               "--out", str(tmp_path / "out"), "--no-progress", "--memory-k", "2",
               "--tokenizer", str(tmp_path / "vocab")])
    assert rc == 0, capsys.readouterr().err
    assert "37 memory entries" in capsys.readouterr().out
    assert PlugLMConfig.from_pretrained(tmp_path / "out").memory_k == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()
    mem = KnowledgeMemory.load(tmp_path / "out" / "memory")
    expect = " ".join(words[i] for i in docs[6] if i > 4)
    assert mem.texts_of(torch.tensor([6]))[0] == expect


def test_converter_fails_loudly(tmp_path, capsys):
    sd = random_published(5)
    with pytest.raises(convert.PublishedCheckpointError, match="seq_relationship.weight .* has no counterpart"):
        convert.from_published({**sd, "cls.seq_relationship.weight": torch.zeros(2, GEOM["d"])})
    missing = dict(sd)
    del missing["cls.predictions.decoder.weight"]
    with pytest.raises(convert.PublishedCheckpointError, match="no published tensor for cls.predictions.decoder"):
        convert.from_published(missing)
    bad_alias = dict(sd)
    name = "bert.encoder.layer.2.memory_layer.retriever.key_proj.weight"
    bad_alias[name] = bad_alias[name] + 1
    with pytest.raises(convert.PublishedCheckpointError, match="should be the same tensor"):
        convert.from_published(bad_alias)
    bad_shape = {**sd, "bert.encoder.retriever.value_proj.bias": torch.zeros(GEOM["d"] + 1)}
    with pytest.raises(convert.PublishedCheckpointError, match="value_proj.bias has shape"):
        convert.from_published(bad_shape)
    bad_buf = {**sd, "bert.embeddings.position_ids": torch.arange(GEOM["P"])[None].flip(1)}
    with pytest.raises(convert.PublishedCheckpointError, match="constant value"):
        convert.from_published(bad_buf)
    # a pickle holding an arbitrary object is refused, never unpickled
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pt")
    with pytest.raises(convert.PublishedCheckpointError, match="weights_only=True"):
        convert.from_published(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(convert.PublishedCheckpointError, match="not a plain .npy"):
        convert.from_published(tmp_path / "ok.pt", knowledge=tmp_path / "obj.npy")
    inner_pad = random_docs(5)
    inner_pad[4, :3] = [5, 0, 7]
    np.save(tmp_path / "pad.npy", inner_pad)
    with pytest.raises(convert.PublishedCheckpointError, match="entry 4 has pad id 0"):
        convert.from_published(tmp_path / "ok.pt", knowledge=tmp_path / "pad.npy")
    from pluglm.cli import main

    assert main(["convert-published", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")]) == 1
    assert "weights_only=True" in capsys.readouterr().err


# ------------------------------------------- paper vs published: exactly the four points

def pair(off: tuple, seed: int, **over):
    """A paper model and a published one with the differences in ``off`` switched off,
    with the same weights (the untied decoder gets a copy of the word embeddings plus noise)."""
    base = dict(vocab_size=GEOM["V"], hidden_size=GEOM["d"], num_hidden_layers=2,
                num_attention_heads=GEOM["H"], intermediate_size=20, max_position_embeddings=32,
                num_memory_layers=1, memory_k=K, key_dim=GEOM["key"], doc_max_length=DOC_LEN,
                memory_ffn_dim=12, kernel_backend="reference", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, memory_attention_dropout=0.0)
    base.update(over)
    torch.manual_seed(seed)
    paper = PlugLMForMaskedLM(PlugLMConfig(**base)).double()
    with torch.no_grad():  # make the pooler output biases matter to the published pooling
        for m in paper.modules():
            if isinstance(m, AttentivePool):
                m.b2.fill_(-17.0)
    cfg = PlugLMConfig(**base, compat="published")
    cfg._published_off = off
    pub = PlugLMForMaskedLM(cfg).double()
    missing, unexpected = pub.load_state_dict(paper.state_dict(), strict=False)
    assert not unexpected
    if pub.cls.predictions.decoder is not None:
        assert missing == ["cls.predictions.decoder.weight"]
        with torch.no_grad():
            w = paper.bert.embeddings.word_embeddings.weight
            pub.cls.predictions.decoder.weight.copy_(w + 0.1 * torch.randn_like(w))
    else:
        assert not missing
    return paper, pub


def run_pair(paper, pub, seed, *, train):
    docs = torch.from_numpy(random_docs(seed).astype(np.int64))
    mem = TensorMemory(torch.randn(docs.shape[0], GEOM["key"], dtype=torch.float64),
                       torch.zeros(docs.shape[0], GEOM["d"], dtype=torch.float64))
    mem.token_ids_of = lambda idx: (docs[idx], (docs[idx] != 0).long())
    ids, mask = batch(seed)
    outs = []
    for model in (paper, pub):
        model.set_memory(mem, reencode=True)
        model.train(train)
        torch.manual_seed(seed)
        logits = model(ids, attention_mask=mask).logits
        logits.sum().backward()
        outs.append(logits.detach())
    return outs


@pytest.mark.parametrize("only", [None, *PUBLISHED_DIFFERENCES])
def test_paper_and_published_differ_by_exactly_the_four_points(only):
    """only=None: all four switched off -> identical to paper (bit for bit, gradients too).
    only=X: X alone -> a difference that X accounts for."""
    seed = int(torch.randint(0, 2**31, ()))
    off = tuple(x for x in PUBLISHED_DIFFERENCES if x != only)
    over = {"hidden_dropout_prob": 0.2} if only in (None, "reencode_dropout") else {}
    paper, pub = pair(off, seed, **over)
    assert pub.config.published_differences == (frozenset() if only is None else {only})
    a, b = run_pair(paper, pub, seed, train=True)
    if only is None:
        assert torch.equal(a, b)
        for (n, p), q in zip(paper.named_parameters(), pub.parameters()):
            assert torch.equal(p.grad, q.grad), n
        return
    assert rel(b, a) > 1e-8  # float64 rounding would be ~1e-16
    if only == "pool_denominator":
        # the published denominator alone gives the pooler output biases a gradient
        b2 = [m.b2.grad.abs().item() for m in paper.modules() if isinstance(m, AttentivePool)]
        b2p = [m.b2.grad.abs().item() for m in pub.modules() if isinstance(m, AttentivePool)]
        assert max(b2) < 1e-12 < min(b2p)


def test_head_major_output_is_the_published_permutation_on_every_path():
    """head_major_output=True == the plain reshape of the head-major output, for the fused
    op, the gathered-table path and each CPU backend."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    B, T, N, d, H = 3, 7, 4, GEOM["d"], GEOM["H"]
    for backend in ("reference", "cpu", "auto"):
        dtype = torch.float64 if backend == "reference" else torch.float32
        ka = KnowledgeAttention(d, H, dropout=0.0, backend=backend, head_major_output=True).to(dtype)
        plain = KnowledgeAttention(d, H, dropout=0.0, backend=backend).to(dtype)
        plain.load_state_dict(ka.state_dict())
        hidden = torch.randn(B, T, d, dtype=dtype)
        values = torch.randn(B, N, d, dtype=dtype)
        bias = torch.randn(B, N, dtype=dtype)
        captured = {}
        h = plain.out_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
        plain(hidden, values, bias)
        h.remove()
        per_token = captured["x"].view(B, T, H, d // H)  # [B, T, H, Dh]
        expect = plain.out_proj(per_token.transpose(1, 2).reshape(B, T, d))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel(ka(hidden, values, bias), expect) < tol, backend
        M = 9
        table = torch.randn(M, d, dtype=dtype)
        idx = torch.randint(0, M, (B, N))
        tk, tv = ka.project_tables(table)
        with torch.no_grad():
            assert rel(ka.forward_gathered(hidden, tk, tv, idx, bias), ka(hidden, table[idx], bias)) < tol


def test_published_pooling_formula_and_no_overflow():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    pool = AttentivePool(GEOM["d"], denominator_eps=1e-8).double()
    x = torch.randn(5, 6, GEOM["d"], dtype=torch.float64)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[2, 4:] = 0
    mask[4] = 0
    s = torch.tanh(x @ pool.w1.T + pool.b1) @ pool.w2 + pool.b2
    e = torch.exp(s) * mask
    expect = (e[..., None] * x).sum(1) / (e.sum(1, keepdim=True) + 1e-8)
    assert rel(pool(x, mask), expect) < 1e-14
    assert pool(x, mask)[4].abs().max() == 0  # no token: zeros, as published
    with torch.no_grad():  # scores where the published raw exp overflows in float32
        pool.b2.fill_(200.0)
    out = pool.float()(x.float(), mask)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="denominator_eps"):
        AttentivePool(8, denominator_eps=0.0)
    with pytest.raises(ValueError, match="compat"):
        PlugLMConfig(compat="original")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_model_float32_auto_backend_matches(train):
    """The same check in float32 on the fastest built kernels ("auto": C++ CPU here)."""
    seed = int(torch.randint(0, 2**31, ()))
    sd = random_published(seed)
    model = converted({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                      kernel_backend="auto")
    assert next(model.parameters()).dtype == torch.float32
    docs = random_docs(seed)
    mem = memory_with_stale_keys(docs, seed + 1)
    model.set_memory(mem, reencode=True)
    model.train(train)
    ids, mask = batch(seed)
    ref, ref_I = published_forward(random_published(seed, aliases=False), ids, mask, mem.keys.double(),
                                   torch.from_numpy(docs.astype(np.int64)), train=train)
    out = model(ids, attention_mask=mask, output_retrieval=True)
    assert [r.indices.tolist() for r in out.retrieval] == [I.tolist() for I in ref_I]
    assert rel(out.logits, ref) < 1e-5


def test_reencode_dropout_only_in_the_training_reencode():
    """Published point 3: the embedding dropout hits the training re-encode of retrieved
    entries (one mask per retrieved slot), never encode_memory or the refresher's encoder."""
    from pluglm.modeling_pluglm import _TrainingReencoder
    from pluglm.nn import LiveEncodedMemory
    from pluglm.refresh import snapshot_encoder

    seed = int(torch.randint(0, 2**31, ()))
    model = converted(random_published(seed), hidden_dropout_prob=0.5)
    docs = torch.from_numpy(random_docs(seed).astype(np.int64))
    mem = convert.knowledge_memory_from_token_ids(docs.numpy(), vocab_size=GEOM["V"])
    idx = torch.tensor([[0, 3, 3], [5, 0, 1]])  # a repeated entry: two slots, two masks
    ids, m = docs[idx.reshape(-1)], (docs[idx.reshape(-1)] != 0).long()
    model.eval()
    with torch.no_grad():
        k_eval, v_eval = model.encode_memory(ids, m)
        live = LiveEncodedMemory(mem, _TrainingReencoder(model.bert), always=True)
        k_live, _ = live.fetch(idx)
        assert rel(k_live.reshape(-1, GEOM["key"]), k_eval) < TOL
        model.train()
        k_train, v_train = model.encode_memory(ids, m)  # refresh / encode: never dropout
        assert torch.equal(k_train, k_eval) and torch.equal(v_train, v_eval)
        assert torch.equal(snapshot_encoder(model).encode_memory(ids, m)[0], k_eval)
        k1, _ = live.fetch(idx)
        k2, _ = live.fetch(idx)
    assert rel(k1, k_live) > 1e-3 and rel(k2, k1) > 1e-3
    assert not torch.equal(k1[0, 1], k1[0, 2])  # the repeated entry got its own mask


def test_published_eval_compiles_fullgraph():
    """compat="published" adds no graph break: the eval forward compiles as one graph."""
    torch._dynamo.reset()
    seed = int(torch.randint(0, 2**31, ()))
    model = converted({k: v.float() if v.is_floating_point() else v
                       for k, v in random_published(seed).items()}, kernel_backend="auto").eval()
    gen = torch.Generator().manual_seed(seed)
    model.set_memory(TensorMemory(torch.randn(20, GEOM["key"], generator=gen),
                                  torch.randn(20, GEOM["d"], generator=gen)))
    ids, mask = batch(seed)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, attention_mask=mask).logits
    assert rel(got, eager) < 1e-5
