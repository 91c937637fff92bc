"""The five PlugLM classes behave like transformers models (issue 18), tested the way
transformers tests its models: a tiny config, every class, one behaviour per test.

1. ``resize_token_embeddings`` for every head (the MLM bias and an untied decoder too);
2. ``torch.export`` and ``torch.compile(fullgraph=True)`` with a ``KnowledgeMemory``;
3. ``copy.deepcopy`` of a model with a memory plugged in, and of the memory itself;
4. ``attn_implementation`` "sdpa" (default) and "eager", reported and equivalent;
5. gradient checkpointing, memory layers included (the recompute reuses the retrieval);
6. ``output_attentions`` from the argument and from the config (self-attention
   probabilities, knowledge-attention probabilities in the retrieval output);
7. ``from_pretrained(device_map="cpu")`` and disk offload (accelerate).
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err, wordpiece_tokenizer
from pluglm.configuration_pluglm import PlugLMConfig
from pluglm.memory import KnowledgeMemory
from pluglm.modeling_pluglm import (
    PlugLMForMaskedLM,
    PlugLMForQuestionAnswering,
    PlugLMForSequenceClassification,
    PlugLMForTokenClassification,
    PlugLMModel,
)
from pluglm.nn import TensorMemory

ALL_MODEL_CLASSES = (PlugLMModel, PlugLMForMaskedLM, PlugLMForSequenceClassification,
                     PlugLMForQuestionAnswering, PlugLMForTokenClassification)
CLASS_IDS = [c.__name__ for c in ALL_MODEL_CLASSES]
WORDS = [f"w{i}" for i in range(80)]


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece_tokenizer(WORDS)


def tiny_config(tokenizer, **kw) -> PlugLMConfig:
    base = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                num_attention_heads=2, intermediate_size=48, max_position_embeddings=40,
                num_memory_layers=2, memory_k=3, key_dim=16, doc_max_length=12,
                memory_ffn_dim=24, num_labels=3)
    base.update(kw)
    return PlugLMConfig(**base)


def knowledge_memory(model, tokenizer, n=24) -> KnowledgeMemory:
    texts = [" ".join(WORDS[i % 70:i % 70 + 2 + i % 5]) for i in range(0, 3 * n, 3)]
    km = KnowledgeMemory.from_texts(texts, tokenizer, max_length=model.config.doc_max_length)
    km.encode(model, progress=False)
    return km


def make_model(cls, tokenizer, **kw):
    model = cls(tiny_config(tokenizer, **kw))
    with torch.no_grad():  # non-trivial head biases, LayerNorms and knowledge-attention betas
        for name, p in model.named_parameters():
            if name.endswith(("bias", "beta")) or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.set_memory(knowledge_memory(model, tokenizer))


def inputs(config, B=3, T=9):
    ids = torch.randint(5, config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0
    return ids * mask, mask


def main_output(out) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no main output in {type(out).__name__}")


def training_loss(model, ids, mask, **kw):
    """A loss through the head's own loss where it has one."""
    B, T = ids.shape
    if isinstance(model, PlugLMForMaskedLM):
        kw["labels"] = torch.where(mask.bool(), ids, -100)
    elif isinstance(model, PlugLMForSequenceClassification):
        kw["labels"] = torch.arange(B) % model.config.num_labels
    elif isinstance(model, PlugLMForTokenClassification):
        kw["labels"] = torch.randint(0, model.config.num_labels, (B, T))
    elif isinstance(model, PlugLMForQuestionAnswering):
        kw["start_positions"], kw["end_positions"] = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    out = model(ids, attention_mask=mask, **kw)
    loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.square().mean()
    return loss, out


