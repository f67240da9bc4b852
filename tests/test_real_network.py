"""Servers as if on other hosts: each behind a link of its own (50 ms round trip, 100 Mbit/s, both ways), dialled
only at the address it announces. Training steps and greedy generation equal local, every byte of the calls
crossed the links, and a server SIGKILLed mid-step or mid-generation costs no step and no token, with the
client's timeouts set in round trips. Also: ``--announce-maddrs`` refuses what no peer could dial."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
import psutil
import pytest
import torch

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.server.config import ServerConfig
from jaxseq.testing.launch import ServerProcess
from jaxseq.testing.link import Link, Network, Relay, listening_port

from helpers import Swarms, assert_matches, random_inputs, training_step

RTT = 0.05
LINK = Link(rtt=RTT, bandwidth=100e6)
# In round trips: a connection takes a few (TCP, then TLS and multiplexer handshakes through p2pd); a
# request leaves room for a server compiling a new shape on a busy machine.
CONFIG = jaxseq.ClientConfig(
    shared_memory=False, connect_timeout=40 * RTT, request_timeout=200 * RTT, deadline=1200 * RTT,
    min_backoff=2 * RTT, max_backoff=20 * RTT, ban_timeout=200 * RTT,
)  # fmt: skip


@pytest.fixture(scope="module")
def linked_servers(checkpoint, tmp_path_factory) -> Iterator[tuple[Swarms, list[ServerProcess], str]]:
    """Two spans, two servers each (a spare for each span), every one behind its own link.
    The servers share a JAX compilation cache: one compiles a shape, the others load it (seconds each on
    two busy cores, which the tests would spend on every spare's first call)."""
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    with Network() as network, Swarms(checkpoint[0], env=cache, network=network) as swarms:
        servers, prefix = swarms.start([(0, 2), (0, 2), (2, 4), (2, 4)], link=LINK)
        yield swarms, servers, prefix


@pytest.fixture(scope="module")
def linked_swarm(linked_servers) -> Iterator[tuple[list[ServerProcess], dict[str, Relay], RemoteSequenceManager]]:
    """The linked servers, and a client."""
    swarms, servers, prefix = linked_servers
    with RemoteSequenceManager([servers[0].maddr], prefix, CONFIG) as manager:
        yield servers, swarms.relays, manager


@pytest.fixture(scope="module")
def linked_model(checkpoint, linked_swarm) -> jaxseq.DistributedCausalLM:
    return jaxseq.DistributedCausalLM(checkpoint[0], linked_swarm[2])


@pytest.fixture(scope="module")
def local_step(checkpoint):
    _, cfg, params = checkpoint
    return training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))


def crossed(relays: dict[str, Relay]) -> dict[str, tuple[int, int]]:
    return {peer: (relay.to_server, relay.from_server) for peer, relay in relays.items()}


@pytest.mark.network
def test_training_through_links_equals_local_and_every_byte_crossed_them(checkpoint, linked_swarm, local_step):
    _, cfg, _ = checkpoint
    servers, relays, manager = linked_swarm
    before, calls_before = crossed(relays), len(manager.timings)
    x, prompts = random_inputs(cfg, 4, 64, 3)
    step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
    for i in range(2):
        assert_matches(step(x, p := prompts * (1 + 0.1 * i)), local_step(x, p))
    calls = list(manager.timings)[calls_before:]
    assert {t.stage for t in calls} == {"forward", "backward"} and {t.transport for t in calls} <= {"unary", "stream"}
    assert min(t.round_trip_s for t in calls) >= RTT
    after = crossed(relays)
    for peer in {t.peer for t in calls}:
        sent = sum(t.bytes_sent for t in calls if t.peer == peer)
        received = sum(t.bytes_received for t in calls if t.peer == peer)
        assert after[peer][0] - before[peer][0] >= sent > x.nbytes
        assert after[peer][1] - before[peer][1] >= received > x.nbytes
    # what the client's p2pd knows of the servers is their announced addresses alone
    p2p = manager.run(manager.dht.replicate_p2p())
    known = {str(addr) for peer in manager.run(p2p.list_peers()) for addr in peer.addrs}
    assert known and known <= {relay.maddr for relay in relays.values()}


@pytest.mark.network
def test_greedy_generation_through_links_equals_transformers(linked_swarm, linked_model, hf_model):
    """Including the servers' pushes to the next server (``rpc_push``): no connection goes around a link."""
    servers, relays, manager = linked_swarm
    ids = np.random.default_rng(0).integers(3, 1000, (2, 5))
    want = hf_model.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False).numpy()
    before = crossed(relays)
    pushed = pushes_sent(servers, manager)
    got = linked_model.generate(ids, max_new_tokens=16)
    np.testing.assert_array_equal(got, want)
    after = crossed(relays)
    # one server of each span took part, through its link, and the first span's pushed its outputs on
    assert sum(after[peer] != before[peer] for peer in relays) >= 2
    assert pushes_sent(servers, manager) > pushed
    assert not connections_around_links(servers, manager)


