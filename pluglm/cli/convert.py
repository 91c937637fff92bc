"""``pluglm convert-published``: the published PlugLM checkpoint (and knowledge base) to a
pluglm checkpoint with ``compat="published"`` (the library side: :mod:`pluglm.convert`)."""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Turn the published ckpt_8000.pt (a torch.save of the masked-LM model's state dict) and,
optionally, tokenized_wiki.npy (the knowledge base: one row of BERT token ids per entry,
padded with 0) into a PlugLMForMaskedLM with compat="published" (it computes what the
published code computes; README, "Coming from the published code") and a KnowledgeMemory
encoded by the converted model."""


def cmd_convert_published(args) -> int:
    from .. import convert

    overrides = {} if args.memory_k is None else {"memory_k": args.memory_k}
    tokenizer = convert.load_vocab_tokenizer(args.tokenizer) if args.tokenizer else None
    model, memory = convert.from_published(args.checkpoint, args.out, knowledge=args.knowledge,
                                           tokenizer=tokenizer, batch_size=args.batch_size,
                                           device=args.device, progress=not args.no_progress,
                                           **overrides)
    c = model.config
    out = Path(args.out).absolute()
    msg = (f"converted {args.checkpoint}: {c.num_hidden_layers} layers ({c.num_memory_layers} "
           f"memory), d={c.hidden_size}, compat=published -> {out}")
    if memory is not None:
        msg += f"; {len(memory)} memory entries encoded -> {out / convert.MEMORY_SUBDIR}"
    print(msg)
    return 0


def add_parser(sub) -> None:
    """Register ``convert-published`` on ``pluglm``'s subparsers."""
    s = sub.add_parser("convert-published", help="convert the published PlugLM checkpoint "
                       "(and knowledge base) to a pluglm checkpoint with compat='published'",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=DESCRIPTION)
    s.add_argument("checkpoint", help="the published .pt (read with torch.load(weights_only=True))")
    s.add_argument("--knowledge", default=None, metavar="NPY",
                   help="tokenized_wiki.npy: encoded into OUT/memory (read with allow_pickle=False)")
    s.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="vocabulary file (the published vocab/vocab) or tokenizer folder: "
                        "stores each entry's decoded text (default: entries without text)")
    s.add_argument("--out", required=True, help="output directory (a save_pretrained checkpoint)")
    s.add_argument("--memory-k", type=int, default=None,
                   help="entries retrieved per sequence (default 5)")
    s.add_argument("--batch-size", type=int, default=256,
                   help="entries per encoder batch (default 256)")
    s.add_argument("--device", default="cpu", help="where to encode the memory (default cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert_published)
