"""Real jaxseq-server processes on 127.0.0.1 behind remote_sequential: equality with local, streaming,
SIGKILL mid-training, a replacement joining, missing blocks, SIGTERM."""

from __future__ import annotations

import gc
import os
import threading
import time

import jax
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.remote import dht
from jaxseq.remote.records import ServerState
from jaxseq.testing.launch import ServerProcess

from helpers import assert_matches, random_inputs, training_step

pytestmark = pytest.mark.network
FAST_RETRY = dict(min_backoff=0.2, max_backoff=1.0, request_timeout=20.0, ban_timeout=5.0)


@pytest.fixture
def local_step(checkpoint):
    _, cfg, params = checkpoint
    return training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))


def test_four_servers_equal_local_with_streaming(checkpoint, start_servers, local_step):
    _, cfg, _ = checkpoint
    servers, prefix = start_servers([(0, 2), (1, 3), (2, 4), (0, 4)])
    # Over the wire, not same-host shared memory: this is Petals' protocol, streaming included.
    # One micro-batch whatever the pings say: under load a loopback ping can pass stream_min_rtt, and the long-link
    # gate would cut the call into many small unary ones (that gate is tests/test_remote_sequential.py's).
    config = jaxseq.ClientConfig(max_tokens_in_batch=1 << 20, stream_bytes=None, shared_memory=False, **FAST_RETRY)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        assert manager.num_blocks == 4
        assert {(r.start, r.end) for r in manager.records} == {(0, 2), (1, 3), (2, 4), (0, 4)}
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        for batch, seq, prompt_len in [(2, 7, 3), (1, 1, 0)]:
            x, prompts = random_inputs(cfg, batch, seq, prompt_len)
            assert_matches(step(x, prompts), local_step(x, prompts))
        # 8 MiB of hidden states in one micro-batch: requests and replies are streamed both ways.
        x, prompts = random_inputs(cfg, 512, 128, 4)
        assert x.nbytes >= 8 * 2**20
        assert_matches(step(x, prompts), local_step(x, prompts))
        assert [t.transport for t in manager.timings][-2:] == ["stream", "stream"]


@pytest.fixture(scope="module")
def cacheless_server(module_servers):
    """A server whose activation cache is too small for any forward, shared by both cases below (each counts the
    cache hits and misses of its own calls)."""
    return module_servers([(0, 4)], extra_args=["--cache-mb", "0.001"])


@pytest.mark.parametrize("shared_memory", [True, False])
def test_backward_sends_inputs_after_all_when_the_server_kept_none(
    checkpoint, cacheless_server, local_step, shared_memory
):
    """A server whose cache is too small for any forward answers a backward without inputs with a
    cache miss; the client sends the inputs after all, and blames nobody."""
    _, cfg, _ = checkpoint
    servers, prefix = cacheless_server
    config = jaxseq.ClientConfig(shared_memory=shared_memory, **FAST_RETRY)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        cache_before = manager.server_info(servers[0].peer_id)["jaxseq_cache"]  # the other case's, if it ran
        x, prompts = random_inputs(cfg, 2, 7, 3)
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        for _ in range(2):
            assert_matches(step(x, prompts), local_step(x, prompts))
        backward_bytes = [t.bytes_sent for t in manager.timings if t.stage == "backward"]
        assert backward_bytes == [x.nbytes * 2 + prompts.nbytes] * 2  # inputs, grad outputs and prompts
        cache = manager.server_info(servers[0].peer_id)["jaxseq_cache"]
        assert {key: cache[key] - cache_before[key] for key in cache} == {"hits": 0, "misses": 2}
        assert set(outcome for _, outcome in manager.outcomes) == {"ok"} and manager.retries == 0


def test_sigkill_mid_training_loses_no_step(checkpoint, start_servers, local_step):
    _, cfg, _ = checkpoint
    servers, prefix = start_servers([(0, 4), (0, 2), (2, 4)])
    config = jaxseq.ClientConfig(deadline=60.0, **FAST_RETRY)
    x, prompts = random_inputs(cfg, 3, 9, 2)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        completed = 0
        for i in range(6):
            if i == 2:
                servers[0].kill()  # the server holding every block, which routing prefers
            start = time.monotonic()
            assert_matches(step(x, p := prompts * (1 + 0.1 * i)), local_step(x, p))
            assert time.monotonic() - start < config.deadline
            completed += 1
        assert completed == 6
        assert manager.retries >= 1


