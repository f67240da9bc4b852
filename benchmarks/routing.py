"""Latency-aware routing through links: each span of 2 x 4 blocks (hidden 512) held by a near server (5 ms round
trip) and a far one (100 ms), every server behind its own link at 100 Mbit/s (``jaxseq.testing.link``). The
default client routes by the round trips it measures (the Petals paper's rule: a span costs its server's round
trip plus its compute). A router blind to round trips sees four equal chains here (equal announced throughput)
and picks one at random: its expected time is the mean of the four, each timed with a client pinned to it
(``ClientConfig.allowed_servers``). A training step (8 x 128, 16 deep prompts; median) and a token (greedy,
batch 1, prompt 64; median time between tokens).

    python benchmarks/routing.py [--steps 5] [--tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.link import Link, Network

import petals_swarm
from common import CFG, inputs, machine, median_time, run_step, servers_behind_links, token_seconds, training_step

NEAR, FAR = Link(rtt=0.005, bandwidth=100e6), Link(rtt=0.1, bandwidth=100e6)
SPANS = [(0, 4), (0, 4), (4, 8), (4, 8)]
LINKS = [NEAR, FAR, NEAR, FAR]
CONFIG = jaxseq.ClientConfig(shared_memory=False, request_timeout=300.0, deadline=600.0)


def measure(checkpoint: Path, manager: RemoteSequenceManager, steps: int, tokens: int) -> tuple[float, float, set]:
    """Median step and token seconds through ``manager``, and the peers its last step called."""
    x, prompts = inputs(CFG)
    step = training_step(functools.partial(jaxseq.remote_sequential, manager=manager))
    step_s = median_time(lambda: run_step(step, x, prompts), steps)
    calls = len(manager.timings)
    run_step(step, x, prompts)
    peers = {t.peer for t in list(manager.timings)[calls:]}
    model = jaxseq.DistributedCausalLM(checkpoint, manager)
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (1, 64))
    token_seconds(model, ids, 4)
    return step_s, token_seconds(model, ids, tokens), peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per chain (default 5)")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per chain (default 16)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Network() as network:
        checkpoint = petals_swarm.write_checkpoint(None, Path(tmp) / "llama")
        with servers_behind_links(network, checkpoint, SPANS, LINKS, "bench-routing") as (servers, _):
            near = {s.peer_id: link is NEAR for s, link in zip(servers, LINKS)}
            chains = [(a, b) for a in servers[:2] for b in servers[2:]]
            for first, second in chains:
                pinned = dataclasses.replace(CONFIG, allowed_servers=(first.peer_id, second.peer_id))
                with RemoteSequenceManager([servers[0].maddr], "bench-routing", pinned) as manager:
                    name = " / ".join("near" if near[s.peer_id] else "far" for s in (first, second))
                    rows.append((f"pinned: {name}", *measure(checkpoint, manager, args.steps, args.tokens)[:2]))
            with RemoteSequenceManager([servers[0].maddr], "bench-routing", CONFIG) as manager:
                step_s, token_s, peers = measure(checkpoint, manager, args.steps, args.tokens)
            chosen = ", ".join(
                f"{s.blocks} {'near' if near[s.peer_id] else 'far'}" for s in servers if s.peer_id in peers
            )
    blind = ("blind to round trips (mean of the four)", *map(statistics.mean, zip(*(r[1:] for r in rows))))
    aware = (f"latency-aware (default; its step called: {chosen})", step_s, token_s)

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print("2 x 4 blocks, hidden 512; each span on a near (5 ms) and a far (100 ms) server, 100 Mbit/s each\n")
    print(f"{'chain':<58}{'step ms':>9}{'token ms':>10}{'step x blind':>14}{'token x blind':>15}")
    for name, step, token in [*rows, blind, aware]:
        print(f"{name:<58}{step * 1e3:>9.0f}{token * 1e3:>10.1f}{step / blind[1]:>14.2f}{token / blind[2]:>15.2f}")


if __name__ == "__main__":
    main()
