"""One table: a training step locally under jit, through a ``LocalSwarm``, and through real
``jaxseq-server`` processes on loopback (1 server x 8 blocks, 2 servers x 4 blocks), each as a ratio
to local (remote and local steps alternate; the ratio is the median of per-pair ratios); where a
remote step's time goes; and the wire's throughput on one large forward.

    python benchmarks/run.py [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
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
def loopback_swarm(checkpoint: str, spans: list[tuple[int, int]], prefix: str):
    servers = [ServerProcess(checkpoint, spans[0], prefix, None, ["--throughput", "1000"]).wait_ready()]
    try:
        servers += [ServerProcess(checkpoint, s, prefix, [servers[0].maddr], ["--throughput", "1000"]) for s in spans[1:]]
        for server in servers[1:]:
            server.wait_ready()
        config = jaxseq.ClientConfig(request_timeout=300.0, deadline=600.0, max_tokens_in_batch=1 << 20)
        with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
            yield manager
    finally:
        for server in servers:
            server.terminate()


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

    breakdowns = {}
    wire = None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(jaxseq.random_checkpoint(f"{tmp}/llama", CFG, seed=0))
        for name, spans in [("loopback, 1 server x 8 blocks", [(0, 8)]), ("loopback, 2 servers x 4 blocks", [(0, 4), (4, 8)])]:
            with loopback_swarm(checkpoint, spans, f"bench{len(spans)}") as manager:
                step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
                rows.append((name, *paired_times(lambda: jax.block_until_ready(step(x, prompts)), local, args.steps)))
                since = len(manager.timings)
                jax.block_until_ready(step(x, prompts))
                breakdowns[name] = breakdown(manager, since)
                if len(spans) == 1:  # one large forward: 16 x 512 tokens of hidden 512 = 16 MiB each way
                    big = jax.random.normal(jax.random.key(3), (16, 512, CFG.hidden_size))
                    forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
                    forward(big).block_until_ready()
                    since = len(manager.timings)
                    forward(big).block_until_ready()
                    (call,) = list(manager.timings)[since:]
                    moving = call.round_trip_s - call.server_compute_s - call.server_wait_s
                    wire = (call.bytes_sent + call.bytes_received, moving, call.round_trip_s)

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
    nbytes, moving, total = wire
    memcpy = memcpy_gbps()
    print(f"\nwire, one forward of 16 MiB (float32, uncompressed), {nbytes / 2**20:.0f} MiB both ways:")
    print(f"  {nbytes / moving / 1e9:.2f} GB/s excluding server compute ({nbytes / total / 1e9:.2f} GB/s including); "
          f"memcpy here {memcpy:.2f} GB/s; ratio {nbytes / moving / 1e9 / memcpy:.2f}")


if __name__ == "__main__":
    main()
