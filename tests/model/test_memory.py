"""KnowledgeMemory: building from texts, editing, encoding, search, validation, threads.

Tokenizers are real and offline (a WordPiece vocabulary built in code); the encoder is a
tiny real nn.Module (embedding + attentive pool + linear key/value heads).
"""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from torch import nn

from pluglm.memory import KnowledgeMemory, MemorySnapshot

from conftest import wordpiece_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "it", "was", "good", "bad", "dog", "ran", "fast",
         "paris", "is", "capital", "of", "france", "water", "boils", "at", "hundred", "degrees",
         "a", "an", "and", "or", "not", "very", "blue", "sky", "sea", "moon"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab(extra: int = 0) -> dict[str, int]:
    toks = SPECIALS + WORDS + ["##s", "##ing", ".", ","] + [f"w{i}" for i in range(extra)]
    return {w: i for i, w in enumerate(toks)}


def fast_tokenizer(extra: int = 0):
    return wordpiece_tokenizer(list(_vocab(extra))[len(SPECIALS):])


def slow_tokenizer(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    try:  # transformers 5 keeps the pure-Python BERT tokenizer under a new name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        from transformers import BertTokenizer as Slow
    tok = Slow(vocab_file=str(vocab_file))
    if tok.is_fast:
        pytest.skip("no pure-Python BERT tokenizer in this transformers")
    return tok


def random_text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words) + "."


class TinyEncoder(nn.Module):
    """Embedding -> attentive pool -> (W_k, W_v): the shape of PlugLM's knowledge encoder."""

    def __init__(self, vocab: int, d: int = 16, key_dim: int = 8, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, 1)
        self.drop = nn.Dropout(dropout)
        self.wk = nn.Linear(d, key_dim)
        self.wv = nn.Linear(d, d)

    def pool(self, token_ids, mask):
        x = self.emb(token_ids)  # [E, L, d]
        s = self.w2(torch.tanh(self.w1(x))).squeeze(-1)  # [E, L]
        s = s.masked_fill(mask == 0, float("-inf"))
        a = torch.softmax(s, dim=-1)
        return self.drop((a.unsqueeze(-1) * x).sum(1))  # [E, d]

    def encode_memory(self, token_ids, attention_mask):
        p = self.pool(token_ids, attention_mask)
        return self.wk(p), self.wv(p)


@pytest.fixture(scope="module")
def tok():
    return fast_tokenizer()


def build(tok, n=23, seed=0, max_length=12, source="wiki"):
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randint(1, 9)) for _ in range(n)]
    return KnowledgeMemory.from_texts(texts, tok, source=source, max_length=max_length), texts


def encoded(tok, n=23, seed=0, key_dim=8):
    mem, texts = build(tok, n, seed)
    enc = TinyEncoder(len(tok), key_dim=key_dim)
    mem.encode(enc, batch_size=5, progress=False)
    return mem, enc, texts


def brute_topk_sets(queries, keys, mask, k):
    """Reference: float64 scores over searchable rows; returns per row (set of ids, kth score)."""
    s = queries.double() @ keys.double().T  # [B, M] fine at test sizes
    s[:, ~mask] = float("-inf")
    top = s.topk(k, dim=1)
    return s, top.values


def check_topk(scores, ids, queries, keys, mask, k):
    full, ref_vals = brute_topk_sets(queries, keys, mask, k)
    assert ids.shape == (queries.shape[0], k) and scores.dtype == torch.float32
    assert bool(mask[ids].all()), "search returned an unsearchable row"
    torch.testing.assert_close(scores.double(), ref_vals, rtol=1e-5, atol=1e-5)
    got = full.gather(1, ids)
    torch.testing.assert_close(got, ref_vals, rtol=1e-5, atol=1e-5)  # ties allowed, same scores
    for b in range(ids.shape[0]):
        assert len(set(ids[b].tolist())) == k


# ------------------------------------------------------------------------------ building


