"""Petals 2.2's wire format, and nothing else: no routing, no I/O. Both sides speak it.

Requests are hivemind ``runtime_pb2.ExpertRequest`` messages whose ``uid`` is the span's block uids
(``{dht_prefix}.{i}``) joined by a space, whose tensors are hivemind-serialized (forward: hidden
states, then prompts or the dummy tensor; backward: inputs, grad outputs, prompts or dummy), and
whose ``metadata`` is a msgpack dict. Requests with more than ``MAX_UNARY_PAYLOAD_SIZE // 2`` bytes
of raw tensor data are streamed in parts of at most ``DEFAULT_MAX_MSG_SIZE``, as Petals does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import warnings
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
from hivemind.compression.base import USE_LEGACY_BFLOAT16
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from jaxseq.arrays import DTYPES, dtype_name, is_floating
from jaxseq.remote.compression import COMPRESSIONS as COMPRESSION_NAMES

HANDLER = "TransformerConnectionHandler"
RPC_INFO = f"{HANDLER}.rpc_info"
RPC_FORWARD = f"{HANDLER}.rpc_forward"
RPC_FORWARD_STREAM = f"{HANDLER}.rpc_forward_stream"
RPC_BACKWARD = f"{HANDLER}.rpc_backward"
RPC_BACKWARD_STREAM = f"{HANDLER}.rpc_backward_stream"
RPC_INFERENCE = f"{HANDLER}.rpc_inference"
RPC_PUSH = f"{HANDLER}.rpc_push"
RPC_LORA = f"{HANDLER}.rpc_lora"
RPC_HANDOFF = f"{HANDLER}.rpc_handoff"

CHAIN_DELIMITER = " "
# Request metadata key naming a forward whose activations a jaxseq server may keep for the backward
# that follows with the same id; Petals servers ignore unknown keys, Petals clients never send it.
CACHE_ID_KEY = "jaxseq_cache_id"
# A backward naming its forward's cache id with this key set sends only the grad outputs: its inputs
# are the cached forward's. Only to servers that announce ``ServerInfo.cached_backward``; a server that
# kept no such forward answers with a ``ErrorKind.CACHE_MISS`` error, and the client sends the inputs.
INPUTS_CACHED_KEY = "jaxseq_inputs_cached"
# A jaxseq extension: a client's own LoRA weights. ``rpc_lora`` (a stream: block uids, then each block's
# arrays, names from ``LORA_NAMES_KEY``, uncompressed) gives them to a server, which keeps them by their
# ``jaxseq.arrays.digest`` and replies with the digests; a forward, backward or inference session then names each
# of its blocks' digest under ``LORA_KEY``, and a backward returns the LoRA arrays' gradients after the
# others. A server that no longer holds a digest answers with an ``ErrorKind.LORA_MISS`` error: send again.
# Only to servers that announce ``ServerInfo.client_lora_rank``.
LORA_KEY = "jaxseq_lora"
LORA_NAMES_KEY = "jaxseq_lora_names"
# A jaxseq extension: server-to-server hops in training. A forward (backward) naming ``[peer_id, id]`` under
# ``HAND_TO_KEY`` has its server hand its outputs (grad inputs) on to that peer with ``rpc_handoff`` (a stream:
# the tensor, its id under ``HANDOFF_KEY``, compressed as the reply is) before it replies, and says in the
# reply's metadata whether that worked (``HANDED_OFF_KEY``). A request naming an id under ``HAND_FROM_KEY``
# sends an empty tensor in place of its hidden states (forward) or grad outputs (backward): the server takes
# the tensor handed off under that id. The client still gets every reply whole, so it can replay any span.
# Only between servers that announce ``ServerInfo.hands_off``.
HAND_TO_KEY = "jaxseq_hand_to"
HAND_FROM_KEY = "jaxseq_hand_from"
HANDOFF_KEY = "jaxseq_handoff"
HANDED_OFF_KEY = "jaxseq_handed_off"
STREAM_THRESHOLD = MAX_UNARY_PAYLOAD_SIZE // 2

# jaxseq's compression names -> hivemind's codes
COMPRESSIONS = {name: runtime_pb2.CompressionType.Value(code) for name, code in COMPRESSION_NAMES.items()}


class ErrorKind(enum.Enum):
    """Error replies a jaxseq client acts on, other than by retrying elsewhere. The server starts the
    error's text with the kind's value; ``error_kind`` finds it in the text hivemind delivers."""

    CACHE_MISS = "jaxseq cache miss"  # a backward named a forward the server did not keep: send the inputs
    SHARED_MEMORY = "jaxseq shared memory refused"  # the server can't use the client's memory files: use the wire
    LORA_MISS = "jaxseq lora miss"  # the request named LoRA weights the server does not hold: send them again


class ProtocolError(ValueError):
    """A message does not follow the protocol, or (with ``kind``) a request the server can't serve as
    sent; the text says why."""

    def __init__(self, message: str, kind: ErrorKind | None = None):
        self.kind = kind
        super().__init__(f"{kind.value}: {message}" if kind else message)


def error_kind(text: str) -> ErrorKind | None:
    """The kind of an error reply's text, or None for any other error: the one place where a reply's
    text is read for its meaning.

    Example:
        >>> error_kind(str(ProtocolError("no forward kept", ErrorKind.CACHE_MISS)))
        <ErrorKind.CACHE_MISS: 'jaxseq cache miss'>
    """
    return next((kind for kind in ErrorKind if kind.value in text), None)


# --- block uids -------------------------------------------------------------------------------
def block_uid(dht_prefix: str, index: int) -> str:
    return f"{dht_prefix}.{index}"


def span_uids(dht_prefix: str, start: int, end: int) -> str:
    """The ``uid`` field of a request for blocks ``start..end-1``."""
    return CHAIN_DELIMITER.join(block_uid(dht_prefix, i) for i in range(start, end))


def parse_span_uids(uids: str, dht_prefix: str) -> tuple[int, int]:
    """``(start, end)`` of a request's uids; they must be this model's, contiguous and in order."""
    if not uids:
        raise ProtocolError("the request names no block uids")
    indices = []
    for uid in uids.split(CHAIN_DELIMITER):
        prefix, dot, index = uid.rpartition(".")
        if not dot or prefix != dht_prefix or not index.isdigit():
            raise ProtocolError(f"uid {uid[:100]!r} is not a block of {dht_prefix!r} (expected {dht_prefix}.N)")
        indices.append(int(index))
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise ProtocolError(f"block uids must be contiguous and in order, got blocks {indices[:16]}")
    return indices[0], indices[-1] + 1


# --- tensors ---------------------------------------------------------------------------------
# Uncompressed tensors are written and read here, straight from and into numpy's buffers, in
# hivemind's exact format (raw little-endian bytes; bfloat16 as hivemind sends it); hivemind's
# torch round trip made about ten copies of every tensor. Compressed ones go through hivemind.
DUMMY = np.empty(0, np.float32)  # Petals' dummy tensor: torch.empty(0)


@contextlib.contextmanager
def _read_only_arrays_as_tensors():
    """Arrays from JAX and from messages are read-only, which torch warns about when it wraps them;
    (de)compression never writes to its input, so that warning is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        yield


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of the array, for compression only."""
    array = np.ascontiguousarray(array)
    with _read_only_arrays_as_tensors():
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _encode(array: np.ndarray | None, compression: str) -> tuple[dict, Any]:
    """A tensor message's header fields, and its payload (a buffer)."""
    array = DUMMY if array is None else np.ascontiguousarray(array)
    if compression == "none" or not is_floating(array.dtype) or array.size == 0:  # hivemind can't compress empty
        name = dtype_name(array.dtype)
        if name == "bfloat16":  # as hivemind sends it: widened to float32 by default (older peers expect that)
            data = array.astype(np.float32) if USE_LEGACY_BFLOAT16 else array.view(np.uint16)
        else:
            data = array
        header = dict(compression=COMPRESSIONS["none"], size=array.shape, dtype=name, requires_grad=False)
        return header, data.reshape(-1).data.cast("B")
    tensor = serialize_torch_tensor(_to_torch(array), COMPRESSIONS[compression])
    header = dict(
        compression=tensor.compression, size=tensor.size, dtype=tensor.dtype, requires_grad=tensor.requires_grad
    )
    return header, tensor.buffer


