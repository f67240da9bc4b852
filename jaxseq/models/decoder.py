"""A decoder block as pure JAX functions, computed as Hugging Face's Llama, Mistral, Qwen2, Qwen3 and
Mixtral layers compute it: pre-norm attention (grouped queries, optional q/k/v/o biases, optional
per-head q/k norms, causal or sliding-window) and a SwiGLU MLP (dense, or a sparse mixture of experts),
each with a residual. ``ModelConfig``'s fields switch the features; each family (``jaxseq.models.family``)
names the block function it computes with.

A block's parameters are a dict of arrays (``BlockParams``); matrices are stored ``[in, out]`` (the
transpose of torch's ``nn.Linear`` weight), experts ``[num_experts, in, out]``. A span is a Python loop
over its blocks inside one ``jit``: no parameter is copied or stacked per call, which matters when a
block weighs tens of megabytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxseq.models.config import ModelConfig

BlockParams = dict[str, jax.Array]
# A projection's LoRA pair, when a block has one, is under these names (``jaxseq.models.lora``).
LORA_A, LORA_B = "{}_lora_a", "{}_lora_b"
# One block: (config, its parameters, hidden states, rotary cos, rotary sin, attention window) -> hidden states
BlockFunction = Callable[[ModelConfig, BlockParams, jax.Array, jax.Array, jax.Array, int], jax.Array]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 as Hugging Face does.

    Example:
        >>> [round(float(v), 3) for v in rms_norm(jnp.array([3.0, 4.0]), jnp.ones(2), 1e-6)]
        [0.849, 1.131]
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def lm_logits(hidden: jax.Array, norm: jax.Array, lm_head: jax.Array, eps: float) -> jax.Array:
    """The LM head: logits of the last block's hidden states (the final norm, then the vocabulary's matrix)."""
    return rms_norm(hidden, norm, eps) @ lm_head


def inverse_frequencies(cfg: ModelConfig, seq_len: jax.Array | int) -> jax.Array:
    """The rotary embedding's inverse frequencies ``[head_dim // 2]``, float32, for a sequence of
    ``seq_len`` positions (only ``"dynamic"`` scaling depends on it; it may be traced).

    Example:
        >>> cfg = ModelConfig(hidden_size=8, intermediate_size=8, num_attention_heads=2,
        ...                   num_key_value_heads=2, num_hidden_layers=1)
        >>> inverse_frequencies(cfg, 4).tolist()
        [1.0, 0.009999999776482582]
    """
    d = cfg.head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.type == "dynamic":
        # NTK: a larger base once the sequence outgrows max_position_embeddings
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(cfg.max_position_embeddings))
        ratio = scaling.factor * length / cfg.max_position_embeddings - (scaling.factor - 1)
        return 1.0 / ((cfg.rope_theta * ratio ** (d / (d - 2))) ** exponents)
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by ``factor``, short ones kept, those between interpolated
    old_context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_context / scaling.high_freq_factor) & (wavelen <= old_context / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rotary(cfg: ModelConfig, positions: jax.Array, seq_len: jax.Array | int, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` ``[*positions.shape, head_dim]`` of the rotary embedding, in ``dtype``: of
    ``positions: [seq]`` in a sequence of ``seq_len``, or of ``positions: [batch, seq]``, row ``r`` in a
    sequence of ``seq_len[r]``."""
    if positions.ndim == 1:
        inv_freq = inverse_frequencies(cfg, seq_len)
    else:
        inv_freq = jax.vmap(lambda n: inverse_frequencies(cfg, n))(seq_len)[:, None, :]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _linear(p: BlockParams, name: str, h: jax.Array) -> jax.Array:
    """The projection ``name`` of ``h``: its matrix, its bias if any, and its LoRA pair if any
    (``jaxseq.models.lora``: ``B`` holds the adapter's scaling), summed in ``peft``'s order."""
    out = h @ p[name]
    bias = p.get(f"{name}_bias")
    out = out if bias is None else out + bias
    lora_a = p.get(LORA_A.format(name))
    return out if lora_a is None else out + (h @ lora_a) @ p[LORA_B.format(name)]


