"""Approximate (and exact Flat) inner-product search with faiss, behind the SearchIndex API.

Kinds (all inner product):
  "flat"   IndexIDMap2(IndexFlatIP): exact; add/update/remove in place
  "ivf"    IVF-Flat: nlist lists (default ~4 sqrt(M), at least 39 training rows per list),
           searched with ``nprobe`` lists (default 16)
  "hnsw"   HNSW graph, M=32 links per node, ``efSearch`` (default 64, raised to k),
           ``efConstruction`` (default 64)
  "ivfpq"  IVF with product-quantised residuals: ``m`` sub-quantizers (default: the largest
           divisor of d not above d/4), ``nbits`` 8 (lowered for tiny tables)

How each keeps in step with knowledge updates (``update_policy``, UPDATE_POLICIES):
flat: in place (remove_ids + add_with_ids). ivf / ivfpq: in place on the inverted lists
with a hashtable direct map (so removals are O(1) per id); centroids stay stale, so
``needs_rebuild`` turns True after ``retrain_fraction`` (default 0.5) of the rows changed
since training — call ``rebuild(keys, valid)`` (retrains) on a key refresh. hnsw: faiss cannot
delete graph nodes, so removed / re-keyed entries become tombstones excluded with an
IDSelector bitmap at search time (never returned); the graph is compacted from its own
live vectors once tombstones exceed ``compact_at`` (default 0.25) of the nodes.

Tensors in and out: queries of any device and float dtype; faiss gets float32 numpy on the
CPU, or a GPU replica when ``device`` is CUDA and the installed faiss has GPUs
(``faiss.get_num_gpus() > 0``; flat, ivf and ivfpq; hnsw has no GPU version). Mutations
always go to the CPU master index and the GPU replica is re-made lazily before the next
search. Results come back on the queries' device.

faiss is optional: without it, building a faiss kind raises :class:`FaissNotInstalledError`
(an ImportError) saying what to install.
"""
from __future__ import annotations

import numpy as np
import torch

from ..topk import merge_topk
from .exact import SearchIndex, check_valid, default_nlist

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
_CHUNK_ROWS = 65536  # rows converted to float32 numpy at a time (bounded extra memory)


class FaissNotInstalledError(ImportError):
    """faiss is needed for this index kind but is not installed."""


def import_faiss():
    """The faiss module, or FaissNotInstalledError saying how to get it."""
    try:
        import faiss
    except ImportError as e:
        raise FaissNotInstalledError(
            "faiss is not installed, but index kinds 'flat', 'ivf', 'hnsw' and 'ivfpq' need it: "
            "`pip install faiss-cpu` (or the package extra `pip install pluglm[faiss]`; for GPU "
            "indexes a faiss GPU build, e.g. `conda install -c pytorch faiss-gpu`). The exact "
            f"index (kind='exact') needs no faiss. (import error: {e})") from e
    return faiss


def faiss_gpu_count(faiss) -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a CPU build without the symbol behaves as "no GPU"
        return 0


