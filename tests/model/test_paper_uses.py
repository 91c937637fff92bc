"""The three uses of a plug-in memory from the PlugLM paper, as API tests (issue 5 item 4):
domain adaptation (plug an extra domain memory in, no training), knowledge update (add /
replace / remove entries: retrieval changes, every parameter and buffer unchanged) and
in-task knowledge (labelled examples become entries with ``add_examples``).

To make retrieval checkable without training, the model is a hand-built "retriever": one
memory layer over the embeddings (attention output zeroed so A = the embedded tokens),
uniform attentive pooling on both sides, position / type / special-token embeddings zeroed
and W_q = W_k orthogonal. Then q . k_i ~ (mean LN(word) of the query) . (mean LN(word) of
entry i): a query retrieves the entry that shares its words, by a wide margin (random
128-d word vectors are nearly orthogonal), whatever the fresh random seed. Keys and values
come from the real pipeline: ``KnowledgeMemory.encode(model)`` -> ``model.encode_memory``.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from pluglm.configuration_pluglm import PlugLMConfig
from pluglm.modeling_pluglm import PlugLMModel

memory_mod = pytest.importorskip("pluglm.memory")
KnowledgeMemory = memory_mod.KnowledgeMemory

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ([f"g{i}" for i in range(60)] + [f"d{i}" for i in range(40)] + [f"n{i}" for i in range(8)]
         + [f"e{i}" for i in range(12)] + ["it", "was", "good", "bad", "."])
GENERAL = [" ".join(f"g{4 * i + j}" for j in range(4)) for i in range(15)]
DOMAIN = [" ".join(f"d{4 * i + j}" for j in range(4)) for i in range(10)]
MAX_LEN = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import BertTokenizer
    d = tmp_path_factory.mktemp("vocab")
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    # from_pretrained(dir) reads vocab.txt the same way on transformers 4.x and 5.x (the
    # constructor's argument was renamed vocab_file -> vocab)
    return BertTokenizer.from_pretrained(str(d))


def retriever_model() -> PlugLMModel:
    cfg = PlugLMConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=128, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                       num_memory_layers=1, memory_k=3, key_dim=128, doc_max_length=MAX_LEN,
                       memory_ffn_dim=32)
    model = PlugLMModel(cfg).eval()
    layer = model.memory_layers()[0]
    emb = model.embeddings
    with torch.no_grad():
        emb.word_embeddings.weight.normal_()
        emb.word_embeddings.weight[:len(SPECIAL)] = 0  # LN(0) = 0: special tokens carry nothing
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        out = model.encoder.layer[0].attention.output.dense
        out.weight.zero_()
        out.bias.zero_()
        for pool in (layer.pooler, model.knowledge_encoder.pooler):
            pool.w2.zero_()  # uniform weights over the real tokens
            pool.b2.zero_()
        W = torch.linalg.qr(torch.randn(128, 128)).Q
        for lin in (layer.query_proj, model.knowledge_encoder.key_proj):
            lin.weight.copy_(W)
            lin.bias.zero_()
    return model


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def retrieve(model, tok, queries):
    enc = tok(queries, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_retrieval=True)
    r = out.retrieval[0]
    return r.indices, r.sources, out.last_hidden_state


def test_domain_adaptation_plugs_a_domain_memory_without_training(tok):
    model = retriever_model()
    general = KnowledgeMemory.from_texts(GENERAL, tok, source="wiki", max_length=MAX_LEN)
    general.encode(model, progress=False)
    model.set_memory(general)
    h0 = state_hash(model)

    domain_q = ["d5 d6 d7", "d20 d21 d22"]  # words of domain entries 1 and 5
    general_q = ["g0 g1 g2", "g41 g42 g43"]  # words of general entries 0 and 10
    idx, src, before = retrieve(model, tok, domain_q)
    assert all(s == "wiki" for row in src for s in row)
    gi, _, _ = retrieve(model, tok, general_q)
    assert gi[:, 0].tolist() == [0, 10]

    domain = KnowledgeMemory.from_texts(DOMAIN, tok, source="medical", max_length=MAX_LEN)
    domain.encode(model, progress=False)
    combined = KnowledgeMemory.concat([general, domain])  # domain ids offset by 15
    model.set_memory(combined)

    idx, src, after = retrieve(model, tok, domain_q)
    assert idx[:, 0].tolist() == [15 + 1, 15 + 5]
    assert [row[0] for row in src] == ["medical", "medical"]
    assert not torch.allclose(before, after)  # the domain knowledge reaches the output
    gi, gsrc, _ = retrieve(model, tok, general_q)
    assert gi[:, 0].tolist() == [0, 10] and [row[0] for row in gsrc] == ["wiki", "wiki"]
    top = model.explain(domain_q, tok, k=2)
    assert [t[0][0]["text"] for t in top] == [DOMAIN[1], DOMAIN[5]]
    assert state_hash(model) == h0  # no parameter or buffer changed


def test_knowledge_update_changes_retrieval_not_parameters(tok):
    model = retriever_model()
    mem = KnowledgeMemory.from_texts(GENERAL, tok, source="wiki", max_length=MAX_LEN)
    mem.encode(model, progress=False)
    model.set_memory(mem)
    h0 = state_hash(model)
    assert retrieve(model, tok, ["g1 g2 g3"])[0][0, 0] == 0
    enc = tok(["g1 g2 g3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        s_before = model(**enc, output_retrieval=True).retrieval[0].scores[0, 0]

    # replace entry 0's knowledge
    mem.update([0], ["n0 n1 n2 n3"])
    mem.encode(model, only_stale=True, progress=False)
    assert retrieve(model, tok, ["n0 n1 n2"])[0][0, 0] == 0
    assert mem.texts_of(torch.tensor([[0]])) == [["n0 n1 n2 n3"]]
    # the old knowledge is gone: no entry shares a word with the query any more, so whatever
    # comes first now scores far below the margin the old entry 0 had
    enc = tok(["g1 g2 g3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        s_after = model(**enc, output_retrieval=True).retrieval[0].scores[0, 0]
    assert s_after < 0.5 * s_before

    # add a new entry, from another source
    ids = mem.add(["n4 n5 n6 n7"], source="news")
    mem.encode(model, only_stale=True, progress=False)
    idx, src, _ = retrieve(model, tok, ["n4 n5 n6"])
    assert idx[0, 0] == ids[0] and src[0][0] == "news"

    # remove it: never retrieved again
    mem.remove(ids)
    assert ids[0] not in retrieve(model, tok, ["n4 n5 n6"])[0][0].tolist()

    # the precomputed-table inference path sees the edits too
    plain = retrieve(model, tok, ["n0 n1 n2", "g5 g6 g7"])[2]
    model.precompute_tables()
    mem.update([1], ["n4 n5 n6 n7"])
    mem.encode(model, only_stale=True, progress=False)
    with_tables = retrieve(model, tok, ["n4 n5 n6", "g5 g6 g7"])
    model.release_tables()
    without = retrieve(model, tok, ["n4 n5 n6", "g5 g6 g7"])
    assert with_tables[0][0, 0] == 1
    assert torch.equal(with_tables[0], without[0])
    assert torch.allclose(with_tables[2], without[2], atol=1e-5, rtol=1e-5)
    assert plain.shape == without[2].shape

    assert state_hash(model) == h0


def test_in_task_knowledge_examples_become_entries(tok):
    model = retriever_model()
    mem = KnowledgeMemory.from_texts(GENERAL, tok, source="wiki", max_length=MAX_LEN)
    examples = ["e0 e1 e2", "e3 e4 e5", "e6 e7 e8", "e9 e10 e11"]
    ids = mem.add_examples(examples, [1, 0, 1, 0], template="{text} it was {label}.",
                           label_names=["bad", "good"], tokenizer=tok)
    assert ids.tolist() == [15, 16, 17, 18]
    mem.encode(model, progress=False)
    model.set_memory(mem)
    h0 = state_hash(model)
    idx, src, _ = retrieve(model, tok, ["e3 e4 e5", "e6 e7 e8"])
    assert idx[:, 0].tolist() == [16, 17]
    assert [row[0] for row in src] == ["examples", "examples"]
    texts = mem.texts_of(idx[:, :1])
    assert texts == [["e3 e4 e5 it was bad."], ["e6 e7 e8 it was good."]]
    assert state_hash(model) == h0
