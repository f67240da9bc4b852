"""Clients' own LoRA weights, kept by a server between the calls that use them (a jaxseq extension).

A client trains LoRA matrices of the blocks it runs remotely: it gives a server each block's arrays once
(``rpc_lora``), and its forwards, backwards and inference sessions name them by digest
(``jaxseq.arrays.digest``). The store is bounded in bytes: the least recently used weights go first, and a
request naming weights no longer held gets ``LoraMiss`` (the client sends them again).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.arrays import digest
from jaxseq.models.decoder import BlockParams


class LoraMiss(LookupError):
    """A request named LoRA weights this server does not hold (never given, or evicted): send them again."""


@dataclasses.dataclass(frozen=True)
class HeldLora:
    """A client's LoRA weights over a span of blocks: each block's digest and arrays (on the server's device)."""

    digests: tuple[str, ...]
    blocks: tuple[BlockParams, ...]

    def shapes(self) -> tuple:
        """The names and shapes of its arrays: what a function compiled with them depends on."""
        return tuple(tuple(sorted((k, v.shape) for k, v in block.items())) for block in self.blocks)


class LoraStore:
    """Blocks' LoRA arrays by digest, in at most ``max_bytes`` (LRU).

    Example:
        >>> store = LoraStore(max_bytes=2**20, dtype=jnp.float32)
        >>> block = {"q_proj_lora_a": np.ones((8, 2), np.float32), "q_proj_lora_b": np.ones((2, 8), np.float32)}
        >>> digests = store.put([block])
        >>> store.get(digests).blocks[0]["q_proj_lora_a"].shape
        (8, 2)
        >>> store.get(["0" * 32])
        Traceback (most recent call last):
        ...
        jaxseq.server.lora_store.LoraMiss: LoRA weights 00000000... are not held here (evicted, or never sent): ...
    """

    def __init__(self, max_bytes: int, dtype, device: jax.Device | None = None):
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.device = device
        self.nbytes = 0
        self._blocks: collections.OrderedDict[str, BlockParams] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, blocks: Sequence[dict[str, np.ndarray]]) -> list[str]:
        """Keep each block's arrays (checked by the caller: ``validation.lora_upload``) in the blocks' dtype;
        returns their digests, of the arrays as sent."""
        digests = [digest(block) for block in blocks]
        nbytes = [sum(a.size for a in block.values()) * jnp.dtype(self.dtype).itemsize for block in blocks]
        if sum(nbytes) > self.max_bytes:
            raise ValueError(
                f"the LoRA weights sent take {sum(nbytes)} bytes here; this server keeps at most {self.max_bytes} "
                "(--lora-mb): send fewer blocks at a time, or a lower rank"
            )
        placed = [
            jax.device_put({k: jnp.asarray(v, self.dtype) for k, v in block.items()}, self.device) for block in blocks
        ]
        with self._lock:
            for key, block, size in zip(digests, placed, nbytes):
                if self._blocks.pop(key, None) is None:
                    self.nbytes += size
                self._blocks[key] = block
            while self.nbytes > self.max_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self.nbytes -= _nbytes(evicted)
        return digests

    def get(self, digests: Sequence[str]) -> HeldLora:
        """The weights of ``digests`` (one per block), marked as just used; ``LoraMiss`` when one is not held."""
        with self._lock:
            missing = [key for key in digests if key not in self._blocks]
            if missing:
                raise LoraMiss(
                    f"LoRA weights {str(missing[0])[:8]}... are not held here (evicted, or never sent): send them"
                )
            for key in digests:
                self._blocks.move_to_end(key)
            return HeldLora(tuple(digests), tuple(self._blocks[d] for d in digests))

    def __len__(self) -> int:
        return len(self._blocks)


def _nbytes(block: BlockParams) -> int:
    return sum(a.nbytes for a in block.values())
