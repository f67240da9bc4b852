"""What a server computes: a contiguous range of blocks, forward and backward, jit-compiled.

Shapes are bucketed so that a server compiles a bounded number of functions whatever batch and
sequence lengths clients send: batch and sequence are padded up to a bucket (at most four per
power of two, so at most 25% padding) and the result is sliced back. Padding is exact: rows are
independent, and causal attention means padded positions at the end never reach real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence

import jax
import numpy as np

from jaxseq.arrays import copy_padded
from jaxseq.memory import MemoryPool, PrivateMemory, round_up
from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import BlockParams, run_span
from jaxseq.models.registry import family_of
from jaxseq.server.activation_cache import ActivationCache, CacheMiss
from jaxseq.server.config import ServerConfig


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
        device: jax.Device | None = None,
    ):
        self.cfg = cfg
        self.start = start
        self.cache = ActivationCache(cache_bytes, cache_ttl)
        self.device = device  # where the blocks live and compute; None: JAX's default device
        self.blocks = [jax.device_put(b, device) for b in blocks]
        self.dtype = self.blocks[0]["q_proj"].dtype
        self._compiled: set[tuple] = set()
        self._lock = threading.Lock()
        # A forward stages 2 inputs, its backward 1 (cached) or 3: enough idle memory for a cycle.
        self._staging = MemoryPool(PrivateMemory.create, max_idle=4)
        # Seconds spent moving inputs into the blocks' memory and results out of it, in all: part of
        # moving the data, not of computing on it (servers report it so).
        self.transfer_s = 0.0

        block = family_of(cfg).block

        # ``windows`` (the blocks' attention windows) is static; ``seq_len``, the positions before padding, is
        # traced: it moves dynamic rope scaling only, and must not make a compile per length.
        def forward(windows, blocks, x, prompts, seq_len):
            return run_span(block, cfg, blocks, x, prompts, windows, seq_len)

        def backward(windows, blocks, x, prompts, seq_len, grad_out):
            _, vjp = jax.vjp(lambda x_, p_: forward(windows, blocks, x_, p_, seq_len), x, prompts)
            return vjp(grad_out)

        self._forward = jax.jit(forward, static_argnums=0)
        self._backward = jax.jit(backward, static_argnums=0)

    @property
    def end(self) -> int:
        return self.start + len(self.blocks)

    @property
    def compile_count(self) -> int:
        """Distinct (stage, span's attention windows, shape bucket) combinations compiled so far."""
        return len(self._compiled)

    def _span(self, start: int, end: int) -> list[BlockParams]:
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not all within the served blocks {self.start}:{self.end}")
        return self.blocks[start - self.start : end - self.start]

    def _windows(self, start: int, end: int) -> tuple[int, ...]:
        return tuple(self.cfg.window(block) for block in range(start, end))

    def _padded(self, stage: str, start: int, end: int, x: np.ndarray, prompts: np.ndarray, *extra: np.ndarray):
        batch, seq, _ = x.shape
        sizes = {0: bucket(batch), 1: bucket(seq)}
        x_p = self._padded_copy(x, sizes)
        prompts_p = self._padded_copy(prompts, {1: sizes[0]})
        extra_p = [self._padded_copy(e, sizes) for e in extra]
        self._count_compile(stage, self._windows(start, end), x_p.shape, prompts_p.shape)
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

    def _count_compile(self, stage: str, windows: tuple[int, ...], x_shape: tuple, prompts_shape: tuple) -> None:
        with self._lock:
            self._compiled.add((stage, windows, x_shape, prompts_shape))

    def forward(
        self, x: np.ndarray, prompts: np.ndarray, start: int, end: int, cache_key: Hashable | None = None
    ) -> np.ndarray:
        """Hidden states after blocks ``start..end-1``; ``prompts`` is ``[end-start, batch, prompt_len, hidden]``.

        With ``cache_key``, the activations are kept (see ``ActivationCache``) so that a backward
        with the same key and inputs needn't recompute the forward.
        """
        batch, seq, _ = x.shape
        x_p, prompts_p, _ = self._padded("forward", start, end, x, prompts)
        blocks, windows, seq_len = self._span(start, end), self._windows(start, end), np.int32(seq)
        if cache_key is None:
            out = self._forward(windows, blocks, x_p, prompts_p, seq_len)
        else:
            out, vjp = jax.vjp(lambda x_, p_: self._forward(windows, blocks, x_, p_, seq_len), x_p, prompts_p)
            self.cache.put((cache_key, start, end), x_p, prompts_p, vjp, x.shape, (x.dtype, prompts.dtype))
        return self._on_host(out, (slice(batch), slice(seq)), x.dtype)

    def backward(
        self,
        x: np.ndarray,
        prompts: np.ndarray,
        grad_out: np.ndarray,
        start: int,
        end: int,
        cache_key: Hashable | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Gradients w.r.t. the span's inputs and (if ``prompt_len > 0``) its prompts."""
        x_p, prompts_p, (grad_p,) = self._padded("backward", start, end, x, prompts, grad_out)
        saved = None if cache_key is None else self.cache.take((cache_key, start, end), x_p, prompts_p)
        if saved is not None:
            grads = saved.vjp(grad_p)
        else:
            seq_len = np.int32(x.shape[1])
            grads = self._backward(self._windows(start, end), self._span(start, end), x_p, prompts_p, seq_len, grad_p)
        return self._unpadded(grads, x.shape, (x.dtype, prompts.dtype), prompts.shape[2])

    def backward_of_cached(
        self, grad_out: np.ndarray, start: int, end: int, cache_key: Hashable
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``backward`` of the forward kept under ``cache_key``, whose inputs needn't be sent again.

        Raises ``CacheMiss`` when none is kept (evicted, expired, or computed elsewhere).
        """
        saved = self.cache.take((cache_key, start, end))
        if saved is None:
            raise CacheMiss(f"no forward of blocks {start}:{end} is kept under this cache id; send the inputs")
        if grad_out.shape != saved.shape:
            raise ValueError(
                f"grad outputs have shape {list(grad_out.shape)}, but the forward's inputs had {list(saved.shape)}"
            )
        padded_shape = saved.x.shape
        grad_p = self._padded_copy(grad_out, {0: padded_shape[0], 1: padded_shape[1]})
        self._count_compile("backward", self._windows(start, end), padded_shape, saved.prompts.shape)
        return self._unpadded(saved.vjp(grad_p), saved.shape, saved.dtypes, saved.prompts.shape[2])

    def _unpadded(
        self, grads: tuple, shape: tuple, dtypes: tuple, prompt_len: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Gradients sliced back to the inputs' ``shape`` and cast to their ``dtypes`` (None for empty prompts)."""
        batch, seq = shape[:2]
        grad_x = self._on_host(grads[0], (slice(batch), slice(seq)), dtypes[0])
        if prompt_len == 0:
            return grad_x, None
        return grad_x, self._on_host(grads[1], (slice(None), slice(batch)), dtypes[1])
