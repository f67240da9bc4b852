"""The server's RPC handlers: Petals 2.2's ``TransformerConnectionHandler`` interface over a ``BlockBackend``.

Each request is checked against the client allow-list (before reading anything), parsed
(``protocol``), validated (``validation``), then computed by the backend in a worker thread,
one at a time (a computation already uses every core), first come first served, with a bounded queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterable, Optional

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from jaxseq.backend import BlockBackend, CacheMiss
from jaxseq.remote import protocol, shm, validation
from jaxseq.remote.protocol import ProtocolError, Request

_COMPRESSION_BY_CODE = {code: name for name, code in protocol.COMPRESSIONS.items()}


class ComputeQueue:
    """Runs computations one at a time in arrival order; refuses new ones when ``max_waiting`` already wait.

    A computation that outlives its caller (a request timeout) still holds the queue until it ends,
    so the server never runs two at once.
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock = asyncio.Lock()

    async def run(self, fn, *args) -> tuple[object, dict]:
        """``fn(*args)`` in a worker thread; returns its result and ``{"wait_s", "compute_s"}``."""
        if self.waiting >= self.max_waiting:
            raise RuntimeError(f"server busy: {self.waiting} requests already queued; retry later or elsewhere")
        arrived = time.perf_counter()
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        started = time.perf_counter()
        computation = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        computation.add_done_callback(lambda _: self._lock.release())
        result = await asyncio.shield(computation)
        return result, {"wait_s": started - arrived, "compute_s": time.perf_counter() - started}


class TransformerConnectionHandler(ServicerBase):
    """Serves blocks ``backend.first..backend.end-1`` of the model ``dht_prefix``.

    The class name is part of the protocol: hivemind names handlers ``ClassName.rpc_*``.
    """

    def __init__(
        self,
        backend: BlockBackend,
        dht_prefix: str,
        *,
        version: str,
        max_tokens: int = 65536,
        max_request_bytes: int = 1 << 30,
        request_timeout: float = 300.0,
        max_queue: int = 64,
        allowed_clients: Optional[Iterable[str]] = None,
    ):
        self.backend = backend
        self.dht_prefix = dht_prefix
        self.version = version
        self.limits = validation.Limits(backend.cfg.hidden_size, max_tokens)
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        self.queue = ComputeQueue(max_queue)
        self.shared_memory = shm.ServerMappings(max_bytes=max_request_bytes)
        self.computed = {"forward": 0, "backward": 0}
        self.allowed_clients = None if allowed_clients is None else frozenset(allowed_clients)

    # --- rpc_info ------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_client(context)
        info = {
            "version": self.version,
            "dht_client_mode": False,
            "cache_tokens_available": 0,
            # jaxseq's own figures (Petals clients ignore them): requests computed by stage, the
            # distinct (stage, span length, shape bucket) block functions compiled so far, and how
            # often a backward found its forward's activations in the cache.
            "jaxseq_computed": dict(self.computed),
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
        self._check_client(context)
        arrived = time.perf_counter()
        (response,) = await self._forward(protocol.read_unary(request), context, arrived, stream=False)
        return response

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        self._check_client(context)
        request = await self._read_stream(requests)
        for part in await self._forward(request, context, time.perf_counter(), stream=True):
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
        self._check_client(context)
        arrived = time.perf_counter()
        (response,) = await self._backward(protocol.read_unary(request), context, arrived, stream=False)
        return response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        self._check_client(context)
        request = await self._read_stream(requests)
        for part in await self._backward(request, context, time.perf_counter(), stream=True):
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
            grad_outputs = validation.cached_backward_inputs(arrays, self.limits)
            compute, args = self.backend.backward_of_cached, (grad_outputs, start, end, key)
        else:
            inputs, grad_outputs, prompts = validation.backward_inputs(arrays, end - start, self.limits)
            compute, args = self.backend.backward, (inputs, prompts, grad_outputs, start, end, key)
        try:
            (grad_inputs, grad_prompts), timing = await self._compute(compute, *args)
        except CacheMiss as miss:
            raise ProtocolError(f"{protocol.CACHE_MISS}: {miss}") from None
        self.computed["backward"] += 1
        grads = [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]
        return await self._reply(request, grads, result_places, stream, timing, arrived)

    # --- helpers -------------------------------------------------------------------------------
    def _arrays(self, request: Request) -> tuple[list, Optional[list]]:
        """The request's tensors, and where its results go: in its messages and in the reply's, or
        (see ``shm``) views of the client's shared memory and the places it made for the results."""
        adapter = request.metadata.get("active_adapter")
        if adapter:  # as a Petals server without that adapter does: refuse rather than compute without it
            raise ProtocolError(f"adapter {str(adapter)[:100]!r} not found: this server serves no adapters")
        spec = request.metadata.get(shm.METADATA_KEY)
        if spec is None:
            return request.arrays, None
        if request.arrays or not isinstance(spec, dict):
            raise ProtocolError("a shared-memory request carries no tensors and names its segments in a map")
        return self.shared_memory.arrays(spec)

    async def _reply(
        self, request: Request, results: list, result_places: Optional[list], stream: bool, timing: dict, arrived: float
    ) -> list[runtime_pb2.ExpertResponse]:
        """The reply, with the server's timing: queue wait, compute, and the rest ("io_s": parsing,
        checks, moving the tensors between the request, the blocks' memory and the reply; a streamed
        request's parsing counts as wire time)."""
        if result_places is not None:
            await asyncio.to_thread(shm.write, result_places, results)
            parts = [runtime_pb2.ExpertResponse()]
        else:
            compression = self._reply_compression(request.metadata, len(results))
            parts = await asyncio.to_thread(protocol.response_parts, results, compression, stream)
        timing["io_s"] = time.perf_counter() - arrived - timing["wait_s"] - timing["compute_s"]
        parts[0].metadata = protocol.encode_metadata(timing)
        return parts

    def _served(self, uids: str) -> tuple[int, int]:
        start, end = protocol.parse_span_uids(uids, self.dht_prefix)
        if start < self.backend.first or end > self.backend.end:
            raise ProtocolError(
                f"this server holds blocks {self.backend.first}:{self.backend.end}, not all of {start}:{end}"
            )
        return start, end

    async def _read_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> Request:
        """The whole streamed request, within the byte limit and the request timeout (a stalled sender
        must not hold the server's resources forever)."""
        try:
            return await asyncio.wait_for(protocol.read_stream(requests, self.max_request_bytes), self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the request stream did not finish within {self.request_timeout} s") from None

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
        if not isinstance(codes, (list, tuple)) or len(codes) not in (1, n_tensors) or codes[0] not in _COMPRESSION_BY_CODE:
            raise ProtocolError(f"output_compression must list hivemind compression codes, got {codes!r:.100}")
        return _COMPRESSION_BY_CODE[codes[0]]

    async def _compute(self, fn, *args) -> tuple[object, dict]:
        """``fn(*args)`` through the queue; its moves between host and device memory count as io, not compute."""

        def computed(*args):
            before = self.backend.transfer_s
            result = fn(*args)
            return result, self.backend.transfer_s - before

        try:
            (result, transfer_s), timing = await asyncio.wait_for(self.queue.run(computed, *args), self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"request took longer than the server's limit of {self.request_timeout} s") from None
        timing["compute_s"] -= transfer_s
        return result, timing
