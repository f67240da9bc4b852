"""Choosing a chain of servers from a view of the swarm: pure functions over plain records."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

from jaxseq.client.errors import LoraUnsupportedError, MissingAdapterError, MissingBlocksError
from jaxseq.remote.records import ServerRecord, ServerState


@dataclasses.dataclass(frozen=True)
class Span:
    """Blocks ``start..end-1`` to be run by one server in one call."""

    peer: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


# Seconds of round trip assumed for a server not yet measured when no server is (otherwise: the median of
# those measured, so that a new server is neither favoured nor shunned).
DEFAULT_RTT = 0.05
# Chains whose expected time is within this fraction of the fastest's are picked among at random, to spread load.
NEAR_BEST = 0.1


def route(
    records: Sequence[ServerRecord],
    start: int,
    end: int,
    *,
    banned: Mapping[str, float] = {},
    rtt: Mapping[str, float] = {},
    tokens: int = 1,
    rng: random.Random | None = None,
    cache_tokens: int = 0,
    adapter: str | None = None,
    lora_rank: int = 0,
) -> list[Span]:
    """The chain of spans covering blocks ``start..end-1`` that is expected to run fastest, by the Petals paper's
    rule: each span costs a round trip to its server (``rtt``, seconds, as measured; unmeasured servers count as
    the median measured, or ``DEFAULT_RTT``) plus its blocks' compute for ``tokens`` tokens at the server's
    announced throughput (tokens/s per block). Once a chain enters a server it stays to the end of that
    server's span (as Petals does), so every hop costs a round trip and equal servers give the fewest hops.
    Where servers reaching as far as the fastest chain's next one are within ``NEAR_BEST`` of it, one of them
    is picked at random, to spread load.

    Banned peers (``banned`` maps peer to the time of its ban) are avoided, but a ban never makes a block
    unreachable on its own: when every holder of a block is banned, the one banned longest ago is used. With
    ``cache_tokens`` (an inference session's batch times its length), servers that announce too little
    attention cache for it are avoided likewise (Petals' unit: one token's keys, or values, in one block). With
    ``adapter``, only servers announcing that LoRA adapter are routed to; with ``lora_rank``, only servers that
    apply a client's LoRA weights of that rank.

    Raises:
        MissingBlocksError: no online server holds some block in the range.
        MissingAdapterError: servers hold some block, but none of them announces ``adapter``.
        LoraUnsupportedError: servers hold some block, but none of them applies LoRA weights of ``lora_rank``.

    Example:
        >>> route([ServerRecord("a", 0, 4), ServerRecord("b", 2, 8)], 0, 8)
        [Span(peer='a', start=0, end=4), Span(peer='b', start=4, end=8)]
        >>> near, far = ServerRecord("near", 0, 4), ServerRecord("far", 0, 8)  # far: one hop, but 0.5 s away
        >>> route([near, ServerRecord("near2", 4, 8), far], 0, 8, rtt={"near": 0.01, "near2": 0.01, "far": 0.5})
        [Span(peer='near', start=0, end=4), Span(peer='near2', start=4, end=8)]
    """
    rng = rng or random.Random(0)
    online = [r for r in records if r.info.state == ServerState.ONLINE]
    for block in range(start, end):
        holders = [r for r in online if r.start <= block < r.end]
        if not holders:
            raise MissingBlocksError(block, f"no server in the swarm announces it (route {start}:{end})")
        if adapter and not any(adapter in r.info.adapters for r in holders):
            raise MissingAdapterError(block, adapter, {a for r in holders for a in r.info.adapters})
        if lora_rank and not any(r.info.client_lora_rank >= lora_rank for r in holders):
            raise LoraUnsupportedError(block, lora_rank, max(r.info.client_lora_rank for r in holders))
    if adapter:
        online = [r for r in online if adapter in r.info.adapters]
    if lora_rank:
        online = [r for r in online if r.info.client_lora_rank >= lora_rank]
    measured = sorted(rtt[r.peer] for r in online if r.peer in rtt)
    unmeasured = measured[len(measured) // 2] if measured else DEFAULT_RTT

    def options(pos: int) -> list[tuple[ServerRecord, int, float]]:
        """The servers a chain at block ``pos`` may enter, where each takes it, and the cost of that span."""
        holders = [r for r in online if r.start <= pos < r.end]
        trusted = [r for r in holders if r.peer not in banned and _has_cache(r, pos, end, cache_tokens)]
        if not trusted:
            trusted = [min(holders, key=lambda r: banned.get(r.peer, -float("inf")))]
        found = []
        for r in trusted:
            reach = min(r.end, end)
            compute = (reach - pos) * tokens / max(r.info.throughput, 1e-9)
            found.append((r, reach, rtt.get(r.peer, unmeasured) + compute))
        return found

    # Fastest time from each block where a chain may stand (the range's start, or where a span ends) to the end.
    stops = sorted({start} | {min(r.end, end) for r in online if start < r.end and r.start < end} - {end})
    fastest = {end: 0.0}
    for pos in reversed(stops):
        fastest[pos] = min(cost + fastest[reach] for _, reach, cost in options(pos))
    spans: list[Span] = []
    pos = start
    while pos < end:
        chain = [(r, reach, cost + fastest[reach]) for r, reach, cost in options(pos)]
        best_reach = min(chain, key=lambda c: (c[2], -c[1]))[1]
        near_best = sorted(
            (r for r, reach, total in chain if reach == best_reach and total <= (1 + NEAR_BEST) * fastest[pos]),
            key=lambda r: r.peer,
        )
        chosen, reach = near_best[rng.randrange(len(near_best))], best_reach
        spans.append(Span(chosen.peer, pos, reach))
        pos = reach
    return spans


def _has_cache(record: ServerRecord, start: int, end: int, cache_tokens: int) -> bool:
    """Whether ``record``'s server announces attention cache for ``cache_tokens`` over its blocks of ``start..end``."""
    left = record.info.cache_tokens_left
    return not cache_tokens or left is None or left >= 2 * cache_tokens * (min(record.end, end) - start)
