"""The Mixtral family, as transformers' ``MixtralForCausalLM`` computes it: Mistral's attention and, for
an MLP, a sparse mixture of ``num_local_experts`` SwiGLU experts of which each token uses the top
``num_experts_per_tok`` (``jaxseq.models.decoder.sparse_moe``).

``router_jitter_noise`` only perturbs training in transformers; jaxseq computes the block as it is
in evaluation (as Petals' servers do), which is the same whatever its value.

Example:
    >>> cfg = FAMILY.parse_config({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    ...     "num_local_experts": 4, "num_experts_per_tok": 2})
    >>> cfg.num_experts, cfg.num_experts_per_token, cfg.rope_theta
    (4, 2, 1000000.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import decoder_block, decoder_block_step
from jaxseq.models.family import ModelFamily, common_config, common_hf_config, decoder_tensors, with_defaults

DEFAULTS = {
    "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "vocab_size": 32000,
    "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2,
}  # fmt: skip


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    return ModelConfig(
        **common_config(raw, "mixtral"),
        sliding_window=raw["sliding_window"] or 0,
        num_experts=raw["num_local_experts"],
        num_experts_per_token=raw["num_experts_per_tok"],
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_hf_config(cfg, "MixtralForCausalLM", "mixtral"),
        "sliding_window": cfg.sliding_window or None,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_token,
    }


FAMILY = ModelFamily(
    "mixtral", ("mixtral",), parse_config, hf_config, decoder_tensors, decoder_block, decoder_block_step
)
