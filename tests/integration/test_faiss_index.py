"""Index backends (pluglm.index): faiss kinds' recall against exact search, and every
kind's update semantics (removed ids never returned, updates and adds reflected, rebuild).

Data: clustered random keys (40 Gaussian clusters), queries drawn near the clusters; the
oracle is ``pluglm_kernels.mips_topk`` over the same live rows. Recall@10 measured over 250
seeds (M=4000, d=32): flat 1.0, ivf (nprobe 16 of 102 lists) 1.0, hnsw (M=32, efSearch 64)
0.974-1.0, ivfpq m=8 x 6 bits 0.272-0.422 (mean 0.326, sd 0.024), m=16 with nprobe 32
0.554-0.684 (mean 0.626, sd 0.021). Each floor sits at least 5.9 sd below the lowest mean
(a correct index fails far less than once in 1e4 runs) and far above a broken index: an
IVF index searched with stale centroids after a key refresh scores 0.000-0.028, a random
one k/M = 0.0025-0.005.
faiss runs single-threaded here: on the 2-core CI machine under load, OpenMP spinning
makes its training several times slower.
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest
import torch

import pluglm_kernels
from pluglm.index import (KINDS, UPDATE_POLICIES, ExactIndex, FaissNotInstalledError,
                          build_index)

FAISS_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
# Approximate indexes on fresh random data each run (see the module docstring for the
# measured distributions). ivfpq: 0.25 failed about 1 run in 60 after a rebuild (M=2000, 5-bit
# codes: 0.228-0.360, mean 0.298, sd 0.023 over 250 seeds); 0.15 is 6.4 sd below that mean.
RECALL_MIN = {"exact": 1.0, "flat": 1.0, "ivf": 0.9, "hnsw": 0.9, "ivfpq": 0.15}


@pytest.fixture(autouse=True)
def _faiss_one_thread():
    try:
        import faiss
    except ImportError:
        yield
        return
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def _needs(kind):
    if kind != "exact":
        pytest.importorskip("faiss")


def _data(seed, M=4000, d=32, C=40, B=50):
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(C, d, generator=g) * 2
    keys = (cent[torch.randint(0, C, (M,), generator=g)] + 0.7 * torch.randn(M, d, generator=g))
    q = cent[torch.randint(0, C, (B,), generator=g)] + 0.7 * torch.randn(B, d, generator=g)
    return keys.contiguous(), q  # [M, d], [B, d]


def _recall(ids, ref):
    hits = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(ids, ref))
    return hits / int((ref >= 0).sum())


def _check_format(s, i, B, k):
    assert s.shape == (B, k) and i.shape == (B, k)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert (s[:, :-1] >= s[:, 1:]).all(), "scores must be sorted descending"
    tie = s[:, :-1] == s[:, 1:]
    both = (i[:, :-1] >= 0) & (i[:, 1:] >= 0)
    assert (i[:, :-1][tie & both] < i[:, 1:][tie & both]).all(), "ties: lower id first"


@pytest.mark.parametrize("kind", KINDS)
def test_recall_against_exact(kind, fresh_seed):
    _needs(kind)
    keys, q = _data(fresh_seed)
    k = 10
    rs, ri = pluglm_kernels.mips_topk(q, keys, k)
    index = build_index(kind, keys)
    s, i = index.search(q, k)
    _check_format(s, i, q.shape[0], k)
    rec = _recall(i, ri)
    assert rec >= RECALL_MIN[kind], f"{kind}: recall@{k} = {rec:.3f}"
    if kind in ("exact", "flat", "ivf", "hnsw"):  # exact scores for the rows they return
        assert torch.allclose(s, (q @ keys.T).gather(1, i), rtol=1e-5, atol=1e-4)
    if kind in ("exact", "flat"):
        assert torch.allclose(s, rs, rtol=1e-5, atol=1e-4)
    assert index.update_policy in UPDATE_POLICIES


def test_ivfpq_more_subquantizers_recall(fresh_seed):
    pytest.importorskip("faiss")
    keys, q = _data(fresh_seed)
    ref = pluglm_kernels.mips_topk(q, keys, 10)[1]
    index = build_index("ivfpq", keys, m=16, nprobe=32)
    assert index.m == 16
    assert _recall(index.search(q, 10)[1], ref) >= 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_removed_never_returned_and_updates_reflected(kind, fresh_seed):
    _needs(kind)
    keys, q = _data(fresh_seed, M=3001)
    M, d = keys.shape
    g = torch.Generator().manual_seed(fresh_seed + 1)
    valid = torch.rand(M, generator=g) > 0.1
    index = build_index(kind, keys, valid)
    assert index.num_valid == int(valid.sum()) and index.size == M
    removed = torch.randperm(M, generator=g)[:200]  # some already invalid: a no-op for those
    index.remove(removed)
    live = valid.clone()
    live[removed] = False
    assert index.num_valid == int(live.sum())
    assert torch.equal(index.valid_mask(), live)
    k = 20
    s, i = index.search(q, k)
    _check_format(s, i, q.shape[0], k)
    assert bool(live[i[i >= 0]].all()), "a removed or invalid id was returned"
    ref = pluglm_kernels.mips_topk(q, keys, k, valid=live)[1]
    assert _recall(i, ref) >= RECALL_MIN[kind]

    target = torch.cat([removed[:1], torch.nonzero(live).squeeze(1)[:4]])  # [5]; one removed
    eye = torch.eye(d)
    if kind == "ivfpq":
        # PQ codebooks trained at build time cannot encode out-of-distribution keys (like the
        # planted ones below) until a rebuild; check in-distribution updates by their codes.
        new_keys = keys[torch.randperm(M, generator=g)[:5]]
        index.update(target, new_keys)
        live[target] = True
        rec = torch.from_numpy(index._index.reconstruct_batch(target.numpy()))
        assert ((rec - new_keys).norm(dim=1) < (rec - keys[target]).norm(dim=1)).all()
        assert index.num_valid == int(live.sum())
        new = index.add(new_keys[:3])
        assert new.tolist() == [M, M + 1, M + 2] and index.size == M + 3
        return
    # update (an upsert): plant keys 50 e_j, each the clear best of query e_j
    index.update(target, 50 * eye[:5])
    live[target] = True
    s, i = index.search(eye[:5], 3)
    assert i[:, 0].tolist() == target.tolist(), (i, target)
    assert bool(live[i[i >= 0]].all())
    assert index.num_valid == int(live.sum())

    # add: new ids follow the last one, and are found
    new = index.add(50 * eye[5:8])
    assert new.tolist() == [M, M + 1, M + 2] and index.size == M + 3
    assert index.search(eye[5:8], 1)[1][:, 0].tolist() == new.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_valid_rows_than_k(kind, fresh_seed):
    _needs(kind)
    keys, q = _data(fresh_seed, M=500)
    valid = torch.zeros(500, dtype=torch.bool)
    valid[torch.tensor([3, 77, 200, 499])] = True
    index = build_index(kind, keys, valid)
    s, i = index.search(q, 6)
    assert set(i[:, :4].reshape(-1).tolist()) <= {3, 77, 200, 499}
    assert (i[:, 4:] == -1).all() and torch.isinf(s[:, 4:]).all() and (s[:, 4:] < 0).all()
    index.remove(torch.tensor([3, 77, 200, 499]))
    s, i = index.search(q, 2)
    assert (i == -1).all() and torch.isinf(s).all()


def test_hnsw_tombstones_filter_and_compact(fresh_seed, monkeypatch):
    pytest.importorskip("faiss")
    keys, q = _data(fresh_seed, M=2000)
    index = build_index("hnsw", keys, compact_at=0.25)
    g = torch.Generator().manual_seed(fresh_seed)
    gone = torch.randperm(2000, generator=g)[:300]
    index.remove(gone)
    assert index.num_tombstones == 300  # 15%: below compact_at, kept as tombstones
    live = torch.ones(2000, dtype=torch.bool)
    live[gone] = False
    ref = pluglm_kernels.mips_topk(q, keys, 10, valid=live)[1]
    by_selector = index.search(q, 10)
    monkeypatch.setattr(type(index), "_use_selector", False)  # the over-fetch fallback
    by_overfetch = index.search(q, 10)
    monkeypatch.undo()
    for s, i in (by_selector, by_overfetch):
        assert bool(live[i].all()) and _recall(i, ref) >= 0.9
    index.update(gone[:10], keys[gone[:10]])  # revive 10: still tombstones for the old nodes
    more = torch.nonzero(live).squeeze(1)[:300]
    index.remove(more)  # now > 25% tombstones: compacted from the live vectors
    assert index.num_tombstones == 0 and index.num_valid == 2000 - 590
    live[gone[:10]] = True
    live[more] = False
    s, i = index.search(q, 10)
    assert bool(live[i].all())
    assert _recall(i, pluglm_kernels.mips_topk(q, keys, 10, valid=live)[1]) >= 0.9


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_needs_rebuild_then_rebuild(kind, fresh_seed):
    pytest.importorskip("faiss")
    keys, q = _data(fresh_seed, M=2000)
    # ivf: 32 of its 51 lists. With the default 16, recall after the rebuild has a long low
    # tail (0.934-1.0 over 1250 seeds, 5 below 0.95); with 32, 0.964-1.0 over 1000 seeds.
    # Without a rebuild (stale centroids) either kind scores 0.000-0.028.
    opts = {"nprobe": 32} if kind == "ivf" else {}
    index = build_index(kind, keys, retrain_fraction=0.5, **opts)
    assert not index.needs_rebuild
    fresh = -keys  # a "refresh" that moves every key
    index.update(torch.arange(1200), fresh[:1200])
    assert index.needs_rebuild  # > half the rows re-keyed against stale centroids
    index.rebuild(fresh)
    assert not index.needs_rebuild and index.size == 2000
    ref = pluglm_kernels.mips_topk(q, fresh, 10)[1]
    assert _recall(index.search(q, 10)[1], ref) >= RECALL_MIN[kind]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw"])
def test_half_keys_and_queries(kind, dtype, fresh_seed):
    _needs(kind)
    keys, q = _data(fresh_seed, M=777, d=24)
    keys, q = keys.to(dtype), q.to(dtype)
    index = build_index(kind, keys)
    s, i = index.search(q, 5)
    assert s.dtype == torch.float32 and s.device == q.device
    ref = pluglm_kernels.mips_topk(q.float(), keys.float(), 5)[1]
    assert _recall(i, ref) >= RECALL_MIN[kind]


def test_exact_index_copy_on_write_and_growth(fresh_seed):
    keys, q = _data(fresh_seed, M=100, d=8)
    before = keys.clone()
    index = ExactIndex(keys)
    assert index.keys.data_ptr() == keys.data_ptr()  # no copy until a mutation
    index.update(torch.tensor([5]), q[:1] * 10)
    index.remove(torch.tensor([6]))
    assert torch.equal(keys, before), "the caller's table must never be written"
    for n in range(1, 40):  # geometric growth keeps keys contiguous for mips_topk
        index.add(torch.randn(n, 8))
    assert index.size == 100 + sum(range(1, 40)) and index.keys.is_contiguous()
    assert index.search(q[:1], 1)[1].item() == 5
    assert 6 not in index.search(q, 50)[1].reshape(-1).tolist()


def test_argument_errors():
    keys = torch.randn(50, 8)
    with pytest.raises(ValueError, match="kind"):
        build_index("annoy", keys)
    with pytest.raises(ValueError, match="metric"):
        build_index("exact", keys, metric="l2")
    index = build_index("exact", keys)
    with pytest.raises(ValueError, match=r"queries must have shape \[B, 8\]"):
        index.search(torch.randn(2, 7), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="finite"):
        index.search(torch.full((1, 8), float("nan")), 1)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 50\)"):
        index.remove(torch.tensor([50]))
    with pytest.raises(ValueError, match="repeat"):
        index.update(torch.tensor([1, 1]), torch.randn(2, 8))
    with pytest.raises(ValueError, match="one row per id"):
        index.update(torch.tensor([1, 2]), torch.randn(3, 8))
    with pytest.raises(TypeError, match="integer"):
        index.remove(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        build_index("exact", keys, nprobe=3)  # an option of another kind


def test_faiss_argument_errors():
    pytest.importorskip("faiss")
    keys = torch.randn(200, 12)
    with pytest.raises(ValueError, match="nlist"):
        build_index("ivf", keys, nlist=500)
    with pytest.raises(ValueError, match="divide"):
        build_index("ivfpq", keys, m=5)
    with pytest.raises(ValueError, match="nprobe"):
        build_index("ivf", keys, nprobe=0)
    with pytest.raises(ValueError, match="valid row"):
        build_index("ivf", keys, torch.zeros(200, dtype=torch.bool))


def test_missing_faiss_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(FaissNotInstalledError, match="pip install faiss-cpu") as e:
        build_index("hnsw", torch.randn(10, 4))
    assert isinstance(e.value, ImportError)
    s, i = build_index("exact", torch.randn(10, 4)).search(torch.randn(2, 4), 3)  # still fine
    assert i.shape == (2, 3)


def test_kernels_package_never_imports_faiss():
    root = pathlib.Path(pluglm_kernels.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "faiss" for n in names), path


@pytest.mark.parametrize("kind", KINDS)
def test_sync_with_an_edited_table(kind, fresh_seed):
    """What a KnowledgeMemory edit looks like to an index: rows appended (not yet encoded:
    invalid), rows removed, rows re-encoded (changed keys), earlier rows becoming valid."""
    _needs(kind)
    keys, q = _data(fresh_seed, M=1500, d=16)
    g = torch.Generator().manual_seed(fresh_seed)
    valid = torch.rand(1500, generator=g) > 0.2
    index = build_index(kind, keys, valid)
    eye = torch.eye(16)
    table = torch.cat([keys, torch.randn(40, 16, generator=g)])  # [1540, d]: 40 appended rows
    live = torch.cat([valid, torch.zeros(40, dtype=torch.bool)])
    live[1500:1520] = True                                 # half the new rows are encoded
    gone = torch.nonzero(live[:1500]).squeeze(1)[:50]
    live[gone] = False                                     # removed
    back = torch.nonzero(~valid).squeeze(1)[:3]
    live[back] = True                                      # became searchable again
    changed = torch.nonzero(live[:1500]).squeeze(1)[-3:]   # re-encoded
    table[changed] = 50 * eye[:3]
    table[1500:1503] = 50 * eye[3:6]
    index.sync(table, live, changed=changed)
    assert index.size == 1540 and index.num_valid == int(live.sum())
    assert torch.equal(index.valid_mask(), live)
    s, i = index.search(q, 10)
    assert bool(live[i[i >= 0]].all())
    if kind != "ivfpq":  # out-of-distribution planted keys: see the update test
        assert index.search(eye[:6], 1)[1][:, 0].tolist() == changed.tolist() + [1500, 1501, 1502]
    if kind in ("exact", "flat"):
        rs, ri = pluglm_kernels.mips_topk(q, table, 10, valid=live)
        assert _recall(i, ri) == 1.0
    # a key refresh (every row changed) rebuilds; a shrunken table is refused
    index.sync(-table, live, changed=torch.ones(1540, dtype=torch.bool))
    assert not index.needs_rebuild and index.num_valid == int(live.sum())
    ref = pluglm_kernels.mips_topk(q, -table, 10, valid=live)[1]
    # ivfpq: the six planted rows (norm 50) stretch the retrained PQ codebooks over a range
    # ~10x the other keys', so its recall here is 0.23-0.30 over seeds (0.33 without them).
    # hnsw: the rebuilt graph over the negated table (the planted rows now point away from
    # every query) measured 0.876-0.96 over 120 seeds, median 0.94 (0.96-0.98 before it).
    floor = {"ivfpq": 0.15, "hnsw": 0.82}.get(kind, RECALL_MIN[kind])
    assert _recall(index.search(q, 10)[1], ref) >= floor
    with pytest.raises(ValueError, match="rebuild"):
        index.sync(table[:100], live[:100])


def test_search_params(fresh_seed):
    pytest.importorskip("faiss")
    keys, q = _data(fresh_seed, M=2000)
    ivf = build_index("ivf", keys, nprobe=1)
    ref = pluglm_kernels.mips_topk(q, keys, 10)[1]
    low = _recall(ivf.search(q, 10)[1], ref)
    ivf.set_search_params(nprobe=ivf.nlist)  # every list: exhaustive
    assert _recall(ivf.search(q, 10)[1], ref) == 1.0 >= low
    with pytest.raises(TypeError, match="nprobe"):
        build_index("hnsw", keys[:300]).set_search_params(nprobe=4)
    with pytest.raises(TypeError):
        build_index("exact", keys).set_search_params(efSearch=4)
