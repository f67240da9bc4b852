"""Checks a server makes on a request before any compute. Each failure is a ``ProtocolError`` naming
the problem (the shapes with the messages of ``jaxseq.models.inputs``, which clients check too); the
handler turns it into an error reply and keeps serving.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxseq.arrays import all_finite
from jaxseq.models.inputs import check_span_inputs
from jaxseq.remote.protocol import ProtocolError, is_dummy


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a server accepts: its blocks' hidden size, and the most tokens (batch x seq) in one request.

    Example:
        >>> forward_inputs([np.ones((1, 3, 8), np.float32)], 2, Limits(hidden_size=8, max_tokens=2))
        Traceback (most recent call last):
        ...
        jaxseq.remote.protocol.ProtocolError: hidden states: 1 x 3 = 3 tokens; this server accepts at most 2 ...
    """

    hidden_size: int
    max_tokens: int


def _checked(name: str, hidden: np.ndarray, prompts: np.ndarray, n_blocks: int, limits: Limits) -> np.ndarray:
    """The prompts as ``[n_blocks, batch, prompt_len, hidden]`` (zero-length for the dummy), after checking
    both tensors' shapes, dtypes, size and values."""
    prompts_or_none = None if is_dummy(prompts) else prompts
    try:
        check_span_inputs(hidden, prompts_or_none, hidden_size=limits.hidden_size, num_blocks=n_blocks, name=name)
    except ValueError as error:
        raise ProtocolError(str(error)) from None
    batch, seq, size = hidden.shape
    if batch * seq > limits.max_tokens:
        raise ProtocolError(
            f"{name}: {batch} x {seq} = {batch * seq} tokens; this server accepts at most {limits.max_tokens} "
            "per request (send smaller micro-batches)"
        )
    if not all_finite(hidden):
        raise ProtocolError(f"{name}: non-finite values (NaN or inf)")
    if prompts_or_none is None:
        return np.zeros((n_blocks, batch, 0, size), hidden.dtype)
    if not all_finite(prompts):
        raise ProtocolError("prompts: non-finite values (NaN or inf)")
    return prompts


def forward_inputs(arrays: list[np.ndarray], n_blocks: int, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """``(hidden_states, prompts)`` of a forward request: hidden states, then prompts or the dummy."""
    if len(arrays) not in (1, 2):
        raise ProtocolError(f"forward takes 1 or 2 tensors (hidden states, prompts), got {len(arrays)}")
    hidden = arrays[0]
    prompts = arrays[1] if len(arrays) == 2 else np.zeros(0, np.float32)
    return hidden, _checked("hidden states", hidden, prompts, n_blocks, limits)


def cached_backward_inputs(arrays: list[np.ndarray], n_blocks: int, limits: Limits) -> np.ndarray:
    """The grad outputs of a backward whose inputs are its cached forward's (``jaxseq_inputs_cached``)."""
    if len(arrays) != 1:
        raise ProtocolError(f"a backward of a cached forward takes 1 tensor (grad outputs), got {len(arrays)}")
    _checked("grad outputs", arrays[0], np.zeros(0, np.float32), n_blocks, limits)
    return arrays[0]


def backward_inputs(
    arrays: list[np.ndarray], n_blocks: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, grad_outputs, prompts)`` of a backward request."""
    if len(arrays) not in (2, 3):
        raise ProtocolError(f"backward takes 2 or 3 tensors (inputs, grad outputs, prompts), got {len(arrays)}")
    inputs, grad_outputs = arrays[0], arrays[1]
    prompts = _checked("inputs", inputs, arrays[2] if len(arrays) == 3 else np.zeros(0, np.float32), n_blocks, limits)
    _checked("grad outputs", grad_outputs, np.zeros(0, np.float32), n_blocks, limits)
    if grad_outputs.shape != inputs.shape:
        raise ProtocolError(f"grad outputs have shape {list(grad_outputs.shape)}, but inputs have {list(inputs.shape)}")
    return inputs, grad_outputs, prompts
