"""Model checkpoint safety: atomic saves under SIGKILL, checksums, no pickle on load, and a
memory that does not fit the model.

``PreTrainedModel.save_pretrained`` writes in place (a kill mid-write leaves a truncated
checkpoint and no previous version); ``pluglm.safe_save.save_pretrained_atomic`` writes a
temporary sibling and swaps it in, so a kill at any point leaves a loadable checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pluglm import KnowledgeMemory, PlugLMConfig, PlugLMForMaskedLM
from pluglm.safe_save import (CHECKSUMS_FILE, CheckpointError, from_pretrained_safe,
                              save_pretrained_atomic)

from conftest import run_child_until_killed, wordpiece_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "cat", "sat", "on", "mat", "paris", "is", "capital", "of", "france", "water",
         "boils", "at", "degrees", "moon", "sea"]


def tiny_config(**kw) -> PlugLMConfig:
    base = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=24, type_vocab_size=2,
                num_memory_layers=1, memory_k=2, key_dim=8, doc_max_length=10,
                memory_ffn_dim=8)
    base.update(kw)
    return PlugLMConfig(**base)


def make_model(seed: int, **kw) -> PlugLMForMaskedLM:
    torch.manual_seed(seed)
    return PlugLMForMaskedLM(tiny_config(**kw)).eval()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def tokenizer():
    return wordpiece_tokenizer(WORDS)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


# ----------------------------------------------------------------------- kill mid-save

# The child loads version 1 from PATH, changes every weight (version 2) and saves it back,
# plainly or atomically. CRASH=write: the safetensors writer writes half the file, then the
# process SIGKILLs itself (a kill in the middle of the weights). Otherwise the _io test hook
# pauses the save at a named stage for the parent to kill it.
CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    import transformers.modeling_utils as mu
    from pluglm import PlugLMForMaskedLM
    from pluglm.safe_save import save_pretrained_atomic
    path, mode, crash = sys.argv[1], sys.argv[2], sys.argv[3]
    model = PlugLMForMaskedLM.from_pretrained(path, use_safetensors=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if crash == "write":
        real = mu.safe_save_file
        def half_then_die(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        mu.safe_save_file = half_then_die
    if mode == "plain":
        model.save_pretrained(path)
    else:
        save_pretrained_atomic(model, path)
""")


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def _run_child(path: Path, mode: str, crash: str, tmp_path: Path, *, exchange: bool = True,
               while_paused=None) -> None:
    extra = {}
    signal_file = tmp_path / f"reached-{crash}"
    if crash != "write":
        extra = {"_PLUGLM_SAVE_PAUSE_AT": crash, "_PLUGLM_SAVE_SIGNAL": str(signal_file)}
        if not exchange:
            extra["_PLUGLM_SAVE_NO_EXCHANGE"] = "1"
    run_child_until_killed([sys.executable, "-c", CHILD, str(path), mode, crash],
                           _child_env(extra), None if crash == "write" else signal_file, crash,
                           while_paused=while_paused)


def _plus_one(w: dict) -> dict:
    # version 2 of the child: every float weight + 1 (buffers such as the BatchNorm
    # counters are saved unchanged)
    return {n: (t + 1.0 if t.is_floating_point() and not n.endswith(("running_mean", "running_var"))
                else t) for n, t in w.items()}


def test_plain_save_pretrained_killed_mid_write_loses_the_checkpoint(tmp_path):
    """Why save_pretrained_atomic exists: the in-place save leaves a truncated file, and
    loading it fails (with a clear error, not a crash)."""
    path = tmp_path / "ckpt"
    make_model(0).save_pretrained(path)
    _run_child(path, "plain", "write", tmp_path)
    with pytest.raises(Exception) as ei:
        PlugLMForMaskedLM.from_pretrained(path, use_safetensors=True)
    assert not isinstance(ei.value, (SystemError, MemoryError))
    assert str(ei.value)


@pytest.mark.parametrize("crash,exchange,expect", [
    ("write", True, "old"),          # killed inside the weights write (temp dir half-written)
    ("before_swap", True, "old"),    # temp dir complete and fsynced, not swapped in
    ("after_swap", True, "new"),     # swapped by the atomic exchange, old copy not deleted yet
    ("mid_swap", False, "old"),      # two-rename fallback: killed between the renames
])
def test_atomic_save_killed_leaves_a_loadable_checkpoint(tmp_path, crash, exchange, expect):
    path = tmp_path / "ckpt"
    v1 = make_model(0)
    save_pretrained_atomic(v1, path)
    w1 = weights(v1)
    seen = []

    def load_while_paused():
        # the saver sits between its two renames: the target is missing, a reader gets the
        # previous version from the aside copy
        assert not path.exists()
        with pytest.warns(RuntimeWarning, match="interrupted"):
            seen.append(weights(from_pretrained_safe(PlugLMForMaskedLM, path)))

    _run_child(path, "atomic", crash, tmp_path, exchange=exchange,
               while_paused=load_while_paused if crash == "mid_swap" else None)
    if seen:
        assert same_weights(seen[0], w1)
    got = weights(from_pretrained_safe(PlugLMForMaskedLM, path))
    want = w1 if expect == "old" else _plus_one(w1)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=n)
    # the next save cleans up what the dead process left
    save_pretrained_atomic(make_model(1), path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")] == []
    assert same_weights(weights(from_pretrained_safe(PlugLMForMaskedLM, path)),
                        weights(make_model(1)))


def test_atomic_save_round_trip_with_tokenizer(tmp_path, tok):
    path = tmp_path / "ckpt"
    model = make_model(3)
    save_pretrained_atomic(model, path, tokenizer=tok)
    assert (path / CHECKSUMS_FILE).is_file() and (path / "config.json").is_file()
    loaded = from_pretrained_safe(PlugLMForMaskedLM, path)
    assert same_weights(weights(loaded), weights(model))
    mem = _memory(tok, model.config.key_dim, model.config.hidden_size)
    ids = torch.randint(5, 40, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.set_memory(mem)(ids).logits, model.set_memory(mem)(ids).logits)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(path))("the cat")["input_ids"] == tok("the cat")["input_ids"]


