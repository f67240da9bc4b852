"""Inference sessions through the swarm: each span's server keeps its blocks' attention caches, so that a step
sends only the new positions' hidden states; the client keeps what each span was sent, so that when a
server fails mid-session, the span is re-routed and the replacement is given the whole history at once:
the outputs are exactly those of an uninterrupted session.

A session is opened by ``SequenceManager.inference_session``; its transport (a hivemind stream per span,
or a ``LocalSwarm``'s servers) is the manager's ``_open_server_session``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any, Protocol

import numpy as np

from jaxseq.arrays import all_finite, is_floating
from jaxseq.client.errors import MissingBlocksError, ServerFailure
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import SequenceManager
from jaxseq.client.retries import Retries
from jaxseq.client.routing import Span

logger = logging.getLogger(__name__)


class ServerSession(Protocol):
    """One server's part of a session: the transport's side of it (``SequenceManager._open_server_session``)."""

    span: Span
    session_id: str

    async def step(
        self,
        x: np.ndarray,
        prompts: np.ndarray | None,
        hypo_ids: np.ndarray | None,
        *,
        step_id: str,
        start_from_position: int | None,
        next_servers: list[tuple[str, str, int, int]],
        timeout: float,
    ) -> np.ndarray:
        """The span's outputs for ``x``'s positions; raises ``ServerFailure`` on any failure."""
        ...

    async def close(self) -> None: ...


@dataclasses.dataclass
class _SpanState:
    """A span of the session's chain: its server's session, and what the span was sent so far (its history,
    rows in the session's current order), for replaying to a replacement."""

    server: ServerSession
    history: np.ndarray  # [batch, max_length, hidden], filled up to the session's position
    stepped: bool = False  # whether the server has seen a step (else it gets the history first)


class InferenceSession:
    """A multi-step inference session through every block of the chain. Use it as a context manager.

    ``step(x)`` runs new positions' hidden states ``x: [batch, n, hidden]`` through the chain and returns
    the last block's outputs for them. ``position`` is the number of positions done; assigning a smaller
    one rolls back (the next step continues from there). Deep ``prompts`` (``[num_blocks, batch,
    prompt_len, hidden]``, added to the first ``prompt_len`` positions before each block, as in training)
    go with the first step. ``hypo_ids`` reorder the batch's rows before a step (beam search). ``lora``: the
    client's LoRA weights, which every server of the chain applies (as in training).

    Example:
        >>> with manager.inference_session(max_length=8, batch_size=2) as session:
        ...     first = session.step(np.ones((2, 5, 32), np.float32))
        ...     second = session.step(np.ones((2, 1, 32), np.float32))
        >>> first.shape, second.shape, session.position
        ((2, 5, 32), (2, 1, 32), 6)
    """

    def __init__(self, manager: SequenceManager, max_length: int, batch_size: int, lora: LoraWeights | None = None):
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be at least 1, got {max_length} and {batch_size}")
        self.manager, self.max_length, self.batch_size, self.lora = manager, max_length, batch_size, lora
        self._spans: list[_SpanState] = []
        self._position = 0
        self._rollback: int | None = None
        self._prompts: np.ndarray | None = None  # the deep prompts of position 0, resent to any replacement
        self._hidden, self._dtype = 0, np.dtype(np.float32)
        self._closed = False

    @property
    def position(self) -> int:
        return self._position

    @position.setter
    def position(self, position: int) -> None:
        if not 0 <= position <= self._position:
            raise ValueError(f"a session can roll back to positions 0..{self._position}, not {position}")
        if position == 0:
            self._prompts = None
        self._position = position
        self._rollback = position if self._rollback is None else min(self._rollback, position)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every server's session (their caches are freed). Idempotent."""
        if not self._closed:
            self._closed = True
            self.manager.run(self._close_from(0))

    def step(self, x: Any, prompts: Any | None = None, hypo_ids: Any | None = None) -> np.ndarray:
        """The last block's outputs for new hidden states ``x: [batch, n, hidden]`` (see the class's text)."""
        if self._closed:
            raise RuntimeError("this inference session is closed; open a new one")
        x = np.asarray(x)
        prompts = None if prompts is None else np.asarray(prompts)
        hypo_ids = None if hypo_ids is None else np.asarray(hypo_ids, np.int64)
        self._check(x, prompts, hypo_ids)
        try:
            return self.manager.run(self._step(x, prompts, hypo_ids))
        except Exception as error:
            self.manager.record_error(error)
            raise

    def _check(self, x: np.ndarray, prompts: np.ndarray | None, hypo_ids: np.ndarray | None) -> None:
        hidden = self.manager.hidden_size or (x.shape[-1] if x.ndim else 0)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != hidden or not is_floating(x.dtype):
            raise ValueError(
                f"a step takes hidden states [batch={self.batch_size}, new positions, hidden={hidden}] of a floating "
                f"dtype, got {x.dtype} {list(x.shape)}"
            )
        if x.shape[1] < 1 or self._position + x.shape[1] > self.max_length:
            raise ValueError(
                f"a step of {x.shape[1]} positions from position {self._position} does not fit the session's "
                f"max_length {self.max_length}; open the session with a larger max_length"
            )
        if not all_finite(x):
            raise ValueError("hidden states sent to the swarm have non-finite values (NaN or inf); nothing was sent")
        if prompts is not None:
            expected = (self.manager.num_blocks, self.batch_size)
            if self._position != 0:
                raise ValueError("deep prompts go with a session's first step (position 0), where their positions are")
            if prompts.ndim != 4 or prompts.shape[:2] != expected or prompts.shape[2] > x.shape[1]:
                raise ValueError(
                    f"prompts must be [n_blocks={expected[0]}, batch={expected[1]}, prompt_len <= {x.shape[1]}, "
                    f"hidden], got shape {list(prompts.shape)}"
                )
        if hypo_ids is not None and (
            hypo_ids.shape != (self.batch_size,) or not 0 <= hypo_ids.min() <= hypo_ids.max() < self.batch_size
        ):
            raise ValueError(
                f"hypo_ids must be {self.batch_size} row numbers within 0..{self.batch_size - 1}, got {hypo_ids}"
            )

    async def _step(self, x: np.ndarray, prompts: np.ndarray | None, hypo_ids: np.ndarray | None) -> np.ndarray:
        deadline = time.monotonic() + self.manager.config.deadline
        position, n = self._position, x.shape[1]
        self._hidden, self._dtype = x.shape[2], x.dtype
        if position == 0:
            self._prompts = prompts
        if hypo_ids is not None:
            for state in self._spans:
                state.history[:, :position] = state.history[hypo_ids, :position]
        retries = Retries(self.manager, deadline, f"inference step at position {position}")
        step_id = uuid.uuid4().hex
        index, block, inputs = 0, 0, x
        carried: np.ndarray | None = None  # the history of the blocks from ``block`` on, when their span failed
        while block < self.manager.num_blocks:
            try:
                if index == len(self._spans):
                    await self._open_spans_from(block, carried)
                state = self._spans[index]
                span = state.server.span
                retries.what = f"inference step at position {position} through blocks {span.start}:{span.end}"
                sent, outputs = await self._span_step(index, state, inputs, n, hypo_ids, step_id, retries.timeout())
            except (ServerFailure, MissingBlocksError) as error:
                if index < len(self._spans) and self._spans[index].stepped:
                    carried = self._spans[index].history
                await self._close_from(index)
                await retries.failed(error, block)
                continue
            state.history[:, position + n - sent.shape[1] : position + n] = sent
            state.stepped = True
            inputs, index, block = outputs, index + 1, span.end
            retries.succeeded()
        self._position, self._rollback = position + n, None
        return inputs[:, -n:]

    async def _span_step(
        self,
        index: int,
        state: _SpanState,
        inputs: np.ndarray,
        n: int,
        hypo_ids: np.ndarray | None,
        step_id: str,
        timeout: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One span's step of ``n`` new positions: what it was sent, and its outputs. A server that has not
        seen the session yet gets the whole history and the new positions, with the session's deep prompts
        (whose positions the history holds): ``inputs`` are that already when the span before was a
        replacement too, else the span's own history goes before them."""
        span, position, fresh = state.server.span, self._position, not state.stepped
        if not fresh:
            sent = inputs[:, -n:]
        elif inputs.shape[1] == position + n:
            sent = inputs
        else:
            sent = np.concatenate([state.history[:, :position], inputs[:, -n:]], axis=1)
        prompts = self._prompts[span.start : span.end] if fresh and self._prompts is not None else None
        next_servers = [
            (later.server.span.peer, later.server.session_id, later.server.span.start, later.server.span.end)
            for later in self._spans[index + 1 :]
            if later.stepped
        ] if self.manager.config.server_to_server and prompts is None else []  # fmt: skip
        outputs = await state.server.step(
            sent, prompts, None if fresh else hypo_ids,
            step_id=step_id, start_from_position=None if fresh else self._rollback, next_servers=next_servers,
            timeout=timeout,
        )  # fmt: skip
        return sent, outputs

    async def _open_spans_from(self, block: int, carried: np.ndarray | None) -> None:
        """Route blocks ``block..`` for inference and open a server session on each span; the first inherits
        ``carried``, the history of the blocks from ``block`` on."""
        needed = self.batch_size * self.max_length
        lora_rank = self.lora.rank if self.lora else 0
        route = self.manager.make_route(
            block, self.manager.num_blocks, tokens=self.batch_size, cache_tokens=needed, lora_rank=lora_rank
        )
        for span in route:
            server = await self.manager._open_server_session(span, self.max_length, self.batch_size, self.lora)
            if carried is None:
                carried = np.zeros((self.batch_size, self.max_length, self._hidden), self._dtype)
            self._spans.append(_SpanState(server, carried))
            carried = None

    async def _close_from(self, index: int) -> None:
        """End the server sessions of spans ``index..`` (a failure or the end): their caches are freed."""
        closing, self._spans = self._spans[index:], self._spans[:index]
        for state in closing:
            try:
                await state.server.close()
            except Exception as error:  # the server may be gone: that is why its session ends
                logger.debug("closing the session on %s failed: %r", state.server.span.peer, error)
