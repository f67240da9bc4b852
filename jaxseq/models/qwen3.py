"""The Qwen3 family, as transformers' ``Qwen3ForCausalLM`` computes it: Qwen2's block with an RMSNorm of
each head's queries and keys before the rotary embedding, optional biases on all four attention
projections (``attention_bias``), and an explicit ``head_dim``.

Example:
    >>> cfg = FAMILY.parse_config({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "head_dim": 32})
    >>> cfg.qk_norm, cfg.head_dim
    (True, 32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import decoder_block, decoder_block_step
from jaxseq.models.family import ModelFamily, decoder_tensors, with_defaults
from jaxseq.models.qwen2 import DEFAULTS as QWEN2_DEFAULTS
from jaxseq.models.qwen2 import windowed_config, windowed_hf_config

DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128}


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return windowed_config(
        with_defaults(raw, DEFAULTS), "qwen3", qk_norm=True, attention_bias=bias, attention_out_bias=bias
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**windowed_hf_config(cfg, "Qwen3ForCausalLM", "qwen3"), "attention_bias": cfg.attention_bias}


FAMILY = ModelFamily("qwen3", ("qwen3",), parse_config, hf_config, decoder_tensors, decoder_block, decoder_block_step)