def _rows_f32(keys: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """keys[start:stop] as C-contiguous float32 numpy (zero-copy for CPU float32)."""
    return np.ascontiguousarray(keys[start:stop].detach().to("cpu", torch.float32).numpy())


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for m in range(max(1, cap), 0, -1):
        if n % m == 0:
            return m
    return 1


class FaissIndex(SearchIndex):
    """One faiss index kind ("flat", "ivf", "hnsw", "ivfpq") behind the SearchIndex API."""

    def __init__(self, kind: str, keys: torch.Tensor, valid: torch.Tensor | None = None, *,
                 metric: str = "ip", device=None, nlist: int | None = None, nprobe: int = 16,
                 M: int = 32, efSearch: int = 64, efConstruction: int = 64, m: int | None = None,
                 nbits: int = 8, retrain_fraction: float = 0.5, compact_at: float | None = 0.25,
                 train_size: int | None = None, seed: int = 1234):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self._faiss = import_faiss()
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2:
            raise ValueError(f"keys must be a torch.Tensor [M, d], got "
                             f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        super().__init__(keys.shape[1], metric)
        self.kind = kind
        self.update_policy = {"flat": "in_place", "ivf": "in_place_stale_centroids",
                              "ivfpq": "in_place_stale_centroids", "hnsw": "tombstone"}[kind]
        self.params = dict(nlist=nlist, nprobe=nprobe, M=M, efSearch=efSearch,
                           efConstruction=efConstruction, m=m, nbits=nbits)
        for name in ("nprobe", "M", "efSearch", "efConstruction", "nbits"):
            v = self.params[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < retrain_fraction:
            raise ValueError(f"retrain_fraction must be > 0, got {retrain_fraction}")
        if compact_at is not None and not 0.0 < compact_at < 1.0:
            raise ValueError(f"compact_at must be in (0, 1) or None, got {compact_at}")
        self.retrain_fraction = float(retrain_fraction)
        self.compact_at = compact_at
        self.train_size = train_size
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else keys.device
        self.use_gpu = (self.device.type == "cuda" and kind != "hnsw"
                        and faiss_gpu_count(self._faiss) > 0)
        self._gpu_res = None
        self.rebuild(keys, valid)

    # ------------------------------------------------------------------------- build

    def rebuild(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Start over from keys [M, d] / valid [M] (retrains IVF centroids and PQ codebooks)."""
        self._check_keys("keys", keys)
        M = keys.shape[0]
        valid_np = check_valid(valid, M)
        live = np.flatnonzero(valid_np).astype(np.int64)  # [n_live] ids to index
        faiss = self._faiss
        d = self.dim
        if self.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.params["efConstruction"]
        else:
            index = self._new_ivf(keys, live)
        self._index = index
        self._gpu = None
        # hnsw: faiss node -> entry id, and entry id -> its current node (-1: none)
        self._node_id = np.zeros(0, dtype=np.int64)      # [nodes]
        self._id_node = np.full(M, -1, dtype=np.int64)   # [size]
        self._changed = 0
        self._reset_ids(valid_np)
        self._insert(keys, live, rows=None if live.size == M else live)
        self._changed = 0

    def _new_ivf(self, keys: torch.Tensor, live: np.ndarray):
        faiss = self._faiss
        d, n = self.dim, live.size
        if n == 0:
            raise ValueError(f"kind={self.kind!r} needs at least one valid row to train on")
        nlist = self.params["nlist"]
        if nlist is None:
            nlist = default_nlist(n)
        elif isinstance(nlist, bool) or not isinstance(nlist, int) or not 1 <= nlist <= n:
            raise ValueError(f"nlist must be an int in [1, number of valid rows={n}], got {nlist!r}")
        self.nlist = nlist
        rng = np.random.default_rng(self.seed)
        cap = self.train_size or max(256 * nlist, 256 * 39)  # faiss would subsample to this
        train_ids = live if n <= cap else np.sort(rng.choice(live, size=cap, replace=False))
        train = _rows_f32(keys.detach().index_select(0, torch.from_numpy(train_ids).to(keys.device)),
                          0, train_ids.size)  # [n_train, d]
        quantizer = faiss.IndexFlatIP(d)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = self.params["m"] or _largest_divisor_at_most(d, max(1, d // 4))
            if isinstance(m, bool) or not isinstance(m, int) or m < 1 or d % m:
                raise ValueError(f"m (PQ sub-quantizers) must divide d={d}, got {m!r}")
            # k-means of 2^nbits codewords needs at least that many points (39x to be good)
            nbits = min(self.params["nbits"], max(1, int(np.log2(max(2, train_ids.size // 39)))))
            self.m, self.nbits = m, nbits
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = min(self.params["nprobe"], nlist)
        self._quantizer = quantizer  # the IVF index points at it: keep it alive as long
        self._n_trained = n
        return index

    def _insert(self, keys: torch.Tensor, ids: np.ndarray, rows: np.ndarray | None) -> None:
        """Add keys[rows] (keys[0:n] when rows is None) under entry ids ``ids``, converting
        at most _CHUNK_ROWS rows to float32 at a time."""
        keys = keys.detach()
        for s in range(0, ids.size, _CHUNK_ROWS):
            chunk_ids = ids[s:s + _CHUNK_ROWS]
            if rows is None:
                x = _rows_f32(keys, s, s + chunk_ids.size)
            else:
                sel = torch.from_numpy(rows[s:s + _CHUNK_ROWS]).to(keys.device)
                x = _rows_f32(keys.index_select(0, sel), 0, chunk_ids.size)
            if self.kind == "hnsw":
                first = self._index.ntotal
                self._index.add(x)
                self._node_id = np.concatenate([self._node_id, chunk_ids])
                self._id_node[chunk_ids] = np.arange(first, first + chunk_ids.size)
            else:
                self._index.add_with_ids(x, chunk_ids)
        self._changed += ids.size
        self._gpu = None

    def _delete(self, ids: np.ndarray) -> None:
        if self.kind == "hnsw":
            self._id_node[ids] = -1  # the nodes stay in the graph as tombstones
        else:
            self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu = None

    # ---------------------------------------------------------------------- mutations

    def _grow_node_map(self) -> None:
        if self.kind == "hnsw" and self._id_node.size < self._size:
            grown = np.full(self._alive.shape[0], -1, dtype=np.int64)
            grown[: self._id_node.size] = self._id_node
            self._id_node = grown

    def _reserve(self, n: int) -> None:
        super()._reserve(n)
        self._grow_node_map()

    def add(self, keys: torch.Tensor) -> torch.Tensor:
        self._check_keys("keys", keys)
        ids = self._grow_ids(keys.shape[0])
        self._grow_node_map()
        self._insert(keys, ids, rows=None)
        return torch.from_numpy(ids)

    def set_search_params(self, *, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Search-time knobs: nprobe (ivf, ivfpq), efSearch (hnsw); no rebuild needed."""
        for name, v in (("nprobe", nprobe), ("efSearch", efSearch)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if nprobe is not None:
            if self.kind not in ("ivf", "ivfpq"):
                raise TypeError(f"nprobe applies to ivf/ivfpq, not {self.kind!r}")
            self.params["nprobe"] = nprobe
            self._index.nprobe = min(nprobe, self.nlist)
            if self._gpu is not None:
                self._faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe",
                                                                    self._index.nprobe)
        if efSearch is not None:
            if self.kind != "hnsw":
                raise TypeError(f"efSearch applies to hnsw, not {self.kind!r}")
            self.params["efSearch"] = efSearch

    def update(self, ids, keys: torch.Tensor) -> None:
        a = self._check_ids(ids, unique=True)
        self._check_keys("keys", keys, n=a.size)
        if not a.size:
            return
        live = a[self._alive[a]]
        if live.size:
            self._delete(live)
        self._set_alive(a, True)
        self._insert(keys, a, rows=None)
        self._maybe_compact()

    def remove(self, ids) -> None:
        a = self._check_ids(ids, unique=False)
        a = np.unique(a[self._alive[a]])
        if not a.size:
            return
        self._delete(a)
        self._set_alive(a, False)
        self._maybe_compact()

    # ------------------------------------------------------------------ maintenance

    @property
    def num_tombstones(self) -> int:
        """hnsw: graph nodes no longer reachable as results (0 for other kinds)."""
        return int(self._index.ntotal - self._num_valid) if self.kind == "hnsw" else 0

    @property
    def needs_rebuild(self) -> bool:
        if self.kind in ("ivf", "ivfpq"):
            return self._changed > self.retrain_fraction * max(1, self._n_trained)
        if self.kind == "hnsw":
            return self.num_tombstones > 0.25 * max(1, self._index.ntotal) if self.compact_at is None \
                else False
        return False

    def _maybe_compact(self) -> None:
        if self.kind != "hnsw" or self.compact_at is None:
            return
        if self.num_tombstones > self.compact_at * max(1, self._index.ntotal):
            self.compact()

    def compact(self) -> None:
        """hnsw: rebuild the graph from its live nodes' stored vectors (drops tombstones)."""
        if self.kind != "hnsw":
            return
        live_ids = np.flatnonzero(self._alive[: self._size]).astype(np.int64)
        nodes = self._id_node[live_ids]
        old = self._index
        index = self._faiss.IndexHNSWFlat(self.dim, self.params["M"], self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.params["efConstruction"]
        self._index = index
        self._node_id = np.zeros(0, dtype=np.int64)
        self._id_node[:] = -1
        for s in range(0, nodes.size, _CHUNK_ROWS):
            x = old.reconstruct_batch(nodes[s:s + _CHUNK_ROWS])  # [chunk, d] float32
            first = index.ntotal
            index.add(x)
            chunk = live_ids[s:s + _CHUNK_ROWS]
            self._node_id = np.concatenate([self._node_id, chunk])
            self._id_node[chunk] = np.arange(first, first + chunk.size)
        self.version += 1

    # ------------------------------------------------------------------------ search

    def _searcher(self):
        if not self.use_gpu:
            return self._index
        if self._gpu is None:
            faiss = self._faiss
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            dev = self.device.index if self.device.index is not None else torch.cuda.current_device()
            src = self._index.index if self.kind == "flat" else self._index
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, dev, src)
            if self.kind != "flat":
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self._index.nprobe)
            # GPU flat holds positions: map them to entry ids through the CPU IDMap's table
            self._gpu_ids = (faiss.vector_to_array(self._index.id_map) if self.kind == "flat" else None)
        return self._gpu

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, d] -> (scores [B, k] float32, ids [B, k] int64) on the queries' device.

        Scores are faiss's: exact inner products for flat / ivf / hnsw, PQ-approximate ones
        for ivfpq. Removed ids never appear; missing results are (-inf, -1).
        """
        self._check_queries(queries, k)
        out_dev = queries.device
        B = queries.shape[0]
        kk = min(k, self._num_valid)
        if kk == 0:
            return (torch.full((B, k), float("-inf"), device=out_dev),
                    torch.full((B, k), -1, dtype=torch.int64, device=out_dev))
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        if self.kind == "hnsw":
            D, nodes = self._search_hnsw(q, kk)
            ids = np.where(nodes >= 0, self._node_id[np.maximum(nodes, 0)], -1)
            live = nodes >= 0
            live &= self._id_node[np.maximum(ids, 0)] == nodes  # not a tombstone
        else:
            index = self._searcher()
            D, ids = index.search(q, kk)
            if self.use_gpu and self.kind == "flat":
                ids = np.where(ids >= 0, self._gpu_ids[np.maximum(ids, 0)], -1)
            live = ids >= 0
            live &= self._alive[np.clip(ids, 0, max(0, self._size - 1))]
        s, i = merge_topk(torch.from_numpy(np.ascontiguousarray(D, dtype=np.float32)),
                           torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                           k, torch.from_numpy(live))
        return s.to(out_dev), i.to(out_dev)

    # Tests flip this to exercise the over-fetch path used where faiss lacks IDSelector search.
    _use_selector = True

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = self._faiss
        index = self._index
        n_nodes = index.ntotal
        tomb = n_nodes - self._num_valid
        if tomb and self._use_selector and hasattr(faiss, "SearchParametersHNSW"):
            alive_nodes = np.zeros(n_nodes, dtype=bool)
            alive_nodes[self._id_node[self._id_node >= 0]] = True
            bitmap = np.packbits(alive_nodes, bitorder="little")  # faiss reads bit i&7 of byte i>>3
            sel = faiss.IDSelectorBitmap(n_nodes, faiss.swig_ptr(bitmap))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.params["efSearch"], k))
            D, I = index.search(q, k, params=params)
            del sel, bitmap  # only now may the selector's memory go
            return D, I
        # Over-fetch by the tombstone count: the k best live nodes are then always among them.
        fetch = min(n_nodes, k + tomb)
        index.hnsw.efSearch = max(self.params["efSearch"], fetch)
        return index.search(q, fetch)