def _queries_keys_values(
    cfg: ModelConfig, p: BlockParams, h: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``[batch, seq, heads, head_dim]``, and keys and values ``[batch, seq, kv_heads, head_dim]``,
    of normed hidden states, the rotary embedding (``cos``, ``sin`` of their positions, ``[seq, head_dim]``
    or per row ``[batch, seq, head_dim]``) applied."""
    batch, seq, _ = h.shape
    d, n_heads, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = _linear(p, "q_proj", h).reshape(batch, seq, n_heads, d)
    k = _linear(p, "k_proj", h).reshape(batch, seq, n_kv, d)
    v = _linear(p, "v_proj", h).reshape(batch, seq, n_kv, d)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    cos, sin = jnp.broadcast_to(cos, (batch, seq, d))[:, :, None], jnp.broadcast_to(sin, (batch, seq, d))[:, :, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _attend(
    cfg: ModelConfig, p: BlockParams, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array
) -> jax.Array:
    """Grouped-query attention of ``q`` over ``k`` and ``v`` where ``visible[query, key]`` (or per row,
    ``visible[batch, 1, query, key]``), and the output projection."""
    batch, seq, n_heads, d = q.shape
    groups = n_heads // cfg.num_key_value_heads
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5)
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, n_heads * d)
    return _linear(p, "o_proj", out)


def _visible(query: jax.Array, key: jax.Array, window: int) -> jax.Array:
    """Which keys each query sees (``[*query.shape, len(key)]``): its own position and earlier ones, within
    ``window`` when it is set."""
    visible = key <= query[..., None]
    return visible & (key > query[..., None] - window) if window else visible


def attention(cfg: ModelConfig, p: BlockParams, h: jax.Array, cos: jax.Array, sin: jax.Array, window: int) -> jax.Array:
    """Causal self-attention of normed hidden states ``h: [batch, seq, hidden]``; ``window`` > 0 lets each
    position see only the last ``window`` positions, itself included."""
    q, k, v = _queries_keys_values(cfg, p, h, cos, sin)
    positions = jnp.arange(h.shape[1])
    return _attend(cfg, p, q, k, v, _visible(positions, positions, window))


# A block's keys and values, ``[batch, kv_heads, length, head_dim]`` each: head-major, the layout attention's
# products read without a transposed copy of the whole cache per step.
KVCache = tuple[jax.Array, jax.Array]


def cached_attention(
    cfg: ModelConfig,
    p: BlockParams,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    window: int,
    cache: KVCache,
    positions: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """``attention`` of new positions of normed hidden states ``h: [batch, seq, hidden]``, row ``r``'s at
    ``positions[r]..positions[r]+seq-1``, over those before them, whose keys and values ``cache`` holds;
    returns the output and the cache with the new keys and values written in their places."""
    q, k, v = _queries_keys_values(cfg, p, h, cos, sin)
    batch, seq, n_heads, d = q.shape
    kv_heads = cfg.num_key_value_heads
    write = jax.vmap(
        lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, jnp.swapaxes(new, 0, 1).astype(c.dtype), at, 1)
    )
    keys, values = write(cache[0], k, positions), write(cache[1], v, positions)
    visible = _visible(positions[:, None] + jnp.arange(seq), jnp.arange(keys.shape[2]), window)  # [batch, seq, len]
    # The query heads that share a key/value head go together, so that the cache is never repeated per head.
    grouped = q.reshape(batch, seq, kv_heads, n_heads // kv_heads, d)
    scores = jnp.einsum("bskgd,bkld->bkgsl", grouped, keys) * (d**-0.5)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgsl,bkld->bskgd", weights, values).reshape(batch, seq, n_heads * d)
    return _linear(p, "o_proj", out), (keys, values)


def dense_mlp(cfg: ModelConfig, p: BlockParams, h: jax.Array) -> jax.Array:
    """SwiGLU: ``down(silu(gate(h)) * up(h))``."""
    return _linear(p, "down_proj", jax.nn.silu(_linear(p, "gate_proj", h)) * _linear(p, "up_proj", h))


def sparse_moe(cfg: ModelConfig, p: BlockParams, h: jax.Array) -> jax.Array:
    """Mixtral's sparse mixture of SwiGLU experts, as transformers computes it: a router softmax in
    float32, the top ``num_experts_per_token`` experts per token with their weights renormalised, and
    each expert's output scaled by its weight.

    Each expert computes only on the tokens routed to it, without a loop over tokens: the (token, expert)
    pairs are sorted by expert into tiles of one expert each (``_expert_tiles``), and a loop over the
    tiles, a fixed number for a given shape, computes each tile with its expert's weights. For the
    backward, a tile keeps its two hidden projections and takes its expert's weights again rather than
    keeping a copy of them per tile (which made a forward's saved activations larger than the weights)."""
    batch, seq, hidden = h.shape
    k = cfg.num_experts_per_token
    tokens = h.reshape(-1, hidden)
    probs = jax.nn.softmax((tokens @ p["router"]).astype(jnp.float32), axis=-1)
    top_weights, top_experts = jax.lax.top_k(probs, k)
    top_weights = top_weights / top_weights.sum(axis=-1, keepdims=True)
    choices = top_experts.reshape(-1)  # token t's j-th choice is pair t * k + j
    tile = _tile_rows(choices.shape[0], cfg.num_experts)
    places, tile_experts = _expert_tiles(choices, cfg.num_experts, tile)
    rows = (
        jnp.zeros((tile_experts.shape[0] * tile, hidden), h.dtype)
        .at[places]
        .set(tokens[jnp.arange(choices.shape[0]) // k])
    )

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("gate", "up"))
    def expert(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, e = args
        gate = checkpoint_name(x @ p["experts_gate"][e], "gate")
        up = checkpoint_name(x @ p["experts_up"][e], "up")
        return (jax.nn.silu(gate) * up) @ p["experts_down"][e]

    out = jax.lax.map(expert, (rows.reshape(-1, tile, hidden), tile_experts)).reshape(-1, hidden)[places]
    weighted = (out.astype(jnp.float32) * top_weights.reshape(-1, 1)).astype(h.dtype)
    return weighted.reshape(-1, k, hidden).sum(axis=1).reshape(batch, seq, hidden)


def _tile_rows(pairs: int, num_experts: int) -> int:
    """Rows per tile: about a quarter of an expert's even share, a power of two within 8..256 (each expert
    pads its rows to whole tiles, so smaller tiles waste less and larger ones loop less)."""
    return int(min(256, max(8, 2 ** math.floor(math.log2(max(pairs // (4 * num_experts), 1))))))


def _expert_tiles(choices: jax.Array, num_experts: int, tile: int) -> tuple[jax.Array, jax.Array]:
    """Where each (token, expert) pair goes when pairs are grouped by expert and each expert's group is
    padded to whole tiles of ``tile`` rows, and the expert of each tile. There are always
    ``ceil(pairs / tile) + num_experts`` tiles (enough for any routing); the unused ones are empty.

    Example:
        >>> places, experts = _expert_tiles(jnp.array([1, 0, 1, 1]), num_experts=2, tile=2)
        >>> places.tolist(), experts.tolist()
        ([2, 0, 3, 4], [0, 1, 1, 1])
    """
    pairs = choices.shape[0]
    sizes = jnp.bincount(choices, length=num_experts)
    padded = -(-sizes // tile) * tile
    first_row = jnp.cumsum(padded) - padded  # of each expert's group
    rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[jnp.sort(choices)]  # within its group, pairs in sorted order
    order = jnp.argsort(choices, stable=True)
    places = jnp.zeros(pairs, jnp.int32).at[order].set((first_row[jnp.sort(choices)] + rank).astype(jnp.int32))
    tiles = -(-pairs // tile) + num_experts
    tile_starts = jnp.arange(tiles) * tile
    tile_experts = jnp.searchsorted(jnp.cumsum(padded), tile_starts, side="right")
    return places, jnp.minimum(tile_experts, num_experts - 1).astype(jnp.int32)


def _mlp_residual(cfg: ModelConfig, p: BlockParams, x: jax.Array) -> jax.Array:
    h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
    return x + (sparse_moe(cfg, p, h) if cfg.num_experts else dense_mlp(cfg, p, h))


def decoder_block(
    cfg: ModelConfig, p: BlockParams, x: jax.Array, cos: jax.Array, sin: jax.Array, window: int
) -> jax.Array:
    """One decoder layer: pre-norm attention and MLP (dense, or experts when ``cfg.num_experts``), each
    with a residual."""
    x = x + attention(cfg, p, rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), cos, sin, window)
    return _mlp_residual(cfg, p, x)


def decoder_block_step(
    cfg: ModelConfig,
    p: BlockParams,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    window: int,
    cache: KVCache,
    positions: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """``decoder_block`` of new positions (row ``r``'s from ``positions[r]`` on), attending over the cached
    earlier ones."""
    h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
    out, cache = cached_attention(cfg, p, h, cos, sin, window, cache, positions)
    return _mlp_residual(cfg, p, x + out), cache


def run_span(
    block: BlockFunction,
    cfg: ModelConfig,
    blocks: Sequence[BlockParams],
    x: jax.Array,
    prompts: jax.Array,
    windows: Sequence[int],
    seq_len: jax.Array | int,
) -> jax.Array:
    """Run ``blocks`` in order; before block i, ``x[:, :prompt_len] += prompts[i]``.

    ``prompts`` is ``[len(blocks), batch, prompt_len, hidden]`` (``prompt_len`` may be 0); ``windows``
    the blocks' attention windows (static); ``seq_len`` the number of real positions, which ``x`` may
    exceed with padding at the end (it may be traced: only dynamic rope scaling reads it).
    """
    cos, sin = rotary(cfg, jnp.arange(x.shape[1]), seq_len, x.dtype)
    prompt_len = prompts.shape[2]
    for i, p in enumerate(blocks):
        if prompt_len:
            x = x.at[:, :prompt_len].add(prompts[i].astype(x.dtype))
        x = block(cfg, p, x, cos, sin, windows[i])
    return x


# One block's step of inference: ``BlockFunction``'s arguments and the block's cache and each row's position
# of the new hidden states -> their outputs and the updated cache
BlockStepFunction = Callable[..., tuple[jax.Array, KVCache]]


def run_span_step(
    block_step: BlockStepFunction,
    cfg: ModelConfig,
    blocks: Sequence[BlockParams],
    x: jax.Array,
    prompts: jax.Array,
    windows: Sequence[int],
    caches: Sequence[KVCache],
    positions: jax.Array,
    seq_lens: jax.Array,
    hypo_ids: jax.Array | None = None,
) -> tuple[jax.Array, list[KVCache]]:
    """One step of inference through ``blocks``: new hidden states ``x: [batch, n, hidden]``, row ``r``'s at
    positions ``positions[r]..positions[r]+n-1`` (rows may be at different positions: sessions batched
    together), given the blocks' caches of the positions before. The caches' rows are first taken in the
    order of ``hypo_ids``, if given (beam search); before block i, ``x[:, :prompt_len] += prompts[i]``, as
    ``run_span`` does (deep prompts go with the step that holds their positions). ``seq_lens[r]`` is
    ``positions[r]`` plus row ``r``'s number of real new positions (``x`` may be padded).

    Example:
        >>> caches = [(jnp.zeros((2, 2, 8, 8)), jnp.zeros((2, 2, 8, 8))) for _ in params]  # [batch, kv, len, d]
        >>> x = jnp.ones((2, 1, 32))
        >>> no_prompts = jnp.zeros((len(params), 2, 0, 32))
        >>> out, caches = run_span_step(decoder_block_step, cfg, params, x, no_prompts, [0] * len(params), caches,
        ...                             jnp.array([0, 3]), jnp.array([1, 4]))
        >>> out.shape, [int(jnp.abs(caches[0][0][row]).sum(axis=(0, 2)).argmax()) for row in range(2)]
        ((2, 1, 32), [0, 3])
    """
    if hypo_ids is not None:
        caches = [(k[hypo_ids], v[hypo_ids]) for k, v in caches]
    cos, sin = rotary(cfg, positions[:, None] + jnp.arange(x.shape[1]), seq_lens, x.dtype)
    prompt_len = prompts.shape[2]
    updated = []
    for i, (p, cache) in enumerate(zip(blocks, caches)):
        if prompt_len:
            x = x.at[:, :prompt_len].add(prompts[i].astype(x.dtype))
        x, cache = block_step(cfg, p, x, cos, sin, windows[i], cache, positions)
        updated.append(cache)
    return x, updated
