"""The public ops, registered as ``torch.ops.pluglm.<name>`` custom ops.

Each op takes a ``backend`` argument and dispatches, at run time, to the native C++/CUDA
kernels (``torch.ops.pluglm._C_*``), the Triton launchers, or the pure-PyTorch reference.
Fake implementations give output shapes for torch.compile / opcheck; autograd rules call a
companion ``*_backward`` op that dispatches the same way.

Arguments are validated once, by the wrappers in ``pluglm_kernels.functional``, before
they get here; these bodies only pick a backend (a cached lookup) and call it. An op
called directly (``torch.ops.pluglm.<name>``) still refuses bad input through the kernel
it reaches: the native ops' ``TORCH_CHECK`` guards (``RuntimeError``), the Triton
launchers' checks, or the reference's own errors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backends, reference

# ------------------------------------------------------------------------------ mips_topk


@torch.library.custom_op("pluglm::mips_topk", mutates_args=())
def mips_topk_op(queries: Tensor, keys: Tensor, k: int, key_scales: Optional[Tensor],
                 valid: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    be = _backends.resolve("mips_topk", backend, queries.device)
    if be in ("cpu", "cuda"):
        return torch.ops.pluglm._C_mips_topk(queries, keys, k, key_scales, valid)
    if be == "triton":
        from .triton.mips_topk import mips_topk_triton

        return mips_topk_triton(queries, keys, k, key_scales, valid)
    return reference.mips_topk(queries, keys, k, key_scales, valid)


@mips_topk_op.register_fake
def _(queries, keys, k, key_scales, valid, backend):
    B = queries.shape[0]
    return (queries.new_empty((B, k), dtype=torch.float32),
            queries.new_empty((B, k), dtype=torch.int64))


# -------------------------------------------------------------------- knowledge_attention


# Shapes the fused attention kernels take; "auto" falls back to the reference outside them
# (a named backend raises in its own argument checks instead).
_KERNEL_MAX_N = 256
_CUDA_HEAD_DIMS = (32, 64, 128)


def _attention_backend(op: str, backend: str, q: Tensor, N: int) -> str:
    be = _backends.resolve(op, backend, q.device)
    if backend != "auto" or be == "reference":
        return be
    if N > _KERNEL_MAX_N:
        return "reference"
    if be == "cuda" and q.shape[-1] not in _CUDA_HEAD_DIMS:
        ok, _ = _backends.availability(op, "triton", q.device.type)
        return "triton" if ok else "reference"
    return be


def _ref_ka_backward(grad_out, q, k, v, bias, beta, dropout_p, seed):
    def f(q_, k_, v_, bias_, beta_):
        return reference.knowledge_attention(q_, k_, v_, bias_, beta_, dropout_p, seed)[0]

    _, vjp = torch.func.vjp(f, q, k, v, bias, beta)
    return tuple(g.contiguous() for g in vjp(grad_out))


@torch.library.custom_op("pluglm::knowledge_attention", mutates_args=())
def knowledge_attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, beta: Tensor,
                           dropout_p: float, seed: int, backend: str) -> tuple[Tensor, Tensor]:
    be = _attention_backend("knowledge_attention", backend, q, k.shape[1])
    if be in ("cpu", "cuda"):
        return torch.ops.pluglm._C_knowledge_attention_fwd(q, k, v, bias, beta, dropout_p, seed)
    if be == "triton":
        from .triton.knowledge_attention import knowledge_attention_fwd

        return knowledge_attention_fwd(q, k, v, bias, beta, dropout_p, seed)
    return reference.knowledge_attention(q, k, v, bias, beta, dropout_p, seed)


@knowledge_attention_op.register_fake
def _(q, k, v, bias, beta, dropout_p, seed, backend):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, T, H), dtype=torch.float32)


@torch.library.custom_op("pluglm::knowledge_attention_backward", mutates_args=())
def knowledge_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, beta: Tensor, out: Tensor,
    lse: Tensor, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    be = _attention_backend("knowledge_attention", backend, q, k.shape[1])
    grad_out = grad_out.contiguous()
    if be in ("cpu", "cuda"):
        return torch.ops.pluglm._C_knowledge_attention_bwd(grad_out, q, k, v, bias, beta, out,
                                                           lse, dropout_p, seed)
    if be == "triton":
        from .triton.knowledge_attention import knowledge_attention_bwd

        return knowledge_attention_bwd(grad_out, q, k, v, bias, beta, out, lse, dropout_p, seed)
    return _ref_ka_backward(grad_out, q, k, v, bias, beta, dropout_p, seed)


@knowledge_attention_backward_op.register_fake
def _(grad_out, q, k, v, bias, beta, out, lse, dropout_p, seed, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias),
            torch.empty_like(beta))


def _ka_setup(ctx, inputs, output):
    q, k, v, bias, beta, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, beta, out, lse)
    ctx.dropout_p, ctx.seed, ctx.backend = dropout_p, seed, backend
    ctx.mark_non_differentiable(lse)


def _ka_backward(ctx, grad_out, grad_lse):
    q, k, v, bias, beta, out, lse = ctx.saved_tensors
    grads = knowledge_attention_backward_op(grad_out, q, k, v, bias, beta, out, lse,
                                            ctx.dropout_p, ctx.seed, ctx.backend)
    return (*grads, None, None, None)


knowledge_attention_op.register_autograd(_ka_backward, setup_context=_ka_setup)


# ------------------------------------------------------------- gather_knowledge_attention


@torch.library.custom_op("pluglm::gather_knowledge_attention", mutates_args=())
def gather_knowledge_attention_op(q: Tensor, table_k: Tensor, table_v: Tensor, indices: Tensor,
                                  bias: Tensor, beta: Tensor, dropout_p: float, seed: int,
                                  backend: str) -> tuple[Tensor, Tensor]:
    be = _attention_backend("gather_knowledge_attention", backend, q, indices.shape[1])
    if be in ("cpu", "cuda"):
        return torch.ops.pluglm._C_gather_knowledge_attention_fwd(
            q, table_k, table_v, indices, bias, beta, dropout_p, seed)
    if be == "triton":
        from .triton.knowledge_attention import gather_knowledge_attention_fwd

        return gather_knowledge_attention_fwd(q, table_k, table_v, indices, bias, beta, dropout_p,
                                              seed)
    return reference.gather_knowledge_attention(q, table_k, table_v, indices, bias, beta,
                                                dropout_p, seed)


@gather_knowledge_attention_op.register_fake
def _(q, table_k, table_v, indices, bias, beta, dropout_p, seed, backend):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, T, H), dtype=torch.float32)


@torch.library.custom_op("pluglm::gather_knowledge_attention_backward", mutates_args=())
def gather_knowledge_attention_backward_op(
    grad_out: Tensor, q: Tensor, table_k: Tensor, table_v: Tensor, indices: Tensor, bias: Tensor,
    beta: Tensor, out: Tensor, lse: Tensor, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk_rows [B, N, H, Dh], dv_rows [B, N, H, Dh], dbias, dbeta)."""
    be = _attention_backend("gather_knowledge_attention", backend, q, indices.shape[1])
    grad_out = grad_out.contiguous()
    if be in ("cpu", "cuda"):
        return torch.ops.pluglm._C_gather_knowledge_attention_bwd(
            grad_out, q, table_k, table_v, indices, bias, beta, out, lse, dropout_p, seed)
    if be == "triton":
        from .triton.knowledge_attention import gather_knowledge_attention_bwd

        return gather_knowledge_attention_bwd(grad_out, q, table_k, table_v, indices, bias, beta,
                                              out, lse, dropout_p, seed)
    return _ref_ka_backward(grad_out, q, table_k[indices], table_v[indices], bias, beta,
                            dropout_p, seed)


