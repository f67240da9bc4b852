"""One call through the swarm on numpy arrays: run the chain, keep the forward's state for its
backward. Shared by ``jaxseq.remote_sequential`` (JAX host callbacks) and ``bridges.RemoteSequential``
(torch autograd), so both get the same micro-batching, re-routing, retries and bounded saved state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from typing import Any

import numpy as np

from jaxseq.arrays import all_finite
from jaxseq.client.chain import ChainGradients, MicroBatchRun, backward_batches, forward_batches
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import SequenceManager


def _run(manager: SequenceManager, coro: Coroutine) -> Any:
    """Run ``coro`` on the manager's loop; a failure is kept in ``manager.last_error`` and re-raised."""
    try:
        return manager.run(coro)
    except Exception as error:
        manager.record_error(error)
        raise


def _check_finite(manager: SequenceManager, arrays: dict[str, np.ndarray]) -> None:
    """Refuse NaN or inf from the caller before any call. Servers refuse such inputs (or answer with
    NaN), which the retry loop can't tell from a faulty server: it would ban healthy servers for it."""
    for name, array in arrays.items():
        if not all_finite(array):
            error = ValueError(
                f"{name} sent to the swarm have non-finite values (NaN or inf); nothing was sent. "
                "Find where they arise with jax.config.update('jax_debug_nans', True), or lower the learning rate"
            )
            manager.record_error(error)
            raise error


@dataclasses.dataclass(frozen=True)
class ForwardState:
    """What a forward keeps for its backward: its micro-batches' runs, and the LoRA weights it sent (whose
    digests the backward names again, without hashing the weights twice)."""

    runs: list[MicroBatchRun]
    lora: LoraWeights | None


def run_forward(
    manager: SequenceManager, x: np.ndarray, prompts: np.ndarray, save: bool, lora: LoraWeights | None = None
) -> tuple[np.ndarray, int]:
    """Forward through the whole chain (with the client's ``lora`` weights, if any); returns the output and a
    handle for ``run_backward``.

    With ``save``, the routes and span inputs are kept in ``manager.saved`` (bounded) under the
    handle; otherwise the handle is 0 and nothing is kept.

    Example:
        >>> x, prompts = np.ones((1, 3, 32), np.float32), np.zeros((4, 1, 0, 32), np.float32)
        >>> out, handle = run_forward(manager, x, prompts, save=True)
        >>> grads = run_backward(manager, x, prompts, np.ones_like(out), handle)
        >>> out.shape, grads.inputs.shape, grads.prompts.shape
        ((1, 3, 32), (1, 3, 32), (4, 1, 0, 32))
    """
    _check_finite(manager, {"hidden states": x, "prompts": prompts})
    if lora is not None:
        _check_finite(manager, {f"LoRA weights {name}": array for name, array in lora.arrays.items()})
    out, runs = _run(manager, forward_batches(manager, x, prompts, lora))
    return out, (manager.saved.put(ForwardState(runs, lora)) if save else 0)


def run_backward(
    manager: SequenceManager,
    x: np.ndarray,
    prompts: np.ndarray,
    grad_out: np.ndarray,
    handle: int,
    lora: LoraWeights | None = None,
) -> ChainGradients:
    """Gradients w.r.t. ``x``, ``prompts`` and ``lora`` (the forward's), from the forward state saved under
    ``handle``.

    The state is used once. When it is missing (handle 0, evicted, or already used by an earlier
    backward) the forward is recomputed, so this never fails for that reason.
    """
    _check_finite(manager, {"grad outputs": grad_out})
    state: ForwardState | None = manager.saved.pop(handle)
    runs, lora = (state.runs, state.lora) if state is not None else (None, lora)
    return _run(manager, backward_batches(manager, x, prompts, grad_out, runs, lora))
