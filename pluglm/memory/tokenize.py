"""Texts -> memory entries: chunking with any Hugging Face tokenizer and the token tables.

An entry is at most ``max_length`` tokens, special tokens included; a longer text becomes
several entries whose bodies overlap by ``stride`` tokens, each keeping its own span of the
text. ``pack``/``repad`` build the padded [M, L] token table (int16 for up to 2**15 ids,
uint16 up to 2**16, else int32) and its lengths. See docs/design.md, "The memory".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_TOKENIZE_BATCH = 1024
WORD_LEVEL_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_level_tokenizer(words):
    """A BERT-style ([CLS] x [SEP]) word-level tokenizer built in code (no download): ids are
    WORD_LEVEL_SPECIAL then ``words`` in the given order; text is split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(WORD_LEVEL_SPECIAL) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest token table dtype for a vocabulary: int16 up to 2**15 ids (as files
    before uint16 have it), uint16 up to 2**16, else int32."""
    if vocab_size <= 2**15:
        return torch.int16
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


TOKEN_DTYPES = (torch.int16, torch.uint16, torch.int32)


def wider_token_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The token dtype holding every id of tables in ``a`` and ``b``."""
    return a if TOKEN_DTYPES.index(a) >= TOKEN_DTYPES.index(b) else b


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch implements few ops for uint16 (no masked_fill, index_put, min/max, compares):
    # tables are built in int32 and cast once
    return torch.int32 if dtype == torch.uint16 else dtype


def widen_tokens(t: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Token ids in a table dtype -> ``dtype`` (int64 for embedding lookups). uint16 goes
    through its int16 bits (and a mask), which every device's kernels handle."""
    if t.dtype == torch.uint16:
        return t.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).to(dtype)
    return t.to(dtype)


def token_bits(t: torch.Tensor) -> torch.Tensor:
    """A view of a token table that indexed writes (index_put) accept: uint16 as int16."""
    return t.view(torch.int16) if t.dtype == torch.uint16 else t


# ---------------------------------------------------------------------------- tokenising


def check_texts(name: str, texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of str, got a single str (wrap it: [text])")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def check_sources(source, n: int) -> list[str]:
    if isinstance(source, str):
        names = [source] * n
    else:
        names = list(source)
        if len(names) != n:
            raise ValueError(f"source must be a str or one name per text ({n}), got {len(names)}")
    for s in names:
        if not isinstance(s, str) or not s:
            raise ValueError(f"source names must be non-empty str, got {s!r}")
    return names


def vocab_size_of(tokenizer) -> int:
    try:
        return int(len(tokenizer))
    except TypeError:
        v = getattr(tokenizer, "vocab_size", None)
        if isinstance(v, int):
            return v
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer (len() = vocab size), got "
                    f"{type(tokenizer).__name__}")


def tokenizer_name_of(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps one sequence with: (prefix, suffix).

    Probed by tokenising a text with and without special tokens, which works for fast and
    slow tokenizers of every family ([CLS] x [SEP], <s> x </s>, BOS x, or nothing)."""
    probe = "memory"
    with_sp = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    body = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(body)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i:i + n] == body:
            return with_sp[:i], with_sp[i + n:]
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds "
                     f"(tokenising {probe!r} gave {with_sp} with and {body} without them)")


@dataclass
class Chunks:
    """Tokenised entries before they join a memory."""

    ids: list[list[int]]      # one token list per entry, special tokens included
    texts: list[str]          # the entry's text span
    owner: list[int]          # which input text each entry came from


def tokenize(texts: list[str], tokenizer, max_length: int, stride: int | None,
              *, single: bool = False, truncate: bool = False) -> Chunks:
    """Split each text into entries of at most max_length tokens (specials included);
    consecutive chunks of one text overlap by ``stride`` tokens."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    prefix, suffix = special_layout(tokenizer)
    body_max = max_length - len(prefix) - len(suffix)
    if body_max < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after the "
                         f"{len(prefix) + len(suffix)} special tokens")
    stride = 0 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < body_max:
        raise ValueError(f"stride (tokens shared by consecutive chunks) must be an int in "
                         f"[0, {body_max}), got {stride!r}")
    step = body_max - stride
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    out = Chunks([], [], [])
    for b0 in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[b0:b0 + _TOKENIZE_BATCH]
        enc = tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False,
                        return_offsets_mapping=use_offsets)
        for j, text in enumerate(batch):
            i = b0 + j
            ids = list(enc["input_ids"][j])
            if not ids:
                raise ValueError(f"texts[{i}] produces no tokens (empty or whitespace only)")
            if len(ids) > body_max and (single or truncate):
                if not truncate:
                    raise ValueError(f"texts[{i}] has {len(ids) + len(prefix) + len(suffix)} tokens, "
                                     f"more than max_length={max_length}: an update replaces one "
                                     f"entry by one entry (pass truncate=True, or remove + add)")
                ids = ids[:body_max]
                offs = enc["offset_mapping"][j] if use_offsets else None
                span = (text[offs[0][0]:offs[body_max - 1][1]] if offs is not None
                        else tokenizer.decode(ids, skip_special_tokens=True))
                out.ids.append(prefix + ids + suffix)
                out.texts.append(span)
                out.owner.append(i)
                continue
            if len(ids) <= body_max:
                out.ids.append(prefix + ids + suffix)
                out.texts.append(text)
                out.owner.append(i)
                continue
            offs = enc["offset_mapping"][j] if use_offsets else None
            start = 0
            while True:
                end = min(start + body_max, len(ids))
                piece = ids[start:end]
                if offs is not None:
                    span = text[offs[start][0]:offs[end - 1][1]]
                else:
                    span = tokenizer.decode(piece, skip_special_tokens=True)
                out.ids.append(prefix + piece + suffix)
                out.texts.append(span)
                out.owner.append(i)
                if end >= len(ids):
                    break
                start += step
    return out


def pack(ids: list[list[int]], width: int, pad: int, dtype: torch.dtype, device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (token_ids [n, width] dtype, lengths [n] int32) on device."""
    n = len(ids)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > torch.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype_name(dtype)} "
                         f"(min {int(flat.min())}, max {int(flat.max())})")
    work = _work_dtype(dtype)
    out = torch.full((n, width), pad, dtype=work)
    out[torch.arange(width)[None, :] < lengths[:, None]] = flat.to(work)
    return out.to(dtype).to(device), lengths.to(device)


def repad(token_ids: torch.Tensor, lengths: torch.Tensor, width: int, pad: int,
           dtype: torch.dtype) -> torch.Tensor:
    """[M, L] -> [M, width] (width >= max length) in dtype, pad id after each entry's end."""
    M, L = token_ids.shape
    work = _work_dtype(dtype)
    out = torch.full((M, width), pad, dtype=work, device=token_ids.device)
    w = min(L, width)
    out[:, :w] = widen_tokens(token_ids[:, :w], work)
    pos = torch.arange(width, device=token_ids.device)
    out.masked_fill_(pos[None, :] >= lengths.to(token_ids.device)[:, None].to(pos.dtype), pad)
    return out if work == dtype else out.to(dtype)



__all__ = ["Chunks", "TOKEN_DTYPES", "check_sources", "check_texts", "dtype_name", "pack", "repad",
           "special_layout", "token_bits", "token_dtype", "tokenize", "tokenizer_name_of",
           "vocab_size_of", "widen_tokens", "wider_token_dtype"]