def test_atomic_save_refuses_foreign_directory_and_pickle(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not a saved model"):
        save_pretrained_atomic(make_model(0), foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8"
    with pytest.raises(ValueError, match="pickle"):
        save_pretrained_atomic(make_model(0), tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained_atomic(make_model(0), path)
    return path


def _flip_byte(p: Path, offset: int) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0x55
    p.write_bytes(bytes(data))


def test_flipped_weight_byte_is_caught_by_checksum(saved):
    f = saved / "model.safetensors"
    _flip_byte(f, f.stat().st_size - 5)  # inside tensor data: safetensors alone cannot tell
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 checksum mismatch"):
        from_pretrained_safe(PlugLMForMaskedLM, saved)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_truncated_file_is_caught(saved, name):
    f = saved / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{name}.*truncated"):
        from_pretrained_safe(PlugLMForMaskedLM, saved)


def test_truncated_weights_without_checksums_still_a_clear_error(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(Exception) as ei:
        from_pretrained_safe(PlugLMForMaskedLM, saved, verify=False)
    assert str(ei.value) and not isinstance(ei.value, (SystemError, MemoryError))


def test_newer_checksums_format_is_refused(saved):
    m = saved / CHECKSUMS_FILE
    doc = json.loads(m.read_text())
    doc["format_version"] = 99
    m.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        from_pretrained_safe(PlugLMForMaskedLM, saved)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved model"):
        from_pretrained_safe(PlugLMForMaskedLM, tmp_path / "nothing")


# ------------------------------------------------------------------ loading runs no code


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling (pickle or torch.load) during the test raises."""
    calls = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise AssertionError("loading must not unpickle")

    class RefusingUnpickler:
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_model_load_never_unpickles(saved, no_pickle):
    model = from_pretrained_safe(PlugLMForMaskedLM, saved)
    plain = PlugLMForMaskedLM.from_pretrained(saved, use_safetensors=True)
    assert same_weights(weights(model), weights(plain))
    assert no_pickle == []


@pytest.mark.parametrize("mmap", [True, False])
def test_memory_load_never_unpickles(tmp_path, tok, mmap, no_pickle):
    mem = KnowledgeMemory.from_texts(["the cat sat on the mat", "paris is the capital of france",
                                      "water boils"], tok, max_length=10)
    mem.encode(make_model(0), progress=False)
    mem.save(tmp_path / "mem")
    loaded = KnowledgeMemory.load(tmp_path / "mem", mmap=mmap)
    assert torch.equal(loaded.keys, mem.keys) and loaded.texts == mem.texts
    assert no_pickle == []


def test_pickle_only_checkpoint_is_refused_unopened(tmp_path, monkeypatch):
    """A checkpoint with only pytorch_model.bin (pickle) is an error; the file is never read."""
    path = tmp_path / "ckpt"
    model = make_model(0)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or {})
    with pytest.raises(Exception) as ei:
        from_pretrained_safe(PlugLMForMaskedLM, path)
    assert "safetensors" in str(ei.value).lower() or "model.safetensors" in str(ei.value)
    assert opened == []
    with pytest.raises(ValueError, match="unpickle"):
        from_pretrained_safe(PlugLMForMaskedLM, path, use_safetensors=False)
    with pytest.raises(ValueError, match="execute code"):
        from_pretrained_safe(PlugLMForMaskedLM, path, trust_remote_code=True)


# --------------------------------------------------------------- memory that does not fit


def _memory(tok, key_dim: int, value_dim: int) -> KnowledgeMemory:
    mem = KnowledgeMemory.from_texts(["the cat sat", "paris is the capital of france",
                                      "water boils at degrees", "the moon", "the sea"], tok,
                                     max_length=10)
    mem.set_keys(torch.randn(len(mem), key_dim), torch.randn(len(mem), value_dim))
    return mem


def test_check_compatible_names_the_mismatch(tok):
    cfg = tiny_config()
    good = _memory(tok, cfg.key_dim, cfg.hidden_size)
    good.check_compatible(key_dim=cfg.key_dim, value_dim=cfg.hidden_size, vocab_size=cfg.vocab_size)
    with pytest.raises(ValueError, match=f"key_dim=5, the model expects {cfg.key_dim}"):
        _memory(tok, 5, cfg.hidden_size).check_compatible(key_dim=cfg.key_dim)
    with pytest.raises(ValueError, match="width 7, the model expects"):
        _memory(tok, cfg.key_dim, 7).check_compatible(value_dim=cfg.hidden_size)
    with pytest.raises(ValueError, match="vocabulary"):
        good.check_compatible(vocab_size=len(tok) - 1)


def test_forward_with_wrong_key_dim_memory_is_a_clear_error(tok):
    # a memory without check_compatible (a bare protocol object) is caught at forward time
    from pluglm.nn import TensorMemory

    model = make_model(0)
    mem = _memory(tok, 5, model.config.hidden_size)
    model.set_memory(TensorMemory(mem.keys, mem.values), reencode=False)
    with pytest.raises(ValueError, match="keys must have 8 columns to match queries"):
        model(torch.randint(5, 40, (2, 6)))


def test_set_memory_rejects_memory_that_does_not_fit(tok):
    model = make_model(0)
    with pytest.raises(ValueError, match="key_dim"):
        model.set_memory(_memory(tok, 5, model.config.hidden_size))
