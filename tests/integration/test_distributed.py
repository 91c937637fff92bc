"""Sharded exact search with real gloo processes against single-process search.

Two spawns (2 and 4 processes on 127.0.0.1), each running every check in one process
group, because a process start + torch import costs seconds here. Every rank builds the
whole table from the shared seed, so it can compare its sharded answer with
``mips_topk`` over the whole table. Ties: duplicate keys straddle every shard boundary,
and integer-valued keys/queries make every dot product exact (so ties are exact too, and
results cannot depend on the kernel's batch-size-dependent FMA chain).
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pluglm_kernels
from pluglm import distributed as D
from pluglm_kernels import reference


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, seed: int, tmp_path) -> None:
    port = _free_port()
    mp.spawn(_worker, args=(world, port, seed, str(tmp_path)), nprocs=world, join=True)


def _tables(seed: int, M: int, d: int, world: int):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(M, d, generator=g)  # [M, d]
    for r in range(1, world):  # a duplicate pair across every shard boundary
        b, _ = D.shard_bounds(M, r, world)
        keys[b] = keys[b - 1]
    keys[M - 1] = keys[0]  # and one between the first and the last shard
    ikeys = torch.randint(-2, 3, (M, d), generator=g).float()  # many exact ties
    values = torch.randn(M, 5, generator=g)
    tokens = torch.randint(0, 30000, (M, 7), generator=g).to(torch.int16)
    return g, keys.contiguous(), ikeys.contiguous(), values, tokens


def _check_same(got, want, what):
    s, i = got
    rs, ri = want
    assert torch.equal(i, ri), f"{what}: ids differ\n{i}\n{ri}"
    assert torch.equal(s, rs), f"{what}: scores differ (max {(s - rs).abs().max()})"


def _worker(rank: int, world: int, port: int, seed: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _checks(rank, world, seed, tmp)
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int, seed: int, tmp: str) -> None:
    M, d = 1003, 24
    g, keys, ikeys, values, tokens = _tables(seed, M, d, world)
    a, b = D.shard_bounds(M, rank, world)
    assert 0 <= a <= b <= M

    # 1. float keys, same queries everywhere, ties across shard boundaries
    bounds = [D.shard_bounds(M, r, world)[0] for r in range(1, world)]
    q = torch.cat([keys[bounds] * 3, keys[:1] * 3, torch.randn(4, d, generator=g)])  # [B, d]
    for k in (1, 2, 5, 40, min(2048, M // world + 7)):
        got = D.sharded_search(q, k, keys[a:b], a)
        _check_same(got, pluglm_kernels.mips_topk(q, keys, k), f"float k={k}")
    got = D.sharded_search(q, 40, keys[a:b], a)
    for j, bnd in enumerate(bounds):
        # the duplicate pair straddling the boundary ties exactly: adjacent, lower global id
        # first (another key may still out-score it: inner product, not cosine)
        row = got[1][j].tolist()
        assert bnd - 1 in row and row[row.index(bnd - 1) + 1] == bnd, row

    # 2. integer keys with removed rows: exact ties everywhere
    valid = torch.rand(M, generator=g) > 0.3
    iq = torch.randint(-2, 3, (6, d), generator=g).float()
    for k in (3, 50):
        got = D.sharded_search(iq, k, ikeys[a:b], a, local_valid=valid[a:b])
        _check_same(got, pluglm_kernels.mips_topk(iq, ikeys, k, valid=valid), f"int+valid k={k}")
        assert bool(valid[got[1]].all())

    # 3. fewer valid rows than k in the whole table: (-inf, -1) tails like mips_topk
    few = torch.zeros(M, dtype=torch.bool)
    few[torch.tensor([0, M // 2, M - 1])] = True
    got = D.sharded_search(iq, 5, ikeys[a:b], a, local_valid=few[a:b])
    _check_same(got, reference.mips_topk(iq, ikeys, 5, None, few), "fewer than k")
    assert (got[1][:, 3:] == -1).all() and torch.isinf(got[0][:, 3:]).all()

    # 4. each rank its own queries (different batch sizes)
    own = torch.randint(-2, 3, (rank + 2, d), generator=torch.Generator().manual_seed(seed + rank)).float()
    got = D.sharded_search(own, 7, ikeys[a:b], a, queries_differ=True)
    _check_same(got, pluglm_kernels.mips_topk(own, ikeys, 7), f"queries_differ rank {rank}")

    # 5. fetch rows of retrieved ids from their owners (float32, int16, bf16; -1 -> zeros)
    ids = D.sharded_search(q, 6, keys[a:b], a)[1]
    ids[0, -1] = -1
    for table in (values, tokens, values.to(torch.bfloat16)):
        got = D.fetch_rows(ids, table[a:b], a)
        want = table[ids.clamp(min=0)]
        want[ids < 0] = 0
        assert got.dtype == table.dtype and torch.equal(got, want), table.dtype
    mine = torch.randint(-1, M, (rank + 1, 3), generator=torch.Generator().manual_seed(seed - rank))
    got = D.fetch_rows(mine, values[a:b], a, ids_differ=True)
    want = values[mine.clamp(min=0)]
    want[mine < 0] = 0
    assert torch.equal(got, want)

    # 6. a mismatch raises on every rank instead of hanging
    with pytest.raises(ValueError, match="same k"):
        D.sharded_search(q, 3 + rank, keys[a:b], a)
    with pytest.raises(ValueError, match="finite"):
        D.sharded_search(q * (float("nan") if rank == world - 1 else 1.0), 3, keys[a:b], a)

    # 7. a table smaller than the world: some shards are empty
    tiny = keys[:world - 1].contiguous()
    ta, tb = D.shard_bounds(tiny.shape[0], rank, world)
    got = D.sharded_search(q, world - 1, tiny[ta:tb], ta)
    _check_same(got, pluglm_kernels.mips_topk(q, tiny, world - 1), "empty shards")

    # 8. save one shard per rank, reload into other world sizes: the same global table
    directory = os.path.join(tmp, "shards")
    D.save_local_shard(directory, {"keys": keys[a:b], "values": values[a:b],
                                   "token_ids": tokens[a:b]}, a)
    back = D.load_shard(directory, rank, world)
    assert back.global_offset == a and torch.equal(back.tensors["keys"], keys[a:b])
    for other in (1, 2, 3):
        parts = [D.load_shard(directory, r, other) for r in range(other)]
        for name, full in (("keys", keys), ("values", values), ("token_ids", tokens)):
            assert torch.equal(torch.cat([p.tensors[name] for p in parts]), full), (other, name)
    dist.barrier()


@pytest.mark.slow
def test_two_processes(fresh_seed, tmp_path):
    _spawn(2, fresh_seed, tmp_path)


@pytest.mark.slow
def test_four_processes(fresh_seed, tmp_path):
    _spawn(4, fresh_seed, tmp_path)


# ------------------------------------------------------------------ single process

@pytest.mark.parametrize("M,world", [(10, 3), (7, 7), (3, 5), (1000, 4), (0, 2)])
def test_shard_bounds_tile(M, world):
    spans = [D.shard_bounds(M, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == M
    assert all(spans[i][1] == spans[i + 1][0] for i in range(world - 1))
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_errors():
    with pytest.raises(ValueError, match="rank"):
        D.shard_bounds(10, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        D.shard_bounds(10, 0, 0)


def test_without_process_group_is_plain_search(fresh_seed):
    keys = torch.randn(301, 16)
    q = torch.randn(5, 16)
    _check_same(D.sharded_search(q, 9, keys, 0), pluglm_kernels.mips_topk(q, keys, 9), "world 1")
    ids = D.sharded_search(q, 4, keys, 0)[1]
    assert torch.equal(D.fetch_rows(ids, keys, 0), keys[ids])


@pytest.mark.parametrize("saved,loaded", [(4, 2), (4, 3), (3, 5), (1, 4)])
def test_save_shards_reshard(tmp_path, saved, loaded, fresh_seed):
    M = 37
    tables = {"keys": torch.randn(M, 8), "values": torch.randn(M, 3).to(torch.bfloat16),
              "valid": torch.rand(M) > 0.5}
    D.save_shards(tmp_path, tables, saved)
    parts = [D.load_shard(tmp_path, r, loaded) for r in range(loaded)]
    assert [p.global_offset for p in parts] == [D.shard_bounds(M, r, loaded)[0] for r in range(loaded)]
    for name, full in tables.items():
        assert torch.equal(torch.cat([p.tensors[name] for p in parts]), full)
    assert set(D.load_shard(tmp_path, 0, 2, names=["valid"]).tensors) == {"valid"}


def test_save_overwrite_and_corruption(tmp_path):
    D.save_shards(tmp_path, {"x": torch.arange(20.0)[:, None]}, 4)
    D.save_shards(tmp_path, {"x": -torch.arange(12.0)[:, None]}, 2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3, files  # the first save's shard files are gone
    assert torch.equal(D.load_shard(tmp_path).tensors["x"], -torch.arange(12.0)[:, None])
    victim = next(p for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(D.ShardFormatError, match="sha256"):
        D.load_shard(tmp_path)
    with pytest.raises(FileNotFoundError):
        D.load_shard(tmp_path / "nowhere")
