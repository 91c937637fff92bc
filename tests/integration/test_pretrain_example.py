"""examples/pretrain_mlm.py runs end to end on CPU and its MLM loss falls."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pretrain_mlm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("pretrain_mlm_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("model", ["bert", "pluglm"])
def test_pretrain_mlm_loss_falls(model):
    example = _load_example()
    if model == "pluglm" and not example._pluglm_available():
        pytest.skip("pluglm.modeling_pluglm does not import")
    result = example.main(["--model", model, "--steps", "30", "--batch-size", "8", "--accum", "2",
                           "--hidden", "32", "--layers", "2", "--key-dim", "16", "--memory-k", "3",
                           "--refresh-interval", "10", "--people", "32", "--lr", "5e-3",
                           "--device", "cpu", "--log-every", "0", "--seed", "1"])
    losses = result["losses"]
    assert result["model"] == model and len(losses) == 30
    assert result["refreshes"] == 3  # steps 10, 20, 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    if model == "bert":  # the stale-search / fresh re-encode path trained the entry encoder
        assert result["encoder_delta"] > 0


def test_pretrain_mlm_with_async_refresher():
    example = _load_example()
    result = example.main(["--model", "bert", "--steps", "24", "--batch-size", "8", "--accum", "1",
                           "--hidden", "32", "--layers", "2", "--key-dim", "16", "--memory-k", "3",
                           "--refresh-interval", "8", "--people", "32", "--lr", "5e-3",
                           "--device", "cpu", "--log-every", "0", "--seed", "1", "--async-refresh"])
    losses = result["losses"]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert result["refreshes"] >= 1  # refreshes started (one may be skipped while another runs)
