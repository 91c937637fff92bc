"""Attentive pooling module (docs/design.md §1) on top of ``pluglm_kernels.attentive_pool``.

``AttentivePool(hidden, pool_hidden=None)`` maps x [B, T, hidden] and a 0/1 padding mask
[B, T] to pooled [B, hidden]:
``s_t = w2 . tanh(W1 x_t + b1) + b2``, ``alpha = softmax over {t : mask_t = 1} of s``,
``pool = sum_t alpha_t x_t`` — computed max-subtracted, so unlike the published code's raw
``exp`` it does not overflow in fp16. A row with no token pools to zeros. Differentiable in
x and every parameter.

``denominator_eps=1e-8`` gives what the published code computes instead (its checkpoint was
trained with it): ``pool = sum_t e^{s_t} x_t / (sum_t e^{s_t} + 1e-8)`` over the unmasked
tokens, see :func:`attentive_pool_eps`. That form runs in PyTorch ops on every device (the
fused ``attentive_pool`` / ``encode_knowledge`` kernels compute the exact softmax only).
"""
from __future__ import annotations

import math

import torch
from torch import nn

import pluglm_kernels


def attentive_pool_eps(x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, eps: float) -> torch.Tensor:
    """The published pooling: ``sum_t e^{s_t} m_t x_t / (sum_t e^{s_t} m_t + eps)``.

    x [B, T, D]; mask [B, T] (nonzero = token); w1 [Hp, D]; b1 [Hp]; w2 [Hp]; b2 [1].
    Returns [B, D] in x's dtype, accumulated in float32 (float64 for float64 x).
    Numerator and denominator are scaled by ``e^{-max_t s_t}`` (the eps term becomes
    ``e^{ln eps - max}``): the same value wherever the published raw ``exp`` is finite, and no
    overflow where it is not. The shift is a constant to autograd, so every gradient is that
    of the published formula (b2's included, which the exact softmax would make zero).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must have shape [B, T, D], got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape [B, T] = {tuple(x.shape[:2])}, got "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    s = torch.tanh(xa @ w1.to(acc).T + b1.to(acc)) @ w2.to(acc).reshape(-1) \
        + b2.to(acc).reshape(())  # [B, T]
    keep = mask.to(device=x.device).ne(0)  # [B, T]
    s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(dim=1, keepdim=True) if s.shape[1] else s.new_zeros(s.shape[0], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # [B, 1]
    e = torch.exp(s - m)  # [B, T], 0 where masked
    denom = e.sum(dim=1, keepdim=True) + torch.exp(math.log(eps) - m)  # [B, 1]
    return ((e / denom)[..., None] * xa).sum(dim=1).to(x.dtype)


class AttentivePool(nn.Module):
    """Attentive pooling [B, T, hidden] -> [B, hidden].

    Parameters (published layout: ``att_fc1 = Linear(hidden, pool_hidden)``,
    ``att_fc2 = Linear(pool_hidden, 1)``):
      w1: [pool_hidden, hidden], b1: [pool_hidden], w2: [pool_hidden], b2: [1].
    ``pool_hidden`` defaults to ``hidden`` as in the published model.
    ``denominator_eps``: None (default) = exact softmax on the fused op; a float = the
    published ``sum(exp) + denominator_eps`` denominator (:func:`attentive_pool_eps`).
    """

    def __init__(self, hidden: int, pool_hidden: int | None = None, *, init_std: float = 0.02,
                 backend: str = "auto", denominator_eps: float | None = None):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        pool_hidden = hidden if pool_hidden is None else pool_hidden
        if not isinstance(pool_hidden, int) or pool_hidden < 1:
            raise ValueError(f"pool_hidden must be a positive int, got {pool_hidden!r}")
        self.hidden = hidden
        self.pool_hidden = pool_hidden
        self.init_std = init_std
        self.backend = backend
        if denominator_eps is not None and (isinstance(denominator_eps, bool) or not isinstance(
                denominator_eps, (int, float)) or not denominator_eps > 0):
            raise ValueError(f"denominator_eps must be None or a positive float, got {denominator_eps!r}")
        self.denominator_eps = denominator_eps
        self.w1 = nn.Parameter(torch.empty(pool_hidden, hidden))  # [Hp, D]
        self.b1 = nn.Parameter(torch.empty(pool_hidden))  # [Hp]
        self.w2 = nn.Parameter(torch.empty(pool_hidden))  # [Hp]
        self.b2 = nn.Parameter(torch.empty(1))  # [1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as the published AttentivePooler: N(0, 0.02) weights, zero biases.
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.zeros_(self.b1)
        nn.init.normal_(self.w2, std=self.init_std)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, hidden]; mask: [B, T] bool or 0/1 (None = every token). Returns [B, hidden]."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.denominator_eps is not None:
            return attentive_pool_eps(x, mask, self.w1, self.b1, self.w2, self.b2, self.denominator_eps)
        return pluglm_kernels.attentive_pool(x, mask, self.w1, self.b1, self.w2, self.b2,
                                             backend=self.backend)

    def extra_repr(self) -> str:
        eps = "" if self.denominator_eps is None else f", denominator_eps={self.denominator_eps}"
        return f"hidden={self.hidden}, pool_hidden={self.pool_hidden}, backend={self.backend!r}{eps}"
