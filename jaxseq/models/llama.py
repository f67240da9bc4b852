"""Llama decoder blocks as pure JAX functions, computed exactly as Hugging Face's ``LlamaDecoderLayer``.

A block's parameters are a dict of arrays; matrices are stored ``[in, out]`` (the transpose of
the torch ``nn.Linear`` weight). A span is a Python loop over its blocks inside one ``jit``: no parameter is copied or
stacked per call, which matters when a block weighs tens of megabytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxseq.models.config import LlamaConfig
from jaxseq.models.inputs import check_span_inputs

BlockParams = dict[str, jax.Array]

# name -> (shape as a function of the config); also the order of tensors in checkpoints.
_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def block_param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's parameters in jaxseq's layout (matrices ``[in, out]``)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {
        "input_layernorm": (h,),
        "q_proj": (h, cfg.num_attention_heads * d),
        "k_proj": (h, cfg.num_key_value_heads * d),
        "v_proj": (h, cfg.num_key_value_heads * d),
        "o_proj": (cfg.num_attention_heads * d, h),
        "post_attention_layernorm": (h,),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def init_block_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> list[BlockParams]:
    """Random Llama-style parameters: one dict per block, normal(0, std) matrices, unit norms.

    Example:
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> params = init_block_params(cfg, jax.random.key(0))
        >>> len(params), params[0]["q_proj"].shape
        (2, (64, 64))
    """
    shapes = block_param_shapes(cfg)
    blocks = []
    for block_key in jax.random.split(key, cfg.num_hidden_layers):
        keys = dict(zip(_MATRICES, jax.random.split(block_key, len(_MATRICES))))
        block = {}
        for name, shape in shapes.items():
            if name in _NORMS:
                block[name] = jnp.ones(shape, dtype)
            else:
                block[name] = (std * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
        blocks.append(block)
    return blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Llama's RMSNorm, computed in float32 as Hugging Face does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _rotary(cfg: LlamaConfig, seq_len: int, dtype) -> tuple[jax.Array, jax.Array]:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(cfg: LlamaConfig, p: BlockParams, h: jax.Array) -> jax.Array:
    batch, seq, _ = h.shape
    d, n_heads, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = (h @ p["q_proj"]).reshape(batch, seq, n_heads, d)
    k = (h @ p["k_proj"]).reshape(batch, seq, n_kv, d)
    v = (h @ p["v_proj"]).reshape(batch, seq, n_kv, d)
    cos, sin = _rotary(cfg, seq, h.dtype)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    groups = n_heads // n_kv
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(h.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, n_heads * d)
    return out @ p["o_proj"]


def block_forward(cfg: LlamaConfig, p: BlockParams, x: jax.Array) -> jax.Array:
    """One Llama decoder layer: pre-norm attention and SwiGLU MLP, each with a residual."""
    x = x + _attention(cfg, p, rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps))
    h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ p["gate_proj"]) * (h @ p["up_proj"])) @ p["down_proj"]


def run_span(cfg: LlamaConfig, blocks: Sequence[BlockParams], x: jax.Array, prompts: jax.Array) -> jax.Array:
    """Run ``blocks`` in order; before block i, ``x[:, :prompt_len] += prompts[i]``.

    ``prompts`` is ``[len(blocks), batch, prompt_len, hidden]``; ``prompt_len`` may be 0.
    """
    prompt_len = prompts.shape[2]
    for i, p in enumerate(blocks):
        if prompt_len:
            x = x.at[:, :prompt_len].add(prompts[i].astype(x.dtype))
        x = block_forward(cfg, p, x)
    return x


def local_sequential(
    cfg: LlamaConfig,
    params: Sequence[BlockParams],
    x: jax.Array,
    prompts: jax.Array | None = None,
    start: int = 0,
    end: int | None = None,
) -> jax.Array:
    """Run blocks ``start..end-1`` locally on hidden states ``x: [batch, seq, hidden]``; jit-able.

    ``params`` is the list from ``init_block_params`` or ``load_checkpoint`` (indexed by block).
    ``prompts``: deep prompts ``[end - start, batch, prompt_len, hidden]``, or None.

    Example:
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> params = init_block_params(cfg, jax.random.key(0))
        >>> local_sequential(cfg, params, jnp.ones((1, 5, 64))).shape
        (1, 5, 64)
    """
    end = len(params) if end is None else end
    if not 0 <= start < end <= len(params):
        raise ValueError(f"block range {start}:{end} is outside the {len(params)} blocks given")
    check_span_inputs(x, prompts, hidden_size=cfg.hidden_size, num_blocks=end - start, name="x")
    if prompts is None:
        prompts = jnp.zeros((end - start, x.shape[0], 0, x.shape[2]), x.dtype)
    return run_span(cfg, params[start:end], x, prompts)
