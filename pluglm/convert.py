"""Convert the published PlugLM checkpoint and knowledge base (docs/design.md §1).

The paper's authors publish ``ckpt_8000.pt`` (a ``torch.save`` of their masked-LM model's
state dict) and ``tokenized_wiki.npy`` (the knowledge base: one row of BERT token ids per
entry, padded with 0). :func:`from_published` turns them into a ``PlugLMForMaskedLM`` with
``compat="published"`` (so it computes what their code computes, see the README section
"Coming from the published code") and, given the knowledge base, a ``KnowledgeMemory``
whose keys and values are encoded by the converted model. ``pluglm convert-published``
(:mod:`pluglm.cli.convert`) is the same on the command line.

Guarantees:
* the checkpoint is read with ``torch.load(weights_only=True)`` only — tensors and plain
  containers, never arbitrary pickled objects or code; the ``.npy`` with
  ``allow_pickle=False``, memory-mapped and read in chunks;
* every published tensor is accounted for: each maps to exactly one of ours, or is a copy
  of one that does (the published model holds its shared retriever and embedding modules
  under several names; those copies must be equal), or is a constant buffer with its
  expected value. Anything else, and any of our tensors left without a source, raises
  :class:`PublishedCheckpointError` naming them;
* ``OUT`` is a ``save_pretrained`` checkpoint (safetensors, config with
  ``compat="published"``, loadable with the Auto classes) and ``OUT/memory`` the encoded
  memory, each written atomically (the model first, then the memory).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .configuration_pluglm import PlugLMConfig

MEMORY_SUBDIR = "memory"
KNOWLEDGE_SOURCE = "published"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


class PublishedCheckpointError(ValueError):
    """The file is not a published PlugLM checkpoint this converter can map completely."""


# ---------------------------------------------------------------------------- reading

def load_published_state_dict(path) -> dict[str, torch.Tensor]:
    """The published state dict from ``path``: a bare state dict, or a dict that wraps one
    (under "state_dict", "model", "model_state_dict" or "module", or as its only dict of
    tensors). Loaded with ``torch.load(weights_only=True)``; a DDP "module." prefix is
    dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler names the object it refused
        raise PublishedCheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); pluglm reads tensors and plain containers only, "
            f"never arbitrary pickled objects") from None
    return _unwrap(obj, str(path))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    sd = _find_state_dict(obj, where)
    if all(k.startswith("module.") for k in sd):  # saved from the DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _find_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        inner = [v for v in obj.values() if _is_state_dict(v)]
        if len(inner) == 1:
            return dict(inner[0])
        if len(inner) > 1:
            raise PublishedCheckpointError(f"{where}: holds {len(inner)} state dicts and none "
                                           f"under {_WRAPPER_KEYS}; which one is the model?")
    raise PublishedCheckpointError(f"{where}: expected a state dict (names -> tensors) or a "
                                   f"dict wrapping one, got {type(obj).__name__}")


# ---------------------------------------------------------------------------- config

def _shape(sd, name, where="checkpoint"):
    if name not in sd:
        raise PublishedCheckpointError(f"{where}: missing {name}")
    return tuple(sd[name].shape)