def pushes_sent(servers: list[ServerProcess], manager: RemoteSequenceManager) -> int:
    return sum(manager.server_info(s.peer_id)["jaxseq_pushes"]["sent"] for s in servers if s.blocks == (0, 2))


def connections_around_links(servers: list[ServerProcess], manager: RemoteSequenceManager) -> list[str]:
    """Open TCP connections of the client's or any server's p2pd (they carry every peer-to-peer byte) straight
    to a server's listening port. (The client's DHT process, forked from this one, holds copies of the relays'
    sockets: those are no peer's connections.)"""
    alive = [s for s in servers if s.process.poll() is None]
    listening = {listening_port(s.process.pid) for s in alive}
    assert manager.dht is not None
    roots = [psutil.Process(pid) for pid in [manager.dht.pid, *(s.process.pid for s in alive)]]
    daemons = [p for root in roots for p in root.children(recursive=True) if p.name() == "p2pd"]
    assert len(daemons) == len(roots)
    return [
        f"p2pd {process.pid}: {conn.laddr} -> {conn.raddr}"
        for process in daemons
        for conn in process.net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port in listening
    ]


@pytest.mark.network
def test_a_server_sigkilled_mid_step_costs_no_step(checkpoint, linked_swarm, local_step):
    """The server of the second span is SIGKILLed once the first forward has reached it through its link (handed
    on by the first span's server)."""
    _, cfg, _ = checkpoint
    servers, relays, manager = linked_swarm
    step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
    x, prompts = random_inputs(cfg, 4, 64, 3, seed=2)
    assert_matches(step(x, prompts), local_step(x, prompts))  # compiled, and the route's connections open
    candidates = [s for s in servers if s.blocks == (2, 4) and s.process.returncode is None]
    baseline = {s: relays[s.peer_id].to_server for s in candidates}
    killed: list[ServerProcess] = []

    def kill_once_the_forward_arrives() -> None:
        deadline = time.monotonic() + CONFIG.deadline
        while time.monotonic() < deadline:
            for server in candidates:
                if relays[server.peer_id].to_server - baseline[server] >= x.nbytes:
                    server.kill()
                    killed.append(server)
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_once_the_forward_arrives)
    retries, start, handed = manager.retries, time.monotonic(), handoffs(servers, manager)
    watcher.start()
    try:
        got = step(x, prompts * 1.5)
    finally:
        watcher.join()
    assert killed, "no server of blocks 2:4 received the forward"
    assert_matches(got, local_step(x, prompts * 1.5))
    assert time.monotonic() - start < CONFIG.deadline
    assert manager.retries > retries
    # the chain ran through server-to-server hops (the killed server was the one awaiting a hand-off), and
    # gave what the client-driven chain gives, bit for bit
    assert sum(n["sent"] - handed.get(peer, {}).get("sent", 0) for peer, n in handoffs(servers, manager).items()) > 0
    driven = dataclasses.replace(CONFIG, server_to_server=False)
    alive = next(s for s in servers if s.process.poll() is None)
    with RemoteSequenceManager([alive.maddr], manager.dht_prefix, driven) as client_driven:
        want = training_step(lambda x, p: jaxseq.remote_sequential(x, p, client_driven))(x, prompts * 1.5)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def handoffs(servers: list[ServerProcess], manager: RemoteSequenceManager) -> dict[str, dict[str, int]]:
    """The live servers' counts of training tensors handed on, failed to hand on, received, and dropped."""
    return {s.peer_id: manager.server_info(s.peer_id)["jaxseq_handoffs"] for s in servers if s.process.poll() is None}


@pytest.mark.network
def test_a_server_sigkilled_mid_generation_costs_no_token(linked_swarm, linked_model, hf_model):
    servers, _, manager = linked_swarm
    ids = np.random.default_rng(1).integers(3, 1000, (2, 5))
    want = hf_model.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False).numpy()
    first_span = [s for s in servers if s.blocks == (0, 2)]

    def computed() -> dict[str, int]:
        return {s.peer_id: manager.server_info(s.peer_id)["jaxseq_computed"]["inference"] for s in first_span}

    before, seen, killed = computed(), [], []

    def kill_midway(tokens) -> None:
        seen.append(tokens)
        if len(seen) == 6:
            now = computed()
            victim = next(s for s in first_span if now[s.peer_id] > before[s.peer_id])
            victim.kill()
            killed.append(victim)

    retries = manager.retries
    got = linked_model.generate(ids, max_new_tokens=16, on_tokens=kill_midway)
    np.testing.assert_array_equal(got, want)
    assert killed and manager.retries > retries


