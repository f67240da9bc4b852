"""The fault-tolerant chain: forward span by span, backward in reverse, re-routing around failures.

Knows spans and retries, not bytes: every call goes through a ``SequenceManager``. Where servers hand
results to each other (``SequenceManager.hands_off``), a run of such spans is called at once and the
servers pass the tensors on (``Hop``); what comes back is what the client-driven chain would have. Arrays are
numpy arrays in the client's memory. Deep prompts always cover the whole chain
(``[num_blocks, batch, prompt_len, hidden]``, indexed by absolute block number); ``prompt_len`` may be 0.
So do the client's LoRA weights, when it has any (``LoraWeights``; None for none).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxseq.client.errors import MissingBlocksError, ServerFailure
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import Hop, SequenceManager, SpanGradients
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
    manager: SequenceManager,
    x: np.ndarray,
    prompts: np.ndarray,
    start: int,
    end: int,
    deadline: float,
    lora: LoraWeights | None = None,
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
                plan = manager.make_route(pos, end, tokens=x.shape[0] * x.shape[1], lora_rank=lora.rank if lora else 0)
            hops = _hop_group(manager, plan)
            if len(hops) > 1:
                retries.what = f"forward of blocks {hops[0].start}:{hops[-1].end} through server-to-server hops"
                runs, x, failure = await _forward_hops(manager, hops, x, prompts, retries, lora)
                done.extend(runs)
                del plan[: len(runs)]
                if runs:
                    pos = runs[-1].span.end
                    retries.succeeded()
                if failure is not None:
                    raise failure
                continue
            span = plan[0]
            retries.what = f"forward of blocks {span.start}:{span.end}"
            cache_id = manager.new_cache_id()
            span_prompts = prompts[span.start : span.end]
            out = await manager.forward(span, x, span_prompts, retries.timeout(), cache_id, lora)
            if manager.should_verify():
                ids = {span.peer: cache_id}
                rerun = functools.partial(_rerun_forward, manager, retries, x, span_prompts, lora, ids)
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


def _hop_group(manager: SequenceManager, spans: list[Span]) -> list[Span]:
    """The leading spans of ``spans`` whose servers each hand on to the next (at least the first span)."""
    group = spans[:1]
    for span in spans[1:]:
        if not manager.hands_off(group[-1], span):
            break
        group.append(span)
    return group


def _hops(peers: list[str]) -> list[Hop]:
    """Each call's ``Hop`` in a run of calls to ``peers``, each handing on to the next under a fresh id."""
    ids = [uuid.uuid4().hex for _ in peers[1:]]
    return [
        Hop(to=(peers[i + 1], ids[i]) if i < len(ids) else None, from_id=ids[i - 1] if i else None)
        for i in range(len(peers))
    ]


def _hop_timeouts(retries: Retries, n: int) -> list[float]:
    """Each call's timeout in a run of ``n`` calls sent at once: the i-th also waits for the i - 1 before it."""
    timeout, left = retries.timeout(), retries.deadline - time.monotonic()
    return [min(timeout * (i + 1), left) for i in range(n)]


async def _forward_hops(
    manager: SequenceManager,
    spans: list[Span],
    x: np.ndarray,
    prompts: np.ndarray,
    retries: Retries,
    lora: LoraWeights | None,
) -> tuple[list[SpanRun], np.ndarray, ServerFailure | None]:
    """Forward through ``spans`` (from ``_hop_group``), all called at once, each server handing its outputs to
    the next; returns the spans done, the last one's output, and the failure that stopped the run (None).
    A server that did not hand on also ends the run early: the chain goes on from there."""
    cache_ids = [manager.new_cache_id() for _ in spans]
    timeouts = _hop_timeouts(retries, len(spans))
    calls = [
        asyncio.ensure_future(
            manager.forward_hop(span, x, prompts[span.start : span.end], timeout, cache_id, lora, hop)
        )
        for span, timeout, cache_id, hop in zip(spans, timeouts, cache_ids, _hops([s.peer for s in spans]))
    ]
    outs, failure = await _handed_in_order(calls)
    inputs = [x, *outs]
    return [SpanRun(*run) for run in zip(spans[: len(outs)], inputs, cache_ids)], inputs[-1], failure


