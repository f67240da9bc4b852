"""A ``LocalSwarm`` step against local jit, by where its servers compute and by which thread XLA runs
the backward callback on.

XLA's CPU runtime runs a computation's next operation on whichever thread finished the one before
it. After an operation split over the intra-op pool (here the loss gradient just before the
backward callback), that is usually one of the pool's threads (as many as cores), which the callback
then blocks while the swarm computes. Servers computing on the caller's XLA client get the pool's
remaining threads only: on 2 cores, one. ``LocalSwarm``'s default, a CPU client of the servers' own
(``servers_device()``), has a pool of its own, as a server process has.

Each LocalSwarm step alternates with a local jit step; steps are grouped by the thread the
backward callback ran on.

    python benchmarks/callback_thread.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import jax

import jaxseq
from jaxseq.testing.local_swarm import LocalSequenceManager, servers_device

from common import CFG, inputs, machine, timed, training_step


class ThreadNotingManager(LocalSequenceManager):
    """A ``LocalSwarm`` manager that notes whether each host call ran on the main thread."""

    def __init__(self, *args, **kwargs):
        self.on_main_thread: list[bool] = []
        super().__init__(*args, **kwargs)

    def run(self, coro):
        self.on_main_thread.append(threading.current_thread() is threading.main_thread())
        return super().run(coro)


def xla_pool_threads() -> int:
    """Threads of XLA's CPU intra-op pools in this process (Linux: named ``tf_XLAEigen``)."""
    names = (open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task"))
    return sum(name == "tf_XLAEigen" for name in names)


def by_callback_thread(swarm: jaxseq.LocalSwarm, local, x, prompts, steps: int) -> dict[str, list[tuple[float, float]]]:
    """(LocalSwarm step, local step) pairs, grouped by the thread the backward callback ran on."""
    with ThreadNotingManager(swarm, jaxseq.ClientConfig()) as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        remote = lambda: jax.block_until_ready(step(x, prompts))  # noqa: E731
        for _ in range(2):
            remote(), local()
        groups: dict[str, list[tuple[float, float]]] = {"the calling thread": [], "an XLA pool thread": []}
        for _ in range(steps):
            manager.on_main_thread.clear()
            pair = timed(remote), timed(local)
            _, backward_on_main = manager.on_main_thread  # the forward callback always runs on the caller
            groups["the calling thread" if backward_on_main else "an XLA pool thread"].append(pair)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed step pairs per placement (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, params = jaxseq.load_checkpoint(jaxseq.random_checkpoint(f"{tmp}/llama", CFG, seed=0))
    x, prompts = inputs(cfg)
    local_step = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
    local = lambda: jax.block_until_ready(local_step(x, prompts))  # noqa: E731
    placements = {"the caller's XLA client": jax.devices()[0], "a client of their own": servers_device()}
    results = {
        where: by_callback_thread(
            jaxseq.LocalSwarm(cfg, params, [(0, 8)], device=device), local, x, prompts, args.steps
        )
        for where, device in placements.items()
    }

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}; XLA CPU pool threads in this process: {xla_pool_threads()}")
    print(f"LocalSwarm 1 x 8 training step against local jit ({args.steps} steps per placement):")
    print(f"  {'servers compute on':<26}{'backward callback on':<24}{'steps':>6}{'ms':>7}{'local ms':>9}{'/ local':>8}")
    for where, groups in results.items():
        for thread, pairs in groups.items():
            if pairs:
                ratio = statistics.median(s / b for s, b in pairs)
                step_ms, local_ms = (1000 * statistics.median(p[i] for p in pairs) for i in (0, 1))
                print(f"  {where:<26}{thread:<24}{len(pairs):>6}{step_ms:>7.0f}{local_ms:>9.0f}{ratio:>8.2f}")
        every = [p for pairs in groups.values() for p in pairs]
        print(
            f"  {where:<26}{'all steps':<24}{len(every):>6}{'':>16}{statistics.median(s / b for s, b in every):>8.2f}"
        )


if __name__ == "__main__":
    main()
