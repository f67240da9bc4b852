"""Wire compression chosen per request from each link's measured bandwidth (``ClientConfig(compression="auto")``).

The rule, in full: for a call whose float tensors weigh ``B`` bytes uncompressed (inputs sent plus outputs
expected), codec ``c`` is expected to take ``B * (ratio(c) / bandwidth + cost(c))`` seconds, where
``ratio`` is its wire bytes per uncompressed byte and ``cost`` the CPU time it adds to encode and decode a
byte (see ``CODECS``). The client picks the codec of least expected time among "none" and the allowed ones:
"none" on fast links (loopback, LAN: the codec's CPU time exceeds the wire time it saves), float16 or an
8-bit codec on slow ones. A link's ``bandwidth`` is a moving average over that server's calls of bytes on the
wire / wire seconds, where the wire seconds are the call's round trip less the link's measured round trip
(pings) and the server's own time (which jaxseq servers report; Petals' don't, so their links look slower).
A call whose wire seconds are under half its round trip is not counted: its time is mostly latency and compute
(a first call compiling, say; any call over loopback), what is left is too noisy to time its bytes by, and
compressing it would save less than half of it.
A server not yet measured gets "none": its calls measure it. Shared-memory calls never compress.

Every codec here is one of hivemind's, which Petals 2.2 servers decode per tensor and use for their replies
when asked through ``output_compression``: each is safe to send to Petals peers.

The error a codec adds to a training step through servers (relative, ``||got - exact|| / ||exact||`` of
the outputs, the inputs' gradient and the deep prompts' gradient; ``tests/test_compression.py``) is at
most ``Codec.max_rel_error``. Measured on the tiny Llama of the tests (4 blocks, hidden 32, 8 x 128 tokens,
3 prompts; outputs / grad inputs / grad prompts): float16 3e-4 / 4e-4 / 5e-4, meanstd16 3e-4 / 4e-4 / 5e-4
(bound 1e-2); uniform8bit 0.022 / 0.022 / 0.057, quantile8bit 0.037 / 0.028 / 0.063 (bound 0.25: at 4 x 64
tokens the prompts' gradient was off by up to 0.12, a sum over fewer positions of coarsely rounded values).
Errors grow with depth: through 8 blocks of hidden 512 (``benchmarks/fewer_bytes.py``; loss / grad inputs /
grad prompts) float16 gave 6e-7 / 5.8e-3 / 3.8e-3 and uniform8bit 3e-4 / 0.038 / 0.036.

Example:
    >>> links = LinkEstimates()
    >>> links.choose("peer", 8 << 20, ("float16", "uniform8bit"))  # not measured yet
    'none'
    >>> links.record("peer", nbytes=10_000_000, wire_s=4.0, round_trip_s=4.1)  # 2.5 MB/s: a 20 Mbit/s link
    >>> links.choose("peer", 8 << 20, ("float16", "uniform8bit"))
    'uniform8bit'
    >>> links.record("fast", nbytes=10_000_000, wire_s=0.01, round_trip_s=0.05)  # 1 GB/s
    >>> links.choose("fast", 8 << 20, ("float16", "uniform8bit"))
    'none'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Codec:
    """What a codec does to a float32 payload.

    Attributes:
        ratio: wire bytes per uncompressed byte.
        cost_s_per_byte: seconds of CPU to encode and decode one uncompressed byte (measured on a busy
            two-core host, rounded up: compressing must pay for itself with room to spare).
        max_rel_error: the bound on the relative error it adds to a training step's outputs and gradients.
    """

    ratio: float
    cost_s_per_byte: float
    max_rel_error: float


CODECS = {
    "none": Codec(ratio=1.0, cost_s_per_byte=0.0, max_rel_error=1e-5),
    "float16": Codec(ratio=0.5, cost_s_per_byte=20e-9, max_rel_error=1e-2),
    "meanstd16": Codec(ratio=0.5, cost_s_per_byte=20e-9, max_rel_error=1e-2),
    "uniform8bit": Codec(ratio=0.25, cost_s_per_byte=40e-9, max_rel_error=0.25),
    "quantile8bit": Codec(ratio=0.25, cost_s_per_byte=150e-9, max_rel_error=0.25),
}

_MIN_WIRE_SHARE = 0.5  # of a call's round trip: less is within the noise of the latency and the server's time
_SMOOTHING = 0.2  # each call moves a link's estimate a fifth of the way, as pings move round trips


class LinkEstimates:
    """Each server link's bandwidth (bytes per second), a moving average over its calls, and the codec it
    calls for (see the module's docstring for the rule)."""

    def __init__(self) -> None:
        self._bytes_per_s: dict[str, float] = {}

    def record(self, peer: str, nbytes: int, wire_s: float, round_trip_s: float) -> None:
        """One call's bytes on the wire (both ways), its wire seconds (its round trip less the link's latency
        and the server's time) and its round trip; not counted if too little of it was the wire's."""
        if wire_s < _MIN_WIRE_SHARE * round_trip_s:
            return
        rate = nbytes / wire_s
        known = self._bytes_per_s.get(peer)
        self._bytes_per_s[peer] = rate if known is None else (1 - _SMOOTHING) * known + _SMOOTHING * rate

    def bandwidth(self, peer: str) -> float | None:
        """The estimate for ``peer`` in bytes per second, or None before its first call."""
        return self._bytes_per_s.get(peer)

    def choose(self, peer: str, nbytes: int, allowed: Sequence[str]) -> str:
        """The codec of least expected time for ``nbytes`` of uncompressed floats: "none" or one of ``allowed``."""
        bandwidth = self._bytes_per_s.get(peer)
        if bandwidth is None:
            return "none"

        def seconds(name: str) -> float:
            codec = CODECS[name]
            return nbytes * (codec.ratio / bandwidth + codec.cost_s_per_byte)

        return min(("none", *allowed), key=seconds)  # ties go to "none": it comes first
