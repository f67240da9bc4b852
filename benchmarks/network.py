"""Through links: a training step and a generated token with each server (2 x 4 blocks, or 4 x 2) behind its own link
(``jaxseq.testing.link``: a relay per server, the same round-trip time and bandwidth both ways), under
settings of the links: no limits (the relays alone), 100 Mbit/s alone, 100 ms alone, both (the Petals paper's
setting (c)), and its (a) 1 Gbit/s, 5 ms and (b) 100 Mbit/s, 5 ms, each on a swarm started for it. For each:
the step's median time, the bytes that crossed the links and the calls per step, and a token's median time
(greedy, batch 1, prompt 64); and what a limit costs, in one-way delays (RTT / 2): the time over the no-limits
setting divided by the one-way delay. The step is timed three ways in turn on the same swarm, each improvement
added to the one before: "one call" per span, the client passing every tensor on
(``ClientConfig(stream_bytes=None, server_to_server=False)``); "no hops", the default's micro-batches in flight
at once, still client-driven (``server_to_server=False``); and the default, whose servers also hand tensors
straight to each other (server-to-server hops).
With the Petals venv (``tests/interop/petals_venv.sh``), Petals 2.2 servers behind relays of their own under
the same settings, and a Petals client's step and token, with jaxseq / Petals ratios.

A token's floor is one trip through every span at the link's delay (with server-to-server pushes: one one-way
delay into each span and one back, (spans + 1) one-way delays) plus the token's compute: it is measured on the
no-limits swarm as the time between tokens of a generation that pauses that many one-way delays after each
token, so that the compute is paid at the same pace as through the link (on this host, weights that sat idle
for 150 ms take several times longer to run than back to back).

    python benchmarks/network.py [--steps 5] [--tokens 16] [--no-petals] [--layout 2x4|4x2] [--batch 8]
                                 [--settings "100 Mbit/s, 100 ms" ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.link import Link, Network, Relay, listening_port

import petals_swarm
from common import (
    BATCH,
    CFG,
    PROMPT_LEN,
    SEQ,
    inputs,
    machine,
    run_step,
    servers_behind_links,
    timed,
    token_seconds,
    training_step,
)  # fmt: skip

LAYOUTS = {"2x4": [(0, 4), (4, 8)], "4x2": [(0, 2), (2, 4), (4, 6), (6, 8)]}
PROMPT = 64
SETTINGS = {
    "no limits": Link(),
    "100 Mbit/s": Link(bandwidth=100e6),
    "100 ms": Link(rtt=0.1),
    "100 Mbit/s, 100 ms": Link(rtt=0.1, bandwidth=100e6),  # the Petals paper's (c)
    "1 Gbit/s, 5 ms": Link(rtt=0.005, bandwidth=1e9),  # (a)
    "100 Mbit/s, 5 ms": Link(rtt=0.005, bandwidth=100e6),  # (b)
}


@dataclasses.dataclass(frozen=True)
class Row:
    setting: str
    link: Link
    step_s: float  # median
    one_call_s: float  # median of the same step as one call per span, client-driven
    no_hops_s: float  # median of the same step with micro-batches in flight, client-driven
    step_mb: float  # MB through all links per step, both ways
    calls: float  # RPCs per step
    token_s: float  # median time between two generated tokens
    floor_s: float | None = None  # a token's floor through this link (see the module's text); None without delay
    petals_step_s: float | None = None  # medians of the same through Petals 2.2 servers behind the same links
    petals_token_s: float | None = None
    petals_failed: int = 0  # Petals steps that failed in its own backward (see _PETALS), run again


def floor_delay(link: Link, spans: list[tuple[int, int]]) -> float:
    """A token's least wire time through ``spans`` behind ``link``: into each span and back out of the last."""
    return (len(spans) + 1) * link.one_way


