"""``jaxseq-server``: host a span of a model's blocks from a Hugging Face checkpoint, announce it on a hivemind
DHT, and answer Petals 2.2 RPCs until SIGTERM/SIGINT (then announce OFFLINE and exit 0).

Example:
    jaxseq-server --checkpoint ./llama --blocks 0:16 --dht-prefix my-llama --new-swarm
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version

import hivemind
import jax
import numpy as np
from hivemind.utils.logging import get_logger as hivemind_logger
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS

from jaxseq.arrays import DTYPES
from jaxseq.models.checkpoint import load_checkpoint
from jaxseq.models.lora import load_adapter
from jaxseq.remote import dht, shm
from jaxseq.remote.records import PROTOCOL_VERSION, ServerInfo, ServerState
from jaxseq.server.backend import BlockBackend
from jaxseq.server.config import ServerConfig
from jaxseq.server.handler import TransformerConnectionHandler

logger = logging.getLogger(__name__)

VERSION = f"{PROTOCOL_VERSION}+jaxseq.{version('jaxseq')}"
ANNOUNCE_TIMEOUT = 10.0


def measure_throughput(backend: BlockBackend, tokens: int = 128) -> float:
    """Tokens per second per block for a forward of one sequence of ``tokens`` (after compiling it).

    Example:
        >>> measure_throughput(BlockBackend(cfg, params), tokens=8) > 0
        True
    """
    x = np.zeros((1, tokens, backend.cfg.hidden_size), np.float32)
    prompts = np.zeros((len(backend.blocks), 1, 0, backend.cfg.hidden_size), np.float32)
    backend.forward(x, prompts, backend.start, backend.end)
    start = time.perf_counter()
    backend.forward(x, prompts, backend.start, backend.end)
    return tokens * len(backend.blocks) / (time.perf_counter() - start)


def _visible_maddr(node: hivemind.DHT) -> str:
    maddrs = [str(m) for m in node.get_visible_maddrs()]
    return next((m for m in maddrs if "/ip4/127.0.0.1/" in m), maddrs[0])


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Load the blocks, join the swarm, announce and serve until ``stop`` is set (or SIGTERM/SIGINT)."""
    start, end = config.blocks
    dtype = DTYPES[config.dtype]
    cfg, params = load_checkpoint(config.checkpoint, blocks=range(start, end), dtype=dtype, revision=config.revision)
    adapters = [load_adapter(location, cfg, range(start, end), dtype, name=name) for name, location in config.adapters]
    backend = BlockBackend(
        cfg, params, start=start, cache_bytes=config.cache_bytes, cache_ttl=config.cache_ttl,
        attn_cache_tokens=config.attn_cache_tokens, adapters=adapters,
    )  # fmt: skip
    throughput = config.throughput or measure_throughput(backend)
    expiration = max(2 * config.update_period, MAX_DHT_TIME_DISCREPANCY_SECONDS)

    handler = TransformerConnectionHandler(backend, config, version=VERSION)

    def info(state: ServerState) -> ServerInfo:
        return ServerInfo(
            state=state, throughput=throughput, start_block=start, end_block=end, version=VERSION,
            forward_rps=throughput, torch_dtype=config.dtype, quant_type="none", using_relay=config.use_auto_relay,
            cache_tokens_left=handler.cache_tokens_left, machine=shm.machine_id() if config.shared_memory else None,
            cached_backward=config.cache_mb > 0 and config.cache_ttl > 0, family=cfg.family,
            adapters=backend.adapter_names, client_lora_rank=config.max_lora_rank, hands_off=config.handoff_bytes > 0,
        )  # fmt: skip

    identity = {"identity_path": config.identity} if config.identity else {}
    # Announced addresses replace the listening ones in everything p2pd tells peers, so that peers dial
    # only them; None (not []) leaves the listening ones.
    node = dht.start_dht(
        initial_peers=list(config.initial_peers), host_maddrs=list(config.host_maddrs),
        announce_maddrs=list(config.announce_maddrs) or None, use_relay=config.use_relay,
        use_auto_relay=config.use_auto_relay, **identity,
    )  # fmt: skip
    p2p = await node.replicate_p2p()
    try:
        await handler.add_p2p_handlers(p2p)

        async def announce(state: ServerState) -> None:
            # Bounded: if the DHT process died (e.g. a Ctrl-C reached the whole process group), a store
            # would wait forever; the server keeps serving and shutting down regardless.
            try:
                await asyncio.wait_for(
                    dht.announce(node, config.dht_prefix, start, end, info(state), cfg.num_hidden_layers, expiration),
                    timeout=ANNOUNCE_TIMEOUT,
                )
            except (asyncio.TimeoutError, OSError, EOFError, BrokenPipeError) as error:
                logger.warning("announcing %s to the DHT failed: %r", state.name, error)

        await announce(ServerState.ONLINE)
        print(f"jaxseq server ready: {_visible_maddr(node)}", flush=True)

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=config.update_period)
            except asyncio.TimeoutError:
                await announce(ServerState.ONLINE)
        await announce(ServerState.OFFLINE)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(p2p.shutdown(), timeout=ANNOUNCE_TIMEOUT)
        node.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    config = ServerConfig.from_args(argv)
    # Read when JAX first touches a GPU: several servers (and their client) share one GPU, so each
    # takes memory as it needs it rather than XLA's default 75% of the card up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hivemind_logger("hivemind").setLevel(config.log_level.upper())
    try:
        asyncio.run(serve(config))
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"jaxseq-server: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