async def _backward_hops(
    manager: SequenceManager,
    runs: list[SpanRun],
    grad_out: np.ndarray,
    prompts: np.ndarray,
    retries: Retries,
    lora: LoraWeights | None,
) -> tuple[list[SpanGradients], ServerFailure | None]:
    """Backward through ``runs`` (last span first), all called at once, each server handing its grad inputs to
    the next; returns the gradients of the spans done, and the failure that stopped the run (None). As in
    ``_forward_hops``, a server that did not hand on ends the run early."""
    timeouts = _hop_timeouts(retries, len(runs))
    calls = [
        asyncio.ensure_future(
            manager.backward_hop(
                run.span, run.inputs, grad_out, prompts[run.span.start : run.span.end], timeout, run.cache_id, lora, hop
            )
        )
        for run, timeout, hop in zip(runs, timeouts, _hops([r.span.peer for r in runs]))
    ]
    return await _handed_in_order(calls)


async def _handed_in_order(calls: Sequence[asyncio.Future]) -> tuple[list, ServerFailure | None]:
    """The results of a run of hop calls in order: up to the first that failed (and its failure), or up to the
    first whose server did not hand on (included). The calls still running are then cancelled (their servers
    drop what they await when it times out)."""
    results: list[Any] = []
    try:
        for call in calls:
            try:
                result, handed = await call
            except ServerFailure as failure:
                return results, failure
            results.append(result)
            if not handed:
                break
        return results, None
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def _rerun_forward(
    manager: SequenceManager,
    retries: Retries,
    x: np.ndarray,
    prompts: np.ndarray,
    lora: LoraWeights | None,
    ids: dict,
    other: Span,
) -> np.ndarray:
    """A span's forward on ``other`` (a cross-check), under a new cache id kept in ``ids``."""
    ids[other.peer] = manager.new_cache_id()
    return await manager.forward(other, x, prompts, retries.timeout(), ids[other.peer], lora)


async def _rerun_backward(
    manager: SequenceManager,
    retries: Retries,
    x: np.ndarray,
    grad_out: np.ndarray,
    prompts: np.ndarray,
    lora: LoraWeights | None,
    other: Span,
) -> SpanGradients:
    """A span's backward on ``other`` (a cross-check), with its inputs."""
    return await manager.backward(other, x, grad_out, prompts, retries.timeout(), lora=lora)


def _as_tuple(grads: SpanGradients) -> tuple:
    """A backward's gradients as a flat tuple (to compare two servers')."""
    return (grads.inputs, grads.prompts, *[block[name] for block in grads.lora or () for name in sorted(block)])


@dataclasses.dataclass(frozen=True)
class ChainGradients:
    """Gradients of a call through the chain w.r.t. its hidden states, deep prompts and (None without any) the
    client's LoRA arrays (by name, ``[num_blocks, ...]``)."""

    inputs: np.ndarray
    prompts: np.ndarray
    lora: dict[str, np.ndarray] | None


