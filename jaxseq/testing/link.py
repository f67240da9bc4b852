"""Network conditions for tests and benchmarks: every server behind its own link, a TCP relay on 127.0.0.1
that delays and paces the bytes crossing it, both ways.

A server started with ``--announce-maddrs`` set to its relay's address (``Relay.server_args``) is dialled
there by clients and by other servers alike, so whatever reaches it crosses its link; the relay counts the
bytes, which shows that nothing went around it. The relay is a delay line, not stop-and-wait: each chunk
leaves once the link has had time to send it at ``bandwidth`` (a queue shared by every connection through
that link, per direction) and arrives ``rtt / 2`` later, however many chunks are in flight.

A connection between two servers crosses the link of the one that was dialled only, not both: each link
stands for the path between that server and everyone else.

Example:
    >>> import socket
    >>> with Network() as network:
    ...     relay = network.relay(Link(rtt=0.02, bandwidth=50e6))
    ...     with socket.create_server(("127.0.0.1", 0)) as target:
    ...         relay.forward_to(target.getsockname()[1])
    ...         with socket.create_connection(("127.0.0.1", relay.port)) as client:
    ...             server, _ = target.accept()
    ...             client.sendall(b"ping")
    ...             server.recv(4)
    ...             server.close()
    ...     relay.to_server
    b'ping'
    4
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import selectors
import statistics
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from jaxseq.testing.launch import ServerProcess

T = TypeVar("T")

CHUNK = 32 * 1024  # what a relay reads at once: small enough that pacing is smooth at 20 Mbit/s
CONNECT_TIMEOUT = 60.0  # how long a connection waits for a relay's server to be known and to answer


@dataclasses.dataclass(frozen=True)
class Link:
    """A link's conditions, the same both ways: ``rtt`` seconds of round trip (``rtt / 2`` each way) and
    ``bandwidth`` bits per second in each direction (None: as fast as the host goes).

    Example:
        >>> link = Link(rtt=0.1, bandwidth=100e6)
        >>> link.one_way, link.send_time(12_500_000), link.capacity
        (0.05, 1.0, 1250000.0)
    """

    rtt: float = 0.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.rtt < 0:
            raise ValueError(f"Link.rtt must be non-negative, got {self.rtt}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"Link.bandwidth must be positive (or None: unlimited), got {self.bandwidth}")

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    @property
    def capacity(self) -> float:
        """Bytes the link holds, on the wire and queued, before the sender must wait: a round trip's worth at
        its bandwidth, 1 MiB at least. Unbounded without a bandwidth limit: any bound would cap throughput
        at bound / one-way delay, a bandwidth limit after all."""
        return math.inf if self.bandwidth is None else max(2**20, self.bandwidth * self.rtt / 8)

    def send_time(self, nbytes: int) -> float:
        """Seconds the link takes to put ``nbytes`` on the wire."""
        return 0.0 if self.bandwidth is None else nbytes * 8 / self.bandwidth


class _Direction:
    """One direction of a link: its transmit queue, shared by every connection through it, and its byte count."""

    def __init__(self, link: Link):
        self.link = link
        self.busy_until = 0.0
        self.bytes = 0

    def arrival(self, nbytes: int, now: float) -> float:
        """When a chunk that is ready at ``now`` reaches the far end. Scheduled from the link's own clock, not
        from when earlier chunks actually left, so a late wake-up of the relay costs no bandwidth."""
        self.busy_until = max(now, self.busy_until) + self.link.send_time(nbytes)
        return self.busy_until + self.link.one_way


class _Timer:
    """Sleeps that end when they are due. This host's timers fire late in proportion to the sleep (2-8% through
    select() in a VM, varying by the hour: 1-4 ms of a 50 ms delay), which would make every link that much
    longer than set: each sleep is shortened by the timer's lateness, the median of the last sleeps' (a busy
    host wakes a sleeper later still now and then; the median leaves such wake-ups out, so they do not make the
    links after them shorter than set)."""

    MIN_MEASURED = 0.01  # shorter sleeps are late by a fixed ~0.1 ms rather than in proportion: not measured

    def __init__(self) -> None:
        self.observed: collections.deque[float] = collections.deque(maxlen=15)  # overshoots, as fractions
        self.lateness = 0.0  # their median: what each sleep is shortened by, as a fraction of it

    async def sleep_until(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        if (wait := due - loop.time()) <= 0:
            return
        asked, start = wait / (1 + self.lateness), loop.time()
        await asyncio.sleep(asked)
        if asked >= self.MIN_MEASURED:
            self.observed.append((loop.time() - start) / asked - 1)
            self.lateness = max(0.0, statistics.median(self.observed))


class Relay:
    """Listens on 127.0.0.1 (a port the OS picked) and forwards every connection to the local port given by
    ``forward_to``, through its ``link`` (which may be changed at any time). Connections that come before
    that wait (at most ``CONNECT_TIMEOUT``).
    ``to_server`` and ``from_server`` count the bytes delivered each way. Made by ``Network.relay``."""

    def __init__(self, network: Network, link: Link, server: asyncio.Server):
        self.port: int = server.sockets[0].getsockname()[1]
        self._network = network
        self._server = server
        self._target: asyncio.Future[int] = network.loop.create_future()
        self._up, self._down = _Direction(link), _Direction(link)
        self.connections = 0

    @property
    def link(self) -> Link:
        return self._up.link

    @link.setter
    def link(self, link: Link) -> None:
        """New conditions, from the next chunk on. The ends of connections already open keep what they
        learnt of the old ones: p2pd's multiplexer grows its flow-control windows by the round trip it
        measured when the connection opened (and again only now and then). To measure under new
        conditions, open new connections."""
        self._up.link = self._down.link = link

    @property
    def maddr(self) -> str:
        """The address to announce for the server behind this relay."""
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    @property
    def server_args(self) -> list[str]:
        """``jaxseq-server`` arguments that put a server behind this relay: other peers dial the relay's
        address, and tensors go over the wire rather than through same-host shared memory."""
        return ["--announce-maddrs", self.maddr, "--no-shared-memory"]

    @property
    def to_server(self) -> int:
        return self._up.bytes

    @property
    def from_server(self) -> int:
        return self._down.bytes

    def attach(self, server: ServerProcess) -> None:
        """Forward to the port ``server`` (ready, started with ``server_args``) listens on."""
        self.forward_to(listening_port(server.process.pid))

    def forward_to(self, port: int) -> None:
        """Where the server listens: connections waiting for it go ahead."""
        self._network.call(self._set_target(port))

    async def _set_target(self, port: int) -> None:
        if self._target.done():
            raise RuntimeError(f"relay {self.port} already forwards to port {self._target.result()}")
        self._target.set_result(port)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Network.close cancels the connections' tasks: ending quietly then spares Python 3.11's
        # start_server from logging each cancelled handler as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(client_reader, client_writer)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            port = await asyncio.wait_for(asyncio.shield(self._target), CONNECT_TIMEOUT)
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            client_writer.close()
            return
        try:
            await asyncio.gather(
                _pipe(client_reader, server_writer, self._up, self._network.timer),
                _pipe(server_reader, client_writer, self._down, self._network.timer),
            )
        finally:
            for writer in (client_writer, server_writer):
                writer.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction, timer: _Timer
) -> None:
    """Copy ``reader`` to ``writer`` through a delay line: a reader task stamps each chunk with its arrival
    time, this task delivers them in order when due. The line holds at most the link's ``capacity``, so a
    fast sender meets backpressure as at a real link's queue."""
    loop = asyncio.get_running_loop()
    line: collections.deque[tuple[float, bytes]] = collections.deque()
    queued = 0
    changed = asyncio.Event()

    async def read() -> None:
        nonlocal queued
        try:
            while data := await reader.read(CHUNK):
                while queued >= direction.link.capacity:
                    changed.clear()
                    await changed.wait()
                line.append((direction.arrival(len(data), loop.time()), data))
                queued += len(data)
                changed.set()
        except OSError:
            pass  # a reset ends the stream like an EOF
        line.append((0.0, b""))
        changed.set()

    reading = asyncio.ensure_future(read())
    try:
        while True:
            while not line:
                changed.clear()
                await changed.wait()
            due, data = line.popleft()
            if not data:
                break
            await timer.sleep_until(due)
            direction.bytes += len(data)
            writer.write(data)
            await writer.drain()
            queued -= len(data)
            changed.set()
        if writer.can_write_eof():
            writer.write_eof()  # a half-close crosses the link too
    except OSError:
        pass  # the far end went away: nothing left to deliver to
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


