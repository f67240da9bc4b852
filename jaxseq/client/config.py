"""How a client talks to the swarm: one frozen dataclass."""

from __future__ import annotations

import dataclasses

from jaxseq.remote.compression import COMPRESSIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a client talks to the swarm. Every retry loop is bounded by ``max_retries`` and ``deadline``.

    Attributes:
        max_retries: failed attempts allowed at one position of the chain before the call gives up.
        deadline: seconds a whole forward or backward call may take, retries included.
        min_backoff, max_backoff: exponential backoff between retries, in seconds.
        max_tokens_in_batch: inputs are split into micro-batches of ``max(max_tokens_in_batch // seq, 1)`` rows.
        request_timeout: seconds one RPC may take (also capped by what is left of ``deadline``).
        connect_timeout: seconds to open a connection to a server.
        ban_timeout: seconds a failing server is avoided by routing.
        update_period: seconds between background refreshes of the swarm view.
        max_saved_states: forward states kept for backward (LRU); a backward whose state
            was dropped recomputes the forward instead of failing.
        compression: wire compression of tensors, both ways: one of ``jaxseq.remote.compression.COMPRESSIONS``
            ("none", "float16", "meanstd16", "uniform8bit", "quantile8bit") for every call, or "auto": per call,
            "none" or one of ``auto_compressions``, whichever the server's measured bandwidth makes fastest
            (``jaxseq.client.codecs``). "none" (the default) is lossless; the others add bounded errors
            (``jaxseq.client.codecs.CODECS``: 1e-2 relative for the 16-bit codecs, 0.25 for the 8-bit ones).
        allowed_servers: if given, only these server peer ids (base58) are ever routed to (a private swarm).
        shared_memory: exchange tensors through shared memory files with jaxseq servers on the same machine.
        verify_fraction: fraction of spans (forward and backward) re-run on a second server and compared;
            on disagreement a third server decides and the outlier is banned. 0 disables it.
        alloc_timeout: seconds an inference session may wait for a server's attention cache.
        server_to_server: servers hand results straight to the next server, saving the next server a round
            trip through the client. In training (a jaxseq extension, between jaxseq servers on other machines
            than the client's; off while ``verify_fraction`` > 0, whose cross-checks need the client to send
            every input): the client sends every span's call at once, and each server hands its outputs
            (backward: grad inputs) to the call of the next; the client still gets every reply, to replay any
            span that fails. In inference sessions: each server pushes its outputs to the next server's session
            too (Petals' ``next_servers``).
        stream_bytes: micro-batches are also cut to at most this many bytes of hidden states (at least one row
            each), and run at once: each is a stream of its own with its own flow-control window (p2pd's
            multiplexer, yamux, opens a stream with a 256 KiB window and grows it only over round trips), so on
            a long link several windows are in flight instead of one call waiting out a round trip per window,
            and micro-batch i+1 runs on a span while micro-batch i runs on the next. Results do not change
            (rows are independent). None: only ``max_tokens_in_batch`` splits.
        stream_min_rtt: ``stream_bytes`` applies only while some server's shortest ping (its link's delay:
            ``SequenceManager.shortest_round_trips``) is at least this many seconds: on short links the extra,
            smaller calls cost more than the windows lose (``docs/benchmarks.md``, "Through links": slower at
            5 ms, faster at 100 ms).
        active_adapter: the name of a LoRA adapter that servers apply to every forward, backward and inference
            step (Petals' ``active_adapter``: what ``jaxseq-server --adapters`` or Petals' ``--adapters`` announce);
            only servers announcing it are routed to. None: the blocks as they are.
        auto_compressions: the codecs ``compression="auto"`` may choose besides "none" (the 16-bit float16
            by default; add "uniform8bit" or "quantile8bit" to allow their larger errors on slow links).

    Example:
        >>> cfg = ClientConfig(max_retries=3, deadline=30.0)
        >>> cfg = ClientConfig(compression="auto", auto_compressions=("float16", "uniform8bit"))
    """

    max_retries: int = 8
    deadline: float = 300.0
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    max_tokens_in_batch: int = 1024
    request_timeout: float = 120.0
    connect_timeout: float = 5.0
    ban_timeout: float = 15.0
    update_period: float = 30.0
    max_saved_states: int = 16
    compression: str = "none"
    allowed_servers: tuple[str, ...] | None = None
    verify_fraction: float = 0.0
    shared_memory: bool = True
    alloc_timeout: float = 10.0
    server_to_server: bool = True
    stream_bytes: int | None = 256 * 1024
    stream_min_rtt: float = 0.05
    active_adapter: str | None = None
    auto_compressions: tuple[str, ...] = ("float16",)

    def __post_init__(self):
        if self.alloc_timeout < 0:
            raise ValueError(f"ClientConfig.alloc_timeout must be non-negative, got {self.alloc_timeout}")
        for name in ("deadline", "request_timeout", "connect_timeout", "max_backoff", "update_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClientConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0 or self.min_backoff < 0 or self.ban_timeout < 0:
            raise ValueError("ClientConfig.max_retries, min_backoff and ban_timeout must be non-negative")
        if self.min_backoff > self.max_backoff:
            raise ValueError(f"min_backoff={self.min_backoff} exceeds max_backoff={self.max_backoff}")
        if self.max_tokens_in_batch < 1 or self.max_saved_states < 1:
            raise ValueError("ClientConfig.max_tokens_in_batch and max_saved_states must be at least 1")
        if self.stream_bytes is not None and self.stream_bytes < 1:
            raise ValueError(f"ClientConfig.stream_bytes must be at least 1 or None, got {self.stream_bytes}")
        if self.stream_min_rtt < 0:
            raise ValueError(f"ClientConfig.stream_min_rtt must be non-negative, got {self.stream_min_rtt}")
        if self.compression not in (*COMPRESSIONS, "auto"):
            raise ValueError(f"unknown compression {self.compression!r}; use one of {', '.join(COMPRESSIONS)} or auto")
        object.__setattr__(self, "auto_compressions", tuple(self.auto_compressions))
        lossy = [name for name in COMPRESSIONS if name != "none"]
        if not self.auto_compressions or not set(self.auto_compressions) <= set(lossy):
            raise ValueError(
                f"ClientConfig.auto_compressions must name some of {', '.join(lossy)}, got {self.auto_compressions!r}"
            )
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be within [0, 1], got {self.verify_fraction}")
        if self.active_adapter is not None and not (isinstance(self.active_adapter, str) and self.active_adapter):
            raise ValueError(
                f"ClientConfig.active_adapter must be an adapter's name or None, got {self.active_adapter!r}"
            )
        if self.allowed_servers is not None:
            object.__setattr__(self, "allowed_servers", tuple(self.allowed_servers))

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): ``min_backoff * 2**(attempt-1)``, capped."""
        return min(self.min_backoff * 2.0 ** max(attempt - 1, 0), self.max_backoff)
