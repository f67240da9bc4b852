"""The server's RPC handlers: Petals 2.2's ``TransformerConnectionHandler`` interface over a ``BlockBackend``.

Each request is checked against the client allow-list (before reading anything), parsed
(``protocol``), validated (``validation``), then computed by the backend through the
``ComputeQueue``. A refused request gets an error reply, is logged at INFO, and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

# hivemind tells streaming handlers by their annotations' typing name: typing's AsyncIterator, not collections.abc's
from typing import Any, AsyncIterator, TypeVar  # noqa: UP035

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from jaxseq.remote import protocol
from jaxseq.remote.protocol import ErrorKind, ProtocolError, Request
from jaxseq.remote.shm import METADATA_KEY as SHARED_MEMORY_KEY
from jaxseq.server import validation
from jaxseq.server.activation_cache import CacheMiss
from jaxseq.server.backend import BlockBackend
from jaxseq.server.compute_queue import ComputeQueue
from jaxseq.server.config import ServerConfig
from jaxseq.server.shm import ServerMappings, write

logger = logging.getLogger(__name__)
T = TypeVar("T")

_COMPRESSION_BY_CODE = {code: name for name, code in protocol.COMPRESSIONS.items()}


class TransformerConnectionHandler(ServicerBase):
    """Serves blocks ``backend.start..backend.end-1`` of the model ``config.dht_prefix``.

    The class name is part of the protocol: hivemind names handlers ``ClassName.rpc_*``.

    Example:
        >>> config = ServerConfig(checkpoint="unused", blocks=(0, 4), dht_prefix="tiny", new_swarm=True)
        >>> handler = TransformerConnectionHandler(BlockBackend(cfg, params), config, version="2.2.0")
        >>> handler.limits
        Limits(hidden_size=32, max_tokens=65536)
    """

    def __init__(self, backend: BlockBackend, config: ServerConfig, *, version: str):
        self.backend = backend
        self.dht_prefix = config.dht_prefix
        self.version = version
        self.limits = validation.Limits(backend.cfg.hidden_size, config.max_tokens)
        self.max_request_bytes = config.max_request_bytes
        self.request_timeout = config.request_timeout
        self.queue = ComputeQueue(config.max_queue)
        self.shared_memory = ServerMappings(max_bytes=config.max_request_bytes)
        self.computed = {"forward": 0, "backward": 0}
        self.allowed_clients = None if config.allowed_clients is None else frozenset(config.allowed_clients)

    # --- rpc_info ------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        with self._refusals("rpc_info", context):
            return self._info(request, context)

    def _info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_client(context)
        info = {
            "version": self.version,
            "dht_client_mode": False,
            "cache_tokens_available": 0,
            # jaxseq's own figures (Petals clients ignore them): requests computed by stage, the
            # distinct (stage, span, shape bucket) block functions compiled so far, how often a backward
            # found its forward's activations in the cache, and the model family and dtype served.
            "jaxseq_computed": dict(self.computed),
            "jaxseq_family": self.backend.cfg.family,
            "jaxseq_dtype": str(self.backend.dtype),
            "jaxseq_compiled": self.backend.compile_count,
            "jaxseq_cache": {"hits": self.backend.cache.hits, "misses": self.backend.cache.misses},
        }
        if request.uid:
            self._served(request.uid)
            dtype = getattr(torch, str(self.backend.dtype))
            schema = BatchTensorDescriptor(1, 2048, self.limits.hidden_size, dtype=dtype)
            info.update(
                forward_schema=((schema,), {}),
                outputs_schema=(schema,),
                keyword_names=(),
                inference_schema=((schema,), {}),
            )
        return runtime_pb2.ExpertInfo(serialized_info=protocol.encode_metadata(info))

    # --- forward -------------------------------------------------------------------------------
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        with self._refusals("rpc_forward", context):
            self._check_client(context)
            arrived = time.perf_counter()
            (response,) = await self._forward(protocol.read_unary(request), context, arrived, stream=False)
            return response

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self._refusals("rpc_forward_stream", context):
            self._check_client(context)
            request = await self._read_stream(requests)
            parts = await self._forward(request, context, time.perf_counter(), stream=True)
        for part in parts:
            yield part

    async def _forward(
        self, request: Request, context: P2PContext, arrived: float, stream: bool
    ) -> list[runtime_pb2.ExpertResponse]:
        start, end = self._served(request.uids)
        arrays, result_places = self._arrays(request)
        hidden, prompts = validation.forward_inputs(arrays, end - start, self.limits)
        key = self._cache_key(request, context)
        out, timing = await self._compute(self.backend.forward, hidden, prompts, start, end, key)
        self.computed["forward"] += 1
        return await self._reply(request, [out], result_places, stream, timing, arrived)

    # --- backward ------------------------------------------------------------------------------
    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        with self._refusals("rpc_backward", context):
            self._check_client(context)
            arrived = time.perf_counter()
            (response,) = await self._backward(protocol.read_unary(request), context, arrived, stream=False)
            return response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self._refusals("rpc_backward_stream", context):
            self._check_client(context)
            request = await self._read_stream(requests)
            parts = await self._backward(request, context, time.perf_counter(), stream=True)
        for part in parts:
            yield part

    async def _backward(
        self, request: Request, context: P2PContext, arrived: float, stream: bool
    ) -> list[runtime_pb2.ExpertResponse]:
        start, end = self._served(request.uids)
        arrays, result_places = self._arrays(request)
        key = self._cache_key(request, context)
        if request.metadata.get(protocol.INPUTS_CACHED_KEY) is True:
            if key is None:
                raise ProtocolError(f"a backward without its inputs must name its forward's {protocol.CACHE_ID_KEY}")
            grad_outputs = validation.cached_backward_inputs(arrays, end - start, self.limits)
            try:
                grads, timing = await self._compute(self.backend.backward_of_cached, grad_outputs, start, end, key)
            except CacheMiss as miss:
                raise ProtocolError(str(miss), ErrorKind.CACHE_MISS) from None
        else:
            inputs, grad_outputs, prompts = validation.backward_inputs(arrays, end - start, self.limits)
            grads, timing = await self._compute(self.backend.backward, inputs, prompts, grad_outputs, start, end, key)
        grad_inputs, grad_prompts = grads
        self.computed["backward"] += 1
        results = [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]
        return await self._reply(request, results, result_places, stream, timing, arrived)

    # --- helpers -------------------------------------------------------------------------------
    def _arrays(self, request: Request) -> tuple[list, list | None]:
        """The request's tensors, and where its results go: in its messages and in the reply's, or
        (see ``shm``) views of the client's shared memory and the places it made for the results."""
        adapter = request.metadata.get("active_adapter")
        if adapter:  # as a Petals server without that adapter does: refuse rather than compute without it
            raise ProtocolError(f"adapter {str(adapter)[:100]!r} not found: this server serves no adapters")
        spec = request.metadata.get(SHARED_MEMORY_KEY)
        if spec is None:
            return request.arrays, None
        if request.arrays or not isinstance(spec, dict):
            raise ProtocolError(
                "a shared-memory request carries no tensors and names its segments in a map", ErrorKind.SHARED_MEMORY
            )
        return self.shared_memory.arrays(spec)

    async def _reply(
        self, request: Request, results: list, result_places: list | None, stream: bool, timing: dict, arrived: float
    ) -> list[runtime_pb2.ExpertResponse]:
        """The reply, with the server's timing: queue wait, compute, and the rest ("io_s": parsing,
        checks, moving the tensors between the request, the blocks' memory and the reply; a streamed
        request's parsing counts as wire time)."""
        if result_places is not None:
            await asyncio.to_thread(write, result_places, results)
            parts = [runtime_pb2.ExpertResponse()]
        else:
            compression = self._reply_compression(request.metadata, len(results))
            parts = await asyncio.to_thread(protocol.response_parts, results, compression, stream)
        timing["io_s"] = time.perf_counter() - arrived - timing["wait_s"] - timing["compute_s"]
        parts[0].metadata = protocol.encode_metadata(timing)
        return parts

    def _served(self, uids: str) -> tuple[int, int]:
        start, end = protocol.parse_span_uids(uids, self.dht_prefix)
        if start < self.backend.start or end > self.backend.end:
            raise ProtocolError(
                f"this server holds blocks {self.backend.start}:{self.backend.end}, not all of {start}:{end}"
            )
        return start, end

    async def _read_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> Request:
        """The whole streamed request, within the byte limit and the request timeout (a stalled sender
        must not hold the server's resources forever)."""
        try:
            return await asyncio.wait_for(protocol.read_stream(requests, self.max_request_bytes), self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the request stream did not finish within {self.request_timeout} s") from None

    @contextlib.contextmanager
    def _refusals(self, rpc: str, context: P2PContext) -> Iterator[None]:
        """Log a request the server refuses or fails, with the reason, before hivemind sends the error reply."""
        try:
            yield
        except Exception as error:
            logger.info("refused %s from %s: %s: %s", rpc, context.remote_id.to_base58(), type(error).__name__, error)
            raise

    def _check_client(self, context: P2PContext) -> None:
        if self.allowed_clients is not None and context.remote_id.to_base58() not in self.allowed_clients:
            raise PermissionError(
                f"peer {context.remote_id.to_base58()} is not on this server's client allow-list; "
                "ask its operator to add your peer id (--allowed-clients)"
            )

    @staticmethod
    def _cache_key(request: Request, context: P2PContext):
        """Cache entries belong to the client that made them: keyed by its peer id too."""
        cache_id = protocol.cache_id(request.metadata)
        return None if cache_id is None else (context.remote_id.to_base58(), cache_id)

    def _reply_compression(self, metadata: dict, n_tensors: int) -> str:
        """Petals' ``output_compression``: one hivemind compression code per reply tensor (we use the first)."""
        codes = metadata.get("output_compression")
        if codes is None:
            return "none"
        if (
            not isinstance(codes, (list, tuple))
            or len(codes) not in (1, n_tensors)
            or codes[0] not in _COMPRESSION_BY_CODE
        ):
            raise ProtocolError(f"output_compression must list hivemind compression codes, got {codes!r:.100}")
        return _COMPRESSION_BY_CODE[codes[0]]

    async def _compute(self, fn: Callable[..., T], *args: Any) -> tuple[T, dict[str, float]]:
        """``fn(*args)`` through the queue; its moves between host and device memory count as io, not compute."""

        def computed(*args: Any) -> tuple[T, float]:
            before = self.backend.transfer_s
            result = fn(*args)
            return result, self.backend.transfer_s - before

        try:
            (result, transfer_s), timing = await asyncio.wait_for(self.queue.run(computed, *args), self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"request took longer than the server's limit of {self.request_timeout} s") from None
        timing["compute_s"] -= transfer_s
        return result, timing