def listening_port(pid: int) -> int:
    """The one TCP port that process ``pid`` or its descendants listen on: a ``jaxseq-server``'s p2pd (a child
    of its DHT process; hivemind does not say which port it took when given tcp/0)."""
    import psutil  # a development dependency, as this harness is

    root = psutil.Process(pid)
    ports = {
        conn.laddr.port
        for process in [root, *root.children(recursive=True)]
        for conn in process.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    if len(ports) != 1:
        raise RuntimeError(f"process {pid} and its children listen on TCP ports {sorted(ports)}, not on one")
    return ports.pop()


class Network:
    """Relays on an event loop of their own, in a background thread, so that they keep time while the
    caller computes. Leaving the ``with`` block closes every relay and their connections."""

    def __init__(self) -> None:
        # select() takes its timeout in microseconds; epoll, asyncio's default, rounds it up to a millisecond,
        # which would make every delivery up to 1 ms late (a 5 ms round trip measured 6.8 ms). select()
        # handles file descriptors below 1024 only: plenty for a harness's few relays.
        self.loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self.loop.run_forever, name="jaxseq-network", daemon=True)
        self._thread.start()
        self.relays: list[Relay] = []
        self.timer = _Timer()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the relays' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def relay(self, link: Link) -> Relay:
        """A new relay with ``link``; call ``forward_to`` once its server listens."""
        relay = self.call(self._start_relay(link))
        self.relays.append(relay)
        return relay

    async def _start_relay(self, link: Link) -> Relay:
        holder: list[Relay] = []
        server = await asyncio.start_server(lambda r, w: holder[0]._accept(r, w), "127.0.0.1", 0)
        holder.append(Relay(self, link, server))
        return holder[0]

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _close(self) -> None:
        for relay in self.relays:
            relay._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