def published_config(sd: dict[str, torch.Tensor], doc_max_length: int | None = None,
                     **overrides) -> PlugLMConfig:
    """The PlugLMConfig (compat="published") of a published state dict.

    Geometry is read from the tensors' shapes; what shapes do not show (activation,
    LayerNorm eps, dropouts, memory_k, and the head count of a sentence-level model) takes
    the published defaults unless given in ``overrides`` (PlugLMConfig field names)."""
    V, d = _shape(sd, "bert.embeddings.word_embeddings.weight")
    P = _shape(sd, "bert.embeddings.position_embeddings.weight")[0]
    types = _shape(sd, "bert.embeddings.token_type_embeddings.weight")[0]
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise PublishedCheckpointError(f"checkpoint: encoder layers must be numbered 0..L-1, "
                                       f"found {layers[:20]}")
    L = len(layers)
    mem = [i for i in layers if any(k.startswith(f"bert.encoder.layer.{i}.memory_layer.") for k in sd)]
    nm = len(mem)
    if mem != list(range(L - nm, L)):
        raise PublishedCheckpointError(f"checkpoint: memory layers {mem} are not the top "
                                       f"{nm} of {L} (the only layout pluglm builds)")
    cfg = dict(vocab_size=V, hidden_size=d, num_hidden_layers=L, max_position_embeddings=P,
               type_vocab_size=types, num_memory_layers=nm, pad_token_id=0, compat="published")
    plain = [i for i in layers if i not in mem]
    if plain:
        cfg["intermediate_size"] = _shape(sd, f"bert.encoder.layer.{plain[0]}.intermediate.dense.weight")[0]
    if nm:
        top = f"bert.encoder.layer.{mem[0]}."
        beta = top + "memory_layer.know_attn.beta"
        if beta in sd:
            cfg["knowledge_attention"] = "multi_head"
            cfg["num_attention_heads"] = sd[beta].numel()
        else:
            cfg["knowledge_attention"] = "sentence_level"
        ffn = top + "ffn.0.weight"
        cfg["memory_ffn_dim"] = _shape(sd, ffn)[0] if ffn in sd else 0
        cfg["key_dim"] = _shape(sd, "bert.encoder.retriever.key_proj.weight")[0]
        if top + "memory_layer.batch_norm.weight" not in sd:
            raise PublishedCheckpointError("checkpoint: memory layers without the query "
                                           "BatchNorm (query_batchnorm=False) are not supported")
    cfg["doc_max_length"] = min(288, P) if doc_max_length is None else doc_max_length
    for k, v in overrides.items():
        if k in ("num_attention_heads", "knowledge_attention") and k in cfg and cfg[k] != v:
            raise PublishedCheckpointError(f"{k}={v!r} contradicts the checkpoint ({cfg[k]!r})")
    cfg.update(overrides)
    # the published knowledge attention drops out with the self-attention's probability
    cfg.setdefault("memory_attention_dropout", cfg.get("attention_probs_dropout_prob", 0.1))
    if cfg.get("compat") != "published":
        raise ValueError("a converted checkpoint runs with compat='published' only")
    return PlugLMConfig(**cfg)


# ---------------------------------------------------------------------------- mapping

_POOL = {"w1": "att_fc1.weight", "b1": "att_fc1.bias", "w2": "att_fc2.weight", "b2": "att_fc2.bias"}
_MEMORY_BLOCK = (  # ours (after "memory.") -> published (after "bert.encoder.layer.i.")
    (r"pooler\.(w1|b1|w2|b2)", lambda m: "memory_layer.pooler.pooler." + _POOL[m.group(1)]),
    (r"(query_proj|batch_norm)\.(.+)", lambda m: f"memory_layer.{m.group(1)}.{m.group(2)}"),
    (r"knowledge_attention\.beta", lambda m: "memory_layer.know_attn.beta"),
    (r"knowledge_attention\.(\w+_proj\..+)",
     lambda m: "memory_layer.know_attn.biased_multihead_attn." + m.group(1)),
    (r"ffn\.(.+)", lambda m: "ffn." + m.group(1)),
    (r"layer_norm\.(.+)", lambda m: "LayerNorm." + m.group(1)),
)


def _published_name(ours: str) -> str | None:
    m = re.match(r"^bert\.encoder\.layer\.(\d+)\.memory\.(.+)$", ours)
    if m:
        for pat, fn in _MEMORY_BLOCK:
            mm = re.fullmatch(pat, m.group(2))
            if mm:
                return f"bert.encoder.layer.{m.group(1)}." + fn(mm)
        return None
    m = re.match(r"^bert\.knowledge_encoder\.(.+)$", ours)
    if m:
        rest = m.group(1)
        pm = re.fullmatch(r"pooler\.(w1|b1|w2|b2)", rest)
        if pm:
            return "bert.encoder.retriever.document_encoder.pooler.pooler." + _POOL[pm.group(1)]
        if rest.startswith(("key_proj.", "value_proj.")):
            return "bert.encoder.retriever." + rest
        return None
    if ours.startswith(("bert.embeddings.", "bert.encoder.layer.", "cls.predictions.")):
        return ours  # BERT names, unchanged
    return None


def _canonical(pub: str) -> str:
    """The name under which the published model's shared modules are first registered."""
    m = re.match(r"^bert\.encoder\.layer\.\d+\.memory_layer\.retriever\.(.+)$", pub)
    if m:
        pub = "bert.encoder.retriever." + m.group(1)
    m = re.match(r"^bert\.encoder\.retriever\.document_encoder\.embedding\.(.+)$", pub)
    if m:
        pub = "bert.embeddings." + m.group(1)
    if pub == "cls.predictions.decoder.bias":  # transformers aliases it to the head's bias
        pub = "cls.predictions.bias"
    return pub


