"""Registration of the PlugLM classes with the transformers Auto classes.

``register()`` maps ``model_type="pluglm"`` to ``PlugLMConfig`` in ``AutoConfig`` and the
models in ``AutoModel``, ``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``,
``AutoModelForQuestionAnswering`` and ``AutoModelForTokenClassification``. Importing
``pluglm.modeling_pluglm`` (which any use of a PlugLM class does) already registers them;
``register()`` is for code that only loads checkpoints through the Auto classes. Idempotent:
a second call (or a call after another copy of the classes was registered, e.g. after a
module reload) replaces the entries.
"""
from __future__ import annotations


def register() -> None:
    from .modeling_pluglm import register_auto_classes

    register_auto_classes()


__all__ = ["register"]
