"""What every benchmark shares: the model and shapes of the issues' measurements, and timing."""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxseq
from jaxseq.testing.launch import ServerProcess
from jaxseq.testing.link import Link, Network, Relay

# 8 Llama blocks, hidden 512, intermediate 1344, 8 heads; batch 8 x 128 tokens, 16 deep prompts, float32.
CFG = jaxseq.LlamaConfig(
    hidden_size=512, intermediate_size=1344, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8,
    vocab_size=1000,
)  # fmt: skip
BATCH, SEQ, PROMPT_LEN = 8, 128, 16


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``steps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(steps))


@dataclasses.dataclass(frozen=True)
class Paired:
    """Timings of a step against a baseline that alternated with it."""

    step_s: float  # median
    baseline_s: float  # median
    ratio: float  # median of per-pair ratios
    min_ratio: float  # fastest step / fastest baseline: what is left when the machine's noise (only ever
    # slower) is least; reported beside the median, not instead of it


def paired_times(step: Callable[[], object], baseline: Callable[[], object], steps: int, warmup: int = 2) -> Paired:
    """``step`` and ``baseline`` timed alternately, so that drift in a noisy machine's speed hits both alike."""
    for _ in range(warmup):
        step(), baseline()
    pairs = [(timed(step), timed(baseline)) for _ in range(steps)]
    return Paired(
        statistics.median(s for s, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(s / b for s, b in pairs),
        min(s for s, _ in pairs) / min(b for _, b in pairs),
    )


def inputs(cfg: jaxseq.LlamaConfig = CFG, batch: int = BATCH, seq: int = SEQ, prompt_len: int = PROMPT_LEN):
    x = jax.random.normal(jax.random.key(1), (batch, seq, cfg.hidden_size), jnp.float32)
    prompts = 0.1 * jax.random.normal(jax.random.key(2), (cfg.num_hidden_layers, batch, prompt_len, cfg.hidden_size))
    return x, prompts


def training_step(blocks: Callable) -> Callable:
    """A jitted forward + backward w.r.t. hidden states and prompts through ``blocks(x, prompts)``."""
    return jax.jit(jax.value_and_grad(lambda x, p: jnp.mean(blocks(x, p) ** 2), argnums=(0, 1)))


def run_step(step: Callable, *args) -> object:
    """``step(*args)``, waited for: what a timed callable runs."""
    return jax.block_until_ready(step(*args))


def token_seconds(model: jaxseq.DistributedCausalLM, ids, tokens: int, pause: float = 0.0) -> float:
    """Median time between consecutive tokens of one greedy generation (the prompt's step excluded), pausing
    ``pause`` seconds after each token."""
    stamps: list[float] = []

    def stamp(_) -> None:
        stamps.append(time.perf_counter())
        time.sleep(pause)

    model.generate(ids, max_new_tokens=tokens, on_tokens=stamp)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"


@contextlib.contextmanager
def servers_behind_links(
    network: Network,
    checkpoint: str | Path,
    spans: Sequence[tuple[int, int]],
    link: Link | Sequence[Link],
    dht_prefix: str,
) -> Iterator[tuple[list[ServerProcess], list[Relay]]]:
    """A swarm of ``checkpoint``, a server per span, each behind a relay of its own with ``link`` (or the link of
    its own, given one per span), announcing the relay's address; every server is SIGTERMed on leaving."""
    links = [link] * len(spans) if isinstance(link, Link) else list(link)
    relays = [network.relay(each) for each in links]
    servers: list[ServerProcess] = []
    try:
        for relay, span in zip(relays, spans):
            peers = [servers[0].maddr] if servers else None
            args = ["--throughput", "1000", *relay.server_args]
            servers.append(ServerProcess(str(checkpoint), span, dht_prefix, peers, args).wait_ready())
            relay.attach(servers[-1])
        yield servers, relays
    finally:
        for server in servers:
            server.terminate()
