"""``generate``: token ids through an inference session of the swarm, as transformers' ``generate`` makes them.

The client's own work per token is the embedding of the new token, the LM head on the last position,
and the choice of the next token (greedy, or sampled with temperature, top-k and top-p, in the order
transformers applies them), each a small jitted function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.client.lora import LoraWeights
from jaxseq.models.decoder import lm_logits


def _as_ids(input_ids: Any) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be integer [batch, prompt] with at least one token per row (the rows of a batch have "
            f"equal length: pad or split them), got {ids.dtype} {list(ids.shape)}"
        )
    return ids


@functools.partial(jax.jit, static_argnames=("top_k",))
def warp(logits: jax.Array, temperature: float, top_k: int | None, top_p: float) -> jax.Array:
    """Logits of the next token as sampling sees them, as transformers' warpers make them: divided by the
    temperature, then all but the ``top_k`` largest set to -inf, then all but the smallest set of tokens
    whose probability reaches ``top_p`` (the most likely always kept).

    Example:
        >>> warp(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), 1.0, None, 0.6).tolist()[0][2] == -float("inf")
        True
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1 - top_p).at[..., -1].set(False)
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("eps", "do_sample", "top_k"))
def _next_tokens(
    last: jax.Array,
    unfinished: jax.Array,
    weights: tuple[jax.Array, jax.Array, jax.Array],
    key: jax.Array,
    sampling: tuple[float, float, int],
    *,
    eps: float,
    do_sample: bool,
    top_k: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The next tokens from the last position's hidden states (rows that have finished get ``pad``), their
    embeddings, and the key for the step after: the client's whole work per token, in one call."""
    norm, head, table = weights
    temperature, top_p, pad = sampling
    logits = lm_logits(last, norm, head, eps)
    if do_sample:
        key, step_key = jax.random.split(key)
        tokens = jax.random.categorical(step_key, warp(logits, temperature, top_k, top_p))
    else:
        tokens = jnp.argmax(logits, axis=-1)
    tokens = jnp.where(unfinished, tokens, pad)
    return tokens, table[tokens][:, None], key


def generate(
    model: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_tokens: Callable[[np.ndarray], bool | None] | None = None,
) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` with ``model`` (a ``DistributedCausalLM``).

    Returns ``[batch, prompt + new]`` token ids, as transformers does: greedy by default; with
    ``do_sample``, sampled from the warped logits (see ``warp``) with ``key`` (reproducible for a given
    key). A row that has produced an ``eos_token_id`` continues with ``pad_token_id`` (default: the first
    eos id), and generation stops when every row has. ``on_tokens`` is called with each step's new tokens
    ``[batch]`` (for streaming); when it returns True, generation ends there (a stop string, a client gone).

    Raises:
        ValueError: bad ids or options (the message says which).
    """
    ids = _as_ids(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 1)):
        raise ValueError(
            f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 1, got {temperature}, {top_p}, {top_k}"
        )
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    key = jax.random.key(0) if key is None else key
    batch, prompt = ids.shape
    hidden, prompts = model.embed(jnp.asarray(ids), with_prompts=True)
    weights = (model.norm[...], model.lm_head[...], model.embed_tokens[...])
    choice = dict(eps=model.config.rms_norm_eps, do_sample=do_sample, top_k=top_k)
    unfinished = np.ones(batch, bool)
    generated = []
    lora = model.lora_weights()
    host_lora = None if lora is None else LoraWeights.of({name: np.asarray(array) for name, array in lora.items()})
    max_length = hidden.shape[1] + max_new_tokens
    with model.manager.inference_session(max_length, batch, host_lora) as session:
        out = session.step(np.asarray(hidden), None if prompts is None else np.asarray(prompts))
        for _ in range(max_new_tokens):
            chosen, embedded, key = _next_tokens(
                out[:, -1], unfinished, weights, key, (temperature, top_p, pad), **choice
            )
            tokens = np.asarray(chosen).astype(ids.dtype)
            generated.append(tokens)
            stop = on_tokens(tokens) if on_tokens is not None else False
            unfinished &= ~np.isin(tokens, eos)
            if stop or not unfinished.any() or len(generated) == max_new_tokens:
                break
            out = session.step(np.asarray(embedded))
    return np.concatenate([ids, np.stack(generated, axis=1)], axis=1)
