"""Triton exact MIPS with a fused streaming top-k (split-K style).

Contract: ``mips_topk_triton(queries [B, d], keys [M, d], k, key_scales [M] | None,
valid [M] bool | None) -> (scores [B, k] f32 descending, indices [B, k] int64)``; equal
scores are ordered by lower index; missing rows (fewer than k valid) come back as index -1
with score -inf. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.

Design. Every (score, index) pair is packed into one int64 whose signed order is "higher
score first, then lower index first" (an order-preserving map of the float's bits in the
high word, ``2^32 - 1 - index`` in the low word). Selection then is a plain sort of
integers: deterministic, and ties need no special case.
Stage 1 is a grid over (query tiles, key splits): each program streams its split tile by
tile, scores the tile with ``tl.dot`` (fp32 accumulation of exact fp16/bf16 products; IEEE
fp32 for fp32 inputs: TF32 would break the exact index-set contract), and keeps a sorted
register buffer of the best ``K_PAD`` packed candidates per query. A tile is merged only
when one of its scores beats a query's current k-th best (rare once the buffer is warm):
the tile is sorted ascending, its top part placed against the buffer's tail, an
element-wise max forms a bitonic sequence holding the union's top ``K_PAD``, and one sort
restores order. Stage 2 merges the [B, splits, K_PAD] candidates with ``torch.topk`` on the
packed integers (unique, so the result is deterministic).
Extra memory: B * splits * K_PAD * 8 bytes, capped near 64 MB by the choice of splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pluglm_kernels._backends import TRITON_OPS
from pluglm_kernels._validate import MAX_K
from pluglm_kernels.triton._device import on_tensor_device

TRITON_OPS.add("mips_topk")

_SENTINEL = -(2**63)  # packed value of "no candidate"; below every real packed pair
_CAND_BYTES_CAP = 48 << 20  # stage-1 candidate buffer budget (leaves room for the merge)
_MAX_ROWS = 2**32 - 2  # the packed low word holds 2^32 - 1 - index


@triton.jit
def _pack(s, idx):
    # -0.0 and +0.0 are equal scores; give them one bit pattern so ties stay index-ordered.
    s = tl.where(s == 0.0, 0.0, s)
    b = s.to(tl.int32, bitcast=True)
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # monotone float -> signed int
    return (o.to(tl.int64) << 32) | (4294967295 - idx.to(tl.int64))


@triton.jit
def _load_cast(ptrs, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        # bf16 passed as int16 bits (the interpreter mis-handles bf16): widen exactly to f32
        v = tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16
        return v.to(tl.float32, bitcast=True)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _merge(best, tile, BQ: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
    """best [BQ, K_PAD] sorted descending, tile [BQ, BLOCK_N] -> top K_PAD of the union."""
    t = tl.sort(tile, dim=1, descending=False)
    SENT: tl.constexpr = -9223372036854775807 - 1
    if K_PAD <= BLOCK_N:
        R: tl.constexpr = BLOCK_N // K_PAD
        t3 = tl.reshape(t, [BQ, R, K_PAD])
        r = tl.arange(0, R)[None, :, None]
        top = tl.max(tl.where(r == R - 1, t3, SENT), axis=1)  # the K_PAD largest, ascending
    else:
        R2: tl.constexpr = K_PAD // BLOCK_N
        r = tl.arange(0, R2)[None, :, None]
        # tile (ascending) against the buffer's last BLOCK_N slots, sentinel elsewhere
        top = tl.reshape(tl.where(r == R2 - 1, t[:, None, :], SENT), [BQ, K_PAD])
    # best desc vs top asc, element-wise max: a bitonic sequence of the union's top K_PAD
    return tl.sort(tl.maximum(best, top), dim=1, descending=True)


@triton.jit
def _mips_stage1(Q, K, SCALES, VALID, CAND, B, M, D, rows_per_split, k,
                 IS_INT8: tl.constexpr, HAS_VALID: tl.constexpr, DOT_F32: tl.constexpr,
                 BQ: tl.constexpr, BQ_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, K_PAD: tl.constexpr,
                 Q_BF16_BITS: tl.constexpr, K_BF16_BITS: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    SENT: tl.constexpr = -9223372036854775807 - 1

    offs_qd = pid_q * BQ + tl.arange(0, BQ_DOT)  # [BQ_DOT] rows fed to tl.dot (>= 16)
    qd_mask = (tl.arange(0, BQ_DOT) < BQ) & (offs_qd < B)
    offs_q = pid_q * BQ + tl.arange(0, BQ)  # [BQ] rows kept in the buffer
    q_mask = offs_q < B
    offs_d = tl.arange(0, BLOCK_D)

    row_lo = pid_s.to(tl.int64) * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, M)

    if ONE_D_TILE:
        q_tile = _load_cast(Q + offs_qd[:, None].to(tl.int64) * D + offs_d[None, :],
                            qd_mask[:, None] & (offs_d[None, :] < D), Q_BF16_BITS)
        if DOT_F32:
            q_tile = q_tile.to(tl.float32)

    best = tl.full([BQ, K_PAD], SENT, tl.int64)  # sorted descending
    kth = tl.full([BQ], SENT, tl.int64)  # current k-th best per query
    col = tl.arange(0, K_PAD)[None, :]

    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N] int64: M*d may pass 2^31
        n_mask = offs_n < row_hi
        acc = tl.zeros([BQ_DOT, BLOCK_N], dtype=tl.float32)
        if ONE_D_TILE:
            kt = _load_cast(K + offs_n[:, None] * D + offs_d[None, :],
                            n_mask[:, None] & (offs_d[None, :] < D), K_BF16_BITS)
            if DOT_F32:
                acc = tl.dot(q_tile, tl.trans(kt.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(q_tile, tl.trans(kt.to(q_tile.dtype)), acc)
        else:
            for d0 in range(0, D, BLOCK_D):
                dm = (d0 + offs_d) < D
                qt = _load_cast(Q + offs_qd[:, None].to(tl.int64) * D + (d0 + offs_d)[None, :],
                                qd_mask[:, None] & dm[None, :], Q_BF16_BITS)
                kt = _load_cast(K + offs_n[:, None] * D + (d0 + offs_d)[None, :],
                                n_mask[:, None] & dm[None, :], K_BF16_BITS)
                if DOT_F32:
                    acc = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), acc,
                                 input_precision="ieee")
                else:
                    acc = tl.dot(qt, tl.trans(kt.to(qt.dtype)), acc)
        if BQ < BQ_DOT:
            # tl.dot needs >= 16 rows; keep only the first BQ (rows >= BQ are zero padding)
            R: tl.constexpr = BQ_DOT // BQ
            a3 = tl.reshape(acc, [R, BQ, BLOCK_N])
            s = tl.sum(tl.where(tl.arange(0, R)[:, None, None] == 0, a3, 0.0), axis=0)
        else:
            s = acc
        if IS_INT8:
            sc = tl.load(SCALES + offs_n, mask=n_mask, other=0.0)
            s = s * sc[None, :]
        keep = n_mask
        if HAS_VALID:
            keep = keep & (tl.load(VALID + offs_n, mask=n_mask, other=0) != 0)
        # A NaN score (a NaN key row, or a NaN scale) is the canonical NaN, sign bit clear,
        # which _pack would map above +inf: exclude it here, after the scale, as the CPU
        # kernel and the reference do.
        packed = tl.where(keep[None, :] & (s == s), _pack(s, offs_n[None, :]), SENT)  # [BQ, BLOCK_N]
        beats = (packed > kth[:, None]).to(tl.int32)
        if tl.max(tl.max(beats, axis=1), axis=0) > 0:
            best = _merge(best, packed, BQ, BLOCK_N, K_PAD)
            kth = tl.max(tl.where(col == k - 1, best, SENT), axis=1)

    offs_c = tl.arange(0, K_PAD)
    out = CAND + (offs_q[:, None].to(tl.int64) * n_splits + pid_s) * K_PAD + offs_c[None, :]
    tl.store(out, best, mask=q_mask[:, None])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """packed int64 [...] -> (scores f32, indices int64); the sentinel -> (-inf, -1)."""
    hi = (packed >> 32).to(torch.int32)
    bits = torch.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    idx = 4294967295 - (packed & 4294967295)
    missing = packed == _SENTINEL
    scores = scores.masked_fill(missing, float("-inf"))
    idx = idx.masked_fill(missing, -1)
    return scores.contiguous(), idx.contiguous()


def _config(B: int, M: int, d: int, k: int, dot_f32: bool, widen: bool, device: torch.device):
    K_PAD = max(16, _next_pow2(k))
    # rows kept per program: bounds the register buffer to BQ * K_PAD <= 4096 packed values
    BQ = max(1, min(64, 4096 // K_PAD, _next_pow2(B)))
    BQ_DOT = max(16, BQ)
    BLOCK_N = 64 if K_PAD <= 64 else 128
    # The dot's operand width sets the chunk of d, not the keys' storage. f16/bf16/int8 keys
    # widened for an f32 dot are loaded into registers and converted, and with 128-wide
    # chunks and the default 3-stage pipeline that spilled 8.8-15 KB per thread under
    # triton 3.6 (BQ >= 32); 32-wide chunks, unpipelined, spill 0-20 B (benchmarks/NOTES.md,
    # issue 13). f32 keys feed the f32 dot directly: 64-wide chunks, pipelined, no spills.
    BLOCK_D = max(16, min(_next_pow2(d), (32 if widen else 64) if dot_f32 else 128))
    n_qt = triton.cdiv(B, BQ)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, (4 * sms) // n_qt)
    else:
        target = 3  # the interpreter: a few splits exercise the merge without crawling
    cap = max(1, _CAND_BYTES_CAP // (B * K_PAD * 8))
    min_rows = BLOCK_N if device.type != "cuda" else 16 * BLOCK_N
    splits = max(1, min(target, cap, triton.cdiv(M, min_rows)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(M, rows_per_split)
    return dict(K_PAD=K_PAD, BQ=BQ, BQ_DOT=BQ_DOT, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                ONE_D_TILE=d <= BLOCK_D), splits, rows_per_split


@on_tensor_device
def mips_topk_triton(queries: torch.Tensor, keys: torch.Tensor, k: int,
                     key_scales: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner product. queries [B, d]; keys [M, d]; key_scales [M] f32 for int8
    keys; valid [M] bool. Returns scores [B, k] f32 descending, indices [B, k] int64."""
    B, d = queries.shape
    M = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"keys must have {d} columns, got {tuple(keys.shape)}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    if M > _MAX_ROWS:
        raise ValueError(f"keys has {M} rows; the Triton kernel supports at most {_MAX_ROWS}")
    is_int8 = keys.dtype == torch.int8
    if is_int8 and (key_scales is None or key_scales.dtype != torch.float32):
        raise ValueError("int8 keys need key_scales [M] float32")
    q = queries.contiguous()
    kk = keys.contiguous()
    if is_int8:
        # int8 -> f16/bf16 is exact, so 16-bit queries keep the tensor-core path
        dot_f32 = q.dtype == torch.float32
    else:
        dot_f32 = q.dtype == torch.float32 or kk.dtype == torch.float32
        if not dot_f32 and q.dtype != kk.dtype:
            raise TypeError(f"queries {q.dtype} must be float32 or the keys' dtype {kk.dtype}")
    scales = key_scales.contiguous() if is_int8 else q  # dummy pointer when unused
    vmask = valid.contiguous().view(torch.uint8) if valid is not None else q
    bits = q.device.type == "cpu"  # only the interpreter runs on CPU tensors
    q_bits = bits and q.dtype == torch.bfloat16
    k_bits = bits and kk.dtype == torch.bfloat16
    if q_bits or k_bits:
        dot_f32 = True  # exact: bf16 products fit in f32, as on the tensor cores
    widen = dot_f32 and kk.dtype != torch.float32  # keys converted for an f32 dot
    meta, splits, rows_per_split = _config(B, M, d, k, dot_f32, widen, q.device)
    K_PAD = meta["K_PAD"]
    cand = torch.empty((B, splits, K_PAD), dtype=torch.int64, device=q.device)
    qk = q.view(torch.int16) if q_bits else q
    kk = kk.view(torch.int16) if k_bits else kk
    grid = (triton.cdiv(B, meta["BQ"]), splits)
    num_warps = 8 if meta["BQ"] * K_PAD >= 2048 or meta["BQ_DOT"] * meta["BLOCK_N"] >= 4096 else 4
    if widen and meta["BQ"] >= 32 and meta["BQ"] * K_PAD >= 4096:
        num_warps = 16  # widened keys, BQ=32 x K_PAD=128: 8 warps spilled 20 B, 16 none
    _mips_stage1[grid](qk, kk, scales, vmask, cand, B, M, d, rows_per_split, k,
                       IS_INT8=is_int8, HAS_VALID=valid is not None, DOT_F32=dot_f32,
                       Q_BF16_BITS=q_bits, K_BF16_BITS=k_bits,
                       num_warps=num_warps, **meta, **({"num_stages": 1} if widen else {}))
    flat = cand.view(B, splits * K_PAD)  # [B, splits * K_PAD]
    if splits * K_PAD == k:
        top = flat
    else:
        top = torch.topk(flat, k, dim=1, largest=True, sorted=True).values  # [B, k]
    return _unpack(top)