def assert_close(a, b, rtol, what=""):
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a.detach(), b.detach())
    assert err <= rtol, f"{what}: rel err {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------- 1. output embeddings


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_resize_token_embeddings(cls, tokenizer, tmp_path, fresh_seed):
    model = make_model(cls, tokenizer).eval()
    V = model.config.vocab_size
    # tied (the default) the decoder is the word-embedding matrix itself: no separate module
    assert model.get_output_embeddings() is None
    for new in (V + 7, V + 2):  # grow, then shrink (not below the memory's vocabulary)
        model.resize_token_embeddings(new)
        assert model.config.vocab_size == new
        assert model.get_input_embeddings().weight.shape[0] == new
        ids, mask = inputs(model.config)
        ids[0, 1] = new - 1  # a token only the resized table has (or its new last row)
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        if cls is PlugLMForMaskedLM:
            assert model.cls.predictions.bias.shape == (new,)
            assert out.logits.shape[-1] == new
        assert torch.isfinite(main_output(out)).all()
    model.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path).set_memory(model.memory).eval()
    with torch.no_grad():
        assert torch.equal(main_output(back(ids, attention_mask=mask)), main_output(out))


@pytest.mark.parametrize("untie", ["tie_word_embeddings=False", "compat=published"])
def test_resize_untied_decoder(untie, tokenizer, fresh_seed):
    kw = {"tie_word_embeddings": False} if untie.startswith("tie") else {"compat": "published"}
    model = make_model(PlugLMForMaskedLM, tokenizer, **kw).eval()
    head = model.get_output_embeddings()
    assert head is model.cls.predictions.decoder and head.bias is None
    assert head.weight is not model.get_input_embeddings().weight
    V = model.config.vocab_size
    model.resize_token_embeddings(V + 5)
    head = model.get_output_embeddings()
    assert head.weight.shape[0] == V + 5 and model.cls.predictions.bias.shape == (V + 5,)
    assert head.weight is not model.get_input_embeddings().weight
    ids, mask = inputs(model.config)
    ids[0, 1] = V + 4
    with torch.no_grad():
        assert model(ids, attention_mask=mask).logits.shape[-1] == V + 5


# --------------------------------------------------- 2. torch.export / torch.compile


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_export_and_compile_with_knowledge_memory(cls, tokenizer, fresh_seed):
    torch._dynamo.reset()
    model = make_model(cls, tokenizer).eval()
    ids, mask = inputs(model.config)
    with torch.no_grad():
        eager = main_output(model(ids, attention_mask=mask))
        exported = torch.export.export(model, (ids,), {"attention_mask": mask})
        got = main_output(exported.module()(ids, attention_mask=mask))
        assert_close(got, eager, 1e-6, "exported vs eager")
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_close(main_output(compiled(ids, attention_mask=mask)), eager, 1e-6, "compiled vs eager")


def test_memory_id_check_eager_and_traced(tokenizer, fresh_seed):
    """The bounds check stays: eagerly a ValueError naming the argument; traced, an
    in-graph assertion (no data-dependent guard, so fullgraph compiles)."""
    model = make_model(PlugLMModel, tokenizer)
    km = model.memory
    M = len(km)
    with pytest.raises(ValueError, match=r"ids must be entry ids in \[0, 24\)"):
        km.fetch(torch.tensor([[0, M]]))
    torch._dynamo.reset()
    fetch = torch.compile(lambda i: km.fetch(i)[1].sum(), fullgraph=True, backend="aot_eager")
    assert torch.allclose(fetch(torch.tensor([[0, M - 1]])), km.values[[0, M - 1]].sum())
    with pytest.raises(RuntimeError, match=r"ids must be entry ids in \[0, 24\)"):
        fetch(torch.tensor([[0, M]]))


# --------------------------------------------------------------------- 3. deepcopy


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_deepcopy_with_memory_plugged_in(cls, tokenizer, fresh_seed):
    model = make_model(cls, tokenizer).eval()
    clone = copy.deepcopy(model)
    assert clone.memory is model.memory  # the memory is shared, never owned (documented)
    assert all(layer.memory is model.memory for layer in clone.memory_layers())
    ids, mask = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(main_output(clone(ids, attention_mask=mask)),
                           main_output(model(ids, attention_mask=mask)))
        p = next(clone.parameters())
        before = next(model.parameters()).clone()
        p.add_(1.0)
        assert torch.equal(next(model.parameters()), before)  # weights are copies