@gather_knowledge_attention_backward_op.register_fake
def _(grad_out, q, table_k, table_v, indices, bias, beta, out, lse, dropout_p, seed, backend):
    B, N = indices.shape
    rows = (B, N) + tuple(table_k.shape[1:])
    return (torch.empty_like(q), table_k.new_empty(rows), table_v.new_empty(rows),
            torch.empty_like(bias), torch.empty_like(beta))


def _gka_setup(ctx, inputs, output):
    q, table_k, table_v, indices, bias, beta, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, table_k, table_v, indices, bias, beta, out, lse)
    ctx.dropout_p, ctx.seed, ctx.backend = dropout_p, seed, backend
    ctx.mark_non_differentiable(lse)


def _gka_backward(ctx, grad_out, grad_lse):
    q, table_k, table_v, indices, bias, beta, out, lse = ctx.saved_tensors
    dq, dk_rows, dv_rows, dbias, dbeta = gather_knowledge_attention_backward_op(
        grad_out, q, table_k, table_v, indices, bias, beta, out, lse, ctx.dropout_p, ctx.seed,
        ctx.backend)
    flat = indices.reshape(-1)
    dtk = dtv = None
    if ctx.needs_input_grad[1]:  # repeated indices accumulate through index_add
        dtk = torch.zeros_like(table_k).index_add_(0, flat, dk_rows.flatten(0, 1).to(table_k.dtype))
    if ctx.needs_input_grad[2]:
        dtv = torch.zeros_like(table_v).index_add_(0, flat, dv_rows.flatten(0, 1).to(table_v.dtype))
    return dq, dtk, dtv, None, dbias, dbeta, None, None, None


gather_knowledge_attention_op.register_autograd(_gka_backward, setup_context=_gka_setup)


