"""The fault-tolerant chain: forward span by span, backward in reverse, re-routing around failures.

Knows spans and retries, not bytes: every call goes through a ``SequenceManager``. Arrays are
numpy arrays in the client's memory. Deep prompts always cover the whole chain
(``[num_blocks, batch, prompt_len, hidden]``, indexed by absolute block number); ``prompt_len`` may be 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

import numpy as np

from jaxseq.client.errors import MissingBlocksError, ServerFailure
from jaxseq.client.manager import SequenceManager
from jaxseq.client.retries import Retries
from jaxseq.client.routing import Span
from jaxseq.client.verification import verified

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpanRun:
    """A span whose forward is done: its input (kept for backward) and the id the server may cache it under."""

    span: Span
    inputs: np.ndarray
    cache_id: str


async def chain_forward(
    manager: SequenceManager, x: np.ndarray, prompts: np.ndarray, start: int, end: int, deadline: float
) -> tuple[np.ndarray, list[SpanRun]]:
    """Run blocks ``start..end-1``; returns the output and each span done with its input.

    When a call fails, the rest of the chain is re-routed from the block where it failed; what is
    done is kept.
    """
    done: list[SpanRun] = []
    plan: list[Span] = []
    pos = start
    retries = Retries(manager, deadline, f"forward from block {start}")
    while pos < end:
        try:
            if not plan:
                plan = manager.make_route(pos, end, tokens=x.shape[0] * x.shape[1])
            span = plan[0]
            retries.what = f"forward of blocks {span.start}:{span.end}"
            cache_id = manager.new_cache_id()
            span_prompts = prompts[span.start : span.end]
            out = await manager.forward(span, x, span_prompts, retries.timeout(), cache_id)
            if manager.should_verify():
                ids = {span.peer: cache_id}
                rerun = functools.partial(_rerun_forward, manager, retries, x, span_prompts, ids)
                span, out = await verified(manager, span, out, rerun)
                cache_id = ids[span.peer]
        except (ServerFailure, MissingBlocksError) as error:
            plan = []
            await retries.failed(error, pos)
            continue
        done.append(SpanRun(span, x, cache_id))
        x, pos = out, span.end
        plan.pop(0)
        retries.succeeded()
    return x, done


async def _rerun_forward(
    manager: SequenceManager, retries: Retries, x: np.ndarray, prompts: np.ndarray, ids: dict, other: Span
) -> np.ndarray:
    """A span's forward on ``other`` (a cross-check), under a new cache id kept in ``ids``."""
    ids[other.peer] = manager.new_cache_id()
    return await manager.forward(other, x, prompts, retries.timeout(), ids[other.peer])


async def _rerun_backward(
    manager: SequenceManager, retries: Retries, x: np.ndarray, grad_out: np.ndarray, prompts: np.ndarray, other: Span
) -> tuple[np.ndarray, np.ndarray | None]:
    """A span's backward on ``other`` (a cross-check), with its inputs."""
    return await manager.backward(other, x, grad_out, prompts, retries.timeout())


async def chain_backward(
    manager: SequenceManager,
    grad_out: np.ndarray,
    done: list[SpanRun],
    prompts: np.ndarray,
    deadline: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Backward through ``done`` (from ``chain_forward``) in reverse; returns grad inputs and grad prompts.

    When a span's backward fails, its forward is re-run through other servers (maybe as several
    spans) from the span's saved input, and backward goes on through those.
    """
    grad_prompts = np.zeros_like(prompts)
    todo = list(done)
    retries = Retries(manager, deadline, "backward")
    while todo:
        run = todo.pop()
        span, x = run.span, run.inputs
        retries.what = f"backward of blocks {span.start}:{span.end}"
        span_prompts = prompts[span.start : span.end]
        try:
            grads = await manager.backward(span, x, grad_out, span_prompts, retries.timeout(), run.cache_id)
            if manager.should_verify():
                rerun = functools.partial(_rerun_backward, manager, retries, x, grad_out, span_prompts)
                _, grads = await verified(manager, span, grads, rerun, as_tuple=lambda g: g)
            grad_x, span_grad_prompts = grads
        except ServerFailure as error:
            await retries.failed(error, span.start)
            _, redone = await chain_forward(manager, x, prompts, span.start, span.end, deadline)
            todo.extend(redone)
            continue
        grad_out = grad_x
        if span_grad_prompts is not None:
            grad_prompts[span.start : span.end] = span_grad_prompts
        retries.succeeded()
    return grad_out, grad_prompts


def micro_batches(x: np.ndarray, max_tokens: int, stream_bytes: int | None = None) -> list[slice]:
    """Row slices of ``x`` (``[batch, seq, hidden]``): at most ``max(max_tokens // seq, 1)`` rows each, and at
    most ``stream_bytes`` of ``x`` each where given, at least one row (``ClientConfig.stream_bytes``).

    Example:
        >>> micro_batches(np.zeros((8, 128, 512), np.float32), 1024, stream_bytes=512 * 1024)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None), slice(6, 8, None)]
    """
    batch, seq = x.shape[:2]
    rows = max(max_tokens // seq, 1)
    if stream_bytes is not None and batch:
        rows = min(rows, max(stream_bytes // (x.nbytes // batch), 1))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _micro_batches(manager: SequenceManager, x: np.ndarray) -> list[slice]:
    config = manager.config
    long_link = max(manager.shortest_round_trips.values(), default=0.0) >= config.stream_min_rtt
    return micro_batches(x, config.max_tokens_in_batch, config.stream_bytes if long_link else None)


async def forward_batches(
    manager: SequenceManager, x: np.ndarray, prompts: np.ndarray
) -> tuple[np.ndarray, list[list[SpanRun]]]:
    """Forward through the whole chain, micro-batches concurrently; returns outputs and per-batch spans."""
    deadline = time.monotonic() + manager.config.deadline
    parts = _micro_batches(manager, x)
    results = await _gather(
        [chain_forward(manager, x[s], prompts[:, s], 0, manager.num_blocks, deadline) for s in parts]
    )
    return np.concatenate([out for out, _ in results]), [done for _, done in results]


async def backward_batches(
    manager: SequenceManager,
    x: np.ndarray,
    prompts: np.ndarray,
    grad_out: np.ndarray,
    done: list[list[SpanRun]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients w.r.t. ``x`` and ``prompts``; ``done`` is forward's saved state, or None to recompute it."""
    deadline = time.monotonic() + manager.config.deadline
    parts = _micro_batches(manager, x)

    async def one(i: int, s: slice):
        spans = done[i] if done is not None else None
        if spans is None:
            _, spans = await chain_forward(manager, x[s], prompts[:, s], 0, manager.num_blocks, deadline)
        return await chain_backward(manager, grad_out[s], spans, prompts[:, s], deadline)

    results = await _gather([one(i, s) for i, s in enumerate(parts)])
    return np.concatenate([g for g, _ in results]), np.concatenate([gp for _, gp in results], axis=1)


async def _gather(coros: list):
    """Run concurrently; on the first error cancel the rest (so no orphan retries linger) and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
