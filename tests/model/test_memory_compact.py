"""Compact memory tables (docs/design.md, "Compact tables"): int8 keys with per-row scales,
chosen key/value dtypes, values on demand (no value table), texts as a byte blob; kept
through save/load and every mutation."""
from __future__ import annotations


import pytest
import torch

from pluglm.memory import KnowledgeMemory
from pluglm.memory.texts import TextTable
from pluglm_kernels import quantize_keys

from conftest import (MeanPoolEncoder as Enc, SMALL_WORDS, tiny_memory_model,
                      random_sentences, wordpiece_tokenizer)



@pytest.fixture(scope="module")
def tok():
    return wordpiece_tokenizer(SMALL_WORDS + ["."])


def texts(n, seed=0):
    return list(random_sentences(n, seed, max_words=9))




def test_text_table_ops():
    t = TextTable.from_strings(["a", "", "héllo", "xyz"])
    assert len(t) == 4 and list(t) == ["a", "", "héllo", "xyz"] and t[-1] == "xyz"
    assert t == ("a", "", "héllo", "xyz") and t[1:3] == ["", "héllo"]
    assert list(t.cat(["q"])) == ["a", "", "héllo", "xyz", "q"]
    assert list(t.take([3, 0, 0])) == ["xyz", "a", "a"]
    assert list(t.replace([1, 3], ["B", "ü"])) == ["a", "B", "héllo", "ü"]
    assert list(TextTable.from_strings([]).cat([])) == []
    with pytest.raises(IndexError):
        t[4]


@pytest.mark.parametrize("kdt", [torch.int8, torch.bfloat16, torch.float16, torch.float32])
def test_key_dtypes_search_and_fetch(tok, kdt):
    mem = KnowledgeMemory.from_texts(texts(37), tok, key_dtype=kdt, value_dtype=torch.float16)
    enc = Enc(len(tok))
    mem.encode(enc, batch_size=7, progress=False)
    assert mem.keys.dtype == kdt and mem.values.dtype == torch.float16
    assert (mem.key_scales is not None) == (kdt == torch.int8)
    ref = KnowledgeMemory.from_texts(texts(37), tok)
    ref.encode(enc, batch_size=7, progress=False)  # same batches: bit-identical float keys
    f32 = ref.keys.float()
    if kdt == torch.int8:
        q, s = quantize_keys(f32)
        assert torch.equal(mem.keys, q) and torch.equal(mem.key_scales, s)
        stored = q.float() * s[:, None]
    else:
        stored = f32.to(kdt).float()
    assert torch.equal(mem.fetch_keys(torch.arange(37)), stored)
    qs = torch.randn(5, 8)
    sc, ids = mem.search(qs, 4)
    want = torch.topk(qs @ stored.T, 4, dim=1)
    torch.testing.assert_close(sc, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.gather(qs @ stored.T, 1, ids), sc) or \
        torch.allclose(torch.gather(qs @ stored.T, 1, ids), sc, atol=1e-5)
    k, v = mem.fetch(ids[:, :2])
    assert k.shape == (5, 2, 8) and v.dtype == torch.float16


def test_int8_mutations_save_load(tok, tmp_path):
    enc = Enc(len(tok))
    mem = KnowledgeMemory.from_texts(texts(20), tok, key_dtype=torch.int8, store_values=False)
    mem.encode(enc, progress=False)
    assert mem.values is None and mem.key_dtype == torch.int8
    new = mem.add(texts(3, seed=9))
    assert mem.keys.dtype == torch.int8 and mem.key_scales.shape == (23,)
    mem.encode(enc, only_stale=True, progress=False)
    mem.update([2], ["salt storm."])
    mem.remove([5, int(new[0])])
    mem.encode(enc, only_stale=True, progress=False)
    mem.save(tmp_path / "m")
    back = KnowledgeMemory.load(tmp_path / "m")
    assert back.layout == mem.layout and back.keys.dtype == torch.int8
    assert torch.equal(back.keys, mem.keys) and torch.equal(back.key_scales, mem.key_scales)
    assert back.texts == mem.texts and back.texts[2] == "salt storm."
    q = torch.randn(3, 8)
    assert torch.equal(back.search(q, 5)[1], mem.search(q, 5)[1])
    mapping = back.compact()
    assert len(back) == 21 and int(mapping[5]) == -1 and back.key_scales.shape == (21,)
    assert list(back.texts) == [t for i, t in enumerate(mem.texts) if i not in (5, int(new[0]))]
    # set_keys quantises float keys into the int8 layout; NaN rows stay out of search
    k = torch.randn(21, 8)
    k[4] = float("nan")
    back.set_keys(k)
    assert back.keys.dtype == torch.int8 and not bool(back.searchable[4])
    rep = back.validate()
    assert rep.nonfinite_keys.tolist() == [4] and not bool(back.searchable[4])
    # values on demand survive save/load: the layout says so
    back.save(tmp_path / "m")
    again = KnowledgeMemory.load(tmp_path / "m", mmap=False)
    assert again.values is None and not again.store_values and again.key_dtype == torch.int8