def tensor_parts(array: np.ndarray | None, compression: str = "none", chunk_bytes: int | None = None) -> list[dict]:
    """The fields of an array's tensor message (``None``: Petals' dummy tensor), or, with ``chunk_bytes``,
    of its streamed parts as hivemind's ``split_for_streaming`` makes them. Add each to a message
    with ``message.tensors.add(**fields)``: building messages from ``Tensor`` objects copies slowly."""
    header, payload = _encode(array, compression)
    if chunk_bytes is None:
        return [dict(header, buffer=bytes(payload))]
    starts = range(0, len(payload), chunk_bytes)
    first = dict(header, chunks=len(starts), buffer=bytes(payload[:chunk_bytes]))
    return [first] + [dict(buffer=bytes(payload[start : start + chunk_bytes])) for start in starts[1:]]


def serialize(array: np.ndarray | None, compression: str = "none") -> runtime_pb2.Tensor:
    """A hivemind tensor message; ``None`` becomes Petals' dummy tensor (empty, float32)."""
    (fields,) = tensor_parts(array, compression)
    return runtime_pb2.Tensor(**fields)


def _decode(header: runtime_pb2.Tensor, buffer: bytes) -> np.ndarray:
    shape = tuple(header.size)
    dtype = DTYPES.get(header.dtype)
    if header.compression != COMPRESSIONS["none"] or dtype is None:
        message = runtime_pb2.Tensor(
            compression=header.compression,
            buffer=buffer,
            size=shape,
            dtype=header.dtype,
            requires_grad=header.requires_grad,
        )
        with _read_only_arrays_as_tensors():
            return _to_numpy(deserialize_torch_tensor(message).detach())
    count = int(np.prod(shape, dtype=np.int64))
    if header.dtype == "bfloat16" and count and len(buffer) == 4 * count:  # hivemind's legacy bfloat16: as float32
        return np.frombuffer(buffer, np.float32).astype(dtype).reshape(shape)
    if len(buffer) != count * dtype.itemsize:
        raise ValueError(f"{len(buffer)} bytes can't hold {count} values of {header.dtype}")
    return np.frombuffer(buffer, dtype).reshape(shape)  # read-only, sharing the message's bytes


