"""``RemoteSequenceManager``: the sequence manager whose transport is a hivemind swarm.

It finds servers through their Petals DHT records, keeps that view fresh in the background (and
right after failures), and calls servers with Petals 2.2 RPCs, streaming large tensors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import hivemind
import numpy as np
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from jaxseq.arrays import is_floating
from jaxseq.client.codecs import LinkEstimates
from jaxseq.client.config import ClientConfig
from jaxseq.client.errors import CacheMissed, FaultyResponse, LoraMissed, ServerFailure, SharedMemoryRefused
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import Hop, SequenceManager, check_reply
from jaxseq.client.routing import Span
from jaxseq.client.shm import SegmentPool
from jaxseq.remote import dht, protocol, shm
from jaxseq.remote.records import ServerRecord

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CallTiming:
    """Where the time of one RPC went (``server_*`` as the server reports it; None from Petals servers)."""

    stage: str
    peer: str
    blocks: int
    transport: str  # "unary", "stream" (through p2pd) or "shm" (same-host shared memory)
    serialize_s: float
    round_trip_s: float
    deserialize_s: float
    server_compute_s: float | None
    server_wait_s: float | None
    server_io_s: float | None  # the server's parsing, checks, and moves of tensors to and from its device
    bytes_sent: int
    bytes_received: int


_UNREACHABLE = (P2PDaemonError, ConnectionError, OSError, EOFError, asyncio.IncompleteReadError)
# Error replies the client acts on other than by retrying elsewhere, as typed failures.
_FAILURES = {
    protocol.ErrorKind.CACHE_MISS: CacheMissed,
    protocol.ErrorKind.SHARED_MEMORY: SharedMemoryRefused,
    protocol.ErrorKind.LORA_MISS: LoraMissed,
}
# (peer, LoRA digest) pairs remembered as given; beyond this many the oldest are forgotten (and given again if used)
_MAX_LORA_GIVEN = 4096


class RemoteSequenceManager(SequenceManager):
    """Routes ``remote_sequential`` through the servers of the model ``dht_prefix`` in a hivemind swarm.

    ``config.allowed_servers`` restricts routing to listed server peer ids (a private swarm);
    ``identity_path`` (a key file, created if missing) gives this client a stable peer id that
    servers can allow-list.

    Example:
        >>> with ServerProcess(checkpoint, (0, 4), "doc-remote").wait_ready() as server:
        ...     with RemoteSequenceManager([server.maddr], "doc-remote") as remote:
        ...         y = jax.jit(lambda x: remote_sequential(x, None, remote))(x)
        >>> bool(jnp.allclose(y, local_sequential(cfg, params, x), atol=1e-5))
        True
    """

    def __init__(
        self,
        initial_peers: Sequence[str],
        dht_prefix: str,
        config: ClientConfig = ClientConfig(),
        *,
        num_blocks: int | None = None,
        host_maddrs: Iterable[str] = ("/ip4/127.0.0.1/tcp/0",),
        identity_path: str | None = None,
        seed: int | None = None,
    ):
        super().__init__(config, seed=seed, name=f"jaxseq-client-{dht_prefix}")
        self.dht_prefix = dht_prefix
        self._hidden_size: int | None = None
        self.timings: collections.deque[CallTiming] = collections.deque(maxlen=4096)
        self.links = LinkEstimates()  # each server link's bandwidth, measured by the calls over the wire
        self.codecs_used: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, codec) -> calls
        self._machine = shm.machine_id()
        self._no_shared_memory: set[str] = set()
        self._segments = SegmentPool()
        # (peer, digest) -> the call giving that block's LoRA weights to that server (done: given)
        self._lora_given: collections.OrderedDict[tuple[str, str], asyncio.Future] = collections.OrderedDict()
        self._p2p: P2P | None = None
        self.dht: hivemind.DHT | None = None
        try:
            try:
                identity = {"identity_path": identity_path} if identity_path else {}
                self.dht = dht.start_dht(
                    initial_peers=list(initial_peers), client_mode=True, host_maddrs=list(host_maddrs), **identity
                )
            except P2PDaemonError as error:
                raise ConnectionError(
                    f"could not join the swarm through initial peers {list(initial_peers)}: {error}"
                ) from error
            self._p2p = self.run(self.dht.replicate_p2p())
            self._num_blocks = num_blocks or self.run(self._announced_num_blocks())
            self.run(self.refresh())
            self._hidden_size = self.run(self._announced_hidden_size())
            self._updater = asyncio.run_coroutine_threadsafe(self._keep_fresh(), self._background.loop)
        except BaseException:
            self.close()
            raise

    async def _announced_num_blocks(self) -> int:
        found = await asyncio.wait_for(dht.fetch_num_blocks(self.dht, self.dht_prefix), self.config.request_timeout)
        if found is None:
            raise ValueError(
                f"no model {self.dht_prefix!r} is announced in the swarm reachable from the initial peers; "
                "check dht_prefix, or pass num_blocks= for servers that don't announce _petals.models"
            )
        return found

    async def _announced_hidden_size(self) -> int | None:
        """Hidden size from a server's ``rpc_info`` (its forward schema), so bad input fails before any call."""
        for record in self._records:
            try:
                info = await asyncio.wait_for(
                    self._rpc_info(record.peer, protocol.block_uid(self.dht_prefix, record.start)),
                    self.config.connect_timeout,
                )
                return int(info["forward_schema"][0][0].shape[-1])
            except (
                asyncio.TimeoutError,
                P2PHandlerError,
                KeyError,
                IndexError,
                TypeError,
                AttributeError,
                ValueError,
                *_UNREACHABLE,
            ):
                continue  # this server did not say; ask the next
        return None

    async def _rpc_info(self, peer: str, uid: str = "") -> dict:
        response = await self._open_p2p.call_protobuf_handler(
            PeerID.from_base58(peer), protocol.RPC_INFO, runtime_pb2.ExpertUID(uid=uid), runtime_pb2.ExpertInfo
        )
        return protocol.decode_metadata(response.serialized_info)

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def peer_id(self) -> str:
        """This client's peer id (base58): what a server's ``--allowed-clients`` lists. Stable with
        ``identity_path``."""
        if self.dht is None:
            raise RuntimeError("this RemoteSequenceManager is closed")
        return self.dht.peer_id.to_base58()

    @property
    def hidden_size(self) -> int | None:
        return self._hidden_size

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await self.refresh()
            except Exception as error:  # the swarm may be briefly unreachable; keep the last view, retry later
                logger.warning(
                    "refreshing the swarm view failed, keeping the old view: %s: %s", type(error).__name__, error
                )

    async def _fetch_records(self) -> list[ServerRecord]:
        return await asyncio.wait_for(
            dht.fetch_servers(self.dht, self.dht_prefix, self._num_blocks), self.config.request_timeout
        )

    def close(self) -> None:
        """Shut the DHT and its p2pd down. Idempotent; also on ``with`` exit."""
        if self._background.loop.is_closed():
            return
        if getattr(self, "_updater", None) is not None:
            self._updater.cancel()
        self._stop_pinging()
        if self._p2p is not None:
            self.run(self._p2p.shutdown())
            self._p2p = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        self._segments.close()
        super().close()

    @property
    def _open_p2p(self) -> P2P:
        if self._p2p is None:
            raise RuntimeError("this RemoteSequenceManager is closed; make a new one to call the swarm")
        return self._p2p

    def server_info(self, peer: str, block: int | None = None) -> dict:
        """A server's ``rpc_info`` reply (with ``block``, also that block's schemas)."""
        uid = "" if block is None else protocol.block_uid(self.dht_prefix, block)
        return self.run(asyncio.wait_for(self._rpc_info(peer, uid), self.config.request_timeout))

    async def ping(self, peer: str) -> float | None:
        """Round-trip seconds of an ``rpc_info`` call to ``peer``, or None if it does not answer in time."""
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self._rpc_info(peer), self.config.connect_timeout)
        except (asyncio.TimeoutError, P2PHandlerError, protocol.ProtocolError, *_UNREACHABLE):
            return None
        return time.perf_counter() - start

    # --- the wire ------------------------------------------------------------------------------
    def _metadata(
        self, cache_id: str, inputs_cached: bool, codec: str, n_results: int, lora: list[str], hop: Hop
    ) -> dict:
        metadata: dict[str, Any] = {"points": 0.0, "active_adapter": self.config.active_adapter or ""}
        if hop.to is not None:
            metadata[protocol.HAND_TO_KEY] = list(hop.to)
        if hop.from_id is not None:
            metadata[protocol.HAND_FROM_KEY] = hop.from_id
        if lora:
            metadata[protocol.LORA_KEY] = lora
        if cache_id:
            metadata[protocol.CACHE_ID_KEY] = cache_id
        if inputs_cached:
            metadata[protocol.INPUTS_CACHED_KEY] = True
        if codec != "none":  # one code per reply tensor: Petals 2.2's backward insists on that
            metadata["output_compression"] = (int(protocol.COMPRESSIONS[codec]),) * n_results
        return metadata

    def _codec(self, peer: str, arrays: list, results: list[tuple[tuple, np.dtype]]) -> str:
        """The configured compression, or with "auto" the one the link's measured bandwidth calls for."""
        if self.config.compression != "auto":
            return self.config.compression
        floats = [a.nbytes for a in arrays if a is not None and is_floating(a.dtype)]
        floats += [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in results]
        return self.links.choose(peer, sum(floats), self.config.auto_compressions)

    async def _call(
        self,
        span: Span,
        rpc: tuple[str, str],
        arrays: list,
        results: list[tuple[tuple, np.dtype]],
        cache_id: str,
        inputs_cached: bool = False,
        lora: LoraWeights | None = None,
        hop: Hop = Hop(),
    ) -> tuple[list[np.ndarray], bool]:
        """One RPC: through shared memory (see ``shm``) to a jaxseq server on this machine, else over the wire;
        returns the outputs, and whether the server says it handed its result on (``hop``).
        ``results`` are the shapes and dtypes the reply must have (for the shared-memory segments);
        ``inputs_cached``: a backward that sends only grad outputs (see ``protocol.INPUTS_CACHED_KEY``); ``lora``:
        the client's LoRA weights, given to the server first where it does not hold them yet."""
        if lora is None:
            outputs, reply = await self._call_once(span, rpc, arrays, results, cache_id, inputs_cached, [], hop)
        else:
            digests = list(lora.digests[span.start : span.end])
            await self._give_lora(span, lora)
            try:
                outputs, reply = await self._call_once(
                    span, rpc, arrays, results, cache_id, inputs_cached, digests, hop
                )
            except LoraMissed:  # evicted since: give them again, once
                self._forget_lora(span.peer, lora)
                await self._give_lora(span, lora)
                outputs, reply = await self._call_once(
                    span, rpc, arrays, results, cache_id, inputs_cached, digests, hop
                )
        return outputs, protocol.reply_handed_off(reply)

    async def _give_lora(self, span: Span, lora: LoraWeights) -> None:
        """Make sure ``span``'s server holds the span's blocks' LoRA weights: give those it was not given, in one
        call that concurrent calls needing them wait for (so a step gives them once, not once per micro-batch)."""
        waiting = []
        missing = [b for b in range(span.start, span.end) if (span.peer, lora.digests[b]) not in self._lora_given]
        if missing:
            first, last = missing[0], missing[-1] + 1
            giving = asyncio.ensure_future(self._send_lora(span, lora, first, last))
            for block in range(first, last):
                self._lora_given[span.peer, lora.digests[block]] = giving
            while len(self._lora_given) > _MAX_LORA_GIVEN:
                self._lora_given.popitem(last=False)

            def forget_if_failed(done: asyncio.Future) -> None:
                if done.cancelled() or done.exception() is not None:
                    for block in range(first, last):
                        if self._lora_given.get((span.peer, lora.digests[block])) is done:
                            del self._lora_given[span.peer, lora.digests[block]]

            giving.add_done_callback(forget_if_failed)
        for block in range(span.start, span.end):
            waiting.append(self._lora_given[span.peer, lora.digests[block]])
        await asyncio.gather(*{id(f): asyncio.shield(f) for f in waiting}.values())

    async def _send_lora(self, span: Span, lora: LoraWeights, first: int, last: int) -> None:
        """``rpc_lora`` with blocks ``first..last-1``'s LoRA weights, uncompressed (servers keep them by digest)."""
        arrays = [lora.block(block)[name] for block in range(first, last) for name in lora.names]
        metadata = {protocol.LORA_NAMES_KEY: lora.names}
        uids = protocol.span_uids(self.dht_prefix, first, last)
        t0 = time.perf_counter()
        requests = await asyncio.to_thread(protocol.streamed_requests, uids, arrays, metadata)
        with self._failures(span):
            t1 = time.perf_counter()
            stream = await self._open_p2p.iterate_protobuf_handler(
                PeerID.from_base58(span.peer), protocol.RPC_LORA, as_aiter(*requests), runtime_pb2.ExpertResponse
            )
            responses = [response async for response in stream]
            t2 = time.perf_counter()
            held = protocol.decode_metadata(responses[0].metadata).get(protocol.LORA_KEY) if responses else None
        if held != list(lora.digests[first:last]):
            raise FaultyResponse(span.peer, f"rpc_lora answered digests {held!r:.200}, not the weights' own")
        sent = sum(len(t.buffer) for r in requests for t in r.tensors)
        self._record_timing(span, protocol.RPC_LORA, "stream", (t0, t1, t2, time.perf_counter()), b"", sent, 0)

    async def _call_once(
        self,
        span: Span,
        rpc: tuple[str, str],
        arrays: list,
        results: list[tuple[tuple, np.dtype]],
        cache_id: str,
        inputs_cached: bool,
        lora: list[str],
        hop: Hop,
    ) -> tuple[list[np.ndarray], bytes]:
        """The outputs, and the reply's raw metadata."""
        if self._uses_shared_memory(span.peer):
            try:
                metadata = self._metadata(cache_id, inputs_cached, "none", len(results), lora, hop)  # no wire to spare
                return await self._call_shared_memory(span, rpc[0], arrays, results, metadata)
            except SharedMemoryRefused as refused:  # e.g. a server run by another user: use the wire
                logger.info("server %s refused shared memory, sending tensors over the wire: %s", span.peer, refused)
                self._no_shared_memory.add(span.peer)
        codec = self._codec(span.peer, arrays, results)
        self.codecs_used[span.peer, codec] += 1
        metadata = self._metadata(cache_id, inputs_cached, codec, len(results), lora, hop)
        return await self._call_wire(span, rpc, arrays, metadata, codec)

    def _uses_shared_memory(self, peer: str) -> bool:
        if not self.config.shared_memory or peer in self._no_shared_memory or self._machine is None:
            return False
        record = self._record(peer)
        return record is not None and record.info.machine == self._machine

    def hands_off(self, upstream: Span, downstream: Span) -> bool:
        """Two jaxseq servers that take part in hops (``Hop``), and the client would reach ``downstream`` over the
        wire (through shared memory, the client passing a tensor on costs less than a hop)."""
        if not self.config.server_to_server or self.config.verify_fraction > 0 or upstream.peer == downstream.peer:
            return False
        records = self._record(upstream.peer), self._record(downstream.peer)
        return all(r is not None and r.info.hands_off for r in records) and not self._uses_shared_memory(
            downstream.peer
        )

    def _caches_backward(self, peer: str) -> bool:
        record = self._record(peer)
        return record is not None and record.info.cached_backward

    def _record(self, peer: str) -> ServerRecord | None:
        return next((r for r in self._records if r.peer == peer), None)

    @contextlib.contextmanager
    def _failures(self, span: Span):
        """Turn what a call can raise into the client's failure types: the one place that reads an error
        reply for its meaning (``protocol.error_kind``)."""
        try:
            yield
        except P2PHandlerError as error:
            kind = protocol.error_kind(str(error))
            failure = _FAILURES.get(kind) if kind else None
            if failure is not None:
                raise failure(span.peer, f"error reply: {error}") from None
            raise ServerFailure(span.peer, f"error reply: {error}", reachable=True) from None
        except protocol.ProtocolError as error:
            raise FaultyResponse(span.peer, str(error)) from None
        except _UNREACHABLE as error:
            raise ServerFailure(span.peer, f"unreachable: {type(error).__name__}: {error}", reachable=False) from None

    async def _call_shared_memory(
        self, span, rpc: str, arrays: list, results, metadata: dict
    ) -> tuple[list[np.ndarray], bytes]:
        inputs = [a for a in arrays if a is not None]
        t0 = time.perf_counter()
        preparing = asyncio.ensure_future(asyncio.to_thread(self._segments.exchange, inputs, results))
        try:
            exchange = await asyncio.shield(preparing)
        except asyncio.CancelledError:  # the inputs are still being written: discard the segments once they are
            preparing.add_done_callback(_discard_when_written)
            raise
        try:
            request = runtime_pb2.ExpertRequest(
                uid=protocol.span_uids(self.dht_prefix, span.start, span.end),
                metadata=protocol.encode_metadata({**metadata, shm.METADATA_KEY: exchange.spec}),
            )
            with self._failures(span):
                t1 = time.perf_counter()
                response = await self._open_p2p.call_protobuf_handler(
                    PeerID.from_base58(span.peer), rpc, request, runtime_pb2.ExpertResponse
                )
        except BaseException:
            exchange.discard()  # the server may still be writing into it
            raise
        t2 = time.perf_counter()
        outputs = exchange.results()
        self._record_timing(
            span,
            rpc,
            "shm",
            (t0, t1, t2, time.perf_counter()),
            response.metadata,
            sum(a.nbytes for a in inputs),
            sum(a.nbytes for a in outputs),
        )
        return outputs, response.metadata

    async def _call_wire(
        self, span: Span, rpc: tuple[str, str], arrays: list, metadata: dict, codec: str
    ) -> tuple[list[np.ndarray], bytes]:
        uids = protocol.span_uids(self.dht_prefix, span.start, span.end)
        t0 = time.perf_counter()
        requests, streamed = await asyncio.to_thread(protocol.make_requests, uids, arrays, metadata, codec)
        peer = PeerID.from_base58(span.peer)
        with self._failures(span):
            t1 = time.perf_counter()
            if not streamed:
                responses = [
                    await self._open_p2p.call_protobuf_handler(peer, rpc[0], requests[0], runtime_pb2.ExpertResponse)
                ]
            else:
                stream = await self._open_p2p.iterate_protobuf_handler(
                    peer, rpc[1], as_aiter(*requests), runtime_pb2.ExpertResponse
                )
                responses = [response async for response in stream]
            t2 = time.perf_counter()
            parts = [part for response in responses for part in response.tensors]
            outputs = await asyncio.to_thread(protocol.combine_parts, parts)
            t3 = time.perf_counter()
        transport = "stream" if streamed else "unary"
        sent = sum(len(t.buffer) for r in requests for t in r.tensors)
        reply_metadata = responses[0].metadata if responses else b""
        timing = self._record_timing(
            span, rpc[0], transport, (t0, t1, t2, t3), reply_metadata, sent, sum(len(p.buffer) for p in parts)
        )
        self._measure_link(timing)
        return outputs, reply_metadata

    def _measure_link(self, timing: CallTiming) -> None:
        """The call's wire seconds: its round trip less the link's delay (its shortest ping) and the server's own
        time."""
        server_s = sum(s or 0.0 for s in (timing.server_compute_s, timing.server_wait_s, timing.server_io_s))
        wire_s = timing.round_trip_s - self._shortest_rtt.get(timing.peer, 0.0) - server_s
        self.links.record(timing.peer, timing.bytes_sent + timing.bytes_received, wire_s, timing.round_trip_s)

    def _record_timing(
        self, span: Span, rpc: str, transport: str, times, reply_metadata: bytes, sent: int, received: int
    ) -> CallTiming:
        t0, t1, t2, t3 = times
        server = protocol.reply_timing(reply_metadata)
        timing = CallTiming(
            stage=rpc.rsplit("_", 1)[-1],
            peer=span.peer,
            blocks=len(span),
            transport=transport,
            serialize_s=t1 - t0,
            round_trip_s=t2 - t1,
            deserialize_s=t3 - t2,
            server_compute_s=server.get("compute_s"),
            server_wait_s=server.get("wait_s"),
            server_io_s=server.get("io_s"),
            bytes_sent=sent,
            bytes_received=received,
        )
        self.timings.append(timing)
        return timing

    def _as_requested(self, span: Span, array: np.ndarray, dtype) -> np.ndarray:
        """Petals servers reply in their own dtype; accept exactly that one besides ours."""
        record = self._record(span.peer)
        announced = record.info.torch_dtype if record is not None else None
        if array.dtype != dtype and str(array.dtype) == announced:
            return array.astype(dtype)
        return array

    async def _call_forward(
        self, span: Span, x: np.ndarray, prompts: np.ndarray, cache_id: str, lora: LoraWeights | None
    ) -> np.ndarray:
        out, _ = await self._call_forward_hop(span, x, prompts, cache_id, lora, Hop())
        return out

    async def _call_forward_hop(
        self, span: Span, x: np.ndarray, prompts: np.ndarray, cache_id: str, lora: LoraWeights | None, hop: Hop
    ) -> tuple[np.ndarray, bool]:
        arrays = [_handed(x, hop), prompts if prompts.shape[2] else None]
        rpc = (protocol.RPC_FORWARD, protocol.RPC_FORWARD_STREAM)
        outputs, handed = await self._call(span, rpc, arrays, [(x.shape, x.dtype)], cache_id, lora=lora, hop=hop)
        if len(outputs) != 1:
            raise FaultyResponse(span.peer, f"forward returned {len(outputs)} tensors, expected 1")
        return self._as_requested(span, outputs[0], x.dtype), handed

    async def _call_backward(self, span, x, grad_out, prompts, cache_id, lora):
        grads, _ = await self._call_backward_hop(span, x, grad_out, prompts, cache_id, lora, Hop())
        return grads

    async def _call_backward_hop(self, span, x, grad_out, prompts, cache_id, lora, hop):
        with_prompts = prompts.shape[2] > 0
        rpc = (protocol.RPC_BACKWARD, protocol.RPC_BACKWARD_STREAM)
        results = [(x.shape, x.dtype)] + ([(prompts.shape, prompts.dtype)] if with_prompts else [])
        results += lora.grad_shapes(span.start, span.end) if lora else []
        grads = None
        if cache_id and self._caches_backward(span.peer):  # the server has the inputs: send the grads alone
            try:
                grads, handed = await self._call(
                    span, rpc, [_handed(grad_out, hop)], results, cache_id, inputs_cached=True, lora=lora, hop=hop
                )
            except CacheMissed:
                cache_id = ""  # it kept nothing under that id (and kept the hand-off for this): recompute
        if grads is None:
            arrays = [x, _handed(grad_out, hop), prompts if with_prompts else None]
            grads, handed = await self._call(span, rpc, arrays, results, cache_id, lora=lora, hop=hop)
        if len(grads) < 1 + with_prompts:
            raise FaultyResponse(span.peer, f"backward returned {len(grads)} tensors, expected {len(results)}")
        grad_x = self._as_requested(span, grads[0], x.dtype)
        grad_prompts = [self._as_requested(span, grads[1], prompts.dtype)] if with_prompts else []
        return (grad_x, *grad_prompts, *grads[1 + with_prompts :]), handed

    # --- inference -------------------------------------------------------------------------------
    async def _open_server_session(
        self, span: Span, max_length: int, batch_size: int, lora: LoraWeights | None
    ) -> RemoteServerSession:
        if lora is not None:
            await self._guarded(self._give_lora(span, lora), span, self.config.request_timeout)
        session = RemoteServerSession(self, span, max_length, lora)
        with self._failures(span):
            await asyncio.wait_for(session.open(), self.config.connect_timeout)
        return session

    def _forget_lora(self, peer: str, lora: LoraWeights) -> None:
        """Forget that ``peer`` holds ``lora``'s weights (it said it does not): the next call gives them again."""
        for digest in lora.digests:
            self._lora_given.pop((peer, digest), None)


