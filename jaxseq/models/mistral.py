"""The Mistral family, as transformers' ``MistralForCausalLM`` computes it: Llama's block without
biases, every block attending over the last ``sliding_window`` positions when that is set.

Example:
    >>> cfg = FAMILY.parse_config({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "sliding_window": 16})
    >>> cfg.window(0), cfg.window(1)
    (16, 16)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import decoder_block, decoder_block_step
from jaxseq.models.family import ModelFamily, common_config, common_hf_config, decoder_tensors, with_defaults

DEFAULTS = {
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "vocab_size": 32000,
    "sliding_window": 4096,
}  # fmt: skip


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    return ModelConfig(**common_config(raw, "mistral"), sliding_window=raw["sliding_window"] or 0)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_hf_config(cfg, "MistralForCausalLM", "mistral"), "sliding_window": cfg.sliding_window or None}


FAMILY = ModelFamily(
    "mistral", ("mistral",), parse_config, hf_config, decoder_tensors, decoder_block, decoder_block_step
)