@pytest.mark.network
def test_server_to_server_hops_equal_the_client_driven_chain_exactly(checkpoint, linked_servers, local_step, tmp_path):
    """One server per span, two micro-batches. With hops, the first span's server hands its outputs to the
    second's and the second hands the grad inputs back; results equal the client-driven chain's bit for bit.
    Then a new server of blocks 2:4 that serves this client alone (``--allowed-clients``): it refuses the
    first server's forward hand-offs, so the client sends those tensors itself; the same results again.
    (Last of the swarm's tests: later clients would find the new server refusing them.)"""
    _, cfg, _ = checkpoint
    swarms, servers, prefix = linked_servers
    first, second = (
        next(s for s in servers if s.blocks == span and s.process.poll() is None) for span in [(0, 2), (2, 4)]
    )
    identity = str(tmp_path / "client.key")
    with RemoteSequenceManager([first.maddr], prefix, CONFIG, identity_path=identity) as client:
        client_id = client.peer_id
    (guarded,), _ = swarms.start([(2, 4)], prefix, [first.maddr], ["--allowed-clients", client_id], link=LINK)
    x, prompts = random_inputs(cfg, 4, 64, 3, seed=3)
    for downstream in (second, guarded):
        pair = [first, downstream]
        results = {}
        for hops in (True, False):
            config = dataclasses.replace(
                CONFIG,
                allowed_servers=(first.peer_id, downstream.peer_id),
                server_to_server=hops,
                max_tokens_in_batch=128,
            )
            with RemoteSequenceManager([first.maddr], prefix, config, identity_path=identity) as manager:
                before = handoffs(pair, manager)
                results[hops] = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))(x, prompts)
                counted = {
                    (s.blocks, k): n - before[s.peer_id][k]
                    for s in pair
                    for k, n in handoffs(pair, manager)[s.peer_id].items()
                    if k != "bytes"
                }
            forward_handed, backward_handed = 2 * hops * (downstream is second), 2 * hops
            assert counted == {
                ((0, 2), "sent"): forward_handed,
                ((0, 2), "failed"): 2 * hops - forward_handed,
                ((0, 2), "received"): backward_handed,
                ((0, 2), "dropped"): 0,
                ((2, 4), "sent"): backward_handed,
                ((2, 4), "failed"): 0,
                ((2, 4), "received"): forward_handed,
                ((2, 4), "dropped"): 0,
            }, f"through {downstream.peer_id}, hops={hops}"
        jax.tree.map(np.testing.assert_array_equal, results[True], results[False])
        assert_matches(results[True], local_step(x, prompts))


@pytest.mark.parametrize(
    "maddr,message",
    [
        ("203.0.113.7:31337", "not a dialable multiaddr"),
        ("/ip4/203.0.113.7/tcp/0", "0 is not a port"),
        ("/ip4/0.0.0.0/tcp/31337", "where to listen, not an address peers can dial"),
        ("/ip4/::1/tcp/31337", "not an IPv4 address"),
        ("/ip6/203.0.113.7/tcp/31337", "not an IPv6 address"),
        ("/ip4/203.0.113/tcp/31337", "not an IP address"),
        ("/dns4//tcp/31337", "the host name is empty"),
        ("/ip4/203.0.113.7/udp/31337/quic", "not a dialable multiaddr"),
    ],
)
def test_announce_maddrs_no_peer_could_dial_are_refused_up_front(maddr, message, capsys):
    argv = ["--checkpoint", "llama", "--blocks", "0:4", "--dht-prefix", "x", "--new-swarm"]
    with pytest.raises(SystemExit) as exited:
        ServerConfig.from_args([*argv, "--announce-maddrs", "/ip4/203.0.113.7/tcp/1", maddr])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    config = ServerConfig.from_args([*argv, "--announce-maddrs", "/dns4/example.org/tcp/31337", "/ip6/::1/tcp/1"])
    assert config.announce_maddrs == ("/dns4/example.org/tcp/31337", "/ip6/::1/tcp/1")
    assert (config.use_relay, config.use_auto_relay) == (True, False)  # hivemind's defaults
    assert ServerConfig.from_args([*argv, "--use-auto-relay"]).use_auto_relay
    with pytest.raises(SystemExit):
        ServerConfig.from_args([*argv, "--no-relay", "--use-auto-relay"])
    assert "drop --no-relay" in capsys.readouterr().err
