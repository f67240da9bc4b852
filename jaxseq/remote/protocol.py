"""Petals 2.2's wire format and DHT record schema, and nothing else: no routing, no I/O.

Requests are hivemind ``runtime_pb2.ExpertRequest`` messages whose ``uid`` is the span's block uids
(``{dht_prefix}.{i}``) joined by a space, whose tensors are hivemind-serialized (forward: hidden
states, then prompts or the dummy tensor; backward: inputs, grad outputs, prompts or dummy), and
whose ``metadata`` is a msgpack dict. Requests with more than ``MAX_UNARY_PAYLOAD_SIZE // 2`` bytes
of raw tensor data are streamed in parts of at most ``DEFAULT_MAX_MSG_SIZE``, as Petals does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np
import torch
from hivemind.compression.base import USE_LEGACY_BFLOAT16
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from jaxseq.routing import ServerRecord, ServerState

HANDLER = "TransformerConnectionHandler"
RPC_INFO = f"{HANDLER}.rpc_info"
RPC_FORWARD = f"{HANDLER}.rpc_forward"
RPC_FORWARD_STREAM = f"{HANDLER}.rpc_forward_stream"
RPC_BACKWARD = f"{HANDLER}.rpc_backward"
RPC_BACKWARD_STREAM = f"{HANDLER}.rpc_backward_stream"

CHAIN_DELIMITER = " "
MODELS_KEY = "_petals.models"
# Request metadata key naming a forward whose activations a jaxseq server may keep for the backward
# that follows with the same id; Petals servers ignore unknown keys, Petals clients never send it.
CACHE_ID_KEY = "jaxseq_cache_id"
# A backward naming its forward's cache id with this key set sends only the grad outputs: its inputs
# are the cached forward's. Only to servers that announce CACHED_BACKWARD_KEY; a server that kept no
# such forward answers with an error containing CACHE_MISS, and the client sends the inputs after all.
INPUTS_CACHED_KEY = "jaxseq_inputs_cached"
CACHED_BACKWARD_KEY = "jaxseq_cached_backward"
CACHE_MISS = "jaxseq cache miss"
STREAM_THRESHOLD = MAX_UNARY_PAYLOAD_SIZE // 2

COMPRESSIONS = {
    "none": runtime_pb2.CompressionType.NONE,
    "float16": runtime_pb2.CompressionType.FLOAT16,
    "meanstd16": runtime_pb2.CompressionType.MEANSTD_16BIT,
    "uniform8bit": runtime_pb2.CompressionType.UNIFORM_8BIT,
    "quantile8bit": runtime_pb2.CompressionType.QUANTILE_8BIT,
}


class ProtocolError(ValueError):
    """A message does not follow the protocol; the text says how."""


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
_RAW_DTYPES = {
    name: np.dtype(dtype)
    for name, dtype in [
        ("float32", np.float32), ("float16", np.float16), ("float64", np.float64), ("bfloat16", ml_dtypes.bfloat16),
        ("int64", np.int64), ("int32", np.int32), ("int16", np.int16), ("int8", np.int8), ("uint8", np.uint8),
        ("bool", np.bool_),
    ]
}  # fmt: skip
_DUMMY = np.empty(0, np.float32)  # Petals' dummy tensor: torch.empty(0)


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


def is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16


def _encode(array: Optional[np.ndarray], compression: str) -> tuple[dict, Any]:
    """A tensor message's header fields, and its payload (a buffer)."""
    array = _DUMMY if array is None else np.ascontiguousarray(array)
    if compression == "none" or not is_float(array) or array.size == 0:  # hivemind can't compress empty tensors
        name = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.name
        if name not in _RAW_DTYPES:
            raise ValueError(f"can't send arrays of dtype {array.dtype}; use one of {sorted(_RAW_DTYPES)}")
        if name == "bfloat16":  # as hivemind sends it: widened to float32 by default (older peers expect that)
            data = array.astype(np.float32) if USE_LEGACY_BFLOAT16 else array.view(np.uint16)
        else:
            data = array
        header = dict(compression=COMPRESSIONS["none"], size=array.shape, dtype=name, requires_grad=False)
        return header, memoryview(data.reshape(-1)).cast("B")
    tensor = serialize_torch_tensor(_to_torch(array), COMPRESSIONS[compression])
    header = dict(compression=tensor.compression, size=tensor.size, dtype=tensor.dtype, requires_grad=tensor.requires_grad)
    return header, tensor.buffer


def tensor_parts(array: Optional[np.ndarray], compression: str = "none", chunk_bytes: Optional[int] = None) -> list[dict]:
    """The fields of an array's tensor message (``None``: Petals' dummy tensor), or, with ``chunk_bytes``,
    of its streamed parts as hivemind's ``split_for_streaming`` makes them. Add each to a message
    with ``message.tensors.add(**fields)``: building messages from ``Tensor`` objects copies slowly."""
    header, payload = _encode(array, compression)
    if chunk_bytes is None:
        return [dict(header, buffer=bytes(payload))]
    starts = range(0, len(payload), chunk_bytes)
    first = dict(header, chunks=len(starts), buffer=bytes(payload[:chunk_bytes]))
    return [first] + [dict(buffer=bytes(payload[start : start + chunk_bytes])) for start in starts[1:]]


