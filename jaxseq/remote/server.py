"""``jaxseq-server``: host a span of Llama blocks from a local checkpoint, announce it on a hivemind
DHT, and answer Petals 2.2 RPCs until SIGTERM/SIGINT (then announce OFFLINE and exit 0).

Example:
    jaxseq-server --checkpoint ./llama --blocks 0:16 --dht-prefix my-llama --new-swarm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

import hivemind
from hivemind.utils.logging import get_logger as hivemind_logger
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS
import jax
import jax.numpy as jnp
import numpy as np

import jaxseq
from jaxseq.backend import BlockBackend
from jaxseq.checkpoint import load_checkpoint
from jaxseq.remote import dht_records, protocol, shm
from jaxseq.remote.handler import TransformerConnectionHandler
from jaxseq.routing import ServerState

logger = logging.getLogger("jaxseq.server")

PROTOCOL_VERSION = "2.2.0"  # the Petals release whose wire protocol we speak
VERSION = f"{PROTOCOL_VERSION}+jaxseq.{jaxseq.__version__}"
ANNOUNCE_TIMEOUT = 10.0
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxseq-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="local Hugging Face Llama checkpoint folder")
    p.add_argument("--blocks", required=True, type=parse_blocks, help="blocks to serve, START:END")
    p.add_argument("--dht-prefix", required=True, help="the model's name in the swarm (block uids are PREFIX.N)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="multiaddrs to listen on")
    join = p.add_mutually_exclusive_group(required=True)
    join.add_argument("--initial-peers", nargs="+", help="multiaddrs of peers already in the swarm")
    join.add_argument("--new-swarm", action="store_true", help="start a new swarm")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the blocks compute in")
    p.add_argument(
        "--matmul-precision", choices=("highest", "high", "default"), default="highest",
        help="float32 matmuls on GPUs: 'highest' computes in full float32, as torch and Petals servers do "
        "(remote == local within 1e-5); 'high' and 'default' let XLA use TF32 or bfloat16 passes, faster "
        "and about 1e-3 off (no effect on CPUs)",
    )  # fmt: skip
    p.add_argument("--throughput", type=float, help="announced tokens/s per block (measured at start if omitted)")
    p.add_argument("--max-tokens", type=int, default=65536, help="most tokens (batch x seq) in one request")
    p.add_argument("--max-request-mb", type=float, default=1024, help="most MiB of tensor data in one streamed request")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--update-period", type=float, default=60.0, help="seconds between DHT announcements")
    p.add_argument("--cache-mb", type=float, default=1024, help="MiB of forward activations kept for backward (LRU)")
    p.add_argument("--cache-ttl", type=float, default=120.0, help="seconds a kept activation may wait for its backward")
    p.add_argument("--no-shared-memory", action="store_true", help="don't offer same-host clients shared-memory transfers")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for compute; more get 'server busy'")
    p.add_argument("--allowed-clients", nargs="+", metavar="PEER_ID", help="serve only these client peer ids (base58)")
    p.add_argument("--identity", help="file with this server's private key (created if missing): a stable peer id")
    p.add_argument("--log-level", default="WARNING", help="Python logging level")
    return p


def measure_throughput(backend: BlockBackend, tokens: int = 128) -> float:
    """Tokens per second per block for a forward of one sequence of ``tokens`` (after compiling it)."""
    x = np.zeros((1, tokens, backend.cfg.hidden_size), np.float32)
    prompts = np.zeros((len(backend.blocks), 1, 0, backend.cfg.hidden_size), np.float32)
    backend.forward(x, prompts, backend.first, backend.end)
    start = time.perf_counter()
    backend.forward(x, prompts, backend.first, backend.end)
    return tokens * len(backend.blocks) / (time.perf_counter() - start)


def _visible_maddr(dht: hivemind.DHT) -> str:
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    return next((m for m in maddrs if "/ip4/127.0.0.1/" in m), maddrs[0])


async def serve(args: argparse.Namespace, stop: Optional[asyncio.Event] = None) -> None:
    start, end = args.blocks
    cfg, params = load_checkpoint(args.checkpoint, blocks=range(start, end), dtype=DTYPES[args.dtype])
    backend = BlockBackend(
        cfg, params, first=start, cache_bytes=int(args.cache_mb * 2**20), cache_ttl=args.cache_ttl
    )
    throughput = args.throughput or measure_throughput(backend)
    expiration = max(2 * args.update_period, MAX_DHT_TIME_DISCREPANCY_SECONDS)
    host = None if args.no_shared_memory else shm.host_id()
    extensions = {shm.HOST_KEY: host} if host else {}
    if args.cache_mb > 0 and args.cache_ttl > 0:
        extensions[protocol.CACHED_BACKWARD_KEY] = True

    identity = {"identity_path": args.identity} if args.identity else {}
    dht = dht_records.start_dht(initial_peers=args.initial_peers or [], host_maddrs=args.host_maddrs, **identity)
    p2p = await dht.replicate_p2p()
    try:
        handler = TransformerConnectionHandler(
            backend,
            args.dht_prefix,
            version=VERSION,
            max_tokens=args.max_tokens,
            max_request_bytes=int(args.max_request_mb * 2**20),
            request_timeout=args.request_timeout,
            max_queue=args.max_queue,
            allowed_clients=args.allowed_clients,
        )
        await handler.add_p2p_handlers(p2p)

        async def announce(state: ServerState) -> None:
            # Bounded: if the DHT process died (e.g. a Ctrl-C reached the whole process group), a store
            # would wait forever; the server keeps serving and shutting down regardless.
            info = protocol.server_info_value(
                state, throughput, start=start, end=end, version=VERSION, dtype=args.dtype, **extensions
            )
            try:
                await asyncio.wait_for(
                    dht_records.announce(dht, args.dht_prefix, start, end, info, cfg.num_hidden_layers, expiration),
                    timeout=ANNOUNCE_TIMEOUT,
                )
            except (asyncio.TimeoutError, OSError, EOFError, BrokenPipeError) as error:
                logger.warning("announcing %s to the DHT failed: %r", state.name, error)

        await announce(ServerState.ONLINE)
        print(f"jaxseq server ready: {_visible_maddr(dht)}", flush=True)

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.update_period)
            except asyncio.TimeoutError:
                await announce(ServerState.ONLINE)
        await announce(ServerState.OFFLINE)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(p2p.shutdown(), timeout=ANNOUNCE_TIMEOUT)
        dht.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Read when JAX first touches a GPU: several servers (and their client) share one GPU, so each
    # takes memory as it needs it rather than XLA's default 75% of the card up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hivemind_logger("hivemind").setLevel(args.log_level.upper())
    try:
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"jaxseq-server: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
