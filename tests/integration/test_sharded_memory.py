"""ShardedKnowledgeMemory with real gloo processes against a single-process KnowledgeMemory.

Two spawns (2 processes: every check incl. DDP training; 4 processes: search only), each
running all its checks in one process group, because a process start + torch/transformers
import costs seconds here. Every rank builds the whole memory (and model) from the shared
seed, so it can compare its sharded answers with the single-process memory. Exact ties:
integer-valued keys and queries make every dot product exact, so results cannot depend on
the kernel's batch-size-dependent FMA order (per-rank queries are searched batched with
the other ranks' queries).
"""
from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pluglm.memory import KnowledgeMemory, MemorySnapshot
from pluglm.sharded_memory import ShardedKnowledgeMemory

SOURCES = ["wiki", "news", "books"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the workers import, loaded once by the forkserver (its children inherit it).
_PRELOAD = ["torch", "torch.distributed", "transformers", "pluglm.memory", "pluglm.sharded_memory",
            "pluglm.modeling_pluglm", "pluglm.refresh", __name__]


def _spawn(world: int, seed: int, tmp_path, what: str) -> None:
    # Not fork: a fork copies this pytest process as earlier tests left it: threads (tqdm's
    # monitor, the OpenMP pools of torch and faiss, autograd's device threads where a GPU
    # exists, whose atfork hook makes every backward in a forked child raise) and any lock
    # they held, which deadlocks or crashes a child depending on which tests ran before
    # (it failed after the gradient checkpointing tests). Not plain spawn either: each child
    # would re-import torch + transformers + pluglm (~10 s per process on a loaded 2-core
    # machine). The forkserver is a fresh single-threaded process that imports them once
    # (_PRELOAD) and forks every worker from itself.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    mp.start_processes(_worker, args=(world, _free_port(), seed, str(tmp_path), what),
                       nprocs=world, join=True, start_method=method)


