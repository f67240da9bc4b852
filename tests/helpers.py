"""What tests share besides fixtures: the tiny model, comparisons within a tolerance, inputs."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxseq
from jaxseq.testing.launch import ServerProcess
from jaxseq.testing.link import Link, Network, Relay

TINY = jaxseq.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64, of arrays or torch tensors on any device."""
    a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, np.float64) for v in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def training_step(blocks):
    """jit(value_and_grad) w.r.t. hidden states and prompts of a non-linear read-out of ``blocks(x, prompts)``
    (so gradients depend on every output differently); returns ``((loss, outputs), (grad_x, grad_prompts))``."""

    def loss(x, p):
        out = blocks(x, p)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=out.dtype)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def matches(got, want, tol: float = 1e-5) -> bool:
    """Whether two ``training_step`` results agree: outputs and both gradients within ``tol`` (relative)."""
    ((_, out), grads), ((_, out_ref), grads_ref) = got, want
    return rel_err(out, out_ref) < tol and all(rel_err(g, r) < tol for g, r in zip(grads, grads_ref))


def assert_matches(got, want, tol: float = 1e-5) -> None:
    ((_, out), (gx, gp)), ((_, out_ref), (gx_ref, gp_ref)) = got, want
    assert rel_err(out, out_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    assert rel_err(gp, gp_ref) < tol


def random_inputs(cfg, batch, seq, prompt_len, seed=1, num_blocks=None):
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, seq, cfg.hidden_size), jnp.float32)
    n = num_blocks or cfg.num_hidden_layers
    prompts = 0.5 * jax.random.normal(kp, (n, batch, prompt_len, cfg.hidden_size), jnp.float32)
    return x, prompts


_prefixes = itertools.count()


class Swarms:
    """Real ``jaxseq-server`` processes of one checkpoint, for a test or a module of tests: ``start(spans)``
    starts a swarm (the first server starts it, the others join, in parallel) and returns its servers and
    dht_prefix. Leaving the ``with`` block kills every process started, by PID, whatever happened."""

    def __init__(self, checkpoint: str | Path, env: Mapping[str, str] | None = None, network: Network | None = None):
        self.checkpoint, self.env, self.network = str(checkpoint), env, network
        self.started: list[ServerProcess] = []
        self.relays: dict[str, Relay] = {}  # by peer id: the relay in front of each server started behind a link

    def start(
        self,
        spans: Sequence[tuple[int, int]],
        dht_prefix: str | None = None,
        initial_peers: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        link: Link | None = None,
    ) -> tuple[list[ServerProcess], str]:
        """With a ``link``, each server is behind a relay of its own with that link (the ``network`` given)."""
        dht_prefix = dht_prefix or f"tiny{next(_prefixes)}"
        if link is not None and self.network is None:
            raise ValueError("servers behind links need Swarms(..., network=Network())")
        relays: dict[ServerProcess, Relay] = {}

        def launch(span: tuple[int, int], peers: Sequence[str] | None) -> ServerProcess:
            args = ["--throughput", "1000", "--update-period", "5", *extra_args]
            relay = None if link is None or self.network is None else self.network.relay(link)
            args += relay.server_args if relay else []
            server = ServerProcess(self.checkpoint, span, dht_prefix, peers, args, env=self.env)
            self.started.append(server)
            if relay:
                relays[server] = relay
            return server

        def ready(server: ServerProcess) -> ServerProcess:
            server.wait_ready()
            if server in relays:
                relays[server].attach(server)
                self.relays[server.peer_id] = relays[server]
            return server

        servers = []
        if not initial_peers:
            servers.append(ready(launch(spans[0], None)))
            initial_peers, spans = [servers[0].maddr], spans[1:]
        servers += [ready(server) for server in [launch(span, initial_peers) for span in spans]]
        return servers, dht_prefix

    def __enter__(self) -> Swarms:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.started:
            server.kill()
