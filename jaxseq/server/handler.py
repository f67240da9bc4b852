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
from collections.abc import Awaitable, Callable, Iterator

# hivemind tells streaming handlers by their annotations' typing name: typing's AsyncIterator, not collections.abc's
from typing import Any, AsyncIterator, TypeVar  # noqa: UP035

import torch
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from jaxseq.models.lora import lora_targets
from jaxseq.remote import protocol
from jaxseq.remote.protocol import ErrorKind, ProtocolError, Request
from jaxseq.remote.shm import METADATA_KEY as SHARED_MEMORY_KEY
from jaxseq.server import validation
from jaxseq.server.activation_cache import CacheMiss
from jaxseq.server.attention_cache import SessionCache
from jaxseq.server.backend import BlockBackend
from jaxseq.server.batching import StepBatcher
from jaxseq.server.compute_queue import ComputeQueue
from jaxseq.server.config import ServerConfig
from jaxseq.server.handoffs import Handoffs, check_id
from jaxseq.server.lora_store import HeldLora, LoraMiss, LoraStore
from jaxseq.server.sessions import SessionRegistry, StepReader
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
        self.computed = {"forward": 0, "backward": 0, "inference": 0}
        # inference steps pushed on to the next server, and pushed steps queued for an open session here
        self.pushes = {"sent": 0, "received": 0}
        # training tensors handed on to other servers (and hand-offs that failed), and handed to this one
        self.handoffs = Handoffs(config.handoff_bytes, ttl=config.request_timeout)
        self.handed = {"sent": 0, "failed": 0, "received": 0}
        self.allowed_clients = None if config.allowed_clients is None else frozenset(config.allowed_clients)
        grouped = backend.cfg.num_key_value_heads < backend.cfg.num_attention_heads
        self.batcher = StepBatcher(backend, self.queue, max_rows=config.max_tokens, wait_s=config.batch_wait_ms / 1000)
        self.inference_max_length = config.max_inference_length(grouped)
        self.idle_timeout = config.inference_idle_timeout
        self.session_timeout = config.session_timeout
        self.sessions = SessionRegistry()
        # clients' own LoRA weights (a jaxseq extension), and the projections they may adapt: {target: (in, out)}
        self.lora = LoraStore(config.lora_bytes, backend.dtype, backend.device)
        self.max_lora_rank = config.max_lora_rank
        self.lora_shapes = {target: spec.shape for target, spec in lora_targets(backend.cfg).items()}
        self._p2p: Any = None  # for pushing outputs to the next server; set by add_p2p_handlers
        self._pushes: set[asyncio.Task] = set()

    async def add_p2p_handlers(self, p2p: Any, *args: Any, **kwargs: Any) -> None:
        self._p2p = p2p
        await super().add_p2p_handlers(p2p, *args, **kwargs)

    @property
    def cache_tokens_left(self) -> int:
        """What is left of the attention cache, in Petals' unit (one token's keys, or values, in one block)."""
        return 2 * self.backend.attention_cache.block_tokens_left

    # --- rpc_info ------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        with self._refusals("rpc_info", context):
            return self._info(request, context)

    def _info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_client(context)
        info = {
            "version": self.version,
            "dht_client_mode": False,
            "cache_tokens_available": self.cache_tokens_left,
            # jaxseq's own figures (Petals clients ignore them): requests computed by stage, inference
            # steps pushed to the next server and received from the one before, training tensors handed
            # on and handed here (and those dropped unused, and the bytes kept), the distinct (stage,
            # span, shape bucket) block functions compiled so far, the computations of inference steps
            # (several sessions' steps in one, when batched), how often a backward found its forward's
            # activations in the cache, and the model family and dtype served.
            "jaxseq_computed": dict(self.computed),
            "jaxseq_pushes": dict(self.pushes),
            "jaxseq_handoffs": {**self.handed, "dropped": self.handoffs.dropped, "bytes": self.handoffs.nbytes},
            "jaxseq_family": self.backend.cfg.family,
            "jaxseq_dtype": str(self.backend.dtype),
            "jaxseq_compiled": self.backend.compile_count,
            "jaxseq_inference_calls": {"calls": self.batcher.calls, "steps": self.batcher.steps},
            "jaxseq_cache": {"hits": self.backend.cache.hits, "misses": self.backend.cache.misses},
            "jaxseq_lora": {"blocks": len(self.lora), "bytes": self.lora.nbytes},
        }
        if request.uid:
            self._served(request.uid)
            dtype = getattr(torch, str(self.backend.dtype))
            schema = BatchTensorDescriptor(1, 2048, self.limits.hidden_size, dtype=dtype)
            prompts = BatchTensorDescriptor(len(self.backend.blocks), 1, 0, self.limits.hidden_size, dtype=dtype)
            hypo_ids = BatchTensorDescriptor(1, dtype=torch.int64)
            info.update(
                forward_schema=((schema,), {}),
                outputs_schema=(schema,),
                keyword_names=(),
                inference_schema=((schema, prompts, hypo_ids), {}),
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
        key, adapter = self._cache_key(request, context), self._adapter(request.metadata)
        lora = self._held_lora(request.metadata, start, end)
        hand_to = self._hand_to(request.metadata)
        await self._take_handoff(request.metadata, arrays, slot=0)
        hidden, prompts = validation.forward_inputs(arrays, end - start, self.limits)
        out, timing = await self._compute(self.backend.forward, hidden, prompts, start, end, key, adapter, lora)
        self.computed["forward"] += 1
        if hand_to is not None:
            timing[protocol.HANDED_OFF_KEY] = await self._hand_on(hand_to, out, request.metadata, 1)
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
        key, adapter = self._cache_key(request, context), self._adapter(request.metadata)
        lora = self._held_lora(request.metadata, start, end)
        hand_to = self._hand_to(request.metadata)
        if request.metadata.get(protocol.INPUTS_CACHED_KEY) is True:
            if key is None:
                raise ProtocolError(f"a backward without its inputs must name its forward's {protocol.CACHE_ID_KEY}")
            handoff_id = await self._take_handoff(request.metadata, arrays, slot=0)
            grad_outputs = validation.cached_backward_inputs(arrays, end - start, self.limits)
            try:
                grads, timing = await self._compute(
                    self.backend.backward_of_cached, grad_outputs, start, end, key, adapter, lora
                )
            except CacheMiss as miss:
                if handoff_id is not None:  # for the same request sent anew, with its inputs
                    self.handoffs.put(handoff_id, grad_outputs)
                raise ProtocolError(str(miss), ErrorKind.CACHE_MISS) from None
        else:
            await self._take_handoff(request.metadata, arrays, slot=1)
            inputs, grad_outputs, prompts = validation.backward_inputs(arrays, end - start, self.limits)
            grads, timing = await self._compute(
                self.backend.backward, inputs, prompts, grad_outputs, start, end, key, adapter, lora
            )
        self.computed["backward"] += 1
        reply = grads.as_reply()
        if hand_to is not None:
            timing[protocol.HANDED_OFF_KEY] = await self._hand_on(hand_to, reply[0], request.metadata, len(reply))
        return await self._reply(request, reply, result_places, stream, timing, arrived)

    # --- server-to-server hops in training -----------------------------------------------------
    def _hand_to(self, metadata: dict) -> tuple[PeerID, str] | None:
        """Where a request's result goes on (``protocol.HAND_TO_KEY``): the next server and the hand-off's id."""
        target = metadata.get(protocol.HAND_TO_KEY)
        if target is None:
            return None
        try:
            peer, handoff_id = target
            return PeerID.from_base58(peer), check_id(handoff_id)
        except (ValueError, TypeError) as error:
            raise ProtocolError(f"{protocol.HAND_TO_KEY} must be [peer_id, id], got {target!r:.100}: {error}") from None

    async def _take_handoff(self, metadata: dict, arrays: list, slot: int) -> str | None:
        """Put the tensor handed off under the request's ``protocol.HAND_FROM_KEY`` into ``arrays[slot]`` (where
        the request sent an empty one), waiting for it up to the request timeout; returns the id, or None."""
        handoff_id = metadata.get(protocol.HAND_FROM_KEY)
        if handoff_id is None:
            return None
        self._check_takes_handoffs()
        handoff_id = check_id(handoff_id)
        if len(arrays) <= slot or arrays[slot].size:
            raise ProtocolError(f"a request awaiting a hand-off sends an empty tensor in its place (tensor {slot})")
        arrays[slot] = await self.handoffs.take(handoff_id, self.request_timeout)
        return handoff_id

    def _check_takes_handoffs(self) -> None:
        if self.handoffs.max_bytes == 0:
            raise ProtocolError("this server takes no hand-offs (--handoff-mb 0); send the tensors")

    async def _hand_on(self, hand_to: tuple[PeerID, str], array, metadata: dict, n_results: int) -> bool:
        """Hand ``array`` on to the next server (compressed as the reply is); whether it took it. A failure only
        costs time: the client, told so in the reply, sends the tensor itself."""
        peer_id, handoff_id = hand_to
        compression = self._reply_compression(metadata, n_results)
        requests = await asyncio.to_thread(
            protocol.streamed_requests, "", [array], {protocol.HANDOFF_KEY: handoff_id}, compression
        )

        async def hand() -> bool:
            replies = await self._p2p.iterate_protobuf_handler(
                peer_id, protocol.RPC_HANDOFF, as_aiter(*requests), runtime_pb2.ExpertResponse
            )
            return [protocol.decode_metadata(reply.metadata) async for reply in replies] == [
                {protocol.HANDED_OFF_KEY: True}
            ]

        try:
            kept = await asyncio.wait_for(hand(), self.request_timeout)
        except Exception as error:  # the next server is gone or unreachable from here: the client will send it
            logger.info("handing a tensor on to %s failed: %s: %s", peer_id, type(error).__name__, error)
            kept = False
        self.handed["sent" if kept else "failed"] += 1
        return kept

    async def rpc_handoff(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A tensor handed on by the server before this one in a client's chain, for the request that awaits it
        (``protocol.HAND_FROM_KEY``); the reply says whether it is kept."""
        with self._refusals("rpc_handoff", context):
            self._check_client(context)
            self._check_takes_handoffs()
            request = await self._read_stream(requests)
            handoff_id = check_id(request.metadata.get(protocol.HANDOFF_KEY))
            if len(request.arrays) != 1:
                raise ProtocolError(f"a hand-off carries one tensor, not {len(request.arrays)}")
            kept = self.handoffs.put(handoff_id, request.arrays[0])
            self.handed["received"] += kept
        yield runtime_pb2.ExpertResponse(metadata=protocol.encode_metadata({protocol.HANDED_OFF_KEY: kept}))

    # --- clients' LoRA weights -----------------------------------------------------------------
    async def rpc_lora(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A client's LoRA weights of the blocks its uids name (``protocol.LORA_KEY``): kept by digest; the reply's
        metadata lists the digests."""
        with self._refusals("rpc_lora", context):
            self._check_client(context)
            request = await self._read_stream(requests)
            start, end = self._served(request.uids)
            self._check_metadata(request.metadata)
            names = request.metadata.get(protocol.LORA_NAMES_KEY)
            blocks = validation.lora_upload(names, request.arrays, end - start, self.lora_shapes, self.max_lora_rank)
            digests = await asyncio.to_thread(self.lora.put, blocks)
        yield runtime_pb2.ExpertResponse(metadata=protocol.encode_metadata({protocol.LORA_KEY: digests}))

    def _held_lora(self, metadata: dict, start: int, end: int) -> HeldLora | None:
        """The client LoRA weights a request names, or None; ``ErrorKind.LORA_MISS`` when they are not held."""
        if protocol.LORA_KEY not in metadata:
            return None
        if self.max_lora_rank == 0:
            raise ProtocolError("this server applies no client LoRA weights (--max-lora-rank 0)")
        if metadata.get("active_adapter"):
            raise ProtocolError("a request names either active_adapter or client LoRA weights, not both")
        try:
            return self.lora.get(validation.lora_digests(metadata[protocol.LORA_KEY], end - start))
        except LoraMiss as miss:
            raise ProtocolError(str(miss), ErrorKind.LORA_MISS) from None

    # --- inference -----------------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session: the first request opens it (its metadata gives ``max_length`` and more, its tensors are
        the first step), each further request is a step, and each step's reply is the span's outputs for
        its positions. The attention cache is held from the first step to the end of the stream (or the
        idle or session timeout, or a refused step)."""
        with self._refusals("rpc_inference", context):
            self._check_client(context)
            try:
                first = await asyncio.wait_for(requests.__anext__(), self.idle_timeout)
            except (StopAsyncIteration, asyncio.TimeoutError):
                return
            start, end = self._served(first.uid)
            metadata = protocol.decode_metadata(first.metadata)
            self._check_metadata(metadata)
            opening = validation.session_request(
                metadata, first.tensors[0].size if first.tensors else (), self.inference_max_length
            )
            ends = time.monotonic() + self.session_timeout
            session = await self.backend.open_session(
                opening.batch, opening.max_length, start, end, opening.alloc_timeout, self._adapter(metadata),
                self._held_lora(metadata, start, end),
            )  # fmt: skip
            try:
                with self.sessions.open(opening.session_id) as pushes:
                    steps = StepReader(requests, pushes, self.idle_timeout, _step_id, ends)
                    async for reply in self._session_steps(first, steps, session, start, end, opening):
                        yield reply
            finally:
                session.close()

    async def _session_steps(
        self,
        first: runtime_pb2.ExpertRequest,
        steps: StepReader,
        session: SessionCache,
        start: int,
        end: int,
        opening: validation.SessionRequest,
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        request: runtime_pb2.ExpertRequest | None = first
        iterator = steps.__aiter__()
        while request is not None:
            if request.tensors:
                yield await self._inference_step(request, session, start, end, opening)
            try:
                request = await iterator.__anext__()
            except StopAsyncIteration:
                request = None

    async def _inference_step(
        self,
        request: runtime_pb2.ExpertRequest,
        session: SessionCache,
        start: int,
        end: int,
        opening: validation.SessionRequest,
    ) -> runtime_pb2.ExpertResponse:
        arrived = time.perf_counter()
        if self._served(request.uid) != (start, end):
            raise ProtocolError(f"a step of this session must name blocks {start}:{end}, as its first request did")
        metadata = protocol.decode_metadata(request.metadata)
        self._check_metadata(metadata)
        if "active_adapter" in metadata and self._adapter(metadata) != session.adapter:
            raise ProtocolError(
                f"a step of this session must name adapter {session.adapter!r}, as its first request did "
                f"(this one names {self._adapter(metadata)!r})"
            )
        rollback = metadata.get("start_from_position")
        if rollback is not None:
            if not 0 <= rollback <= session.position:
                raise ProtocolError(
                    f"start_from_position {rollback} is outside the session's positions 0..{session.position}"
                )
            session.position = rollback
        arrays = [protocol.deserialize(t) for t in request.tensors]
        args = validation.unpack_args(arrays, metadata.get("args_structure"))
        hidden, prompts, hypo_ids = validation.inference_step_inputs(
            args, end - start, opening.batch, session.position, opening.max_length, self.limits
        )
        if hidden.shape[1] == 0:  # Petals clients may check a session with an empty step
            out = hidden
            timing = {"wait_s": 0.0, "compute_s": 0.0}
        else:
            out, timing = await self._timed(self.batcher.run(session, hidden, prompts, hypo_ids))
            self.computed["inference"] += 1
        (response,) = await self._reply(Request(request.uid, [], metadata), [out], None, False, timing, arrived)
        if metadata.get("next_servers") and prompts.shape[2] == 0:
            self._push_outputs(request, response.tensors[0], metadata)
        return response

    def _push_outputs(self, request: runtime_pb2.ExpertRequest, outputs: runtime_pb2.Tensor, metadata: dict) -> None:
        """Send a step's outputs on to the next server's session (``next_servers``), as Petals' servers do: a
        shortcut the client also takes itself, so a failed push only costs time."""
        next_servers = metadata["next_servers"]
        try:
            peer, session_id, next_start, next_end = next_servers[0]
            uids = protocol.span_uids(self.dht_prefix, int(next_start), int(next_end))
            peer_id = PeerID.from_base58(peer)
        except (ValueError, TypeError, IndexError) as error:
            raise ProtocolError(
                f"next_servers must list [peer_id, session_id, start, end], got {next_servers!r:.100}: {error}"
            ) from None
        pushed = runtime_pb2.ExpertRequest(
            uid=uids, tensors=[outputs, *request.tensors[1:]],
            metadata=protocol.encode_metadata(
                {**metadata, "session_id": session_id, "next_servers": next_servers[1:], "pushed": True}
            ),
        )  # fmt: skip

        async def push() -> None:
            try:
                await asyncio.wait_for(
                    self._p2p.call_protobuf_handler(peer_id, protocol.RPC_PUSH, pushed, runtime_pb2.ExpertResponse),
                    self.request_timeout,
                )
                self.pushes["sent"] += 1
            except Exception as error:  # the client sends the step too: a failed push is only slower
                logger.debug("pushing outputs to %s failed: %r", peer, error)

        task = asyncio.ensure_future(push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A step pushed by the server before this one in a session's chain: queued for the session."""
        with self._refusals("rpc_push", context):
            self._check_client(context)
            self._served(request.uid)
            metadata = protocol.decode_metadata(request.metadata)
            self._check_metadata(metadata)
            session_id = metadata.get("session_id")
            if not isinstance(session_id, str):
                raise ProtocolError("a pushed step must name its session_id")
            if self.sessions.push(session_id, request):
                self.pushes["received"] += 1
            else:
                logger.debug("ignored a push to session %s: not open here, or its queue is full", session_id[:64])
            return runtime_pb2.ExpertResponse()

    # --- helpers -------------------------------------------------------------------------------
    def _arrays(self, request: Request) -> tuple[list, list | None]:
        """The request's tensors, and where its results go: in its messages and in the reply's, or
        (see ``shm``) views of the client's shared memory and the places it made for the results."""
        self._check_metadata(request.metadata)
        spec = request.metadata.get(SHARED_MEMORY_KEY)
        if spec is None:
            arrays = validation.unpack_args(request.arrays, request.metadata.get("args_structure"))
            return [protocol.DUMMY if a is None else a for a in arrays], None
        if request.arrays or not isinstance(spec, dict):
            raise ProtocolError(
                "a shared-memory request carries no tensors and names its segments in a map", ErrorKind.SHARED_MEMORY
            )
        return self.shared_memory.arrays(spec)

    def _check_metadata(self, metadata: dict) -> None:
        validation.check_metadata(metadata)
        self._adapter(metadata)

    def _adapter(self, metadata: dict) -> str:
        """The LoRA adapter a request names (``active_adapter``; "" for none). One this server lacks is refused,
        as a Petals server refuses it, rather than computed without."""
        adapter = metadata.get("active_adapter") or ""
        if adapter and adapter not in self.backend.adapters:
            served = ", ".join(repr(name) for name in self.backend.adapters) or "none"
            raise ProtocolError(f"adapter {adapter[:100]!r} not found: this server serves {served}")
        return adapter

    async def _reply(
        self, request: Request, results: list, result_places: list | None, stream: bool, timing: dict, arrived: float
    ) -> list[runtime_pb2.ExpertResponse]:
        """The reply, with the server's timing: queue wait, compute, and the rest ("io_s": parsing,
        checks, moving the tensors between the request, the blocks' memory and the reply, and in hops waiting
        for a hand-off and handing on; a streamed request's parsing counts as wire time)."""
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

        (result, transfer_s), timing = await self._timed(self.queue.run(computed, *args))
        timing["compute_s"] -= transfer_s
        return result, timing

    async def _timed(self, computation: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(computation, self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"request took longer than the server's limit of {self.request_timeout} s") from None


def _step_id(request: runtime_pb2.ExpertRequest) -> str | None:
    """A step's ``step_id`` (Petals clients send one; a step pushed and sent both ways has the same)."""
    try:
        step_id = protocol.decode_metadata(request.metadata).get("step_id")
    except ProtocolError:
        return None
    return step_id if isinstance(step_id, str) else None
