"""Placement of a memory's tables (docs/design.md, "Placement"): keys on one device, values
and token ids on another or in pinned host memory, reads staging only the retrieved rows.

On this CPU machine "pinned" keeps plain host memory (no CUDA: nothing can be page-locked)
and the staged read path runs as it does on a GPU, with the host as the target; results must
equal those of the everything-in-one-place memory bit for bit. The cuda + pinned case is
the gpu-marked test at the end."""
from __future__ import annotations

import pytest
import torch

from pluglm.memory import KnowledgeMemory

from conftest import (MeanPoolEncoder as Enc, SMALL_WORDS, tiny_memory_model,
                      random_sentences, wordpiece_tokenizer)


def big_tokenizer(extra):
    """A word-level vocabulary of more than 2**15 ids (w0, w1, ...)."""
    return wordpiece_tokenizer(SMALL_WORDS + ["."] + [f"w{i}" for i in range(extra)])


@pytest.fixture(scope="module")
def tok():
    return wordpiece_tokenizer(SMALL_WORDS + ["."])


def texts(n, seed=0):
    return list(random_sentences(n, seed, max_words=9))




def _memory(tok, n=41, **layout):
    mem = KnowledgeMemory.from_texts(texts(n), tok, **layout)
    mem.encode(Enc(len(tok)), batch_size=9, progress=False)
    return mem


def _same_reads(a, b, M, key_dim=8):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, M, (6, 4), generator=gen)
    q = torch.randn(6, key_dim, generator=gen)
    assert all(torch.equal(x, y) for x, y in zip(a.search(q, 5), b.search(q, 5)))
    if a.values is not None:
        ka, va = a.fetch(ids)
        kb, vb = b.fetch(ids)
        assert torch.equal(ka, kb) and torch.equal(va, vb) and va.device == a.device
    assert torch.equal(a.fetch_keys(ids), b.fetch_keys(ids))
    for trim in (False, True):
        ta, ma = a.token_ids_of(ids, trim=trim)
        tb, mb = b.token_ids_of(ids, trim=trim)
        assert torch.equal(ta, tb) and torch.equal(ma, mb) and ta.dtype == torch.long
        assert tuple(ta.shape[:2]) == (6, 4)


def test_place_pinned_on_cpu_reads_like_one_device(tok):
    ref = _memory(tok)
    mem = _memory(tok)
    assert mem.placement == {"keys": "cpu", "values": "cpu", "pinned_pages": False,
                             "zero_copy": False}
    assert mem.place(values="pinned") is mem
    # no CUDA here: "pinned" is kept as asked, the pages are not locked (documented rule)
    assert mem.placement == {"keys": "cpu", "values": "pinned",
                             "pinned_pages": torch.cuda.is_available(), "zero_copy": False}
    assert mem.device == torch.device("cpu") and mem.version == ref.version
    _same_reads(mem, ref, len(ref))
    # only the gathered rows were staged: buffers sized to B*N rows, not to M
    snap = mem.snapshot()
    row_bytes = mem.values.shape[1] * mem.values.element_size()
    assert 0 < snap.stager.staged_bytes <= 4 * (1024 * 8 + 24 * row_bytes + 24 * 64)
    before = snap.stager.staged_bytes
    mem.fetch(torch.tensor([[1, 2, 3, 4]] * 6))
    assert snap.stager.staged_bytes == before  # the buffers are reused
    mem.place(values="cpu")
    assert mem.placement["values"] == "cpu"
    _same_reads(mem, ref, len(ref))


@pytest.mark.parametrize("layout", [dict(), dict(key_dtype=torch.int8, value_dtype=torch.bfloat16),
                                    dict(store_values=False)])
@pytest.mark.parametrize("mmap", [True, False])
def test_load_placed_mapped_and_in_memory(tok, tmp_path, layout, mmap):
    ref = _memory(tok, **layout)
    ref.save(tmp_path / "m")
    mem = KnowledgeMemory.load(tmp_path / "m", mmap=mmap, values_device="pinned")
    assert mem.placement["values"] == "pinned" and not mem.placement["pinned_pages"] \
        or torch.cuda.is_available()
    snap = mem.snapshot()
    assert ("token_ids" in snap.mapped) == mmap
    _same_reads(mem, ref, len(ref))
    # placing a mapped memory moves nothing: its row tables stay the mapped ones
    ptr = mem.token_ids.data_ptr()
    mem.place(keys="cpu", values="pinned")
    assert mem.token_ids.data_ptr() == ptr


