"""The attention caches of a server's inference sessions: pages of keys and values in a pool bounded by
``--attn-cache-tokens``, and each session's page table.

Each served block has a pool of pages of ``PAGE_TOKENS`` positions (``attn_cache_tokens`` positions
per block, as Petals' ``--attn_cache_tokens`` counts them, rounded up to whole pages). A session of
``b`` rows and ``max_length`` positions through ``k`` blocks takes ``b * ceil(max_length / PAGE_TOKENS)``
pages in each of its blocks; one that does not fit waits, at most its ``alloc_timeout``, and then is
refused with ``CacheFull``. Pages make sessions of any length share one pool, and let the decode steps
of concurrent sessions run as one batch (``jaxseq.server.batching``). This module keeps the books;
the pages' arrays live with the blocks (``BlockBackend``). Amounts are in block-tokens (one
position's keys and values in one block); Petals announces what is left in its own unit (one
position's keys, or values, in one block: twice ours), and so does a jaxseq server.

Example:
    >>> import asyncio
    >>> pool = AttentionCache(num_blocks=2, pages_per_block=4)
    >>> async def two_sessions():
    ...     first = await pool.allocate(range(2), pages=3, timeout=0.0)
    ...     try:
    ...         await pool.allocate(range(2), pages=3, timeout=0.05)
    ...     except CacheFull as error:
    ...         return first.shape, str(error)
    >>> asyncio.run(two_sessions())
    ((2, 3), 'attention cache full: a session needs 48 block-tokens, 16 of 64 are free in its blocks after ...')
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np

from jaxseq.server.lora_store import HeldLora

PAGE_TOKENS = 8  # positions per page: small, so that short sessions waste little


def pages_for(max_length: int) -> int:
    """Pages one row of a session of ``max_length`` positions takes in each of its blocks."""
    return -(-max_length // PAGE_TOKENS)


class CacheFull(RuntimeError):
    """No room in the attention cache within the session's ``alloc_timeout``."""


class AttentionCache:
    """The page books of ``num_blocks`` blocks' pools (see the module's text). Page 0 of every pool is
    scratch, never given out: padding rows of a batch write there."""

    def __init__(self, num_blocks: int, pages_per_block: int):
        self.num_blocks, self.pages_per_block = num_blocks, pages_per_block
        self._free = [list(range(pages_per_block, 0, -1)) for _ in range(num_blocks)]
        self._waiters: set[asyncio.Future] = set()

    @property
    def max_block_tokens(self) -> int:
        return self.num_blocks * self.pages_per_block * PAGE_TOKENS

    @property
    def block_tokens_left(self) -> int:
        return sum(len(free) for free in self._free) * PAGE_TOKENS

    async def allocate(self, blocks: range, pages: int, timeout: float) -> np.ndarray:
        """``pages`` pages in each of ``blocks`` (indices into this cache's blocks), as ``[len(blocks),
        pages]`` page ids: waits up to ``timeout`` seconds for them, then raises ``CacheFull``. Give them back
        with ``free``."""
        needed = len(blocks) * pages * PAGE_TOKENS
        if pages > self.pages_per_block:
            raise CacheFull(
                f"attention cache too small: a session needs {needed} block-tokens, the server has "
                f"{len(blocks) * self.pages_per_block * PAGE_TOKENS} in its blocks; ask for a shorter "
                "max_length or a smaller batch"
            )
        started = time.monotonic()
        while any(len(self._free[block]) < pages for block in blocks):
            time_left = started + timeout - time.monotonic()
            if time_left <= 0:
                free = sum(min(len(self._free[block]), pages) for block in blocks) * PAGE_TOKENS
                raise CacheFull(
                    f"attention cache full: a session needs {needed} block-tokens, {free} of "
                    f"{len(blocks) * self.pages_per_block * PAGE_TOKENS} are free in its blocks after waiting "
                    f"{time.monotonic() - started:.2f} s; retry later or with another server"
                )
            freed = asyncio.get_running_loop().create_future()
            self._waiters.add(freed)
            try:
                await asyncio.wait({freed}, timeout=time_left)
            finally:
                self._waiters.discard(freed)
        # taken without awaiting: a session cancelled now holds nothing
        return np.array([[self._free[block].pop() for _ in range(pages)] for block in blocks], np.int32)

    def free(self, blocks: range, page_ids: np.ndarray) -> None:
        """Give back pages that ``allocate`` gave; waiting sessions get another look. Never awaits: a
        session cancelled as it ends (its client leaving then) still gives its pages back."""
        for block, ids in zip(blocks, page_ids):
            self._free[block].extend(ids.tolist())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


@dataclasses.dataclass
class SessionCache:
    """One session's place in the attention cache: blocks ``start..end-1``, ``batch`` rows, ``max_length``
    positions, filled up to ``position``. ``pages[i, row]`` are the ids of row ``row``'s pages in block
    ``start + i``'s pool, in position order. ``close`` gives them back to ``pool`` once no step of the
    session is being computed (a computation that outlived its client must not write into pages that
    another session has since been given)."""

    start: int
    end: int
    batch: int
    max_length: int
    pages: np.ndarray  # [blocks, batch, pages per row], int32
    pool: AttentionCache
    pool_blocks: range  # the session's blocks, as indices into the pool's
    adapter: str = ""  # the LoRA adapter of all its steps ("": none)
    lora: HeldLora | None = None  # or a client's LoRA weights
    position: int = 0
    in_flight: int = 0
    ended: bool = False

    @property
    def group(self) -> tuple:
        """What sessions whose steps are computed together share: blocks, adapter and LoRA weights."""
        return self.start, self.end, self.adapter, self.lora.digests if self.lora else ()

    @property
    def capacity(self) -> int:
        """Positions the session's pages hold (``max_length``, rounded up to whole pages)."""
        return self.pages.shape[2] * PAGE_TOKENS

    def step_started(self) -> None:
        self.in_flight += 1

    def step_finished(self) -> None:
        self.in_flight -= 1
        self._give_back()

    def close(self) -> None:
        """The session is over: its pages go back to the pool, now or when its step in flight finishes."""
        self.ended = True
        self._give_back()

    def _give_back(self) -> None:
        if self.ended and not self.in_flight and self.pages.size:
            self.pool.free(self.pool_blocks, self.pages.reshape(len(self.pool_blocks), -1))
            self.pages = self.pages[:, :, :0]