def _constant_buffer_ok(name: str, t: torch.Tensor) -> bool | None:
    """None if ``name`` is not a known constant buffer, else whether it has its value."""
    if name == "bert.embeddings.position_ids":
        return torch.equal(t.reshape(-1).long(), torch.arange(t.numel()))
    if name == "bert.embeddings.token_type_ids":
        return not bool(t.ne(0).any())
    return None


def convert_state_dict(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` (a PlugLMForMaskedLM with compat="published") from the
    published ``sd``. Raises PublishedCheckpointError on any published tensor left unused,
    any of ours left without a source, or a shape mismatch."""
    ours = model.state_dict()
    out, used, problems = {}, set(), []
    for name, target in ours.items():
        pub = _published_name(name)
        if pub is None or pub not in sd:
            problems.append(f"no published tensor for {name}" + (f" (looked for {pub})" if pub else ""))
            continue
        t = sd[pub]
        if name.endswith(("pooler.w2",)):
            t = t.reshape(-1)  # att_fc2.weight [1, Hp] -> w2 [Hp]
        if tuple(t.shape) != tuple(target.shape):
            problems.append(f"{pub} has shape {tuple(t.shape)}, {name} needs {tuple(target.shape)}")
            continue
        out[name] = t
        used.add(pub)
    for pub, t in sd.items():
        if pub in used:
            continue
        canon = _canonical(pub)
        const = _constant_buffer_ok(canon, t)
        if const is not None:
            if not const:
                problems.append(f"buffer {pub} does not hold its constant value")
            continue
        if canon != pub and canon in used:
            if tuple(sd[canon].shape) != tuple(t.shape) or not torch.equal(sd[canon], t):
                problems.append(f"{pub} should be the same tensor as {canon} (a shared module) "
                                f"but differs")
            continue
        problems.append(f"published tensor {pub} {tuple(t.shape)} has no counterpart in pluglm")
    if problems:
        head = "; ".join(problems[:12]) + (f"; ... ({len(problems)} problems)" if len(problems) > 12 else "")
        raise PublishedCheckpointError(f"checkpoint does not map completely: {head}")
    return out


# ---------------------------------------------------------------------------- knowledge

def _open_knowledge(path):
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise PublishedCheckpointError(f"{path}: not a plain .npy array (pickled objects are "
                                       f"never loaded): {e}") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PublishedCheckpointError(f"{path}: expected a non-empty [M, L] integer array of "
                                       f"token ids, got {arr.dtype} {arr.shape}")
    return arr


def knowledge_memory_from_token_ids(arr, *, vocab_size: int, pad_token_id: int = 0,
                                    chunk_rows: int = 65536, source: str = KNOWLEDGE_SOURCE,
                                    where: str = "knowledge", tokenizer=None):
    """A KnowledgeMemory (not yet encoded) from an [M, L] array of token ids padded with
    ``pad_token_id`` (e.g. a memory-mapped .npy), copied ``chunk_rows`` rows at a time.

    Padding must be trailing: the published encoder masks ``ids != pad`` and pluglm stores a
    length per entry, which agree only then (checked; an entry with a pad id inside raises).
    Entries carry no text (``texts_of`` gives empty strings) unless ``tokenizer`` (the one
    that made the ids) is given: then each entry's text is its decoded ids (held in RAM)."""
    import numpy as np

    from .memory import KnowledgeMemory, MemorySnapshot

    M, L = (int(x) for x in arr.shape)
    tok_dtype = torch.int16 if vocab_size <= 32768 else torch.int32
    token_ids = torch.empty(M, L, dtype=tok_dtype)
    lengths = torch.empty(M, dtype=torch.int32)
    col = torch.arange(1, L + 1)
    texts = [] if tokenizer is not None else None
    for s in range(0, M, chunk_rows):
        e = min(M, s + chunk_rows)
        t = torch.from_numpy(np.asarray(arr[s:e]).astype(np.int64))  # [c, L]
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise PublishedCheckpointError(f"{where}: rows {s}..{e - 1} hold token ids outside "
                                           f"[0, {vocab_size}) (the checkpoint's vocabulary)")
        real = t.ne(pad_token_id)
        n = (real * col).amax(dim=1)  # index of the last real token + 1
        bad = (real.sum(1) != n).nonzero()
        if bad.numel():
            raise PublishedCheckpointError(f"{where}: entry {s + int(bad[0])} has pad id "
                                           f"{pad_token_id} before its last token")
        token_ids[s:e] = t.to(tok_dtype)
        lengths[s:e] = n.to(torch.int32)
        if texts is not None:
            texts += tokenizer.batch_decode([r[:k] for r, k in zip(t.tolist(), n.tolist())],
                                            skip_special_tokens=True)
    ones = torch.ones(M, dtype=torch.bool)
    snap = MemorySnapshot(
        token_ids=token_ids, lengths=lengths, keys=None, values=None, valid=ones,
        stale=ones.clone(), finite=ones.clone(), source_index=torch.zeros(M, dtype=torch.int32),
        sources=(source,), texts=tuple(texts) if texts is not None else ("",) * M,
        rev=torch.arange(M, dtype=torch.int64), version=0, vocab_size=vocab_size,
        tokenizer_name=(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
                        if tokenizer is not None else "published PlugLM (BERT uncased vocabulary)"),
        pad_token_id=pad_token_id, max_length=L)
    return KnowledgeMemory(snap, tokenizer)


def load_vocab_tokenizer(path):
    """A tokenizer from ``path``: a local tokenizer directory, or a WordPiece vocabulary
    file (one token per line, like the published ``vocab/vocab``) read as uncased BERT."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer, BertTokenizer

    path = Path(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    with tempfile.TemporaryDirectory() as d:  # the one layout every transformers version reads
        shutil.copyfile(path, Path(d) / "vocab.txt")
        return BertTokenizer.from_pretrained(d, do_lower_case=True)


# ---------------------------------------------------------------------------- entry point

def from_published(checkpoint, out=None, *, knowledge=None, tokenizer=None, batch_size: int = 256,
                   chunk_rows: int = 65536, device="cpu", progress: bool = True,
                   **config_overrides):
    """Convert a published checkpoint (and optionally its knowledge base).

    checkpoint: path of the published ``.pt`` (or an already loaded state dict).
    out: directory to write (the model checkpoint, and ``out/memory`` with ``knowledge``);
      None writes nothing. knowledge: path of the published ``tokenized_wiki.npy``; its
      entries are streamed into a KnowledgeMemory ``chunk_rows`` at a time and encoded
      (keys and values) by the converted model on ``device``, ``batch_size`` entries at a
      time. tokenizer: the knowledge base's tokenizer, to store each entry's text (for
      ``texts_of`` / ``explain``); without it entries have no text. config_overrides: PlugLMConfig fields the shapes do not fix (e.g. memory_k).

    Returns (model, memory): a ``PlugLMForMaskedLM`` in eval mode with compat="published"
    and the memory plugged in, and the memory (None without ``knowledge``).
    """
    from .modeling_pluglm import PlugLMForMaskedLM

    sd = (_unwrap(checkpoint, "checkpoint") if isinstance(checkpoint, dict)
          else load_published_state_dict(checkpoint))
    arr = _open_knowledge(knowledge) if knowledge is not None else None
    doc_len = None if arr is None else int(arr.shape[1])
    config = published_config(sd, doc_max_length=doc_len, **config_overrides)
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    model = PlugLMForMaskedLM(config).to(dtype)
    model.load_state_dict(convert_state_dict(sd, model), strict=True)
    model.eval().to(device)
    memory = None
    if arr is not None:
        memory = knowledge_memory_from_token_ids(arr, vocab_size=config.vocab_size,
                                                 pad_token_id=config.pad_token_id,
                                                 chunk_rows=chunk_rows, where=str(knowledge),
                                                 tokenizer=tokenizer)
        memory.encode(model, batch_size=batch_size, progress=progress)
        model.set_memory(memory)
    if out is not None:
        from .safe_save import save_pretrained_atomic

        target = save_pretrained_atomic(model, out)
        if memory is not None:
            memory.save(target / MEMORY_SUBDIR)
    return model, memory


__all__ = ["PublishedCheckpointError", "from_published", "load_published_state_dict",
           "published_config", "convert_state_dict", "knowledge_memory_from_token_ids",
           "load_vocab_tokenizer"]