@pytest.mark.parametrize("mmap", [True, False])
def test_zero_copy_reads(tok, tmp_path, mmap):
    """zero_copy=True: reads go through pluglm_kernels.gather_rows (Triton; here under the
    interpreter on host tensors: the GPU path's logic), the ids never visit the staging
    buffers; a mapped table keeps the staged path. Same results either way."""
    pytest.importorskip("triton")
    from pluglm_kernels import triton_interpret

    ref = _memory(tok, **dict(key_dtype=torch.int8))
    ref.save(tmp_path / "m")
    mem = KnowledgeMemory.load(tmp_path / "m", mmap=mmap).place(values="pinned", zero_copy=True)
    assert mem.placement["zero_copy"]
    _same_reads(mem, ref, len(ref))
    staged = mem.snapshot().stager.staged_bytes
    assert (staged == 0) == (triton_interpret() and not mmap)
    mem.place(values="cpu")  # leaving "pinned" turns zero-copy off
    assert not mem.placement["zero_copy"]


def test_mutations_keep_the_placement(tok):
    enc = Enc(len(tok))
    ref = _memory(tok, n=20)
    mem = _memory(tok, n=20).place(values="pinned")
    for m in (ref, mem):
        new = m.add(texts(4, seed=7))
        m.update([3], ["salt storm ."])
        m.remove([int(new[1]), 6])
        m.encode(enc, only_stale=True, progress=False)
    assert mem.placement["values"] == "pinned"
    _same_reads(mem, ref, len(ref))
    m1, m2 = ref.compact(), mem.compact()
    assert torch.equal(m1, m2)
    _same_reads(mem, ref, len(ref))
    k = torch.randn(len(ref), 8)
    v = torch.randn(len(ref), 12)
    ref.set_keys(k, v)
    mem.set_keys(k, v)
    assert ref.validate().as_dict() == mem.validate().as_dict()
    _same_reads(mem, ref, len(ref))


def test_bad_placement_arguments_name_the_argument(tok, tmp_path):
    mem = _memory(tok, n=8)
    with pytest.raises(ValueError, match="keys='pinned'"):
        mem.place(keys="pinned")
    with pytest.raises(ValueError, match="values must be a device"):
        mem.place(values="the moon")
    with pytest.raises(TypeError, match="values must be a torch.device"):
        mem.place(values=2.5)
    with pytest.raises(ValueError, match="zero_copy=True .* needs values='pinned'"):
        mem.place(zero_copy=True)
    with pytest.raises(TypeError, match="zero_copy must be a bool"):
        mem.place(values="pinned", zero_copy="yes")
    mem.save(tmp_path / "m")
    with pytest.raises(ValueError, match="keys_device"):
        KnowledgeMemory.load(tmp_path / "m", keys_device="nowhere")
    with pytest.raises(ValueError, match="^device"):
        KnowledgeMemory.load(tmp_path / "m", device="pinned")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="values_device='cuda:0': CUDA is not available"):
            KnowledgeMemory.load(tmp_path / "m", values_device="cuda:0")
    assert mem.placement["values"] == "cpu"  # a failed place changes nothing