def test_with_layout_and_concat(tok):
    enc = Enc(len(tok))
    a = KnowledgeMemory.from_texts(texts(9), tok)
    a.encode(enc, progress=False)
    b = a.with_layout(key_dtype=torch.int8, value_dtype=torch.bfloat16)
    assert b.keys.dtype == torch.int8 and b.values.dtype == torch.bfloat16 and len(b) == 9
    c = a.with_layout(store_values=False)
    assert c.values is None and a.values is not None
    both = KnowledgeMemory.concat([b, a])
    assert both.keys.dtype == torch.int8 and len(both) == 18
    assert torch.equal(both.keys[:9], b.keys) and torch.equal(both.key_scales[:9], b.key_scales)
    with pytest.raises(TypeError, match="key_dtype"):
        KnowledgeMemory.from_texts(texts(2), tok, key_dtype=torch.int16)
    with pytest.raises(TypeError, match="value_dtype"):
        KnowledgeMemory.from_texts(texts(2), tok, value_dtype=torch.int8)


def test_format_v1_still_loads(tok, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    mem = KnowledgeMemory.from_texts(texts(6), tok)
    mem.encode(Enc(len(tok)), progress=False)
    mem.save(tmp_path / "m")
    d = tmp_path / "m"
    t = load_file(d / "tensors.safetensors")
    del t["text_offsets"], t["finite"]
    save_file(t, d / "tensors.safetensors")
    lines = "".join(json.dumps(x) + "\n" for x in mem.texts).encode()
    (d / "texts.jsonl").write_bytes(lines)
    (d / "texts.bin").unlink()
    import hashlib
    man = json.loads((d / "manifest.json").read_text())
    man["format_version"] = 1
    man.pop("layout")
    del man["tensors"]["text_offsets"], man["tensors"]["finite"]
    man["files"] = {n: {"bytes": (d / n).stat().st_size,
                        "sha256": hashlib.sha256((d / n).read_bytes()).hexdigest()}
                    for n in ("tensors.safetensors", "texts.jsonl")}
    (d / "manifest.json").write_text(json.dumps(man))
    back = KnowledgeMemory.load(d)
    assert back.texts == mem.texts and torch.equal(back.keys, mem.keys)
    back.save(d)  # rewritten in the current format
    assert (d / "texts.bin").is_file() and not (d / "texts.jsonl").exists()




def test_values_on_demand_matches_stored_values(tok):
    """A memory that keeps no value table gives the model output it gives with stored
    values: the model re-encodes the retrieved entries with its knowledge encoder."""
    model = tiny_memory_model(len(tok))
    stored = KnowledgeMemory.from_texts(texts(30), tok, max_length=16)
    stored.encode(model, progress=False)
    lean = stored.with_layout(store_values=False)
    assert lean.values is None
    ids = torch.randint(5, len(tok), (3, 9))
    with torch.no_grad():
        a = model(ids, memory=stored).last_hidden_state
        model.set_memory(lean)
        b = model(ids).last_hidden_state
    # the stored tables are float32 (a float64 encoder's output is rounded on the way in),
    # the re-encode stays float64: equal up to float32 rounding
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(ids, memory=lean, output_retrieval=True).retrieval[0].indices,
                       model(ids, memory=stored, output_retrieval=True).retrieval[0].indices)
    with pytest.raises(RuntimeError, match="no values"):
        lean.fetch(torch.zeros(1, 2, dtype=torch.long))


def test_values_on_demand_through_encoder_tables_match_stored_values(tok):
    """The float32 C++ path: at inference the re-encode of the retrieved entries runs through
    the precomputed pooler tables (encode_knowledge_factored); the output matches stored
    values and the matmul path (use_tables=False) up to float32 rounding."""
    model = tiny_memory_model(len(tok), kernel_backend="auto").float()
    stored = KnowledgeMemory.from_texts(texts(30), tok, max_length=16)
    stored.encode(model, progress=False)
    lean = stored.with_layout(store_values=False)
    ids = torch.randint(5, len(tok), (3, 9))
    with torch.no_grad():
        a = model(ids, memory=stored).last_hidden_state
        b = model(ids, memory=lean).last_hidden_state
        assert model.knowledge_encoder._tables._tables is not None  # the tables ran
        model.knowledge_encoder.use_tables = False
        c = model(ids, memory=lean).last_hidden_state
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


def test_refresh_of_an_int8_memory_quantises_on_commit(tok):
    """The key refresher computes float keys and set_keys quantises them into the memory's
    int8 layout; values on demand stay absent."""
    from pluglm.refresh import AsyncKeyRefresher

    model = tiny_memory_model(len(tok)).float()
    mem = KnowledgeMemory.from_texts(texts(40), tok, max_length=16, key_dtype=torch.int8,
                                     store_values=False)
    mem.encode(model, progress=False)
    before = mem.keys.clone()
    with torch.no_grad():
        for p in model.knowledge_encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    with AsyncKeyRefresher(model, mem, interval=0, chunk=16) as r:
        r.refresh_now()
        assert r.wait() == 40
    assert mem.keys.dtype == torch.int8 and mem.values is None and mem.key_scales.shape == (40,)
    assert not torch.equal(mem.keys, before)
    ref = KnowledgeMemory.from_texts(texts(40), tok, max_length=16)
    ref.encode(model, progress=False)
    q, s = quantize_keys(ref.keys)
    assert (mem.keys.int() - q.int()).abs().max() <= 1  # equal up to float rounding
    torch.testing.assert_close(mem.key_scales, s, rtol=1e-4, atol=1e-7)


def test_int8_from_encode_argument_survives_set_keys(tok):
    mem = KnowledgeMemory.from_texts(texts(12), tok)  # no layout: int8 chosen at encode
    mem.encode(Enc(len(tok)), key_dtype=torch.int8, progress=False)
    assert mem.keys.dtype == torch.int8
    mem.set_keys(torch.randn(len(mem), 8))
    assert mem.keys.dtype == torch.int8 and mem.key_scales.shape == (len(mem),)
    assert mem.num_searchable == len(mem)
