"""Shared test helpers: seeded fresh random inputs, error metrics, device parametrisation."""
from __future__ import annotations

import os

import torch  # does not import triton

# Triton decides at decoration time whether a kernel is interpreted, so the switch must be set
# before any test module (or pluglm_kernels) imports a Triton kernel: with no GPU, every Triton
# kernel runs under the interpreter on CPU tensors; with a GPU, Triton compiles for it and the
# CPU-interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Relative-error tolerances against a float64 reference (STYLE.md §6).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def pytest_collection_modifyitems(config, items):
    # GPU-marked tests skip cleanly where no GPU exists.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_seed():
    """A different seed each test run (printed on failure) so inputs are fresh, yet replayable."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
