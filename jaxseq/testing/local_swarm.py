"""``LocalSwarm``: an in-process swarm of emulated servers, with injectable faults, for tests and benchmarks.

Its servers compute the real blocks (``BlockBackend``, the same code a ``jaxseq-server`` runs) and
its manager is a ``SequenceManager`` like the network one: only the transport differs, a direct
call instead of an RPC.

On the CPU the servers compute on an XLA client of their own, with its own thread pool, as a server
process has. XLA's CPU runtime usually runs the backward callback on one of its pool's threads (the
one that finished the operation before), which the callback blocks while the swarm computes: on
the caller's client the servers would get what is left of that pool, one thread of two on a 2-core
machine (``benchmarks/callback_thread.py`` measures it).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxseq.client.config import ClientConfig
from jaxseq.client.errors import ServerFailure
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import SequenceManager
from jaxseq.client.routing import Span
from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import BlockParams
from jaxseq.models.lora import Adapter
from jaxseq.remote.records import ServerInfo, ServerRecord, ServerState
from jaxseq.server.attention_cache import CacheFull, SessionCache
from jaxseq.server.backend import BlockBackend
from jaxseq.server.config import ServerConfig
from jaxseq.server.lora_store import HeldLora, LoraStore

STAGES = ("forward", "backward", "inference")


@functools.cache
def servers_device() -> jax.Device | None:
    """Where emulated servers compute: with JAX on the CPU, a device of a CPU client of their own (one
    for all swarms of the process); else None, JAX's default device."""
    if jax.default_backend() != "cpu":
        return None
    from jax._src.lib import xla_client  # jax has no public way to make a second client

    client: Any = xla_client.make_cpu_client(asynchronous=True)
    return client.devices()[0]


class EmulatedServer:
    """A server holding blocks ``start..end-1``. ``calls`` counts calls by stage, failed ones included."""

    def __init__(self, name: str, backend: BlockBackend, throughput: float):
        self.name = name
        self.backend = backend
        self.throughput = throughput
        self.calls = {stage: 0 for stage in STAGES}
        self.lora = LoraStore(int(ServerConfig.lora_mb * 2**20), backend.dtype, backend.device)
        self.alive = True
        self._failures = {stage: 0 for stage in STAGES}

    @property
    def start(self) -> int:
        return self.backend.start

    @property
    def end(self) -> int:
        return self.backend.end

    def fail_next(self, n: int = 1, stage: str = "forward") -> None:
        """Make the next ``n`` calls of ``stage`` ("forward", "backward" or "inference": a session's step)
        answer with an error."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self._failures[stage] += n

    def kill(self) -> None:
        """Go away for good: calls can't reach it, and it leaves the swarm's records."""
        self.alive = False

    def record(self) -> ServerRecord:
        info = ServerInfo(
            state=ServerState.ONLINE, throughput=self.throughput, family=self.backend.cfg.family,
            adapters=self.backend.adapter_names, client_lora_rank=ServerConfig.max_lora_rank,
        )  # fmt: skip
        return ServerRecord(self.name, self.start, self.end, info)

    async def handle(self, stage: str, compute, *args):
        self.calls[stage] += 1
        if not self.alive:
            raise ServerFailure(self.name, "connection refused (server is down)", reachable=False)
        if self._failures[stage] > 0:
            self._failures[stage] -= 1
            raise ServerFailure(self.name, f"injected {stage} failure", reachable=True)
        return await asyncio.to_thread(compute, *args)

    def held_lora(self, span: Span, lora: LoraWeights | None) -> HeldLora | None:
        """The span's blocks' share of a client's LoRA weights, as a server holds them once given."""
        if lora is None:
            return None
        return self.lora.get(self.lora.put([lora.block(i) for i in range(span.start, span.end)]))

    def __repr__(self) -> str:
        return f"EmulatedServer({self.name!r}, blocks {self.start}:{self.end}, alive={self.alive})"


