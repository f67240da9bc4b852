"""Real servers that lie or hang, private swarms: jaxseq keeps working, loses nothing and trusts no one."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import jax
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.launch import ServerProcess

from helpers import assert_matches, rel_err, training_step

pytestmark = pytest.mark.network
TOL = 1e-5
LYING_SERVER = (sys.executable, str(Path(__file__).parent / "programs" / "lying_server.py"))


@pytest.fixture
def servers(checkpoint):
    started: list[ServerProcess] = []

    def start(blocks, prefix, peers=None, args=(), command=None):
        kwargs = {"command": command} if command else {}
        server = ServerProcess(str(checkpoint[0]), blocks, prefix, peers, ["--update-period", "5", *args], **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def test_lying_and_hanging_servers_are_caught(checkpoint, servers):
    _, cfg, params = checkpoint
    honest = [servers((0, 4), "liars", args=["--throughput", "1000"]).wait_ready()]
    honest.append(servers((0, 4), "liars", [honest[0].maddr], ["--throughput", "1000"]))
    liars = {
        lie: servers((0, 4), "liars", [honest[0].maddr], command=(*LYING_SERVER, lie))
        for lie in ("nan", "shape", "noise", "hang")
    }
    for server in [honest[1], *liars.values()]:
        server.wait_ready()
    request_timeout = 10.0  # well above a tiny model's first compile on a loaded 2-core machine
    # Over the wire (Petals' protocol), where a server can send anything back; through same-host shared
    # memory a reply can't even take another shape (the client sizes the result segments).
    config = jaxseq.ClientConfig(
        verify_fraction=1.0,
        request_timeout=request_timeout,
        ban_timeout=0.5,
        min_backoff=0.05,
        max_backoff=0.2,
        max_retries=50,
        deadline=300.0,
        shared_memory=False,
    )
    x = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
    prompts = 0.5 * jax.random.normal(jax.random.key(1), (4, 2, 2, cfg.hidden_size))
    local = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))(x, prompts)
    with RemoteSequenceManager([honest[0].maddr], "liars", config) as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        peer = {lie: server.peer_id for lie, server in liars.items()}
        contacted = lambda lie: sum(n for (p, _), n in manager.outcomes.items() if p == peer[lie])  # noqa: E731
        started = time.monotonic()
        for _ in range(30):  # until every liar has been routed to at least once
            assert_matches(step(x, prompts), local)
            if all(contacted(lie) for lie in liars):
                break
        elapsed = time.monotonic() - started
        assert all(contacted(lie) for lie in liars), manager.outcomes
        outcomes = manager.outcomes
        for lie in ("nan", "shape"):  # caught and banned in 100% of calls
            assert outcomes[peer[lie], "ok"] == 0 and outcomes[peer[lie], "faulty"] == contacted(lie)
        # The noisy one answers plausibly; each of its answers was cross-checked and outvoted.
        assert outcomes[peer["noise"], "ok"] >= 1
        assert outcomes[peer["noise"], "outvoted"] == outcomes[peer["noise"], "ok"]
        # The hanging one never answered; each call cost at most the request timeout (the rest of the
        # run, with every step's cross-checks, takes a few seconds here).
        assert outcomes[peer["hang"], "ok"] == 0 and outcomes[peer["hang"], "unreachable"] == contacted("hang")
        assert elapsed < contacted("hang") * request_timeout + 30.0


def test_client_allow_list_routes_only_to_listed_servers(checkpoint, servers):
    _, cfg, _ = checkpoint
    listed = servers((0, 4), "private", args=["--throughput", "1"]).wait_ready()
    unlisted = servers((0, 4), "private", [listed.maddr], ["--throughput", "1e6"]).wait_ready()  # faster: preferred
    x = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
    config = jaxseq.ClientConfig(allowed_servers=[listed.peer_id])
    with RemoteSequenceManager([unlisted.maddr], "private", config) as manager:
        forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
        for _ in range(5):
            forward(x).block_until_ready()
        assert {r.peer for r in manager.records} == {listed.peer_id}
        assert manager.server_info(listed.peer_id)["jaxseq_computed"]["forward"] == 5
    with RemoteSequenceManager([unlisted.maddr], "private") as observer:
        computed = observer.server_info(unlisted.peer_id)["jaxseq_computed"]
        assert computed == {"forward": 0, "backward": 0, "inference": 0}


def test_server_allow_list_refuses_other_clients(checkpoint, servers):
    _, cfg, _ = checkpoint
    bootstrap = servers((0, 1), "guarded", args=["--throughput", "1"]).wait_ready()
    x = jax.random.normal(jax.random.key(0), (1, 4, cfg.hidden_size))
    config = jaxseq.ClientConfig(max_retries=0, min_backoff=0.01)
    with (
        RemoteSequenceManager([bootstrap.maddr], "guarded", config, num_blocks=4) as friend,
        RemoteSequenceManager([bootstrap.maddr], "guarded", config, num_blocks=4) as stranger,
    ):
        args = ["--allowed-clients", friend.peer_id, "--log-level", "INFO"]
        guarded = servers((0, 4), "guarded", [bootstrap.maddr], args).wait_ready()
        only_guarded = jaxseq.ClientConfig(allowed_servers=[guarded.peer_id], max_retries=0)
        for manager in (friend, stranger):
            manager.config = only_guarded  # the friend's id was needed to start the server; now go private
            manager.run(manager.refresh())
            assert {r.peer for r in manager.records} == {guarded.peer_id}
        y = jax.jit(lambda x: jaxseq.remote_sequential(x, None, friend))(x)
        assert y.shape == x.shape
        with pytest.raises(Exception, match="not on this server's client allow-list"):
            jax.jit(lambda x: jaxseq.remote_sequential(x, None, stranger))(x).block_until_ready()
        # The refusal came before any compute: only the friend's request was computed.
        assert friend.server_info(guarded.peer_id)["jaxseq_computed"]["forward"] == 1
        # and the server logged it with the reason
        assert f"refused rpc_forward from {stranger.peer_id}: PermissionError" in guarded.log_tail(100_000)


def test_a_burst_gets_busy_replies_that_clients_honour(checkpoint, servers):
    _, cfg, params = checkpoint
    server = servers((0, 4), "burst", args=["--throughput", "1", "--max-queue", "1"]).wait_ready()
    config = jaxseq.ClientConfig(min_backoff=0.05, max_backoff=0.5, max_retries=100, ban_timeout=0.0)
    xs = [jax.random.normal(jax.random.key(i), (4, 64, cfg.hidden_size)) for i in range(8)]
    results: dict[int, object] = {}
    with RemoteSequenceManager([server.maddr], "burst", config) as manager:
        forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
        forward(xs[0]).block_until_ready()  # compiled on both sides before the burst

        def call(i):
            results[i] = forward(xs[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert manager.outcomes[server.peer_id, "error"] >= 1  # some were told "server busy" ...
        assert server.process.poll() is None
    for i, x in enumerate(xs):  # ... and retried until answered: all correct
        assert rel_err(results[i], jaxseq.local_sequential(cfg, params, x)) < TOL
