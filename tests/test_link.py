"""The network-conditions harness itself: what crosses a relay arrives intact, after the round-trip time and at
the bandwidth that were set (measured within 10%), both ways; connections wait for a server not yet known."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from jaxseq.testing.link import Link, Network, Relay

TOLERANCE = 0.10


@pytest.fixture
def network() -> Iterator[Network]:
    with Network() as network:
        yield network


def connect_through(relay: Relay, connections: int = 1) -> list[tuple[socket.socket, socket.socket]]:
    """Client sockets and the server's ends of their connections, through ``relay``."""
    pairs = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        relay.forward_to(listener.getsockname()[1])
        listener.settimeout(10.0)
        for _ in range(connections):
            client = socket.create_connection(("127.0.0.1", relay.port))
            pairs.append((client, listener.accept()[0]))
    for end in (end for pair in pairs for end in pair):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end.settimeout(30.0)
    return pairs


def recv_exactly(sock: socket.socket, nbytes: int) -> tuple[bytes, float, float]:
    """``nbytes`` from ``sock``, and when the first and the last of them came. Received into one buffer made
    beforehand: a new buffer per recv (page faults for each MiB) made this receiver slower than a 100 Mbit/s
    link on a busy VM, which then measured the receiver, not the link."""
    buffer, got, first = bytearray(nbytes), 0, 0.0
    view = memoryview(buffer)
    while got < nbytes:
        count = sock.recv_into(view[got:], min(nbytes - got, 1 << 20))
        if not count:
            raise ConnectionError(f"closed after {got} of {nbytes} bytes")
        first = first or time.perf_counter()
        got += count
    last = time.perf_counter()
    return bytes(buffer), first, last


def round_trip(a: socket.socket, b: socket.socket) -> float:
    start = time.perf_counter()
    a.sendall(b"p")
    recv_exactly(b, 1)
    b.sendall(b"q")
    recv_exactly(a, 1)
    return time.perf_counter() - start


def throughput(sender: socket.socket, receiver: socket.socket, nbytes: int) -> float:
    """Bits per second at which ``nbytes`` arrive, from the first arrival to the last (the one-way delay
    before the first is not bandwidth); checks that they arrive intact."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, np.uint8).tobytes()
    sending = threading.Thread(target=sender.sendall, args=(data,))
    sending.start()
    try:
        got, first, last = recv_exactly(receiver, nbytes)
    finally:
        sending.join()
    assert got == data
    return (nbytes - len(got[:1])) * 8 / (last - first)


@pytest.mark.parametrize("link", [Link(rtt=0.05, bandwidth=20e6), Link(rtt=0.1, bandwidth=100e6)], ids=str)
def test_round_trip_time_and_bandwidth_are_as_set_both_ways(network, link):
    relay = network.relay(link)
    [(client, server)] = connect_through(relay)
    with client, server:
        rtts = [round_trip(client, server) for _ in range(15)]
        assert abs(statistics.median(rtts) - link.rtt) < TOLERANCE * link.rtt, rtts
        # About a second of transfer each way: long enough that the one chunk of pacing granularity and
        # a late wake-up of the relay are noise. At 100 ms round trip this many bytes in flight also show
        # a delay line: one chunk at a time (stop-and-wait) would reach 32 KiB per 50 ms, 5 Mbit/s.
        assert link.bandwidth is not None
        nbytes = int(link.bandwidth / 8)
        up = throughput(client, server, nbytes)
        down = throughput(server, client, nbytes)
        for measured in (up, down):
            assert abs(measured - link.bandwidth) < TOLERANCE * link.bandwidth, (up, down)
    assert relay.to_server == relay.from_server == 15 + nbytes


def test_the_bandwidth_is_shared_by_every_connection_through_a_link(network):
    """The link is the server's: two transfers at once get all of it together, not each."""
    link = Link(rtt=0.02, bandwidth=40e6)
    relay = network.relay(link)
    pairs = connect_through(relay, 2)
    nbytes = int(link.bandwidth / 8 / 2)
    results: list[float] = []
    threads = [threading.Thread(target=lambda p=p: results.append(throughput(*p, nbytes))) for p in pairs]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for client, server in pairs:
        client.close(), server.close()
    assert len(results) == 2
    together = 2 * nbytes * 8 / (elapsed - link.one_way)
    assert abs(together - link.bandwidth) < TOLERANCE * link.bandwidth, (together, results)


def test_a_connection_waits_for_its_server_to_be_known(network):
    relay = network.relay(Link(rtt=0.01))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(("127.0.0.1", relay.port))
        client.sendall(b"early")  # before the relay knows where to
        relay.forward_to(listener.getsockname()[1])
        listener.settimeout(10.0)
        server, _ = listener.accept()
        with client, server:
            server.settimeout(10.0)
            assert recv_exactly(server, 5)[0] == b"early"
    with pytest.raises(RuntimeError, match="already forwards"):
        relay.forward_to(1)


def test_a_relay_takes_new_conditions_on_an_open_connection(network):
    relay = network.relay(Link(rtt=0.01))
    [(client, server)] = connect_through(relay)
    with client, server:
        for rtt in (0.1, 0.05):
            relay.link = Link(rtt=rtt)
            measured = statistics.median(round_trip(client, server) for _ in range(7))
            assert abs(measured - rtt) < TOLERANCE * rtt, (rtt, measured)


def test_links_that_cannot_be_are_refused():
    with pytest.raises(ValueError, match="rtt"):
        Link(rtt=-0.01)
    with pytest.raises(ValueError, match="bandwidth"):
        Link(bandwidth=0)