def _deserialize_parts(parts: Sequence[runtime_pb2.Tensor]) -> np.ndarray:
    header = parts[0]
    try:
        buffer = header.buffer if len(parts) == 1 else b"".join(part.buffer for part in parts)
        return _decode(header, buffer)
    except Exception as error:  # hivemind raises whatever torch or numpy raise on bad buffers
        raise ProtocolError(
            f"malformed tensor (dtype {header.dtype!r}, size {list(header.size)[:8]}): {error}"
        ) from None


def deserialize(message: runtime_pb2.Tensor) -> np.ndarray:
    """The array in a hivemind tensor message (raises ``ProtocolError`` if it is malformed)."""
    return _deserialize_parts([message])


def is_dummy(array: np.ndarray) -> bool:
    return array.size == 0


def raw_bytes(arrays: Iterable[np.ndarray | None]) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


# --- requests ---------------------------------------------------------------------------------
def encode_metadata(metadata: Mapping[str, Any]) -> bytes:
    return MSGPackSerializer.dumps(dict(metadata))


def decode_metadata(raw: bytes) -> dict:
    if not raw:
        return {}
    try:
        metadata = MSGPackSerializer.loads(raw)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"metadata is not valid msgpack: {error}") from None
    if not isinstance(metadata, dict):
        raise ProtocolError(f"metadata must be a msgpack map, got {type(metadata).__name__}")
    return metadata


