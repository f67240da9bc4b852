"""Tensors handed on by the server before this one in a client's chain (server-to-server hops, a jaxseq
extension: ``protocol.HAND_TO_KEY``), kept for the request that awaits them under the same id.

A hand-off may arrive before or after its request. One that arrives first waits at most ``ttl`` seconds,
within ``max_bytes`` for all (the oldest go first); a request waits at most its own timeout. So memory
stays bounded whatever peers send, and a lost hand-off costs its request a timeout, never a hang.

Example:
    >>> import asyncio
    >>> async def hop():
    ...     handoffs = Handoffs(max_bytes=2**20, ttl=60.0)
    ...     taking = asyncio.ensure_future(handoffs.take("id-1", timeout=1.0))
    ...     await asyncio.sleep(0)
    ...     handoffs.put("id-1", np.ones(3, np.float32))
    ...     return await taking
    >>> asyncio.run(hop())
    array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np

from jaxseq.remote.protocol import ProtocolError

MAX_ID_LENGTH = 128


def check_id(value: object) -> str:
    """A well-formed hand-off id (a string of 1 to ``MAX_ID_LENGTH`` characters), or ``ProtocolError``."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise ProtocolError(f"a hand-off id must be a string of 1 to {MAX_ID_LENGTH} characters, got {value!r:.80}")
    return value


class Handoffs:
    """Hand-offs that arrived (by id, oldest first) and requests waiting for theirs."""

    def __init__(self, max_bytes: int, ttl: float, max_waiting: int = 4096):
        self.max_bytes, self.ttl, self.max_waiting = max_bytes, ttl, max_waiting
        self._arrived: collections.OrderedDict[str, tuple[np.ndarray, float]] = collections.OrderedDict()
        self._waiting: dict[str, asyncio.Future] = {}
        self.nbytes = 0
        self.dropped = 0  # hand-offs forgotten unused: too large, expired, evicted, or sent twice

    def put(self, handoff_id: str, array: np.ndarray) -> bool:
        """Give ``array`` to the request awaiting ``handoff_id``, or keep it for that request (also: a taken one
        given back, for the request sent anew); False when it is dropped (larger than ``max_bytes``, or its id
        already arrived)."""
        waiter = self._waiting.pop(handoff_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(array)
            return True
        self._expire()
        if array.nbytes > self.max_bytes or handoff_id in self._arrived:
            self.dropped += 1
            return False
        while self._arrived and self.nbytes + array.nbytes > self.max_bytes:
            self._forget_oldest()
        self._arrived[handoff_id] = (array, time.monotonic())
        self.nbytes += array.nbytes
        return True

    async def take(self, handoff_id: str, timeout: float) -> np.ndarray:
        """The array handed off under ``handoff_id``, once it is here; ``TimeoutError`` after ``timeout`` s."""
        if handoff_id in self._arrived:
            array, _ = self._arrived.pop(handoff_id)
            self.nbytes -= array.nbytes
            return array
        if handoff_id in self._waiting:
            raise ProtocolError(f"another request already awaits hand-off {handoff_id[:64]!r}")
        if len(self._waiting) >= self.max_waiting:
            raise ProtocolError(f"{self.max_waiting} requests already await hand-offs here; send the tensors instead")
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[handoff_id] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"hand-off {handoff_id[:64]!r} did not arrive within {timeout:.1f} s") from None
        finally:
            if self._waiting.get(handoff_id) is waiter:
                del self._waiting[handoff_id]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._arrived and now - next(iter(self._arrived.values()))[1] > self.ttl:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, (array, _) = self._arrived.popitem(last=False)
        self.nbytes -= array.nbytes
        self.dropped += 1

    def __len__(self) -> int:
        return len(self._arrived)
