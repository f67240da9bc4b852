"""The supported model families, one line each, and the lookup by ``model_type`` or config.

Example:
    >>> sorted(FAMILIES)
    ['llama', 'mistral', 'mixtral', 'qwen2', 'qwen3']
    >>> family_of("gemma")
    Traceback (most recent call last):
    ...
    ValueError: model_type 'gemma' is not supported; jaxseq serves llama, mistral, mixtral, qwen2, qwen3
"""

from __future__ import annotations

from jaxseq.models import llama, mistral, mixtral, qwen2, qwen3
from jaxseq.models.config import ModelConfig
from jaxseq.models.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        mixtral.FAMILY,
    )
}
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.model_types}


def family_of(model: str | ModelConfig) -> ModelFamily:
    """The family of a ``config.json`` ``model_type``, or of a ``ModelConfig``; ``ValueError`` listing the
    supported ones when there is none.

    Example:
        >>> family_of("qwen2").name, family_of(ModelConfig(family="mixtral", hidden_size=8, intermediate_size=8,
        ...     num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)).name
        ('qwen2', 'mixtral')
    """
    if isinstance(model, ModelConfig):
        if model.family not in FAMILIES:
            raise ValueError(
                f"model family {model.family!r} is not supported; jaxseq serves {', '.join(sorted(FAMILIES))}"
            )
        return FAMILIES[model.family]
    if model not in _BY_MODEL_TYPE:
        raise ValueError(f"model_type {model!r} is not supported; jaxseq serves {', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model]