@pytest.mark.parametrize("store_values", [True, False])
def test_model_reads_a_placed_memory_exactly(tok, tmp_path, store_values):
    """Eval forwards (stored values, or values on demand re-encoded from staged token ids)
    and training gradients (the retrieved entries re-encoded from staged token ids) are
    bit-identical to the one-device memory's, mapped or not."""
    model = tiny_memory_model(len(tok))
    ref = KnowledgeMemory.from_texts(texts(30), tok, max_length=16, store_values=store_values)
    ref.encode(model, progress=False)
    ref.save(tmp_path / "m")
    placed = [KnowledgeMemory.load(tmp_path / "m", values_device="pinned"),
              KnowledgeMemory.load(tmp_path / "m", mmap=False).place(values="pinned"),
              KnowledgeMemory.load(tmp_path / "m", mmap=False).place(values="pinned",
                                                                     zero_copy=True)]
    ids = torch.randint(5, len(tok), (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, memory=ref).last_hidden_state
        for mem in placed:
            assert torch.equal(model(ids, memory=mem).last_hidden_state, want)

    def grads(mem):
        model.zero_grad()
        model.train()
        out = model(ids, memory=mem).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        model.eval()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_ref = grads(ref)
    assert any("embeddings.word_embeddings" in n for n in g_ref)  # the re-encode got gradient
    for mem in placed:
        g = grads(mem)
        assert g.keys() == g_ref.keys()
        assert all(torch.equal(g[n], g_ref[n]) for n in g)


def test_uint16_token_ids_save_load_and_read(tmp_path):
    big = big_tokenizer(40001)
    words = ["w32999", "w40000", "w5", "the", "cat"]
    mem = KnowledgeMemory.from_texts([" ".join(words[i:] + words[:i]) for i in range(5)], big)
    assert mem.token_ids.dtype == torch.uint16
    hi = big.convert_tokens_to_ids("w40000")
    assert hi > 32767
    tok, mask = mem.token_ids_of(torch.tensor([[0, 3]]))
    assert tok.dtype == torch.long and int(tok.max()) == hi and int(tok.min()) >= 0
    mem.update([1], ["w40000 w40000 cat"])
    mem.add(["w32999 the w40000 w5 cat cat"])
    mem.save(tmp_path / "u")
    man = (tmp_path / "u" / "manifest.json").read_text()
    assert '"uint16"' in man
    for mmap in (True, False):
        back = KnowledgeMemory.load(tmp_path / "u", mmap=mmap, values_device="pinned")
        assert back.token_ids.dtype == torch.uint16
        assert torch.equal(back.token_ids.to(torch.int64), mem.token_ids.to(torch.int64))
        all_ids = torch.arange(len(back))[None]
        assert torch.equal(back.token_ids_of(all_ids)[0], mem.token_ids_of(all_ids)[0])
    c = KnowledgeMemory.concat([mem, back])
    assert c.token_ids.dtype == torch.uint16
    assert int(c.token_ids_of(torch.tensor([[7]]))[0].max()) == hi
    c.compact()
    enc = Enc(len(big))
    c.encode(enc, progress=False)
    assert c.num_searchable == len(c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keys_pinned_values_no_table_sized_device_allocation(tok):
    """Keys on the GPU, values and token ids pinned on the host: reads equal the CPU memory's
    and allocate O(B*N) on the device, never O(M)."""
    from pluglm.bench.large import synthetic_memory

    dev = torch.device("cuda", torch.cuda.current_device())
    M, d = 200_000, 256
    gen = torch.Generator().manual_seed(1)
    big = synthetic_memory(M, 8, L=32, key_dtype=torch.float32, value_dim=d)
    mem = synthetic_memory(M, 8, L=32, key_dtype=torch.float32, value_dim=d)
    mem.place(keys=dev, values="pinned")
    assert mem.placement == {"keys": str(dev), "values": "pinned", "pinned_pages": True,
                             "zero_copy": False}
    assert mem.values.is_pinned() and mem.token_ids.is_pinned() and mem.keys.device == dev
    q = torch.randn(32, 8, generator=gen)
    _, ids_ref = big.search(q, 5)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    _, ids = mem.search(q.to(dev), 5)
    k, v = mem.fetch(ids)
    tok_ids, mask = mem.token_ids_of(ids, trim=True)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    assert peak < M * d * 4 // 20, f"device peak {peak} bytes for a {M * d * 4}-byte value table"
    assert v.device == dev and tok_ids.device == dev
    assert torch.equal(ids.cpu(), ids_ref)
    kr, vr = big.fetch(ids_ref)
    assert torch.equal(v.cpu(), vr) and torch.equal(k.cpu(), kr)
    assert torch.equal(tok_ids.cpu(), big.token_ids_of(ids_ref, trim=True)[0])
    # zero-copy: the kernel reads the pinned rows; no staging, same rows, same small peak
    mem.place(zero_copy=True)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    k2, v2 = mem.fetch(ids)
    t2, _ = mem.token_ids_of(ids, trim=True)
    torch.cuda.synchronize(dev)
    assert torch.cuda.max_memory_allocated(dev) - base < M * d * 4 // 20
    assert torch.equal(v2, v) and torch.equal(k2, k) and torch.equal(t2, tok_ids)


def test_uint16_rows_through_fetch_rows():
    """Shards fetch token rows through pluglm.distributed.fetch_rows (index_put + a byte
    all_reduce): uint16 tables go through their int16 bits. One rank, no process group."""
    from pluglm.distributed import fetch_rows

    t = torch.randint(0, 65536, (10, 3), dtype=torch.int32).to(torch.uint16)
    ids = torch.tensor([[1, 4], [9, -1]])
    r = fetch_rows(ids, t, 0)
    assert r.dtype == torch.uint16
    assert torch.equal(r.to(torch.int32)[0], t.to(torch.int32)[[1, 4]])
    assert torch.equal(r.to(torch.int32)[1, 0], t.to(torch.int32)[9])
    assert not bool(r.to(torch.int32)[1, 1].any())
