"""Out-of-core memories at small M (docs/design.md, "Out of core"): a memory built by
streaming its input straight to disk, opened memory-mapped, searched, edited and saved
back atomically — the code paths of a 2e7-entry memory, on a few hundred entries."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pluglm.memory import KnowledgeMemory, MemoryFormatError, build_memory
from pluglm_kernels import quantize_keys

from conftest import (MeanPoolEncoder as Enc, SMALL_WORDS,
                      random_sentences, run_child_until_killed, wordpiece_tokenizer)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return wordpiece_tokenizer(SMALL_WORDS + ["."])


def gen_texts(n, seed=0):
    """A generator: the builder must not need a list."""
    return random_sentences(n, seed, max_words=12)




@pytest.mark.parametrize("kdt,store_values", [(torch.float32, True), (torch.int8, False),
                                              (torch.bfloat16, True)])
def test_streamed_build_from_texts_equals_in_memory(tok, tmp_path, kdt, store_values):
    enc = Enc(len(tok))
    built = KnowledgeMemory.build(tmp_path / "m", gen_texts(150), tokenizer=tok, encoder=enc,
                                  max_length=10, chunk_size=32, batch_size=16, key_dtype=kdt,
                                  store_values=store_values, progress=False)
    ref = KnowledgeMemory.from_texts(list(gen_texts(150)), tok, max_length=10, key_dtype=kdt,
                                     store_values=store_values)
    ref.encode(enc, progress=False)
    assert len(built) == len(ref) and built.texts == ref.texts
    assert torch.equal(built.token_ids[:, :ref.token_ids.shape[1]], ref.token_ids)
    assert torch.equal(built.lengths, ref.lengths) and built.layout == ref.layout
    assert built.keys.dtype == kdt and (built.values is None) == (not store_values)
    torch.testing.assert_close(built.fetch_keys(torch.arange(len(ref))),
                               ref.fetch_keys(torch.arange(len(ref))), rtol=0.02, atol=0.02)
    q = torch.randn(4, 8)
    s_b, _ = built.search(q, 5)
    s_r, _ = ref.search(q, 5)
    torch.testing.assert_close(s_b, s_r, rtol=0.03, atol=0.03)
    KnowledgeMemory.load(tmp_path / "m", verify=True)  # checksums and token ranges hold


def test_streamed_build_from_tensor_chunks(tmp_path):
    torch.manual_seed(0)
    chunks, all_keys = [], []
    for n in (100, 57, 1, 80):
        k = torch.randn(n, 16)
        q, s = quantize_keys(k)
        all_keys.append(q.float() * s[:, None])
        lengths = torch.randint(1, 9, (n,), dtype=torch.int32)
        chunks.append({"token_ids": torch.randint(0, 30000, (n, 8), dtype=torch.int16),
                       "lengths": lengths, "keys": q, "key_scales": s,
                       "texts": [f"entry é{i}" for i in range(n)]})
    gen = (c for c in chunks)
    path = build_memory(tmp_path / "m", gen, vocab_size=30000, key_dtype=torch.int8,
                        store_values=False, total=238, progress=False)
    mem = KnowledgeMemory.load(path, verify=False)
    assert len(mem) == 238 and mem.keys.dtype == torch.int8 and mem.token_ids.dtype == torch.int16
    assert mem.texts[100] == "entry é0" and mem.num_searchable == 238
    keys = torch.cat(all_keys)
    q = torch.randn(3, 16)
    s, i = mem.search(q, 7)
    want = torch.topk(q @ keys.T, 7, dim=1)
    torch.testing.assert_close(s, want.values, rtol=1e-5, atol=1e-5)
    # bad chunks are refused with the argument named, and leave no target behind
    bad = [{"token_ids": torch.zeros(2, 8, dtype=torch.int16), "lengths": torch.ones(2)},
           {"token_ids": torch.zeros(2, 9, dtype=torch.int16), "lengths": torch.ones(2)}]
    with pytest.raises(ValueError, match="L=8"):
        build_memory(tmp_path / "bad", iter(bad), vocab_size=100, progress=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with pytest.raises(ValueError, match="vocab_size"):
        build_memory(tmp_path / "bad", iter(bad), progress=False)


def test_mapped_load_reads_only_what_it_needs(tok, tmp_path):
    enc = Enc(len(tok))
    mem = KnowledgeMemory.build(tmp_path / "m", gen_texts(300), tokenizer=tok, encoder=enc,
                                max_length=10, key_dtype=torch.int8, progress=False)
    # the tables are views of the file mapping, the texts a numpy memmap of texts.bin
    back = KnowledgeMemory.load(tmp_path / "m", verify=False)
    assert isinstance(back.texts.blob, np.memmap)
    keys_file = (tmp_path / "m" / "tensors.safetensors").stat().st_size
    assert back.keys.untyped_storage().nbytes() < keys_file  # shares the mapping, not a copy
    assert back.texts_of([[3, 299]]) == [[mem.texts[3], mem.texts[299]]]
    k, v = back.fetch(torch.tensor([[1, 2]]))
    assert k.shape == (1, 2, 8) and v.shape == (1, 2, 12)


def test_edits_of_a_mapped_memory_save_atomically(tok, tmp_path):
    path = tmp_path / "m"
    enc = Enc(len(tok))
    KnowledgeMemory.build(path, gen_texts(120), tokenizer=tok, encoder=enc, max_length=10,
                          key_dtype=torch.int8, progress=False)
    mem = KnowledgeMemory.load(path)  # mapped
    ids = mem.add(["salt storm ocean."], tok)
    mem.update([3], ["green glass."], tok)
    mem.remove([0, 7])
    mem.encode(enc, only_stale=True, progress=False)
    mem.save(path)  # replaces the files it is mapped from
    back = KnowledgeMemory.load(path)
    assert back.texts[3] == "green glass." and back.texts[int(ids[0])] == "salt storm ocean."
    assert not bool(back.valid[0]) and torch.equal(back.keys, mem.keys)
    mapping = back.compact()
    back.save(path)
    again = KnowledgeMemory.load(path, verify=True)
    assert len(again) == len(mem) - 2 and again.texts[int(mapping[3])] == "green glass."


CHILD = textwrap.dedent("""
    import sys, torch
    from pluglm.memory import build_memory
    chunks = ({"token_ids": torch.ones(5, 4, dtype=torch.int16), "lengths": torch.full((5,), 2)}
              for _ in range(3))
    build_memory(sys.argv[1], chunks, vocab_size=50, progress=False)
