"""Registration of the PlugLM classes with the transformers Auto classes.

``register()`` maps ``model_type="pluglm"`` to ``PlugLMConfig`` in ``AutoConfig`` and the
models in ``AutoModel``, ``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``,
``AutoModelForQuestionAnswering`` and ``AutoModelForTokenClassification``. Idempotent: a
second call (or a call after another copy of the classes was registered, e.g. after a
module reload) is a no-op or replaces the entry.
"""
from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from .configuration_pluglm import PlugLMConfig
    from .modeling_pluglm import (
        PlugLMForMaskedLM,
        PlugLMForQuestionAnswering,
        PlugLMForSequenceClassification,
        PlugLMForTokenClassification,
        PlugLMModel,
    )

    AutoConfig.register(PlugLMConfig.model_type, PlugLMConfig, exist_ok=True)
    for auto, model in ((AutoModel, PlugLMModel), (AutoModelForMaskedLM, PlugLMForMaskedLM),
                        (AutoModelForSequenceClassification, PlugLMForSequenceClassification),
                        (AutoModelForQuestionAnswering, PlugLMForQuestionAnswering),
                        (AutoModelForTokenClassification, PlugLMForTokenClassification)):
        auto.register(PlugLMConfig, model, exist_ok=True)
    _done = True


__all__ = ["register"]
