"""AsyncKeyRefresher (pluglm.refresh): result, concurrency, errors, cancel, leaks, CUDA path.

Memories are built straight from random token ids (a KnowledgeMemory over a MemorySnapshot),
except the mutation test, which needs a tokenizer (a tiny in-code WordLevel one). Encoders:
a tiny real PlugLM model (its copy path) and a small nn.Module with ``encode_memory`` (the
generic deep-copy path), optionally slowed down or made to fail after some chunks.
"""
from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch
from torch import nn

import pluglm_kernels
from pluglm.memory import KnowledgeMemory, MemorySnapshot
from pluglm.refresh import AsyncKeyRefresher, snapshot_encoder

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# ------------------------------------------------------------------------------ helpers


def rel_err(out, ref):
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def make_memory(M, L, vocab, device="cpu", min_len=2):
    """A KnowledgeMemory of M random entries of 2..L tokens (pad id 0), not encoded."""
    lengths = torch.randint(min_len, L + 1, (M,), dtype=torch.int32)
    mask = torch.arange(L)[None] < lengths[:, None]  # [M, L]
    ids = (torch.randint(5, vocab, (M, L)) * mask).to(torch.int16)
    snap = MemorySnapshot(
        token_ids=ids.to(device), lengths=lengths.to(device), keys=None, values=None,
        valid=torch.ones(M, dtype=torch.bool, device=device),
        stale=torch.ones(M, dtype=torch.bool, device=device),
        finite=torch.ones(M, dtype=torch.bool, device=device),
        source_index=torch.zeros(M, dtype=torch.int32), sources=["test"],
        texts=tuple(f"doc {i}" for i in range(M)), rev=torch.arange(M, dtype=torch.int64),
        version=0, vocab_size=vocab, tokenizer_name="random", pad_token_id=0, max_length=L)
    return KnowledgeMemory(snap)


def tiny_pluglm(vocab=200, d=32, key_dim=16, L=24, device="cpu"):
    from pluglm.configuration_pluglm import PlugLMConfig
    from pluglm.modeling_pluglm import PlugLMForMaskedLM

    cfg = PlugLMConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=2 * d, max_position_embeddings=max(L, 32), type_vocab_size=2,
                       num_memory_layers=1, memory_k=3, key_dim=key_dim, doc_max_length=L,
                       memory_ffn_dim=d)
    model = PlugLMForMaskedLM(cfg)
    with torch.no_grad():  # non-trivial weights everywhere (init leaves LayerNorms at 1/0)
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("weight") and "LayerNorm" in name else 0.0)
                    + 0.3 * torch.randn_like(p))
    return model.to(device)


