"""The tensor wire format: byte for byte what hivemind (and so Petals 2.2) writes and reads."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from jaxseq.remote import protocol

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64]
SHAPES = [(0,), (3,), (2, 5, 7), (1, 1, 1, 9)]


def _array(shape, dtype, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _hivemind(array: np.ndarray, compression: str = "none") -> runtime_pb2.Tensor:
    return serialize_torch_tensor(protocol._to_torch(array), protocol.COMPRESSIONS[compression])


def _bytes(messages) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_uncompressed_tensors_are_hivemind_bytes_both_ways(dtype, shape):
    array = _array(shape, dtype)
    assert protocol.serialize(array).SerializeToString() == _hivemind(array).SerializeToString()
    ours = [runtime_pb2.Tensor(**fields) for fields in protocol.tensor_parts(array, chunk_bytes=24)]
    assert _bytes(ours) == _bytes(split_for_streaming(_hivemind(array), 24))
    back = protocol.combine_parts(split_for_streaming(_hivemind(array), 24))[0]
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    theirs = deserialize_torch_tensor(combine_from_streaming(ours))
    assert protocol._to_numpy(theirs).tobytes() == array.tobytes()


@pytest.mark.parametrize("compression", list(protocol.COMPRESSIONS))
def test_the_dummy_tensor_is_torch_empty_and_never_compressed(compression):
    want = serialize_torch_tensor(torch.empty(0)).SerializeToString()
    assert protocol.serialize(None, compression).SerializeToString() == want


def test_two_byte_bfloat16_from_newer_peers_is_read():
    array = _array((4, 3), ml_dtypes.bfloat16)
    message = runtime_pb2.Tensor(buffer=array.view(np.uint16).tobytes(), size=[4, 3], dtype="bfloat16")
    assert protocol.deserialize(message).tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "compression,max_rel_err",
    [("none", 0.0), ("float16", 1e-3), ("meanstd16", 1e-3), ("uniform8bit", 0.05), ("quantile8bit", 0.05)],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_compressions_round_trip_within_their_error(compression, max_rel_err, streamed):
    array = _array((8, 64, 32), np.float32)
    parts = protocol.tensor_parts(array, compression, 4096 if streamed else None)
    (back,) = protocol.combine_parts(runtime_pb2.Tensor(**fields) for fields in parts)
    assert back.shape == array.shape and back.dtype == np.float32
    assert np.linalg.norm(back - array) / np.linalg.norm(array) <= max_rel_err
    if compression != "none":
        assert _bytes(runtime_pb2.Tensor(**f) for f in parts) == _bytes(
            split_for_streaming(_hivemind(array, compression), 4096) if streamed else [_hivemind(array, compression)]
        )


@pytest.mark.parametrize(
    "message,error",
    [
        (runtime_pb2.Tensor(buffer=b"\0" * 7, size=[2], dtype="float32"), "7 bytes can't hold 2 values of float32"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="complex64"), "malformed tensor"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="float32", compression=77), "malformed tensor"),
    ],
)
def test_malformed_tensors_raise_protocol_errors(message, error):
    with pytest.raises(protocol.ProtocolError, match=error):
        protocol.deserialize(message)


def test_large_requests_are_streamed_in_parts_of_hivemind_size():
    small, large = _array((2, 3, 8), np.float32), _array((3 * protocol.DEFAULT_MAX_MSG_SIZE // 4,), np.float32)
    (request,), streamed = protocol.make_requests("m.0", [small, None], {"points": 0.0})
    assert not streamed and len(request.tensors) == 2
    requests, streamed = protocol.make_requests("m.0", [large, None], {"points": 0.0})
    assert streamed and len(requests) > 2
    assert all(r.ByteSize() <= protocol.DEFAULT_MAX_MSG_SIZE + 1024 for r in requests)
    got = protocol.combine_parts(t for r in requests for t in r.tensors)
    assert got[0].tobytes() == large.tobytes() and got[1].size == 0