""")


@pytest.mark.parametrize("stage", ["files_written", "before_swap"])
def test_killed_build_leaves_the_previous_memory(tok, tmp_path, stage):
    path = tmp_path / "m"
    old = KnowledgeMemory.build(path, gen_texts(20), tokenizer=tok, max_length=10, progress=False)
    signal_file = tmp_path / f"reached-{stage}"
    env = dict(os.environ, _PLUGLM_SAVE_PAUSE_AT=stage, _PLUGLM_SAVE_SIGNAL=str(signal_file),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_child_until_killed([sys.executable, "-c", CHILD, str(path)], env, signal_file, stage,
                           timeout=60)
    got = KnowledgeMemory.load(path)
    assert len(got) == len(old) and got.texts == old.texts


def test_corrupt_text_offsets_are_refused(tok, tmp_path):
    KnowledgeMemory.build(tmp_path / "m", gen_texts(10), tokenizer=tok, max_length=10,
                          progress=False)
    with open(tmp_path / "m" / "texts.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(MemoryFormatError, match="texts.bin"):
        KnowledgeMemory.load(tmp_path / "m", verify=False)


def test_bench_large_rows(tmp_path):
    """``pluglm bench --large`` end to end at a tiny M: the quick sweep's row schema, a
    memory built, loaded mapped, searched and deleted."""
    from pluglm.bench.large import LargeConfig, run_large

    cfg = LargeConfig(Ms=(3000,), Bs=(1, 4, 32), L=16, chunk=1000, work_dir=str(tmp_path / "w"),
                      budget_s=0.05, ceiling_bytes=1 << 22, recall_entries=0,
                      cost_Ms=())
    out = run_large(cfg, show_progress=False, log=lambda *a: None)
    rows = out["rows"]
    assert {r["bench"] for r in rows} == {"memory load (mapped)", "search (mapped memory)",
                                          "search (large)"}
    assert {r["shape"]["dtype"] for r in rows if r["bench"] == "search (large)"} == \
        {"bfloat16", "float32"}
    for r in rows:
        assert {"bench", "impl", "shape", "median_ms", "peak_mb", "pct_roofline"} <= set(r)
        assert r["median_ms"] > 0
        if r["bench"] != "memory load (mapped)":
            # a compute-bound case's ceiling is the GEMM rate measured right around it
            compute = r["extra"]["bound"] == "compute"
            assert compute or r["shape"]["B"] < 32  # which side B = 4 falls on depends on the probes
            assert ("rounds_ms_gemm" in r["extra"]) == compute
            if compute:
                rounds = r["extra"]["rounds_ms_gemm"]
                assert len(rounds) == 3 and min(g for _, g in rounds) > 0 and r["extra"]["pct_of_run_gemm"] > 0
                assert r["median_ms"] in [ms for ms, _ in rounds] or \
                    min(abs(r["median_ms"] - ms) for ms, _ in rounds) < 0.01
    load = next(r for r in rows if r["bench"] == "memory load (mapped)")
    assert load["extra"]["bytes_per_entry"] > 16 * 2 + 128
    assert set(out["ceilings"]) == {"read_gbs", "copy_gbs", "gemm_f32_gflops"}
    assert not any((tmp_path / "w").iterdir())  # the memory is deleted when done


def test_bench_large_ann_and_cost_rows(tmp_path):
    """The ANN baselines on clustered and isotropic keys, and the cost-of-a-memory pairs timed
    interleaved, at tiny sizes (a 2-layer d=64 model): rows in the sweep's schema, exact
    search's recall 1, each PlugLM row's ratio the ratio of its own interleaved medians."""
    pytest.importorskip("faiss")
    from pluglm.bench.large import LargeConfig, clustered_keys, run_large

    keys, queries = clustered_keys(500, 8, 5, clusters=4)
    assert keys.shape == (500, 8) and queries.shape == (5, 8) and torch.isfinite(keys).all()
    tiny = (("hidden_size", 32), ("num_hidden_layers", 2), ("num_attention_heads", 2),
            ("intermediate_size", 64))
    cfg = LargeConfig(Ms=(), work_dir=str(tmp_path / "w"), budget_s=0.01,
                      ceiling_bytes=1 << 22, recall_entries=0, ann_Ms=(2000,), ann_queries=8,
                      ann_clusters=8, cost_Ms=(300,), cost_Bs=(1,), cost_rounds=2, cost_budget_s=None,
                      cost_geometry=tiny)
    rows = run_large(cfg, show_progress=False, log=lambda *a: None)["rows"]
    assert {r["bench"] for r in rows} == {"ANN vs exact search", "cost of a memory"}
    for r in rows:
        assert {"bench", "impl", "shape", "median_ms", "peak_mb", "pct_roofline"} <= set(r)
        assert r["median_ms"] > 0
    ann = [r for r in rows if r["bench"] == "ANN vs exact search"]
    assert {r["shape"]["keys"] for r in ann} == {"clustered", "isotropic"}
    assert {r["shape"]["k"] for r in ann} == {5, 10}
    assert {r["impl"] for r in ann} >= {"pluglm mips_topk (exact)", "faiss.IVFFlat(nprobe=16)",
                                        "faiss.HNSW32(ef=64)"}
    for r in ann:
        assert 0.0 <= r["extra"]["recall_at_k"] <= 1.0
        if r["impl"] == "pluglm mips_topk (exact)":
            assert r["extra"]["recall_at_k"] == 1.0
    cost = [r for r in rows if r["bench"] == "cost of a memory"]
    plug = [r for r in cost if r["impl"].startswith("pluglm")]
    assert len(plug) == 2 * 3  # forward and memory layer x three memory kinds
    assert sum(r["impl"].startswith("transformers") for r in cost) == 2
    for r in plug:
        ex = r["extra"]
        assert ex["ratio_to_dense"] == pytest.approx(r["median_ms"] / ex["dense_median_ms"],
                                                     rel=2e-3, abs=2e-3)
        # cost_rounds=2 is a minimum: rounds go on while the (tiny) budget is not used up
        assert r["repeats"] >= 2
