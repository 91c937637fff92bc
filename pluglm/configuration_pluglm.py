"""``PlugLMConfig``: the transformers configuration of a PlugLM model (docs/design.md §1).

BERT-base geometry by default, plus the plug-in memory fields. Every value given is kept as
given, falsy ones included: ``memory_ffn_dim=0`` means "no FFN in the memory layers" and a
dropout of 0.0 means no dropout (the published code's ``x or default`` silently replaced
them). Invalid values raise ``ValueError`` naming the field.
"""
from __future__ import annotations

from transformers import PretrainedConfig

KNOWLEDGE_ATTENTION_TYPES = ("multi_head", "sentence_level")
KERNEL_BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
COMPAT_MODES = ("paper", "published")
# What compat="published" changes (docs/design.md §1, README "Coming from the published code").
PUBLISHED_DIFFERENCES = ("head_layout", "pool_denominator", "reencode_dropout", "untied_decoder")
RETRIEVAL_INITS = ("aligned", "random")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _prob(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {v!r}")


class PlugLMConfig(PretrainedConfig):
    """Configuration of ``PlugLMModel`` and its heads.

    Backbone (BERT): vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob,
    max_position_embeddings, type_vocab_size, initializer_range, layer_norm_eps,
    pad_token_id, classifier_dropout (None = hidden_dropout_prob).

    Plug-in memory:
      num_memory_layers: the top layers whose FFN becomes a memory layer (0..num_hidden_layers).
      memory_k: N, entries retrieved per sequence and memory layer.
      key_dim: width of queries and keys.
      doc_max_length: tokens per memory entry (<= max_position_embeddings).
      memory_ffn_dim: width of the reduced FFN kept in a memory layer; 0 = none.
      knowledge_attention: "multi_head" (per-head biased attention) or "sentence_level".
      refresh_interval: training steps between full key refreshes.
      memory_attention_dropout: dropout on the knowledge-attention probabilities.
      kernel_backend: backend of the pluglm_kernels ops ("auto", "triton", "cuda", "cpu",
        "reference").
      compat: "paper" (default: the model as the paper writes it) or "published" (what the
        published code computes, so its checkpoint runs unchanged: head-major knowledge-
        attention output, pooling denominator sum(exp) + 1e-8, embedding dropout in the
        training re-encode, untied masked-LM decoder). ``published_differences`` lists the
        ones in effect.
      retrieval_init: "aligned" (default) starts every memory layer's query side (pooler,
        W_q) as a copy of the document side (doc pooler, W_k), so that a fresh model already
        retrieves by word overlap and the gold entry is in the top-N from step one (the
        cold-start fix, docs/design.md §1; for training from scratch also call
        ``model.align_retrieval(memory)`` and add ``pluglm.training.RetrievalAlignment``);
        "random" keeps independent random inits.
      doc_position_embeddings: True (default, the paper's document side) adds the position
        table to each entry token before the LayerNorm and pooling; False pools the entry's
        tokens without positions, so an entry's key and value depend on which words it holds
        and not on where they stand. For memories of short, differently worded fact entries
        it learns several times faster and reads entries in wordings never trained on
        (benchmarks/NOTES.md, "Quality"; docs/design.md §1). The query side always uses
        positions.

    transformers options handled as in BERT: tie_word_embeddings (MLM decoder = word
    embeddings; default True, False with compat="published"), output_attentions /
    output_hidden_states, and ``attn_implementation`` "sdpa" (default) or "eager"; other
    implementations raise.
    """

    model_type = "pluglm"

    def __init__(self, vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
                 layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                 num_memory_layers=1, memory_k=5, key_dim=128, doc_max_length=288,
                 memory_ffn_dim=768, knowledge_attention="multi_head", refresh_interval=200,
                 memory_attention_dropout=0.1, kernel_backend="auto", compat="paper",
                 retrieval_init="aligned", doc_position_embeddings=True, tie_word_embeddings=None,
                 **kwargs):
        for name, v, lo in (("vocab_size", vocab_size, 1), ("hidden_size", hidden_size, 1),
                            ("num_hidden_layers", num_hidden_layers, 1),
                            ("num_attention_heads", num_attention_heads, 1),
                            ("intermediate_size", intermediate_size, 1),
                            ("max_position_embeddings", max_position_embeddings, 1),
                            ("type_vocab_size", type_vocab_size, 1),
                            ("num_memory_layers", num_memory_layers, 0), ("memory_k", memory_k, 1),
                            ("key_dim", key_dim, 1), ("doc_max_length", doc_max_length, 1),
                            ("memory_ffn_dim", memory_ffn_dim, 0),
                            ("refresh_interval", refresh_interval, 1)):
            _int(name, v, lo)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by "
                             f"num_attention_heads ({num_attention_heads})")
        if num_memory_layers > num_hidden_layers:
            raise ValueError(f"num_memory_layers ({num_memory_layers}) must be <= "
                             f"num_hidden_layers ({num_hidden_layers})")
        if doc_max_length > max_position_embeddings:
            raise ValueError(f"doc_max_length ({doc_max_length}) must be <= "
                             f"max_position_embeddings ({max_position_embeddings}): memory "
                             f"entries are embedded with the backbone's position table")
        for name, v in (("hidden_dropout_prob", hidden_dropout_prob),
                        ("attention_probs_dropout_prob", attention_probs_dropout_prob),
                        ("memory_attention_dropout", memory_attention_dropout)):
            _prob(name, v)
        if classifier_dropout is not None:
            _prob("classifier_dropout", classifier_dropout)
        if knowledge_attention not in KNOWLEDGE_ATTENTION_TYPES:
            raise ValueError(f"knowledge_attention must be one of {KNOWLEDGE_ATTENTION_TYPES}, "
                             f"got {knowledge_attention!r}")
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        if retrieval_init not in RETRIEVAL_INITS:
            raise ValueError(f"retrieval_init must be one of {RETRIEVAL_INITS}, got {retrieval_init!r}")
        if not isinstance(doc_position_embeddings, bool):
            raise ValueError(f"doc_position_embeddings must be a bool, got {doc_position_embeddings!r}")
        if compat == "published" and not doc_position_embeddings:
            raise ValueError("doc_position_embeddings=False is not what the published code computes "
                             "(it embeds entries with positions): use compat='paper'")
        if not isinstance(layer_norm_eps, (int, float)) or isinstance(layer_norm_eps, bool) \
                or not layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a positive float, got {layer_norm_eps!r}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.classifier_dropout = classifier_dropout
        self.num_memory_layers = num_memory_layers
        self.memory_k = memory_k
        self.key_dim = key_dim
        self.doc_max_length = doc_max_length
        self.memory_ffn_dim = memory_ffn_dim
        self.knowledge_attention = knowledge_attention
        self.refresh_interval = refresh_interval
        self.memory_attention_dropout = memory_attention_dropout
        self.kernel_backend = kernel_backend
        self.retrieval_init = retrieval_init
        self.doc_position_embeddings = doc_position_embeddings
        self.compat = compat
        # transformers 5.x ties the MLM decoder to the word embeddings only when the config
        # says so (4.x defaulted it to True in the base config). The published checkpoint's
        # decoder is its own matrix: never tied on load.
        if tie_word_embeddings is None:
            tie_word_embeddings = compat != "published"
        self.tie_word_embeddings = bool(tie_word_embeddings)
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=bool(tie_word_embeddings),
                         **kwargs)

    @property
    def published_differences(self) -> frozenset:
        """The PUBLISHED_DIFFERENCES in effect: all four with compat="published", none with
        "paper". ``_published_off`` (a tuple of names, not a user option) switches single
        ones off, so tests can show that each accounts for its share of the difference."""
        if getattr(self, "compat", "paper") != "published":
            return frozenset()
        off = set(getattr(self, "_published_off", ()) or ())
        unknown = off - set(PUBLISHED_DIFFERENCES)
        if unknown:
            raise ValueError(f"_published_off names unknown differences {sorted(unknown)}; "
                             f"known: {PUBLISHED_DIFFERENCES}")
        return frozenset(PUBLISHED_DIFFERENCES) - off


__all__ = ["PlugLMConfig", "KNOWLEDGE_ATTENTION_TYPES", "KERNEL_BACKENDS", "COMPAT_MODES",
           "PUBLISHED_DIFFERENCES", "RETRIEVAL_INITS"]
