"""Attentive pooling module (docs/design.md §1) on top of ``pluglm_kernels.attentive_pool``.

``AttentivePool(hidden, pool_hidden=None)`` maps x [B, T, hidden] and a 0/1 padding mask
[B, T] to pooled [B, hidden]:
``s_t = w2 . tanh(W1 x_t + b1) + b2``, ``alpha = softmax over {t : mask_t = 1} of s``,
``pool = sum_t alpha_t x_t`` — computed max-subtracted, so unlike the published code's raw
``exp`` it does not overflow in fp16. A row with no token pools to zeros. Differentiable in
x and every parameter.
"""
from __future__ import annotations

import torch
from torch import nn

import pluglm_kernels


class AttentivePool(nn.Module):
    """Attentive pooling [B, T, hidden] -> [B, hidden].

    Parameters (published layout: ``att_fc1 = Linear(hidden, pool_hidden)``,
    ``att_fc2 = Linear(pool_hidden, 1)``):
      w1: [pool_hidden, hidden], b1: [pool_hidden], w2: [pool_hidden], b2: [1].
    ``pool_hidden`` defaults to ``hidden`` as in the published model.
    """

    def __init__(self, hidden: int, pool_hidden: int | None = None, *, init_std: float = 0.02,
                 backend: str = "auto"):
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
        return pluglm_kernels.attentive_pool(x, mask, self.w1, self.b1, self.w2, self.b2,
                                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, pool_hidden={self.pool_hidden}, backend={self.backend!r}"
