"""The sequence manager: a client's view of the swarm (routing, bans, saved forward state) over one
transport. ``RemoteSequenceManager`` (``remote_manager``) and ``LocalSwarm``'s manager
(``jaxseq.testing``) differ only in the transport: ``_fetch_records``, ``_call_forward`` and
``_call_backward``."""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxseq.arrays import all_finite
from jaxseq.client.config import ClientConfig
from jaxseq.client.errors import FaultyResponse, ServerFailure
from jaxseq.client.lora import LoraWeights
from jaxseq.client.routing import Span, route
from jaxseq.remote.records import ServerRecord, ServerState

if TYPE_CHECKING:  # the session's module uses the manager: no import cycle at run time
    from jaxseq.client.inference import InferenceSession, ServerSession

logger = logging.getLogger(__name__)


class _BackgroundLoop:
    """An asyncio loop in a daemon thread; host callbacks block on it from JAX's threads."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking call was made from the manager's own event loop; await it instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):  # the worker threads of asyncio.to_thread must not outlive us
            asyncio.run_coroutine_threadsafe(self.loop.shutdown_default_executor(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class SavedStates:
    """Forward state kept for backward, bounded (LRU by count). A state is used once: backward pops it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._states: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def put(self, state: Any) -> int:
        with self._lock:
            handle = next(self._ids) % 2**31  # travels through JAX as an int32 residual
            self._states[handle] = state
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
            return handle

    def pop(self, handle: int) -> Any | None:
        with self._lock:
            return self._states.pop(handle, None)

    def __len__(self) -> int:
        return len(self._states)


@dataclasses.dataclass(frozen=True)
class Hop:
    """A call's part in server-to-server hops (a jaxseq extension, ``protocol.HAND_TO_KEY``): its server hands
    its result on to ``to`` (the next server's peer id, and the id that server's call awaits), and/or takes its
    first input (hidden states forward, grad outputs backward) from the hand-off ``from_id``, not from the
    client. ``Hop()``: neither."""

    to: tuple[str, str] | None = None
    from_id: str | None = None