def test_replacement_joining_while_client_retries(checkpoint, start_servers, local_step):
    _, cfg, _ = checkpoint
    servers, prefix = start_servers([(0, 2), (2, 4)])
    config = jaxseq.ClientConfig(deadline=120.0, max_retries=1000, **FAST_RETRY)
    x, prompts = random_inputs(cfg, 2, 5, 1)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        assert_matches(step(x, prompts), local_step(x, prompts))
        servers[1].kill()  # the only holder of blocks 2:4
        replacement: list[ServerProcess] = []
        joiner = threading.Thread(
            target=lambda: replacement.extend(start_servers([(2, 4)], prefix, [servers[0].maddr])[0])
        )
        joiner.start()
        try:
            assert_matches(step(x, prompts), local_step(x, prompts))
        finally:
            joiner.join()
        assert replacement and any(r.peer == replacement[0].peer_id for r in manager.records)


def test_only_server_for_a_block_killed_gives_missing_blocks(checkpoint, start_servers):
    _, cfg, _ = checkpoint
    servers, prefix = start_servers([(0, 3), (3, 4)])
    deadline = 8.0
    config = jaxseq.ClientConfig(deadline=deadline, max_retries=1000, **FAST_RETRY)
    x, _ = random_inputs(cfg, 1, 4, 0)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
        forward(x).block_until_ready()
        servers[1].kill()
        start = time.monotonic()
        with pytest.raises(jaxseq.MissingBlocksError, match=r"no reachable server holds block 3") as caught:
            with jaxseq.swarm_errors(manager):
                forward(x).block_until_ready()
        assert time.monotonic() - start < deadline + 2.0
        assert caught.value.block == 3 and "MissingBlocksError" in str(caught.value.__cause__)  # JAX's error


def test_sigterm_leaves_the_dht_and_exits_zero(checkpoint, start_servers):
    servers, prefix = start_servers([(0, 4), (0, 4)])
    leaving, staying = servers
    with RemoteSequenceManager([staying.maddr], prefix, jaxseq.ClientConfig(**FAST_RETRY)) as manager:
        assert {r.peer for r in manager.records} == {leaving.peer_id, staying.peer_id}
        assert leaving.terminate() == 0
        assert not leaving.group_alive()  # its DHT process and p2pd are gone too
        manager.run(manager.refresh())
        online = {r.peer for r in manager.records if r.info.state == ServerState.ONLINE}
        assert online == {staying.peer_id}  # announced OFFLINE: no need to wait for expiry
        assert all(span.peer == staying.peer_id for span in manager.make_route(0, 4))


def test_the_dht_process_never_finalizes_what_it_inherited(tmp_path):
    """The DHT runs in a forked child. Garbage its parent had not collected yet (JAX or torch buffers)
    must not be finalized there, through runtimes whose threads the fork did not copy: on a GPU that
    aborted the child."""
    marker, parent, finalized_here = tmp_path / "finalized-by", os.getpid(), []

    class Inherited:
        def __del__(self):
            if os.getpid() == parent:
                finalized_here.append(parent)
            else:
                marker.write_text(str(os.getpid()))

    gc.collect()
    gc.disable()  # so that the cycle below is still uncollected garbage when the DHT forks
    cycle = Inherited()
    cycle.me = cycle
    del cycle
    gc.enable()
    node = dht.start_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert node.is_alive()
        child = node.pid
        node.run_coroutine(_collect_in_the_dht_process)
    finally:
        node.shutdown()
    assert not marker.exists(), f"the DHT process {child} finalized an object it inherited"
    gc.collect()
    assert finalized_here == [parent]  # the parent's collector sees it again after the fork


async def _collect_in_the_dht_process(dht, node) -> int:
    return gc.collect()
