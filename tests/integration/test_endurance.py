"""Endurance and concurrency of a KnowledgeMemory on CPU.

- 10 000 cycles of add -> re-encode (encode(only_stale=True)) -> remove of one entry, with
  an update-and-restore of a base entry every 5th cycle, a compact every 250 cycles and a
  full key refresh (AsyncKeyRefresher) every 2 000. Resident memory must not grow after
  warm-up, and
  search results for fixed queries must be bit-identical whenever the table content is the
  original one: the encoder below is bitwise independent of batch composition, so any
  difference is drift in the memory itself.
- Searches concurrent with add/remove/update *and* the refresher's swap each see one
  consistent table, and nothing is lost: afterwards every live row is encoded from its
  current text.
"""
from __future__ import annotations

import gc
import os
import random
import threading
import time

import pytest
import torch
from torch import nn

from pluglm.memory import KnowledgeMemory

from conftest import wordpiece_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "it", "was", "good", "bad", "dog", "ran", "fast",
         "paris", "is", "capital", "of", "france", "water", "boils", "at", "hundred", "degrees",
         "a", "an", "and", "or", "not", "very", "blue", "sky", "sea", "moon"]


def tokenizer():
    return wordpiece_tokenizer(WORDS + ["."])


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


class RowwiseEncoder(nn.Module):
    """Masked mean of embeddings -> W_k, W_v, with every reduction an explicit loop of
    elementwise ops: each entry's key is the same bits whatever batch, padding width or
    thread count encodes it (a BLAS matmul does not promise that)."""

    def __init__(self, vocab: int, d: int = 8, key_dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, d, generator=g))
        self.wk = nn.Parameter(torch.randn(d, key_dim, generator=g) / d ** 0.5)
        self.wv = nn.Parameter(torch.randn(d, d, generator=g) / d ** 0.5)

    def encode_memory(self, token_ids, attention_mask):
        m = attention_mask.to(torch.float32)  # [E, L]
        acc = torch.zeros(token_ids.shape[0], self.emb.shape[1])  # [E, d]
        for t in range(token_ids.shape[1]):
            acc = acc + self.emb[token_ids[:, t]] * m[:, t:t + 1]
        p = acc / m.sum(1, keepdim=True).clamp_min(1)  # [E, d]; sum of 0/1s is exact
        keys = torch.zeros(p.shape[0], self.wk.shape[1])
        values = torch.zeros(p.shape[0], self.wv.shape[1])
        for i in range(p.shape[1]):
            keys = keys + p[:, i:i + 1] * self.wk[i]
            values = values + p[:, i:i + 1] * self.wv[i]
        return keys, values


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


# 10 000 cycles of one add + one re-encode + one remove; every UPDATE_EVERY-th cycle also
# updates a base entry and restores it (two more re-encodes).
CYCLES, BASE, K, UPDATE_EVERY, COMPACT_EVERY, REFRESH_EVERY, CHECK_EVERY = \
    10_000, 48, 6, 5, 250, 2_000, 500


