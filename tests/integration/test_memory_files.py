"""KnowledgeMemory files: round trips, atomic saves under SIGKILL, corrupted inputs.

A saved memory is a directory (manifest.json, tensors.safetensors, texts.bin); see
pluglm/memory/files.py and docs/design.md §4. Loading must never execute code and must name
the bad file.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pluglm.memory import FORMAT_VERSION, KnowledgeMemory, MemoryFormatError

from conftest import run_child_until_killed, wordpiece_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The capital of France is Paris.", "Water boils at 100 degrees.",
         "Ünïcödé text — with \"quotes\",\nnewlines\tand tabs.", "",  # "" replaced below
         "A long text about the sea and the moon " * 6]
TEXTS[3] = "emoji 🙂 and 中文 characters"


def tokenizer():
    words = sorted({w.strip(".,\"—🙂").lower() for t in TEXTS for w in t.split()} - {""})
    return wordpiece_tokenizer(words + [".", ",", "\"", "—"], mask_token=False)


class Encoder(nn.Module):
    def __init__(self, vocab: int, d: int = 12, key_dim: int = 6, values: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.wk = nn.Linear(d, key_dim)
        self.wv = nn.Linear(d, d) if values else None

    def encode_memory(self, token_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        p = (self.emb(token_ids) * m).sum(1) / m.sum(1)  # [E, d]
        return self.wk(p), (self.wv(p) if self.wv is not None else None)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def make_memory(tok, *, key_dtype=None, values=True, edits=True):
    mem = KnowledgeMemory.from_texts(TEXTS, tok, source=["wiki", "wiki", "web", "web", "books"],
                                     max_length=10)
    mem.encode(Encoder(len(tok), values=values), progress=False, key_dtype=key_dtype)
    if edits:
        mem.add(["the moon"], source="news")      # stale row
        mem.remove([1])                           # tombstone
        mem.update([0], ["paris is the capital"])  # stale row
    return mem


TABLES = ("token_ids", "lengths", "keys", "values", "valid", "stale", "searchable", "source_index")


def assert_same(a: KnowledgeMemory, b: KnowledgeMemory):
    for name in TABLES:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.cpu().view(torch.uint8) if x.dtype == torch.bfloat16 else x.cpu(),
                           y.cpu().view(torch.uint8) if y.dtype == torch.bfloat16 else y.cpu()), name
    assert a.texts == b.texts and a.sources == b.sources
    assert (a.vocab_size, a.max_length, a.pad_token_id, a.version) == \
           (b.vocab_size, b.max_length, b.pad_token_id, b.version)


# -------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("key_dtype,values", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["f32+values", "bf16-novalues"])
def test_round_trip_bit_exact(tok, tmp_path, mmap, key_dtype, values):
    mem = make_memory(tok, key_dtype=key_dtype, values=values)
    mem.save(tmp_path / "mem")
    files = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert files == ["manifest.json", "tensors.safetensors", "texts.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["mem"]  # no temp dirs left
    back = KnowledgeMemory.load(tmp_path / "mem", mmap=mmap)
    assert_same(mem, back)
    q = torch.randn(3, 6)
    s1, i1 = mem.search(q, 3)
    s2, i2 = back.search(q, 3)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)
    assert back.sources_of(i2) == mem.sources_of(i1)
    man = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert man["format_version"] == FORMAT_VERSION and man["num_entries"] == len(mem)
    assert man["key_dim"] == 6 and man["value_dim"] == (12 if values else None)
    assert man["sources"] == ["wiki", "web", "books", "news"]
    assert man["tokenizer"]["vocab_size"] == len(tok)
    assert set(man["files"]) == {"tensors.safetensors", "texts.bin"}


def test_unencoded_round_trip_and_overwrite(tok, tmp_path):
    mem = KnowledgeMemory.from_texts(TEXTS[:2], tok)
    mem.save(tmp_path / "m")
    back = KnowledgeMemory.load(tmp_path / "m")
    assert back.keys is None and bool(back.stale.all())
    back.encode(Encoder(len(tok)), progress=False)
    back.save(tmp_path / "m")  # replace an existing save
    again = KnowledgeMemory.load(tmp_path / "m")
    assert_same(back, again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_mmap_load_then_mutate_leaves_file_alone(tok, tmp_path):
    make_memory(tok).save(tmp_path / "m")
    before = (tmp_path / "m" / "tensors.safetensors").read_bytes()
    mem = KnowledgeMemory.load(tmp_path / "m", mmap=True)
    mem.remove([0, 2])
    mem.set_keys(torch.randn(len(mem), 6), torch.randn(len(mem), 12))
    mem.compact()
    assert (tmp_path / "m" / "tensors.safetensors").read_bytes() == before
    KnowledgeMemory.load(tmp_path / "m")  # still verifies


def test_loaded_memory_needs_matching_tokenizer(tok, tmp_path):
    make_memory(tok).save(tmp_path / "m")
    mem = KnowledgeMemory.load(tmp_path / "m")
    with pytest.raises(ValueError, match="tokenizer is required"):
        mem.add(["the moon"])
    ids = mem.add(["the moon"], tok, source="news")
    assert mem.sources_of(ids) == ["news"]


def test_refuses_to_replace_foreign_directory(tok, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not a saved KnowledgeMemory"):
        make_memory(tok).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists()


# ---------------------------------------------------------------------------- atomic saves

CHILD = textwrap.dedent("""
    import sys, torch
    from pluglm.memory import KnowledgeMemory
    path = sys.argv[1]
    mem = KnowledgeMemory.load(path)
    mem.remove([0, 2])                      # version 2 differs from version 1
    mem.save(path)
