"""``jaxseq monitor``: a live web page of a swarm, like Petals' health monitor: which servers hold which blocks,
each server's health, throughput, cache room, round trip from the monitor, version, family, dtype and
adapters, and the blocks that no live server holds. The same data is JSON at ``/api/v1/state``.

A server's health: ``live`` (announced online and answers), ``joining`` (announced, still loading),
``unreachable`` (announced online, but does not answer the monitor), ``gone`` (announced offline, or its
record left the DHT; shown for ``forget_after`` seconds after it was last seen, then dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from jaxseq.client.remote_manager import RemoteSequenceManager
from jaxseq.client.status import ServerStatus, swarm_status

logger = logging.getLogger(__name__)

STATE_PATH = "/api/v1/state"


@dataclasses.dataclass(frozen=True)
class Sighting:
    """A server's span as the monitor last saw it, its health now, and when (Unix time) it was last in the
    DHT."""

    status: ServerStatus
    health: str
    last_seen: float


def health_of(status: ServerStatus) -> str:
    """A present record's health: ``gone`` when announced offline, ``joining`` while it loads, else ``live`` or
    ``unreachable`` by whether it answered."""
    if status.state == "OFFLINE":
        return "gone"
    if status.state == "JOINING":
        return "joining"
    return "live" if status.latency is not None else "unreachable"


def watch(
    previous: Mapping[tuple[str, int, int], Sighting], rows: Sequence[ServerStatus], now: float, forget_after: float
) -> dict[tuple[str, int, int], Sighting]:
    """The sightings after a look at the swarm that found ``rows``: spans no longer in the DHT turn ``gone``,
    and are dropped ``forget_after`` seconds after they were last seen (so memory stays bounded).

    Example:
        >>> row = ServerStatus("QmA", 0, 2, "ONLINE", 100.0, "2.2.0", 0.002)
        >>> seen = watch({}, [row], now=10.0, forget_after=60.0)
        >>> [s.health for s in seen.values()]
        ['live']
        >>> [(s.health, s.last_seen) for s in watch(seen, [], now=20.0, forget_after=60.0).values()]
        [('gone', 10.0)]
        >>> watch(seen, [], now=71.0, forget_after=60.0)
        {}
    """
    found = {(r.peer, r.start, r.end): Sighting(r, health_of(r), now) for r in rows}
    missing = {
        key: dataclasses.replace(sighting, health="gone")
        for key, sighting in previous.items()
        if key not in found and now - sighting.last_seen < forget_after
    }
    return {**found, **missing}


def state_json(
    sightings: Mapping[tuple[str, int, int], Sighting], model: str, num_blocks: int, updated: float | None
) -> dict[str, Any]:
    """What ``/api/v1/state`` returns: the model, every sighting (by first block, then peer), and the blocks
    no live server holds.

    Example:
        >>> seen = watch({}, [ServerStatus("QmA", 0, 2, "ONLINE", 100.0, "2.2.0", 0.002)], 10.0, 60.0)
        >>> state = state_json(seen, "my-llama", 4, updated=10.0)
        >>> state["uncovered_blocks"], state["servers"][0]["blocks"], state["servers"][0]["rtt_ms"]
        ([2, 3], [0, 2], 2.0)
    """
    servers = sorted(sightings.values(), key=lambda s: (s.status.start, s.status.end, s.status.peer))
    covered = {b for s in servers if s.health == "live" for b in range(s.status.start, s.status.end)}
    return {
        "model": model,
        "num_blocks": num_blocks,
        "updated": updated,
        "uncovered_blocks": [b for b in range(num_blocks) if b not in covered],
        "servers": [
            {
                "peer": s.status.peer,
                "name": s.status.public_name,
                "blocks": [s.status.start, s.status.end],
                "health": s.health,
                "announced_state": s.status.state,
                "throughput": s.status.throughput,
                "cache_tokens_left": s.status.cache_tokens_left,
                "rtt_ms": None if s.status.latency is None else round(1000 * s.status.latency, 1),
                "version": s.status.version,
                "family": s.status.family,
                "dtype": s.status.dtype,
                "adapters": list(s.status.adapters),
                "last_seen": s.last_seen,
            }
            for s in servers
        ],
    }


def monitor_app(manager: RemoteSequenceManager, refresh_seconds: float = 5.0, forget_after: float = 600.0) -> Starlette:
    """The monitor's web app: looks at the swarm every ``refresh_seconds`` (first before it serves), and serves
    the page at ``/`` and the state at ``/api/v1/state``."""
    if refresh_seconds <= 0 or forget_after <= 0:
        raise ValueError(f"refresh_seconds and forget_after must be positive, got {refresh_seconds}, {forget_after}")
    model, num_blocks = manager.dht_prefix, manager.num_blocks
    sightings: dict[tuple[str, int, int], Sighting] = {}
    current = state_json(sightings, model, num_blocks, None)
    page = (
        files("jaxseq.web").joinpath("monitor.html").read_text().replace("{{REFRESH_MS}}", str(refresh_seconds * 1000))
    )

    async def look() -> None:
        nonlocal sightings, current
        try:
            rows = await asyncio.to_thread(swarm_status, manager)
        except Exception as error:  # the swarm may be briefly unreachable: keep showing the last look
            logger.warning("looking at the swarm failed, showing the last look: %s: %s", type(error).__name__, error)
            return
        now = time.time()
        sightings = watch(sightings, rows, now, forget_after)
        current = state_json(sightings, model, num_blocks, now)

    async def keep_looking() -> None:
        while True:
            await asyncio.sleep(refresh_seconds)
            await look()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await look()
        task = asyncio.create_task(keep_looking())
        try:
            yield
        finally:
            task.cancel()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(current, headers={"Cache-Control": "no-store"})

    return Starlette(routes=[Route("/", index), Route(STATE_PATH, state)], lifespan=lifespan)
