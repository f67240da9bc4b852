"""Blocks of any supported family, locally: random parameters, and a range of blocks run in this
process (the reference remote results are compared with)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import BlockParams, run_span
from jaxseq.models.inputs import check_span_inputs
from jaxseq.models.registry import family_of


def init_block_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> list[BlockParams]:
    """Random parameters for every block of ``cfg``: normal(0, std) matrices and biases, unit norms.

    Example:
        >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> params = init_block_params(cfg, jax.random.key(0))
        >>> len(params), params[0]["q_proj"].shape
        (2, (64, 64))
    """
    specs = family_of(cfg).block_tensors(cfg)
    blocks = []
    for block_key in jax.random.split(key, cfg.num_hidden_layers):
        keys = dict(zip(specs, jax.random.split(block_key, len(specs))))
        blocks.append(
            {
                name: jnp.ones(spec.shape, dtype)
                if spec.is_norm
                else (std * jax.random.normal(keys[name], spec.shape, jnp.float32)).astype(dtype)
                for name, spec in specs.items()
            }
        )
    return blocks


def local_sequential(
    cfg: ModelConfig,
    params: Sequence[BlockParams],
    x: jax.Array,
    prompts: jax.Array | None = None,
    start: int | None = None,
    end: int | None = None,
    *,
    first: int = 0,
) -> jax.Array:
    """Run blocks ``start..end-1`` locally on hidden states ``x: [batch, seq, hidden]``; jit-able.

    ``params`` are consecutive blocks from ``init_block_params`` or ``load_checkpoint``, ``params[0]``
    being block ``first``; ``start`` and ``end`` are block numbers (default: all of ``params``);
    ``prompts``: deep prompts ``[end - start, batch, prompt_len, hidden]``, or None.

    Example:
        >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> params = init_block_params(cfg, jax.random.key(0))
        >>> local_sequential(cfg, params, jnp.ones((1, 5, 64))).shape
        (1, 5, 64)
    """
    start = first if start is None else start
    end = first + len(params) if end is None else end
    if not first <= start < end <= first + len(params):
        raise ValueError(f"block range {start}:{end} is outside the blocks given, {first}:{first + len(params)}")
    check_span_inputs(x, prompts, hidden_size=cfg.hidden_size, num_blocks=end - start, name="x")
    if prompts is None:
        prompts = jnp.zeros((end - start, x.shape[0], 0, x.shape[2]), x.dtype)
    windows = [cfg.window(block) for block in range(start, end)]
    blocks = params[start - first : end - first]
    return run_span(family_of(cfg).block, cfg, blocks, x, prompts, windows, x.shape[1])