def test_knowledge_memory_copy_and_deepcopy(tokenizer, fresh_seed):
    model = make_model(PlugLMModel, tokenizer)
    km = model.memory
    q = torch.randn(4, km.key_dim)
    want = km.search(q, 3)
    shallow, deep = copy.copy(km), copy.deepcopy(km)
    for c in (shallow, deep):
        assert isinstance(c, KnowledgeMemory) and len(c) == len(km) and c.version == km.version
        assert c._lock is not km._lock and c._faiss is not km._faiss
        got = c.search(q, 3)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert c.texts == km.texts and c.sources == km.sources
    # copy.copy shares the tables (copy-on-write snapshots), deepcopy copies them
    assert shallow.keys.data_ptr() == km.keys.data_ptr()
    assert deep.keys.data_ptr() != km.keys.data_ptr() and torch.equal(deep.keys, km.keys)
    assert deep.token_ids.data_ptr() != km.token_ids.data_ptr()
    # mutations stay in the memory they were made on
    shallow.remove([int(want[1][0, 0])])
    deep.update([0], ["w1 w2 w3"])
    assert km.valid.all() and km.version == deep.version - 1 == shallow.version - 1
    assert km.texts[0] != "w1 w2 w3"
    # each copy locks on its own: a mutation holding the original's lock does not block it
    with km._lock:
        t = threading.Thread(target=lambda: deep.remove([1]))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive()


# ------------------------------------------------------------ 4. attn_implementation


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_attn_implementation_sdpa_and_eager(cls, tokenizer, tmp_path, fresh_seed):
    model = make_model(cls, tokenizer).eval()
    assert model.config._attn_implementation == "sdpa"  # what runs by default
    model.save_pretrained(tmp_path)
    ids, mask = inputs(model.config)
    outs = {}
    for impl in ("sdpa", "eager"):
        m = cls.from_pretrained(tmp_path, attn_implementation=impl).set_memory(model.memory).eval()
        assert m.config._attn_implementation == impl
        with torch.no_grad():
            outs[impl] = main_output(m(ids, attention_mask=mask))
    assert_close(outs["eager"], outs["sdpa"], 1e-5, "eager vs sdpa")
    with pytest.raises(ValueError, match="attn_implementation|[Ff]lash"):
        cls.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.5x
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            assert_close(main_output(model(ids, attention_mask=mask)), outs["sdpa"], 1e-5)


def test_unsupported_attn_implementation_raises(tokenizer):
    cfg = tiny_config(tokenizer)
    cfg._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation|flex"):
        PlugLMModel(cfg)


def test_eager_attention_matches_reference(tokenizer, fresh_seed):
    """The eager path is BERT's attention: softmax(q k^T / sqrt(Dh) + padding bias) v."""
    model = make_model(PlugLMModel, tokenizer, attn_implementation="eager").eval()
    att = model.encoder.layer[0].attention.self
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    att.double()
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[2, 6:] = False
    bias = torch.zeros(3, 1, 1, 9, dtype=torch.float64).masked_fill(~keep[:, None, None], -1e300)
    out, probs = att(x, bias, eager=True)
    q, k, v = (lin(x).view(3, 9, 2, 16).transpose(1, 2) for lin in (att.query, att.key, att.value))
    ref_p = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, dim=-1)
    assert_close(probs, ref_p, 1e-12, "probs")
    assert_close(out, (ref_p @ v).transpose(1, 2).reshape(3, 9, 32), 1e-12, "out")
    assert probs[2, :, :, 6:].abs().max() == 0


# ------------------------------------------------------------ 5. gradient checkpointing


