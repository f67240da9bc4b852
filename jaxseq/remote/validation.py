"""Checks a server makes on a request before any compute. Each failure names the problem; the
handler turns it into an error reply and keeps serving."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxseq.arrays import all_finite
from jaxseq.remote.protocol import ProtocolError, is_dummy, is_float


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a server accepts: hidden size, and the most tokens (batch x seq) in one request."""

    hidden_size: int
    max_tokens: int


def _check_hidden(name: str, array: np.ndarray, limits: Limits) -> None:
    if array.ndim != 3:
        raise ProtocolError(f"{name} must be [batch, seq, hidden], got shape {list(array.shape)}")
    batch, seq, hidden = array.shape
    if hidden != limits.hidden_size:
        raise ProtocolError(f"{name} has hidden size {hidden}; this server's blocks take {limits.hidden_size}")
    if batch == 0 or seq == 0:
        raise ProtocolError(f"{name} is empty (shape {list(array.shape)})")
    if batch * seq > limits.max_tokens:
        raise ProtocolError(
            f"{name} has {batch} x {seq} = {batch * seq} tokens; this server accepts at most {limits.max_tokens} "
            "per request (send smaller micro-batches)"
        )
    if not is_float(array):
        raise ProtocolError(f"{name} must be floating point, got {array.dtype}")
    if not all_finite(array):
        raise ProtocolError(f"{name} has non-finite values")


def _check_prompts(prompts: np.ndarray, hidden: np.ndarray, n_blocks: int) -> np.ndarray:
    """The prompts as ``[n_blocks, batch, prompt_len, hidden]``, a zero-length one for the dummy."""
    batch, seq, size = hidden.shape
    if is_dummy(prompts):
        return np.zeros((n_blocks, batch, 0, size), hidden.dtype)
    if prompts.ndim != 4 or prompts.shape[0] != n_blocks or prompts.shape[1] != batch or prompts.shape[3] != size:
        raise ProtocolError(
            f"prompts must be [n_blocks={n_blocks}, batch={batch}, prompt_len, hidden={size}], "
            f"got shape {list(prompts.shape)}"
        )
    if prompts.shape[2] > seq:
        raise ProtocolError(f"prompt length {prompts.shape[2]} exceeds the sequence length {seq}")
    if not is_float(prompts):
        raise ProtocolError(f"prompts must be floating point, got {prompts.dtype}")
    if not all_finite(prompts):
        raise ProtocolError("prompts have non-finite values")
    return prompts


def forward_inputs(arrays: list[np.ndarray], n_blocks: int, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """``(hidden_states, prompts)`` of a forward request: hidden states, then prompts or the dummy."""
    if len(arrays) not in (1, 2):
        raise ProtocolError(f"forward takes 1 or 2 tensors (hidden states, prompts), got {len(arrays)}")
    hidden = arrays[0]
    _check_hidden("hidden states", hidden, limits)
    prompts = _check_prompts(arrays[1] if len(arrays) == 2 else np.zeros(0, np.float32), hidden, n_blocks)
    return hidden, prompts


def cached_backward_inputs(arrays: list[np.ndarray], limits: Limits) -> np.ndarray:
    """The grad outputs of a backward whose inputs are its cached forward's (``jaxseq_inputs_cached``)."""
    if len(arrays) != 1:
        raise ProtocolError(f"a backward of a cached forward takes 1 tensor (grad outputs), got {len(arrays)}")
    _check_hidden("grad outputs", arrays[0], limits)
    return arrays[0]


def backward_inputs(
    arrays: list[np.ndarray], n_blocks: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, grad_outputs, prompts)`` of a backward request."""
    if len(arrays) not in (2, 3):
        raise ProtocolError(f"backward takes 2 or 3 tensors (inputs, grad outputs, prompts), got {len(arrays)}")
    inputs, grad_outputs = arrays[0], arrays[1]
    _check_hidden("inputs", inputs, limits)
    _check_hidden("grad outputs", grad_outputs, limits)
    if grad_outputs.shape != inputs.shape:
        raise ProtocolError(
            f"grad outputs have shape {list(grad_outputs.shape)}, but inputs have {list(inputs.shape)}"
        )
    prompts = _check_prompts(arrays[2] if len(arrays) == 3 else np.zeros(0, np.float32), inputs, n_blocks)
    return inputs, grad_outputs, prompts