class LocalSwarm:
    """An emulated swarm: ``servers[i]`` holds ``spans[i]``; all compute with jit in this process, on
    ``device`` (default ``servers_device()``). Every server serves its blocks' share of ``adapters`` (LoRA
    adapters of all the blocks, ``jaxseq.models.lora``), picked by ``ClientConfig.active_adapter``.

    Example:
        >>> swarm = LocalSwarm(cfg, params, spans=[(0, 2), (1, 4)])
        >>> manager = swarm.sequence_manager(ClientConfig(max_retries=3, min_backoff=0.01))
        >>> swarm.servers[0].fail_next(1, stage="forward")
        >>> y = remote_sequential(x, None, manager)  # the failed call is retried, nothing is lost
        >>> swarm.servers[0].calls, manager.retries  # calls counts the failed one too
        ({'forward': 2, 'backward': 0, 'inference': 0}, 1)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Sequence[BlockParams],
        spans: Sequence[tuple[int, int]],
        throughputs: Sequence[float] | None = None,
        device: jax.Device | None = None,
        adapters: Sequence[Adapter] = (),
    ):
        n = len(params)
        for start, end in spans:
            if not 0 <= start < end <= n:
                raise ValueError(f"span {start}:{end} is outside the {n} blocks given")
        throughputs = throughputs or [1.0] * len(spans)
        device = device or servers_device()
        self.cfg = cfg
        self.num_blocks = n

        def backend(start: int, end: int) -> BlockBackend:
            shares = [adapter.span(start, end) for adapter in adapters]
            return BlockBackend(cfg, params[start:end], start=start, device=device, adapters=shares)

        self.servers = [
            EmulatedServer(f"local-{i}", backend(start, end), throughput)
            for i, ((start, end), throughput) in enumerate(zip(spans, throughputs))
        ]

    def sequence_manager(self, config: ClientConfig = ClientConfig(), seed: int | None = 0) -> LocalSequenceManager:
        """A manager that routes over this swarm with the same client logic as the network one."""
        return LocalSequenceManager(self, config, seed=seed)


class LocalSequenceManager(SequenceManager):
    """``SequenceManager`` whose transport is a direct call into a ``LocalSwarm``'s servers."""

    def __init__(self, swarm: LocalSwarm, config: ClientConfig, seed: int | None = 0):
        super().__init__(config, seed=seed, name="jaxseq-local-swarm")
        self.swarm = swarm
        self._adapter = config.active_adapter or ""
        self._servers = {s.name: s for s in swarm.servers}
        self.run(self.refresh())

    @property
    def num_blocks(self) -> int:
        return self.swarm.num_blocks

    @property
    def hidden_size(self) -> int:
        return self.swarm.cfg.hidden_size

    async def _fetch_records(self) -> list[ServerRecord]:
        return [s.record() for s in self.swarm.servers if s.alive]

    async def ping(self, peer: str) -> float | None:
        """In process there is no network: a live server is no distance away."""
        return 0.0 if any(s.name == peer and s.alive for s in self.swarm.servers) else None

    async def _call_forward(
        self, span: Span, x: np.ndarray, prompts: np.ndarray, cache_id: str, lora: LoraWeights | None
    ) -> np.ndarray:
        server = self._servers[span.peer]
        return await server.handle(
            "forward", server.backend.forward, x, prompts, span.start, span.end, cache_id or None, self._adapter,
            server.held_lora(span, lora),
        )  # fmt: skip

    async def _call_backward(self, span, x, grad_out, prompts, cache_id, lora):
        server = self._servers[span.peer]
        grads = await server.handle(
            "backward", server.backend.backward, x, prompts, grad_out, span.start, span.end, cache_id or None,
            self._adapter, server.held_lora(span, lora),
        )  # fmt: skip
        return grads.as_reply()

    async def _open_server_session(
        self, span: Span, max_length: int, batch_size: int, lora: LoraWeights | None
    ) -> LocalServerSession:
        server = self._servers[span.peer]
        if not server.alive:
            raise ServerFailure(server.name, "connection refused (server is down)", reachable=False)
        alloc_timeout = self.config.alloc_timeout
        try:
            cache = await server.backend.open_session(
                batch_size, max_length, span.start, span.end, alloc_timeout, self._adapter, server.held_lora(span, lora)
            )
        except CacheFull as error:
            raise ServerFailure(server.name, str(error), reachable=True) from None
        return LocalServerSession(server, span, cache)


class LocalServerSession:
    """An inference session on an ``EmulatedServer``: its backend's attention cache, used directly (each step
    alone: the batching of concurrent sessions' steps is a real server's, ``jaxseq.server.batching``)."""

    def __init__(self, server: EmulatedServer, span: Span, cache: SessionCache):
        self.server, self.span, self.cache = server, span, cache
        self.session_id = uuid.uuid4().hex

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
        if start_from_position is not None:
            self.cache.position = start_from_position
        if prompts is None:
            prompts = self.server.backend.no_prompts(self.cache)
        step = asyncio.ensure_future(
            self.server.handle("inference", self.server.backend.inference_step, self.cache, x, prompts, hypo_ids)
        )
        # the pages are given back only after the computation, even one that outlives its caller
        self.cache.step_started()
        step.add_done_callback(lambda _: self.cache.step_finished())
        try:
            return await asyncio.wait_for(asyncio.shield(step), timeout)
        except asyncio.TimeoutError:
            raise ServerFailure(self.server.name, f"no answer within {timeout:.1f} s", reachable=False) from None

    async def close(self) -> None:
        self.cache.close()
