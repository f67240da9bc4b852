"""What a server computes: a contiguous range of blocks, forward and backward, jit-compiled.

Shapes are bucketed so that a server compiles a bounded number of functions whatever batch and
sequence lengths clients send: batch and sequence are padded up to a bucket (at most four per
power of two, so at most 25% padding) and the result is sliced back. Padding is exact: rows are
independent, and causal attention means padded positions at the end never reach real ones.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.arrays import copy_padded
from jaxseq.memory import MemoryPool, PrivateMemory, round_up
from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import BlockParams, run_span, run_span_step
from jaxseq.models.lora import Adapter, on_device, with_adapter
from jaxseq.models.registry import family_of
from jaxseq.server.activation_cache import ActivationCache, CacheMiss
from jaxseq.server.attention_cache import PAGE_TOKENS, AttentionCache, SessionCache, pages_for
from jaxseq.server.config import ServerConfig
from jaxseq.server.lora_store import HeldLora


def power_of_two(n: int) -> int:
    """Smallest power of two >= n.

    Example:
        >>> [power_of_two(n) for n in (1, 3, 8, 9)]
        [1, 4, 8, 16]
    """
    return 1 << (n - 1).bit_length()


def bucket(n: int) -> int:
    """Smallest bucket size >= n: exact up to 8, then multiples of a quarter of the power of two below n.

    Example:
        >>> [bucket(n) for n in (1, 7, 9, 100, 128, 129)]
        [1, 7, 10, 112, 128, 160]
    """
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return round_up(n, step)


class BlockBackend:
    """Blocks ``start..start+len(blocks)-1`` of a model, ready to run any sub-span of them.

    Example:
        >>> cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2)
        >>> from jaxseq.models.blocks import init_block_params
        >>> backend = BlockBackend(cfg, init_block_params(cfg, jax.random.key(0)))
        >>> backend.forward(np.ones((1, 3, 64), np.float32), np.zeros((2, 1, 0, 64), np.float32), 0, 2).shape
        (1, 3, 64)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        blocks: Sequence[BlockParams],
        start: int = 0,
        *,
        cache_bytes: int = int(ServerConfig.cache_mb * 2**20),
        cache_ttl: float = ServerConfig.cache_ttl,
        attn_cache_tokens: int | None = None,
        device: jax.Device | None = None,
        adapters: Sequence[Adapter] = (),
    ):
        self.cfg = cfg
        self.start = start
        self.device = device  # where the blocks live and compute; None: JAX's default device
        self.blocks = [jax.device_put(b, device) for b in blocks]
        # LoRA adapters by name, each of exactly these blocks; "" (no adapter) leaves the blocks alone
        self.adapters: dict[str, Adapter] = {}
        for adapter in adapters:
            if adapter.name in ("", *self.adapters):
                raise ValueError(f"adapter names must be unique and not empty; {adapter.name!r} is not")
            if (adapter.start, len(adapter.blocks)) != (start, len(blocks)):
                raise ValueError(f"adapter {adapter.name!r} is not of blocks {start}:{self.end}, which this serves")
            self.adapters[adapter.name] = on_device(adapter, device)
        weights = jax.tree.leaves((self.blocks, [adapter.blocks for adapter in self.adapters.values()]))
        self.cache = ActivationCache(cache_bytes, cache_ttl, held_elsewhere=weights)
        self.dtype = self.blocks[0]["q_proj"].dtype
        self._compiled: set[tuple] = set()
        self._lock = threading.Lock()
        # A forward stages 2 inputs, its backward 1 (cached) or 3: enough idle memory for a cycle.
        self._staging = MemoryPool(PrivateMemory.create, max_idle=4)
        # Seconds spent moving inputs into the blocks' memory and results out of it, in all: part of
        # moving the data, not of computing on it (servers report it so).
        self.transfer_s = 0.0
        # The attention cache's pages, per block (see ``attention_cache``): booked here, and their arrays,
        # ``[1 + pages, kv_heads, PAGE_TOKENS, head_dim]`` keys and values per block, made on first use.
        tokens = attn_cache_tokens or default_attn_cache_tokens(cfg)
        self.attention_cache = AttentionCache(len(self.blocks), pages_for(tokens))
        self._pages: list[tuple[jax.Array, jax.Array]] = []
        self._pages_lock = threading.Lock()  # one step at a time writes them (each donates and replaces them)

        family = family_of(cfg)
        block = family.block

        # ``windows`` (the blocks' attention windows) is static; ``seq_len``, the positions before padding, is
        # traced: it moves dynamic rope scaling only, and must not make a compile per length. ``lora``: each
        # block's client LoRA arrays (empty dicts for none), an argument apart so that backward differentiates it.
        def forward(windows, blocks, lora, x, prompts, seq_len):
            return run_span(block, cfg, with_adapter(blocks, lora), x, prompts, windows, seq_len)

        def backward(windows, blocks, lora, x, prompts, seq_len, grad_out):
            _, vjp = jax.vjp(lambda x_, p_, l_: forward(windows, blocks, l_, x_, p_, seq_len), x, prompts, lora)
            return vjp(grad_out)

        self._forward = jax.jit(forward, static_argnums=0)
        self._backward = jax.jit(backward, static_argnums=0)

        # One step of sessions batched together: each row's keys and values are gathered from its pages (stale
        # positions zeroed: a page may have served another session), run, and the new ones written back to the
        # pages, which are donated so that this happens in place; rows that ``order`` moved (beam search) are
        # written back whole. A page is ``[kv_heads, PAGE_TOKENS, head_dim]``: a row's pages side by side
        # along their second axis are the head-major cache ``run_span_step`` reads.
        def step(windows, reorder, blocks, pages, x, prompts, tables, positions, seq_lens, order):
            rows, n = x.shape[:2]
            length = tables.shape[2] * PAGE_TOKENS
            filled = (jnp.arange(length) < positions[:, None])[:, None, :, None]

            def gathered(a, table):
                heads_first = jnp.swapaxes(a[table], 1, 2)  # [rows, kv, pages, PAGE_TOKENS, d]
                return jnp.where(filled, heads_first.reshape(rows, a.shape[1], length, a.shape[3]), 0)

            caches = [(gathered(k, table), gathered(v, table)) for (k, v), table in zip(pages, tables)]
            out, caches = run_span_step(
                family.block_step, cfg, blocks, x, prompts, windows, caches, positions, seq_lens,
                order if reorder else None,
            )  # fmt: skip
            new = positions[:, None] + jnp.arange(n)  # [rows, n]: the positions this step wrote
            written = []
            for pair, table, cache in zip(pages, tables, caches):
                if reorder:
                    written.append(tuple(
                        a.at[table.reshape(-1)].set(
                            jnp.swapaxes(c.reshape(rows, a.shape[1], -1, PAGE_TOKENS, a.shape[3]), 1, 2)
                            .reshape(-1, *a.shape[1:])
                        )
                        for a, c in zip(pair, cache)
                    ))  # fmt: skip
                else:
                    page = jnp.take_along_axis(table, new // PAGE_TOKENS, axis=1)
                    written.append(tuple(
                        a.at[page, :, new % PAGE_TOKENS].set(
                            jnp.swapaxes(jnp.take_along_axis(c, new[:, None, :, None], axis=2), 1, 2)
                        )
                        for a, c in zip(pair, cache)
                    ))  # fmt: skip
            return out, written

        self._step = jax.jit(step, static_argnums=(0, 1), donate_argnums=3)

    @property
    def end(self) -> int:
        return self.start + len(self.blocks)

    @property
    def compile_count(self) -> int:
        """Distinct (stage, span's attention windows, adapter's shapes, shape bucket) combinations compiled so far."""
        return len(self._compiled)

    def _span(self, start: int, end: int, adapter: str = "") -> list[BlockParams]:
        """Blocks ``start..end-1``'s parameters, with ``adapter``'s LoRA pairs where it has them."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not all within the served blocks {self.start}:{self.end}")
        blocks = self.blocks[start - self.start : end - self.start]
        if not adapter:
            return blocks
        return with_adapter(blocks, self._adapter(adapter).blocks[start - self.start : end - self.start])

    def _adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise ValueError(f"adapter {name[:100]!r} not found: this server serves {self.adapter_names or 'none'}")
        return self.adapters[name]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters served, by the names requests pick them with (and servers announce)."""
        return tuple(self.adapters)

    def _windows(self, start: int, end: int) -> tuple[int, ...]:
        return tuple(self.cfg.window(block) for block in range(start, end))

    def _padded(
        self,
        stage: str,
        start: int,
        end: int,
        adapter: str,
        lora: HeldLora | None,
        x: np.ndarray,
        prompts: np.ndarray,
        *extra: np.ndarray,
    ):
        batch, seq, _ = x.shape
        sizes = {0: bucket(batch), 1: bucket(seq)}
        x_p = self._padded_copy(x, sizes)
        prompts_p = self._padded_copy(prompts, {1: sizes[0]})
        extra_p = [self._padded_copy(e, sizes) for e in extra]
        self._count_compile(stage, start, end, adapter, lora, x_p.shape, prompts_p.shape)
        return x_p, prompts_p, extra_p

    def _padded_copy(self, a: np.ndarray, axis_sizes: dict[int, int]) -> jax.Array:
        """``a`` in the blocks' dtype, zero-padded to ``axis_sizes``, in memory the server owns on its
        device. Inputs may be views of a client's shared memory, which it rewrites after the reply while
        the cache still holds them, and ``jax.device_put`` aliases aligned views (even with
        ``may_alias=False``): so always a copy, in reused memory (``jaxseq.memory``) that a CPU device
        adopts without copying again."""
        started = time.perf_counter()
        staged = self._staging.empty([axis_sizes.get(axis, n) for axis, n in enumerate(a.shape)], self.dtype)
        placed = jax.device_put(copy_padded(a, staged), self.device).block_until_ready()
        self._count_transfer(started)
        return placed

    def _on_host(self, a: jax.Array, leading: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        """``a[leading]`` (the part of a padded result that was asked for) in host memory as ``dtype``."""
        a.block_until_ready()  # what follows is the transfer, not the computation that makes ``a``
        started = time.perf_counter()
        host = np.asarray(a)[leading].astype(dtype, copy=False)
        self._count_transfer(started)
        return host

    def _count_transfer(self, started: float) -> None:
        with self._lock:
            self.transfer_s += time.perf_counter() - started

    def _count_compile(
        self,
        stage: str,
        start: int,
        end: int,
        adapter: str,
        lora: HeldLora | None,
        x_shape: tuple,
        prompts_shape: tuple,
    ) -> None:
        # adapters of the same shapes share their compiled functions: their arrays are arguments
        shapes = self._adapter(adapter).shapes(start, end) if adapter else ()
        lora_shapes = lora.shapes() if lora else ()
        with self._lock:
            self._compiled.add((stage, self._windows(start, end), shapes, lora_shapes, x_shape, prompts_shape))

    def _lora(self, start: int, end: int, adapter: str, lora: HeldLora | None) -> list[BlockParams]:
        """Each block's client LoRA arrays for a call (empty for none), after refusing one that can't apply."""
        if lora is None:
            return [{} for _ in range(start, end)]
        if adapter:
            raise ValueError(f"a client's LoRA weights and the server's adapter {adapter[:100]!r} can't be combined")
        if len(lora.blocks) != end - start:
            raise ValueError(f"LoRA weights of {len(lora.blocks)} blocks were named for blocks {start}:{end}")
        return list(lora.blocks)

    def forward(
        self,
        x: np.ndarray,
        prompts: np.ndarray,
        start: int,
        end: int,
        cache_key: Hashable | None = None,
        adapter: str = "",
        lora: HeldLora | None = None,
    ) -> np.ndarray:
        """Hidden states after blocks ``start..end-1``; ``prompts`` is ``[end-start, batch, prompt_len, hidden]``;
        ``adapter``: the name of a LoRA adapter of this backend's to apply, or "" for none; ``lora``: a client's
        LoRA weights of these blocks to apply instead, or None.

        With ``cache_key``, the activations are kept (see ``ActivationCache``) so that a backward
        with the same key, adapter, LoRA weights and inputs needn't recompute the forward.
        """
        batch, seq, _ = x.shape
        x_p, prompts_p, _ = self._padded("forward", start, end, adapter, lora, x, prompts)
        blocks, windows, seq_len = self._span(start, end, adapter), self._windows(start, end), np.int32(seq)
        lora_blocks = self._lora(start, end, adapter, lora)
        if cache_key is None:
            out = self._forward(windows, blocks, lora_blocks, x_p, prompts_p, seq_len)
        else:
            out, vjp = jax.vjp(
                lambda x_, p_, l_: self._forward(windows, blocks, l_, x_, p_, seq_len), x_p, prompts_p, lora_blocks
            )
            key = _cache_entry(cache_key, start, end, adapter, lora)
            self.cache.put(key, x_p, prompts_p, vjp, x.shape, (x.dtype, prompts.dtype))
        return self._on_host(out, (slice(batch), slice(seq)), x.dtype)

    def backward(
        self,
        x: np.ndarray,
        prompts: np.ndarray,
        grad_out: np.ndarray,
        start: int,
        end: int,
        cache_key: Hashable | None = None,
        adapter: str = "",
        lora: HeldLora | None = None,
    ) -> Gradients:
        """Gradients w.r.t. the span's inputs, (if ``prompt_len > 0``) its prompts, and (with ``lora``) the LoRA
        arrays, with ``adapter`` or ``lora`` applied."""
        x_p, prompts_p, (grad_p,) = self._padded("backward", start, end, adapter, lora, x, prompts, grad_out)
        key = _cache_entry(cache_key, start, end, adapter, lora)
        saved = None if cache_key is None else self.cache.take(key, x_p, prompts_p)
        if saved is not None:
            grads = saved.vjp(grad_p)
        else:
            seq_len, blocks, lora_blocks = (
                np.int32(x.shape[1]),
                self._span(start, end, adapter),
                self._lora(start, end, adapter, lora),
            )
            grads = self._backward(self._windows(start, end), blocks, lora_blocks, x_p, prompts_p, seq_len, grad_p)
        return self._unpadded(grads, x.shape, (x.dtype, prompts.dtype), prompts.shape[2], lora is not None)

    def backward_of_cached(
        self,
        grad_out: np.ndarray,
        start: int,
        end: int,
        cache_key: Hashable,
        adapter: str = "",
        lora: HeldLora | None = None,
    ) -> Gradients:
        """``backward`` of the forward kept under ``cache_key`` (with the same ``adapter`` and ``lora``), whose
        inputs needn't be sent again.

        Raises ``CacheMiss`` when none is kept (evicted, expired, or computed elsewhere).
        """
        saved = self.cache.take(_cache_entry(cache_key, start, end, adapter, lora))
        if saved is None:
            raise CacheMiss(f"no forward of blocks {start}:{end} is kept under this cache id; send the inputs")
        if grad_out.shape != saved.shape:
            raise ValueError(
                f"grad outputs have shape {list(grad_out.shape)}, but the forward's inputs had {list(saved.shape)}"
            )
        padded_shape = saved.x.shape
        grad_p = self._padded_copy(grad_out, {0: padded_shape[0], 1: padded_shape[1]})
        self._count_compile("backward", start, end, adapter, lora, padded_shape, saved.prompts.shape)
        return self._unpadded(saved.vjp(grad_p), saved.shape, saved.dtypes, saved.prompts.shape[2], lora is not None)

    def _unpadded(self, grads: tuple, shape: tuple, dtypes: tuple, prompt_len: int, with_lora: bool) -> Gradients:
        """Gradients sliced back to the inputs' ``shape`` and cast to their ``dtypes`` (None for empty prompts);
        the LoRA arrays' as float32 (None without them)."""
        batch, seq = shape[:2]
        grad_x = self._on_host(grads[0], (slice(batch), slice(seq)), dtypes[0])
        grad_prompts = None if prompt_len == 0 else self._on_host(grads[1], (slice(None), slice(batch)), dtypes[1])
        grad_lora = None
        if with_lora:
            grad_lora = [{k: self._on_host(v, (), np.dtype(np.float32)) for k, v in b.items()} for b in grads[2]]
        return Gradients(grad_x, grad_prompts, grad_lora)

    # --- inference ------------------------------------------------------------------------------
    async def open_session(
        self,
        batch: int,
        max_length: int,
        start: int,
        end: int,
        timeout: float,
        adapter: str = "",
        lora: HeldLora | None = None,
    ) -> SessionCache:
        """A session of ``batch`` rows and ``max_length`` positions through blocks ``start..end-1`` (all its steps
        with ``adapter`` or a client's ``lora``, as Petals' sessions): its pages in the attention cache, waited
        for up to ``timeout`` seconds (else ``CacheFull``). ``close()`` it."""
        self._span(start, end, adapter)
        self._lora(start, end, adapter, lora)
        blocks = range(start - self.start, end - self.start)
        per_row = pages_for(max_length)
        pages = await self.attention_cache.allocate(blocks, batch * per_row, timeout)
        return SessionCache(start, end, batch, max_length, pages.reshape(len(blocks), batch, per_row),
                            self.attention_cache, blocks, adapter=adapter, lora=lora)  # fmt: skip

    def no_prompts(self, session: SessionCache) -> np.ndarray:
        """Empty deep prompts for a step of ``session``."""
        return np.zeros((session.end - session.start, session.batch, 0, self.cfg.hidden_size), self.dtype)

    def inference_steps(self, steps: Sequence[SessionStep]) -> list[np.ndarray]:
        """The outputs of each step of ``steps`` (of sessions through the same blocks, each at most once), computed
        together: blocks ``session.start..session.end-1`` of new hidden states ``x: [batch, n, hidden]`` at
        positions ``session.position..+n-1``, attending over the session's earlier positions; the new keys
        and values are kept, and each session's position advances by its ``n``. ``prompts`` (``[blocks,
        batch, prompt_len, hidden]``) are added before each block to the step's first positions;
        ``hypo_ids`` first reorder the session's rows (beam search)."""
        first = steps[0].session
        start, end, adapter, lora = first.start, first.end, first.adapter, first.lora
        n_max = max(step.x.shape[1] for step in steps)
        n = bucket(n_max) if all(s.session.position + bucket(n_max) <= s.session.capacity for s in steps) else n_max
        # Rows and pages per row vary with who is batched together: powers of two keep their compiles few.
        rows = power_of_two(sum(step.session.batch for step in steps))
        width = power_of_two(max(step.session.pages.shape[2] for step in steps))
        prompt_len = max(step.prompts.shape[2] for step in steps)
        started = time.perf_counter()
        x = np.zeros((rows, n, self.cfg.hidden_size), self.dtype)
        prompts = np.zeros((end - start, rows, prompt_len, self.cfg.hidden_size), self.dtype)
        tables = np.zeros((end - start, rows, width), np.int32)  # page 0: scratch, for padding rows
        positions, seq_lens, order = np.zeros(rows, np.int32), np.ones(rows, np.int32), np.arange(rows, dtype=np.int32)
        row = 0
        for step in steps:
            session, batch, new = step.session, step.session.batch, step.x.shape[1]
            if session.group != first.group or session.pages.shape[2] == 0:
                raise ValueError("steps computed together must be of open sessions through the same blocks and LoRA")
            place = slice(row, row + batch)
            x[place, :new] = step.x
            prompts[:, place, : step.prompts.shape[2]] = step.prompts
            tables[:, place, : session.pages.shape[2]] = session.pages
            positions[place], seq_lens[place] = session.position, session.position + new
            if step.hypo_ids is not None:
                order[place] = row + step.hypo_ids
            row += batch
        reorder = any(step.hypo_ids is not None for step in steps)
        inputs = jax.device_put((x, prompts, tables, positions, seq_lens, order), self.device)  # one transfer
        self._count_transfer(started)
        windows = self._windows(start, end)
        blocks = with_adapter(self._span(start, end, adapter), self._lora(start, end, adapter, lora))
        self._count_compile("step", start, end, adapter, lora, (reorder, *x.shape), (*prompts.shape, width))
        with self._pages_lock:
            if not self._pages:
                self._pages = self._empty_pages()
            span = slice(start - self.start, end - self.start)
            out, self._pages[span] = self._step(windows, reorder, blocks, self._pages[span], *inputs)
        outputs, row = [], 0
        for step in steps:
            batch, new = step.session.batch, step.x.shape[1]
            outputs.append(self._on_host(out, (slice(row, row + batch), slice(new)), step.x.dtype))
            step.session.position += new
            row += batch
        return outputs

    def inference_step(
        self, session: SessionCache, x: np.ndarray, prompts: np.ndarray, hypo_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """``inference_steps`` of one session's step."""
        return self.inference_steps([SessionStep(session, x, prompts, hypo_ids)])[0]

    def _empty_pages(self) -> list[tuple[jax.Array, jax.Array]]:
        shape = (1 + self.attention_cache.pages_per_block, self.cfg.num_key_value_heads, PAGE_TOKENS, self.cfg.head_dim)
        return [
            (
                jax.device_put(np.zeros(shape, self.dtype), self.device),
                jax.device_put(np.zeros(shape, self.dtype), self.device),
            )
            for _ in self.blocks
        ]


class Gradients(NamedTuple):
    """A span's backward: gradients w.r.t. its inputs, its prompts (None without any) and a client's LoRA arrays
    (each block's, by name; None without any)."""

    inputs: np.ndarray
    prompts: np.ndarray | None
    lora: list[dict[str, np.ndarray]] | None

    def as_reply(self) -> list[np.ndarray]:
        """The tensors of a backward's reply, in order: inputs', prompts' (if any), then each block's LoRA
        arrays' by name."""
        prompts = [] if self.prompts is None else [self.prompts]
        return [self.inputs, *prompts, *[block[name] for block in self.lora or () for name in sorted(block)]]


@dataclasses.dataclass(frozen=True)
class SessionStep:
    """One step of a session: new hidden states ``x: [batch, n, hidden]``, deep prompts ``[blocks, batch,
    prompt_len, hidden]``, and ``hypo_ids`` (the rows' new order, or None)."""

    session: SessionCache
    x: np.ndarray
    prompts: np.ndarray
    hypo_ids: np.ndarray | None = None


def _cache_entry(cache_key: Hashable, start: int, end: int, adapter: str, lora: HeldLora | None) -> tuple:
    """What a kept forward is found by: the client's key, the span, and the adapter or LoRA weights it applied."""
    return cache_key, start, end, adapter, lora.digests if lora else ()


def default_attn_cache_tokens(cfg: ModelConfig) -> int:
    """Petals' default attention cache, in positions per block: 16384 for models with grouped keys and values,
    else 4096."""
    return 16384 if cfg.num_key_value_heads < cfg.num_attention_heads else 4096
