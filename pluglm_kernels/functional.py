"""Public functional API of pluglm_kernels (docs/design.md §3).

Every function validates its arguments before any kernel runs and raises ``TypeError`` /
``ValueError`` naming the argument; ``backend`` is "auto", "triton", "cuda", "cpu" or
"reference" (a named backend that is unavailable raises ``RuntimeError`` saying why).
This is the one place a call is validated: the ops below trust what they get (see
``_validate``), and the data-dependent checks cost at most one host sync per call.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backends, reference
from . import _validate as V
from . import ops  # noqa: F401  (registers torch.ops.pluglm.*)
from ._validate import MAX_K  # noqa: F401  (re-exported as pluglm_kernels.MAX_K)

_KERNEL_FLOATS = V.FLOAT_TABLE_DTYPES
_REF_FLOATS = V.REFERENCE_FLOAT_DTYPES
_INT_IDS = (torch.int16, torch.int32, torch.int64, torch.uint8)


def _eager() -> bool:
    # Data-dependent checks (a host sync) run in eager mode only; under torch.compile the
    # kernels' defined behaviour applies (documented per op).
    return not torch.compiler.is_compiling()


def _floats(backend: str):
    return _REF_FLOATS if backend == "reference" else _KERNEL_FLOATS


def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: keys [M, d] float -> (int8 [M, d], scales [M] f32).

    ``keys[i] ~= q[i] * scales[i]``; an all-zero row gets scale 1 (and stays zero).
    """
    V.tensor("keys", keys, ndim=2, dtypes=_REF_FLOATS)
    k32 = keys.to(torch.float32)
    amax = k32.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(k32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.contiguous()


def mips_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, key_scales=None, valid=None,
              num_valid: int | None = None, backend: str = "auto"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product top-k, never materialising the [B, M] score matrix.

    queries: [B, d] float32/float16/bfloat16 (float32 or the keys' dtype)
    keys:    [M, d] float32/float16/bfloat16, or int8 with key_scales [M] float32; row-major
    valid:   optional bool [M]; False rows (deleted entries) are never returned
    num_valid: optional number of True entries in ``valid``, for callers that already hold
             it (a memory snapshot does): skips counting them. It is trusted; if it is too
             large, the missing rows come back as index -1 with score -inf.
    Returns scores [B, k] float32 sorted descending and indices [B, k] int64; equal scores
    are ordered by lower index. Not differentiable. Raises on k < 1, k > MAX_K (2048), k
    larger than the number of valid rows, a dim mismatch, wrong dtypes or devices,
    non-finite queries (one host sync for the finiteness and count checks together).
    (Under torch.compile the data-dependent checks are skipped; missing rows come back as
    index -1 with score -inf.)
    """
    V.backend("backend", backend)
    floats = _floats(backend)
    V.tensor("queries", queries, ndim=2, dtypes=floats)
    V.tensor("keys", keys, ndim=2, dtypes=floats + (torch.int8,), device=queries.device)
    B, d = queries.shape
    M = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"keys must have {d} columns to match queries [B, {d}], got {tuple(keys.shape)}")
    if B < 1 or d < 1:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")
    if M < 1:
        raise ValueError("keys must have at least one row, got 0")
    if keys.dtype == torch.int8:
        if key_scales is None:
            raise ValueError("key_scales [M] float32 is required with int8 keys (see quantize_keys)")
        V.tensor("key_scales", key_scales, ndim=1, dtypes=(torch.float32,), device=queries.device)
        V.shape("key_scales", key_scales, (M,), "one scale per key row")
        key_scales = key_scales.contiguous()
    elif key_scales is not None:
        raise ValueError(f"key_scales is only for int8 keys; keys are {keys.dtype}")
    elif backend != "reference" and queries.dtype not in (torch.float32, keys.dtype):
        raise TypeError(f"queries must be float32 or the keys' dtype {keys.dtype}, got {queries.dtype}")
    if not keys.is_contiguous():
        raise ValueError("keys must be contiguous row-major [M, d] (a copy would cost O(M*d) memory)")
    V.integer("k", k, lo=1, hi=min(MAX_K, M), what=f"1 <= k <= min({MAX_K}, number of keys)")
    if valid is not None:
        V.tensor("valid", valid, ndim=1, dtypes=(torch.bool,), device=queries.device)
        V.shape("valid", valid, (M,), "one flag per key row")
        valid = valid.contiguous()
    if num_valid is not None:
        if valid is None:
            raise ValueError("num_valid counts the True entries of valid; pass valid with it")
        V.integer("num_valid", num_valid, lo=0, hi=M, what="the number of True entries of valid")
    queries = queries.detach().contiguous()
    if _eager():
        finite = torch.isfinite(queries).all()
        if valid is not None and num_valid is None:
            if queries.device.type == "cpu":  # no sync to save: two plain reads are cheaper
                finite, num_valid = bool(finite), int(valid.sum())
            else:  # one host sync for both answers (-1: not finite)
                num_valid = int(torch.where(finite, valid.sum(), -1))
                finite = num_valid >= 0
        if not finite:
            raise ValueError("queries must be finite (found NaN or Inf)")
        if valid is not None and k > num_valid:
            raise ValueError(f"k={k} is larger than the number of valid rows ({num_valid})")
    return torch.ops.pluglm.mips_topk(queries, keys.detach(), k, key_scales, valid, backend)


def _seed(dropout_p: float, seed) -> int:
    if seed is None:
        if dropout_p == 0.0:
            return 0
        return int(torch.randint(0, 2**62, (), device="cpu"))
    return V.integer("seed", seed, lo=0, hi=2**63 - 1)


def _check_q(q, floats) -> None:
    V.tensor("q", q, ndim=4, dtypes=floats)


def _check_bias_beta(q, bias, beta, N):
    """bias [B, N] and beta [H] as contiguous float32 (float64 for float64 q)."""
    B, T, H, Dh = q.shape
    V.tensor("bias", bias, ndim=2, dtypes=_REF_FLOATS, device=q.device)
    V.shape("bias", bias, (B, N), "[B, N]")
    V.tensor("beta", beta, ndim=1, dtypes=_REF_FLOATS, device=q.device)
    V.shape("beta", beta, (H,), "one per head")
    if min(B, T, H, Dh, N) < 1:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, N={N}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return bias.to(acc).contiguous(), beta.to(acc).contiguous()


def knowledge_attention(q, k, v, bias, beta, *, dropout_p: float = 0.0, seed=None,
                        backend: str = "auto") -> torch.Tensor:
    """Biased attention of every token over its sequence's N retrieved entries.

    q: [B, T, H, Dh] (already scaled by 1/sqrt(Dh)); k, v: [B, N, H, Dh] (q's dtype);
    bias: [B, N] (cos(q, k_j)); beta: [H]. Returns out [B, T, H, Dh] in q's dtype:
    out = dropout(softmax_j(q.k_j + beta_h * bias_j)) @ v, accumulated in float32.
    Differentiable in q, k, v, bias, beta; the dropout mask is a counter-based (Philox)
    function of ``seed`` and the element position, regenerated in backward.
    """
    V.backend("backend", backend)
    dropout_p = V.probability("dropout_p", dropout_p)
    floats = _floats(backend)
    _check_q(q, floats)
    B, T, H, Dh = q.shape
    V.tensor("k", k, ndim=4, dtypes=floats, device=q.device)
    V.shape("k", k, (B, k.shape[1], H, Dh), "[B, N, H, Dh]")
    V.tensor("v", v, ndim=4, dtypes=floats, device=q.device)
    V.shape("v", v, tuple(k.shape), "same as k")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    bias32, beta32 = _check_bias_beta(q, bias, beta, k.shape[1])
    out, _ = torch.ops.pluglm.knowledge_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                  bias32, beta32, dropout_p,
                                                  _seed(dropout_p, seed), backend)
    return out


def gather_knowledge_attention(q, table_k, table_v, indices, bias, beta, *, dropout_p: float = 0.0,
                               seed=None, backend: str = "auto") -> torch.Tensor:
    """knowledge_attention reading k, v straight from per-entry projected tables by index.

    table_k, table_v: [M, H, Dh] (q's dtype, contiguous); indices: [B, N] int64 (int32 is
    accepted), each in [0, M). Gradient to the tables is supported (repeated indices
    accumulate); it is dense [M, H, Dh] like the tables, so leave them without
    requires_grad for inference.
    """
    V.backend("backend", backend)
    dropout_p = V.probability("dropout_p", dropout_p)
    floats = _floats(backend)
    _check_q(q, floats)
    V.tensor("table_k", table_k, ndim=3, dtypes=floats, device=q.device)
    V.tensor("table_v", table_v, ndim=3, dtypes=floats, device=q.device)
    V.tensor("indices", indices, ndim=2, dtypes=(torch.int32, torch.int64), device=q.device)
    B, T, H, Dh = q.shape
    M = table_k.shape[0]
    V.shape("table_k", table_k, (M, H, Dh), "[M, H, Dh]")
    V.shape("table_v", table_v, (M, H, Dh), "same as table_k")
    if indices.shape[0] != B:
        raise ValueError(f"indices must have shape [B={B}, N], got {tuple(indices.shape)}")
    if table_k.dtype != q.dtype or table_v.dtype != q.dtype:
        raise TypeError(f"table_k and table_v must have q's dtype {q.dtype}, got "
                        f"{table_k.dtype} and {table_v.dtype}")
    for name, t in (("table_k", table_k), ("table_v", table_v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a copy would cost O(M*H*Dh) memory)")
    bias32, beta32 = _check_bias_beta(q, bias, beta, indices.shape[1])
    indices = indices.to(torch.int64).contiguous()
    if _eager() and indices.numel():
        lo, hi = torch.aminmax(indices)
        if not bool((lo >= 0) & (hi < M)):  # one host sync
            raise ValueError(f"indices must be in [0, {M}) (rows of table_k)")
    out, _ = torch.ops.pluglm.gather_knowledge_attention(
        q.contiguous(), table_k, table_v, indices, bias32, beta32, dropout_p,
        _seed(dropout_p, seed), backend)
    return out


def _check_pooler_w1(w1, b1, D: int, device) -> int:
    """The pooler's first layer: w1 [Hp, D], b1 [Hp] on ``device``; returns Hp."""
    V.tensor("w1", w1, ndim=2, dtypes=_REF_FLOATS, device=device)
    if w1.shape[1] != D:
        raise ValueError(f"w1 must have shape [Hp, {D}], got {tuple(w1.shape)}")
    V.tensor("b1", b1, ndim=1, dtypes=_REF_FLOATS, device=device)
    V.shape("b1", b1, (w1.shape[0],))
    return w1.shape[0]


def attentive_pool(x, mask, w1, b1, w2, b2, *, backend: str = "auto") -> torch.Tensor:
    """Attentive pooling, numerically stable: [B, T, D] -> [B, D].

    s_t = w2 . tanh(W1 x_t + b1) + b2; alpha = softmax over {t : mask_t != 0} of s;
    pool = sum_t alpha_t x_t. x: [B, T, D]; mask: [B, T] (bool or 0/1); w1: [Hp, D];
    b1: [Hp]; w2: [Hp] or [1, Hp]; b2: [] or [1]. A row with no token pools to zeros.
    Differentiable in x, w1, b1, w2, b2.
    """
    V.backend("backend", backend)
    floats = _floats(backend)
    V.tensor("x", x, ndim=3, dtypes=floats)
    B, T, D = x.shape
    V.tensor("mask", mask, ndim=2, device=x.device)
    V.shape("mask", mask, (B, T), "[B, T]")
    Hp = _check_pooler_w1(w1, b1, D, x.device)
    V.tensor("w2", w2, dtypes=_REF_FLOATS, device=x.device)
    if w2.numel() != Hp or w2.dim() > 2:
        raise ValueError(f"w2 must have shape [{Hp}] or [1, {Hp}], got {tuple(w2.shape)}")
    V.tensor("b2", b2, dtypes=_REF_FLOATS, device=x.device)
    if b2.numel() != 1:
        raise ValueError(f"b2 must hold one value, got shape {tuple(b2.shape)}")
    return torch.ops.pluglm.attentive_pool(x.contiguous(), mask.contiguous(), w1.contiguous(),
                                           b1.contiguous(), w2.reshape(Hp).contiguous(),
                                           b2.reshape(1).contiguous(), backend)


def _check_encoder(token_ids, attention_mask, word_embeddings, position_embeddings,
                   token_type_embeddings, ln_weight, ln_bias, w2, b2, Hp, token_type_ids,
                   eps, position_offset, floats) -> None:
    """The argument checks encode_knowledge and encode_knowledge_factored share (the
    pooler's first layer, which defines Hp, is checked by the caller)."""
    V.tensor("token_ids", token_ids, ndim=2, dtypes=_INT_IDS)
    dev = token_ids.device
    E, T = token_ids.shape
    V.tensor("attention_mask", attention_mask, ndim=2, device=dev)
    V.shape("attention_mask", attention_mask, (E, T), "[E, T]")
    V.tensor("word_embeddings", word_embeddings, ndim=2, dtypes=floats, device=dev)
    Vv, D = word_embeddings.shape
    V.tensor("position_embeddings", position_embeddings, ndim=2, dtypes=floats, device=dev)
    V.tensor("token_type_embeddings", token_type_embeddings, ndim=2, dtypes=floats, device=dev)
    for name, t in (("position_embeddings", position_embeddings),
                    ("token_type_embeddings", token_type_embeddings)):
        if t.shape[1] != D or t.dtype != word_embeddings.dtype:
            raise ValueError(f"{name} must be [*, {D}] in {word_embeddings.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    position_offset = V.integer("position_offset", position_offset, lo=0)
    if T + position_offset > position_embeddings.shape[0]:
        raise ValueError(f"token_ids has {T} positions (+ offset {position_offset}) but "
                         f"position_embeddings has {position_embeddings.shape[0]} rows")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        V.tensor(name, t, ndim=1, dtypes=_REF_FLOATS, device=dev)
        V.shape(name, t, (D,))
    if token_type_ids is not None:
        V.tensor("token_type_ids", token_type_ids, ndim=2, dtypes=_INT_IDS, device=dev)
        V.shape("token_type_ids", token_type_ids, (E, T))
    V.tensor("w2", w2, dtypes=_REF_FLOATS, device=dev)
    if w2.numel() != Hp or w2.dim() > 2:
        raise ValueError(f"w2 must have shape [{Hp}] or [1, {Hp}], got {tuple(w2.shape)}")
    V.tensor("b2", b2, dtypes=_REF_FLOATS, device=dev)
    if b2.numel() != 1:
        raise ValueError(f"b2 must hold one value, got shape {tuple(b2.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if _eager() and token_ids.numel():
        ranges = [torch.stack(torch.aminmax(token_ids)).to(torch.int64)]
        if token_type_ids is not None:
            ranges.append(torch.stack(torch.aminmax(token_type_ids)).to(torch.int64))
        bounds = torch.cat(ranges).tolist()  # one host sync for both id ranges
        lo, hi = bounds[:2]
        if lo < 0 or hi >= Vv:
            raise ValueError(f"token_ids must be in [0, {Vv}) (rows of word_embeddings), "
                             f"got values in [{lo}, {hi}]")
        if len(bounds) == 4:
            lo, hi = bounds[2:]
            if lo < 0 or hi >= token_type_embeddings.shape[0]:
                raise ValueError(f"token_type_ids must be in [0, {token_type_embeddings.shape[0]})")


def encode_knowledge(token_ids, attention_mask, word_embeddings, position_embeddings,
                     token_type_embeddings, ln_weight, ln_bias, w1, b1, w2, b2, *,
                     token_type_ids=None, eps: float = 1e-12, position_offset: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """Memory-entry encoder: token ids [E, T] -> pooled [E, D].

    Fuses the embedding gather (word + position + token type), LayerNorm and attentive
    pooling: attentive_pool(LayerNorm(word[ids] + pos[t + position_offset] + type[tt]), mask).
    Tables: word [V, D], position [P, D], token type [Tt, D]; ln_weight/ln_bias [D];
    pooler w1 [Hp, D], b1 [Hp], w2 [Hp], b2 [1]. Differentiable in every float tensor.
    """
    V.backend("backend", backend)
    V.tensor("word_embeddings", word_embeddings, ndim=2, dtypes=_floats(backend))
    D = word_embeddings.shape[1]
    Hp = _check_pooler_w1(w1, b1, D, word_embeddings.device)
    _check_encoder(token_ids, attention_mask, word_embeddings, position_embeddings,
                   token_type_embeddings, ln_weight, ln_bias, w2, b2, Hp, token_type_ids, eps,
                   position_offset, _floats(backend))
    return torch.ops.pluglm.encode_knowledge(
        token_ids.contiguous(), attention_mask.contiguous(), word_embeddings, position_embeddings,
        token_type_embeddings, ln_weight, ln_bias, w1.contiguous(), b1, w2.reshape(Hp),
        b2.reshape(1), None if token_type_ids is None else token_type_ids.contiguous(),
        float(eps), position_offset, backend)


class EncoderTables(NamedTuple):
    """The pooler's first layer applied to every embedding-table row, for
    ``encode_knowledge_factored`` (docs/design.md §3, encode_knowledge_factored): float32
    ``word_u`` [V, Hp] = (word * ln_weight) W1^T, ``pos_u`` [P, Hp] and ``type_u`` [Tt, Hp]
    likewise, ``gamma_u`` [Hp] = W1 ln_weight, ``bias_u`` [Hp] = W1 ln_bias + b1."""

    word_u: torch.Tensor
    pos_u: torch.Tensor
    type_u: torch.Tensor
    gamma_u: torch.Tensor
    bias_u: torch.Tensor


def encoder_tables(word_embeddings, position_embeddings, token_type_embeddings, ln_weight,
                   ln_bias, w1, b1, *, chunk_rows: int = 4096) -> EncoderTables:
    """Precompute the tables of ``encode_knowledge_factored`` from the encoder's weights.

    Computed in float64 a chunk of rows at a time (peak extra memory ~ chunk_rows x (D + Hp)
    doubles) and stored in float32 on the tables' device: 4 (V + P + Tt) Hp bytes, 94 MB for
    BERT-base. Valid until any of these weights changes; no gradient."""
    with torch.no_grad():
        dev = word_embeddings.device
        D = word_embeddings.shape[1]
        for name, t in (("word_embeddings", word_embeddings),
                        ("position_embeddings", position_embeddings),
                        ("token_type_embeddings", token_type_embeddings)):
            V.tensor(name, t, ndim=2, dtypes=_REF_FLOATS, device=dev)
            if t.shape[1] != D:
                raise ValueError(f"{name} must be [*, {D}], got {tuple(t.shape)}")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            V.tensor(name, t, ndim=1, dtypes=_REF_FLOATS, device=dev)
            V.shape(name, t, (D,))
        Hp = _check_pooler_w1(w1, b1, D, dev)
        chunk_rows = V.integer("chunk_rows", chunk_rows, lo=1)
        f64 = torch.float64
        w1t = w1.to(f64).t()  # [D, Hp]
        g = ln_weight.to(f64)

        def project(table):
            out = torch.empty(table.shape[0], Hp, dtype=torch.float32, device=dev)
            for a in range(0, table.shape[0], chunk_rows):
                out[a:a + chunk_rows] = (table[a:a + chunk_rows].to(f64) * g) @ w1t
            return out

        return EncoderTables(project(word_embeddings), project(position_embeddings),
                             project(token_type_embeddings),
                             (g @ w1t).to(torch.float32),
                             (ln_bias.to(f64) @ w1t + b1.to(f64)).to(torch.float32))


def encode_knowledge_factored(token_ids, attention_mask, word_embeddings, position_embeddings,
                              token_type_embeddings, ln_weight, ln_bias, tables, w2, b2, *,
                              token_type_ids=None, eps: float = 1e-12,
                              position_offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """``encode_knowledge`` at inference, through ``encoder_tables``: token ids [E, T] ->
    pooled [E, D] in the tables' dtype, O(D + Hp) work per token instead of O(D Hp)
    (docs/design.md §3, encode_knowledge_factored).

    Same arguments as encode_knowledge with the pooler's w1, b1 replaced by ``tables``
    (an ``EncoderTables`` from the same weights). The output equals encode_knowledge's up
    to float32 rounding (the pooler's pre-activations are summed in another order). No
    gradient: raises ValueError when one would be needed. backend: "cpu" (C++ kernel, what
    "auto" picks for CPU tensors) or "reference" (PyTorch, any device and float64)."""
    V.backend("backend", backend)
    if backend in ("triton", "cuda"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'reference' for "
                         f"encode_knowledge_factored, got {backend!r}")
    if not isinstance(tables, EncoderTables):
        raise TypeError(f"tables must be an EncoderTables (pluglm_kernels.encoder_tables), got "
                        f"{type(tables).__name__}")
    floats = _floats(backend)
    V.tensor("word_embeddings", word_embeddings, ndim=2, dtypes=floats)
    dev = word_embeddings.device
    for name, t in zip(EncoderTables._fields, tables):
        V.tensor(f"tables.{name}", t, dtypes=(torch.float32, torch.float64), device=dev)
    Hp = tables.gamma_u.shape[0] if tables.gamma_u.dim() == 1 else -1
    for name, t, rows in (("word_u", tables.word_u, word_embeddings.shape[0]),
                          ("pos_u", tables.pos_u, position_embeddings.shape[0]),
                          ("type_u", tables.type_u, token_type_embeddings.shape[0]),
                          ("gamma_u", tables.gamma_u, None), ("bias_u", tables.bias_u, None)):
        want = (Hp,) if rows is None else (rows, Hp)
        if Hp <= 0 or tuple(t.shape) != want:
            raise ValueError(f"tables.{name} must have shape {want} (tables of these "
                             f"embeddings), got {tuple(t.shape)}")
    _check_encoder(token_ids, attention_mask, word_embeddings, position_embeddings,
                   token_type_embeddings, ln_weight, ln_bias, w2, b2, Hp, token_type_ids, eps,
                   position_offset, floats)
    if torch.is_grad_enabled() and any(
            t.requires_grad for t in (word_embeddings, position_embeddings,
                                      token_type_embeddings, ln_weight, ln_bias, w2, b2, *tables)):
        raise ValueError("encode_knowledge_factored has no gradient: use encode_knowledge to "
                         "train, or call it under torch.no_grad()")
    tt = None if token_type_ids is None else token_type_ids.contiguous()
    # (float64 tables pass validation only with backend="reference")
    be = _backends.resolve("encode_knowledge_factored", backend, token_ids.device)
    if be == "reference":
        return reference.encode_knowledge_factored(
            token_ids, attention_mask, word_embeddings, position_embeddings,
            token_type_embeddings, ln_weight, ln_bias, tables, w2.reshape(Hp), b2.reshape(1),
            tt, float(eps), position_offset)
    return torch.ops.pluglm._C_encode_knowledge_factored(
        token_ids.contiguous(), attention_mask, tt, word_embeddings, position_embeddings,
        token_type_embeddings, ln_weight, ln_bias, tables.word_u.float(), tables.pos_u.float(),
        tables.type_u.float(), tables.gamma_u.float(), tables.bias_u.float(), w2.reshape(Hp),
        b2.reshape(1), float(eps), position_offset)


_GATHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                  torch.uint8, torch.int16, torch.uint16, torch.int32, torch.int64)


def gather_rows(table: torch.Tensor, indices: torch.Tensor, *, backend: str = "auto"
                ) -> torch.Tensor:
    """Rows of a table for a device: table [M, C] rows ``indices`` [...] -> [..., C] on
    indices' device (docs/design.md, "Placement").

    The table may live elsewhere than the indices: with the table in pinned host memory and
    the indices on a CUDA device, backend "triton" (what "auto" picks then) reads the rows
    straight from host memory (zero-copy through unified addressing: no trip of the ids to
    the host, no staging copy). "reference" gathers where the table is and copies. Under
    TRITON_INTERPRET=1, "triton" runs on CPU tensors. The table's columns must be
    contiguous (its rows may be strided); no gradient flows (memory tables are buffers).
    Out-of-range indices raise ValueError in eager mode (a device-side check, no host sync,
    when the table is not where the indices are)."""
    V.tensor("table", table, ndim=2, dtypes=_GATHER_DTYPES)
    V.tensor("indices", indices, dtypes=(torch.int64,))
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference' for gather_rows, "
                         f"got {backend!r}")
    M = table.shape[0]
    if _eager() and indices.numel():
        if indices.device == table.device or indices.device.type == "cpu":
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= M:
                raise ValueError(f"indices must be in [0, {M}), got values in [{lo}, {hi}]")
        else:
            torch._assert_async(((indices >= 0) & (indices < M)).all(),
                                f"gather_rows: indices must be in [0, {M})")
    if backend == "auto":
        uva = (indices.device.type == "cuda" and table.device.type == "cpu" and table.is_pinned())
        backend = "triton" if uva and _backends.triton_status()[0] else "reference"
    if backend == "reference":
        return reference.gather_rows(table, indices)
    ok, why = _backends.triton_status()
    if not ok:
        raise RuntimeError(f"gather_rows(backend='triton'): {why}")
    dev = indices.device
    if dev.type == "cuda":
        if table.device != dev and not (table.device.type == "cpu" and table.is_pinned()):
            raise ValueError(f"gather_rows(backend='triton') reads the table from {dev}: it must "
                             f"be on that device or in pinned host memory, got {table.device}"
                             f"{' (not pinned)' if table.device.type == 'cpu' else ''}")
    elif not (dev.type == "cpu" and table.device.type == "cpu" and _backends.triton_interpret()):
        raise ValueError(f"gather_rows(backend='triton') needs CUDA indices (or CPU tensors "
                         f"under TRITON_INTERPRET=1), got indices on {dev}")
    if table.shape[1] > 1 and table.stride(1) != 1:
        raise ValueError("table must have contiguous columns (stride 1) for backend='triton'")
    from .triton.gather_rows import gather_rows_fwd

    # bit-exact copies: Triton pointers of some dtypes (uint16, bool) are not all supported
    src, dt = table, table.dtype
    if dt == torch.uint16:
        src = table.view(torch.int16)
    flat = indices.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), table.shape[1], dtype=src.dtype, device=dev)
    gather_rows_fwd(src, flat, out)
    return out.view(dt).view(*indices.shape, table.shape[1])
