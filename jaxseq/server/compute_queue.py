"""The server's compute queue: one computation at a time, first come first served, bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ServerBusy(RuntimeError):
    """The queue is full: the request is refused at once."""


class ComputeQueue:
    """Runs computations one at a time in arrival order; refuses new ones when ``max_waiting`` already wait.

    A computation that outlives its caller (a request timeout) still holds the queue until it ends,
    so the server never runs two at once: one computation already uses every core.

    Example:
        >>> result, timing = asyncio.run(ComputeQueue(max_waiting=4).run(sum, [1, 2, 3]))
        >>> result, sorted(timing)
        (6, ['compute_s', 'wait_s'])
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> tuple[T, dict[str, float]]:
        """``fn(*args)`` in a worker thread; returns its result and ``{"wait_s", "compute_s"}``."""
        if self.waiting >= self.max_waiting:
            raise ServerBusy(f"server busy: {self.waiting} requests already queued; retry later or elsewhere")
        arrived = time.perf_counter()
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        started = time.perf_counter()
        computation = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        computation.add_done_callback(lambda _: self._lock.release())
        result = await asyncio.shield(computation)
        return result, {"wait_s": started - arrived, "compute_s": time.perf_counter() - started}