class _ShiftingMemory:
    """A memory whose search answers differently from its second call on (as if the keys
    had been refreshed between forward and backward): a recompute that searched again
    would rebuild another graph."""

    def __init__(self, inner):
        self.inner = inner
        self.searches = 0

    def search(self, q, k):
        self.searches += 1
        scores, ids = self.inner.search(q, k)
        if self.searches > self.inner_layers:
            ids = (ids + 1) % len(self.inner)
        return scores, ids

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_gradient_checkpointing(cls, reentrant, tokenizer, fresh_seed):
    model = make_model(cls, tokenizer, memory_attention_dropout=0.2).train()
    ids, mask = inputs(model.config)
    ref_model = copy.deepcopy(model)
    n_mem = len(model.memory_layers())

    def step(m):
        mem = _ShiftingMemory(model.memory)
        mem.inner_layers = n_mem
        torch.manual_seed(1234)  # the same dropout masks in both runs
        loss, out = training_loss(m, ids, mask, memory=mem, output_retrieval=True)
        loss.backward()
        stats = [(b.running_mean.clone(), b.running_var.clone()) for b in
                 (layer.batch_norm for layer in m.memory_layers())]
        return mem.searches, loss.detach(), out.retrieval, stats

    n_ref, loss_ref, r_ref, stats_ref = step(ref_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model._plug.encoder.layer)
    n, loss, r, stats = step(model)
    assert n == n_ref == n_mem  # one search per memory layer: the recompute reused it
    assert_close(loss, loss_ref, 1e-6, "loss")
    for a, b in zip(r, r_ref):
        assert torch.equal(a.indices, b.indices)
    for (m1, v1), (m2, v2) in zip(stats, stats_ref):  # statistics updated once, not twice
        assert_close(m1, m2, 1e-6, "running_mean")
        assert_close(v1, v2, 1e-6, "running_var")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    assert "bert.knowledge_encoder.key_proj.weight" in grads or cls is PlugLMModel
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-5, name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


# --------------------------------------------------------------- 6. output_attentions


def _check_attentions(out, config, B, T, mask):
    H, L = config.num_attention_heads, config.num_hidden_layers
    assert isinstance(out.attentions, tuple) and len(out.attentions) == L
    for p in out.attentions:
        assert p.shape == (B, H, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(B, H, T), atol=1e-5)
        assert p.masked_select(~mask.bool()[:, None, None, :]).abs().max() == 0  # padding keys
    assert len(out.retrieval) == config.num_memory_layers
    for r in out.retrieval:
        assert r.attentions.shape == (B, T, H, config.memory_k) and not r.attentions.requires_grad
        assert torch.allclose(r.attentions.sum(-1), torch.ones(B, T, H), atol=1e-5)


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_output_attentions_argument_and_config(cls, tokenizer, fresh_seed):
    model = make_model(cls, tokenizer).eval()
    ids, mask = inputs(model.config)
    B, T = ids.shape
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        assert plain.attentions is None and plain.retrieval is None
        by_arg = model(ids, attention_mask=mask, output_attentions=True)
        _check_attentions(by_arg, model.config, B, T, mask)
        assert_close(main_output(by_arg), main_output(plain), 1e-5, "eager vs sdpa")
        as_tuple = model(ids, attention_mask=mask, output_attentions=True, return_dict=False)
        assert len(as_tuple) == len(by_arg.to_tuple())
        assert all(torch.equal(a, b) for a, b in zip(as_tuple[-2], by_arg.attentions))

        cfg = copy.deepcopy(model.config)
        cfg._attn_implementation = "eager"  # transformers 5 accepts the flag only with eager
        cfg.output_attentions = True
        by_config = cls(cfg).set_memory(model.memory).eval()
        by_config.load_state_dict(model.state_dict())
        out = by_config(ids, attention_mask=mask)
        _check_attentions(out, cfg, B, T, mask)
        for a, b in zip(out.attentions, by_arg.attentions):
            assert_close(a, b, 1e-6, "config vs argument")
        for a, b in zip(out.retrieval, by_arg.retrieval):
            assert_close(a.attentions, b.attentions, 1e-6, "knowledge attentions")
        off = by_config(ids, attention_mask=mask, output_attentions=False)
        assert off.attentions is None and off.retrieval is None


# Precomputed tables exist for multi_head only, so ("tables", "sentence_level") is no case.
@pytest.mark.parametrize("path,attention", [
    (path, attention) for attention in ("multi_head", "sentence_level")
    for path in ("stored", "tables", "training")
    if not (path == "tables" and attention != "multi_head")])
