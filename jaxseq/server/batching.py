"""Continuous batching of inference steps: the decode steps of concurrent sessions on one server are computed
together, in one jitted call, rather than one session after another.

A decode step (one new position, no deep prompts) opens a group, which the decode steps of other sessions
through the same blocks (and LoRA) join until it starts computing or holds ``max_rows`` rows. Before
it goes to the compute queue, a group waits up to ``wait_s`` for the sessions that took a decode step through these
blocks within the last second (its clients are generating: their next steps are due), and goes as soon
as all of them have joined; one session alone never waits. While it waits in the queue, more steps join.
Other steps (a session's first step, or one of several positions) are computed alone. A step's reply
waits for its group only.

Example:
    >>> backend = BlockBackend(cfg, params)
    >>> batcher = StepBatcher(backend, ComputeQueue(max_waiting=8), max_rows=64, wait_s=0.01)
    >>> async def two_sessions():
    ...     sessions = [await backend.open_session(1, 8, 0, 4, timeout=0.0) for _ in range(2)]
    ...     for session in sessions:  # their first steps, alone
    ...         await batcher.run(session, np.ones((1, 3, 32), np.float32), backend.no_prompts(session))
    ...     steps = [batcher.run(s, np.ones((1, 1, 32), np.float32), backend.no_prompts(s)) for s in sessions]
    ...     replies = await asyncio.gather(*steps)  # their next steps, together
    ...     for session in sessions:
    ...         session.close()
    ...     return [out.shape for out, _ in replies], batcher.calls, batcher.steps
    >>> asyncio.run(two_sessions())
    ([(1, 1, 32), (1, 1, 32)], 3, 4)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import numpy as np

from jaxseq.server.attention_cache import SessionCache
from jaxseq.server.backend import BlockBackend, SessionStep
from jaxseq.server.compute_queue import ComputeQueue

_GENERATING_S = 1.0  # a session that took a decode step this recently is generating: its next step is due


@dataclasses.dataclass
class _Group:
    """Steps computed in one call. The compute thread closes it when it starts; until then, steps join."""

    steps: list[SessionStep]
    rows: int
    replies: list[asyncio.Future]
    closed: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    expected: int = 0  # the sessions it waits for; ``complete`` is set when they have all joined
    complete: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def join(self, step: SessionStep, future: asyncio.Future, max_rows: int) -> bool:
        with self.lock:
            if self.closed or self.rows + step.session.batch > max_rows:
                return False
            self.steps.append(step)
            self.replies.append(future)
            self.rows += step.session.batch
        if self.expected and len(self.steps) >= self.expected:
            self.complete.set()
        return True

    def close(self) -> list[SessionStep]:
        with self.lock:
            self.closed = True
            return list(self.steps)


class StepBatcher:
    """Runs sessions' steps through ``backend`` in ``queue``, decode steps of the same blocks together (see
    the module's text). ``calls`` and ``steps`` count the computations and the steps they computed."""

    def __init__(self, backend: BlockBackend, queue: ComputeQueue, max_rows: int, wait_s: float):
        self.backend, self.queue, self.max_rows, self.wait_s = backend, queue, max_rows, wait_s
        self.calls = self.steps = 0
        self._open: dict[tuple, _Group] = {}  # decode groups not started yet, by blocks and LoRA
        # by blocks and LoRA: the sessions that took a decode step lately, and when (by id: sessions aren't hashable)
        self._generating: dict[tuple, dict[int, tuple[SessionCache, float]]] = {}
        self._running: set[asyncio.Task] = set()

    async def run(
        self, session: SessionCache, x: np.ndarray, prompts: np.ndarray, hypo_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The step's outputs and its ``{"wait_s", "compute_s"}`` (as ``ComputeQueue.run`` times them)."""
        arrived = time.perf_counter()
        step = SessionStep(session, x, prompts, hypo_ids)
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        decode = x.shape[1] == 1 and prompts.shape[2] == 0
        key = session.group
        group = self._open.get(key) if decode else None
        if decode:
            self._generating.setdefault(key, {})[id(session)] = (session, arrived)
        if group is None or not group.join(step, reply, self.max_rows):
            group = _Group([step], session.batch, [reply])
            if decode:
                self._open[key] = group
                group.expected = self._expected(key, arrived)
            # a task of its own: a member's client leaving must not stop its group's computation
            task = asyncio.ensure_future(self._compute(group, key))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        session.step_started()
        reply.add_done_callback(lambda _: session.step_finished())
        out, started, finished = await asyncio.shield(reply)
        return out, {"wait_s": started - arrived, "compute_s": finished - started}

    def _expected(self, key: tuple, now: float) -> int:
        """How many sessions a new decode group through blocks ``key`` waits for: those still open that took a
        decode step within the last second, and have none computing now (which could not join)."""
        generating = self._generating[key]
        for session_id, (session, last) in list(generating.items()):
            if session.ended or now - last > _GENERATING_S:
                del generating[session_id]
        return sum(not session.in_flight for session, _ in generating.values())

    async def _compute(self, group: _Group, key: tuple) -> None:
        if self.wait_s > 0 and len(group.steps) < group.expected:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(group.complete.wait(), self.wait_s)

        def compute() -> tuple[list[np.ndarray], float, float]:
            started = time.perf_counter()
            steps = group.close()
            transfer_before = self.backend.transfer_s
            outputs = self.backend.inference_steps(steps)
            transfer_s = self.backend.transfer_s - transfer_before
            return outputs, started, time.perf_counter() - transfer_s

        try:
            (outputs, started, finished), _ = await self.queue.run(compute)
        except Exception as error:
            for reply in group.replies:
                if not reply.done():
                    reply.set_exception(error)
            return
        finally:
            if self._open.get(key) is group:
                del self._open[key]
        self.calls += 1
        self.steps += len(outputs)
        for reply, out in zip(group.replies, outputs):
            if not reply.done():
                reply.set_result((out, started, finished))
