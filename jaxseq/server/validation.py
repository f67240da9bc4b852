"""Checks a server makes on a request before any compute. Each failure is a ``ProtocolError`` naming
the problem (the shapes with the messages of ``jaxseq.models.inputs``, which clients check too); the
handler turns it into an error reply and keeps serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxseq.arrays import all_finite
from jaxseq.models.inputs import check_span_inputs
from jaxseq.remote.protocol import DUMMY, ProtocolError, is_dummy


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
    prompts = arrays[1] if len(arrays) == 2 else DUMMY
    return hidden, _checked("hidden states", hidden, prompts, n_blocks, limits)


def cached_backward_inputs(arrays: list[np.ndarray], n_blocks: int, limits: Limits) -> np.ndarray:
    """The grad outputs of a backward whose inputs are its cached forward's (``jaxseq_inputs_cached``)."""
    if len(arrays) != 1:
        raise ProtocolError(f"a backward of a cached forward takes 1 tensor (grad outputs), got {len(arrays)}")
    _checked("grad outputs", arrays[0], DUMMY, n_blocks, limits)
    return arrays[0]


def backward_inputs(
    arrays: list[np.ndarray], n_blocks: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, grad_outputs, prompts)`` of a backward request."""
    if len(arrays) not in (2, 3):
        raise ProtocolError(f"backward takes 2 or 3 tensors (inputs, grad outputs, prompts), got {len(arrays)}")
    inputs, grad_outputs = arrays[0], arrays[1]
    prompts = _checked("inputs", inputs, arrays[2] if len(arrays) == 3 else DUMMY, n_blocks, limits)
    _checked("grad outputs", grad_outputs, DUMMY, n_blocks, limits)
    if grad_outputs.shape != inputs.shape:
        raise ProtocolError(f"grad outputs have shape {list(grad_outputs.shape)}, but inputs have {list(inputs.shape)}")
    return inputs, grad_outputs, prompts


def lora_upload(
    names: Any, arrays: list[np.ndarray], n_blocks: int, shapes: dict[str, tuple[int, ...]], max_rank: int
) -> list[dict[str, np.ndarray]]:
    """Each block's LoRA arrays of an ``rpc_lora`` request: ``names`` (``LORA_NAMES_KEY``) name each block's
    arrays in order, pairs ``{target}_lora_a: [in, rank]`` and ``{target}_lora_b: [rank, out]`` of the
    projections in ``shapes`` (``{target: (in, out)}``), of one rank up to ``max_rank``, finite floats.

    Example:
        >>> a, b = np.zeros((8, 4), np.float32), np.zeros((4, 8), np.float32)
        >>> lora_upload(["q_proj_lora_a", "q_proj_lora_b"], [a, b], 1, {"q_proj": (8, 8)}, max_rank=2)
        Traceback (most recent call last):
        ...
        jaxseq.remote.protocol.ProtocolError: LoRA rank 4 is above this server's limit of 2 (--max-lora-rank)
    """
    if max_rank == 0:
        raise ProtocolError("this server applies no client LoRA weights (--max-lora-rank 0)")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ProtocolError("a LoRA request names its arrays in a non-empty list of strings (jaxseq_lora_names)")
    if len(set(names)) != len(names) or len(arrays) != n_blocks * len(names):
        raise ProtocolError(
            f"a LoRA request for {n_blocks} blocks of {len(names)} distinct arrays each carries "
            f"{n_blocks * len(names)} tensors, got {len(arrays)} (names may not repeat)"
        )
    targets = {
        name.removesuffix(suffix) for name in names for suffix in ("_lora_a", "_lora_b") if name.endswith(suffix)
    }
    unknown = sorted(set(names) - {f"{t}_lora_{ab}" for t in targets & set(shapes) for ab in "ab"})
    if unknown:
        raise ProtocolError(f"LoRA arrays {unknown[:4]} are not pairs of {sorted(shapes)}'s _lora_a and _lora_b")
    missing = sorted(f"{t}_lora_{ab}" for t in targets for ab in "ab" if f"{t}_lora_{ab}" not in names)
    if missing:
        raise ProtocolError(f"LoRA arrays {missing[:4]} are missing: each target takes both _lora_a and _lora_b")
    blocks = []
    for i in range(n_blocks):
        block = dict(zip(names, arrays[i * len(names) : (i + 1) * len(names)]))
        for target in targets:
            a, b = block[f"{target}_lora_a"], block[f"{target}_lora_b"]
            rank = a.shape[-1] if a.ndim == 2 else 0
            fan_in, fan_out = shapes[target]
            if a.shape != (fan_in, rank) or b.shape != (rank, fan_out) or rank == 0:
                raise ProtocolError(
                    f"{target}'s LoRA arrays have shapes {list(a.shape)} and {list(b.shape)}; this model's "
                    f"{target} takes [{fan_in}, rank] and [rank, {fan_out}]"
                )
            if rank > max_rank:
                raise ProtocolError(f"LoRA rank {rank} is above this server's limit of {max_rank} (--max-lora-rank)")
        for name, array in block.items():
            if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
                raise ProtocolError(f"LoRA array {name} has dtype {array.dtype}; send floats")
            if not all_finite(array):
                raise ProtocolError(f"LoRA array {name} has non-finite values (NaN or inf)")
        blocks.append(block)
    return blocks


def lora_digests(value: Any, n_blocks: int) -> list[str]:
    """The per-block digests a request names under ``jaxseq_lora``: one 32-hex-digit string per block."""
    if not (
        isinstance(value, (list, tuple))
        and len(value) == n_blocks
        and all(isinstance(d, str) and len(d) == 32 for d in value)
    ):
        raise ProtocolError(
            f"jaxseq_lora must list one LoRA digest (32 hex digits) per block of the request's {n_blocks}"
        )
    return list(value)


# --- metadata ------------------------------------------------------------------------------------
_NUMBER = (int, float)
# Keys of Petals' and jaxseq's request metadata -> the types their values may have. Unknown keys are
# ignored (peers of other versions send keys of their own); a known key of the wrong type is refused.
METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "points": _NUMBER,
    "active_adapter": (str, type(None)),
    "max_length": (int,),
    "alloc_timeout": _NUMBER,
    "session_id": (str,),
    "step_id": (str,),
    "start_from_position": (int,),
    "pushed": (bool,),
    "next_servers": (list, tuple),
    "output_compression": (list, tuple, type(None)),
    "args_structure": (list, tuple, type(None)),
    "jaxseq_cache_id": (str,),
    "jaxseq_inputs_cached": (bool,),
    "jaxseq_shm": (dict,),
    "jaxseq_lora": (list, tuple),
    "jaxseq_lora_names": (list, tuple),
}


def check_metadata(metadata: dict) -> None:
    """Refuse a request whose metadata gives a known key a value of the wrong type, naming the key.

    Example:
        >>> check_metadata({"points": "lots"})
        Traceback (most recent call last):
        ...
        jaxseq.remote.protocol.ProtocolError: metadata key 'points' must be int or float, got str
    """
    for key, types in METADATA_TYPES.items():
        if key not in metadata:
            continue
        value = metadata[key]
        numeric = types in (_NUMBER, (int,))
        if not isinstance(value, types) or (numeric and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"metadata key {key!r} must be {names}, got {type(value).__name__}")


def unpack_args(arrays: list[np.ndarray], args_structure: Any) -> list[np.ndarray | None]:
    """The positional arguments of a request whose tensors a Petals client packed with ``args_structure``
    (``[[b"__T0", b"__T1", ...], {}]``: each argument a tensor's index, or a plain value such as None);
    without one, the tensors in order. Keyword arguments are refused: no RPC of this server takes any.

    Example:
        >>> a, b = np.zeros(2), np.ones(3)
        >>> [x.shape for x in unpack_args([a, b], [[b"__T1", b"__T0"], {}])]
        [(3,), (2,)]
    """
    if args_structure is None:
        return list(arrays)
    if not (isinstance(args_structure, (list, tuple)) and len(args_structure) == 2):
        raise ProtocolError(f"args_structure must be [args, kwargs], got {args_structure!r:.80}")
    args, kwargs = args_structure
    if kwargs not in ({}, None):
        raise ProtocolError(f"args_structure passes keyword arguments {kwargs!r:.80}; this server takes none")
    if not isinstance(args, (list, tuple)):
        raise ProtocolError(f"args_structure's arguments must be a list, got {args!r:.80}")
    unpacked: list[np.ndarray | None] = []
    for arg in args:
        if arg is None:
            unpacked.append(None)
        elif isinstance(arg, bytes) and arg.startswith(b"__T") and arg[3:].isdigit() and int(arg[3:]) < len(arrays):
            unpacked.append(arrays[int(arg[3:])])
        else:
            raise ProtocolError(
                f"args_structure argument {arg!r:.40} is neither a tensor index of this request nor None"
            )
    return unpacked


# --- inference ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SessionRequest:
    """An inference session as its opening request asks for it."""

    max_length: int
    alloc_timeout: float
    session_id: str | None
    batch: int


def session_request(metadata: dict, first_tensor_shape: Sequence[int], inference_max_length: int) -> SessionRequest:
    """The session an ``rpc_inference`` stream opens: its ``max_length`` (required, within the server's
    limit), ``alloc_timeout``, ``session_id`` and batch (the first tensor's first axis, as in Petals)."""
    max_length = metadata.get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        raise ProtocolError(f"an inference session's first request must give an int max_length, got {max_length!r:.40}")
    if not 0 < max_length <= inference_max_length:
        raise ProtocolError(f"max_length {max_length} is outside this server's 1..{inference_max_length}")
    batch = int(first_tensor_shape[0]) if first_tensor_shape else 1
    if not 0 < batch:
        raise ProtocolError(f"an inference session needs a batch of at least one row, got {batch}")
    return SessionRequest(max_length, float(metadata.get("alloc_timeout", 0.0)), metadata.get("session_id"), batch)


def inference_step_inputs(
    arrays: list[np.ndarray | None], n_blocks: int, batch: int, position: int, max_length: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(hidden_states, prompts, hypo_ids)`` of one inference step: new hidden states for the session's
    ``batch``, fitting within its ``max_length`` from ``position``; prompts or the dummy; hypo_ids (a
    permutation-with-repeats of the rows, int64) or the dummy."""
    if not 1 <= len(arrays) <= 3 or arrays[0] is None:
        raise ProtocolError(
            f"an inference step takes 1 to 3 tensors (hidden states, prompts, hypo_ids), got {len(arrays)}"
        )
    hidden = arrays[0]
    prompts = arrays[1] if len(arrays) > 1 and arrays[1] is not None else DUMMY
    prompts = _checked("hidden states", hidden, prompts, n_blocks, limits)
    if hidden.shape[0] != batch:
        raise ProtocolError(f"hidden states have {hidden.shape[0]} rows, but the session was opened for {batch}")
    if position + hidden.shape[1] > max_length:
        raise ProtocolError(
            f"the step's {hidden.shape[1]} positions from position {position} exceed the session's max_length "
            f"{max_length}"
        )
    hypo_ids = arrays[2] if len(arrays) > 2 else None
    if hypo_ids is None or is_dummy(hypo_ids):
        return hidden, prompts, None
    if hypo_ids.dtype != np.int64 or hypo_ids.shape != (batch,):
        raise ProtocolError(f"hypo_ids must be int64 [{batch}], got {hypo_ids.dtype} {list(hypo_ids.shape)}")
    if hypo_ids.size and not 0 <= hypo_ids.min() <= hypo_ids.max() < batch:
        raise ProtocolError(f"hypo_ids must be rows of the session's batch, 0..{batch - 1}")
    return hidden, prompts, hypo_ids