async def chain_backward(
    manager: SequenceManager,
    grad_out: np.ndarray,
    done: list[SpanRun],
    prompts: np.ndarray,
    deadline: float,
    lora: LoraWeights | None = None,
) -> ChainGradients:
    """Backward through ``done`` (from ``chain_forward``) in reverse.

    When a span's backward fails, its forward is re-run through other servers (maybe as several
    spans) from the span's saved input, and backward goes on through those.
    """
    grad_prompts = np.zeros_like(prompts)
    grad_lora = lora.zero_grads() if lora else None

    def add(span: Span, grads: SpanGradients) -> None:
        if grads.prompts is not None:
            grad_prompts[span.start : span.end] = grads.prompts
        if grad_lora is not None and grads.lora is not None:
            for block, named in enumerate(grads.lora, start=span.start):
                for name, grad in named.items():
                    grad_lora[name][block] = grad

    async def replay(run: SpanRun, error: ServerFailure) -> None:
        """After ``run``'s backward failed: its forward again, through other servers, for backward to go on."""
        await retries.failed(error, run.span.start)
        _, redone = await chain_forward(manager, run.inputs, prompts, run.span.start, run.span.end, deadline, lora)
        todo.extend(redone)

    todo = list(done)
    retries = Retries(manager, deadline, "backward")
    while todo:
        hops = _hop_group(manager, [run.span for run in reversed(todo)])
        if len(hops) > 1:
            group = [todo.pop() for _ in hops]
            retries.what = (
                f"backward of blocks {group[-1].span.start}:{group[0].span.end} through server-to-server hops"
            )
            results, failure = await _backward_hops(manager, group, grad_out, prompts, retries, lora)
            for run, grads in zip(group, results):
                add(run.span, grads)
                grad_out = grads.inputs
            if results:
                retries.succeeded()
            todo.extend(reversed(group[len(results) :]))
            if failure is not None:
                await replay(todo.pop(), failure)
            continue
        run = todo.pop()
        span, x = run.span, run.inputs
        retries.what = f"backward of blocks {span.start}:{span.end}"
        span_prompts = prompts[span.start : span.end]
        try:
            grads = await manager.backward(span, x, grad_out, span_prompts, retries.timeout(), run.cache_id, lora)
            if manager.should_verify():
                rerun = functools.partial(_rerun_backward, manager, retries, x, grad_out, span_prompts, lora)
                _, grads = await verified(manager, span, grads, rerun, as_tuple=_as_tuple)
        except ServerFailure as error:
            await replay(run, error)
            continue
        grad_out = grads.inputs
        add(span, grads)
        retries.succeeded()
    return ChainGradients(grad_out, grad_prompts, grad_lora)


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


@dataclasses.dataclass(frozen=True)
class MicroBatchRun:
    """A micro-batch whose forward is done: its rows of the call, and its spans."""

    rows: slice
    spans: list[SpanRun]


async def forward_batches(
    manager: SequenceManager, x: np.ndarray, prompts: np.ndarray, lora: LoraWeights | None = None
) -> tuple[np.ndarray, list[MicroBatchRun]]:
    """Forward through the whole chain, micro-batches concurrently; returns outputs and each micro-batch's run."""
    deadline = time.monotonic() + manager.config.deadline
    parts = _micro_batches(manager, x)
    results = await _gather(
        [chain_forward(manager, x[s], prompts[:, s], 0, manager.num_blocks, deadline, lora) for s in parts]
    )
    return np.concatenate([out for out, _ in results]), [MicroBatchRun(s, done) for s, (_, done) in zip(parts, results)]


async def backward_batches(
    manager: SequenceManager,
    x: np.ndarray,
    prompts: np.ndarray,
    grad_out: np.ndarray,
    done: list[MicroBatchRun] | None = None,
    lora: LoraWeights | None = None,
) -> ChainGradients:
    """Gradients w.r.t. ``x``, ``prompts`` and ``lora`` (summed over micro-batches); ``done`` is forward's saved
    state (its micro-batches are kept: the long-link gate may have changed since), or None to recompute it."""
    deadline = time.monotonic() + manager.config.deadline
    runs = done if done is not None else [MicroBatchRun(s, []) for s in _micro_batches(manager, x)]

    async def one(run: MicroBatchRun) -> ChainGradients:
        s, spans = run.rows, run.spans
        if not spans:
            _, spans = await chain_forward(manager, x[s], prompts[:, s], 0, manager.num_blocks, deadline, lora)
        return await chain_backward(manager, grad_out[s], spans, prompts[:, s], deadline, lora)

    results = await _gather([one(run) for run in runs])
    grad_lora = None
    if lora is not None:
        grad_lora = {name: sum(r.lora[name] for r in results if r.lora is not None) for name in lora.names}
    return ChainGradients(
        np.concatenate([r.inputs for r in results]), np.concatenate([r.prompts for r in results], axis=1), grad_lora
    )


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