def _worker(rank: int, world: int, port: int, seed: int, tmp: str, what: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if what == "all":
            _search_checks(rank, world, seed)
            _model_checks(rank, world, seed, tmp)
        else:
            _search_checks(rank, world, seed)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def random_memory(M: int, seed: int, L: int = 9, vocab: int = 100) -> KnowledgeMemory:
    """M random entries (pad 0), texts "doc i", sources cycling over SOURCES, not encoded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (M,), dtype=torch.int32, generator=g)
    ids = torch.randint(5, vocab, (M, L), generator=g) * (torch.arange(L)[None] < lengths[:, None])
    ones = torch.ones(M, dtype=torch.bool)
    return KnowledgeMemory(MemorySnapshot(
        token_ids=ids.to(torch.int16), lengths=lengths, keys=None, values=None, valid=ones,
        stale=ones.clone(), finite=ones.clone(),
        source_index=(torch.arange(M) % len(SOURCES)).to(torch.int32), sources=SOURCES,
        texts=tuple(f"doc {i}" for i in range(M)), rev=torch.arange(M, dtype=torch.int64),
        version=0, vocab_size=vocab, tokenizer_name="random", pad_token_id=0, max_length=L))


def _eq(got, want, what):
    s, i = got
    rs, ri = want
    assert torch.equal(i, ri), f"{what}: ids differ\n{i}\n{ri}"
    assert torch.equal(s, rs), f"{what}: scores differ (max {(s - rs).abs().max()})"


def _search_checks(rank: int, world: int, seed: int) -> None:
    M, d = 517, 12
    g = torch.Generator().manual_seed(seed)
    full = random_memory(M, seed)
    full.set_keys(torch.randn(M, d, generator=g), torch.randn(M, 6, generator=g))
    full.remove(torch.randperm(M, generator=g)[:60])
    shard = full.shard(rank, world)
    a, b = shard.local_range
    assert len(shard) == M and shard.num_local == b - a and torch.equal(shard.keys, full.keys[a:b])

    # same queries everywhere: bit-identical to the single-process search
    q = torch.randn(5, d, generator=g)
    for k in (1, 4, 17):
        _eq(shard.search(q, k, queries_differ=False), full.search(q, k), f"same queries k={k}")

    # integer keys (exact ties everywhere) and each rank its own queries (the DDP case)
    imem = random_memory(M, seed)
    imem.set_keys(torch.randint(-2, 3, (M, d), generator=g).float())
    imem.remove(torch.arange(0, M, 7))
    ishard = imem.shard(rank, world)
    own = torch.randint(-2, 3, (rank + 2, d), generator=torch.Generator().manual_seed(seed + rank)).float()
    for k in (3, 40):
        got = ishard.search(own, k)  # queries_differ=True by default
        _eq(got, imem.search(own, k), f"integer keys, per-rank queries k={k}")
        assert bool(imem.searchable[got[1]].all())
    with pytest.raises(ValueError, match="larger than the number of searchable"):
        ishard.search(own, M)

    # rows of retrieved global ids from their owners; each rank asks for its own ids
    ids = torch.randint(0, M, (rank + 1, 4), generator=torch.Generator().manual_seed(seed - rank))
    ks, vs = shard.fetch(ids)
    fk, fv = full.fetch(ids)
    assert torch.equal(ks, fk) and torch.equal(vs, fv)
    assert torch.equal(shard.fetch_keys(ids), full.fetch_keys(ids))
    for trim in (False, True):
        tok, mask = shard.token_ids_of(ids, trim=trim)
        rtok, rmask = full.token_ids_of(ids, trim=trim)
        assert torch.equal(tok, rtok) and torch.equal(mask, rmask) and tok.dtype == torch.long
    with_none = torch.cat([ids, torch.full((rank + 1, 1), -1)], dim=1)
    assert shard.texts_of(with_none) == full.texts_of(with_none)
    assert shard.sources_of(with_none) == full.sources_of(with_none)

    # remove (every rank passes the same ids; each tombstones its own)
    gone = full.search(q, 3)[1].reshape(-1).unique()
    shard.remove(gone)
    full.remove(gone)
    _eq(shard.search(q, 5, queries_differ=False), full.search(q, 5), "after remove")


def _tiny_model(seed: int):
    from pluglm.configuration_pluglm import PlugLMConfig
    from pluglm.modeling_pluglm import PlugLMForMaskedLM

    torch.manual_seed(seed)
    cfg = PlugLMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
                       num_memory_layers=1, memory_k=3, key_dim=16, doc_max_length=9,
                       memory_ffn_dim=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       memory_attention_dropout=0.0)
    model = PlugLMForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights (LayerNorm/BN init at 1/0)
            p.add_(0.3 * torch.randn_like(p))
    return model


def _model_checks(rank: int, world: int, seed: int, tmp: str) -> None:
    from pluglm.refresh import AsyncKeyRefresher

    M = 301
    model = _tiny_model(seed)
    full = random_memory(M, seed + 1)
    full.remove(torch.tensor([5, 150, 151]))

    # an unencoded shard makes search raise on every rank (no hang)
    shard = full.shard(rank, world)
    q = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(RuntimeError, match="not encoded"):
        shard.search(q, 3)

    # each rank encodes its own shard == one full encode
    full.encode(model, progress=False)
    assert shard.encode(model, progress=False) == int(shard.valid.sum())
    a, b = shard.local_range
    assert torch.allclose(shard.keys, full.keys[a:b], rtol=1e-5, atol=1e-6)
    s, i = shard.search(q, 5, queries_differ=False)
    rs, ri = full.search(q, 5)
    assert torch.equal(i, ri) and torch.allclose(s, rs, rtol=1e-5, atol=1e-5)

    # an AsyncKeyRefresher given the shard refreshes this rank's rows (snapshot + set_keys)
    version = shard.version
    with AsyncKeyRefresher(model, shard, interval=0, chunk=64) as r:
        assert r.refresh_now(block=True) == shard.num_local  # every row of the snapshot
    assert shard.version > version
    assert torch.allclose(shard.keys, full.keys[a:b], rtol=1e-5, atol=1e-6)

    # save as `world` shards; load into 1, 3 and `world` ranks (re-sharding), texts/sources kept
    path = os.path.join(tmp, "mem")
    shard.save(path)
    shard.save(path)  # replacing a previous save
    names = ("token_ids", "lengths", "valid", "stale", "keys", "values")
    every = [None] * world
    dist.all_gather_object(every, {n: getattr(shard, n) if n != "stale" else shard.local.stale
                                   for n in names})
    saved = {n: torch.cat([t[n] for t in every]) for n in names}  # what the shards held
    for W in (1, 3, world):
        parts = [ShardedKnowledgeMemory.load(path, r, W) for r in range(W)]
        assert [p.local_range for p in parts] == [
            (sum(p.num_local for p in parts[:j]), sum(p.num_local for p in parts[:j + 1]))
            for j in range(W)]
        cat = KnowledgeMemory.concat([p.local for p in parts])
        for name in names:
            assert torch.equal(getattr(cat, name), saved[name]), (W, name)
        assert cat.texts == full.texts
        allids = torch.arange(M)
        assert cat.sources_of(allids) == full.sources_of(allids)
    back = ShardedKnowledgeMemory.load(path, rank, world)
    _eq(back.search(q, 4, queries_differ=False), shard.search(q, 4, queries_differ=False), "loaded")
    with pytest.raises(FileNotFoundError):
        ShardedKnowledgeMemory.load(os.path.join(tmp, "nowhere"))

    # the model, unchanged: eval forward with the sharded memory == with the whole memory
    ids = torch.randint(5, 100, (3 + rank, 10), generator=torch.Generator().manual_seed(seed + 7 * rank))
    mask = torch.ones_like(ids)
    ref = copy.deepcopy(model).set_memory(full).eval()
    model.set_memory(shard).eval()
    with torch.no_grad():
        out, want = model(ids, attention_mask=mask, output_retrieval=True), ref(ids, attention_mask=mask,
                                                                                output_retrieval=True)
    assert torch.equal(out.retrieval[0].indices, want.retrieval[0].indices)
    assert out.retrieval[0].sources == want.retrieval[0].sources
    assert torch.allclose(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    # training forward (stale search across ranks + fresh re-encode of fetched entries)
    model.train()
    ref.train()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    ref_loss = ref(ids, attention_mask=mask, labels=ids).loss
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)

    # DDP training with the sharded memory: finite losses, parameters in sync across ranks.
    # (Plain BatchNorm: SyncBatchNorm needs CUDA; each rank normalises its own queries.)
    ddp_model = _tiny_model(seed).set_memory(shard).train()
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed + 100 + rank)
    for step in range(3):
        x = torch.randint(5, 100, (4, 10), generator=g)  # each rank its own batch
        out = ddp(x, attention_mask=torch.ones_like(x), labels=x)
        assert torch.isfinite(out.loss), out.loss
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().reshape(-1) for p in ddp_model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "parameters diverged across ranks"
    assert not torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in _tiny_model(seed).parameters()]))


@pytest.mark.slow
def test_two_processes(fresh_seed, tmp_path):
    _spawn(2, fresh_seed, tmp_path, "all")


@pytest.mark.slow
def test_four_processes_search(fresh_seed, tmp_path):
    _spawn(4, fresh_seed, tmp_path, "search")


# ------------------------------------------------------------------ single process

def test_one_rank_without_process_group(fresh_seed, tmp_path):
    M = 40
    full = random_memory(M, fresh_seed)
    full.set_keys(torch.randn(M, 8), torch.randn(M, 4))
    shard = full.shard(0, 1)
    q = torch.randn(3, 8)
    _eq(shard.search(q, 5), full.search(q, 5), "world 1")
    ids = shard.search(q, 5)[1]
    assert shard.texts_of(ids) == full.texts_of(ids)
    shard.save(tmp_path / "m")
    back = ShardedKnowledgeMemory.load(tmp_path / "m", 1, 2)
    assert back.local_range == (20, 40) and back.local.texts == full.texts[20:]


def test_shard_bounds_and_errors(fresh_seed, tmp_path):
    full = random_memory(10, fresh_seed)
    parts = [full.shard(r, 3) for r in range(3)]
    assert [p.local_range for p in parts] == [(0, 4), (4, 7), (7, 10)]
    assert parts[1].local.texts == full.texts[4:7]
    with pytest.raises(ValueError, match="rank"):
        full.shard(3, 3)
    with pytest.raises(ValueError, match="at least one entry"):
        full.shard(0, 11)
    with pytest.raises(ValueError, match="owned by this rank"):
        parts[1].set_keys(torch.randn(1, 4), ids=[0])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("keep me")
    with pytest.raises(RuntimeError, match="not a saved sharded memory"):
        full.shard(0, 1).save(tmp_path / "junk")