def serialize(array: Optional[np.ndarray], compression: str = "none") -> runtime_pb2.Tensor:
    """A hivemind tensor message; ``None`` becomes Petals' dummy tensor (empty, float32)."""
    (fields,) = tensor_parts(array, compression)
    return runtime_pb2.Tensor(**fields)


def _decode(header: runtime_pb2.Tensor, buffer: bytes) -> np.ndarray:
    shape = tuple(header.size)
    dtype = _RAW_DTYPES.get(header.dtype)
    if header.compression != COMPRESSIONS["none"] or dtype is None:
        message = runtime_pb2.Tensor(
            compression=header.compression, buffer=buffer, size=shape, dtype=header.dtype, requires_grad=header.requires_grad
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
        raise ProtocolError(f"malformed tensor (dtype {header.dtype!r}, size {list(header.size)[:8]}): {error}") from None


def deserialize(message: runtime_pb2.Tensor) -> np.ndarray:
    """The array in a hivemind tensor message (raises ``ProtocolError`` if it is malformed)."""
    return _deserialize_parts([message])


def is_dummy(array: np.ndarray) -> bool:
    return array.size == 0


def raw_bytes(arrays: Iterable[Optional[np.ndarray]]) -> int:
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


def cache_id(metadata: Mapping[str, Any]) -> Optional[str]:
    """The request's cache id, if it sent a well-formed one (a string of at most 128 characters)."""
    value = metadata.get(CACHE_ID_KEY)
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _messages(message_type, arrays: Sequence[Optional[np.ndarray]], compression: str, stream: bool, **fields) -> list:
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
    uids: str, arrays: Sequence[Optional[np.ndarray]], metadata: Mapping[str, Any], compression: str = "none"
) -> tuple[list[runtime_pb2.ExpertRequest], bool]:
    """The messages of one call, and whether they must be streamed (too large for one unary message)."""
    streamed = raw_bytes(arrays) > STREAM_THRESHOLD
    requests = _messages(
        runtime_pb2.ExpertRequest, arrays, compression, streamed, uid=uids, metadata=encode_metadata(metadata)
    )
    return requests, streamed


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
    return {k: float(v) for k, v in metadata.items() if k in ("compute_s", "wait_s", "io_s") and isinstance(v, (int, float))}


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
    return Request(uids, combine_parts(parts), decode_metadata(raw_metadata))


def read_unary(request: runtime_pb2.ExpertRequest) -> Request:
    return Request(request.uid, [deserialize(t) for t in request.tensors], decode_metadata(request.metadata))


# --- DHT records ------------------------------------------------------------------------------
def server_info_value(
    state: ServerState, throughput: float, *, start: int, end: int, version: str, dtype: str, **extra: Any
) -> tuple:
    """Petals' ``ServerInfo.to_tuple()``: ``(state, throughput, extra)``."""
    info = dict(
        start_block=start,
        end_block=end,
        public_name=None,
        version=version,
        network_rps=None,
        forward_rps=float(throughput),
        inference_rps=None,
        adapters=(),
        torch_dtype=dtype,
        quant_type="none",
        using_relay=False,
        cache_tokens_left=0,
        next_pings=None,
    )
    info.update(extra)
    return (int(state), float(throughput), info)


def parse_block_records(found: Mapping[int, Any]) -> list[ServerRecord]:
    """Turn DHT lookups of each block (``{block: {peer_id: value}}``) into one record per server span.

    A server's span is the longest run of consecutive blocks it announces; entries that don't
    parse as Petals' ``ServerInfo`` tuple are ignored, so records from other versions never break us.
    """
    by_peer: dict[str, dict[int, tuple]] = {}
    for block, entries in found.items():
        for peer, value in (entries or {}).items():
            if not isinstance(peer, str) or not isinstance(value, (tuple, list)) or len(value) < 2:
                continue
            state, throughput = value[0], value[1]
            if not isinstance(state, int) or not isinstance(throughput, (int, float)) or state not in (0, 1, 2):
                continue
            extra = value[2] if len(value) > 2 and isinstance(value[2], dict) else {}
            by_peer.setdefault(peer, {})[block] = (ServerState(state), float(throughput), extra)
    records = []
    for peer, blocks in by_peer.items():
        indices = sorted(blocks)
        run_start = indices[0]
        for prev, cur in zip(indices, indices[1:] + [None]):
            if cur != prev + 1:
                state, throughput, extra = blocks[run_start]
                version = extra.get("version") if isinstance(extra.get("version"), str) else ""
                records.append(ServerRecord(peer, run_start, prev + 1, throughput, state, version, extra))
                run_start = cur
    return records
