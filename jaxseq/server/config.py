"""``ServerConfig``: what a ``jaxseq-server`` serves and how. The command line is built from its fields
(flag, help and default come from here alone), and the server's parts read their settings from it.

Example:
    >>> config = ServerConfig.from_args(["--checkpoint", "llama", "--blocks", "0:4", "--dht-prefix", "tiny",
    ...                                  "--new-swarm", "--max-tokens", "4096"])
    >>> config.blocks, config.max_tokens, config.cache_ttl
    ((0, 4), 4096, 120.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high", "default")


def parse_blocks(text: str) -> tuple[int, int]:
    """``"START:END"`` as ``(START, END)``.

    Example:
        >>> parse_blocks("2:6")
        (2, 6)
    """
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def check_dialable(maddr: str) -> str:
    """``maddr`` if other peers can dial it: ``/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT`` with a real port; else
    ``ValueError`` saying what is wrong (p2pd would otherwise fail later, or announce what nobody can dial).

    Example:
        >>> check_dialable("/ip4/203.0.113.7/tcp/31337")
        '/ip4/203.0.113.7/tcp/31337'
        >>> check_dialable("203.0.113.7:31337")
        Traceback (most recent call last):
        ValueError: '203.0.113.7:31337' is not a dialable multiaddr: expected /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT
    """
    parts = maddr.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp":
        raise ValueError(f"{maddr!r} is not a dialable multiaddr: expected /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT")
    _, kind, host, _, port = parts
    if kind in ("ip4", "ip6"):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{maddr!r}: {host!r} is not an IP address") from None
        if address.version != int(kind[-1]):
            raise ValueError(f"{maddr!r}: {host} is not an IPv{kind[-1]} address")
        if address.is_unspecified:
            raise ValueError(f"{maddr!r}: {host} is where to listen, not an address peers can dial")
    elif not host:
        raise ValueError(f"{maddr!r}: the host name is empty")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{maddr!r}: the port must be a number in 1..65535 (peers dial it: 0 is not a port)")
    return maddr


def parse_adapter(text: str) -> tuple[str | None, str]:
    """An ``--adapters`` entry, ``NAME=LOCATION`` or ``LOCATION`` (a folder or a hub id), as ``(NAME or None,
    LOCATION)``; without a name, the adapter is named by its hub id, or its folder's name.

    Example:
        >>> parse_adapter("mine=./adapters/run-3"), parse_adapter("org/name")
        (('mine', './adapters/run-3'), (None, 'org/name'))
    """
    name, separator, location = text.rpartition("=")
    if separator and not (name and location):
        raise argparse.ArgumentTypeError(f"--adapters entry {text!r}: NAME=LOCATION needs both parts")
    return (name or None), location


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has a value to show (not for flags or None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, (), argparse.SUPPRESS) and not isinstance(action.default, bool)
        shown = shown and not action.required
        return f"{action.help} (default: %(default)s)" if shown else str(action.help)


def _option(help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's command-line option: its help text and what argparse needs beyond the field's default."""
    return {"help": help, **argparse_kwargs}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """A server's settings; ``jaxseq-server --help`` lists them with these defaults."""

    checkpoint: str = dataclasses.field(
        metadata=_option("a Hugging Face checkpoint: a local folder, or a hub model id (org/name)")
    )
    revision: str | None = dataclasses.field(
        default=None, metadata=_option("for a hub model id: the branch, tag or commit (default: main)")
    )
    blocks: tuple[int, int] = dataclasses.field(
        metadata=_option("blocks to serve, START:END", type=parse_blocks, metavar="START:END")
    )
    dht_prefix: str = dataclasses.field(metadata=_option("the model's name in the swarm (block uids are PREFIX.N)"))
    initial_peers: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_option("multiaddrs of peers already in the swarm", nargs="+", join=True)
    )
    new_swarm: bool = dataclasses.field(default=False, metadata=_option("start a new swarm", join=True))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/127.0.0.1/tcp/0",),
        metadata=_option("multiaddrs to listen on (/ip4/0.0.0.0/tcp/PORT: every interface)", nargs="+"),
    )
    announce_maddrs: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata=_option(
            "multiaddrs other peers dial to reach this server, announced instead of the ones it listens on (as "
            "Petals' --announce_maddrs): a public address, a port forwarded to this one (default: the listening "
            "ones)", nargs="+", metavar="MADDR",
        ),
    )  # fmt: skip
    use_relay: bool = dataclasses.field(
        default=True,
        metadata=_option(
            "don't use libp2p circuit relays: neither dial peers behind a NAT through one, nor relay for them",
            flag="--no-relay",
        ),
    )
    use_auto_relay: bool = dataclasses.field(
        default=False,
        metadata=_option(
            "behind a NAT or firewall: reserve a slot on a relaying peer of the swarm (the initial peers, by "
            "default) and announce the address through it, so that peers can reach this server",
        ),
    )
    dtype: str = dataclasses.field(
        default="float32", metadata=_option("dtype the blocks compute in", choices=COMPUTE_DTYPES)
    )
    matmul_precision: str = dataclasses.field(
        default="highest",
        metadata=_option(
            "float32 matmuls on GPUs: 'highest' computes in full float32, as torch and Petals servers do "
            "(remote == local within 1e-5); 'high' and 'default' let XLA use TF32 or bfloat16 passes, faster "
            "and about 1e-3 off (no effect on CPUs)",
            choices=MATMUL_PRECISIONS,
        ),
    )
    adapters: tuple[tuple[str | None, str], ...] = dataclasses.field(
        default=(),
        metadata=_option(
            "PEFT LoRA adapters to serve, each a folder, a hub id (org/name) or NAME=LOCATION; requests pick one "
            "by name (Petals' active_adapter): the hub id, the folder's name, or NAME",
            nargs="+", type=parse_adapter, metavar="ADAPTER",
        ),
    )  # fmt: skip
    max_lora_rank: int = dataclasses.field(
        default=64,
        metadata=_option(
            "largest rank of the LoRA weights a jaxseq client may train through this server's blocks (the "
            "client sends them; the server applies them and returns their gradients); 0: serve none", type=int,
        ),
    )  # fmt: skip
    lora_mb: float = dataclasses.field(
        default=256.0,
        metadata=_option("MiB of clients' LoRA weights kept (least recently used go first)", type=float),
    )
    throughput: float | None = dataclasses.field(
        default=None, metadata=_option("announced tokens/s per block (measured at start if omitted)", type=float)
    )
    max_tokens: int = dataclasses.field(
        default=65536, metadata=_option("most tokens (batch x seq) in one request", type=int)
    )
    max_request_mb: float = dataclasses.field(
        default=1024.0, metadata=_option("most MiB of tensor data in one request", type=float)
    )
    request_timeout: float = dataclasses.field(
        default=300.0, metadata=_option("seconds one request may take", type=float)
    )
    update_period: float = dataclasses.field(
        default=60.0,
        metadata=_option("seconds between DHT announcements (records expire after twice that)", type=float),
    )
    cache_mb: float = dataclasses.field(
        default=1024.0, metadata=_option("MiB of forward activations kept for backward (LRU)", type=float)
    )
    cache_ttl: float = dataclasses.field(
        default=120.0, metadata=_option("seconds a kept activation may wait for its backward", type=float)
    )
    handoff_mb: float = dataclasses.field(
        default=256.0,
        metadata=_option(
            "MiB of tensors other servers handed on to this one, kept until the requests awaiting them arrive "
            "(server-to-server hops in training; 0: take part in none)", type=float,
        ),
    )  # fmt: skip
    attn_cache_tokens: int | None = dataclasses.field(
        default=None,
        metadata=_option(
            "tokens of attention cache per served block, for all inference sessions together (default, as "
            "Petals: 16384 for models with grouped keys and values, else 4096)",
            type=int,
        ),
    )
    inference_max_length: int | None = dataclasses.field(
        default=None,
        metadata=_option("most positions one inference session may ask for (default, as Petals: 8192 for "
                         "models with grouped keys and values, else 2048)", type=int),
    )  # fmt: skip
    inference_idle_timeout: float = dataclasses.field(
        default=300.0,
        metadata=_option("seconds an inference session may wait for its next step before it is closed", type=float),
    )
    session_timeout: float = dataclasses.field(
        default=1800.0, metadata=_option("seconds one inference session may last", type=float)
    )
    batch_wait_ms: float = dataclasses.field(
        default=10.0,
        metadata=_option(
            "milliseconds a decode step may wait for the other sessions stepping through the same blocks, to be "
            "computed with them in one call (0: never wait)", type=float,
        ),
    )  # fmt: skip
    shared_memory: bool = dataclasses.field(
        default=True,
        metadata=_option("don't offer same-machine clients shared-memory transfers", flag="--no-shared-memory"),
    )
    max_queue: int = dataclasses.field(
        default=64, metadata=_option("requests that may wait for compute; more get 'server busy'", type=int)
    )
    allowed_clients: tuple[str, ...] | None = dataclasses.field(
        default=None, metadata=_option("serve only these client peer ids (base58)", nargs="+", metavar="PEER_ID")
    )
    identity: str | None = dataclasses.field(
        default=None, metadata=_option("file with this server's private key (created if missing): a stable peer id")
    )
    log_level: str = dataclasses.field(default="WARNING", metadata=_option("Python logging level"))

    def __post_init__(self) -> None:
        start, end = self.blocks
        if not 0 <= start < end:
            raise ValueError(f"blocks {start}:{end}: need 0 <= start < end")
        if bool(self.initial_peers) == self.new_swarm:
            raise ValueError("give either initial_peers (to join a swarm) or new_swarm=True (to start one)")
        for maddr in self.announce_maddrs:
            check_dialable(maddr)
        if self.use_auto_relay and not self.use_relay:
            raise ValueError("--use-auto-relay needs relays: drop --no-relay")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision {self.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
        positive = (
            "max_tokens", "max_request_mb", "request_timeout", "update_period", "max_queue", "inference_idle_timeout",
            "session_timeout",
        )  # fmt: skip
        optional = ("throughput", "attn_cache_tokens", "inference_max_length")
        for name in positive + tuple(name for name in optional if getattr(self, name) is not None):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cache_mb", "cache_ttl", "handoff_mb", "batch_wait_ms", "max_lora_rank", "lora_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 2**20)

    @property
    def handoff_bytes(self) -> int:
        return int(self.handoff_mb * 2**20)

    @property
    def lora_bytes(self) -> int:
        return int(self.lora_mb * 2**20)

    def max_inference_length(self, grouped: bool) -> int:
        """``inference_max_length``, or Petals' default."""
        return self.inference_max_length or (8192 if grouped else 2048)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The command line of ``jaxseq-server``: one option per field."""
        parser = argparse.ArgumentParser(
            prog="jaxseq-server",
            description="Host a span of a model's blocks from a Hugging Face checkpoint, announce it on a "
            "hivemind DHT, and answer Petals 2.2 RPCs until SIGTERM/SIGINT (then announce OFFLINE and exit 0).",
            formatter_class=_HelpWithDefaults,
        )
        join = parser.add_mutually_exclusive_group(required=True)
        for field in dataclasses.fields(cls):
            option = dict(field.metadata)
            flag = option.pop("flag", "--" + field.name.replace("_", "-"))
            group = join if option.pop("join", False) else parser
            if field.default is dataclasses.MISSING:
                option["required"] = True
            elif isinstance(field.default, bool):
                option["action"] = "store_false" if field.default else "store_true"
            elif field.default is not None:
                option["default"] = field.default
            group.add_argument(flag, dest=field.name, **option)
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> ServerConfig:
        """Parse ``argv`` (the process's arguments when None); bad arguments exit with argparse's usage line."""
        parser = cls.parser()
        args = vars(parser.parse_args(argv))
        for name in ("initial_peers", "host_maddrs", "announce_maddrs", "allowed_clients", "adapters"):
            if args[name] is not None:
                args[name] = tuple(args[name])
        try:
            return cls(**args)
        except ValueError as error:
            parser.error(str(error))
