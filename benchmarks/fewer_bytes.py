"""Fewer bytes: a training step through 2 servers x 4 blocks, each behind its own 100 Mbit/s, 5 ms link
(``jaxseq.testing.link``), uncompressed and with ``ClientConfig(compression="auto")`` (float16 alone, and with
uniform8bit allowed too). For each: the step's median time, the MB that crossed the links per step, the codecs
the client chose, and the step's relative error against the uncompressed one (loss, grad inputs, grad
prompts). Each client first runs two steps (compiling, and measuring the links) before the timed ones.

    python benchmarks/fewer_bytes.py [--steps 5]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.link import Link, Network, Relay

from common import CFG, inputs, machine, run_step, servers_behind_links, timed, training_step

SPANS = [(0, 4), (4, 8)]
LINK = Link(rtt=0.005, bandwidth=100e6)
BASE = jaxseq.ClientConfig(shared_memory=False, request_timeout=300.0, deadline=600.0)
CLIENTS = {
    "none": BASE,
    "auto (float16)": dataclasses.replace(BASE, compression="auto"),
    "auto (float16, uniform8bit)": dataclasses.replace(
        BASE, compression="auto", auto_compressions=("float16", "uniform8bit")
    ),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure(config: jaxseq.ClientConfig, maddr: str, relays: list[Relay], x, prompts, steps: int):
    """A new client's median step time, MB through the links per step and codecs chosen (after two untimed
    steps), and its last step's result."""
    with RemoteSequenceManager([maddr], "bench-compression", config) as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        for _ in range(2):
            run_step(step, x, prompts)
        manager.codecs_used.clear()
        crossed = sum(r.to_server + r.from_server for r in relays)
        times = [timed(lambda: run_step(step, x, prompts)) for _ in range(steps)]
        mb = (sum(r.to_server + r.from_server for r in relays) - crossed) / steps / 1e6
        codecs = collections.Counter(codec for _, codec in manager.codecs_used.elements())
        return statistics.median(times), mb, codecs, run_step(step, x, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per client (default 5)")
    args = parser.parse_args()
    x, prompts = inputs(CFG)
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"{CFG.num_hidden_layers} blocks on {len(SPANS)} servers, hidden {CFG.hidden_size}, float32, links {LINK}")
    print(f"training: batch {x.shape[0]} x {x.shape[1]}, {prompts.shape[2]} deep prompts, median of {args.steps}\n")
    print(f"{'client':<30}{'step ms':>9}{'MB/step':>9}  {'codecs (calls)':<36}{'errors: loss, grad x, grad prompts'}")
    with tempfile.TemporaryDirectory() as tmp, Network() as network:
        checkpoint = jaxseq.random_checkpoint(Path(tmp) / "llama", CFG, seed=0)
        with servers_behind_links(network, checkpoint, SPANS, LINK, "bench-compression") as (servers, relays):
            exact = None
            for name, config in CLIENTS.items():
                step_s, mb, codecs, result = measure(config, servers[0].maddr, relays, x, prompts, args.steps)
                exact = exact or result
                (loss, (gx, gp)), (loss0, (gx0, gp0)) = result, exact
                errors = ", ".join(f"{rel_err(a, b):.1e}" for a, b in [(loss, loss0), (gx, gx0), (gp, gp0)])
                used = ", ".join(f"{c} ({n})" for c, n in codecs.items())
                print(f"{name:<30}{step_s * 1e3:>9.0f}{mb:>9.1f}  {used:<36}{errors}")


if __name__ == "__main__":
    main()
