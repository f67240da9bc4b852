"""A server's activation cache: a span's forward state, kept for the backward that follows it."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Iterable

import jax
import numpy as np


def _equal(a: jax.Array, b: jax.Array) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


def _same_inputs(saved: SavedForward, x: jax.Array, prompts: jax.Array) -> bool:
    return _equal(saved.x, x) and _equal(saved.prompts, prompts)


@dataclasses.dataclass
class SavedForward:
    """One span's forward, as kept: its padded inputs, its VJP closure (which holds the activations),
    and the shape and dtypes its inputs were sent with."""

    x: jax.Array  # padded, as computed
    prompts: jax.Array
    vjp: Callable
    shape: tuple[int, ...]  # of x as sent, before padding
    dtypes: tuple[np.dtype, np.dtype]  # of x and prompts as sent
    nbytes: int
    created: float


class CacheMiss(LookupError):
    """No forward is kept under the key a backward names: send the backward with its inputs."""


class ActivationCache:
    """A span's forward state (its VJP closure, holding the activations), kept for the backward that
    follows, bounded in bytes (LRU) and in age (TTL). An entry is used once: by a backward whose
    inputs are exactly the forward's, or by one that names it instead of sending its inputs.
    """

    def __init__(self, max_bytes: int, ttl: float, held_elsewhere: Iterable[jax.Array] = ()):
        self.max_bytes = max_bytes
        self.ttl = ttl
        # Arrays a VJP closure holds that the server keeps anyway (its blocks' weights, the same objects): not
        # the entry's bytes. Counted per entry they made many small micro-batches evict each other.
        self._held_elsewhere = {id(array): array for array in held_elsewhere}
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: collections.OrderedDict[Hashable, SavedForward] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Hashable, x: jax.Array, prompts: jax.Array, vjp: Callable, shape: tuple, dtypes: tuple) -> None:
        leaves = jax.tree.leaves(vjp)
        nbytes = x.nbytes + prompts.nbytes + sum(a.nbytes for a in leaves if id(a) not in self._held_elsewhere)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            self._entries[key] = SavedForward(x, prompts, vjp, tuple(shape), tuple(dtypes), nbytes, time.monotonic())
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def take(self, key: Hashable, x: jax.Array | None = None, prompts: jax.Array | None = None) -> SavedForward | None:
        """The entry under ``key``, removed; None when there is none, or when ``x`` and ``prompts`` are
        given and differ from the entry's."""
        with self._lock:
            now = time.monotonic()
            while self._entries and now - next(iter(self._entries.values())).created > self.ttl:
                self._drop(next(iter(self._entries)))  # entries are in creation order: the oldest first
            saved = self._drop(key)
        if saved is not None and (x is None or prompts is None or _same_inputs(saved, x, prompts)):
            self.hits += 1
            return saved
        self.misses += 1
        return None

    def _drop(self, key: Hashable) -> SavedForward | None:
        saved = self._entries.pop(key, None)
        if saved is not None:
            self.nbytes -= saved.nbytes
        return saved

    def __len__(self) -> int:
        return len(self._entries)