class SmallEncoder(nn.Module):
    """Embedding -> masked mean -> (W_k, W_v), optionally slow (sleeps per chunk, which
    releases the GIL like a long kernel) or failing at its ``fail_at``-th chunk."""

    def __init__(self, vocab, d=16, key_dim=8, sleep_s=0.0, fail_at=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.wk = nn.Linear(d, key_dim)
        self.wv = nn.Linear(d, d)
        self.sleep_s = sleep_s
        self.fail_at = fail_at
        self.calls = 0

    def encode_memory(self, token_ids, attention_mask):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError(f"encoder failed at chunk {self.calls}")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        m = attention_mask.to(self.emb.weight.dtype).unsqueeze(-1)  # [E, L, 1]
        x = (self.emb(token_ids) * m).sum(1) / m.sum(1).clamp_min(1)  # [E, d]
        return self.wk(x), self.wv(x)


def sync_encode(encoder, memory):
    """Keys/values of every entry of memory's snapshot with encoder, in one call."""
    s = memory.snapshot()
    tok = s.token_ids.long()
    mask = s.attention_mask(s.lengths, tok.shape[1])
    with torch.no_grad():
        return encoder.encode_memory(tok, mask)


def perturb_(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def step_until(refresher, pred, timeout=30.0, work=None):
    """Call refresher.step() (and work()) until pred() holds; returns the number of steps."""
    t0, n = time.perf_counter(), 0
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError("timed out waiting for the refresher")
        if work is not None:
            work()
        else:
            time.sleep(0.002)
        refresher.step()
        n += 1
    return n


# -------------------------------------------------------------------------------- result


@pytest.mark.parametrize("kind", ["pluglm", "generic"])
def test_refresh_equals_sync_encode_with_snapshot_weights(fresh_seed, kind):
    vocab, L, M = 211, 23, 1531  # odd sizes; chunk does not divide M
    model = tiny_pluglm(vocab, L=L) if kind == "pluglm" else SmallEncoder(vocab)
    mem = make_memory(M, L, vocab)
    mem.remove(torch.tensor([0, 17, M - 1]))  # removed rows are not encoded
    old = snapshot_encoder(model)  # what the refresh must use
    ref_k, ref_v = sync_encode(old, mem)
    with AsyncKeyRefresher(model, mem, interval=0, chunk=200) as r:
        r.refresh_now()
        perturb_(model)  # training moves the live weights right after the refresh starts
        committed = r.wait()
        assert committed == M
        assert r.refreshes == 1 and not r.running and r.progress == 1.0
        assert r.last_duration_s > 0 and r.last_entries_per_s > 0
    live = mem.valid
    assert mem.keys.shape == ref_k.shape and mem.values.shape == ref_v.shape
    assert rel_err(mem.keys[live], ref_k[live]) <= 1e-5
    assert rel_err(mem.values[live], ref_v[live]) <= 1e-5
    new_k, _ = sync_encode(model, mem)
    assert rel_err(mem.keys[live], new_k[live]) > 1e-2  # really the old weights
    assert not mem.stale[live].any()
    assert mem.num_searchable == M - 3


def test_refresh_keeps_key_dtype_and_values_false(fresh_seed):
    vocab, L, M = 97, 11, 257
    enc = SmallEncoder(vocab)
    mem = make_memory(M, L, vocab)
    mem.encode(enc, progress=False, key_dtype=torch.bfloat16)
    old_values = mem.values.clone()
    perturb_(enc)
    ref_k, _ = sync_encode(enc, mem)
    with AsyncKeyRefresher(enc, mem, interval=0, chunk=64, values=False) as r:
        assert r.refresh_now(block=True) == M
    assert mem.keys.dtype == torch.bfloat16
    assert rel_err(mem.keys, ref_k) <= 1e-2
    assert torch.equal(mem.values, old_values)  # values=False keeps the stored values


def test_sharded_memory_each_rank_refreshes_its_shard(fresh_seed):
    """The refresher only needs the memory it is given: refreshing two row-range shards
    separately gives the rows of one full refresh."""
    vocab, L, M = 131, 13, 301
    enc = SmallEncoder(vocab)
    full = make_memory(M, L, vocab)
    s = full.snapshot()
    shards = []
    for a, b in ((0, 150), (150, M)):
        sub = s._replace(token_ids=s.token_ids[a:b], lengths=s.lengths[a:b], valid=s.valid[a:b],
                         stale=s.stale[a:b], finite=s.finite[a:b], source_index=s.source_index[a:b],
                         texts=s.texts[a:b], rev=torch.arange(b - a))
        shards.append(KnowledgeMemory(sub))
    ref_k, _ = sync_encode(enc, full)
    for shard in shards:
        with AsyncKeyRefresher(enc, shard, interval=0, chunk=37) as r:
            r.refresh_now(block=True)
    assert rel_err(torch.cat([sh.keys for sh in shards]), ref_k) <= 1e-5


def test_host_model_encoder_snapshot_is_independent(fresh_seed):
    """apply_pluglm's encoder reads the host's embedding through a closure, not a submodule:
    the generic copy must still freeze it (and must not copy the plugged-in memory)."""
    from transformers import BertConfig, BertForMaskedLM

    from pluglm.integrations import apply_pluglm

    vocab, L, M = 90, 12, 211
    host = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=48,
                                      max_position_embeddings=32))
    apply_pluglm(host, None, layers=[-1], keep_ffn=False, key_dim=8, memory_k=2)
    enc = host.pluglm_encoder
    mem = make_memory(M, L, vocab)
    mem.encode(enc, progress=False)
    host.set_memory(mem)
    enc.eval()
    ref_k, ref_v = sync_encode(enc, mem)
    with AsyncKeyRefresher(enc, mem, interval=0, chunk=50) as r:
        r.refresh_now()
        perturb_(host.get_input_embeddings())  # the host's live embedding moves on
        assert r.wait() == M
    assert rel_err(mem.keys, ref_k) <= 1e-5 and rel_err(mem.values, ref_v) <= 1e-5
    assert rel_err(sync_encode(enc, mem)[0], ref_k) > 1e-2


