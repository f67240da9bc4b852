"""One table: a training step locally under jit, through a ``LocalSwarm``, and through real
``jaxseq-server`` processes on loopback (1 server x 8 blocks, 2 servers x 4 blocks), each as a ratio
to local (remote and local steps alternate; the ratio is the median of per-pair ratios); where a
remote step's time goes; and the wire's throughput on one large forward.

    python benchmarks/run.py [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import jax
import numpy as np

import jaxseq
from jaxseq.remote import RemoteSequenceManager
from jaxseq.remote.launch import ServerProcess

from common import CFG, BATCH, PROMPT_LEN, SEQ, inputs, machine, median_time, paired_times, training_step


def memcpy_gbps(nbytes: int = 64 << 20) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = median_time(lambda: np.copyto(dst, src), steps=10)
    return nbytes / seconds / 1e9


@contextlib.contextmanager
def loopback_swarm(checkpoint: str, spans: list[tuple[int, int]], prefix: str, shared_memory: bool = True):
    servers = [ServerProcess(checkpoint, spans[0], prefix, None, ["--throughput", "1000"]).wait_ready()]
    try:
        servers += [ServerProcess(checkpoint, s, prefix, [servers[0].maddr], ["--throughput", "1000"]) for s in spans[1:]]
        for server in servers[1:]:
            server.wait_ready()
        config = jaxseq.ClientConfig(
            request_timeout=300.0, deadline=600.0, max_tokens_in_batch=1 << 20, shared_memory=shared_memory
        )
        with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
            yield manager
    finally:
        for server in servers:
            server.terminate()


def large_forward(manager: RemoteSequenceManager) -> tuple[int, float]:
    """Bytes moved and seconds spent moving them (all but server compute) in a forward of 16 x 512 tokens."""
    big = jax.random.normal(jax.random.key(3), (16, 512, CFG.hidden_size))
    forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
    forward(big).block_until_ready()
    since = len(manager.timings)
    forward(big).block_until_ready()
    (call,) = list(manager.timings)[since:]
    total = call.serialize_s + call.round_trip_s + call.deserialize_s
    return call.bytes_sent + call.bytes_received, total - call.server_compute_s - call.server_wait_s


def compiles_after_random_shapes(manager: RemoteSequenceManager, count: int = 50) -> int:
    rng = np.random.default_rng(0)
    forward = lambda x: jaxseq.remote_sequential(x, None, manager)  # noqa: E731
    for _ in range(count):
        shape = (int(rng.integers(1, 17)), int(rng.integers(1, 257)), CFG.hidden_size)
        forward(jax.numpy.zeros(shape)).block_until_ready()
    return manager.server_info(manager.records[0].peer)["jaxseq_compiled"]


def breakdown(manager: RemoteSequenceManager, since: int) -> dict[str, float]:
    """Mean seconds per step in each part of the remote calls logged after index ``since``."""
    calls = list(manager.timings)[since:]
    parts = {
        "client serialize": sum(c.serialize_s for c in calls),
        "server compute": sum(c.server_compute_s or 0.0 for c in calls),
        "server queue": sum(c.server_wait_s or 0.0 for c in calls),
        "wire + server (de)serialize": sum(
            c.round_trip_s - (c.server_compute_s or 0.0) - (c.server_wait_s or 0.0) for c in calls
        ),
        "client deserialize": sum(c.deserialize_s for c in calls),
    }
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    args = parser.parse_args()

    params = jaxseq.init_block_params(CFG, jax.random.key(0))
    x, prompts = inputs()
    rows: list[tuple[str, float, float, float]] = []  # name, median s, median local s, median ratio

    local_step = training_step(lambda x, p: jaxseq.local_sequential(CFG, params, x, p))
    local = lambda: jax.block_until_ready(local_step(x, prompts))  # noqa: E731
    local_fwd = jax.jit(lambda x, p: jaxseq.local_sequential(CFG, params, x, p))
    rows.append(("local jit, forward only", *paired_times(lambda: local_fwd(x, prompts).block_until_ready(), local, args.steps)))
    rows.append(("local jit", *paired_times(local, local, args.steps)))

    with jaxseq.LocalSwarm(CFG, params, [(0, 8)]).sequence_manager() as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        rows.append(("LocalSwarm, 1 x 8 blocks", *paired_times(lambda: jax.block_until_ready(step(x, prompts)), local, args.steps)))

    breakdowns, wire = {}, {}
    compiled = None
    layouts = {"1 server x 8 blocks": [(0, 8)], "2 servers x 4 blocks": [(0, 4), (4, 8)]}
    transports = {"p2pd (Petals wire)": False, "same-host shm": True}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(jaxseq.random_checkpoint(f"{tmp}/llama", CFG, seed=0))
        for layout, spans in layouts.items():
            for transport, shared_memory in transports.items():
                name = f"loopback, {layout}, {transport}"
                with loopback_swarm(checkpoint, spans, f"bench{len(spans)}{int(shared_memory)}", shared_memory) as manager:
                    step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
                    rows.append((name, *paired_times(lambda: jax.block_until_ready(step(x, prompts)), local, args.steps)))
                    since = len(manager.timings)
                    jax.block_until_ready(step(x, prompts))
                    breakdowns[name] = breakdown(manager, since)
                    if len(spans) == 1:
                        wire[transport] = large_forward(manager)
                        if shared_memory:
                            compiled = compiles_after_random_shapes(manager)

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"{CFG.num_hidden_layers} blocks, hidden {CFG.hidden_size}, intermediate {CFG.intermediate_size}, "
          f"{CFG.num_attention_heads} heads; batch {BATCH} x {SEQ}, {PROMPT_LEN} deep prompts, float32; "
          f"forward + backward w.r.t. inputs and prompts; median of {args.steps} steps\n")
    print(f"{'training step':<34}{'median ms':>10}{'local ms':>10}{'/ local':>9}")
    for name, seconds, local_seconds, ratio in rows:
        print(f"{name:<34}{1000 * seconds:>10.1f}{1000 * local_seconds:>10.1f}{ratio:>9.2f}")
    for name, parts in breakdowns.items():
        print(f"\nwhere one step's remote calls spend their time ({name}), ms:")
        for part, seconds in parts.items():
            print(f"  {part:<32}{1000 * seconds:>8.1f}")
    memcpy = memcpy_gbps()
    print(f"\none forward of 16 MiB of hidden states (float32, uncompressed), client to server and back;"
          f" memcpy here {memcpy:.2f} GB/s:")
    for transport, (nbytes, moving) in wire.items():
        gbps = nbytes / moving / 1e9
        print(f"  {transport:<20}{gbps:6.2f} GB/s  ({nbytes / 2**20:.0f} MiB moved; {gbps / memcpy:.2f} x memcpy)")
    print(f"\nblock functions the server compiled after forwards of 50 random shapes (batch 1-16, seq 1-256): {compiled}")


if __name__ == "__main__":
    main()
