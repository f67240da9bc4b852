"""The Llama family (Llama 1-3.3 and their fine-tunes), as transformers' ``LlamaForCausalLM`` computes it:
rotary embeddings with default, linear, dynamic or llama3 scaling; optional biases on every attention
projection (``attention_bias``) and on the MLP (``mlp_bias``); tied embeddings; an explicit ``head_dim``.

Example:
    >>> cfg = FAMILY.parse_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    ...     "num_attention_heads": 4, "num_hidden_layers": 2,
    ...     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    ...                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    >>> cfg.rope_scaling.type, cfg.num_key_value_heads
    ('llama3', 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import decoder_block, decoder_block_step
from jaxseq.models.family import ModelFamily, common_config, common_hf_config, decoder_tensors, with_defaults

DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "vocab_size": 32000}


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **common_config(raw, "llama"),
        attention_bias=bias,
        attention_out_bias=bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_hf_config(cfg, "LlamaForCausalLM", "llama"),
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
    }


FAMILY = ModelFamily("llama", ("llama",), parse_config, hf_config, decoder_tensors, decoder_block, decoder_block_step)
