"""Masked-LM pretraining of a PlugLM-style model with a plug-in knowledge memory.

Two models, same loop:
  --model pluglm  ``pluglm.PlugLMForMaskedLM`` (the published architecture, docs/design.md §1);
  --model bert    a Hugging Face ``BertForMaskedLM`` turned into one with ``apply_pluglm``
                  (top layer's FFN -> memory layer; entry encoder = ``model.pluglm_encoder``).
  --model auto    pluglm when ``pluglm.modeling_pluglm`` imports, else bert (default).

Training uses stale keys for the search and fresh keys for the gradient: the memory's
stored keys are searched, and the retrieved entries are re-encoded with the live encoder
inside the forward (the model does this for a ``KnowledgeMemory``). Every
``--refresh-interval`` optimizer steps all keys are re-encoded, synchronously, by
``SyncKeyRefresher.on_step(step)``, or with ``--async-refresh`` by
``pluglm.AsyncKeyRefresher`` (re-encodes in the background while training goes on, swaps the
new keys in at a step boundary); any object with ``on_step(step)`` plugs in. bf16 autocast (CPU or CUDA) and gradient
accumulation are on by default.

Everything is built in code, offline: a synthetic corpus of facts ("n3 lives in c7 and
works as j2 ."), whose sentences are both the training text and the memory's entries, and
a word-level tokenizer over it. ``main(argv)`` returns the per-step losses; run
``python examples/pretrain_mlm.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from pluglm.memory.tokenize import WORD_LEVEL_SPECIAL

SPECIAL = WORD_LEVEL_SPECIAL


# ------------------------------------------------------------------------ data, tokenizer


def synthetic_corpus(n_people: int = 48, n_cities: int = 12, n_jobs: int = 8, seed: int = 0) -> list[str]:
    """One fact per person: where they live and what they do."""
    rng = random.Random(seed)
    return [f"n{i} lives in c{rng.randrange(n_cities)} and works as j{rng.randrange(n_jobs)} ."
            for i in range(n_people)]


def build_tokenizer(texts: list[str]):
    """A word-level BERT-style tokenizer ([CLS] x [SEP]) over the corpus words, built offline."""
    from pluglm.memory.tokenize import word_level_tokenizer

    return word_level_tokenizer(sorted({w for t in texts for w in t.split()}))


def mask_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, p: float, gen: torch.Generator):
    """BERT masking: p of the real non-special tokens are predicted (80% [MASK], 10% random,
    10% kept). Returns (inputs [B, T], labels [B, T] with -100 elsewhere)."""
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        special |= ids == t
    cand = attention_mask.bool() & ~special
    pick = (torch.rand(ids.shape, generator=gen) < p) & cand
    if not pick.any():  # at least one target per batch
        first = cand.nonzero()[0]
        pick[first[0], first[1]] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    r = torch.rand(ids.shape, generator=gen)
    inputs[pick & (r < 0.8)] = tokenizer.mask_token_id
    rand = pick & (r >= 0.8) & (r < 0.9)
    inputs[rand] = torch.randint(len(SPECIAL), len(tokenizer), (int(rand.sum()),), generator=gen)
    return inputs, labels


# ------------------------------------------------------------------------------ refresh


class SyncKeyRefresher:
    """Re-encode every memory key every ``interval`` optimizer steps, blocking training.

    The training loop calls ``on_step(step)`` after each optimizer step; an asynchronous
    refresher with the same method plugs in unchanged.
    """

    def __init__(self, memory, encoder, interval: int, batch_size: int = 256):
        self.memory, self.encoder = memory, encoder
        self.interval, self.batch_size = interval, batch_size
        self.refreshes = 0

    def on_step(self, step: int) -> None:
        if self.interval > 0 and step % self.interval == 0:
            self.memory.encode(self.encoder, batch_size=self.batch_size, progress=False)
            self.refreshes += 1


# -------------------------------------------------------------------------------- model


def _pluglm_available() -> bool:
    try:
        from pluglm.modeling_pluglm import PlugLMForMaskedLM  # noqa: F401
        from pluglm.configuration_pluglm import PlugLMConfig  # noqa: F401
    except Exception:  # any import failure means: use the drop-in path
        return False
    return True


def build_model(kind: str, tokenizer, args):
    """Returns (model, encoder): encoder is what ``KnowledgeMemory.encode`` runs."""
    common = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, intermediate_size=2 * args.hidden,
                  max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    if kind == "pluglm":
        from pluglm.configuration_pluglm import PlugLMConfig
        from pluglm.modeling_pluglm import PlugLMForMaskedLM

        cfg = PlugLMConfig(**common, num_memory_layers=1, memory_k=args.memory_k, key_dim=args.key_dim,
                           doc_max_length=args.max_length, memory_ffn_dim=args.hidden,
                           refresh_interval=args.refresh_interval)
        model = PlugLMForMaskedLM(cfg)
        return model, model
    from transformers import BertConfig, BertForMaskedLM

    from pluglm.integrations import apply_pluglm

    model = BertForMaskedLM(BertConfig(**common))
    apply_pluglm(model, None, layers=[-1], keep_ffn=False, key_dim=args.key_dim, memory_k=args.memory_k)
    return model, model.pluglm_encoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["auto", "pluglm", "bert"], default="auto")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--refresh-interval", type=int, default=20, help="steps between full key refreshes (0 = never)")
    p.add_argument("--async-refresh", action="store_true",
                   help="refresh keys in the background (pluglm.AsyncKeyRefresher) instead of blocking")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=32)
    p.add_argument("--memory-k", type=int, default=4)
    p.add_argument("--max-length", type=int, default=16, help="tokens per memory entry")
    p.add_argument("--people", type=int, default=48, help="facts in the synthetic corpus")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pluglm.memory import KnowledgeMemory

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    kind = args.model if args.model != "auto" else ("pluglm" if _pluglm_available() else "bert")
    texts = synthetic_corpus(args.people, seed=args.seed)
    tokenizer = build_tokenizer(texts)
    device = torch.device(args.device)
    model, encoder = build_model(kind, tokenizer, args)
    model.to(device)

    memory = KnowledgeMemory.from_texts(texts, tokenizer, source="synthetic", max_length=args.max_length,
                                        device=device)
    memory.encode(encoder, progress=False)
    model.set_memory(memory)  # training re-encodes the retrieved entries with the live encoder
    if args.async_refresh:
        from pluglm.refresh import AsyncKeyRefresher

        refresher = AsyncKeyRefresher(encoder, memory, interval=args.refresh_interval)
    else:
        refresher = SyncKeyRefresher(memory, encoder, args.refresh_interval)

    enc = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    ids_all, mask_all = enc["input_ids"], enc["attention_mask"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    enc_start = [p.detach().clone() for p in encoder.parameters()] if encoder is not model else None
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        total = 0.0
        for _ in range(args.accum):
            rows = torch.randint(0, ids_all.shape[0], (args.batch_size,), generator=gen)
            inputs, labels = mask_tokens(ids_all[rows], mask_all[rows], tokenizer, args.mask_prob, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = model(input_ids=inputs.to(device), attention_mask=mask_all[rows].to(device),
                            labels=labels.to(device))
            (out.loss.float() / args.accum).backward()
            total += float(out.loss.detach()) / args.accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        refresher.on_step(step)
        losses.append(total)
        if args.log_every and step % args.log_every == 0:
            print(f"step {step:5d}  mlm loss {total:.4f}  refreshes {refresher.refreshes}  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    if args.async_refresh:  # swap in the last refresh, stop the background worker
        refresher.wait()
        refresher.close()
    # How far training moved the separate entry encoder (bert path): the re-encode's gradient.
    enc_delta = None if enc_start is None else sum(
        float((p.detach() - p0).norm()) for p, p0 in zip(encoder.parameters(), enc_start))
    return {"model": kind, "losses": losses, "refreshes": refresher.refreshes,
            "encoder_delta": enc_delta, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    result = main()
    print(f"{result['model']}: loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f} "
          f"in {len(result['losses'])} steps, {result['refreshes']} key refreshes")
