"""Errors a client raises, and ``swarm_errors`` to get them typed out of ``jax.jit``.

Their messages start with the type name: through ``jax.jit``, an error raised in a host callback
reaches the caller only as text inside JAX's own error (a ``JaxRuntimeError`` or a ``ValueError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class SwarmError(RuntimeError):
    """Base class of the errors jaxseq raises when the swarm cannot complete a call.

    Example:
        >>> isinstance(MissingBlocksError(3), SwarmError), isinstance(MissingBlocksError(3), RuntimeError)
        (True, True)
    """

    def __init__(self, message: str):
        super().__init__(f"{type(self).__name__}: {message}")


class MissingBlocksError(SwarmError):
    """No reachable server holds a block that the call needs.

    Example:
        >>> MissingBlocksError(5).block
        5
    """

    def __init__(self, block: int, detail: str = ""):
        self.block = block
        super().__init__(
            f"no reachable server holds block {block}{': ' + detail if detail else ''}. "
            "Start a server for it (jaxseq-server --blocks ...) or check --initial-peers / dht_prefix."
        )


class MissingAdapterError(SwarmError):
    """Servers hold a block the call needs, but none of them announces the LoRA adapter it names
    (``ClientConfig.active_adapter``). Not retried: adapters are loaded when a server starts.

    Example:
        >>> print(MissingAdapterError(2, "org/my-lora", {"org/other"}))
        MissingAdapterError: no server of block 2 serves adapter 'org/my-lora' (they serve: 'org/other'). ...
    """

    def __init__(self, block: int, adapter: str, served: set[str]):
        self.block, self.adapter = block, adapter
        listed = ", ".join(repr(name) for name in sorted(served)) or "no adapters"
        super().__init__(
            f"no server of block {block} serves adapter {adapter!r} (they serve: {listed}). Check "
            "ClientConfig.active_adapter, or start servers with jaxseq-server --adapters ..."
        )


class LoraUnsupportedError(SwarmError):
    """Servers hold a block the call needs, but none of them applies a client's LoRA weights of its rank
    (Petals servers apply none; jaxseq servers up to their ``--max-lora-rank``). Not retried.

    Example:
        >>> print(LoraUnsupportedError(3, 8, 0))
        LoraUnsupportedError: no server of block 3 applies a client's LoRA weights of rank 8 (the highest ...
    """

    def __init__(self, block: int, rank: int, best: int):
        self.block, self.rank = block, rank
        super().__init__(
            f"no server of block {block} applies a client's LoRA weights of rank {rank} (the highest rank its "
            f"servers take is {best}; Petals servers take none). Lower lora_rank, or start jaxseq servers for it "
            "(jaxseq-server --max-lora-rank, 64 by default)"
        )


class RemoteCallError(SwarmError):
    """Calls for a span kept failing until ``max_retries`` or ``deadline`` ran out.

    Example:
        >>> swarm = LocalSwarm(cfg, params, spans=[(0, 4)])
        >>> manager = swarm.sequence_manager(ClientConfig(max_retries=2, min_backoff=0.01))
        >>> swarm.servers[0].fail_next(3)
        >>> try:
        ...     with swarm_errors(manager):
        ...         jax.jit(lambda x: remote_sequential(x, None, manager))(x)
        ... except RemoteCallError as error:
        ...     print(error)
        RemoteCallError: forward of blocks 0:4: 3 failed attempts (max_retries=2); last error: server local-0: ...
    """


class ServerFailure(Exception):
    """One remote call failed: the server answered with an error (``reachable=True``)
    or could not be reached in time (``reachable=False``). Internal: the retry loop turns it
    into a routing decision, and into a ``SwarmError`` when retries run out."""

    def __init__(self, peer: str, message: str, *, reachable: bool):
        self.peer = peer
        self.reachable = reachable
        super().__init__(f"server {peer}: {message}")


class FaultyResponse(ServerFailure):
    """A server answered with a wrong shape or dtype, or non-finite values: never trusted."""

    def __init__(self, peer: str, message: str):
        super().__init__(peer, message, reachable=True)


class CacheMissed(ServerFailure):
    """A backward named a forward the server did not keep: send it again with its inputs."""

    def __init__(self, peer: str, message: str):
        super().__init__(peer, message, reachable=True)


class LoraMissed(ServerFailure):
    """A call named LoRA weights the server no longer holds: give them again."""

    def __init__(self, peer: str, message: str):
        super().__init__(peer, message, reachable=True)


class SharedMemoryRefused(ServerFailure):
    """The server can't use this client's memory files: send the tensors over the wire."""

    def __init__(self, peer: str, message: str):
        super().__init__(peer, message, reachable=True)


@contextlib.contextmanager
def swarm_errors(manager: Any) -> Iterator[None]:
    """Re-raise the typed jaxseq error of a failed call through ``manager``'s swarm out of the error
    JAX makes of it, chained to JAX's: ``MissingBlocksError``, ``RemoteCallError``, or the
    ``ValueError`` for NaN or inf inputs. Other errors pass unchanged.

    Example:
        >>> swarm = LocalSwarm(cfg, params, spans=[(0, 4)])
        >>> manager = swarm.sequence_manager(ClientConfig(max_retries=1, min_backoff=0.01))
        >>> step = jax.jit(lambda x: remote_sequential(x, None, manager))
        >>> swarm.servers[0].kill()
        >>> try:
        ...     with swarm_errors(manager):
        ...         step(x)
        ... except MissingBlocksError as error:
        ...     print(error.block)
        0
    """
    manager.last_error = None
    try:
        yield
    except SwarmError:
        raise
    except Exception as error:
        typed = manager.last_error
        if typed is None or typed is error or _headline(typed) not in str(error):
            raise
        raise typed from error


def _headline(error: BaseException) -> str:
    """The text by which an error is recognised inside JAX's: its type and the start of its message."""
    return f"{type(error).__name__}: {str(error).removeprefix(type(error).__name__ + ': ')[:80]}"
