"""The shape and features of a model's decoder stack, as both the client and the servers read them from a
checkpoint's ``config.json``: one frozen dataclass for every supported family (``jaxseq.models.family``)."""

from __future__ import annotations

import dataclasses

ROPE_TYPES = ("linear", "dynamic", "llama3")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A scaled rotary embedding, as transformers' ``rope_parameters`` describe it.

    ``"linear"`` divides the frequencies by ``factor``; ``"dynamic"`` (NTK) raises the base once a
    sequence is longer than ``max_position_embeddings``; ``"llama3"`` (Llama 3.1-3.3) divides low
    frequencies by ``factor`` and interpolates between ``low_freq_factor`` and ``high_freq_factor``.

    Example:
        >>> RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192).type
        'llama3'
    """

    type: str
    factor: float
    original_max_position_embeddings: int = 0  # llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.type!r} is not one of {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.type == "llama3" and (
            self.original_max_position_embeddings <= 0 or self.high_freq_factor <= self.low_freq_factor
        ):
            raise ValueError(
                "llama3 rope scaling needs original_max_position_embeddings > 0 and "
                f"high_freq_factor > low_freq_factor, got {self}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder stack: its family, shape, and the features its blocks compute with.

    ``head_dim`` 0 means ``hidden_size // num_attention_heads``. ``layer_types`` gives each block's
    attention (``"full_attention"`` or ``"sliding_attention"`` over the last ``sliding_window``
    positions); empty means every block is sliding when ``sliding_window`` is set, else full.
    ``num_experts`` > 0 makes each block's MLP a sparse mixture of experts (Mixtral).

    Example:
        >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> cfg.family, cfg.head_dim, cfg.layer_types
        ('llama', 16, ('full_attention', 'full_attention'))
    """

    family: str = "llama"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    head_dim: int = 0
    attention_bias: bool = False  # biases on the q, k and v projections
    attention_out_bias: bool = False  # a bias on the o projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before the rotary embedding (Qwen3)
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    num_experts: int = 0
    num_experts_per_token: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; pass head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.layer_types:
            kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
            FULL_ATTENTION,
            SLIDING_ATTENTION,
        }:
            raise ValueError(
                f"layer_types must give {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r} for each of the "
                f"{self.num_hidden_layers} blocks, got {self.layer_types}"
            )
        if SLIDING_ATTENTION in self.layer_types and self.sliding_window <= 0:
            raise ValueError("sliding-window blocks need a positive sliding_window")
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"num_experts_per_token must be within 1..num_experts={self.num_experts}, "
                f"got {self.num_experts_per_token}"
            )

    def window(self, block: int) -> int:
        """The attention window of block ``block`` (0: the whole causal past).

        Example:
            >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
            ...                   num_key_value_heads=2, num_hidden_layers=2, sliding_window=16,
            ...                   layer_types=("full_attention", "sliding_attention"))
            >>> cfg.window(0), cfg.window(1)
            (0, 16)
        """
        return self.sliding_window if self.layer_types[block] == SLIDING_ATTENTION else 0


LlamaConfig = ModelConfig  # the name before there were other families; a ModelConfig's family is "llama" by default
