"""The Qwen2 family (Qwen2, Qwen2.5), as transformers' ``Qwen2ForCausalLM`` computes it: biases on the
q, k and v projections; with ``use_sliding_window``, the blocks from ``max_window_layers`` on (or as
``layer_types`` says) attend over the last ``sliding_window`` positions.

Example:
    >>> cfg = FAMILY.parse_config({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
    ...     "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2})
    >>> cfg.attention_bias, [cfg.window(i) for i in range(3)]
    (True, [0, 0, 8])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxseq.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from jaxseq.models.decoder import decoder_block, decoder_block_step
from jaxseq.models.family import ModelFamily, common_config, common_hf_config, decoder_tensors, with_defaults

DEFAULTS = {
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "vocab_size": 151936,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
}  # fmt: skip


def windowed_config(raw: Mapping[str, Any], family: str, **features: Any) -> ModelConfig:
    """A ``ModelConfig`` of a Qwen-style ``config.json``: sliding windows only with ``use_sliding_window``,
    on the blocks ``layer_types`` names, or else those from ``max_window_layers`` on."""
    window = raw["sliding_window"] if raw["use_sliding_window"] else None
    layer_types = raw.get("layer_types") or [
        SLIDING_ATTENTION if window is not None and i >= raw["max_window_layers"] else FULL_ATTENTION
        for i in range(raw["num_hidden_layers"])
    ]
    return ModelConfig(
        **common_config(raw, family), sliding_window=window or 0, layer_types=tuple(layer_types), **features
    )


def windowed_hf_config(cfg: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
    return {
        **common_hf_config(cfg, architecture, model_type),
        "use_sliding_window": bool(cfg.sliding_window),
        "sliding_window": cfg.sliding_window or None,
        "max_window_layers": cfg.num_hidden_layers,
        "layer_types": list(cfg.layer_types),
    }


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    return windowed_config(with_defaults(raw, DEFAULTS), "qwen2", attention_bias=True)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return windowed_hf_config(cfg, "Qwen2ForCausalLM", "qwen2")


FAMILY = ModelFamily("qwen2", ("qwen2",), parse_config, hf_config, decoder_tensors, decoder_block, decoder_block_step)
