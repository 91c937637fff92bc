"""Every Triton kernel compiles for real GPU targets (sm_90, sm_80), with no GPU needed.

The other Triton tests run the kernels under TRITON_INTERPRET=1, which accepts code that a
GPU compile rejects (tl.dot shape/dtype rules, block sizes, shared-memory overflow).
tools/triton_aot_check.py calls the real launchers on meta tensors, catches each compile
request (signature, constexprs, num_warps) and compiles it to a cubin with Triton's own
ptxas. It runs in a subprocess because conftest.py sets TRITON_INTERPRET=1 for this whole
session and Triton fixes interpretation when a kernel is decorated. The "test" subset
covers every kernel and dtype family with cheap compiles; the script's full sweep is for
humans (`python tools/triton_aot_check.py --subset full`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "triton_aot_check.py"
ARCHS = (90, 80)
KERNELS = {"_mips_stage1", "_ka_fwd_kernel", "_ka_bwd_kernel", "_embed_fwd_kernel",
           "_embed_bwd_kernel", "_scores_kernel", "_pool_kernel", "_pool_ds_kernel",
           "_pool_dx_kernel", "_pool_du_kernel"}
# (case, arch) that compile but need more shared memory per block than the card has, so
# the launch would raise OutOfResources; each is tracked by a strict xfail test below.
KA_FWD_OVER = {("ka fwd f32 N=256 H=8 Dh=128 p=0.0", 90), ("ka fwd f32 N=256 H=8 Dh=128 p=0.0", 80)}
KA_BWD_OVER = {("ka bwd f16 N=256 H=8 Dh=128 p=0.0", 80)}
KNOWN_OVER_LIMIT = KA_BWD_OVER

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton]


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--subset", "test", "--jobs", "2",
           "--arch", ",".join(map(str, ARCHS)), "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no AOT path")
    if not out.exists():
        pytest.fail(f"{SCRIPT.name} wrote no results (rc {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(proc.stdout)  # the table, shown with -s or on failure
    return json.loads(out.read_text())


def test_every_kernel_and_arch_is_covered(aot):
    seen = {(r["kernel"], r["arch"]) for r in aot["results"]}
    missing = {(k, a) for k in KERNELS for a in ARCHS} - seen
    assert not missing, f"kernels never compiled: {sorted(missing)}"


def test_launchers_reach_the_compiler(aot):
    assert not aot["launch_errors"], aot["launch_errors"]


def test_every_kernel_compiles_for_gpu(aot):
    bad = [f"{r['kernel']} sm_{r['arch']} ({r['case']}): {r['error']}"
           for r in aot["results"] if not r["compiled"]]
    assert not bad, "\n".join(bad)


def test_kernels_fit_launch_limits(aot):
    bad = [f"{r['kernel']} sm_{r['arch']} ({r['case']}): {r['error']}"
           for r in aot["results"] if r["compiled"] and not r["ok"]
           and (r["case"], r["arch"]) not in KNOWN_OVER_LIMIT]
    assert not bad, "\n".join(bad)


def _fits(aot, known):
    rows = [r for r in aot["results"] if (r["case"], r["arch"]) in known]
    assert len(rows) == len(known), "the known over-limit cases were not compiled"
    assert all(r["ok"] for r in rows), [(r["arch"], r["error"]) for r in rows]


def test_ka_fwd_largest_f32_tile_fits(aot):
    # k and v are loaded one after the other (v after the softmax): 147 KB, under both limits
    _fits(aot, KA_FWD_OVER)


@pytest.mark.xfail(strict=True, reason="_ka_bwd_kernel keeps k, v (and dk, dv) of all N "
                   "entries per program: 225 KB for f16 N=256, Dh=128 (limit 163 KB sm_80)")
def test_ka_bwd_largest_f16_tile_fits_sm80(aot):
    _fits(aot, KA_BWD_OVER)
