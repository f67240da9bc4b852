"""Where an inference session's steps come from: its client's stream, and pushes from the server before it
in the chain (``rpc_push``, when the client named this session in ``next_servers``). A step that arrives
both ways (the client sends it too) is computed once, by its ``step_id``; a session that gets no step
for ``idle_timeout`` seconds ends.

Example:
    >>> import asyncio
    >>> from hivemind.proto import runtime_pb2
    >>> async def steps():
    ...     registry = SessionRegistry()
    ...     async def client():
    ...         yield runtime_pb2.ExpertRequest(uid="a")
    ...     with registry.open("s1") as pushes:
    ...         reader = StepReader(client(), pushes, idle_timeout=1.0)
    ...         return [request.uid async for request in reader]
    >>> asyncio.run(steps())
    ['a']
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

from hivemind.proto import runtime_pb2

from jaxseq.remote.protocol import ProtocolError


class SessionRegistry:
    """The open sessions' queues of pushed steps, by ``session_id``."""

    def __init__(self, max_queued: int = 64):
        self.max_queued = max_queued
        self._queues: dict[str, asyncio.Queue] = {}

    @contextlib.contextmanager
    def open(self, session_id: str | None) -> Iterator[asyncio.Queue]:
        """A session's queue of pushed steps, registered while the ``with`` block runs (a session without an
        id gets a queue nobody can push to)."""
        queue: asyncio.Queue = asyncio.Queue(self.max_queued)
        if session_id is None:
            yield queue
            return
        if session_id in self._queues:
            raise ProtocolError(f"session id {session_id[:64]!r} is already in use; open the session with a new one")
        self._queues[session_id] = queue
        try:
            yield queue
        finally:
            del self._queues[session_id]

    def push(self, session_id: str, request: runtime_pb2.ExpertRequest) -> bool:
        """Queue a pushed step for its session; False when no such session is open or its queue is full (a
        push is only a shortcut: the client sends the step itself too)."""
        queue = self._queues.get(session_id)
        if queue is None or queue.full():
            return False
        queue.put_nowait(request)
        return True


class StepReader:
    """The steps of one session, from its client's stream or pushed, in arrival order, each once (by
    ``step_id``, read from the metadata by ``step_id_of``); ends when the client closes its stream or sends an
    empty request, when no step comes for ``idle_timeout`` seconds, or at the monotonic time ``ends``."""

    def __init__(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        pushes: asyncio.Queue,
        idle_timeout: float,
        step_id_of: Callable[[runtime_pb2.ExpertRequest], str | None] = lambda request: None,
        ends: float = float("inf"),
    ):
        self.requests, self.pushes, self.idle_timeout, self.step_id_of = requests, pushes, idle_timeout, step_id_of
        self.ends = ends
        self.timed_out = False
        self._done: set[str] = set()

    def __aiter__(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        return self._steps()

    async def _steps(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        from_client: asyncio.Task | None = None
        pushed: asyncio.Task | None = None
        try:
            while True:
                from_client = from_client or asyncio.ensure_future(self.requests.__anext__())
                pushed = pushed or asyncio.ensure_future(self.pushes.get())
                timeout = min(self.idle_timeout, self.ends - time.monotonic())
                done: set[asyncio.Task] = set()
                if timeout > 0:
                    done, _ = await asyncio.wait(
                        {from_client, pushed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                if not done:
                    self.timed_out = True
                    return
                if from_client in done:
                    try:
                        request = from_client.result()
                    except StopAsyncIteration:
                        return
                    from_client = None
                    if not request.tensors and not request.uid:
                        return  # the client's "done sending"
                else:
                    request, pushed = pushed.result(), None
                step_id = self.step_id_of(request)
                if step_id is not None:
                    if step_id in self._done:
                        continue  # it came both ways; computed once
                    self._done.add(step_id)
                yield request
        finally:
            for task in (from_client, pushed):
                if task is not None and not task.done():
                    task.cancel()