def cache_id(metadata: Mapping[str, Any]) -> str | None:
    """The request's cache id, if it sent a well-formed one (a string of at most 128 characters)."""
    value = metadata.get(CACHE_ID_KEY)
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _messages(message_type, arrays: Sequence[np.ndarray | None], compression: str, stream: bool, **fields) -> list:
    """``message_type`` messages carrying ``arrays``: one, or (``stream``) one per part of at most
    hivemind's message size; each also gets ``fields``."""
    parts = [p for a in arrays for p in tensor_parts(a, compression, DEFAULT_MAX_MSG_SIZE if stream else None)]
    messages = []
    for group in [[p] for p in parts] if stream else [parts]:
        message = message_type(**fields)
        for part in group:
            message.tensors.add(**part)
        messages.append(message)
    return messages


def make_requests(
    uids: str, arrays: Sequence[np.ndarray | None], metadata: Mapping[str, Any], compression: str = "none"
) -> tuple[list[runtime_pb2.ExpertRequest], bool]:
    """The messages of one call, and whether they must be streamed (too large for one unary message)."""
    streamed = raw_bytes(arrays) > STREAM_THRESHOLD
    requests = _messages(
        runtime_pb2.ExpertRequest, arrays, compression, streamed, uid=uids, metadata=encode_metadata(metadata)
    )
    return requests, streamed


def streamed_requests(
    uids: str, arrays: Sequence[np.ndarray], metadata: Mapping[str, Any], compression: str = "none"
) -> list:
    """The messages of a call that is always streamed (``rpc_lora``, ``rpc_handoff``)."""
    return _messages(runtime_pb2.ExpertRequest, arrays, compression, True, uid=uids, metadata=encode_metadata(metadata))


def response_parts(arrays: Sequence[np.ndarray], compression: str, stream: bool) -> list[runtime_pb2.ExpertResponse]:
    """Reply messages: one, or (``stream``) parts of at most hivemind's message size."""
    return _messages(runtime_pb2.ExpertResponse, arrays, compression, stream)


def reply_timing(raw: bytes) -> dict:
    """The timing a jaxseq server puts on its reply's first message (where Petals clients ignore it):
    ``{"compute_s", "wait_s", "io_s"}``; {} if absent or malformed."""
    try:
        metadata = decode_metadata(raw)
    except ProtocolError:
        return {}
    return {
        k: float(v) for k, v in metadata.items() if k in ("compute_s", "wait_s", "io_s") and isinstance(v, (int, float))
    }


def reply_handed_off(raw: bytes) -> bool:
    """Whether a jaxseq server says, on its reply's first message, that it handed its result on
    (``HANDED_OFF_KEY``); False if it does not say."""
    try:
        return decode_metadata(raw).get(HANDED_OFF_KEY) is True
    except ProtocolError:
        return False


def combine_parts(parts: Iterable[runtime_pb2.Tensor]) -> list[np.ndarray]:
    """Reassemble streamed tensor parts (a part with a dtype starts a new tensor) and deserialize them."""
    tensors: list[list[runtime_pb2.Tensor]] = []
    for part in parts:
        if part.dtype or not tensors:
            tensors.append([])
        tensors[-1].append(part)
    return [_deserialize_parts(chunks) for chunks in tensors]


@dataclasses.dataclass
class Request:
    """A request as received: its uids, tensors and metadata."""

    uids: str
    arrays: list[np.ndarray]
    metadata: dict


async def read_stream(requests: AsyncIterator[runtime_pb2.ExpertRequest], max_bytes: int) -> Request:
    """Gather a streamed request, refusing it as soon as its buffers exceed ``max_bytes``."""
    uids, raw_metadata, parts, received = None, None, [], 0
    async for request in requests:
        if uids is None:
            uids, raw_metadata = request.uid, request.metadata
        elif request.uid != uids:
            raise ProtocolError("block uids differ between the parts of one streamed request")
        for part in request.tensors:
            received += len(part.buffer)
            if received > max_bytes:
                raise ProtocolError(f"streamed request exceeds the server's limit of {max_bytes} bytes")
            parts.append(part)
    if uids is None:
        raise ProtocolError("empty request stream")
    return Request(uids, combine_parts(parts), decode_metadata(raw_metadata or b""))


def read_unary(request: runtime_pb2.ExpertRequest) -> Request:
    return Request(request.uid, [deserialize(t) for t in request.tensors], decode_metadata(request.metadata))
