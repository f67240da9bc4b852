"""Errors a client raises. Their messages start with the type name, because through ``jax.jit``
host-callback errors reach the user only as text inside a ``JaxRuntimeError``/``ValueError``."""


class SwarmError(RuntimeError):
    """Base class of the errors jaxseq raises when the swarm cannot complete a call."""

    def __init__(self, message: str):
        super().__init__(f"{type(self).__name__}: {message}")


class MissingBlocksError(SwarmError):
    """No reachable server holds a block that the call needs."""

    def __init__(self, block: int, detail: str = ""):
        self.block = block
        super().__init__(
            f"no reachable server holds block {block}{': ' + detail if detail else ''}. "
            "Start a server for it (jaxseq-server --blocks ...) or check --initial-peers / dht_prefix."
        )


class RemoteCallError(SwarmError):
    """Calls for a span kept failing until ``max_retries`` or ``deadline`` ran out."""


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
