"""Triton kernels of knowledge_attention and gather_knowledge_attention (forward, backward).

Semantics: ``pluglm_kernels.reference.knowledge_attention``. q [B, T, H, Dh] (pre-scaled);
k, v [B, N, H, Dh] in q's dtype, or tables [M, H, Dh] read through indices [B, N] (page
size 1); bias [B, N] f32; beta [H] f32; out [B, T, H, Dh] in q's dtype; lse [B, T, H] f32
(log-sum-exp of the logits before dropout). Dropout is Philox-4x32-10 keyed by ``seed`` on
the flat (b, t, h, j) position, bit-identical with the reference and the C++ kernels;
``dropout_p == 0`` compiles the RNG out.

Forward: one program per (b*h, tile of T), walking N in chunks of at most _FWD_MAX_ROWS
rows with an online softmax (a single pass for the usual N <= 64); v of a chunk is loaded
after its softmax, so k and v never hold shared memory at once.

Backward: up to _BWD_MAX_ROWS entries, one kernel: each (b, h) gets a few splits of T, each
program looping over its tiles with the whole softmax row (renormalised, so N = 1 gives
exact zeros), writing dq and keeping dk/dv partials in registers. Above it, N is split
into chunks: _ka_bwd_dq_kernel computes D = sum_j P dP exactly and dq per tile of T, and
_ka_bwd_kernel one program per (b*h, chunk, split of T) for dk, dv, dbias, dbeta. Partials
are summed by torch in a fixed order (deterministic, no atomics); the split and chunk
counts depend on shapes only. The caps come from compiling for sm_90 and sm_80 with
tools/triton_aot_check.py: no kernel needs over 90 KB of shared memory, spills are at
most a few hundred bytes (they were up to 44 KB, and 225 KB of shared memory for f16
N = 256, Dh = 128, before the split).

Plain launchers (called by pluglm_kernels.ops); they run on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pluglm_kernels._backends import TRITON_OPS
from pluglm_kernels._validate import FLOAT_TABLE_DTYPES
from pluglm_kernels.triton._device import on_tensor_device
from pluglm_kernels.reference import dropout_threshold

MAX_N = 256
# Programs the backward aims for per launch (about two waves on an H100); a constant, not
# the device's SM count, so that results do not depend on the card.
_BWD_PROGRAMS = 264


@triton.jit
def _philox_first_word(seed_lo, seed_hi, offsets):
    """First 32-bit word of Philox-4x32-10(key=(seed_lo, seed_hi), counter=(offsets lo, hi, 0, 0))."""
    c0 = (offsets & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def _dropout_scale(row, offs_n, N, seed_lo, seed_hi, threshold, scale):
    """[BLOCK_T, BLOCK_N] factor: scale where kept, 0 where dropped. row: flat (b, t, h)."""
    counter = row[:, None] * N + offs_n[None, :]  # flat (b, t, h, j), int64
    bits = _philox_first_word(seed_lo, seed_hi, counter)
    return tl.where(bits >= threshold.to(tl.uint32), scale, 0.0)


@triton.jit
def _kv_offsets(IDX, b, h, N, H, DH, offs_n, mn, GATHER: tl.constexpr):
    """[BLOCK_N] element offsets of the (b, h) rows of k / v (gathered through IDX)."""
    if GATHER:
        rows = tl.load(IDX + b * N + offs_n, mask=mn, other=0).to(tl.int64)
    else:
        rows = b * N + offs_n
    return (rows * H + h) * DH


@triton.jit
def _load_kv(K, V, IDX, b, h, N, H, DH, offs_n, offs_d, mn, md, GATHER: tl.constexpr):
    """k, v [BLOCK_N, BLOCK_D] rows of (b, h); zeros outside N x Dh."""
    off = _kv_offsets(IDX, b, h, N, H, DH, offs_n, mn, GATHER)
    mask = mn[:, None] & md[None, :]
    k = tl.load(K + off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(V + off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _t_tile(pid_bh, pid_t, T, H, DH, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(b, h, row, offs_d, mt, md, qmask) of the program's (b, h) and tile of T; row is the
    flat (b, t, h) index of each of its BLOCK_T rows."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mt = offs_t < T
    md = offs_d < DH
    row = (b * T + offs_t) * H + h
    return b, h, row, offs_d, mt, md, mt[:, None] & md[None, :]


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    # DOT 0: native dot (f16/bf16 tensor cores, f32 accumulation); 1: float32 inputs, exact
    # float32 products (tf32 would break the 1e-5 tolerance); 2: upcast to float32 first
    # (bf16 under TRITON_INTERPRET, whose bf16 dot is wrong in triton 3.8).
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _ka_fwd_kernel(Q, K, V, IDX, BIAS, BETA, OUT, LSE, T, H, N, DH,
                   seed_lo, seed_hi, threshold, scale,
                   GATHER: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out and lse of one (b, h) and tile of T, over N in chunks of BLOCK_N rows with an
    online softmax (one chunk, i.e. one pass, whenever BLOCK_N covers N)."""
    b, h, row, offs_d, mt, md, qmask = _t_tile(tl.program_id(0), tl.program_id(1), T, H, DH,
                                               BLOCK_T, BLOCK_D)
    beta = tl.load(BETA + h)
    q = tl.load(Q + row[:, None] * DH + offs_d[None, :], mask=qmask, other=0.0)
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        kv_off = _kv_offsets(IDX, b, h, N, H, DH, offs_n, mn, GATHER)  # [BLOCK_N]
        kv_mask = mn[:, None] & md[None, :]
        k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        bias = tl.load(BIAS + b * N + offs_n, mask=mn, other=0.0)
        s = _mm(q, tl.trans(k), DOT) + beta * bias[None, :]  # [BLOCK_T, BLOCK_N] f32
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every chunk has a valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = p * _dropout_scale(row, offs_n, N, seed_lo, seed_hi, threshold, scale)
        # v is loaded only now, so k and v never need shared memory at the same time
        v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT)
        m = m_new
    tl.store(LSE + row, m + tl.log(l), mask=mt)
    o = acc / l[:, None]
    tl.store(OUT + row[:, None] * DH + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _ka_bwd_kernel(DO, Q, K, V, IDX, BIAS, BETA, LSE, DELTA, DQ, DKP, DVP, DBIASP, DBETAP,
                   B, T, H, N, DH, TILES_PER_SPLIT,
                   seed_lo, seed_hi, threshold, scale,
                   GATHER: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                   CHUNKED: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv, dbias, dbeta partials of one (b, h), one split of T and one chunk of N.

    Unchunked (BLOCK_N covers N): the program holds the whole softmax row, computes
    D = sum_j P dP itself and also writes dq. Chunked: D comes from DELTA (written by
    _ka_bwd_dq_kernel) and dq is that kernel's job.
    """
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mn = offs_n < N
    md = offs_d < DH
    k, v = _load_kv(K, V, IDX, b, h, N, H, DH, offs_n, offs_d, mn, md, GATHER)
    bias = tl.load(BIAS + b * N + offs_n, mask=mn, other=0.0)
    beta = tl.load(BETA + h)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        offs_t = (pid_s * TILES_PER_SPLIT + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = offs_t < T
        row = (b * T + offs_t) * H + h
        qmask = mt[:, None] & md[None, :]
        q = tl.load(Q + row[:, None] * DH + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + row[:, None] * DH + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + row, mask=mt, other=0.0)
        s = _mm(q, tl.trans(k), DOT) + beta * bias[None, :]
        p = tl.exp(s - lse[:, None])
        p = tl.where(mt[:, None] & mn[None, :], p, 0.0)  # [BLOCK_T, BLOCK_N]
        if not CHUNKED:
            # The whole row is here: renormalise, so that the rounding of the recomputed
            # logits (other tile shapes than the forward's) cancels; N = 1 gives p = 1 and
            # exact zeros for dq, dk, dbias, dbeta.
            psum = tl.sum(p, 1)
            p = p / tl.where(psum > 0.0, psum, 1.0)[:, None]
        dp = _mm(do, tl.trans(v), DOT)
        if DROPOUT:
            sc = _dropout_scale(row, offs_n, N, seed_lo, seed_hi, threshold, scale)
            dp = dp * sc
            pd = p * sc
        else:
            pd = p
        if CHUNKED:
            dsum = tl.load(DELTA + row, mask=mt, other=0.0)
        else:
            # D = sum_j P dP (= rowsum(dO * O)) without reading O, exact in f32.
            dsum = tl.sum(p * dp, 1)
        ds = p * (dp - dsum[:, None])
        if not CHUNKED:
            dq = _mm(ds.to(k.dtype), k, DOT)
            tl.store(DQ + row[:, None] * DH + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=qmask)
        dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT)
        dv += _mm(tl.trans(pd.to(do.dtype)), do, DOT)
        colsum = tl.sum(ds, 0)
        dbias += colsum * beta
        dbeta += colsum * bias
    # partials: DKP/DVP [splits, B, N, H, Dh]; DBIASP [splits, B, H, N];
    # DBETAP [splits, chunks, B, H]
    part_kv = ((pid_s * B + b) * N + offs_n) * H + h
    kvmask = mn[:, None] & md[None, :]
    tl.store(DKP + part_kv[:, None] * DH + offs_d[None, :], dk, mask=kvmask)
    tl.store(DVP + part_kv[:, None] * DH + offs_d[None, :], dv, mask=kvmask)
    part_bh = (pid_s * B + b) * H + h
    tl.store(DBIASP + part_bh * N + offs_n, dbias, mask=mn)
    tl.store(DBETAP + ((pid_s * tl.num_programs(1) + pid_c) * B + b) * H + h, tl.sum(dbeta, 0))


@triton.jit
def _p_dp_chunk(q, do, lse, row, mt, K, V, IDX, BIAS, b, h, beta, N, H, DH, offs_n, offs_d, md,
                seed_lo, seed_hi, threshold, scale,
                GATHER: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr):
    """P (zeros outside T x N) and dP (dropout applied) of one chunk of N, and its k rows."""
    mn = offs_n < N
    k, v = _load_kv(K, V, IDX, b, h, N, H, DH, offs_n, offs_d, mn, md, GATHER)
    bias = tl.load(BIAS + b * N + offs_n, mask=mn, other=0.0)
    s = _mm(q, tl.trans(k), DOT) + beta * bias[None, :]
    p = tl.exp(s - lse[:, None])
    p = tl.where(mt[:, None] & mn[None, :], p, 0.0)
    dp = _mm(do, tl.trans(v), DOT)
    if DROPOUT:
        dp = dp * _dropout_scale(row, offs_n, N, seed_lo, seed_hi, threshold, scale)
    return p, dp, k


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _ka_bwd_dq_kernel(DO, Q, K, V, IDX, BIAS, BETA, LSE, DELTA, DQ, T, H, N, DH,
                      seed_lo, seed_hi, threshold, scale,
                      GATHER: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of one (b, h) and tile of T, over N in chunks of BLOCK_N (N > the row cap).

    Two passes over the chunks: the first sums D = sum_j P dP exactly in float32 and writes
    it to DELTA for _ka_bwd_kernel; the second accumulates dq. (rowsum(dO * O) would save
    the first pass but O is rounded to q's dtype: with bf16 that put dbeta, a sum that
    cancels to near zero, 4% off.)
    """
    b, h, row, offs_d, mt, md, qmask = _t_tile(tl.program_id(0), tl.program_id(1), T, H, DH,
                                               BLOCK_T, BLOCK_D)
    q = tl.load(Q + row[:, None] * DH + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + row[:, None] * DH + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + row, mask=mt, other=0.0)
    beta = tl.load(BETA + h)
    dsum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        p, dp, k = _p_dp_chunk(q, do, lse, row, mt, K, V, IDX, BIAS, b, h, beta, N, H, DH,
                               n0 + tl.arange(0, BLOCK_N), offs_d, md,
                               seed_lo, seed_hi, threshold, scale, GATHER, DROPOUT, DOT)
        dsum += tl.sum(p * dp, 1)
    tl.store(DELTA + row, dsum, mask=mt)
    dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        p, dp, k = _p_dp_chunk(q, do, lse, row, mt, K, V, IDX, BIAS, b, h, beta, N, H, DH,
                               n0 + tl.arange(0, BLOCK_N), offs_d, md,
                               seed_lo, seed_hi, threshold, scale, GATHER, DROPOUT, DOT)
        ds = p * (dp - dsum[:, None])
        dq += _mm(ds.to(k.dtype), k, DOT)
    tl.store(DQ + row[:, None] * DH + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


# ------------------------------------------------------------------------------- launchers


def _rng_args(dropout_p: float, seed: int):
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return (seed & 0xFFFFFFFF, seed >> 32, dropout_threshold(dropout_p),
            1.0 / (1.0 - dropout_p))


def _dot_mode(q: torch.Tensor) -> int:
    if q.dtype == torch.float32:
        return 1
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # the interpreter
        return 2
    return 0


def _fwd_blocks(N: int, Dh: int, dtype: torch.dtype):
    """(BLOCK_T, BLOCK_N, BLOCK_D, num_warps) of the forward; N is walked in chunks of
    BLOCK_N rows (at most _FWD_MAX_ROWS, which keep q, the chunk of k / v and the output
    accumulator in registers without spills; tools/triton_aot_check.py)."""
    block_d = max(16, triton.next_power_of_2(Dh))  # tl.dot wants every dimension >= 16
    full = max(16, triton.next_power_of_2(N))
    f32 = dtype == torch.float32
    block_n = min(full, _FWD_MAX_ROWS[f32][block_d])
    tile = block_n * block_d
    if f32:
        block_t = 32 if tile <= 1024 else 16
        num_warps = 4
    else:
        block_t = 64 if tile <= 4096 else 32
        num_warps = 4 if tile <= 4096 else 8
    return block_t, block_n, block_d, num_warps


_FWD_MAX_ROWS = {False: {16: 128, 32: 64, 64: 64, 128: 64},
                 True: {16: 64, 32: 32, 64: 16, 128: 16}}


def _check(q, k, v, indices, bias, beta, dropout_p):
    if q.dtype not in FLOAT_TABLE_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias), ("beta", beta)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if bias.dtype != torch.float32 or beta.dtype != torch.float32:
        raise TypeError(f"bias and beta must be float32, got {bias.dtype} and {beta.dtype}")
    B, T, H, Dh = q.shape
    N = indices.shape[1] if indices is not None else k.shape[1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"N (number of retrieved entries) must be in [1, {MAX_N}], got {N}")
    if tuple(bias.shape) != (B, N) or tuple(beta.shape) != (H,):
        raise ValueError(f"bias must be [{B}, {N}] and beta [{H}], got {tuple(bias.shape)} and "
                         f"{tuple(beta.shape)}")
    if indices is not None and (indices.dtype != torch.int64 or not indices.is_contiguous()):
        raise TypeError("indices must be contiguous int64 [B, N]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return B, T, H, Dh, N


@on_tensor_device
def _fwd(q, k, v, indices, bias, beta, dropout_p, seed):
    B, T, H, Dh, N = _check(q, k, v, indices, bias, beta, dropout_p)
    out = torch.empty_like(q)  # [B, T, H, Dh]
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_t, block_n, block_d, num_warps = _fwd_blocks(N, Dh, q.dtype)
    seed_lo, seed_hi, threshold, scale = _rng_args(dropout_p, seed)
    grid = (B * H, triton.cdiv(T, block_t))  # axis 0 takes up to 2^31 - 1 programs
    _ka_fwd_kernel[grid](
        q, k, v, indices if indices is not None else q, bias, beta, out, lse, T, H, N, Dh,
        seed_lo, seed_hi, threshold, scale,
        GATHER=indices is not None, DROPOUT=dropout_p > 0.0, DOT=_dot_mode(q),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return out, lse


def _bwd_blocks(N: int, Dh: int, dtype: torch.dtype):
    """(BLOCK_T, BLOCK_N, BLOCK_D, num_warps, chunked) of the backward.

    A program keeps k, v and the float32 dk, dv accumulators of BLOCK_N entries; above
    _BWD_MAX_ROWS rows (per dtype family and head size) that no longer fits in registers
    and shared memory (f16 N=256, Dh=128 needed 225 KB of shared memory, over sm_80's
    163 KB; f32 spilled from N=32), so N is split into chunks of that many rows. Sizes
    from tools/triton_aot_check.py (registers, spills, shared memory; benchmarks/NOTES.md).
    """
    block_d = max(16, triton.next_power_of_2(Dh))
    full = max(16, triton.next_power_of_2(N))
    f32 = dtype == torch.float32
    block_n = min(full, _BWD_MAX_ROWS[f32][block_d])
    tile = block_n * block_d
    if f32:  # exact float32 products (not tf32) take many registers per element
        block_t, num_warps = 16, (4 if tile <= 1024 else 8)
    else:
        block_t = 64 if tile <= 2048 else (32 if tile <= 16384 else 16)
        num_warps = 4 if tile <= 8192 else 8
    return block_t, block_n, block_d, num_warps, block_n < full


# Most rows of k / v one backward program holds, by (float32?, BLOCK_D).
_BWD_MAX_ROWS = {False: {16: 64, 32: 64, 64: 64, 128: 64},
                 True: {16: 128, 32: 64, 64: 32, 128: 16}}


@on_tensor_device
def _bwd(grad_out, q, k, v, indices, bias, beta, out, lse, dropout_p, seed):
    B, T, H, Dh, N = _check(q, k, v, indices, bias, beta, dropout_p)
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype or not grad_out.is_contiguous():
        raise ValueError("grad_out must be contiguous with q's shape and dtype")
    if lse.shape != (B, T, H) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be contiguous float32 [{B}, {T}, {H}]")
    block_t, block_n, block_d, num_warps, chunked = _bwd_blocks(N, Dh, q.dtype)
    chunks = triton.cdiv(N, block_n)
    tiles = max(1, triton.cdiv(T, block_t))
    splits = min(tiles, max(1, triton.cdiv(_BWD_PROGRAMS, max(B * H * chunks, 1))))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)
    dev = q.device
    dq = torch.empty_like(q)
    dk_part = torch.empty((splits, B, N, H, Dh), dtype=torch.float32, device=dev)
    dv_part = torch.empty((splits, B, N, H, Dh), dtype=torch.float32, device=dev)
    dbias_part = torch.empty((splits, B, H, N), dtype=torch.float32, device=dev)
    dbeta_part = torch.empty((splits, chunks, B, H), dtype=torch.float32, device=dev)
    if B * H > 0:
        seed_lo, seed_hi, threshold, scale = _rng_args(dropout_p, seed)
        idx = indices if indices is not None else q
        common = dict(GATHER=indices is not None, DROPOUT=dropout_p > 0.0, DOT=_dot_mode(q),
                      BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
        delta = lse  # unused unless chunked
        if chunked:
            delta = torch.empty_like(lse)
            if T > 0:
                _ka_bwd_dq_kernel[(B * H, tiles)](
                    grad_out, q, k, v, idx, bias, beta, lse, delta, dq, T, H, N, Dh,
                    seed_lo, seed_hi, threshold, scale, BLOCK_T=block_t, **common)
        _ka_bwd_kernel[(B * H, chunks, splits)](
            grad_out, q, k, v, idx, bias, beta, lse, delta,
            dq, dk_part, dv_part, dbias_part, dbeta_part, B, T, H, N, Dh, per_split,
            seed_lo, seed_hi, threshold, scale, CHUNKED=chunked, BLOCK_T=block_t, **common)
    dk = dk_part.sum(0).to(q.dtype)
    dv = dv_part.sum(0).to(q.dtype)
    dbias = dbias_part.sum((0, 2))
    dbeta = dbeta_part.sum((0, 1, 2))
    return dq, dk, dv, dbias, dbeta


def knowledge_attention_fwd(q, k, v, bias, beta, dropout_p, seed):
    """q [B, T, H, Dh]; k, v [B, N, H, Dh]; bias [B, N] f32; beta [H] f32 -> (out, lse [B, T, H])."""
    return _fwd(q, k, v, None, bias, beta, dropout_p, seed)


def knowledge_attention_bwd(grad_out, q, k, v, bias, beta, out, lse, dropout_p, seed):
    """-> (dq, dk, dv, dbias [B, N] f32, dbeta [H] f32); dq/dk/dv in q's dtype."""
    return _bwd(grad_out, q, k, v, None, bias, beta, out, lse, dropout_p, seed)


def gather_knowledge_attention_fwd(q, table_k, table_v, indices, bias, beta, dropout_p, seed):
    """table_k, table_v [M, H, Dh]; indices [B, N] int64 -> (out, lse)."""
    if table_k.dim() != 3 or table_k.shape != table_v.shape or indices.dim() != 2:
        raise ValueError("table_k/table_v must be [M, H, Dh] and indices [B, N]")
    return _fwd(q, table_k, table_v, indices, bias, beta, dropout_p, seed)


def gather_knowledge_attention_bwd(grad_out, q, table_k, table_v, indices, bias, beta, out, lse,
                                   dropout_p, seed):
    """-> (dq, dk_rows [B, N, H, Dh], dv_rows [B, N, H, Dh], dbias, dbeta); the caller
    scatters the rows into the tables' gradients (repeated indices accumulate)."""
    if table_k.dim() != 3 or table_k.shape != table_v.shape or indices.dim() != 2:
        raise ValueError("table_k/table_v must be [M, H, Dh] and indices [B, N]")
    return _bwd(grad_out, q, table_k, table_v, indices, bias, beta, out, lse, dropout_p, seed)


TRITON_OPS.update({"knowledge_attention", "gather_knowledge_attention"})