def test_ten_thousand_cycles_no_growth_no_drift(tok, rss_mb):
    from pluglm.refresh import AsyncKeyRefresher

    torch.manual_seed(0)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    base_texts = [text(rng, rng.randint(1, 9)) for _ in range(BASE)]
    mem = KnowledgeMemory.from_texts(base_texts, tok, source="base", max_length=12)
    enc = RowwiseEncoder(len(tok)).eval()
    mem.encode(enc, batch_size=7, progress=False)
    queries = torch.randn(9, 8)  # fixed
    s0, i0 = mem.search(queries, K)
    keys0 = mem.keys.clone()
    width0 = mem.token_ids.shape[1]
    refresher = AsyncKeyRefresher(enc, mem, interval=0, chunk=16, num_threads=1)

    rss: list[tuple[int, float]] = []
    tensors_after_warmup = None
    t0 = time.perf_counter()
    try:
        for c in range(CYCLES):
            victim = (c // UPDATE_EVERY) % BASE
            touch = c % UPDATE_EVERY == 0
            ids = mem.add([text(rng, rng.randint(1, 9))], source=f"s{c % 3}")
            if touch:
                mem.update([victim], [text(rng, rng.randint(1, 9))])
            assert mem.encode(enc, batch_size=4, progress=False, only_stale=True) == 1 + touch
            if touch:
                scores, found = mem.search(queries, K)  # a changed table: just sane
                assert bool(mem.searchable[found].all()) and bool(torch.isfinite(scores).all())
            mem.remove(ids)
            if touch:
                mem.update([victim], [base_texts[victim]])
                assert mem.encode(enc, batch_size=3, progress=False, only_stale=True) == 1
            if c % COMPACT_EVERY == COMPACT_EVERY - 1:
                mapping = mem.compact()
                assert torch.equal(mapping[:BASE], torch.arange(BASE)) and len(mem) == BASE
            if c % REFRESH_EVERY == REFRESH_EVERY - 1:
                refresher.refresh_now(block=True)  # full re-encode, swapped in
            if c % CHECK_EVERY == CHECK_EVERY - 1:
                # content is the original one: bit-identical keys and search results
                assert torch.equal(mem.keys[:BASE], keys0), f"keys drifted by cycle {c}"
                s, i = mem.search(queries, K)
                assert torch.equal(i, i0) and torch.equal(s, s0), f"search drifted by cycle {c}"
                rss.append((c, rss_mb()))
            if c == 1_499:
                tensors_after_warmup = _live_tensors()
    finally:
        refresher.close()
    elapsed = time.perf_counter() - t0

    assert refresher.refreshes == CYCLES // REFRESH_EVERY
    assert len(mem) == BASE and mem.num_searchable == BASE
    assert mem.texts == tuple(base_texts) and mem.token_ids.shape[1] <= max(width0, 12)
    assert set(mem.sources) <= {"base"}, mem.sources  # unused names are dropped by compact
    assert _live_tensors() <= tensors_after_warmup + 10
    # Memory: after a warm-up of 1 500 cycles, RSS stays within a fixed slack, and the trend
    # over the second half would not add more than a few MB per 10 000 cycles.
    warm = [m for c, m in rss if c >= 1_499]
    assert max(warm) - warm[0] < 24, f"RSS grew {max(warm) - warm[0]:.1f} MB: {rss}"
    half = [(c, m) for c, m in rss if c >= CYCLES // 2]
    n = len(half)
    mr, mm = sum(r for r, _ in half) / n, sum(m for _, m in half) / n
    slope = sum((r - mr) * (m - mm) for r, m in half) / sum((r - mr) ** 2 for r, _ in half)
    assert slope * 10_000 < 16, f"RSS trend {slope * 1000:.3f} MB per 1000 cycles: {rss}"
    print(f"\n{CYCLES} cycles in {elapsed:.1f}s; RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MB; "
          f"trend {slope * 1000:.3f} MB/1000 cycles")


def test_searches_consistent_during_mutations_and_refresher_swaps(tok):
    """Two searchers, one mutator (add/update/remove/encode) and the training thread driving
    an AsyncKeyRefresher whose background re-encodes swap in while the others run."""
    from pluglm.refresh import AsyncKeyRefresher

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    mem = KnowledgeMemory.from_texts([text(rng, rng.randint(1, 9)) for _ in range(300)], tok,
                                     max_length=12)
    enc = RowwiseEncoder(len(tok), seed=1).eval()
    mem.encode(enc, progress=False)
    mem.search(torch.randn(1, 8), 1)  # warm-up
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def mutate():
        r = random.Random(rng.random())
        try:
            for step in range(120):
                op = step % 4
                if op == 0:
                    mem.add([text(r, r.randint(1, 6))], source="new")
                elif op == 1:
                    alive = mem.valid.nonzero().squeeze(1).tolist()
                    mem.remove([r.choice(alive)])
                elif op == 2:
                    alive = mem.valid.nonzero().squeeze(1).tolist()
                    mem.update([r.choice(alive)], [text(r, 3)])
                else:
                    mem.encode(enc, progress=False, only_stale=True)
                time.sleep(0.001)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def search(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            while not stop.is_set():
                q = torch.randn(3, 8, generator=g)
                snap = mem.snapshot()
                s, ids = snap.search(q, min(5, snap.num_searchable))
                assert bool(snap.searchable[ids].all()), "returned an unsearchable row"
                ref = (q.double()[:, None, :] * snap.keys[ids].double()).sum(-1)
                torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)
                s2, ids2 = mem.search(q, 3)  # the live memory: whatever version, sane
                assert bool(torch.isfinite(s2).all()) and bool((s2[:, :-1] >= s2[:, 1:]).all())
                searches[0] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=search, args=(s,)) for s in (1, 2)]
    threads.append(threading.Thread(target=mutate))
    with AsyncKeyRefresher(enc, mem, interval=3, chunk=32, num_threads=1) as refresher:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            refresher.step()  # the training loop's step boundary: swaps happen here
            time.sleep(0.002)
        refresher.wait()
        for t in threads:
            t.join(timeout=60)
        swaps = refresher.refreshes
    assert not errors, errors[0]
    assert stop.is_set(), "the mutator did not finish in time"
    assert swaps >= 2, f"only {swaps} refresher swaps happened during the mutations"
    assert searches[0] > 20
    # Nothing lost: after a final stale re-encode every live row's key is its current text's.
    mem.encode(enc, progress=False, only_stale=True)
    snap = mem.snapshot()
    live = snap.valid.nonzero().squeeze(1)
    tokens, mask = snap.token_ids_of(live)
    with torch.no_grad():
        want, _ = enc.encode_memory(tokens, mask)
    assert torch.equal(snap.keys[live], want)
    assert bool(snap.searchable[live].all())
