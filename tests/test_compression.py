"""Wire compression through real servers: each codec's error on a training step (outputs, the inputs' and the
deep prompts' gradients) stays within the bound ``jaxseq.client.codecs.CODECS`` states; ``compression="auto"``
sends nothing compressed over a fast link, and compresses over a slow one (fewer bytes crossed it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.client.codecs import CODECS
from jaxseq.testing.launch import ServerProcess
from jaxseq.testing.link import Link, Network, Relay

from helpers import Swarms, random_inputs, rel_err, training_step

FAST = jaxseq.ClientConfig(shared_memory=False, deadline=60.0)
AUTO = dataclasses.replace(FAST, compression="auto", auto_compressions=("float16", "uniform8bit"))


@pytest.fixture(scope="module")
def swarm(checkpoint) -> Iterator[tuple[ServerProcess, str, Relay]]:
    """One server of every block behind a relay whose link is as fast as the host (the tests may slow it)."""
    with Network() as network, Swarms(checkpoint[0], network=network) as swarms:
        (server,), prefix = swarms.start([(0, 4)], link=Link())
        yield server, prefix, swarms.relays[server.peer_id]


@pytest.fixture(scope="module")
def exact(checkpoint, swarm):
    """An uncompressed training step through the server, its inputs, and the bytes it moved through the relay."""
    _, cfg, _ = checkpoint
    server, prefix, relay = swarm
    x, prompts = random_inputs(cfg, 8, 128, 3)
    with RemoteSequenceManager([server.maddr], prefix, FAST) as manager:
        before = crossed(relay)
        got = step_through(manager, x, prompts)
        return (x, prompts), got, crossed(relay) - before


def crossed(relay: Relay) -> int:
    return relay.to_server + relay.from_server


def step_through(manager: RemoteSequenceManager, x, prompts):
    return training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))(x, prompts)


def errors(got, want) -> tuple[float, float, float]:
    """Relative errors of the outputs, the inputs' gradient and the prompts' gradient."""
    ((_, out), (gx, gp)), ((_, out_ref), (gx_ref, gp_ref)) = got, want
    return rel_err(out, out_ref), rel_err(gx, gx_ref), rel_err(gp, gp_ref)


@pytest.mark.network
@pytest.mark.parametrize("codec", [name for name in CODECS if name != "none"])
def test_each_codec_stays_within_its_stated_error(swarm, exact, codec):
    server, prefix, _ = swarm
    (x, prompts), want, _ = exact
    config = jaxseq.ClientConfig(shared_memory=False, deadline=60.0, compression=codec)
    with RemoteSequenceManager([server.maddr], prefix, config) as manager:
        got = errors(step_through(manager, x, prompts), want)
        used = set(manager.codecs_used)
    assert used == {(server.peer_id, codec)}
    assert 0 < max(got) < CODECS[codec].max_rel_error, got  # > 0: the codec did compress


@pytest.mark.network
def test_auto_sends_uncompressed_over_a_fast_link(swarm, exact):
    server, prefix, _ = swarm
    (x, prompts), want, _ = exact
    with RemoteSequenceManager([server.maddr], prefix, AUTO) as manager:
        for _ in range(2):  # the second step chooses from what the first measured
            assert errors(step_through(manager, x, prompts), want) == (0.0, 0.0, 0.0)
        assert {codec for _, codec in manager.codecs_used} == {"none"}


@pytest.mark.network
def test_auto_compresses_over_a_slow_link_within_the_bound(swarm, exact):
    """The server behind a 10 Mbit/s link: calls before it is measured go uncompressed, the last step's compress."""
    server, prefix, relay = swarm
    (x, prompts), want, uncompressed = exact
    relay.link = Link(rtt=0.02, bandwidth=10e6)  # the client's connections, opened after this, see it from the start
    try:
        with RemoteSequenceManager([server.maddr], prefix, AUTO) as manager:
            for _ in range(3):
                before = crossed(relay)
                got = step_through(manager, x, prompts)
            last_step = crossed(relay) - before
            chosen = manager.codecs_used
    finally:
        relay.link = Link()
    assert chosen[server.peer_id, "none"] >= 1  # the first forward at least: nothing measured yet
    assert chosen[server.peer_id, "uniform8bit"] >= 2
    assert last_step < 0.3 * uncompressed  # both ways of both calls: 8 bits a float, and a codebook

    assert max(errors(got, want)) < CODECS["uniform8bit"].max_rel_error


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(compression="zstd"), "unknown compression 'zstd'"),
        (dict(compression="auto", auto_compressions=()), "auto_compressions must name some of"),
        (dict(compression="auto", auto_compressions=("none",)), "auto_compressions must name some of"),
        (dict(compression="auto", auto_compressions="float16"), "auto_compressions must name some of"),
    ],
)
def test_bad_compression_settings_are_refused_up_front(fields, message):
    with pytest.raises(ValueError, match=message):
        jaxseq.ClientConfig(**fields)
