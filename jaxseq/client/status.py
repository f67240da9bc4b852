"""The swarm as the DHT shows it, as a table (like Petals' health monitor)."""

from __future__ import annotations

import asyncio
import dataclasses

from rich.console import Console
from rich.table import Table

from jaxseq.client.remote_manager import RemoteSequenceManager


@dataclasses.dataclass(frozen=True)
class ServerStatus:
    """One server as ``jaxseq swarm`` and ``jaxseq monitor`` show it: what it announced in the DHT, and
    ``latency``, the round trip of a call from here (None when it did not answer)."""

    peer: str
    start: int
    end: int
    state: str
    throughput: float
    version: str
    latency: float | None
    cache_tokens_left: int | None = None
    family: str | None = None
    dtype: str | None = None
    adapters: tuple[str, ...] = ()
    public_name: str | None = None


async def _collect(manager: RemoteSequenceManager) -> list[ServerStatus]:
    await manager.refresh()
    records = sorted(manager.records, key=lambda r: (r.start, r.end, r.peer))
    latencies = await asyncio.gather(*(manager.ping(r.peer) for r in records))
    return [
        ServerStatus(
            r.peer,
            r.start,
            r.end,
            r.info.state.name,
            r.info.throughput,
            r.info.version or "",
            latency,
            r.info.cache_tokens_left,
            r.info.family,
            r.info.torch_dtype,
            r.info.adapters,
            r.info.public_name,
        )  # fmt: skip
        for r, latency in zip(records, latencies)
    ]


def swarm_status(manager: RemoteSequenceManager) -> list[ServerStatus]:
    """Every server announcing blocks of the manager's model, with its latency from here (None if it does
    not answer)."""
    return manager.run(_collect(manager))


def print_status(
    rows: list[ServerStatus], num_blocks: int, title: str = "swarm", console: Console | None = None
) -> None:
    """Print ``rows`` as a table, with a line saying which blocks no online server holds.

    Example:
        >>> row = ServerStatus("QmPeer", 0, 2, "ONLINE", 100.0, "2.2.0", 0.001, adapters=("org/lora",))
        >>> print_status([row], 4, console=Console(width=100))
                                                swarm
        ┏━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━━┓
        ┃ peer    ┃ blocks ┃ state  ┃ throughput (tok/s) ┃ version ┃ latency (ms) ┃ adapters ┃
        ┡━━━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━━┩
        │ …QmPeer │ 0:2    │ ONLINE │ 100                │ 2.2.0   │ 1.0          │ org/lora │
        └─────────┴────────┴────────┴────────────────────┴─────────┴──────────────┴──────────┘
        4 blocks; no online server holds blocks [2, 3]
    """
    console = console or Console()
    table = Table(title=title)
    for column in ("peer", "blocks", "state", "throughput (tok/s)", "version", "latency (ms)", "adapters"):
        table.add_column(column)
    for row in rows:
        latency = "unreachable" if row.latency is None else f"{1000 * row.latency:.1f}"
        table.add_row(
            f"…{row.peer[-12:]}", f"{row.start}:{row.end}", row.state, f"{row.throughput:.0f}", row.version, latency,
            ", ".join(row.adapters),
        )  # fmt: skip
    console.print(table)
    covered = {b for r in rows if r.state == "ONLINE" for b in range(r.start, r.end)}
    missing = [b for b in range(num_blocks) if b not in covered]
    console.print(f"{num_blocks} blocks; " + (f"no online server holds blocks {missing}" if missing else "all covered"))