class SequenceManager(abc.ABC):
    """Routing, bans and calls to the servers that hold blocks ``0..num_blocks-1``.

    Subclasses provide the transport. All ``async`` methods run on the manager's own event loop;
    ``run`` blocks on it from other threads (JAX host callbacks, torch autograd).
    """

    def __init__(self, config: ClientConfig, *, seed: int | None = None, name: str = "jaxseq-client"):
        self.config = config
        self.saved = SavedStates(config.max_saved_states)
        self.last_error: BaseException | None = None
        self.retries = 0
        self._records: list[ServerRecord] = []
        self._banned: dict[str, float] = {}
        self._rtt: dict[str, float] = {}  # peer -> round-trip seconds, a moving average of pings
        self._shortest_rtt: dict[str, float] = {}  # peer -> its shortest answered ping: the link's own delay
        self._pinging: asyncio.Task | None = None
        self._rng = random.Random(seed)
        self.verified_spans = self.unverified_spans = self.disagreements = 0
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self._client_id = uuid.uuid4().hex[:16]
        self._cache_ids = itertools.count()
        self._refresh_task: asyncio.Task | None = None
        self._last_refresh = -float("inf")
        self._background = _BackgroundLoop(name)

    # --- the transport -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_blocks(self) -> int:
        """Number of blocks in the chain this manager serves."""

    @property
    def hidden_size(self) -> int | None:
        """Hidden size the servers expect, when known before a call."""
        return None

    @abc.abstractmethod
    async def _fetch_records(self) -> list[ServerRecord]:
        """A fresh view of the swarm."""

    @abc.abstractmethod
    async def _call_forward(
        self, span: Span, x: np.ndarray, prompts: np.ndarray, cache_id: str, lora: LoraWeights | None
    ) -> np.ndarray:
        """One forward RPC; raises ``ServerFailure`` on any failure of the server or the wire.

        ``cache_id`` names this forward so that the server may keep its activations for the
        backward that follows with the same id (servers that don't, recompute). ``lora``: the client's
        LoRA weights (the span's blocks' apply), or None.
        """

    @abc.abstractmethod
    async def _open_server_session(
        self, span: Span, max_length: int, batch_size: int, lora: LoraWeights | None
    ) -> ServerSession:
        """Open an inference session on ``span``'s server (``jaxseq.client.inference.ServerSession``), with the
        client's ``lora`` weights applied if any; raises ``ServerFailure`` when it can't be opened."""

    async def _call_forward_hop(
        self, span: Span, x: np.ndarray, prompts: np.ndarray, cache_id: str, lora: LoraWeights | None, hop: Hop
    ) -> tuple[np.ndarray, bool]:
        """``_call_forward`` with ``hop``: ``x`` only gives the shape and dtype when ``hop.from_id`` is set; returns
        also whether the server handed its output on. Only where ``hands_off`` allows it."""
        raise NotImplementedError(f"{type(self).__name__} has no server-to-server hops")

    async def _call_backward_hop(
        self,
        span: Span,
        x: np.ndarray,
        grad_out: np.ndarray,
        prompts: np.ndarray,
        cache_id: str,
        lora: LoraWeights | None,
        hop: Hop,
    ) -> tuple[tuple[Any, ...], bool]:
        """``_call_backward`` with ``hop`` (``grad_out`` only gives the shape and dtype when ``hop.from_id`` is
        set); returns also whether the server handed its grad inputs on."""
        raise NotImplementedError(f"{type(self).__name__} has no server-to-server hops")

    def hands_off(self, upstream: Span, downstream: Span) -> bool:
        """Whether ``upstream``'s server may hand its result straight to ``downstream``'s (``Hop``), instead of
        the client passing it on. Never, on a transport without server-to-server hops."""
        return False

    @abc.abstractmethod
    async def _call_backward(
        self,
        span: Span,
        x: np.ndarray,
        grad_out: np.ndarray,
        prompts: np.ndarray,
        cache_id: str,
        lora: LoraWeights | None,
    ) -> tuple[Any, ...]:
        """One backward RPC; returns grad inputs, (if ``prompt_len > 0``) grad prompts, and (with ``lora``) the
        gradients of the span's LoRA arrays in ``lora.grad_shapes`` order, as the server sent them."""

    # --- running -------------------------------------------------------------------------------
    def run(self, coro: Coroutine) -> Any:
        """Run a coroutine on the manager's loop and wait for it (from any other thread)."""
        return self._background.run(coro)

    def close(self) -> None:
        """Stop the manager's event loop. Idempotent."""
        self._stop_pinging()
        self._background.stop()

    def _stop_pinging(self) -> None:
        """Cancel pings in flight (before the transport closes under them)."""
        task = self._pinging
        if task is not None and not self._background.loop.is_closed():

            async def cancel() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            self.run(cancel())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- routing -------------------------------------------------------------------------------
    async def refresh(self, min_interval: float = 0.0) -> None:
        """Fetch a fresh view of the swarm, sharing one fetch among concurrent callers."""
        if time.monotonic() - self._last_refresh < min_interval:
            return
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.ensure_future(self._refresh_now())
        await asyncio.shield(self._refresh_task)

    async def _refresh_now(self) -> None:
        records = await self._fetch_records()
        if self.config.allowed_servers is not None:
            allowed = set(self.config.allowed_servers)
            records = [r for r in records if r.peer in allowed]
        self._records = records
        self._last_refresh = time.monotonic()
        if self._pinging is None or self._pinging.done():  # in the background: a refresh never waits for pings
            self._pinging = asyncio.ensure_future(self._measure_round_trips())

    def make_route(
        self, start: int, end: int, tokens: int = 1, cache_tokens: int = 0, lora_rank: int = 0
    ) -> list[Span]:
        """The spans expected to run blocks ``start..end-1`` fastest for ``tokens`` tokens per call, from the
        current view and the servers' measured round trips (raises ``MissingBlocksError``); with
        ``cache_tokens``, for an inference session of that batch times length; with ``lora_rank``, through
        servers that apply a client's LoRA weights of that rank."""
        return route(
            self._records, start, end, banned=self._active_bans(), rtt=self._rtt, tokens=tokens, rng=self._rng,
            cache_tokens=cache_tokens, adapter=self.config.active_adapter, lora_rank=lora_rank,
        )  # fmt: skip

    async def ping(self, peer: str) -> float | None:
        """Round-trip seconds of a small call to ``peer``, or None when it does not answer in time. A transport
        that can't tell answers None for every server: all then count as equally far."""
        return None

    async def _measure_round_trips(self) -> None:
        """Ping every server in the view at once; each answer moves its average a fifth of the way (as Petals'
        ping aggregator does), and a server that does not answer counts as ``connect_timeout`` away."""
        peers = sorted({r.peer for r in self._records})
        answers = await asyncio.gather(*(self.ping(peer) for peer in peers))
        for peer, seconds in zip(peers, answers):
            if seconds is not None:
                self._shortest_rtt[peer] = min(seconds, self._shortest_rtt.get(peer, seconds))
            seconds = self.config.connect_timeout if seconds is None else seconds
            self._rtt[peer] = seconds if peer not in self._rtt else 0.8 * self._rtt[peer] + 0.2 * seconds
        self._rtt = {peer: value for peer, value in self._rtt.items() if peer in peers}
        self._shortest_rtt = {peer: value for peer, value in self._shortest_rtt.items() if peer in peers}

    @property
    def round_trips(self) -> dict[str, float]:
        """The servers' measured round trips (seconds, moving averages of pings at each refresh of the view)."""
        return dict(self._rtt)

    @property
    def shortest_round_trips(self) -> dict[str, float]:
        """Each server's shortest answered ping (seconds): its link's delay, without the queueing and the
        connection set-up that a busy machine or a first call add to some pings."""
        return dict(self._shortest_rtt)

    def inference_session(
        self, max_length: int, batch_size: int = 1, lora: LoraWeights | None = None
    ) -> InferenceSession:
        """A session of up to ``max_length`` positions for ``batch_size`` rows, with attention caches kept by
        the servers (``jaxseq.client.inference.InferenceSession``; use it as a context manager), and the
        client's ``lora`` weights applied if any."""
        from jaxseq.client.inference import InferenceSession

        return InferenceSession(self, max_length, batch_size, lora)

    def _active_bans(self) -> dict[str, float]:
        """Bans younger than ``ban_timeout`` (peer -> time of the ban); older ones are forgotten."""
        now = time.monotonic()
        self._banned = {p: t for p, t in self._banned.items() if now - t < self.config.ban_timeout}
        return self._banned

    def alternatives(self, span: Span) -> list[str]:
        """Other online, unbanned servers holding all of ``span`` (and the active adapter), fastest first (for
        cross-checks)."""
        banned = self._active_bans()
        adapter = self.config.active_adapter
        holders = [
            r
            for r in self._records
            if r.info.state == ServerState.ONLINE
            and r.start <= span.start
            and span.end <= r.end
            and r.peer != span.peer
            and r.peer not in banned
            and (not adapter or adapter in r.info.adapters)
        ]
        return [r.peer for r in sorted(holders, key=lambda r: -r.info.throughput)]

    def should_verify(self) -> bool:
        """Whether to cross-check the span just computed (a ``config.verify_fraction`` sample)."""
        return self.config.verify_fraction > 0 and self._rng.random() < self.config.verify_fraction

    def ban(self, peer: str, reason: str) -> None:
        """Avoid ``peer`` for ``config.ban_timeout`` seconds, because of ``reason`` (logged)."""
        logger.warning("banning server %s for %.0f s: %s", peer, self.config.ban_timeout, reason)
        self._banned[peer] = time.monotonic()

    @property
    def model_families(self) -> set[str]:
        """The model families the swarm's servers announce (jaxseq servers do; Petals servers don't)."""
        return {r.info.family for r in self._records if r.info.family}

    @property
    def records(self) -> list[ServerRecord]:
        """The servers in the current view of the swarm."""
        return list(self._records)

    async def wait_before_retry(self, attempt: int, deadline: float) -> None:
        """Back off, refreshing the swarm view meanwhile; never past ``deadline`` (monotonic)."""
        self.retries += 1
        delay = min(self.config.backoff(attempt), max(deadline - time.monotonic(), 0.0))
        refresh = asyncio.ensure_future(self.refresh(min_interval=0.5))
        await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(asyncio.shield(refresh), timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            logger.info("refreshing the swarm view did not finish before the call's deadline; keeping the old view")
        except Exception as error:  # a failed refresh keeps the old view; the next retry tries again
            logger.warning(
                "refreshing the swarm view failed, keeping the old view: %s: %s", type(error).__name__, error
            )

    # --- calls with validation -----------------------------------------------------------------
    def new_cache_id(self) -> str:
        """A fresh id for one span's forward, unique across clients."""
        return f"{self._client_id}-{next(self._cache_ids)}"

    async def forward(
        self,
        span: Span,
        x: np.ndarray,
        prompts: np.ndarray,
        timeout: float,
        cache_id: str = "",
        lora: LoraWeights | None = None,
    ) -> np.ndarray:
        """Forward through one span (with the client's ``lora`` applied, if any); raises ``ServerFailure``
        (``FaultyResponse`` for bad answers)."""
        call = self._call_forward(span, x, prompts, cache_id, lora)
        out, _ = await self._forward(span, x, timeout, call, handing=False)
        return out

    async def forward_hop(
        self,
        span: Span,
        x: np.ndarray,
        prompts: np.ndarray,
        timeout: float,
        cache_id: str,
        lora: LoraWeights | None,
        hop: Hop,
    ) -> tuple[np.ndarray, bool]:
        """``forward`` as a part of server-to-server hops (where ``hands_off`` allows them): ``x`` only gives the
        shape and dtype when ``hop.from_id`` is set; returns also whether the server handed its output on."""
        call = self._call_forward_hop(span, x, prompts, cache_id, lora, hop)
        return await self._forward(span, x, timeout, call, handing=True)

    async def _forward(
        self, span: Span, x: np.ndarray, timeout: float, call: Coroutine, handing: bool
    ) -> tuple[np.ndarray, bool]:
        """The call's output (checked against ``x``), and (``handing``: the call says) whether it was handed on."""
        with self._counted(span):
            result = await self._guarded(call, span, timeout)
            out, handed = result if handing else (result, False)
            check_reply(span, "output", out, x.shape, x.dtype)
        return out, handed

    async def backward(
        self,
        span: Span,
        x: np.ndarray,
        grad_out: np.ndarray,
        prompts: np.ndarray,
        timeout: float,
        cache_id: str = "",
        lora: LoraWeights | None = None,
    ) -> SpanGradients:
        """Backward through one span; validates every gradient like ``forward`` validates outputs."""
        call = self._call_backward(span, x, grad_out, prompts, cache_id, lora)
        grads, _ = await self._backward(span, x, prompts, timeout, lora, call, handing=False)
        return grads

    async def backward_hop(
        self,
        span: Span,
        x: np.ndarray,
        grad_out: np.ndarray,
        prompts: np.ndarray,
        timeout: float,
        cache_id: str,
        lora: LoraWeights | None,
        hop: Hop,
    ) -> tuple[SpanGradients, bool]:
        """``backward`` as a part of server-to-server hops (see ``forward_hop``): ``grad_out`` only gives the shape
        and dtype when ``hop.from_id`` is set; returns also whether the server handed its grad inputs on."""
        call = self._call_backward_hop(span, x, grad_out, prompts, cache_id, lora, hop)
        return await self._backward(span, x, prompts, timeout, lora, call, handing=True)

    async def _backward(
        self,
        span: Span,
        x: np.ndarray,
        prompts: np.ndarray,
        timeout: float,
        lora: LoraWeights | None,
        call: Coroutine,
        handing: bool,
    ) -> tuple[SpanGradients, bool]:
        """The call's gradients, checked as ``backward`` says, and whether they were handed on (as ``_forward``)."""
        with self._counted(span):
            result = await self._guarded(call, span, timeout)
            grads, handed = result if handing else (result, False)
            with_prompts = prompts.shape[2] > 0
            lora_shapes = lora.grad_shapes(span.start, span.end) if lora else []
            if len(grads) != 1 + with_prompts + len(lora_shapes):
                raise FaultyResponse(
                    span.peer, f"backward returned {len(grads)} tensors, expected {1 + with_prompts + len(lora_shapes)}"
                )
            check_reply(span, "grad_inputs", grads[0], x.shape, x.dtype)
            if with_prompts:
                check_reply(span, "grad_prompts", grads[1], prompts.shape, prompts.dtype)
            for grad, (shape, dtype) in zip(grads[1 + with_prompts :], lora_shapes):
                check_reply(span, "LoRA gradients", grad, shape, dtype)
        grad_lora = None
        if lora:
            flat = iter(grads[1 + with_prompts :])
            grad_lora = [{name: next(flat) for name in lora.names} for _ in range(span.start, span.end)]
        return SpanGradients(grads[0], grads[1] if with_prompts else None, grad_lora), handed

    @contextlib.contextmanager
    def _counted(self, span: Span):
        """Count each call's outcome per peer in ``outcomes``: ok, faulty, error or unreachable."""
        try:
            yield
        except FaultyResponse:
            self.outcomes[span.peer, "faulty"] += 1
            raise
        except ServerFailure as failure:
            self.outcomes[span.peer, "error" if failure.reachable else "unreachable"] += 1
            raise
        self.outcomes[span.peer, "ok"] += 1

    async def _guarded(self, call: Coroutine, span: Span, timeout: float):
        try:
            return await asyncio.wait_for(call, timeout=timeout)
        except asyncio.TimeoutError:
            raise ServerFailure(span.peer, f"no answer within {timeout:.1f} s", reachable=False) from None

    def record_error(self, error: BaseException) -> None:
        """Remember the last error, so users can get the typed exception that ``jit`` turns into text."""
        self.last_error = error


class SpanGradients(NamedTuple):
    """One span's backward: gradients w.r.t. its inputs, prompts (None without any) and the client's LoRA arrays
    (each of the span's blocks', by name; None without any)."""

    inputs: np.ndarray
    prompts: np.ndarray | None
    lora: list[dict[str, np.ndarray]] | None


def check_reply(span: Span, what: str, value, shape: Sequence[int], dtype) -> None:
    """Refuse a server's reply of the wrong type, shape or dtype, or with non-finite values: ``FaultyResponse``."""
    if not isinstance(value, np.ndarray):
        raise FaultyResponse(span.peer, f"{what} is {type(value).__name__}, not an array")
    if value.shape != tuple(shape):
        raise FaultyResponse(span.peer, f"{what} has shape {value.shape}, expected {tuple(shape)}")
    if value.dtype != dtype:
        raise FaultyResponse(span.peer, f"{what} has dtype {value.dtype}, expected {dtype}")
    if not all_finite(value):
        raise FaultyResponse(span.peer, f"{what} has non-finite values")
