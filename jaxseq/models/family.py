"""The model-family interface: what a family (Llama, Mistral, Qwen2, Qwen3, Mixtral, ...) tells the rest of
jaxseq, as one frozen dataclass of pure functions. The client, the chain, the server and the wire only
ever see a ``ModelConfig`` and a ``ModelFamily``; adding a family is one module that builds a
``ModelFamily`` and one line in ``jaxseq.models.registry``.

Also here: the tensor layout the supported families share (``decoder_tensors``: the names Hugging Face
checkpoints give a block's tensors, and their shapes), and the ``config.json`` parsing they share
(``common_config``: transformers 4's ``rope_theta``/``rope_scaling`` and transformers 5's
``rope_parameters``, refusing what jaxseq does not compute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxseq.models.config import ModelConfig, RopeScaling
from jaxseq.models.decoder import BlockFunction, BlockStepFunction

# A block's tensors in Hugging Face checkpoints are named "model.layers.{i}." + their name.
LAYER_PREFIX = "model.layers.{}."
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One block parameter in a checkpoint: the tensor name(s) under ``model.layers.{i}.`` (several are
    stacked along a new first axis, as Mixtral's experts are), and its shape in jaxseq's layout (matrices
    ``[in, out]``: a 2-d stored tensor, or each stacked one, is the transpose of this)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of each stored tensor (torch's ``nn.Linear`` weights are ``[out, in]``)."""
        own = self.shape[1:] if len(self.names) > 1 else self.shape
        return own[::-1]

    @property
    def is_norm(self) -> bool:
        return self.names[0].endswith("norm.weight")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One family of checkpoints, as jaxseq computes it.

    Attributes:
        name: the family's name, as servers announce it (``"llama"``).
        model_types: the ``config.json`` ``model_type`` values it loads.
        parse_config: a ``config.json`` dict -> ``ModelConfig``; raises ``ValueError`` naming any key whose
            value changes the computation in a way jaxseq does not implement.
        hf_config: a ``ModelConfig`` -> the ``config.json`` dict transformers (4 and 5) loads it from.
        block_tensors: a ``ModelConfig`` -> each block parameter's ``TensorSpec``.
        block: the block function (``jaxseq.models.decoder.BlockFunction``), jit-able, the same signature
            for every family.
        block_step: the block's step of inference over cached keys and values
            (``jaxseq.models.decoder.BlockStepFunction``), jit-able, the same signature for every family.

    Example:
        >>> from jaxseq.models.registry import family_of
        >>> family = family_of("qwen3")
        >>> cfg = family.parse_config({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
        ...     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "head_dim": 32})
        >>> sorted(family.block_tensors(cfg))  # doctest: +NORMALIZE_WHITESPACE
        ['down_proj', 'gate_proj', 'input_layernorm', 'k_norm', 'k_proj', 'o_proj',
         'post_attention_layernorm', 'q_norm', 'q_proj', 'up_proj', 'v_proj']
    """

    name: str
    model_types: tuple[str, ...]
    parse_config: Callable[[Mapping[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    block_tensors: Callable[[ModelConfig], dict[str, TensorSpec]]
    block: BlockFunction
    block_step: BlockStepFunction


def decoder_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The block tensors of the Llama-style families, as ``cfg``'s features make them.

    Example:
        >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2, num_experts=4, num_experts_per_token=2)
        >>> spec = decoder_tensors(cfg)["experts_gate"]
        >>> spec.names[:2], spec.shape, spec.stored_shape
        (('block_sparse_moe.experts.0.w1.weight', 'block_sparse_moe.experts.1.w1.weight'), (4, 64, 128), (128, 64))
    """
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

    def one(name: str, *shape: int) -> TensorSpec:
        return TensorSpec((name,), shape)

    tensors = {
        "input_layernorm": one("input_layernorm.weight", h),
        "q_proj": one("self_attn.q_proj.weight", h, q),
        "k_proj": one("self_attn.k_proj.weight", h, kv),
        "v_proj": one("self_attn.v_proj.weight", h, kv),
        "o_proj": one("self_attn.o_proj.weight", q, h),
        "post_attention_layernorm": one("post_attention_layernorm.weight", h),
    }
    if cfg.attention_bias:
        for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            tensors[f"{name}_bias"] = one(f"self_attn.{name}.bias", size)
    if cfg.attention_out_bias:
        tensors["o_proj_bias"] = one("self_attn.o_proj.bias", h)
    if cfg.qk_norm:
        tensors["q_norm"] = one("self_attn.q_norm.weight", d)
        tensors["k_norm"] = one("self_attn.k_norm.weight", d)
    if cfg.num_experts:
        n = cfg.num_experts

        def experts(weight: str, *shape: int) -> TensorSpec:
            return TensorSpec(tuple(f"block_sparse_moe.experts.{e}.{weight}.weight" for e in range(n)), (n, *shape))

        tensors["router"] = one("block_sparse_moe.gate.weight", h, n)
        tensors["experts_gate"] = experts("w1", h, i)
        tensors["experts_up"] = experts("w3", h, i)
        tensors["experts_down"] = experts("w2", i, h)
        return tensors
    tensors.update(
        gate_proj=one("mlp.gate_proj.weight", h, i),
        up_proj=one("mlp.up_proj.weight", h, i),
        down_proj=one("mlp.down_proj.weight", i, h),
    )
    if cfg.mlp_bias:
        for name, size in (("gate_proj", i), ("up_proj", i), ("down_proj", h)):
            tensors[f"{name}_bias"] = one(f"mlp.{name}.bias", size)
    return tensors


