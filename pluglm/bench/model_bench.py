"""Sweep cases above the single ops: the gather-fused attention, one full memory layer and a
full PlugLM forward, each against the eager composition the published code uses
(``torch.topk(q @ K.T)`` search, ``index_select`` gather, separate projections and bmm)."""
from __future__ import annotations

import math

import torch

import pluglm_kernels as pk

from .common import Row, SweepConfig, measure, published_attention


class _TorchTopkMemory:
    """The published retrieval: a dense [B, M] score matrix, then torch.topk."""

    def __init__(self, keys, values):
        self.keys, self.values, self.version = keys, values, 0

    def search(self, q, k):
        s, i = torch.topk(q.to(self.keys.dtype) @ self.keys.T, k, dim=1)
        return s.float(), i

    def fetch(self, idx):
        flat = idx.reshape(-1)
        kd, vd = self.keys.shape[1], self.values.shape[1]
        return (self.keys.index_select(0, flat).view(*idx.shape, kd),
                self.values.index_select(0, flat).view(*idx.shape, vd))

    def fetch_keys(self, idx):
        return self.keys.index_select(0, idx.reshape(-1)).view(*idx.shape, self.keys.shape[1])


def bench_gather_attention(cfg: SweepConfig, progress=None, task=None) -> list[Row]:
    """gather_knowledge_attention from per-entry tables vs index_select + the published bmm path."""
    rows: list[Row] = []
    dev = torch.device(cfg.device)
    H, Dh = cfg.heads, cfg.head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    M = max(cfg.search_M)
    M = min(M, 1_000_000)
    table_k = torch.randn(M, H, Dh, device=dev, dtype=dtype)
    table_v = torch.randn(M, H, Dh, device=dev, dtype=dtype)
    for B, T, N in cfg.attn_shapes:
        q = torch.randn(B, T, H, Dh, device=dev, dtype=dtype) / math.sqrt(Dh)
        idx = torch.randint(0, M, (B, N), device=dev)
        bias = torch.rand(B, N, device=dev) * 2 - 1
        beta = torch.ones(H, device=dev)

        def fused():
            with torch.no_grad():
                pk.gather_knowledge_attention(q, table_k, table_v, idx, bias, beta)

        def published():
            with torch.no_grad():
                flat = idx.reshape(-1)
                k = table_k.index_select(0, flat).view(B, N, H, Dh)
                v = table_v.index_select(0, flat).view(B, N, H, Dh)
                published_attention(q, k, v, bias, beta)

        for label, fn in (("pluglm[auto] gather-fused", fused), ("index_select + bmm (published)", published)):
            t, peak = measure(fn, dev, cfg.budget_s)
            rows.append(Row("gather+attention forward", label,
                            dict(M=M, B=B, T=T, N=N, H=H, Dh=Dh, dtype=str(dtype).replace("torch.", "")),
                            cfg.device, t.median_ms, t.p20_ms, t.p80_ms, t.repeats,
                            B * T / (t.median_ms * 1e-3), "tokens/s", peak))
            if progress is not None:
                progress.advance(task)
    return rows


def _layer_and_memories(M, d, H, key_dim, dev, dtype):
    from pluglm.nn import MemoryLayer, TensorMemory

    layer = MemoryLayer(hidden_size=d, num_heads=H, key_dim=key_dim, memory_k=5, memory_ffn_dim=d,
                        dropout=0.0).to(dev).eval()
    keys = torch.randn(M, key_dim, device=dev, dtype=dtype)
    values = torch.randn(M, d, device=dev, dtype=dtype)
    ours = TensorMemory(keys, values)
    published = _TorchTopkMemory(keys, values)
    return layer, ours, published


def memory_layer_sizes(cfg: SweepConfig) -> tuple:
    return tuple(M for M in cfg.search_M if M <= (1_000_000 if cfg.quick else 4_000_000))


def bench_memory_layer(cfg: SweepConfig, progress=None, task=None) -> list[Row]:
    """One MemoryLayer forward (eval) over M: our kernels vs the published eager composition."""
    rows: list[Row] = []
    dev = torch.device(cfg.device)
    d, H, key_dim = 768, 12, 128
    B, T = (8, 128)
    for M in memory_layer_sizes(cfg):
        layer, ours, published = _layer_and_memories(M, d, H, key_dim, dev, torch.float32)
        A = torch.randn(B, T, d, device=dev)
        mask = torch.ones(B, T, device=dev)
        cases = (("pluglm MemoryLayer[auto]", ours, "auto"),
                 ("published (topk + index_select + bmm)", published, "reference"))
        for label, mem, backend in cases:
            for m in layer.modules():
                if hasattr(m, "backend"):
                    m.backend = backend

            def fn(mem=mem, layer=layer):
                with torch.no_grad():
                    layer(A, mask, mem)

            t, peak = measure(fn, dev, cfg.budget_s)
            rows.append(Row("memory layer forward", label, dict(M=M, B=B, T=T, d=d, H=H, N=5),
                            cfg.device, t.median_ms, t.p20_ms, t.p80_ms, t.repeats,
                            B * T / (t.median_ms * 1e-3), "tokens/s", peak))
            if progress is not None:
                progress.advance(task)
        del layer, ours, published
    return rows


def model_sizes(cfg: SweepConfig) -> tuple:
    return tuple(M for M in cfg.search_M if M <= (100_000 if cfg.quick else 1_000_000))


def bench_model_forward(cfg: SweepConfig, progress=None, task=None) -> list[Row]:
    """A full PlugLM forward in BERT-base geometry (12 layers, d=768, top layer a memory layer)
    over M; our search and kernels vs the same model searching with torch.topk(q @ K.T)."""
    from pluglm.configuration_pluglm import PlugLMConfig
    from pluglm.modeling_pluglm import PlugLMModel

    rows: list[Row] = []
    dev = torch.device(cfg.device)
    config = PlugLMConfig()  # BERT-base geometry with one memory layer
    model = PlugLMModel(config).to(dev).eval()
    B, T = (1, 128) if cfg.quick else (8, 128)
    ids = torch.randint(0, config.vocab_size, (B, T), device=dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    for M in model_sizes(cfg):
        keys = torch.randn(M, config.key_dim, device=dev)
        values = torch.randn(M, config.hidden_size, device=dev)
        from pluglm.nn import TensorMemory

        for label, mem in (("pluglm (mips_topk + fused attention)", TensorMemory(keys, values)),
                           ("torch.topk(q@K.T) search", _TorchTopkMemory(keys, values))):
            model.set_memory(mem)

            def fn():
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)

            t, peak = measure(fn, dev, cfg.budget_s)
            rows.append(Row("PlugLM forward (BERT-base)", label, dict(M=M, B=B, T=T), cfg.device,
                            t.median_ms, t.p20_ms, t.p80_ms, t.repeats, B * T / (t.median_ms * 1e-3),
                            "tokens/s", peak))
            if progress is not None:
                progress.advance(task)
        del keys, values
    model.set_memory(None) if hasattr(model, "set_memory") else None
    return rows
