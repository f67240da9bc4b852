"""One table: a training step locally under jit, through a ``LocalSwarm``, through real ``jaxseq-server``
processes on loopback (1 server x 8 blocks, 2 servers x 4 blocks; tensors through same-host memory
files and through p2pd), and through real Petals 2.2 servers in the same layouts (from the Petals
venv, ``tests/interop/petals_venv.sh``), all on one checkpoint; where a remote step's time goes;
jaxseq against Petals; how fast hidden states move (``wire.py``); and the server's compile count.

A jaxseq row's steps alternate with local jit steps, and its ratio is the median of per-pair ratios
(this machine's speed drifts). A Petals row's steps alternate with the same blocks in local torch
in the Petals venv; its ratio to local jit divides by the median local jit step of the whole run.

    python benchmarks/run.py [--steps 9] [--no-petals]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.launch import ServerProcess

import petals_swarm
import wire
from common import BATCH, CFG, PROMPT_LEN, SEQ, Paired, inputs, machine, paired_times, run_step, timed, training_step

LAYOUTS = {"1 x 8": [(0, 8)], "2 x 4": [(0, 4), (4, 8)]}
TRANSPORTS = {"memory files": True, "p2pd": False}
PARTS = ("client", "serialize", "wire", "server compute", "server wait")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    step_s: float
    local_s: float  # the local step it was paired with (torch for Petals)
    ratio: float  # to local jit
    min_ratio: float | None = None  # fastest step / fastest local step (jaxseq rows)
    parts_s: dict | None = None  # where one step's time goes (jaxseq loopback rows)
    torch_ratio: float | None = None  # Petals rows: to the same blocks in local torch

    @classmethod
    def paired(cls, name: str, timing: Paired, parts_s: dict | None = None) -> Row:
        return cls(name, timing.step_s, timing.baseline_s, timing.ratio, timing.min_ratio, parts_s)


@contextlib.contextmanager
def loopback_swarm(checkpoint: str, spans: list[tuple[int, int]], prefix: str, shared_memory: bool):
    servers = [ServerProcess(checkpoint, spans[0], prefix, None, ["--throughput", "1000"]).wait_ready()]
    try:
        servers += [
            ServerProcess(checkpoint, s, prefix, [servers[0].maddr], ["--throughput", "1000"]) for s in spans[1:]
        ]
        for server in servers[1:]:
            server.wait_ready()
        config = jaxseq.ClientConfig(request_timeout=300.0, deadline=600.0, shared_memory=shared_memory)
        with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
            yield manager
    finally:
        for server in servers:
            server.terminate()


def step_parts(manager: RemoteSequenceManager, step, steps: int = 3) -> dict[str, float]:
    """Median seconds per step: the client's own work (JAX, callbacks, routing), serializing (both
    sides, with checks), the wire (p2pd or the memory-file handshake), server compute, queue wait."""
    samples = []
    for _ in range(steps):
        since = len(manager.timings)
        wall = timed(step)
        calls = list(manager.timings)[since:]
        in_calls = sum(c.serialize_s + c.round_trip_s + c.deserialize_s for c in calls)
        compute = sum(c.server_compute_s or 0.0 for c in calls)
        wait = sum(c.server_wait_s or 0.0 for c in calls)
        server = compute + wait + sum(c.server_io_s or 0.0 for c in calls)
        samples.append(
            {
                "client": wall - in_calls,
                "serialize": sum(c.serialize_s + c.deserialize_s + (c.server_io_s or 0.0) for c in calls),
                "wire": in_calls - server - sum(c.serialize_s + c.deserialize_s for c in calls),
                "server compute": compute,
                "server wait": wait,
            }
        )
    return {part: statistics.median(s[part] for s in samples) for part in PARTS}


def compiles_after_random_shapes(manager: RemoteSequenceManager, count: int = 50) -> int:
    """Block functions the server has compiled after forwards of ``count`` random (batch, seq) shapes."""
    rng = np.random.default_rng(0)
    forward = lambda x: jaxseq.remote_sequential(x, None, manager)  # noqa: E731
    for _ in range(count):
        shape = (int(rng.integers(1, 17)), int(rng.integers(1, 257)), CFG.hidden_size)
        forward(jax.numpy.zeros(shape)).block_until_ready()
    return manager.server_info(manager.records[0].peer)["jaxseq_compiled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="timed steps per row (default 9)")
    parser.add_argument("--wire-calls", type=int, default=5, help="timed calls per wire figure (default 5)")
    parser.add_argument("--no-petals", action="store_true", help="leave out the Petals rows")
    args = parser.parse_args()
    python, no_petals_reason = petals_swarm.python_unless(args.no_petals)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = petals_swarm.write_checkpoint(python, Path(tmp) / "llama")
        cfg, params = jaxseq.load_checkpoint(checkpoint)
        x, prompts = inputs(cfg)
        local_step = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
        local = functools.partial(run_step, local_step, x, prompts)
        local_forward = jax.jit(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
        rows.append(
            Row.paired(
                "local jit, forward only",
                paired_times(lambda: local_forward(x, prompts).block_until_ready(), local, args.steps),
            )
        )
        rows.append(Row.paired("local jit", paired_times(local, local, args.steps)))

        with jaxseq.LocalSwarm(cfg, params, [(0, 8)]).sequence_manager() as manager:
            step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
            rows.append(
                Row.paired(
                    "LocalSwarm, 1 x 8",
                    paired_times(functools.partial(run_step, step, x, prompts), local, args.steps),
                )
            )

        compiled = None
        for layout, spans in LAYOUTS.items():
            for transport, shared_memory in TRANSPORTS.items():
                prefix = f"bench-{len(spans)}-{int(shared_memory)}"
                with loopback_swarm(str(checkpoint), spans, prefix, shared_memory) as manager:
                    step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
                    remote = functools.partial(run_step, step, x, prompts)
                    timing = paired_times(remote, local, args.steps)
                    rows.append(Row.paired(f"jaxseq {layout}, {transport}", timing, step_parts(manager, remote)))
                    if len(spans) == 1 and shared_memory:
                        compiled = compiles_after_random_shapes(manager)

        local_jit = statistics.median(r.local_s for r in rows)
        if python is not None:
            for i, (layout, spans) in enumerate(LAYOUTS.items()):
                result = petals_swarm.petals_row(python, checkpoint, spans, args.steps, f"bench-petals{i}", tmp)
                rows.append(
                    Row(
                        f"Petals 2.2 {layout}",
                        result["step"],
                        result["local"],
                        result["step"] / local_jit,
                        torch_ratio=result["ratio"],
                    )
                )

    with wire.one_block_server() as server:
        wire_results = wire.measure(server, args.wire_calls)

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads, float32; batch {BATCH} x {SEQ}, {PROMPT_LEN} deep prompts; "
        f"forward + backward w.r.t. inputs and prompts; median of {args.steps} steps\n"
    )
    print(
        f"{'training step':<28}{'ms':>7}{'local ms':>9}{'/ local':>8}{'min/min':>8}   where a step goes, ms: "
        + "".join(f"{p:>10}" for p in ("client", "serialize", "wire", "compute", "wait"))
    )
    for r in rows:
        parts = "".join(f"{1000 * r.parts_s[p]:>10.1f}" for p in PARTS) if r.parts_s else ""
        note = f"   ({r.torch_ratio:.2f} x its local torch step)" if r.torch_ratio is not None else ""
        fastest = f"{r.min_ratio:>8.2f}" if r.min_ratio is not None else f"{'':8}"
        print(
            f"{r.name:<28}{1000 * r.step_s:>7.0f}{1000 * r.local_s:>9.0f}{r.ratio:>8.2f}{fastest}{'':26}{parts}{note}"
        )
    if python is None:
        print(f"\n(no Petals rows: {no_petals_reason})")
    else:
        print("\njaxseq / Petals, same layout and checkpoint:")
        by_name = {r.name: r.step_s for r in rows}
        for layout in LAYOUTS:
            petals_s = by_name[f"Petals 2.2 {layout}"]
            print(
                f"  {layout}: "
                + ", ".join(f"{t} {by_name[f'jaxseq {layout}, {t}'] / petals_s:.2f}" for t in TRANSPORTS)
            )
    print()
    wire.print_table(wire_results)
    print(
        f"\nblock functions the server compiled after forwards of 50 random shapes (batch 1-16, seq 1-256): {compiled}"
    )


if __name__ == "__main__":
    main()
