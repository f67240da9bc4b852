"""Routing by the chain's expected time (the Petals paper's rule): round trips as measured, compute at the
announced throughput, fewest hops among equals, load spread among near-equals; round trips measured by pings."""

from __future__ import annotations

import collections
import random

import pytest

from jaxseq.client.errors import MissingBlocksError
from jaxseq.client.routing import DEFAULT_RTT, Span, route
from jaxseq.remote.records import ServerInfo, ServerRecord, ServerState


def server(peer: str, start: int, end: int, throughput: float = 1000.0, state=ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer, start, end, ServerInfo(state=state, throughput=throughput))


def test_equal_servers_give_the_fewest_hops():
    records = [server("whole", 0, 8), server("left", 0, 4), server("right", 4, 8)]
    for seed in range(20):
        assert route(records, 0, 8, rng=random.Random(seed)) == [Span("whole", 0, 8)]


def test_a_distant_server_loses_to_a_near_chain_and_wins_when_it_is_the_nearer():
    records = [server("far", 0, 8), server("left", 0, 4), server("right", 4, 8)]
    near = {"far": 0.3, "left": 0.01, "right": 0.01}
    assert route(records, 0, 8, rtt=near) == [Span("left", 0, 4), Span("right", 4, 8)]
    # round trips change (the pings' averages move): the route follows
    assert route(records, 0, 8, rtt={"far": 0.01, "left": 0.3, "right": 0.01}) == [Span("far", 0, 8)]


def test_compute_counts_by_tokens_and_throughput():
    records = [server("slow", 0, 8, throughput=100.0), server("fast1", 0, 4), server("fast2", 4, 8)]
    rtt = {"slow": 0.1, "fast1": 0.1, "fast2": 0.1}
    # one token: the extra round trip (100 ms) costs more than the slow server's extra compute (8 x (10 - 1) ms)
    assert route(records, 0, 8, rtt=rtt, tokens=1) == [Span("slow", 0, 8)]
    # a training batch: compute dominates
    assert route(records, 0, 8, rtt=rtt, tokens=1024) == [Span("fast1", 0, 4), Span("fast2", 4, 8)]


def test_unmeasured_servers_count_as_the_median_measured():
    records = [server("new", 0, 8), server("a", 0, 4), server("b", 4, 8)]
    # "new" is unmeasured: it counts as the median of the others (0.01), so one hop beats two
    assert route(records, 0, 8, rtt={"a": 0.01, "b": 0.01}) == [Span("new", 0, 8)]
    assert DEFAULT_RTT > 0  # with nothing measured, hops still cost: the fewest win (the first test)


def test_near_equal_servers_share_the_load():
    records = [server("a", 0, 8), server("b", 0, 8, throughput=950.0), server("c", 0, 8, throughput=500.0)]
    rng = random.Random(0)
    picked = collections.Counter(route(records, 0, 8, rtt={}, tokens=100, rng=rng)[0].peer for _ in range(200))
    assert set(picked) == {"a", "b"} and min(picked.values()) > 50  # c is 2x slower: never


def test_bans_and_missing_blocks():
    records = [server("a", 0, 4), server("b", 0, 4), server("c", 4, 8), server("off", 4, 8, state=ServerState.OFFLINE)]
    assert route(records, 0, 8, banned={"a": 1.0})[0] == Span("b", 0, 4)
    # every holder banned: the one banned longest ago, rather than no route
    assert route(records, 0, 8, banned={"a": 5.0, "b": 1.0})[0] == Span("b", 0, 4)
    with pytest.raises(MissingBlocksError, match="block 8"):
        route(records + [server("d", 10, 12)], 0, 12)


def test_the_manager_routes_by_pinged_round_trips(make_swarm):
    """A LocalSwarm's manager pings at each refresh (no distance in process): the measured round trips reach
    the route, and a server found unreachable by its ping counts as far away."""
    swarm, manager = make_swarm([(0, 4), (0, 2), (2, 4)])
    manager.run(manager.refresh())
    manager.run(manager._measure_round_trips())  # what the refresh started in the background, done here
    assert manager.round_trips == {"local-0": 0.0, "local-1": 0.0, "local-2": 0.0}
    assert manager.make_route(0, 4) == [Span("local-0", 0, 4)]
    swarm.servers[0].alive = False  # down, but still in the view until it is refreshed
    manager.run(manager._measure_round_trips())
    assert manager.round_trips["local-0"] == pytest.approx(0.2 * manager.config.connect_timeout)
    assert manager.make_route(0, 4) == [Span("local-1", 0, 2), Span("local-2", 2, 4)]
