"""pluglm_kernels: fused kernels for plug-in memory language models.

Ops (also as ``torch.ops.pluglm.<name>``): ``mips_topk``, ``knowledge_attention``,
``gather_knowledge_attention``, ``attentive_pool``, ``encode_knowledge``; each takes
``backend="auto" | "triton" | "cuda" | "cpu" | "reference"``. Importing never fails because a
backend is missing: ``backend_report()`` (``pluglm info``) says what is built and why not.
This package imports neither ``pluglm``, ``transformers`` nor ``faiss``.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _backends

_backends.load_extension()  # registers torch.ops.pluglm._C_* when built

from . import reference  # noqa: E402
from ._backends import (  # noqa: E402
    BACKENDS,
    availability,
    backend_report,
    cuda_built,
    load_extension,
    resolve,
    triton_interpret,
    triton_status,
)
from .functional import (  # noqa: E402
    EncoderTables,
    attentive_pool,
    encode_knowledge,
    encode_knowledge_factored,
    encoder_tables,
    gather_knowledge_attention,
    gather_rows,
    knowledge_attention,
    mips_topk,
    quantize_keys,
)
from ._validate import FLOAT_TABLE_DTYPES, MAX_K  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "FLOAT_TABLE_DTYPES",
    "MAX_K",
    "availability",
    "load_extension",
    "triton_interpret",
    "triton_status",
    "attentive_pool",
    "backend_report",
    "cuda_built",
    "EncoderTables",
    "encode_knowledge",
    "encode_knowledge_factored",
    "encoder_tables",
    "gather_knowledge_attention",
    "gather_rows",
    "knowledge_attention",
    "mips_topk",
    "quantize_keys",
    "reference",
    "resolve",
]