@pytest.mark.parametrize("stride", [None, 2])
def test_from_texts_chunks_fast_tokenizer(tok, stride):
    rng = random.Random(1)
    texts = [random_text(rng, n) for n in (1, 5, 9, 23, 40)]
    srcs = ["a", "b", "a", "c", "b"]
    max_length = 9  # 7 text tokens + [CLS] + [SEP]
    mem = KnowledgeMemory.from_texts(texts, tok, source=srcs, max_length=max_length, stride=stride)
    assert mem.token_ids.dtype == torch.int16 and mem.lengths.dtype == torch.int32
    assert mem.sources == ("a", "b", "c")
    cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    ov = stride or 0
    M = len(mem)
    tids, lens = mem.token_ids, mem.lengths
    entry = 0
    for i, text in enumerate(texts):
        body = tok(text, add_special_tokens=False)["input_ids"]
        step = 7 - ov
        n_chunks = 1 if len(body) <= 7 else 1 + -(-(len(body) - 7) // step)
        pieces = []
        for c in range(n_chunks):
            L = int(lens[entry])
            row = tids[entry].tolist()
            assert L <= max_length
            assert row[0] == cls_id and row[L - 1] == sep_id
            assert all(t == pad_id for t in row[L:])
            piece = row[1:L - 1]
            assert piece == body[c * step:c * step + 7]
            pieces.append(piece)
            span = mem.texts[entry]
            assert span in text
            assert tok(span, add_special_tokens=False)["input_ids"] == piece
            assert mem.sources_of(entry) == srcs[i]
            entry += 1
        if n_chunks == 1:
            assert mem.texts[entry - 1] == text
        rebuilt = pieces[0] + [t for p in pieces[1:] for t in p[ov:]]
        assert rebuilt == body
    assert entry == M
    assert tids.shape[1] == int(lens.max())


def test_from_texts_slow_tokenizer(tmp_path):
    slow = slow_tokenizer(tmp_path)
    text = "the cat sat on the mat and the dog ran fast on the sea"
    mem = KnowledgeMemory.from_texts([text, "blue sky"], slow, max_length=6)
    body = slow(text, add_special_tokens=False)["input_ids"]
    assert len(mem) == -(-len(body) // 4) + 1
    for e in range(len(mem) - 1):
        L = int(mem.lengths[e])
        piece = mem.token_ids[e, 1:L - 1].tolist()
        assert slow(mem.texts[e], add_special_tokens=False)["input_ids"] == piece
    assert mem.texts[-1] == "blue sky"


def test_large_vocab_uses_uint16_then_int32():
    # the narrowest table dtype: uint16 for 2**15 < vocab <= 2**16 (issue 14), int32 above
    big = fast_tokenizer(extra=33000)
    assert 32768 < len(big) <= 65536
    mem = KnowledgeMemory.from_texts(["w32999 w5 the cat"], big)
    assert mem.token_ids.dtype == torch.uint16
    assert int(mem.token_ids.to(torch.int64).max()) == big.convert_tokens_to_ids("w32999")
    huge = fast_tokenizer(extra=66000)
    assert len(huge) > 65536
    mem = KnowledgeMemory.from_texts(["w65999 w5 the cat"], huge)
    assert mem.token_ids.dtype == torch.int32
    assert int(mem.token_ids.max()) == huge.convert_tokens_to_ids("w65999")


def test_from_texts_errors(tok):
    with pytest.raises(TypeError, match="single str"):
        KnowledgeMemory.from_texts("the cat", tok)
    with pytest.raises(ValueError, match="no room"):
        KnowledgeMemory.from_texts(["the cat"], tok, max_length=2)
    with pytest.raises(ValueError, match="stride"):
        KnowledgeMemory.from_texts(["the cat"], tok, max_length=5, stride=3)
    with pytest.raises(ValueError, match=r"texts\[1\] produces no tokens"):
        KnowledgeMemory.from_texts(["the cat", "   "], tok)
    with pytest.raises(ValueError, match="one name per text"):
        KnowledgeMemory.from_texts(["the cat", "a dog"], tok, source=["x"])
    with pytest.raises(ValueError, match="at least one"):
        KnowledgeMemory.from_texts([], tok)


# ------------------------------------------------------------------------------ encoding


def test_encode_matches_encoder_and_restores_mode(tok):
    mem, _ = build(tok, n=31)
    enc = TinyEncoder(len(tok), dropout=0.5)
    enc.train()
    assert mem.encode(enc, batch_size=4, progress=False) == len(mem)
    assert enc.training  # restored
    enc.eval()
    with torch.no_grad():
        tokens, mask = mem.token_ids_of(torch.arange(len(mem)))
        ref_k, ref_v = enc.encode_memory(tokens, mask)
    torch.testing.assert_close(mem.keys, ref_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mem.values, ref_v, rtol=1e-5, atol=1e-6)
    assert not bool(mem.stale.any()) and mem.num_searchable == len(mem)


def test_encode_key_dtype_and_bad_encoder(tok):
    mem, _ = build(tok, n=7)
    enc = TinyEncoder(len(tok))
    mem.encode(enc, progress=False, key_dtype=torch.bfloat16)
    assert mem.keys.dtype == torch.bfloat16
    s, i = mem.search(torch.randn(2, 8), 3)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    with pytest.raises(TypeError, match="encode_memory"):
        mem.encode(nn.Linear(2, 2), progress=False)

    class Bad:
        def encode_memory(self, t, m):
            return torch.zeros(t.shape[0] + 1, 4), None

    with pytest.raises(ValueError, match="keys of shape"):
        mem.encode(Bad(), progress=False)


def test_encode_and_refresh_share_one_length_grouped_loop(tok):
    """KnowledgeMemory.encode and the refresher batch the same rows (length-sorted, each
    batch padded to its longest entry) and reject the same bad encoder output."""
    from pluglm.memory.encode import length_batches
    from pluglm.refresh import AsyncKeyRefresher

    mem, _ = build(tok, n=17)
    s = mem.snapshot()
    seen = []
    for b0, r, ids, mask in length_batches(s, torch.arange(len(s)), 4, torch.device("cpu")):
        assert ids.shape == mask.shape and ids.shape[1] == int(s.lengths[r].max())
        seen.append(r)
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(len(s)))
    assert bool((s.lengths[order][1:] >= s.lengths[order][:-1]).all())

    class Flaky(TinyEncoder):  # values in the first batch only
        calls = 0

        def encode_memory(self, t, m):
            k, v = super().encode_memory(t, m)
            Flaky.calls += 1
            return k, (v if Flaky.calls == 1 else None)

    with pytest.raises(ValueError, match="values for some batches"):
        mem.encode(Flaky(len(tok)), batch_size=4, progress=False)
    Flaky.calls = 0
    with AsyncKeyRefresher(Flaky(len(tok)), mem, interval=0, chunk=4) as r:
        r.refresh_now()
        with pytest.raises(ValueError, match="values for some batches"):
            r.wait()


# -------------------------------------------------------------------------------- search


@pytest.mark.parametrize("M,B,k", [(1, 1, 1), (23, 5, 4), (67, 3, 17)])
def test_search_matches_brute_force(tok, fresh_seed, M, B, k):
    mem, _, _ = encoded(tok, n=M, seed=fresh_seed % 1000)
    q = torch.randn(B, 8)
    scores, ids = mem.search(q, k)
    check_topk(scores, ids, q, mem.keys, mem.searchable, k)


def test_search_errors(tok):
    mem, _ = build(tok, n=5)
    with pytest.raises(RuntimeError, match="not encoded"):
        mem.search(torch.randn(1, 8), 1)
    mem.encode(TinyEncoder(len(tok)), progress=False)
    with pytest.raises(ValueError, match="key_dim=8"):
        mem.search(torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match=r"shape \[B, key_dim=8\]"):
        mem.search(torch.randn(8), 1)
    with pytest.raises(ValueError, match="larger than the number of searchable"):
        mem.search(torch.randn(1, 8), len(mem) + 1)
    with pytest.raises(ValueError, match="positive int"):
        mem.search(torch.randn(1, 8), 0)
    with pytest.raises(ValueError, match="finite"):
        mem.search(torch.full((1, 8), float("nan")), 1)


def test_remove_tombstones_never_returned(tok):
    mem, _, _ = encoded(tok, n=29)
    q = torch.randn(4, 8)
    _, top = mem.search(q, 3)
    gone = torch.unique(top[:, 0])
    v0 = mem.version
    mem.remove(gone)
    mem.remove(gone)  # idempotent
    assert mem.version == v0 + 2
    assert mem.num_valid == 29 - gone.numel()
    scores, ids = mem.search(q, mem.num_searchable)
    assert not bool(torch.isin(ids, gone).any())
    check_topk(scores, ids, q, mem.keys, mem.searchable, mem.num_searchable)
    with pytest.raises(ValueError, match="searchable"):
        mem.search(q, mem.num_searchable + 1)
    with pytest.raises(ValueError, match=r"in \[0, 29\)"):
        mem.remove([29])


def test_update_is_stale_until_reencoded(tok):
    mem, enc, texts = encoded(tok, n=17)
    target = 5
    q = torch.randn(1, 8)
    # make the target's key by far the best match for q
    mem.set_keys(q * 100.0, mem.values[target:target + 1], ids=[target])
    assert int(mem.search(q, 1)[1][0, 0]) == target
    mem.update([target], ["paris is the capital of france"], source="atlas")
    assert mem.texts_of([target]) == ["paris is the capital of france"]
    assert mem.sources_of([target]) == ["atlas"]
    assert bool(mem.stale[target]) and not bool(mem.searchable[target])
    # the old key must not answer for the new text
    _, ids = mem.search(q, mem.num_searchable)
    assert target not in ids.tolist()
    assert mem.encode(enc, progress=False, only_stale=True) == 1
    tokens, mask = mem.token_ids_of([target])
    with torch.no_grad():
        ref = enc.encode_memory(tokens, mask)[0][0]
    torch.testing.assert_close(mem.keys[target], ref)
    assert bool(mem.searchable[target])
    with pytest.raises(ValueError, match="one entry by one entry"):
        mem.update([0], [" ".join(["cat"] * 40)])
    mem.update([0], [" ".join(["cat"] * 40)], truncate=True)
    assert int(mem.lengths[0]) == mem.max_length
    mem.remove([1])
    with pytest.raises(ValueError, match="removed"):
        mem.update([1], ["dog"])
    with pytest.raises(ValueError, match="repeat"):
        mem.update([2, 2], ["dog", "cat"])


def test_add_is_stale_until_encoded(tok):
    mem, enc, _ = encoded(tok, n=9)
    long_text = " ".join(["the sea"] * 20)
    ids = mem.add(["blue moon", long_text], source="news")
    assert ids.dtype == torch.int64 and ids[0] == 9
    assert ids.tolist() == list(range(9, 9 + ids.numel())) and ids.numel() > 2
    assert mem.sources_of(ids) == ["news"] * ids.numel()
    assert mem.texts_of(ids[:1]) == ["blue moon"]
    assert not bool(mem.searchable[ids].any())
    assert mem.encode(enc, progress=False, only_stale=True) == ids.numel()
    assert bool(mem.searchable.all())
    q = torch.randn(3, 8)
    check_topk(*mem.search(q, 7), q, mem.keys, mem.searchable, 7)


def test_compact_mapping(tok):
    mem, _, texts = encoded(tok, n=19)
    mem.add(["blue moon"], source="news")
    mem.remove([0, 4, 5, 19])  # 19 is the only "news" entry
    keys, txt = mem.keys.clone(), list(mem.texts)
    mapping = mem.compact()
    assert mapping.shape == (20,) and mapping.dtype == torch.int64
    kept = [i for i in range(20) if i not in (0, 4, 5, 19)]
    assert mapping[[0, 4, 5, 19]].tolist() == [-1] * 4
    assert mapping[kept].tolist() == list(range(16))
    assert len(mem) == 16 and mem.sources == ("wiki",)
    torch.testing.assert_close(mem.keys, keys[kept], rtol=0, atol=0)
    assert list(mem.texts) == [txt[i] for i in kept]
    assert mem.token_ids.shape[1] == int(mem.lengths.max())


def test_add_examples(tok):
    mem, _ = build(tok, n=3)
    ids = mem.add_examples(["the dog ran", "the sea"], [1, 0], label_names=["bad", "good"])
    assert mem.texts_of(ids) == ["the dog ran It was good.", "the sea It was bad."]
    assert mem.sources_of(ids) == ["examples", "examples"]
    ids2 = mem.add_examples(["a cat"], ["good"], template="{label}: {text}", source="sst")
    assert mem.texts_of(ids2) == ["good: a cat"] and mem.sources_of(ids2) == ["sst"]
    with pytest.raises(ValueError, match="one label per text"):
        mem.add_examples(["a"], [1, 2])


def test_tokenizer_must_match(tok):
    mem, _ = build(tok, n=3)
    with pytest.raises(ValueError, match="one memory needs one tokenizer"):
        mem.add(["the cat"], fast_tokenizer(extra=5))


# ------------------------------------------------------------------------- concat, reads


def test_concat_keeps_sources_and_offsets(tok):
    general, _, _ = encoded(tok, n=11, seed=1)
    domain, _ = build(tok, n=6, seed=2, source="medical")
    domain.encode(TinyEncoder(len(tok)), progress=False)
    both = general + domain
    assert len(both) == 17 and both.sources == ("wiki", "medical")
    assert both.sources_of(torch.tensor([[0, 11], [10, 16]])) == [["wiki", "medical"], ["wiki", "medical"]]
    assert both.texts_of([11, 16]) == [domain.texts[0], domain.texts[5]]
    torch.testing.assert_close(both.keys[11:], domain.keys, rtol=0, atol=0)
    tk, mk = both.token_ids_of([11])
    dk, dm = domain.token_ids_of([0])
    assert torch.equal(tk[..., :dk.shape[-1]], dk) and torch.equal(mk[..., :dm.shape[-1]], dm)
    unencoded, _ = build(tok, n=4, seed=3, source="news")
    three = KnowledgeMemory.concat([general, domain, unencoded])
    assert three.sources == ("wiki", "medical", "news")
    assert three.num_searchable == 17 and bool(three.stale[17:].all())
    wrong, _ = build(tok, n=2)
    wrong.encode(TinyEncoder(len(tok), key_dim=4), progress=False)
    with pytest.raises(ValueError, match="key_dim"):
        general + wrong


def test_memory_protocol_reads(tok):
    mem, _, _ = encoded(tok, n=13)
    ids = torch.tensor([[0, 5, 12], [3, 3, 1]])
    k, v = mem.fetch(ids)
    assert k.shape == (2, 3, 8) and v.shape == (2, 3, 16)
    assert torch.equal(k, mem.keys[ids]) and torch.equal(mem.fetch_keys(ids), k)
    t, m = mem.token_ids_of(ids)
    assert t.shape == m.shape == (2, 3, mem.token_ids.shape[1]) and t.dtype == torch.long
    assert torch.equal(m.sum(-1), mem.lengths[ids].long())
    t2, m2 = mem.token_ids_of(ids, trim=True)
    assert t2.shape[-1] == int(mem.lengths[ids].max())
    assert mem.texts_of(torch.tensor([[-1, 2]])) == [[None, mem.texts[2]]]
    assert mem.texts_of(4) == mem.texts[4]
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        mem.fetch(torch.tensor([[13]]))
    with pytest.raises(TypeError, match="integer"):
        mem.texts_of(torch.tensor([0.5]))


def test_memory_layer_reads_knowledge_memory(tok):
    from pluglm.nn.memory_layer import Memory, MemoryLayer

    mem, _, _ = encoded(tok, n=13)
    assert isinstance(mem, Memory)
    layer = MemoryLayer(hidden_size=16, num_heads=2, key_dim=8, memory_k=3, memory_ffn_dim=0,
                        dropout=0.0, memory=mem).eval()
    out, ret = layer(torch.randn(2, 5, 16), torch.ones(2, 5), return_retrieval=True)
    assert out.shape == (2, 5, 16) and ret.indices.shape == (2, 3)
    assert bool(mem.searchable[ret.indices].all())


def test_version_counter(tok):
    mem, enc, _ = encoded(tok, n=6)
    v = mem.version
    mem.search(torch.randn(1, 8), 2)
    mem.texts_of([0]); mem.fetch(torch.tensor([[0]])); mem.snapshot()
    assert mem.version == v
    steps = [lambda: mem.add(["the moon"]), lambda: mem.update([0], ["blue sea"]),
             lambda: mem.remove([1]), lambda: mem.encode(enc, progress=False, only_stale=True),
             lambda: mem.compact(), lambda: mem.set_keys(torch.randn(len(mem), 8))]
    for step in steps:
        step()
        v, old = mem.version, v
        assert v == old + 1


def test_check_compatible(tok):
    mem, _, _ = encoded(tok, n=3)
    mem.check_compatible(key_dim=8, value_dim=16, vocab_size=len(tok))
    with pytest.raises(ValueError, match="key_dim=8"):
        mem.check_compatible(key_dim=128)


# ------------------------------------------------------------------------- non-finite rows


class PoisonEncoder(TinyEncoder):
    """NaN keys for entries containing the token "moon", Inf values for "sky"."""

    def __init__(self, tok):
        super().__init__(len(tok))
        self.moon, self.sky = tok.convert_tokens_to_ids("moon"), tok.convert_tokens_to_ids("sky")

    def encode_memory(self, token_ids, attention_mask):
        k, v = super().encode_memory(token_ids, attention_mask)
        k[(token_ids == self.moon).any(1)] = float("nan")
        v[(token_ids == self.sky).any(1)] = float("inf")
        return k, v


def test_validate_reports_and_search_skips_nonfinite(tok):
    texts = ["the moon", "blue sky", "the cat", "a dog", "the sea", "paris"]
    mem = KnowledgeMemory.from_texts(texts, tok)
    mem.encode(PoisonEncoder(tok), progress=False)
    rep = mem.validate()
    assert rep.nonfinite_keys.tolist() == [0] and rep.nonfinite_values.tolist() == [1]
    assert not rep.ok and rep.as_dict()["stale"] == []
    assert mem.num_searchable == 4
    _, ids = mem.search(torch.randn(5, 8), 4)
    assert set(ids.flatten().tolist()) <= {2, 3, 4, 5}
    with pytest.raises(ValueError, match="non-finite"):
        mem.search(torch.randn(1, 8), 5)
    # A good re-encode of the row makes it searchable again.
    mem.set_keys(torch.randn(1, 8), torch.randn(1, 16), ids=[0])
    assert bool(mem.searchable[0]) and mem.validate().nonfinite_keys.numel() == 0


def test_validate_catches_inplace_writes(tok):
    mem, _, _ = encoded(tok, n=5)
    mem.keys[2, 0] = float("inf")  # bypasses the API; validate() must still catch it
    assert bool(mem.searchable[2])
    assert mem.validate().nonfinite_keys.tolist() == [2]
    assert not bool(mem.searchable[2])


# ---------------------------------------------------------------------------- concurrency


def test_snapshots_are_never_written(tok):
    mem, enc, _ = encoded(tok, n=10)
    snap = mem.snapshot()
    frozen = {n: getattr(snap, n).clone() for n in ("token_ids", "lengths", "keys", "values",
                                                     "valid", "stale", "finite", "source_index")}
    mem.add(["the moon"], source="x")
    mem.update([0], ["blue sea"])
    mem.remove([1])
    mem.encode(enc, progress=False, only_stale=True)
    mem.set_keys(torch.randn(len(mem), 8), torch.randn(len(mem), 16))
    mem.compact()
    for n, t in frozen.items():
        assert torch.equal(getattr(snap, n), t), n
    assert len(snap.texts) == 10 and snap.sources == ("wiki",)


def test_encode_commit_skips_rows_changed_meanwhile(tok):
    mem, enc, _ = encoded(tok, n=12)
    mem.update([3, 7], ["blue moon", "a dog ran"])

    class Meddler(TinyEncoder):
        calls = 0

        def encode_memory(self, t, m):
            if Meddler.calls == 0:  # another thread's edits, between snapshot and commit
                mem.update([3], ["the sea"])
                mem.remove([0])
                mem.compact()  # renumbers: commit must follow rows by revision
            Meddler.calls += 1
            return super().encode_memory(t, m)

    med = Meddler(len(tok))
    med.load_state_dict(enc.state_dict())
    assert mem.encode(med, batch_size=1, progress=False, only_stale=True) == 1
    # old 3 -> new 2 (re-updated: stays stale), old 7 -> new 6 (committed)
    assert bool(mem.stale[2]) and not bool(mem.stale[6])
    assert mem.texts_of([2, 6]) == ["the sea", "a dog ran"]
    tokens, mask = mem.token_ids_of([6])
    with torch.no_grad():
        torch.testing.assert_close(mem.keys[6], enc.encode_memory(tokens, mask)[0][0])


def test_concurrent_search_and_mutation(tok):
    """One thread edits; searchers must always see one consistent snapshot."""
    mem, enc, _ = encoded(tok, n=40)
    mem.search(torch.randn(1, 8), 1)  # warm up (first call imports torch internals for ~seconds)
    removed_before: set[int] = set()  # ids removed so far (ids never revive: no compact here)
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def mutate():
        rng = random.Random(7)
        try:
            for step in range(60):
                op = step % 4
                if op == 0:
                    mem.add([random_text(rng, rng.randint(1, 6))], source=f"s{step % 3}")
                elif op == 1:
                    victims = [i for i in range(len(mem)) if bool(mem.valid[i])]
                    victim = rng.choice(victims)
                    mem.remove([victim])
                    with lock:
                        removed_before.add(victim)
                elif op == 2:
                    alive = [i for i in range(len(mem)) if bool(mem.valid[i])]
                    mem.update([rng.choice(alive)], [random_text(rng, 3)])
                else:
                    mem.encode(enc, progress=False, only_stale=True)
                time.sleep(0.002)  # let searchers observe many versions
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def search():
        g = torch.Generator().manual_seed(threading.get_ident() % 2**31)
        try:
            while not stop.is_set():
                q = torch.randn(3, 8, generator=g)
                with lock:
                    dead = set(removed_before)
                snap = mem.snapshot()
                k = min(5, snap.num_searchable)
                s, ids = snap.search(q, k)
                # consistent with the snapshot it read: searchable rows, scores match its keys
                assert bool(snap.searchable[ids].all())
                ref = (q.double()[:, None, :] * snap.keys[ids].double()).sum(-1)
                torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)
                assert torch.all(s[:, :-1] >= s[:, 1:])
                # and the live memory never returns what was removed before the search began
                s2, ids2 = mem.search(q, 3)
                assert not (set(ids2.flatten().tolist()) & dead)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=search) for _ in range(2)] + [threading.Thread(target=mutate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert mem.version >= 60


def test_snapshot_type(tok):
    mem, _ = build(tok, n=2)
    assert isinstance(mem.snapshot(), MemorySnapshot)
    assert "KnowledgeMemory(entries=2" in repr(mem)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory(tok, tmp_path):
    mem, _ = build(tok, n=37)
    mem = mem.to("cuda")
    enc = TinyEncoder(len(tok)).cuda()
    mem.encode(enc, progress=False)
    assert mem.keys.is_cuda and mem.token_ids.is_cuda and mem.valid.is_cuda
    mem.remove([3])
    mem.update([4], ["blue moon"])
    mem.add(["the sea"])
    q = torch.randn(4, 8, device="cuda")
    s, i = mem.search(q, 5)
    assert i.is_cuda
    check_topk(s.cpu(), i.cpu(), q.cpu(), mem.keys.cpu(), mem.searchable.cpu(), 5)
    assert mem.encode(enc, progress=False, only_stale=True) == 2
    k, v = mem.fetch(i)
    t, m = mem.token_ids_of(i)
    assert k.is_cuda and v.is_cuda and t.is_cuda and m.is_cuda
    mem.compact()
    mem.save(tmp_path / "m")
    back = KnowledgeMemory.load(tmp_path / "m", device="cuda")
    assert back.keys.is_cuda and torch.equal(back.keys, mem.keys)
    assert torch.equal(back.token_ids, mem.token_ids) and back.texts == mem.texts
