"""What the ``pluglm`` commands share: the one-line error contract, the console, reading
text sources and packing them into entries, and saving/loading a CLI memory folder.

A memory built by the CLI is a ``KnowledgeMemory`` directory plus ``pluglm-encoder.json``,
which names the sentence encoder that made its keys (``pluglm.encoders``), so ``query`` can
embed questions in the same space. ``KnowledgeMemory.load`` ignores files it does not list,
and every write goes through :func:`save_memory`: the memory is saved into a temporary
sibling directory, the encoder file is added, and the directory is swapped into place
atomically (``pluglm._io``), so a crash leaves the old or the new memory, never a mix.

Sources (``read_source``): a text file (.txt, .md, anything not .jsonl), a folder of .txt /
.md / .jsonl files (recursive, hidden entries skipped), or JSONL with one object per line
(``--text-field``, optional ``--source-field``). Text is split at blank lines and packed
into entries of at most ``max_length`` tokens (longer paragraphs split at sentence ends;
a longer sentence is chunked by the memory itself). Each entry's source is its file's path
relative to SOURCE (the file name for a single file), a JSONL record's source field, or
``--source``.

Expected failures raise :class:`CLIError` (or the library's ValueError / OSError
subclasses); ``pluglm.cli.main`` turns them into one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import _io

ENCODER_FILE = "pluglm-encoder.json"
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_LENGTH = 288


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block + error), like the runtime ones."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class CLIError(Exception):
    """An expected, user-facing failure: the message is the whole story."""


def one_line(exc: BaseException) -> str | None:
    """The message ``main`` prints for an expected error, or None for a bug (traceback)."""
    from ..encoders import EncoderUnavailable

    if isinstance(exc, (CLIError, EncoderUnavailable)):
        msg = str(exc)
    elif isinstance(exc, OSError):
        if exc.filename and exc.strerror:
            msg = f"{exc.filename}: {exc.strerror}"
        else:
            msg = str(exc) or type(exc).__name__
    elif isinstance(exc, ValueError):  # MemoryFormatError, JSON and Unicode errors included
        msg = str(exc)
    else:
        return None
    return " ".join(msg.split()) or type(exc).__name__


# ------------------------------------------------------------------------------ reading


@dataclass
class Group:
    """Paragraphs of one file or one JSONL record, packed into entries together."""

    source: str
    paragraphs: list[str]


_PARA = re.compile(r"\n\s*\n")
_SENT = re.compile(r"(?<=[.!?])\s+")


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARA.split(text.replace("\r\n", "\n")) if p.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: not UTF-8 text (byte {e.start}); pass a text file, a folder of "
                       f".txt/.md files or JSONL") from None


def _read_jsonl(path: Path, source: str, text_field: str, source_field: str | None) -> list[Group]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise CLIError(f"{path}:{n}: expected a JSON object with a {text_field!r} field, "
                           f"got {type(rec).__name__}")
        if text_field not in rec:
            raise CLIError(f"{path}:{n}: no {text_field!r} field (fields: {', '.join(sorted(rec)) or 'none'}; "
                           f"choose one with --text-field)")
        text = rec[text_field]
        if not isinstance(text, str):
            raise CLIError(f"{path}:{n}: field {text_field!r} must be a string, got {type(text).__name__}")
        src = source
        if source_field and rec.get(source_field) is not None:
            src = str(rec[source_field]).strip() or source
        paras = paragraphs(text)
        if paras:
            out.append(Group(src, paras))
    return out


def read_source(path: str, *, text_field: str = "text", source_field: str | None = "source",
                source: str | None = None) -> tuple[list[Group], int]:
    """(groups, files read) from a file, a folder or JSONL (module docstring)."""
    root = Path(path)
    if not root.exists():
        raise CLIError(f"{path}: no such file or directory")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise CLIError(f"{path}: no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files in this folder")
        names = {p: p.relative_to(root).as_posix() for p in files}
    elif root.is_file():
        files, names = [root], {root: root.name}
    else:
        raise CLIError(f"{path}: not a regular file or folder")
    groups: list[Group] = []
    for f in files:
        name = source or names[f]
        if f.suffix.lower() in JSONL_SUFFIXES:
            groups += _read_jsonl(f, name, text_field, None if source else source_field)
        else:
            paras = paragraphs(_read_text(f))
            if paras:
                groups.append(Group(name, paras))
    if not groups:
        raise CLIError(f"{path}: no text found (empty files?)")
    return groups, len(files)


def pack(groups: list[Group], tokenizer, max_length: int) -> tuple[list[str], list[str]]:
    """Greedily join consecutive paragraphs of each group into texts of at most max_length
    tokens (special tokens included). Returns (texts, their sources)."""
    from ..memory.tokenize import special_layout

    prefix, suffix = special_layout(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 8:
        raise CLIError(f"--max-length {max_length} leaves {budget} tokens for text; use at least "
                       f"{len(prefix) + len(suffix) + 8}")
    sep = "\n\n"
    sep_cost = len(tokenizer(sep, add_special_tokens=False)["input_ids"])
    texts, sources = [], []
    for g in groups:
        pieces = []
        for p in g.paragraphs:
            pieces += [p] if len(p) < 4 * budget else [s for s in _SENT.split(p) if s]
        counts = [len(x) for x in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
        # A paragraph over budget is split at sentence ends; a sentence over budget stays
        # whole and the memory chunks it by tokens.
        units: list[tuple[str, int]] = []
        for p, c in zip(pieces, counts):
            if c <= budget:
                units.append((p, c))
                continue
            sents = [s for s in _SENT.split(p) if s]
            sc = [len(x) for x in tokenizer(sents, add_special_tokens=False)["input_ids"]]
            units += list(zip(sents, sc))
        cur, cur_n = [], 0
        for u, c in units:
            if cur and cur_n + sep_cost + c > budget:
                texts.append(sep.join(cur))
                sources.append(g.source)
                cur, cur_n = [], 0
            cur_n += (sep_cost if cur else 0) + c
            cur.append(u)
        if cur:
            texts.append(sep.join(cur))
            sources.append(g.source)
    return texts, sources


# ----------------------------------------------------------------------------- memory files


def check_target(target: Path) -> None:
    if target.exists():
        if not target.is_dir():
            raise CLIError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / "manifest.json").is_file():
            raise CLIError(f"{target}: folder exists, is not empty and holds no saved memory; "
                           f"refusing to overwrite it (choose another --out)")


def save_memory(mem, spec: dict, out: str | Path) -> Path:
    """Save ``mem`` with its encoder ``spec`` to ``out`` in one atomic directory swap."""
    target = Path(out).absolute()
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _io.recover_dir(target)
    _io.cleanup_leftovers(target)
    tmp = _io.temp_sibling(target)
    try:
        mem.save(tmp)
        body = {"format": "pluglm.encoder", "format_version": 1, **spec}
        _io.write_bytes(tmp / ENCODER_FILE, json.dumps(body, indent=1).encode("utf-8"))
        _io.fsync_dir(tmp)
        _io.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_spec(root: Path) -> dict:
    path = root / ENCODER_FILE
    if not path.is_file():
        raise CLIError(f"{root}: no {ENCODER_FILE}, so the CLI cannot tell which encoder made this "
                       f"memory's keys (memories saved from Python carry none: build it with "
                       f"'pluglm build-memory')")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != "pluglm.encoder":
        raise CLIError(f"{path}: not a pluglm encoder description")
    if not isinstance(spec.get("format_version"), int) or spec["format_version"] > 1:
        raise CLIError(f"{path}: format_version {spec.get('format_version')!r} is newer than this "
                       f"pluglm reads (upgrade pluglm)")
    return spec


def load_memory(path: str, *, with_encoder: bool = True):
    """(memory, encoder or None, spec) of a CLI-built memory, checked to fit together."""
    from ..encoders import encoder_from_spec
    from ..memory import KnowledgeMemory

    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CLIError(f"{path}: is a file, not a memory folder (made by 'pluglm build-memory')")
    if not root.exists() and not any(root.parent.glob(f".{root.name}.old-*")):
        raise CLIError(f"{path}: no such memory folder")
    mem = KnowledgeMemory.load(root, mmap=False)
    spec = read_spec(root)
    enc = None
    if with_encoder:
        enc = encoder_from_spec(spec)
        check_compatible(mem, enc, root)
    return mem, enc, spec


def check_compatible(mem, enc, root) -> None:
    if mem.keys is None:
        raise CLIError(f"{root}: memory has no keys (never encoded): rebuild it with 'pluglm build-memory'")
    if mem.key_dim != enc.key_dim:
        raise CLIError(f"{root}: incompatible memory: its keys are {mem.key_dim}-d but its encoder "
                       f"({enc.name}) makes {enc.key_dim}-d vectors")
    if mem.vocab_size != len(enc.tokenizer):
        raise CLIError(f"{root}: incompatible memory: tokenised with a {mem.vocab_size}-token vocabulary, "
                       f"its encoder's tokenizer has {len(enc.tokenizer)}")


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).iterdir() if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


__all__ = ["CLIError", "ENCODER_FILE", "Group", "Parser", "check_target", "console", "dir_bytes",
           "human", "load_memory", "one_line", "pack", "paragraphs", "progress", "read_source",
           "save_memory"]