""")


def _kill_mid_save(path: Path, stage: str, tmp_path: Path, *, exchange: bool = True,
                   while_paused=None):
    signal_file = tmp_path / f"reached-{stage}"
    env = dict(os.environ, _PLUGLM_SAVE_PAUSE_AT=stage, _PLUGLM_SAVE_SIGNAL=str(signal_file),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not exchange:
        env["_PLUGLM_SAVE_NO_EXCHANGE"] = "1"
    run_child_until_killed([sys.executable, "-c", CHILD, str(path)], env, signal_file, stage,
                           while_paused=while_paused, timeout=60)


@pytest.mark.parametrize("stage,exchange,expect", [
    ("files_written", True, "old"),    # temp dir half-written
    ("before_swap", True, "old"),      # temp dir complete, not swapped in
    ("after_swap", True, "new"),       # swapped (atomic exchange), old copy not yet deleted
    ("mid_swap", False, "old"),        # two-rename fallback: killed between the renames
    ("after_swap", False, "new"),
])
def test_sigkill_mid_save_leaves_a_complete_version(tok, tmp_path, stage, exchange, expect):
    path = tmp_path / "mem"
    old = make_memory(tok, edits=False)
    old.save(path)
    new = KnowledgeMemory.load(path)
    new.remove([0, 2])
    seen = []

    def load_during_swap():
        # The saver is paused between its two renames: the target is momentarily missing,
        # and a reader gets the previous version from the aside copy.
        assert not path.exists()
        with pytest.warns(RuntimeWarning, match="interrupted"):
            seen.append(KnowledgeMemory.load(path))

    _kill_mid_save(path, stage, tmp_path, exchange=exchange,
                   while_paused=load_during_swap if stage == "mid_swap" else None)
    want = old if expect == "old" else new
    if stage == "mid_swap":
        assert_same(old, seen[0])
        assert not path.exists()  # the saver died mid-swap; load puts the old version back
    got = KnowledgeMemory.load(path)
    assert_same(want, got)
    # the next save cleans up after the dead process
    got.save(path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".mem.")]
    assert leftovers == []
    assert_same(got, KnowledgeMemory.load(path))


# ------------------------------------------------------------------------- damaged inputs


@pytest.fixture
def saved(tok, tmp_path):
    path = tmp_path / "mem"
    make_memory(tok).save(path)
    return path


def _flip_byte(p: Path, offset: int):
    data = bytearray(p.read_bytes())
    data[offset] ^= 0x55
    p.write_bytes(bytes(data))


def test_corrupted_tensor_file(saved):
    f = saved / "tensors.safetensors"
    _flip_byte(f, f.stat().st_size - 3)
    with pytest.raises(MemoryFormatError, match=r"tensors\.safetensors: sha256 checksum mismatch"):
        KnowledgeMemory.load(saved)


def test_corrupted_header_without_verify(saved):
    f = saved / "tensors.safetensors"
    _flip_byte(f, 2)  # header length field: unreadable safetensors
    with pytest.raises(MemoryFormatError, match=r"tensors\.safetensors"):
        KnowledgeMemory.load(saved, verify=False)


def test_truncated_files(saved):
    f = saved / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-17])
    with pytest.raises(MemoryFormatError, match=r"tensors\.safetensors: .*truncated"):
        KnowledgeMemory.load(saved)


def test_corrupted_texts(saved):
    f = saved / "texts.bin"
    _flip_byte(f, 5)
    with pytest.raises(MemoryFormatError, match=r"texts\.bin: sha256"):
        KnowledgeMemory.load(saved)


@pytest.mark.parametrize("name", ["tensors.safetensors", "texts.bin", "manifest.json"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        KnowledgeMemory.load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved memory"):
        KnowledgeMemory.load(tmp_path / "nope")


def _edit_manifest(path: Path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_newer_format_version(saved):
    _edit_manifest(saved, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(MemoryFormatError, match="newer pluglm"):
        KnowledgeMemory.load(saved)


def test_truncated_manifest(saved):
    f = saved / "manifest.json"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(MemoryFormatError, match=r"manifest\.json: not valid JSON"):
        KnowledgeMemory.load(saved)


def test_manifest_disagrees_with_tensors(saved):
    _edit_manifest(saved, lambda m: m["tensors"]["keys"].update(shape=[1, 6]))
    with pytest.raises(MemoryFormatError, match="tensor 'keys'"):
        KnowledgeMemory.load(saved)


def test_token_ids_out_of_vocab(saved):
    _edit_manifest(saved, lambda m: m["tokenizer"].update(vocab_size=3))
    with pytest.raises(MemoryFormatError, match=r"token ids must be in \[0, 3\)"):
        KnowledgeMemory.load(saved)


def test_wrong_format_name(saved):
    _edit_manifest(saved, lambda m: m.update(format="something.else"))
    with pytest.raises(MemoryFormatError, match="format is 'something.else'"):
        KnowledgeMemory.load(saved)


def test_no_pickle_in_saved_files(saved):
    for p in saved.iterdir():
        data = p.read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4], p.name
