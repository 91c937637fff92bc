"""pluglm.bench.gpu_smoke (stage 1 of benchmarks/gpu_suite.sh) on the CPU: a correct kernel
passes, and a wrong or unwritten output is reported, not passed."""
from __future__ import annotations

import json

import pytest
import torch

import pluglm_kernels as pk
from pluglm.bench import gpu_smoke

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not pk.availability("mips_topk", "cpu", "cpu")[0],
                                reason="C++ CPU kernels not built")


def test_correct_kernels_pass():
    problems, _ = gpu_smoke._case_mips("cpu", "f32", "int8", CPU)
    assert problems == []
    problems, _ = gpu_smoke._case_pool("cpu", "bf16", CPU)
    assert problems == []


def test_wrong_or_unwritten_outputs_fail(monkeypatch):
    real = pk.mips_topk

    def shifted(*a, **kw):  # right scores, wrong rows
        s, i = real(*a, **kw)
        return s, (i + 1) % a[1].shape[0]

    monkeypatch.setattr(pk, "mips_topk", shifted)
    problems, _ = gpu_smoke._case_mips("cpu", "f32", "f32", CPU)
    assert any("scores off" in p for p in problems)

    def unwritten(*a, **kw):
        s, i = real(*a, **kw)
        return torch.full_like(s, float("nan")), i

    monkeypatch.setattr(pk, "mips_topk", unwritten)
    problems, _ = gpu_smoke._case_mips("cpu", "f32", "f32", CPU)
    assert any("non-finite" in p for p in problems)


def test_smoke_command_writes_one_verdict_per_family(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    rc = gpu_smoke.main(["smoke", str(out), "--backends", "cpu,cuda", "--dry-run", "--budget-s", "60"])
    doc = json.loads(out.read_text())
    assert rc == 0 and set(doc["families"]) == set(gpu_smoke.FAMILIES)
    assert all(v == "PASS" for v in doc["families"].values())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("SMOKE ")]
    assert len(lines) == len(gpu_smoke.FAMILIES)


def test_headline_hook_appends_rows_in_place(tmp_path):
    """benchmarks/gpu_headline.py (the suite's HEADLINE HOOK) at --dry-run: the tiny
    cost-of-a-memory pairs on the CPU, appended to the existing bench.json, no other file
    written; with no budget left every case is skipped, and nothing fails."""
    import runpy
    from pathlib import Path

    hook = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_headline.py"
    assert "benchmarks/gpu_headline.py" in (hook.parent / "gpu_suite.sh").read_text()
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"rows": [{"bench": "search"}], "groups": []}))
    ns = runpy.run_path(str(hook))  # import-clean: defines main, runs nothing
    assert ns["main"]([str(out), "--dry-run", "--budget-s", "120"]) == 0
    doc = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
    assert doc["rows"][0] == {"bench": "search"} and doc["groups"] == []
    assert [c["status"] for c in doc["headline"]] == ["OK", "OK"]
    rows = doc["rows"][1:]
    plug = [r for r in rows if r["impl"].startswith("pluglm")]
    assert len(plug) == 8 and all(r["extra"]["ratio_to_dense"] > 0 for r in plug)
    assert {r["shape"]["B"] for r in plug} == {1, 8}
    assert all(r["bench"] == "cost of a memory" and r["peak_mb"] is not None for r in rows)
    assert ns["main"]([str(out), "--dry-run", "--budget-s", "0"]) == 0
    doc = json.loads(out.read_text())
    assert [c["status"] for c in doc["headline"][2:]] == ["SKIP", "SKIP"]