# --- config.json ------------------------------------------------------------------------------
def refuse(key: str, value: Any, why: str) -> ValueError:
    """The error for a config key jaxseq does not compute."""
    return ValueError(f"config.json: {key}={value!r} is not supported: {why}")


_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")


def with_defaults(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` with the family's defaults for the keys it leaves out (as transformers' config
    class fills them); a key given as null stays null."""
    return {**defaults, **raw}


def common_config(raw: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields every supported family reads the same way, from a transformers 4 or 5
    ``config.json`` (with the family's defaults filled in); raises ``ValueError`` naming a key whose value
    jaxseq does not compute."""
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"config.json: missing required key(s) {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", raw["hidden_act"], "jaxseq's MLPs use 'silu' only")
    if raw.get("quantization_config"):
        raise refuse("quantization_config", raw["quantization_config"], "jaxseq loads unquantized weights only")
    rope_theta, rope_scaling = _rope(raw)
    return dict(
        family=family,
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        num_hidden_layers=raw["num_hidden_layers"],
        vocab_size=raw.get("vocab_size", 32000),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        head_dim=raw.get("head_dim") or 0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def _rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and the scaling, from transformers 5's ``rope_parameters`` or transformers 4's
    ``rope_theta`` and ``rope_scaling``."""
    parameters = raw.get("rope_parameters")
    key = "rope_parameters"
    if parameters is None:
        parameters, key = raw.get("rope_scaling"), "rope_scaling"
    parameters = dict(parameters or {})
    if not all(isinstance(v, (int, float, str, type(None))) for v in parameters.values()):
        raise refuse(key, parameters, "per-layer rope parameters are not implemented")
    theta = float(parameters.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"{key}.partial_rotary_factor", parameters["partial_rotary_factor"], "rotary on part of a head")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", raw["partial_rotary_factor"], "rotary on part of a head")
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "dynamic", "llama3"):
        raise refuse(f"{key}.rope_type", rope_type, "jaxseq implements the default, linear, dynamic and llama3 types")
    scaling = RopeScaling(
        type=rope_type,
        factor=float(parameters["factor"]),
        original_max_position_embeddings=int(parameters.get("original_max_position_embeddings") or 0),
        low_freq_factor=float(parameters.get("low_freq_factor", 1.0)),
        high_freq_factor=float(parameters.get("high_freq_factor", 4.0)),
    )
    return theta, scaling


def common_hf_config(cfg: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
    """The ``config.json`` keys every supported family writes the same way (both transformers 4's and 5's
    rope keys, so that either loads it)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {
            "rope_type": cfg.rope_scaling.type, "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling.factor,
        }  # fmt: skip
        if cfg.rope_scaling.type == "llama3":
            rope.update(
                original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings,
                low_freq_factor=cfg.rope_scaling.low_freq_factor,
                high_freq_factor=cfg.rope_scaling.high_freq_factor,
            )
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
