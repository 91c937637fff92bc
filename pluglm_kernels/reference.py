"""Pure-PyTorch references for every pluglm op: the test oracles and the fallback of last
resort. Written to be obviously right (docs/design.md §1, §3), not fast. Call them with float64
tensors to get the oracle; with lower precisions they accumulate in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of keys scored at once by the reference top-k: bounds its extra memory to
# B x _MIPS_BLOCK scores instead of B x M.
_MIPS_BLOCK = 1 << 16


def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def dequantize_keys(keys: torch.Tensor, key_scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """keys [M, d] (int8 with key_scales [M], or floating) -> [M, d] in ``dtype``."""
    if keys.dtype == torch.int8:
        return keys.to(dtype) * key_scales.to(dtype)[:, None]
    return keys.to(dtype)


def gather_rows(table, indices):
    """table [M, ...] rows ``indices`` [...] -> [..., ...] on indices' device."""
    idx = indices.reshape(-1).to(table.device)
    rows = table.index_select(0, idx).to(indices.device)
    return rows.view(*indices.shape, *table.shape[1:])


def mips_topk(queries, keys, k, key_scales=None, valid=None):
    """Exact top-k inner product, scored in float64 block by block.

    queries [B, d]; keys [M, d]; key_scales [M] for int8 keys; valid [M] bool.
    Returns scores [B, k] float32, descending, and indices [B, k] int64; equal scores are
    ordered by lower index first (a stable sort over blocks taken in index order). With
    fewer than k valid rows the tail is score -inf, index -1.
    """
    B, d = queries.shape
    M = keys.shape[0]
    q = queries.to(torch.float64)
    best_s = q.new_empty(B, 0)
    best_i = torch.empty(B, 0, dtype=torch.int64, device=queries.device)
    # Each score is an elementwise product summed over d (not a BLAS matmul, whose blocking can
    # round two identical rows differently), so exact copies of a key tie exactly.
    block = max(1, min(_MIPS_BLOCK, (1 << 24) // max(1, B * d)))
    for start in range(0, M, block):
        stop = min(M, start + block)
        kb = dequantize_keys(keys[start:stop], None if key_scales is None else key_scales[start:stop],
                             torch.float64)
        s = (q[:, None, :] * kb[None, :, :]).sum(-1)  # [B, blk]
        if valid is not None:
            s = s.masked_fill(~valid[start:stop].to(torch.bool)[None, :], float("-inf"))
        s = s.masked_fill(torch.isnan(s), float("-inf"))  # a NaN key row is never returned
        idx = torch.arange(start, stop, device=queries.device).expand(B, -1)
        cat_s = torch.cat([best_s, s], dim=1)
        cat_i = torch.cat([best_i, idx], dim=1)
        order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s = cat_s.gather(1, order)
        best_i = cat_i.gather(1, order)
    # fewer than k valid rows: the tail is (-inf, -1), as in every kernel
    best_i = best_i.masked_fill(best_s == float("-inf"), -1)
    return best_s.to(torch.float32).contiguous(), best_i.contiguous()


# ---------------------------------------------------------------------------------------
# Counter-based dropout shared by every backend: Philox-4x32-10 keyed by `seed`, counter =
# the flat (b, t, h, j) position of the attention probability. Element kept iff the first
# 32-bit output is >= floor(p * 2^32); kept probabilities are scaled by 1 / (1 - p).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, without int64 overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _U32, lo & _U32


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First 32-bit word of Philox-4x32-10(key=seed, counter=(offset_lo, offset_hi, 0, 0)).

    offsets: int64 tensor of non-negative counters. Returns int64 values in [0, 2^32).
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0 = offsets & _U32
    c1 = (offsets >> 32) & _U32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return c0


def dropout_threshold(p: float) -> int:
    return min(int(p * 4294967296.0), 4294967295)


def dropout_keep_mask(seed: int, p: float, shape: tuple[int, int, int, int], device) -> torch.Tensor:
    """Bool keep-mask of shape [B, T, H, N] for attention dropout with probability p."""
    n = 1
    for s in shape:
        n *= s
    offsets = torch.arange(n, dtype=torch.int64, device=device).view(shape)
    return philox_uint32(seed, offsets) >= dropout_threshold(p)


def knowledge_attention(q, k, v, bias, beta, dropout_p=0.0, seed=0):
    """out[b,t,h] = sum_j P[b,t,h,j] v[b,j,h], P = dropout(softmax_j(q.k + beta_h bias[b,j])).

    q [B, T, H, Dh] (pre-scaled by 1/sqrt(Dh)); k, v [B, N, H, Dh]; bias [B, N]; beta [H].
    Returns out [B, T, H, Dh] in q's dtype and lse [B, T, H] float32 (log-sum-exp of the
    logits before dropout). Accumulates in float32 (float64 for float64 inputs).
    """
    acc = _acc_dtype(q, k, v, bias, beta)
    logits = torch.einsum("bthd,bjhd->bthj", q.to(acc), k.to(acc))
    logits = logits + beta.to(acc)[None, None, :, None] * bias.to(acc)[:, None, None, :]
    lse = torch.logsumexp(logits, dim=-1)  # [B, T, H]
    p = torch.exp(logits - lse[..., None])
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, dropout_p, tuple(p.shape), p.device)
        p = p * keep / (1.0 - dropout_p)
    out = torch.einsum("bthj,bjhd->bthd", p, v.to(acc))
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


def gather_knowledge_attention(q, table_k, table_v, indices, bias, beta, dropout_p=0.0, seed=0):
    """knowledge_attention on rows gathered by index: k = table_k[indices], v = table_v[indices].

    table_k, table_v [M, H, Dh]; indices [B, N] int64.
    """
    return knowledge_attention(q, table_k[indices], table_v[indices], bias, beta, dropout_p, seed)


def attentive_pool(x, mask, w1, b1, w2, b2):
    """pool = sum_t alpha_t x_t, alpha = softmax over {t: mask_t = 1} of w2.tanh(W1 x_t + b1) + b2.

    x [B, T, D]; mask [B, T] (nonzero = token); w1 [Hp, D]; b1 [Hp]; w2 [Hp]; b2 [] or [1].
    Max-subtracted (stable in fp16). A row with no token pools to zeros. Returns [B, D] in
    x's dtype.
    """
    if x.shape[1] == 0:  # no tokens at all: every row pools to zeros, as in the kernels
        return x.new_zeros(x.shape[0], x.shape[2])
    acc = _acc_dtype(x, w1)
    xa = x.to(acc)
    s = torch.tanh(xa @ w1.to(acc).T + b1.to(acc)) @ w2.to(acc).reshape(-1) + b2.to(acc).reshape(())
    keep = mask.to(torch.bool)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.max(dim=1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * keep
    denom = e.sum(dim=1, keepdim=True)
    alpha = e / denom.clamp_min(torch.finfo(acc).tiny)
    return (alpha[..., None] * xa).sum(dim=1).to(x.dtype).contiguous()


def embed(token_ids, word_embeddings, position_embeddings, token_type_embeddings, ln_weight,
          ln_bias, token_type_ids=None, eps=1e-12, position_offset=0):
    """BERT-style embeddings: LayerNorm(word[id] + position[t + offset] + token_type[type]).

    token_ids [E, T] int; tables [V, D], [P, D], [Tt, D]. Returns [E, T, D].
    """
    E, T = token_ids.shape
    acc = _acc_dtype(word_embeddings)
    pos = torch.arange(position_offset, position_offset + T, device=token_ids.device)
    tt = torch.zeros_like(token_ids, dtype=torch.long) if token_type_ids is None else token_type_ids.long()
    h = (word_embeddings[token_ids.long()].to(acc) + position_embeddings[pos].to(acc)[None]
         + token_type_embeddings[tt].to(acc))
    h = F.layer_norm(h, (h.shape[-1],), ln_weight.to(acc), ln_bias.to(acc), eps)
    return h.to(word_embeddings.dtype)


def encode_knowledge(token_ids, attention_mask, word_embeddings, position_embeddings,
                     token_type_embeddings, ln_weight, ln_bias, w1, b1, w2, b2,
                     token_type_ids=None, eps=1e-12, position_offset=0):
    """Memory-entry encoder: attentive_pool(embed(token_ids), attention_mask). Returns [E, D]."""
    h = embed(token_ids, word_embeddings, position_embeddings, token_type_embeddings, ln_weight,
              ln_bias, token_type_ids, eps, position_offset)
    return attentive_pool(h, attention_mask, w1, b1, w2, b2)


def encode_knowledge_factored(token_ids, attention_mask, word_embeddings, position_embeddings,
                              token_type_embeddings, ln_weight, ln_bias, tables, w2, b2,
                              token_type_ids=None, eps=1e-12, position_offset=0):
    """encode_knowledge through precomputed pooler tables (functional.encoder_tables):
    u_t = (word_u[id] + pos_u[p] + type_u[tt] - mean_t gamma_u) rstd_t + bias_u and
    pooled = ln_weight * sum_t alpha_t (z_t - mean_t) rstd_t + ln_bias. Returns [E, D]."""
    E, T = token_ids.shape
    acc = _acc_dtype(word_embeddings, tables.word_u)
    ids = token_ids.long()
    pos = torch.arange(position_offset, position_offset + T, device=token_ids.device)
    tt = torch.zeros_like(ids) if token_type_ids is None else token_type_ids.long()
    z = (word_embeddings[ids].to(acc) + position_embeddings[pos].to(acc)[None]
         + token_type_embeddings[tt].to(acc))  # [E, T, D]
    mu = z.mean(-1, keepdim=True)
    rs = torch.rsqrt((z - mu).square().mean(-1, keepdim=True) + eps)
    u = ((tables.word_u[ids].to(acc) + tables.pos_u[pos].to(acc)[None] + tables.type_u[tt].to(acc)
          - mu * tables.gamma_u.to(acc)) * rs + tables.bias_u.to(acc))  # [E, T, Hp]
    s = torch.tanh(u) @ w2.to(acc).reshape(-1) + b2.to(acc).reshape(())
    keep = attention_mask.to(torch.bool)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.max(dim=1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * keep
    alpha = e / e.sum(dim=1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    pooled = ln_weight.to(acc) * (alpha[..., None] * (z - mu) * rs).sum(1) + ln_bias.to(acc)
    pooled = torch.where(keep.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
    return pooled.to(word_embeddings.dtype).contiguous()