def _discard_when_written(preparing: asyncio.Future) -> None:
    """Close the segments of an exchange whose call was abandoned while its inputs were being written."""
    if not preparing.cancelled() and preparing.exception() is None:
        preparing.result().discard()


def _handed(array: np.ndarray, hop: Hop) -> np.ndarray:
    """What a call sends in the place of ``array``: nothing (an empty array) where a hand-off brings it."""
    return array if hop.from_id is None else np.empty(0, array.dtype)


_INT64_DUMMY = np.zeros(0, np.int64)  # Petals' DUMMY_INT64: no hypo_ids


class RemoteServerSession:
    """An inference session on one server: a Petals 2.2 ``rpc_inference`` stream. The first step's metadata
    opens it (``max_length``, ``alloc_timeout``, ``session_id``); each step sends hidden states, prompts
    (or the dummy) and hypo_ids (or the int64 dummy), and reads the span's outputs. Closing sends Petals'
    "done" (an empty request), so the server frees the caches at once. With ``lora``, the first step names the
    client's LoRA weights (given to the server already), which all steps apply."""

    def __init__(self, manager: RemoteSequenceManager, span: Span, max_length: int, lora: LoraWeights | None):
        self.manager, self.span, self.max_length, self.lora = manager, span, max_length, lora
        self.session_id = uuid.uuid4().hex
        self._inputs: asyncio.Queue = asyncio.Queue()
        self._outputs: Any = None
        self._stepped = False

    async def open(self) -> None:
        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (request := await self._inputs.get()) is not None:
                yield request

        self._outputs = await self.manager._open_p2p.iterate_protobuf_handler(
            PeerID.from_base58(self.span.peer), protocol.RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )

    async def step(
        self,
        x: np.ndarray,
        prompts: np.ndarray | None,
        hypo_ids: np.ndarray | None,
        *,
        step_id: str,
        start_from_position: int | None,
        next_servers: list[tuple[str, str, int, int]],
        timeout: float,
    ) -> np.ndarray:
        adapter = self.manager.config.active_adapter or ""
        metadata: dict[str, Any] = {"session_id": self.session_id, "step_id": step_id, "active_adapter": adapter}
        if not self._stepped:
            metadata.update(max_length=self.max_length, alloc_timeout=self.manager.config.alloc_timeout, points=0.0)
            if self.lora is not None:
                metadata[protocol.LORA_KEY] = list(self.lora.digests[self.span.start : self.span.end])
        if start_from_position is not None:
            metadata["start_from_position"] = start_from_position
        if next_servers:
            metadata["next_servers"] = [list(server) for server in next_servers]
        t0 = time.perf_counter()
        tensors = [protocol.serialize(a) for a in (x, prompts, _INT64_DUMMY if hypo_ids is None else hypo_ids)]
        uids = protocol.span_uids(self.manager.dht_prefix, self.span.start, self.span.end)
        t1 = time.perf_counter()
        await self._inputs.put(
            runtime_pb2.ExpertRequest(uid=uids, tensors=tensors, metadata=protocol.encode_metadata(metadata))
        )
        self._stepped = True
        try:
            with self.manager._failures(self.span):
                try:
                    response = await asyncio.wait_for(self._outputs.__anext__(), timeout)
                except asyncio.TimeoutError:
                    raise ServerFailure(self.span.peer, f"no answer within {timeout:.1f} s", reachable=False) from None
                except StopAsyncIteration:
                    raise ServerFailure(self.span.peer, "the server ended the session", reachable=True) from None
                t2 = time.perf_counter()
                outputs = [protocol.deserialize(t) for t in response.tensors]
        except LoraMissed:
            if self.lora is not None:  # evicted before the session opened: the next one gives them again
                self.manager._forget_lora(self.span.peer, self.lora)
            raise
        self.manager._record_timing(
            self.span,
            protocol.RPC_INFERENCE,
            "stream",
            (t0, t1, t2, time.perf_counter()),
            response.metadata,
            sum(len(t.buffer) for t in tensors),
            sum(len(t.buffer) for t in response.tensors),
        )
        if len(outputs) != 1:
            raise FaultyResponse(self.span.peer, f"an inference step returned {len(outputs)} tensors, expected 1")
        out = self.manager._as_requested(self.span, outputs[0], x.dtype)
        check_reply(self.span, "outputs", out, x.shape, x.dtype)
        return out

    async def close(self) -> None:
        if self._stepped:
            await self._inputs.put(runtime_pb2.ExpertRequest())  # Petals' "done sending": the server frees the cache
        await self._inputs.put(None)
        if self._outputs is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._outputs.__anext__(), self.manager.config.connect_timeout)