# --------------------------------------------------------------------------- attentive_pool
#
# The pooler's W1 product stays a matmul, u = x W1^T + b1 [B, T, Hp] in x's dtype;
# everything around it is fused: the forward kernel does tanh, the w2 product, the masked
# max-subtracted softmax and the weighted sum; the backward kernel gives dx_direct = alpha g
# and du, and dW1 = du^T x, db1 = sum du, dx += du W1 are matmuls again. The backward
# recomputes u and alpha instead of keeping them alive between forward and backward.


def _resolve_kernel(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    # The kernels take float32/float16/bfloat16; "auto" sends float64 to the reference.
    if backend == "auto" and dtype == torch.float64:
        return "reference"
    return _backends.resolve(op, backend, device)


def _kernels(be: str):
    """(embed_layernorm_fwd, embed_layernorm_bwd, attentive_pool_fwd, attentive_pool_bwd)."""
    if be in ("cpu", "cuda"):
        o = torch.ops.pluglm
        return (o._C_embed_layernorm_fwd, o._C_embed_layernorm_bwd, o._C_attentive_pool_fwd,
                o._C_attentive_pool_bwd)
    from .triton import encode_knowledge as tek

    return (tek.embed_layernorm_fwd, tek.embed_layernorm_bwd, tek.attentive_pool_fwd,
            tek.attentive_pool_bwd)


def _no_autocast(x: Tensor):
    # The kernels fix the matmul dtype to x's; an enclosing autocast must not change it.
    return torch.autocast(x.device.type, enabled=False)


def _pooler_u(x: Tensor, w1: Tensor, b1: Tensor) -> Tensor:
    B, T, D = x.shape
    with _no_autocast(x):
        u = torch.addmm(b1.to(x.dtype), x.reshape(B * T, D), w1.to(x.dtype).t())
    return u.view(B, T, w1.shape[0])  # [B, T, Hp]


def _pool_forward(kern, x, mask, w1, b1, w2, b2):
    """(pooled [B, D], u [B, T, Hp], alpha [B, T] f32)."""
    u = _pooler_u(x, w1, b1)
    pooled, alpha = kern[2](x, mask, u, w2, b2)
    return pooled, u, alpha


def _pool_backward(kern, grad, x, mask, w1, b1, w2, b2, u, alpha):
    """(dx, dw1, db1, dw2, db2), each in the dtype of its input."""
    B, T, D = x.shape
    Hp = u.shape[2]
    dx_direct, du, dw2, db2 = kern[3](grad, x, mask, u, w2, alpha)
    du2 = du.reshape(B * T, Hp)
    with _no_autocast(x):
        dx = torch.addmm(dx_direct.reshape(B * T, D), du2, w1.to(x.dtype)).view(B, T, D)
        dw1 = (du2.t() @ x.reshape(B * T, D)).to(w1.dtype)
    db1 = du2.sum(0, dtype=torch.float32).to(b1.dtype)
    return (dx, dw1, db1, dw2.to(w2.dtype).reshape(w2.shape),
            db2.to(b2.dtype).reshape(b2.shape))


@torch.library.custom_op("pluglm::attentive_pool", mutates_args=())
def attentive_pool_op(x: Tensor, mask: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      backend: str) -> Tensor:
    be = _resolve_kernel("attentive_pool", backend, x.device, x.dtype)
    if be == "reference":
        return reference.attentive_pool(x, mask, w1, b1, w2, b2)
    return _pool_forward(_kernels(be), x, mask, w1, b1, w2, b2)[0]


@attentive_pool_op.register_fake
def _(x, mask, w1, b1, w2, b2, backend):
    return x.new_empty((x.shape[0], x.shape[2]))


@torch.library.custom_op("pluglm::attentive_pool_backward", mutates_args=())
def attentive_pool_backward_op(grad: Tensor, x: Tensor, mask: Tensor, w1: Tensor, b1: Tensor,
                               w2: Tensor, b2: Tensor, backend: str
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    be = _resolve_kernel("attentive_pool", backend, x.device, x.dtype)
    if be == "reference":
        _, vjp = torch.func.vjp(lambda *a: reference.attentive_pool(a[0], mask, *a[1:]),
                                x, w1, b1, w2, b2)
        return tuple(g.contiguous() for g in vjp(grad))
    kern = _kernels(be)
    _, u, alpha = _pool_forward(kern, x, mask, w1, b1, w2, b2)
    return _pool_backward(kern, grad, x, mask, w1, b1, w2, b2, u, alpha)


@attentive_pool_backward_op.register_fake
def _(grad, x, mask, w1, b1, w2, b2, backend):
    return tuple(torch.empty_like(t) for t in (x, w1, b1, w2, b2))


def _ap_setup(ctx, inputs, output):
    x, mask, w1, b1, w2, b2, backend = inputs
    ctx.save_for_backward(x, mask, w1, b1, w2, b2)
    ctx.backend = backend


def _ap_backward(ctx, grad):
    x, mask, w1, b1, w2, b2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = attentive_pool_backward_op(grad.contiguous(), x, mask, w1, b1, w2,
                                                        b2, ctx.backend)
    return dx, None, dw1, db1, dw2, db2, None


attentive_pool_op.register_autograd(_ap_backward, setup_context=_ap_setup)


# ------------------------------------------------------------------------- encode_knowledge
#
# One fused kernel gathers word + position + token-type rows and applies the LayerNorm
# (h [E, T, D], plus mean/rstd per token), then the attentive pooling above. The backward
# recomputes h, u and alpha (nothing [E, T, D]-sized is kept between the passes), runs the
# pooling backward and the fused LayerNorm backward that scatters into the three tables
# (deterministic on CPU; float32 atomics on GPU).

_ENC_PARAMS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "ln_weight",
               "ln_bias", "w1", "b1", "w2", "b2")


@torch.library.custom_op("pluglm::encode_knowledge", mutates_args=())
def encode_knowledge_op(token_ids: Tensor, attention_mask: Tensor, word_embeddings: Tensor,
                        position_embeddings: Tensor, token_type_embeddings: Tensor,
                        ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                        b2: Tensor, token_type_ids: Optional[Tensor], eps: float,
                        position_offset: int, backend: str) -> Tensor:
    be = _resolve_kernel("encode_knowledge", backend, token_ids.device, word_embeddings.dtype)
    if be == "reference":
        return reference.encode_knowledge(token_ids, attention_mask, word_embeddings,
                                          position_embeddings, token_type_embeddings, ln_weight,
                                          ln_bias, w1, b1, w2, b2, token_type_ids, eps,
                                          position_offset)
    kern = _kernels(be)
    h, _, _ = kern[0](token_ids, token_type_ids, word_embeddings, position_embeddings,
                      token_type_embeddings, ln_weight, ln_bias, eps, position_offset)
    return _pool_forward(kern, h, attention_mask, w1, b1, w2, b2)[0]


@encode_knowledge_op.register_fake
def _(token_ids, attention_mask, word_embeddings, *rest):
    return word_embeddings.new_empty((token_ids.shape[0], word_embeddings.shape[1]))


@torch.library.custom_op("pluglm::encode_knowledge_backward", mutates_args=())
def encode_knowledge_backward_op(
    grad: Tensor, token_ids: Tensor, attention_mask: Tensor, word_embeddings: Tensor,
    position_embeddings: Tensor, token_type_embeddings: Tensor, ln_weight: Tensor,
    ln_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    token_type_ids: Optional[Tensor], eps: float, position_offset: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    be = _resolve_kernel("encode_knowledge", backend, token_ids.device, word_embeddings.dtype)
    params = (word_embeddings, position_embeddings, token_type_embeddings, ln_weight, ln_bias,
              w1, b1, w2, b2)
    if be == "reference":
        def f(*params):
            return reference.encode_knowledge(token_ids, attention_mask, *params,
                                              token_type_ids=token_type_ids, eps=eps,
                                              position_offset=position_offset)

        _, vjp = torch.func.vjp(f, *params)
        return tuple(g.contiguous() for g in vjp(grad))
    kern = _kernels(be)
    h, mean, rstd = kern[0](token_ids, token_type_ids, word_embeddings, position_embeddings,
                            token_type_embeddings, ln_weight, ln_bias, eps, position_offset)
    _, u, alpha = _pool_forward(kern, h, attention_mask, w1, b1, w2, b2)
    dh, dw1, db1, dw2, db2 = _pool_backward(kern, grad, h, attention_mask, w1, b1, w2, b2, u,
                                            alpha)
    del u, h
    dword, dpos, dtype, dlnw, dlnb = kern[1](dh, token_ids, token_type_ids, word_embeddings,
                                             position_embeddings, token_type_embeddings,
                                             ln_weight, mean, rstd, position_offset)
    return (dword, dpos, dtype, dlnw.to(ln_weight.dtype), dlnb.to(ln_bias.dtype), dw1, db1, dw2,
            db2)


@encode_knowledge_backward_op.register_fake
def _(grad, token_ids, attention_mask, *rest):
    return tuple(torch.empty_like(t) for t in rest[:9])


def _ek_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:12])  # token_type_ids (index 11) may be None
    ctx.eps, ctx.position_offset, ctx.backend = inputs[12], inputs[13], inputs[14]


def _ek_backward(ctx, grad):
    grads = encode_knowledge_backward_op(grad.contiguous(), *ctx.saved_tensors, ctx.eps,
                                         ctx.position_offset, ctx.backend)
    return (None, None, *grads, None, None, None, None)


encode_knowledge_op.register_autograd(_ek_backward, setup_context=_ek_setup)
