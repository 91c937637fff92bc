"""PlugLMConfig.doc_position_embeddings=False: entries pooled without positions.

The document encoder is then a function of the entry's multiset of words (docs/design.md §1):
checked against a float64 formula of its own, on every path the model encodes through
(training with gradients, inference through the precomputed tables, inference through the
pooler's matmul, a refresh snapshot), for word-order invariance, for the gradient (none
reaches the position table from an entry), for save / load and dtype casts, and for the
argument checks.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import rel_err


def _model(**kw):
    from pluglm import PlugLMConfig, PlugLMModel

    cfg = PlugLMConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=40, key_dim=16,
                       doc_max_length=23, **kw)
    return PlugLMModel(cfg, add_pooling_layer=False)


def _entries(seed, E=7, T=23):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (E, T), generator=g)
    lens = torch.randint(1, T + 1, (E,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    mask[:2] = 1  # two whole entries (the word-order check permutes them)
    return ids, mask


def _expected(model, ids, mask):
    """Keys and values in float64 from the formula: LayerNorm(word + type[0]), attentive
    pooling over the real tokens, W_k / W_v."""
    emb, ke = model.embeddings, model.knowledge_encoder
    d = lambda t: t.detach().double()  # noqa: E731
    x = d(emb.word_embeddings.weight)[ids] + d(emb.token_type_embeddings.weight)[0]
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], d(emb.LayerNorm.weight), d(emb.LayerNorm.bias),
                                       emb.LayerNorm.eps)
    p = ke.pooler
    s = torch.tanh(x @ d(p.w1).T + d(p.b1)) @ d(p.w2).reshape(-1) + d(p.b2).reshape(())
    s = s.masked_fill(mask == 0, float("-inf"))
    a = torch.softmax(s, -1).nan_to_num(0.0)
    pooled = (a[..., None] * x).sum(1)
    k = pooled @ d(ke.key_proj.weight).T + d(ke.key_proj.bias)
    v = pooled @ d(ke.value_proj.weight).T + d(ke.value_proj.bias)
    return k, v


def test_entries_are_encoded_without_positions_on_every_path(fresh_seed):
    torch.manual_seed(fresh_seed)
    model = _model(doc_position_embeddings=False)
    with torch.no_grad():  # positions that would matter if they were read
        model.embeddings.position_embeddings.weight.normal_(0, 1.0)
    ids, mask = _entries(fresh_seed)
    k_ref, v_ref = _expected(model, ids, mask)
    model.train()
    k, v = model.encode_memory(ids, mask)  # training: gradients, the fused encode
    assert rel_err(k, k_ref) < 1e-5 and rel_err(v, v_ref) < 1e-5
    (k.sum() + v.sum()).backward()
    g = model.embeddings.position_embeddings.weight.grad
    assert g is None or not g.any()  # an entry never reads the position table
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        for use_tables in (True, False):  # precomputed pooler tables, then the matmul
            model.knowledge_encoder.use_tables = use_tables
            k, v = model.encode_memory(ids, mask)
            assert rel_err(k, k_ref) < 1e-5 and rel_err(v, v_ref) < 1e-5
        snap = model.memory_encoder_snapshot() if hasattr(model, "memory_encoder_snapshot") else copy.deepcopy(model)
        k, v = snap.encode_memory(ids, mask)
        assert rel_err(k, k_ref) < 1e-5
    # word order does not matter; with positions (the default) it does
    perm = torch.randperm(ids.shape[1])
    full = mask.all(1)
    with torch.no_grad():
        k1, _ = model.encode_memory(ids[full], mask[full])
        k2, _ = model.encode_memory(ids[full][:, perm], mask[full])
    assert full.any() and rel_err(k1, k2) < 1e-5
    with_pos = _model()
    with_pos.eval()
    with torch.no_grad():
        with_pos.embeddings.position_embeddings.weight.normal_(0, 1.0)
        k1, _ = with_pos.encode_memory(ids[full], mask[full])
        k2, _ = with_pos.encode_memory(ids[full][:, perm], mask[full])
    assert rel_err(k1, k2) > 1e-3


def test_the_option_is_saved_and_follows_casts(tmp_path):
    from pluglm import PlugLMModel

    model = _model(doc_position_embeddings=False)
    assert not any("position_zeros" in k for k in model.state_dict())  # no weight to save
    model.save_pretrained(tmp_path)
    back = PlugLMModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert back.config.doc_position_embeddings is False
    ids, mask = _entries(3)
    model.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_memory(ids, mask)[0], back.encode_memory(ids, mask)[0])
        k_ref, _ = _expected(model, ids, mask)
        for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
            m = copy.deepcopy(model).to(dtype)
            assert m.knowledge_encoder.position_table(m.embeddings).dtype == dtype
            assert rel_err(m.encode_memory(ids, mask)[0].double(), k_ref) < tol
    # a model saved before the option existed loads with positions (the paper's encoder)
    assert _model().config.doc_position_embeddings is True


def test_bad_values_are_refused():
    from pluglm import PlugLMConfig

    with pytest.raises(ValueError, match="doc_position_embeddings must be a bool"):
        PlugLMConfig(doc_position_embeddings="no")
    with pytest.raises(ValueError, match="doc_position_embeddings=False.*published"):
        PlugLMConfig(doc_position_embeddings=False, compat="published")
