"""Choosing a chain of servers from a view of the swarm: pure functions over plain records."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

from jaxseq.client.errors import MissingAdapterError, MissingBlocksError
from jaxseq.remote.records import ServerRecord, ServerState


@dataclasses.dataclass(frozen=True)
class Span:
    """Blocks ``start..end-1`` to be run by one server in one call."""

    peer: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def route(
    records: Sequence[ServerRecord],
    start: int,
    end: int,
    *,
    banned: Mapping[str, float] = {},
    latency: Mapping[str, float] = {},
    rng: random.Random | None = None,
    cache_tokens: int = 0,
    adapter: str | None = None,
) -> list[Span]:
    """A chain of spans that covers blocks ``start..end-1`` with as few hops as possible.

    At each block, among the online servers holding it, the one reaching furthest wins; among
    those, the fastest (announced throughput over measured latency), with near-equals (within 10%)
    picked at random to spread load. Banned peers (``banned`` maps peer to the time of its ban)
    are avoided, but a ban never makes a block unreachable on its own: when every holder of a
    block is banned, the one banned longest ago is used. With ``cache_tokens`` (an inference session's
    batch times its length), servers that announce too little attention cache for it are avoided
    likewise (Petals' unit: one token's keys, or values, in one block). With ``adapter``, only servers
    announcing that LoRA adapter are routed to.

    Raises:
        MissingBlocksError: no online server holds some block in the range.
        MissingAdapterError: servers hold some block, but none of them announces ``adapter``.

    Example:
        >>> route([ServerRecord("a", 0, 4), ServerRecord("b", 2, 8)], 0, 8)
        [Span(peer='a', start=0, end=4), Span(peer='b', start=4, end=8)]
    """
    rng = rng or random.Random(0)
    online = [r for r in records if r.info.state == ServerState.ONLINE]
    spans: list[Span] = []
    pos = start
    while pos < end:
        holders = [r for r in online if r.start <= pos < r.end]
        if not holders:
            raise MissingBlocksError(pos, f"no server in the swarm announces it (route {start}:{end})")
        if adapter:
            serving = [r for r in holders if adapter in r.info.adapters]
            if not serving:
                raise MissingAdapterError(pos, adapter, {a for r in holders for a in r.info.adapters})
            holders = serving
        trusted = [r for r in holders if r.peer not in banned and _has_cache(r, pos, end, cache_tokens)]
        if not trusted:
            trusted = [min(holders, key=lambda r: banned.get(r.peer, -float("inf")))]
        reach = max(min(r.end, end) for r in trusted)
        furthest = [r for r in trusted if min(r.end, end) == reach]

        def speed(r: ServerRecord) -> float:
            return r.info.throughput / (1.0 + latency.get(r.peer, 0.0))

        best = max(speed(r) for r in furthest)
        near_best = sorted((r for r in furthest if speed(r) >= 0.9 * best), key=lambda r: r.peer)
        chosen = near_best[rng.randrange(len(near_best))]
        spans.append(Span(chosen.peer, pos, reach))
        pos = reach
    return spans


def _has_cache(record: ServerRecord, start: int, end: int, cache_tokens: int) -> bool:
    """Whether ``record``'s server announces attention cache for ``cache_tokens`` over its blocks of ``start..end``."""
    left = record.info.cache_tokens_left
    return not cache_tokens or left is None or left >= 2 * cache_tokens * (min(record.end, end) - start)
