"""The device guard of the Triton launchers.

A Triton launch goes to the *current* CUDA device (and its current stream), not to the
device of the tensors it is given: with tensors on ``cuda:1`` while ``cuda:0`` is current,
the kernel would run on the wrong GPU and read foreign pointers. The C++ ops guard with
``c10::cuda::CUDAGuard``; every function here that launches a Triton kernel is wrapped in
``on_tensor_device``, which makes the first CUDA tensor argument's device current for the
call (tests/kernels/test_triton_devices.py checks that no launcher lacks it). CPU tensors
(the interpreter) and meta tensors (tools/triton_aot_check.py) pass through untouched.
"""
from __future__ import annotations

import functools

import torch


def _first_cuda_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def on_tensor_device(fn):
    """Run ``fn`` with the device of its first CUDA tensor argument current."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        dev = _first_cuda_device(args, kwargs)
        if dev is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    guarded.__pluglm_device_guard__ = True
    return guarded
