"""Training helpers for PlugLM models: the retrieval warm-up (docs/design.md §1).

The search of a memory layer is trained only through ``cos(q, k_j)`` of the N entries it
retrieved. If the entry that would help is never among them, nothing teaches the query to
find it: the cold start. Two package options fix it together:

* ``PlugLMConfig.retrieval_init="aligned"`` (the default) starts the query side as a copy
  of the document side, so a fresh model retrieves by word overlap;
* ``RetrievalAlignment`` keeps that alignment while the lower layers move away from the
  embeddings it relies on: an in-batch contrastive loss that asks each sequence's query
  ``q`` to retrieve the document encoding of *its own text* among the batch's texts
  (the inverse-cloze warm start of retrieval-augmented LMs, without a second corpus).
  Measured here (``pluglm bench --quality``): without it, retrieval collapses within the
  first hundred steps and the model never learns to read the memory.

::

    align = RetrievalAlignment(model, weight=1.0)
    out = model(input_ids, attention_mask=mask, labels=labels)
    loss = out.loss + align.loss(input_ids, mask)   # after the forward: it reads its queries
    loss.backward()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RetrievalAlignment"]


class RetrievalAlignment:
    """In-batch query/key alignment loss for the memory layers of a PlugLM model.

    model: a PlugLM model (``memory_layers()`` and ``encode_memory``). weight: the factor of
    the returned loss. steps: apply it for the first ``steps`` calls only (None = always);
    later calls return a zero tensor without any extra work.

    ``loss(input_ids [B, T], attention_mask [B, T])`` must follow the model's training
    forward on the same batch: the queries that forward computed (captured by a hook on
    each memory layer's query BatchNorm) are scored against the keys
    ``encode_memory(input_ids, attention_mask)`` of the batch's own texts; the loss is the
    mean over memory layers of cross-entropy(q_b . k_c over c, target b), times ``weight``.
    Differentiable in the query path and in the document encoder. ``close()`` removes the
    hooks.
    """

    def __init__(self, model, weight: float = 1.0, steps: int | None = None):
        if not callable(getattr(model, "memory_layers", None)) or not callable(getattr(model, "encode_memory", None)):
            raise TypeError(f"model must be a PlugLM model (memory_layers(), encode_memory()), "
                            f"got {type(model).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"weight must be a float >= 0, got {weight!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be None or an int >= 0, got {steps!r}")
        self.model, self.weight, self.steps = model, float(weight), steps
        self.calls = 0
        self._queries: list[torch.Tensor] = []
        self._hooks = [layer.batch_norm.register_forward_hook(self._capture)
                       for layer in model.memory_layers()]
        if not self._hooks:
            raise ValueError("model has no memory layers (num_memory_layers=0)")

    def _capture(self, module, inputs, output):
        if self.active and torch.is_grad_enabled():
            self._queries.append(output)

    @property
    def active(self) -> bool:
        return self.weight > 0 and (self.steps is None or self.calls < self.steps)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        queries, self._queries = self._queries, []
        device = self.model.device
        if not self.active:
            self.calls += 1
            return torch.zeros((), device=device)
        self.calls += 1
        if len(queries) != len(self._hooks):
            raise RuntimeError(f"RetrievalAlignment.loss needs the model's training forward (grad "
                               f"enabled) on this batch first: captured {len(queries)} queries for "
                               f"{len(self._hooks)} memory layers")
        B = input_ids.shape[0]
        if any(q.shape[0] != B for q in queries):
            raise ValueError(f"input_ids has {B} sequences but the last forward had {queries[0].shape[0]}")
        keys, _ = self.model.encode_memory(input_ids, attention_mask)  # [B, key_dim]
        target = torch.arange(B, device=keys.device)
        total = sum(F.cross_entropy(q.float() @ keys.float().T, target) for q in queries)
        return self.weight * total / len(queries)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