# ----------------------------------------------------------------------- concurrency


def test_training_keeps_stepping_during_refresh(fresh_seed):
    """A real (tiny) PlugLM training loop runs while a larger memory is re-encoded."""
    vocab, L, M = 300, 32, 4_000
    model = tiny_pluglm(vocab, d=48, L=L)
    mem = make_memory(M, L, vocab, min_len=L // 2)
    mem.encode(model, progress=False, batch_size=4096)
    model.set_memory(mem)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(5, vocab, (4, 16))
    labels = ids.clone()

    def train_step():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    with AsyncKeyRefresher(model, mem, interval=3, chunk=1024) as r:
        version0 = mem.version
        for _ in range(3):
            train_step()
            r.step()  # the third starts the refresh
        assert r.running
        steps = step_until(r, lambda: r.refreshes == 1, timeout=120, work=train_step)
    assert steps >= 1, "training made no progress during the refresh"
    assert mem.version > version0
    print(f"steps during a refresh of {M} entries: {steps}")


def test_concurrent_searches_see_whole_tables(fresh_seed):
    vocab, L, M, k = 157, 17, 3001, 7
    enc = SmallEncoder(vocab, sleep_s=0.01)
    mem = make_memory(M, L, vocab)
    mem.encode(enc, progress=False)
    old_keys = mem.keys.clone()
    perturb_(enc, 1.0)
    new_keys, _ = sync_encode(enc, mem)
    q = torch.randn(5, old_keys.shape[1])
    # The memory's own tie rule (lower id first), not torch.topk's: make_memory repeats some
    # short token sequences, and 2 seeds in 60 put two identical keys at the k-th place, where
    # torch.topk kept the other copy and every search then matched "neither table".
    expect = [pluglm_kernels.mips_topk(q, t, k)[1].sort(dim=1).values for t in (old_keys, new_keys)]
    assert not torch.equal(expect[0], expect[1])
    seen = {0: 0, 1: 0}
    bad = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            _, idx = mem.search(q, k)
            got = idx.sort(dim=1).values
            which = [i for i in (0, 1) if torch.equal(got, expect[i])]
            if not which:
                bad.append(got)
            else:
                seen[which[0]] += 1

    t = threading.Thread(target=searcher)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while seen[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert seen[0], f"no search matched the old table ({len(bad)} matched neither)"
        with AsyncKeyRefresher(enc, mem, interval=0, chunk=100) as r:
            r.refresh_now()
            n0, t0 = seen[0], time.perf_counter()
            while seen[0] < n0 + 3 and time.perf_counter() - t0 < 10:
                time.sleep(0.001)
            assert r.running and r.refreshes == 0  # those searches ran during the refresh
            step_until(r, lambda: not r.running)
        time.sleep(0.05)
        deadline = time.monotonic() + 30  # a wrong search fails below, not by hanging here
        while seen[1] == 0 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} searches matched neither the old nor the new table"
    assert seen[1] >= 1
    assert rel_err(mem.keys, new_keys) <= 1e-5


def test_rows_changed_during_refresh_stay_stale(fresh_seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    texts = [" ".join(words[int(j)] for j in torch.randint(0, 40, (int(n),), generator=g))
             for n in torch.randint(2, 12, (400,), generator=g)]
    mem = KnowledgeMemory.from_texts(texts, tok, max_length=12)
    enc = SmallEncoder(len(vocab), sleep_s=0.01)
    mem.encode(enc, progress=False)
    with AsyncKeyRefresher(enc, mem, interval=0, chunk=50) as r:
        r.refresh_now()
        mem.update([3, 250], ["w1 w2 w3", "w4 w5"])  # content changes mid-refresh
        mem.remove([7])
        new_ids = mem.add(["w9 w8 w7"])
        assert r.wait() == 398  # every snapshot row but the two updated ones
    stale = set(mem.stale.nonzero().squeeze(1).tolist())
    assert stale == {3, 250, int(new_ids[0])}
    assert not mem.valid[7]
    assert mem.num_searchable == 401 - 1 - 3  # 401 entries, 1 removed, 3 stale


# ------------------------------------------------------------------- errors, controls


def test_error_is_raised_in_training_thread_at_next_step(fresh_seed):
    vocab, L, M = 50, 9, 500
    enc = SmallEncoder(vocab, fail_at=3)
    mem = make_memory(M, L, vocab)
    mem.encode(SmallEncoder(vocab), progress=False)
    version = mem.version
    r = AsyncKeyRefresher(enc, mem, interval=2, chunk=64)
    r.step()
    r.step()  # starts the refresh, which fails at its third chunk
    with pytest.raises(RuntimeError, match="encoder failed at chunk 3") as info:
        step_until(r, lambda: False, timeout=30)
    assert threading.current_thread() is threading.main_thread()
    assert any("AsyncKeyRefresher" in n for n in getattr(info.value, "__notes__", [None]))
    assert not r.running and r.last_error is info.value
    assert mem.version == version  # nothing swapped in
    enc.fail_at = None  # the next copy succeeds: the refresher keeps working
    assert r.refresh_now(block=True) == M
    # errors surface through wait() too
    enc.fail_at = 2
    r.refresh_now()
    with pytest.raises(RuntimeError, match="encoder failed"):
        r.wait()
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.step()


def test_bad_encoder_output_raises_at_step(fresh_seed):
    class Bad(SmallEncoder):
        def encode_memory(self, token_ids, attention_mask):
            k, v = super().encode_memory(token_ids, attention_mask)
            return k[:1], v

    mem = make_memory(40, 5, 30)
    with AsyncKeyRefresher(Bad(30), mem, interval=0) as r:
        r.refresh_now()
        with pytest.raises(ValueError, match="expected"):
            r.wait()


def test_cancel_is_prompt_and_frees_buffers(fresh_seed):
    vocab, L, M = 64, 8, 2000
    enc = SmallEncoder(vocab, sleep_s=0.02)
    mem = make_memory(M, L, vocab)
    r = AsyncKeyRefresher(enc, mem, interval=0, chunk=50)  # 40 chunks: ~0.8 s
    r.refresh_now()
    job = r._job
    step_until(r, lambda j=job: j.keys is not None)
    refs = [weakref.ref(job.keys), weakref.ref(job.values), weakref.ref(job.encoder)]
    t0 = time.perf_counter()
    assert r.cancel()
    assert time.perf_counter() - t0 < 0.5
    del job
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert not r.running and r.refreshes == 0 and r.progress == 1.0
    assert mem.keys is None and mem.version == 0  # nothing swapped in
    assert not r.cancel()
    enc.sleep_s = 0.0
    r.refresh_now()
    r.refresh_now()  # restarts (cancels the first)
    assert r.wait() == M and r.refreshes == 1
    r.close()


def test_interval_policy_skip_while_running(fresh_seed):
    vocab, L, M = 64, 8, 600
    enc = SmallEncoder(vocab, sleep_s=0.01)
    mem = make_memory(M, L, vocab)
    r = AsyncKeyRefresher(enc, mem, interval=3, chunk=20)  # ~0.3 s per refresh
    for s in (1, 2):
        r.on_step(s)
        assert not r.running
    r.on_step(3)
    assert r.running and r.steps == 3
    total = r.entries_total
    assert total == M
    for s in range(4, 10):
        r.on_step(s)  # 6 and 9 fall due while the refresh runs: skipped
    assert r.skipped == 2 and r.refreshes == 0
    assert 0.0 <= r.progress < 1.0 and 0 <= r.entries_done <= total
    assert r.wait() == M and r.refreshes == 1
    r.on_step(12)
    assert r.running
    r.close()
    assert not r.running


def test_shadow_allocated_once_and_freed_after_swap(fresh_seed):
    vocab, L, M = 80, 10, 999
    enc = SmallEncoder(vocab, key_dim=8, d=16)
    mem = make_memory(M, L, vocab)
    r = AsyncKeyRefresher(enc, mem, interval=0, chunk=100)
    r.refresh_now()
    job = r._job
    job.finished.wait()
    assert job.allocations == 1  # one key table and one value table, for all 10 chunks
    assert tuple(job.keys.shape) == (M, 8) and tuple(job.values.shape) == (M, 16)
    refs = [weakref.ref(job.keys), weakref.ref(job.values), weakref.ref(job.snapshot)]
    r.step()
    assert r.refreshes == 1 and not r.running
    del job
    gc.collect()
    assert all(ref() is None for ref in refs)  # released at the swap
    r.close()


@pytest.mark.parametrize("kind", ["pluglm", "generic"])
def test_repeated_refreshes_do_not_leak(fresh_seed, rss_mb, kind):
    vocab, L = 120, 16
    M = 1500 if kind == "pluglm" else 4000
    # generic: values of width 256, so each refresh's shadow tables are ~4.3 MB and 20
    # leaked refreshes would add ~90 MB of RSS
    model = tiny_pluglm(vocab, L=L) if kind == "pluglm" else SmallEncoder(vocab, d=256, key_dim=16)
    mem = make_memory(M, L, vocab)
    r = AsyncKeyRefresher(model, mem, interval=1, chunk=1000)
    refs = []

    def one():
        r.step()  # starts a refresh (interval=1)
        job = r._job
        refs.append((weakref.ref(job), weakref.ref(job.encoder), weakref.ref(job.snapshot)))
        del job
        r.wait()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    for _ in range(3):
        one()
    n0 = live_tensors()
    rss = []
    for _ in range(20):
        one()
        rss.append(rss_mb())
    n1 = live_tensors()
    r.close()
    assert r.refreshes == 23
    gc.collect()
    assert all(ref() is None for trio in refs for ref in trio)
    assert n1 <= n0, f"live tensors grew from {n0} to {n1}"
    # With the mmap threshold fixed (rss_mb) readings agree to ~1 MB; a leak grows steadily,
    # so compare the medians of the first and last 5 (generic: a leaked table per refresh
    # would add ~65 MB between them).
    first, last = sorted(rss[:5])[2], sorted(rss[-5:])[2]
    assert last - first < 12, f"RSS grew {last - first:.1f} MB over 15 refreshes: {rss}"


def test_snapshot_encoder_does_not_copy_memory_or_track_live_weights(fresh_seed):
    model = tiny_pluglm(60, L=10)
    mem = make_memory(30, 10, 60)
    model.set_memory(mem)
    enc = snapshot_encoder(model, mem)
    assert all(not p.requires_grad for p in enc.parameters())
    live = dict(model.named_parameters())
    for name, p in enc.named_parameters():
        assert all(p.data_ptr() != q.data_ptr() for q in live.values()), name
    small = SmallEncoder(60)
    small.memory = mem  # an encoder that references the memory: shared, not copied
    copy_ = snapshot_encoder(small, mem)
    assert copy_.memory is mem and copy_.emb.weight.data_ptr() != small.emb.weight.data_ptr()


def test_argument_validation():
    mem = make_memory(10, 4, 20)
    enc = SmallEncoder(20)
    with pytest.raises(TypeError, match="encode_memory"):
        AsyncKeyRefresher(object(), mem)
    with pytest.raises(TypeError, match="KnowledgeMemory"):
        AsyncKeyRefresher(enc, object())
    for kw, match in ((dict(interval=-1), "interval"), (dict(chunk=0), "chunk"),
                      (dict(priority="urgent"), "priority"), (dict(num_threads=0), "num_threads")):
        with pytest.raises(ValueError, match=match):
            AsyncKeyRefresher(enc, mem, **kw)
    r = AsyncKeyRefresher(enc, mem)
    with pytest.raises(TypeError, match="step"):
        r.step(1.5)
    assert r.wait() is None and r.progress == 1.0 and "idle" in repr(r)
    r.close()


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("memory_device", ["cuda", "cpu"])
def test_cuda_refresh_equals_sync_encode(memory_device):
    torch.manual_seed(0)
    vocab, L, M = 500, 64, 20_001
    model = tiny_pluglm(vocab, d=64, L=L, device="cuda")
    mem = make_memory(M, L, vocab, device=memory_device)
    old = snapshot_encoder(model)
    ref_k, ref_v = sync_encode(old, mem.to("cuda"))
    with AsyncKeyRefresher(model, mem, interval=0, chunk=1024) as r:
        r.refresh_now()
        assert r._job.stream is not None and r._job.stream != torch.cuda.current_stream()
        perturb_(model)
        assert r.wait() == M
        assert r.last_duration_s > 0
    assert mem.keys.device.type == memory_device
    assert rel_err(mem.keys, ref_k) <= 1e-4 and rel_err(mem.values, ref_v) <= 1e-4


@pytest.mark.gpu
@requires_cuda
def test_cuda_training_steps_and_searches_during_refresh():
    torch.manual_seed(0)
    vocab, L, M, k = 1000, 128, 200_000, 5
    model = tiny_pluglm(vocab, d=128, key_dim=32, L=L, device="cuda")
    mem = make_memory(M, L, vocab, device="cuda")
    mem.encode(model, progress=False, batch_size=8192)
    old_keys = mem.keys.clone()
    q = torch.randn(8, 32, device="cuda")
    x = torch.randn(2048, 2048, device="cuda")
    with AsyncKeyRefresher(model, mem, interval=0, chunk=8192) as r:
        perturb_(model)
        r.refresh_now()
        steps = 0
        while r.running:
            (x @ x).sum().item()  # the "training" stream keeps working and syncing
            _, idx = mem.search(q, k)
            steps += 1
            r.step()
        assert r.refreshes == 1 and steps >= 1
    new_k, _ = sync_encode(snapshot_encoder(model), mem)
    assert rel_err(mem.keys, new_k) <= 1e-4 and rel_err(mem.keys, old_keys) > 1e-2


def test_full_refresh_adopts_the_shadow_without_a_copy(fresh_seed):
    """A full, unedited refresh hands its shadow table to the memory (no third table at the
    swap); adopt=False (the default for callers) copies."""
    mem = make_memory(6, 8, 50)
    mem.set_keys(torch.randn(6, 4), None)  # encoded once (a new layout is always copied)
    keys = torch.randn(6, mem.keys.shape[1])
    mem.set_keys(keys, None, snapshot=mem.snapshot(), adopt=True)
    assert mem.keys.data_ptr() == keys.data_ptr() and not bool(mem.stale.any())  # adopted
    keys2 = torch.randn(6, mem.keys.shape[1])
    mem.set_keys(keys2, None)
    assert mem.keys.data_ptr() != keys2.data_ptr() and torch.equal(mem.keys, keys2)
    # a partial set (ids) is never adopted
    keys3 = torch.randn(2, mem.keys.shape[1])
    mem.set_keys(keys3, None, ids=[1, 4], adopt=True)
    assert torch.equal(mem.keys[[1, 4]], keys3) and torch.equal(mem.keys[0], keys2[0])
