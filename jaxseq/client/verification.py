"""Client-side distrust: re-run a sampled fraction of spans on a second server and compare.

On agreement the first answer stands. On disagreement a third server decides: the outlier is
banned and the majority's answer is used. With no third server to ask, the first server's answer
is rejected (it is banned and the span retried elsewhere). Tolerances follow the dtype: servers
may legitimately differ by float rounding (XLA vs torch kernels, padding), never by more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import ml_dtypes
import numpy as np

from jaxseq.client.errors import FaultyResponse, ServerFailure
from jaxseq.client.manager import SequenceManager
from jaxseq.client.routing import Span

Result = TypeVar("Result")


def tolerance(dtype) -> float:
    """Relative (norm-wise) difference two honest servers may show for results of ``dtype``."""
    if dtype == np.float64:
        return 1e-9
    if dtype == np.float32:
        return 1e-4
    if dtype in (np.float16, ml_dtypes.bfloat16):
        return 2e-2
    raise ValueError(f"no verification tolerance for dtype {dtype}")


def agree(a: Sequence, b: Sequence) -> bool:
    """Whether two results (tuples of arrays or None) match within their dtype's tolerance."""
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is None:
            continue
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.linalg.norm(x64)), float(np.linalg.norm(y64)), 1e-30)
        if np.linalg.norm(x64 - y64) > tolerance(x.dtype) * scale:
            return False
    return True


async def verified(
    manager: SequenceManager,
    span: Span,
    first: Result,
    rerun: Callable[[Span], Awaitable[Result]],
    as_tuple: Callable[[Result], Sequence] = lambda r: (r,),
) -> tuple[Span, Result]:
    """Cross-check ``first`` (the answer of ``span.peer``) by re-running the span on other servers.

    Returns the span whose answer is trusted and that answer. Raises ``FaultyResponse`` naming
    ``span.peer`` when its answer is outvoted or cannot be confirmed.
    """
    others = manager.alternatives(span)
    answers: list[tuple[Span, Result]] = [(span, first)]
    for peer in others:
        other = Span(peer, span.start, span.end)
        try:
            answers.append((other, await rerun(other)))
        except ServerFailure as error:
            manager.ban(
                error.peer, f"re-running blocks {span.start}:{span.end} to check another server failed: {error}"
            )
            continue
        if len(answers) == 2 and agree(as_tuple(first), as_tuple(answers[1][1])):
            manager.verified_spans += 1
            return span, first
        if len(answers) == 3:
            break
    if len(answers) == 1:  # nobody else holds this span: nothing to compare with
        manager.unverified_spans += 1
        return span, first
    manager.disagreements += 1
    if len(answers) == 3:
        (_, first_answer), (second, second_answer), (third, third_answer) = answers
        a, b, c = as_tuple(first_answer), as_tuple(second_answer), as_tuple(third_answer)
        if agree(a, c):
            _outvoted(manager, second.peer, span)
            return span, first
        if agree(b, c):
            _outvoted(manager, span.peer, span)
            return second, second_answer
        _outvoted(manager, second.peer, span)
        _outvoted(manager, third.peer, span)
    manager.outcomes[span.peer, "outvoted"] += 1
    raise FaultyResponse(span.peer, f"its answer for blocks {span.start}:{span.end} was not confirmed by other servers")


def _outvoted(manager: SequenceManager, peer: str, span: Span) -> None:
    manager.outcomes[peer, "outvoted"] += 1
    manager.ban(peer, f"its answer for blocks {span.start}:{span.end} disagreed with other servers'")
