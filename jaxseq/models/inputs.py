"""What a span of blocks takes: hidden states ``[batch, seq, hidden]`` and deep prompts
``[num_blocks, batch, prompt_len, hidden]``. The one check of that, with the same messages wherever
it runs: the JAX primitive (at trace time), the torch bridge and the server (on each request).
"""

from __future__ import annotations

from typing import Any

from jaxseq.arrays import is_floating


def check_span_inputs(
    x: Any, prompts: Any | None, *, hidden_size: int, num_blocks: int, name: str = "hidden states"
) -> None:
    """Raise ``ValueError`` naming the problem when ``x`` and ``prompts`` don't fit a span of ``num_blocks``
    blocks of ``hidden_size``. Each is anything with ``shape`` and ``dtype`` (numpy and JAX arrays,
    tracers, ``jax.ShapeDtypeStruct``); ``prompts`` may be None; ``name`` is what messages call ``x``.

    Example:
        >>> import numpy as np
        >>> check_span_inputs(np.zeros((2, 5, 64)), None, hidden_size=64, num_blocks=4)
        >>> check_span_inputs(np.zeros((2, 5, 32)), None, hidden_size=64, num_blocks=4, name="x")
        Traceback (most recent call last):
        ...
        ValueError: x: hidden size 32, but the blocks take 64
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 3:
        raise ValueError(f"{name} must be [batch, seq, hidden], got shape {list(shape)}")
    if not is_floating(x.dtype):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    batch, seq, hidden = shape
    if hidden != hidden_size:
        raise ValueError(f"{name}: hidden size {hidden}, but the blocks take {hidden_size}")
    if batch == 0 or seq == 0:
        raise ValueError(f"{name} must have a non-empty batch and sequence, got shape {list(shape)}")
    if prompts is None:
        return
    prompts_shape = tuple(getattr(prompts, "shape", ()))
    expected = f"prompts must be [n_blocks={num_blocks}, batch={batch}, prompt_len, hidden={hidden}]"
    if len(prompts_shape) != 4:
        raise ValueError(f"{expected}, got shape {list(prompts_shape)}")
    n, prompts_batch, prompt_len, prompts_hidden = prompts_shape
    if (n, prompts_batch, prompts_hidden) != (num_blocks, batch, hidden):
        raise ValueError(f"{expected}, got shape {list(prompts_shape)}")
    if not is_floating(prompts.dtype):
        raise ValueError(f"prompts must have a floating dtype, got {prompts.dtype}")
    if prompt_len > seq:
        raise ValueError(f"prompt length {prompt_len} exceeds the sequence length {seq}")
