"""Triton launches run on the tensors' device, not the current one (issue 13 #4).

Triton launches on the current CUDA device; the launchers wrap themselves in
``pluglm_kernels.triton._device.on_tensor_device`` (the C++ ops use CUDAGuard). On CPU:
a static check that every function launching a Triton kernel carries the guard, and the
guard's pass-through for CPU tensors. On a machine with two GPUs (gpu-marked): each op
family with its tensors on cuda:1 while cuda:0 is current, against the float64 reference.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import pluglm_kernels as pk
from pluglm_kernels import reference

TRITON_DIR = Path(__file__).resolve().parents[2] / "pluglm_kernels" / "triton"


def _launches(fn: ast.FunctionDef) -> list[str]:
    """Names of the kernels ``fn`` launches (``kernel[grid](...)`` calls)."""
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                and isinstance(node.func.value, ast.Name):
            out.append(node.func.value.id)
    return out


def _decorated(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "on_tensor_device" for d in fn.decorator_list)


def test_every_triton_launch_is_guarded():
    seen, bad = 0, []
    for path in sorted(TRITON_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            kernels = _launches(fn)
            seen += len(kernels)
            if kernels and not _decorated(fn):
                bad.append(f"{path.name}:{fn.lineno} {fn.name} launches {kernels} unguarded")
    assert seen >= 10, "the scan found too few launches: did the launch syntax change?"
    assert not bad, "\n".join(bad)


def test_guard_passes_cpu_and_meta_tensors_through():
    from pluglm_kernels.triton._device import on_tensor_device

    calls = []

    @on_tensor_device
    def f(x, *, y=None):
        calls.append((x.device.type, None if y is None else y.device.type))
        return x

    x = torch.ones(2)
    assert f(x) is x and f(torch.empty(2, device="meta"), y=x) is not None
    assert calls == [("cpu", None), ("meta", "cpu")]
    assert f.__name__ == "f" and f.__pluglm_device_guard__


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _triton_ok(op):
    ok, why = pk._backends.availability(op, "triton", "cuda")
    if not ok:
        pytest.skip(f"triton unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.triton
@two_gpus
def test_mips_topk_on_second_gpu():
    _triton_ok("mips_topk")
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    q = torch.randn(5, 64, device=dev)
    keys = torch.randn(10_007, 64, device=dev)
    s, i = pk.mips_topk(q, keys, 8, backend="triton")
    assert s.device == dev and torch.cuda.current_device() == 0
    ref_s, ref_i = reference.mips_topk(q.double().cpu(), keys.double().cpu(), 8)
    torch.testing.assert_close(s.cpu(), ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.triton
@two_gpus
@pytest.mark.parametrize("gather", [False, True])
def test_knowledge_attention_on_second_gpu(gather):
    _triton_ok("knowledge_attention")
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    B, T, H, Dh, N, M = 2, 9, 3, 32, 5, 40
    q = torch.randn(B, T, H, Dh, device=dev, requires_grad=True)
    bias, beta = torch.randn(B, N, device=dev), torch.rand(H, device=dev)
    if gather:
        tk = torch.randn(M, H, Dh, device=dev)
        tv = torch.randn(M, H, Dh, device=dev)
        idx = torch.randint(0, M, (B, N), device=dev)
        out = pk.gather_knowledge_attention(q, tk, tv, idx, bias, beta, backend="triton")
        k, v = tk[idx], tv[idx]
    else:
        k, v = torch.randn(B, N, H, Dh, device=dev), torch.randn(B, N, H, Dh, device=dev)
        out = pk.knowledge_attention(q, k, v, bias, beta, backend="triton")
    out.sum().backward()
    assert out.device == dev and q.grad.device == dev and torch.cuda.current_device() == 0
    f64 = lambda t: t.detach().double().cpu()  # noqa: E731
    ref, _ = reference.knowledge_attention(f64(q), f64(k), f64(v), f64(bias), f64(beta), 0.0, 0)
    torch.testing.assert_close(out.detach().double().cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.triton
@two_gpus
def test_attentive_pool_on_second_gpu():
    _triton_ok("attentive_pool")
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    B, T, D = 3, 11, 48
    x = torch.randn(B, T, D, device=dev, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    w1, b1 = torch.randn(D, D, device=dev) / D**0.5, torch.randn(D, device=dev)
    w2, b2 = torch.randn(D, device=dev), torch.randn(1, device=dev)
    out = pk.attentive_pool(x, mask, w1, b1, w2, b2, backend="triton")
    out.sum().backward()
    assert out.device == dev and x.grad.device == dev and torch.cuda.current_device() == 0
    f64 = lambda t: t.detach().double().cpu()  # noqa: E731
    ref = reference.attentive_pool(f64(x), mask.cpu(), f64(w1), f64(b1), f64(w2), f64(b2))
    torch.testing.assert_close(out.detach().double().cpu(), ref, rtol=1e-4, atol=1e-4)
