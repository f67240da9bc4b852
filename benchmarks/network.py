"""Through links: a training step and a generated token with each of 2 servers x 4 blocks behind its own link
(``jaxseq.testing.link``: a relay per server, the same round-trip time and bandwidth both ways), under four
settings of the links: no limits (the relays alone), 100 Mbit/s alone, 100 ms alone, and both (the Petals
paper's setting (c)), each on a swarm started for it. For each: the step's median time, the bytes that
crossed the links and the calls per step, and a token's median time (greedy, batch 1, prompt 64); and what
a limit costs, in one-way delays (RTT / 2): the time over the no-limits setting divided by the one-way delay.

    python benchmarks/network.py [--steps 5] [--tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.launch import ServerProcess
from jaxseq.testing.link import Link, Network

from common import CFG, inputs, machine, run_step, timed, training_step

SPANS = [(0, 4), (4, 8)]
PROMPT = 64
SETTINGS = {
    "no limits": Link(),
    "100 Mbit/s": Link(bandwidth=100e6),
    "100 ms": Link(rtt=0.1),
    "100 Mbit/s, 100 ms": Link(rtt=0.1, bandwidth=100e6),
}


@dataclasses.dataclass(frozen=True)
class Row:
    setting: str
    link: Link
    step_s: float  # median
    step_mb: float  # MB through all links per step, both ways
    calls: float  # RPCs per step
    token_s: float  # median time between two generated tokens


def token_seconds(model: jaxseq.DistributedCausalLM, ids: np.ndarray, tokens: int) -> float:
    """Median time between consecutive tokens of one greedy generation (the prompt's step excluded)."""
    stamps: list[float] = []
    model.generate(ids, max_new_tokens=tokens, on_tokens=lambda _: stamps.append(time.perf_counter()))
    return statistics.median(np.diff(stamps))


def measure(checkpoint: Path, setting: str, link: Link, steps: int, tokens: int) -> Row:
    """One setting, on a swarm of its own: every connection opens on the link as set, as on a real network
    (p2pd's multiplexer grows its flow-control windows by the round trip it measured when a connection
    opened, so changing a link under open connections would measure something no network does)."""
    with Network() as network:
        relays = [network.relay(link) for _ in SPANS]
        servers: list[ServerProcess] = []
        try:
            for relay, span in zip(relays, SPANS):
                peers = [servers[0].maddr] if servers else None
                args = ["--throughput", "1000", *relay.server_args]
                servers.append(ServerProcess(str(checkpoint), span, "bench-network", peers, args).wait_ready())
                relay.attach(servers[-1])
            config = jaxseq.ClientConfig(shared_memory=False, request_timeout=300.0, deadline=600.0)
            with RemoteSequenceManager([servers[0].maddr], "bench-network", config) as manager:
                x, prompts = inputs(CFG)
                step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
                model = jaxseq.DistributedCausalLM(checkpoint, manager)
                ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (1, PROMPT))
                run_step(step, x, prompts)  # everything compiled
                token_seconds(model, ids, 4)
                calls, crossed = len(manager.timings), sum(r.to_server + r.from_server for r in relays)
                times = [timed(lambda: run_step(step, x, prompts)) for _ in range(steps)]
                crossed = sum(r.to_server + r.from_server for r in relays) - crossed
                calls = len(manager.timings) - calls
                token = token_seconds(model, ids, tokens)
        finally:
            for server in servers:
                server.terminate()
    return Row(setting, link, statistics.median(times), crossed / steps / 1e6, calls / steps, token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting (default 5)")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per setting (default 16)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = jaxseq.random_checkpoint(Path(tmp) / "llama", CFG, seed=0)
        rows = [measure(checkpoint, setting, link, args.steps, args.tokens) for setting, link in SETTINGS.items()]

    base = rows[0]
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{CFG.num_hidden_layers} blocks on {len(SPANS)} servers, hidden {CFG.hidden_size}, float32; training: "
        f"batch {inputs()[0].shape[0]} x {inputs()[0].shape[1]}, {inputs()[1].shape[2]} deep prompts, median of "
        f"{args.steps} steps; generation: greedy, batch 1, prompt {PROMPT}, median of {args.tokens} tokens\n"
    )
    print(
        f"{'links':<22}{'step ms':>9}{'MB/step':>9}{'calls':>7}{'+ one-way delays':>18}"
        f"{'token ms':>10}{'+ one-way delays':>18}"
    )
    for r in rows:
        step_delays, token_delays = (delays(r.step_s - base.step_s, r.link), delays(r.token_s - base.token_s, r.link))
        print(
            f"{r.setting:<22}{r.step_s * 1e3:>9.0f}{r.step_mb:>9.1f}{r.calls:>7.1f}{step_delays:>18}"
            f"{r.token_s * 1e3:>10.1f}{token_delays:>18}"
        )


def delays(extra_s: float, link: Link) -> str:
    """``extra_s`` in one-way delays of ``link`` (blank for a link without delay)."""
    return f"{extra_s / link.one_way:.1f}" if link.rtt else ""


if __name__ == "__main__":
    main()
