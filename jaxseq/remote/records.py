"""What a server announces in the DHT, typed: Petals 2.2's ``ServerInfo`` with jaxseq's extension
fields, and the client's record of one server's span. No I/O and no hivemind: both sides use it,
and routing reads it without starting anything.

Petals stores ``ServerInfo.to_tuple()``, ``(state, throughput, extra)``, under each block a server
holds. Peers of other versions add or omit keys of ``extra``; parsing takes what it knows and never
fails on the rest, so records from other versions never break a client.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

# The Petals release whose wire protocol jaxseq speaks; a jaxseq server announces
# "{PROTOCOL_VERSION}+jaxseq.{its version}".
PROTOCOL_VERSION = "2.2.0"


class ServerState(enum.IntEnum):
    """Petals' ``ServerState`` values, as announced in DHT records."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


# jaxseq's fields of ``extra`` (Petals peers ignore unknown keys) -> their keys on the wire.
EXTENSION_KEYS = {
    # The machine (and pid namespace) the server runs on: same-machine clients may exchange tensors
    # through shared memory (``jaxseq.remote.shm``).
    "machine": "jaxseq_host",
    # The server keeps a forward's activations for the backward that names it: such a backward may
    # send its grad outputs alone (``jaxseq.remote.protocol.INPUTS_CACHED_KEY``).
    "cached_backward": "jaxseq_cached_backward",
    # The model family the server computes (``jaxseq.models.registry``): clients refuse a swarm of another.
    "family": "jaxseq_family",
    # The largest rank of a client's own LoRA weights the server applies and returns gradients for
    # (``jaxseq.remote.protocol.LORA_KEY``); absent: none.
    "client_lora_rank": "jaxseq_client_lora_rank",
    # The server hands results on to other servers, and takes what they hand it, in training
    # (``jaxseq.remote.protocol.HAND_TO_KEY``).
    "hands_off": "jaxseq_hands_off",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """Petals 2.2's ``ServerInfo`` (``petals.data_structures``) plus jaxseq's extensions.

    Example:
        >>> info = ServerInfo(state=ServerState.ONLINE, throughput=100.0, start_block=0, end_block=4)
        >>> ServerInfo.from_tuple(info.to_tuple()) == info
        True
    """

    state: ServerState
    throughput: float
    start_block: int | None = None
    end_block: int | None = None
    public_name: str | None = None
    version: str | None = None
    network_rps: float | None = None
    forward_rps: float | None = None
    inference_rps: float | None = None
    adapters: tuple[str, ...] = ()
    torch_dtype: str | None = None
    quant_type: str | None = None
    using_relay: bool | None = None
    cache_tokens_left: int | None = None
    next_pings: Mapping[str, float] | None = None
    machine: str | None = None
    cached_backward: bool = False
    family: str | None = None
    client_lora_rank: int = 0
    hands_off: bool = False

    def to_tuple(self) -> tuple[int, float, dict[str, Any]]:
        """The DHT value: ``(state, throughput, extra)``, Petals' keys always, extension keys when set."""
        extra: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("state", "throughput"):
                continue
            if field.name in EXTENSION_KEYS:
                if value:
                    extra[EXTENSION_KEYS[field.name]] = value
            else:
                extra[field.name] = value
        return int(self.state), float(self.throughput), extra

    @classmethod
    def from_tuple(cls, value: Any) -> ServerInfo | None:
        """Parse a DHT value; None when it is not a ``ServerInfo`` tuple. Fields of unexpected types
        are left at their defaults."""
        if not isinstance(value, (tuple, list)) or len(value) < 2:
            return None
        state, throughput = value[0], value[1]
        if not isinstance(state, int) or state not in tuple(ServerState) or not _is_number(throughput):
            return None
        extra = value[2] if len(value) > 2 and isinstance(value[2], dict) else {}
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = EXTENSION_KEYS.get(field.name, field.name)
            if field.name in ("state", "throughput") or key not in extra:
                continue
            parsed = _parse_field(field.name, extra[key])
            if parsed is not None:
                fields[field.name] = parsed
        return cls(state=ServerState(state), throughput=float(throughput), **fields)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_PARSERS = {
    int: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
    float: lambda v: float(v) if _is_number(v) else None,
    str: lambda v: v if isinstance(v, str) else None,
    bool: lambda v: v if isinstance(v, bool) else None,
}
_FIELD_TYPES = {
    "start_block": int,
    "end_block": int,
    "public_name": str,
    "version": str,
    "network_rps": float,
    "forward_rps": float,
    "inference_rps": float,
    "torch_dtype": str,
    "quant_type": str,
    "using_relay": bool,
    "cache_tokens_left": int,
    "machine": str,
    "cached_backward": bool,
    "family": str,
    "client_lora_rank": int,
    "hands_off": bool,
}


def _parse_field(name: str, value: Any) -> Any:
    if name == "adapters":
        ok = isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value)
        return tuple(value) if ok else None
    if name == "next_pings":
        ok = isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())
        return dict(value) if ok else None
    return _PARSERS[_FIELD_TYPES[name]](value)


ONLINE = ServerInfo(state=ServerState.ONLINE, throughput=1.0)


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """One server as the client sees it: it holds blocks ``start..end-1`` and announced ``info``.

    Example:
        >>> ServerRecord("peer", 0, 4).info.state.name
        'ONLINE'
    """

    peer: str
    start: int
    end: int
    info: ServerInfo = ONLINE


def parse_block_records(found: Mapping[int, Any]) -> list[ServerRecord]:
    """Turn DHT lookups of each block (``{block: {peer_id: value}}``) into one record per server span.

    A server's span is each longest run of consecutive blocks it announces, with the info of the
    run's first block; values that don't parse as a ``ServerInfo`` are ignored.

    Example:
        >>> value = ServerInfo(state=ServerState.ONLINE, throughput=5.0).to_tuple()
        >>> [(r.peer, r.start, r.end) for r in parse_block_records({0: {"a": value}, 1: {"a": value}, 3: {"a": value}})]
        [('a', 0, 2), ('a', 3, 4)]
    """
    by_peer: dict[str, dict[int, ServerInfo]] = {}
    for block, entries in found.items():
        for peer, value in (entries or {}).items():
            info = ServerInfo.from_tuple(value)
            if isinstance(peer, str) and info is not None:
                by_peer.setdefault(peer, {})[block] = info
    records = []
    for peer, blocks in by_peer.items():
        indices = sorted(blocks)
        run_start = indices[0]
        for prev, cur in zip(indices, indices[1:] + [-1]):
            if cur != prev + 1:
                records.append(ServerRecord(peer, run_start, prev + 1, blocks[run_start]))
                run_start = cur
    return records
