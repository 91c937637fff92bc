"""Triton kernels of attentive pooling and the knowledge encoder (forward, backward).

Semantics: ``pluglm_kernels.reference.embed / attentive_pool / encode_knowledge``; the
launchers mirror the native ops ``torch.ops.pluglm._C_embed_layernorm_fwd/_bwd`` and
``_C_attentive_pool_fwd/_bwd`` argument for argument (pluglm_kernels.ops calls either):

- ``embed_layernorm_fwd(token_ids [E, T], token_type_ids [E, T] | None, word [V, D],
  pos [P, D], type [Tt, D], ln_w [D], ln_b [D], eps, position_offset)`` ->
  (h [E, T, D] in the tables' dtype, mean [E, T] f32, rstd [E, T] f32); one program per
  token: gather, sum, two-pass LayerNorm in float32.
- ``attentive_pool_fwd(x [B, T, D], mask [B, T], u [B, T, Hp], w2 [Hp], b2 [1])`` ->
  (pooled [B, D], alpha [B, T] f32). u = x W1^T + b1 comes from a matmul. Scores
  s = w2.tanh(u) + b2 by token tiles, then per (row, tile of D) the masked max-subtracted
  softmax and the weighted sum; an empty row pools to zeros.
- ``attentive_pool_bwd(grad [B, D], x, mask, u, w2, alpha)`` -> (dx_direct, du, dw2, db2);
  db2 is identically zero (softmax shift invariance); dw2 from per-tile partials summed by
  torch (deterministic).
- ``embed_layernorm_bwd(dh, token_ids, token_type_ids, word, pos, type, ln_w, mean, rstd,
  position_offset)`` -> (dword, dpos, dtype, dln_w f32, dln_b f32): rows recomputed from the
  tables; the table gradients are float32 atomic adds (repeated ids: the order of the adds,
  hence the last bits, may vary run to run on a GPU); dln_w/dln_b from per-program
  partials summed by torch.

Out-of-range ids are caught by the public wrapper (eager mode); here they load zero rows
and add nothing (and trip ``tl.device_assert`` under TRITON_DEBUG=1). Plain launchers that
run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pluglm_kernels._backends import TRITON_OPS
from pluglm_kernels._validate import FLOAT_TABLE_DTYPES
from pluglm_kernels.triton._device import on_tensor_device

_BLOCK_T = 16
_BLOCK_H = 64
_TOKENS_PER_PROG = 16  # LayerNorm backward: tokens per program (bounds the dln partials)


@triton.jit
def _tanh(x):
    # Branch-free, no overflow: e = exp(-2|x|) in (0, 1].
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _token_rows(IDS, TT, n, T, V, Tt, off, HAS_TT: tl.constexpr):
    wr = tl.load(IDS + n).to(tl.int64)
    if HAS_TT:
        tr = tl.load(TT + n).to(tl.int64)
    else:
        tr = wr * 0
    pr = n % T + off
    ok = (wr >= 0) & (wr < V) & (tr >= 0) & (tr < Tt)
    tl.device_assert(ok, "token id or token type id out of range")
    return wr, pr, tr, ok


@triton.jit
def _embed_fwd_kernel(IDS, TT, WORD, POS, TYPE, LNW, LNB, H, MEAN, RSTD, T, D, V, Tt, off, eps,
                      HAS_TT: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wr, pr, tr, ok = _token_rows(IDS, TT, n, T, V, Tt, off, HAS_TT)
    d = tl.arange(0, BLOCK_D)
    md = (d < D) & ok
    x = (tl.load(WORD + wr * D + d, mask=md, other=0.0).to(tl.float32)
         + tl.load(POS + pr * D + d, mask=md, other=0.0).to(tl.float32)
         + tl.load(TYPE + tr * D + d, mask=md, other=0.0).to(tl.float32))
    mean = tl.sum(x, 0) / D
    xc = tl.where(d < D, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
    w = tl.load(LNW + d, mask=d < D, other=0.0)
    b = tl.load(LNB + d, mask=d < D, other=0.0)
    y = xc * rstd * w + b
    tl.store(H + n * D + d, y.to(H.dtype.element_ty), mask=d < D)
    tl.store(MEAN + n, mean)
    tl.store(RSTD + n, rstd)


@triton.jit
def _scores_kernel(U, MASK, W2, B2, S, N, Hp, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mn = n < N
    acc = tl.zeros((BLOCK_T,), tl.float32)
    for h0 in range(0, Hp, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mh = h < Hp
        u = tl.load(U + n[:, None] * Hp + h[None, :], mask=mn[:, None] & mh[None, :],
                    other=0.0).to(tl.float32)
        w2 = tl.load(W2 + h, mask=mh, other=0.0)
        acc += tl.sum(_tanh(u) * w2[None, :], 1)
    keep = tl.load(MASK + n, mask=mn, other=0) != 0
    s = tl.where(keep, acc + tl.load(B2), float("-inf"))
    tl.store(S + n, s, mask=mn)


@triton.jit
def _pool_kernel(X, S, ALPHA, OUT, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    mvec = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mvec = tl.maximum(mvec, tl.load(S + b * T + t, mask=t < T, other=float("-inf")))
    m = tl.max(mvec, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty row: every exp below is 0
    lvec = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        lvec += tl.exp(tl.load(S + b * T + t, mask=t < T, other=float("-inf")) - m)
    lsum = tl.sum(lvec, 0)
    inv = tl.where(lsum > 0, 1.0 / tl.maximum(lsum, 1e-30), 0.0)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < T
        a = tl.exp(tl.load(S + b * T + t, mask=mt, other=float("-inf")) - m) * inv
        if pd == 0:
            tl.store(ALPHA + b * T + t, a, mask=mt)
        x = tl.load(X + (b * T + t)[:, None] * D + d[None, :], mask=mt[:, None] & md[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * x, 0)
    tl.store(OUT + b * D + d, acc.to(OUT.dtype.element_ty), mask=md)


@triton.jit
def _pool_ds_kernel(G, X, ALPHA, DS, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # ds_t = alpha_t (g.x_t - sum_t' alpha_t' g.x_t'); DS first holds g.x_t.
    b = tl.program_id(0).to(tl.int64)
    gp = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < T
        da = tl.zeros((BLOCK_T,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            md = d < D
            g = tl.load(G + b * D + d, mask=md, other=0.0).to(tl.float32)
            x = tl.load(X + (b * T + t)[:, None] * D + d[None, :],
                        mask=mt[:, None] & md[None, :], other=0.0).to(tl.float32)
            da += tl.sum(x * g[None, :], 1)
        a = tl.load(ALPHA + b * T + t, mask=mt, other=0.0)
        gp += a * da
        tl.store(DS + b * T + t, da, mask=mt)
    # The loop below reads DS back in another register layout than the reduction that
    # stored it, so an element may be read by a different thread than wrote it: a CTA
    # barrier orders those global stores before the loads (no-op in the interpreter).
    tl.debug_barrier()
    gsum = tl.sum(gp, 0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < T
        a = tl.load(ALPHA + b * T + t, mask=mt, other=0.0)
        da = tl.load(DS + b * T + t, mask=mt, other=0.0)
        tl.store(DS + b * T + t, a * (da - gsum), mask=mt)


@triton.jit
def _pool_dx_kernel(G, ALPHA, DX, N, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mn = n < N
    m2 = mn[:, None] & (d < D)[None, :]
    a = tl.load(ALPHA + n, mask=mn, other=0.0)
    g = tl.load(G + (n // T)[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(DX + n[:, None] * D + d[None, :], (a[:, None] * g).to(DX.dtype.element_ty), mask=m2)


@triton.jit
def _pool_du_kernel(U, DS, W2, DU, DW2P, N, Hp, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pt = tl.program_id(0)
    n = pt.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mn = n < N
    mh = h < Hp
    m2 = mn[:, None] & mh[None, :]
    u = tl.load(U + n[:, None] * Hp + h[None, :], mask=m2, other=0.0).to(tl.float32)
    ds = tl.load(DS + n, mask=mn, other=0.0)
    w2 = tl.load(W2 + h, mask=mh, other=0.0)
    th = _tanh(u)
    du = ds[:, None] * w2[None, :] * (1.0 - th * th)
    tl.store(DU + n[:, None] * Hp + h[None, :], du.to(DU.dtype.element_ty), mask=m2)
    tl.store(DW2P + pt * Hp + h, tl.sum(ds[:, None] * th, 0), mask=mh)


@triton.jit
def _embed_bwd_kernel(DH, IDS, TT, WORD, POS, TYPE, LNW, MEAN, RSTD, DWORD, DPOS, DTYPE, DLNP,
                      N, T, D, V, Tt, off, HAS_TT: tl.constexpr, TOKENS: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    w = tl.load(LNW + d, mask=md, other=0.0)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_b = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, TOKENS):
        n = pid.to(tl.int64) * TOKENS + i
        if n < N:
            wr, pr, tr, ok = _token_rows(IDS, TT, n, T, V, Tt, off, HAS_TT)
            m = md & ok
            x = (tl.load(WORD + wr * D + d, mask=m, other=0.0).to(tl.float32)
                 + tl.load(POS + pr * D + d, mask=m, other=0.0).to(tl.float32)
                 + tl.load(TYPE + tr * D + d, mask=m, other=0.0).to(tl.float32))
            mean = tl.load(MEAN + n)
            rstd = tl.load(RSTD + n)
            xh = tl.where(md, (x - mean) * rstd, 0.0)
            dy = tl.load(DH + n * D + d, mask=md, other=0.0).to(tl.float32)
            wdy = w * dy
            c1 = tl.sum(wdy, 0) / D
            c2 = tl.sum(wdy * xh, 0) / D
            g = rstd * (wdy - c1 - xh * c2)
            tl.atomic_add(DWORD + wr * D + d, g, mask=m)
            tl.atomic_add(DPOS + pr * D + d, g, mask=m)
            tl.atomic_add(DTYPE + tr * D + d, g, mask=m)
            acc_w += dy * xh
            acc_b += dy
    tl.store(DLNP + pid * 2 * D + d, acc_w, mask=md)
    tl.store(DLNP + (pid * 2 + 1) * D + d, acc_b, mask=md)


# ----------------------------------------------------------------------------- launchers


def _ids(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token ids must be int64, int32, int16 or uint8, got {t.dtype}")
    return t.contiguous()


def _check_tables(token_ids, word, pos, type_, position_offset):
    if word.dtype not in FLOAT_TABLE_DTYPES:
        raise TypeError("word_embeddings must be float32, float16 or bfloat16 (float64 runs "
                        f"through backend='reference'), got {word.dtype}")
    if pos.dtype != word.dtype or type_.dtype != word.dtype:
        raise TypeError("position/token-type embeddings must have the dtype of word_embeddings")
    E, T = token_ids.shape
    if position_offset < 0 or T + position_offset > pos.shape[0]:
        raise ValueError(f"token_ids has {T} positions (+ offset {position_offset}) but "
                         f"position_embeddings has {pos.shape[0]} rows")
    return E, T, word.shape[1]


@on_tensor_device
def embed_layernorm_fwd(token_ids, token_type_ids, word, pos, type_, ln_w, ln_b, eps,
                        position_offset):
    E, T, D = _check_tables(token_ids, word, pos, type_, position_offset)
    ids = _ids(token_ids)
    tt = ids if token_type_ids is None else _ids(token_type_ids)
    h = torch.empty((E, T, D), dtype=word.dtype, device=word.device)  # [E, T, D]
    mean = torch.empty((E, T), dtype=torch.float32, device=word.device)
    rstd = torch.empty((E, T), dtype=torch.float32, device=word.device)
    if E * T:
        _embed_fwd_kernel[(E * T,)](
            ids, tt, word.contiguous(), pos.contiguous(), type_.contiguous(),
            ln_w.float().contiguous(), ln_b.float().contiguous(), h, mean, rstd, T, D,
            word.shape[0], type_.shape[0], position_offset, float(eps),
            HAS_TT=token_type_ids is not None, BLOCK_D=triton.next_power_of_2(D))
    return h, mean, rstd


def _mask_i8(mask):
    return (mask != 0).to(torch.int8).contiguous()


@on_tensor_device
def attentive_pool_fwd(x, mask, u, w2, b2):
    B, T, D = x.shape
    Hp = u.shape[2]
    if u.dtype != x.dtype:
        raise TypeError(f"u must have the dtype of x ({x.dtype}), got {u.dtype}")
    x, u = x.contiguous(), u.contiguous()
    s = torch.empty((B, T), dtype=torch.float32, device=x.device)  # scores [B, T]
    alpha = torch.empty((B, T), dtype=torch.float32, device=x.device)
    pooled = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B * T == 0:
        return pooled.zero_(), alpha
    _scores_kernel[(triton.cdiv(B * T, _BLOCK_T),)](
        u, _mask_i8(mask), w2.float().contiguous(), b2.float().contiguous(), s, B * T, Hp,
        BLOCK_T=_BLOCK_T, BLOCK_H=min(_BLOCK_H, triton.next_power_of_2(Hp)))
    block_d = min(128, triton.next_power_of_2(D))
    _pool_kernel[(B, triton.cdiv(D, block_d))](x, s, alpha, pooled, T, D, BLOCK_T=_BLOCK_T,
                                               BLOCK_D=block_d)
    return pooled, alpha


@on_tensor_device
def attentive_pool_bwd(grad, x, mask, u, w2, alpha):
    B, T, D = x.shape
    Hp = u.shape[2]
    x, u = x.contiguous(), u.contiguous()
    g = grad.contiguous()
    alpha = (alpha * (mask != 0)).contiguous()
    ds = torch.empty((B, T), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)  # [B, T, D]
    du = torch.empty_like(u)  # [B, T, Hp]
    n_t = triton.cdiv(B * T, _BLOCK_T)
    dw2_part = torch.empty((max(n_t, 1), Hp), dtype=torch.float32, device=x.device)
    if B * T == 0:
        return dx, du, torch.zeros(Hp, device=x.device), torch.zeros(1, device=x.device)
    block_d = min(128, triton.next_power_of_2(D))
    block_h = min(_BLOCK_H, triton.next_power_of_2(Hp))
    _pool_ds_kernel[(B,)](g, x, alpha, ds, T, D, BLOCK_T=_BLOCK_T, BLOCK_D=block_d)
    _pool_dx_kernel[(n_t, triton.cdiv(D, block_d))](g, alpha, dx, B * T, T, D, BLOCK_T=_BLOCK_T,
                                                    BLOCK_D=block_d)
    _pool_du_kernel[(n_t, triton.cdiv(Hp, block_h))](u, ds, w2.float().contiguous(), du, dw2_part,
                                                     B * T, Hp, BLOCK_T=_BLOCK_T, BLOCK_H=block_h)
    return dx, du, dw2_part.sum(0), torch.zeros(1, dtype=torch.float32, device=x.device)


@on_tensor_device
def embed_layernorm_bwd(dh, token_ids, token_type_ids, word, pos, type_, ln_w, mean, rstd,
                        position_offset):
    E, T, D = _check_tables(token_ids, word, pos, type_, position_offset)
    ids = _ids(token_ids)
    tt = ids if token_type_ids is None else _ids(token_type_ids)
    dev = word.device
    # float32 accumulators for the atomics (the outputs themselves for float32 tables)
    dw = torch.zeros(word.shape, dtype=torch.float32, device=dev)
    dp = torch.zeros(pos.shape, dtype=torch.float32, device=dev)
    dt = torch.zeros(type_.shape, dtype=torch.float32, device=dev)
    N = E * T
    progs = max(triton.cdiv(N, _TOKENS_PER_PROG), 1)
    dln_part = torch.zeros((progs, 2, D), dtype=torch.float32, device=dev)
    if N:
        _embed_bwd_kernel[(progs,)](
            dh.contiguous(), ids, tt, word.contiguous(), pos.contiguous(), type_.contiguous(),
            ln_w.float().contiguous(), mean.contiguous(), rstd.contiguous(), dw, dp, dt,
            dln_part, N, T, D, word.shape[0], type_.shape[0], position_offset,
            HAS_TT=token_type_ids is not None, TOKENS=_TOKENS_PER_PROG,
            BLOCK_D=triton.next_power_of_2(D))
    # two separate tensors: returns of a custom op must not alias each other
    return (dw.to(word.dtype), dp.to(pos.dtype), dt.to(type_.dtype), dln_part[:, 0].sum(0),
            dln_part[:, 1].sum(0))


TRITON_OPS.update({"attentive_pool", "encode_knowledge"})