def measure(
    checkpoint: Path,
    setting: str,
    link: Link,
    spans: list[tuple[int, int]],
    batch: int,
    steps: int,
    tokens: int,
    pauses: Sequence[float] = (),
) -> tuple[Row, list[float]]:
    """One setting, on a swarm of its own: every connection opens on the link as set, as on a real network
    (p2pd's multiplexer grows its flow-control windows by the round trip it measured when a connection
    opened, so changing a link under open connections would measure something no network does). Also the
    token time with each of ``pauses`` after every token (for the floors, on the no-limits swarm)."""
    with Network() as network:
        with servers_behind_links(network, checkpoint, spans, link, "bench-network") as (servers, relays):
            config = jaxseq.ClientConfig(shared_memory=False, request_timeout=300.0, deadline=600.0)
            no_hops = dataclasses.replace(config, server_to_server=False)
            configs = [dataclasses.replace(no_hops, stream_bytes=None), no_hops, config]
            with contextlib.ExitStack() as stack:
                one_call_manager, no_hops_manager, manager = (
                    stack.enter_context(RemoteSequenceManager([servers[0].maddr], "bench-network", c)) for c in configs
                )
                x, prompts = inputs(CFG, batch)
                one_call, without_hops, step = (
                    training_step(functools.partial(jaxseq.remote_sequential, manager=m))
                    for m in (one_call_manager, no_hops_manager, manager)
                )
                model = jaxseq.DistributedCausalLM(checkpoint, manager)
                ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (1, PROMPT))
                for fn in (one_call, without_hops, step):
                    run_step(fn, x, prompts)  # everything compiled
                token_seconds(model, ids, 4)
                one_call_times, no_hops_times, counts = [], [], []
                for _ in range(steps):  # in turn, so that the machine's drift hits all alike
                    one_call_times.append(timed(lambda: run_step(one_call, x, prompts)))
                    no_hops_times.append(timed(lambda: run_step(without_hops, x, prompts)))
                    counts.append(counted(lambda: run_step(step, x, prompts), manager, relays))
                token = token_seconds(model, ids, tokens)
                paced = [token_seconds(model, ids, tokens, pause) for pause in pauses]
    times, calls, crossed = zip(*counts)
    row = Row(
        setting, link, statistics.median(times), statistics.median(one_call_times), statistics.median(no_hops_times),
        sum(crossed) / steps / 1e6, sum(calls) / steps, token,
    )  # fmt: skip
    return row, paced


def counted(fn: Callable[[], object], manager: RemoteSequenceManager, relays: list[Relay]) -> tuple[float, int, int]:
    """Seconds ``fn`` took, the calls ``manager`` made and the bytes that crossed ``relays`` meanwhile."""
    calls, crossed = len(manager.timings), sum(r.to_server + r.from_server for r in relays)
    seconds = timed(fn)
    return seconds, len(manager.timings) - calls, sum(r.to_server + r.from_server for r in relays) - crossed


# Runs in the Petals venv: median seconds of a Petals training step (the benchmark's shape, deep prompts) and
# of a generated token (greedy, batch 1: generate(1 + tokens) less generate(1), per token).
_PETALS = r"""
import json, statistics, sys, time
import torch, petals
ckpt, peers, prefix = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
steps, tokens, batch, seq, prompt_len, prompt = map(int, sys.argv[4:10])
torch.manual_seed(0)
remote = petals.DistributedLlamaForCausalLM.from_pretrained(ckpt, initial_peers=peers, dht_prefix=prefix,
                                                             torch_dtype=torch.float32, max_retries=3,
                                                             connect_timeout=60, request_timeout=600)
n, hidden = remote.config.num_hidden_layers, remote.config.hidden_size
x, prompts = torch.randn(batch, seq, hidden), 0.1 * torch.randn(n, batch, prompt_len, hidden)

failed = []

def step():
    xs, ps = x.clone().requires_grad_(), prompts.clone().requires_grad_()
    remote.model.layers(xs, prompts=ps).pow(2).mean().backward()

def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0

def timed_step():
    # Petals 2.2's backward now and then returns one span's prompt gradients only ("invalid gradient at index
    # 1 - got [4, ...] but expected ... [8, ...]"), even with no limits: such a step is counted and run again.
    for _ in range(3):
        try:
            return timed(step)
        except RuntimeError as error:
            if "invalid gradient" not in str(error):
                raise
            failed.append(str(error)[:200])
    raise RuntimeError(f"3 Petals steps in a row failed: {failed[-1]}")

ids = torch.randint(3, remote.config.vocab_size, (1, prompt))
generate = lambda new: remote.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
timed_step(); generate(2)
step_s = statistics.median(timed_step() for _ in range(steps))
per_token = lambda: (timed(lambda: generate(1 + tokens)) - timed(lambda: generate(1))) / tokens
token_s = statistics.median(per_token() for _ in range(3))
remote.model.layers.sequence_manager.shutdown()
remote.model.layers.sequence_manager.dht.shutdown()
print("RESULT " + json.dumps(dict(step=step_s, token=token_s, failed=len(failed))), flush=True)
"""


