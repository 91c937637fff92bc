"""Which backends exist on this machine, and why the missing ones are missing.

Nothing here raises at import: a missing or broken optional part is recorded with its
reason and reported by ``backend_report()`` (``pluglm info``) or by the error raised when
that backend is asked for by name.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# Preference order for backend="auto" on each device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

# Which native ops (torch.ops.pluglm._C_*) each public op needs, per backend.
_NATIVE = {
    "mips_topk": ("_C_mips_topk",),
    "knowledge_attention": ("_C_knowledge_attention_fwd", "_C_knowledge_attention_bwd"),
    "gather_knowledge_attention": (
        "_C_gather_knowledge_attention_fwd",
        "_C_gather_knowledge_attention_bwd",
    ),
    "attentive_pool": ("_C_attentive_pool_fwd", "_C_attentive_pool_bwd"),
    "encode_knowledge": (
        "_C_embed_layernorm_fwd",
        "_C_embed_layernorm_bwd",
        "_C_attentive_pool_fwd",
        "_C_attentive_pool_bwd",
    ),
    # inference only (no backward); CPU kernel only, other devices run the reference
    "encode_knowledge_factored": ("_C_encode_knowledge_factored",),
}
# Public ops that have a Triton kernel (filled in by the Triton modules as they import).
TRITON_OPS: set[str] = set()


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``pluglm_kernels._C``; return (module or None, reason it is missing)."""
    if os.environ.get("PLUGLM_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by PLUGLM_DISABLE_EXTENSION=1"
    try:
        mod = importlib.import_module("pluglm_kernels._C")
    except ImportError as e:  # not built (PLUGLM_SKIP_BUILD=1) or ABI mismatch
        msg = str(e)
        if "No module named" in msg:
            msg = "extension pluglm_kernels._C not built (installed with PLUGLM_SKIP_BUILD=1?)"
        else:
            warnings.warn(f"pluglm_kernels._C failed to load: {msg}", RuntimeWarning, stacklevel=2)
        return None, msg
    return mod, ""


@functools.lru_cache(maxsize=None)
def triton_status():
    """(usable, reason). Triton runs on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable: {e}"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_native_kernel(name: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pluglm::{name}", dispatch_key)
    except RuntimeError:
        return False


def cuda_built() -> bool:
    mod, _ = load_extension()
    return bool(mod is not None and mod.cuda_built())


def availability(op: str, backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on tensors of ``device_type``; else why not.

    Cached: what it depends on is fixed once the extension and the Triton modules are
    loaded, except the TRITON_INTERPRET switch, which is read at each call and is part of
    the cache key (tests and users may set it after import)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpret = backend == "triton" and device_type == "cpu" and triton_interpret()
    return _availability(op, backend, device_type, interpret)


@functools.lru_cache(maxsize=None)
def _availability(op: str, backend: str, device_type: str, interpret: bool) -> tuple[bool, str]:
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"backend 'cpu' runs on CPU tensors, got {device_type} tensors"
        mod, why = load_extension()
        if mod is None:
            return False, why
        missing = [n for n in _NATIVE[op] if not _has_native_kernel(n, "CPU")]
        if not _NATIVE[op] or missing:
            return False, f"no C++ CPU kernel for {op} in this build"
        return True, ""
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"backend 'cuda' runs on CUDA tensors, got {device_type} tensors"
        mod, why = load_extension()
        if mod is None:
            return False, why
        if not mod.cuda_built():
            return False, "the extension was built without CUDA (no nvcc or CPU-only torch at build time)"
        missing = [n for n in _NATIVE[op] if not _has_native_kernel(n, "CUDA")]
        if not _NATIVE[op] or missing:
            return False, f"no CUDA kernel for {op} in this build"
        return True, ""
    # triton
    ok, why = triton_status()
    if not ok:
        return False, why
    if device_type == "cpu" and not interpret:
        return False, "Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)"
    if device_type not in ("cpu", "cuda"):
        return False, f"Triton does not run on {device_type} tensors"
    _import_triton_kernels()
    if op not in TRITON_OPS:
        return False, f"no Triton kernel for {op}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _import_triton_kernels() -> None:
    # Each module adds its op to TRITON_OPS; a failure leaves that op without Triton.
    for name in ("mips_topk", "knowledge_attention", "encode_knowledge"):
        try:
            importlib.import_module(f"pluglm_kernels.triton.{name}")
        except ImportError:
            pass
        except Exception as e:  # a Triton version we do not support
            warnings.warn(f"Triton kernel {name} unavailable: {e}", RuntimeWarning, stacklevel=2)


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``device``; raises if a named one can't.

    Called on every op call, so the answer is cached (see ``availability``)."""
    dev = device.type
    # the switch matters only where Triton may run on CPU tensors: a named "triton"
    # ("auto" never picks Triton for CPU tensors, see _AUTO_ORDER)
    interpret = backend == "triton" and dev == "cpu" and triton_interpret()
    return _resolve(op, backend, dev, interpret)


@functools.lru_cache(maxsize=None)
def _resolve(op: str, backend: str, dev: str, interpret: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for cand in _AUTO_ORDER.get(dev, ("reference",)):
            if _availability(op, cand, dev, interpret and cand == "triton")[0]:
                return cand
        return "reference"
    ok, why = _availability(op, backend, dev, interpret and backend == "triton")
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available for {op} on {dev}: {why}")
    return backend


def clear_caches() -> None:
    """Forget cached availability answers (after loading kernels by other means)."""
    _availability.cache_clear()
    _resolve.cache_clear()


def backend_report() -> list[dict]:
    """One row per (op, backend): available or the reason it is not. For ``pluglm info``."""
    rows = []
    has_gpu = torch.cuda.is_available()
    for op in _NATIVE:
        for backend in ("cpu", "cuda", "triton", "reference"):
            dev = "cuda" if backend in ("cuda", "triton") else "cpu"
            ok, why = availability(op, backend, dev)
            built = ok
            if backend == "cuda" and not has_gpu:
                # compiled kernels count as built even where no GPU can run them
                mod, _ = load_extension()
                built = bool(mod is not None and mod.cuda_built() and _NATIVE[op] and all(
                    _has_native_kernel(n, "CUDA") for n in _NATIVE[op]))
                why = "built; no CUDA device on this machine" if built else (
                    why if mod is None or not mod.cuda_built() else f"no CUDA kernel for {op} in this build")
                ok = False
            if backend == "triton" and not has_gpu:
                tok, twhy = triton_status()
                _import_triton_kernels()
                built = tok and op in TRITON_OPS
                why = ("kernel present; no CUDA device (runs under TRITON_INTERPRET=1 on CPU)"
                       if built else (twhy or f"no Triton kernel for {op}"))
                ok = False
            rows.append({"op": op, "backend": backend, "available": ok, "built": built,
                         "why": "" if ok else why})
    return rows