def test_knowledge_attention_probabilities(path, attention, tokenizer, fresh_seed):
    """retrieval[i].attentions is softmax_j(q_t.k_j / sqrt(Dh) + beta_h c_j) computed from
    the layer's own query, entries and weights (checked against a float64 recomputation)."""
    model = make_model(PlugLMModel, tokenizer, knowledge_attention=attention,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       memory_attention_dropout=0.0)
    model.train(path == "training")
    if path == "tables":
        model.precompute_tables()
    queries, inputs_ = {}, {}  # the first query and input of each memory layer
    hooks = []
    for i, layer in enumerate(model.memory_layers()):
        hooks.append(layer.batch_norm.register_forward_hook(
            lambda m, a, o, i=i: queries.setdefault(i, o.detach())))
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, i=i: inputs_.setdefault(i, a[0].detach())))
    ids, mask = inputs(model.config)
    with torch.set_grad_enabled(path == "training"):
        out = model(ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    km = model.memory
    for i, (layer, r) in enumerate(zip(model.memory_layers(), out.retrieval)):
        A, q = inputs_[i].double(), queries[i].double()
        keys, values = km.fetch(r.indices)
        if path == "training":  # the training forward re-encodes the retrieved entries
            tok, m = km.token_ids_of(r.indices)
            with torch.no_grad():
                keys, values = model.encode_memory(tok.view(-1, tok.shape[-1]), m.view(-1, m.shape[-1]))
            keys, values = keys.view(*r.indices.shape, -1), values.view(*r.indices.shape, -1)
        c = F.cosine_similarity(q[:, None, :], keys.double(), dim=-1)  # [B, N]
        ka = layer.knowledge_attention
        if attention == "sentence_level":
            want = torch.softmax(c, -1)[:, None, None, :].expand_as(r.attentions)
        else:
            H, Dh = ka.num_heads, ka.head_dim
            B, T = ids.shape
            qh = F.linear(A, ka.q_proj.weight.double(), ka.q_proj.bias.double()).view(B, T, H, Dh)
            kh = F.linear(values.double(), ka.k_proj.weight.double(),
                          ka.k_proj.bias.double()).view(B, -1, H, Dh)
            logits = torch.einsum("bthd,bjhd->bthj", qh, kh) / Dh ** 0.5
            want = torch.softmax(logits + ka.beta.double()[None, None, :, None] * c[:, None, None, :], -1)
        assert_close(r.attentions, want, 1e-5, f"layer {i}")


# ------------------------------------------------------- 7. device_map and offload


@pytest.mark.parametrize("cls", ALL_MODEL_CLASSES, ids=CLASS_IDS)
def test_device_map_cpu_and_disk_offload(cls, tokenizer, tmp_path, fresh_seed):
    """device_map="cpu" loads as usual; offloading the layers to disk works (inference);
    offloading what the model reads directly (embeddings, knowledge encoder) fails at
    load with a message saying what may be offloaded."""
    pytest.importorskip("accelerate")
    model = make_model(cls, tokenizer).eval()
    model.save_pretrained(tmp_path / "m")
    ids, mask = inputs(model.config)
    with torch.no_grad():
        want = main_output(model(ids, attention_mask=mask))
    loaded = cls.from_pretrained(tmp_path / "m", device_map="cpu").set_memory(model.memory).eval()
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(main_output(loaded(ids, attention_mask=mask)), want)

    prefix = "" if cls is PlugLMModel else "bert."
    device_map = {f"{prefix}embeddings": "cpu", f"{prefix}encoder": "disk",
                  f"{prefix}knowledge_encoder": "cpu"}
    for name, _ in model.named_children():  # the heads
        if name != "bert":
            device_map.setdefault(name, "cpu")
    if model._plug.pooler is not None:
        device_map[f"{prefix}pooler"] = "cpu"
    offloaded = cls.from_pretrained(tmp_path / "m", device_map=device_map,
                                    offload_folder=str(tmp_path / "offload"))
    offloaded.set_memory(model.memory).eval()
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really on disk
    with torch.no_grad():
        assert torch.equal(main_output(offloaded(ids, attention_mask=mask)), want)

    for part in ("embeddings", "knowledge_encoder"):
        bad = dict(device_map, **{f"{prefix}encoder": "cpu", f"{prefix}{part}": "disk"})
        with pytest.raises(ValueError, match=f"offloads '{prefix}{part}'.*cannot be offloaded"):
            cls.from_pretrained(tmp_path / "m", device_map=bad,
                                offload_folder=str(tmp_path / "offload2"))