def measure_petals(
    python: str,
    checkpoint: Path,
    row: Row,
    spans: list[tuple[int, int]],
    batch: int,
    steps: int,
    tokens: int,
    log_dir: str,
) -> Row:
    """``row`` with Petals 2.2's step and token behind links like ``row``'s (a swarm of its own)."""
    prefix = "bench-network-petals"
    with Network() as network, contextlib.ExitStack() as stack:
        servers: list[petals_swarm.PetalsServer] = []
        for span in spans:
            relay = network.relay(row.link)
            peers = [servers[0].maddr] if servers else None
            server = petals_swarm.petals_server(
                python, checkpoint, block_indices="{}:{}".format(*span), dht_prefix=prefix, initial_peers=peers,
                extra_args=["--announce_maddrs", relay.maddr], log_dir=log_dir, timeout=300.0,
            )  # fmt: skip
            servers.append(stack.enter_context(server))
            relay.forward_to(listening_port(servers[-1].process.pid))
        stdout = petals_swarm.run_in_petals_venv(
            python, _PETALS, str(checkpoint), json.dumps([servers[0].maddr]), prefix,
            *map(str, (steps, tokens, batch, SEQ, PROMPT_LEN, PROMPT)), timeout=1800,
        )  # fmt: skip
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return dataclasses.replace(
        row, petals_step_s=result["step"], petals_token_s=result["token"], petals_failed=result["failed"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting (default 5)")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per setting (default 16)")
    parser.add_argument("--no-petals", action="store_true", help="leave out Petals")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="(default all)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="2x4", help="servers x blocks (default 2x4)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"training rows of {SEQ} tokens (default {BATCH})")
    args = parser.parse_args()
    python, no_petals_reason = petals_swarm.python_unless(args.no_petals)
    spans = LAYOUTS[args.layout]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = petals_swarm.write_checkpoint(python, Path(tmp) / "llama")
        settings = ["no limits", *(s for s in args.settings if s != "no limits")]  # the base of the delays
        delayed = [s for s in settings if SETTINGS[s].rtt]
        pauses = [floor_delay(SETTINGS[s], spans) for s in delayed]
        base, paced = measure(checkpoint, "no limits", Link(), spans, args.batch, args.steps, args.tokens, pauses)
        floors = dict(zip(delayed, paced))
        rows = [base] + [
            dataclasses.replace(
                measure(checkpoint, setting, SETTINGS[setting], spans, args.batch, args.steps, args.tokens)[0],
                floor_s=floors.get(setting),
            )
            for setting in settings[1:]
        ]
        print(*rows, sep="\n", flush=True)  # kept if Petals fails below
        if python is not None:
            rows = [
                measure_petals(python, checkpoint, row, spans, args.batch, args.steps, args.tokens, tmp) for row in rows
            ]

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{CFG.num_hidden_layers} blocks on {len(spans)} servers, hidden {CFG.hidden_size}, float32; training: "
        f"batch {args.batch} x {SEQ}, {PROMPT_LEN} deep prompts, median of {args.steps} steps; generation: greedy, "
        f"batch 1, prompt {PROMPT}, median of {args.tokens} tokens\n"
    )
    if python is None:
        print(f"Petals left out: {no_petals_reason}\n")
    print(
        f"{'links':<22}{'one call ms':>12}{'no hops ms':>11}{'step ms':>9}{'MB/step':>9}{'calls':>7}"
        f"{'+ one-way delays':>18}"
        f"{'token ms':>10}{'+ one-way delays':>18}{'floor ms':>10}{'x floor':>8}"
        f"{'Petals step':>12}{'x Petals':>9}{'Petals token':>13}{'x Petals':>9}{'Petals failed':>14}"
    )
    for r in rows:
        step_delays, token_delays = (delays(r.step_s - base.step_s, r.link), delays(r.token_s - base.token_s, r.link))
        floor = f"{r.floor_s * 1e3:>10.1f}{r.token_s / r.floor_s:>8.2f}" if r.floor_s else f"{'':>18}"
        petals = ""
        if r.petals_step_s is not None and r.petals_token_s is not None:
            petals = (
                f"{r.petals_step_s * 1e3:>12.0f}{r.step_s / r.petals_step_s:>9.2f}"
                f"{r.petals_token_s * 1e3:>13.1f}{r.token_s / r.petals_token_s:>9.2f}{r.petals_failed:>14}"
            )
        print(
            f"{r.setting:<22}{r.one_call_s * 1e3:>12.0f}{r.no_hops_s * 1e3:>11.0f}{r.step_s * 1e3:>9.0f}"
            f"{r.step_mb:>9.1f}{r.calls:>7.1f}"
            f"{step_delays:>18}{r.token_s * 1e3:>10.1f}{token_delays:>18}{floor}{petals}"
        )


def delays(extra_s: float, link: Link) -> str:
    """``extra_s`` in one-way delays of ``link`` (blank for a link without delay)."""
    return f"{extra_s / link.one_way:.1f}" if link.rtt else ""


if __name__ == "__main__":
    main()
