"""The network layer both sides speak: Petals 2.2's messages (``protocol``), typed DHT records
(``records``, ``dht``), wire compressions (``compression``) and the same-host shared-memory
agreement (``shm``). Nothing here starts a process.

``jaxseq.remote.RemoteSequenceManager`` is the client's manager (``jaxseq.client.remote_manager``),
kept here for code written before the layout by process; new code imports it from ``jaxseq``.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RemoteSequenceManager":  # imported on use: the network layer itself never needs the client
        from jaxseq.client.remote_manager import RemoteSequenceManager

        return RemoteSequenceManager
    raise AttributeError(f"module 'jaxseq.remote' has no attribute {name!r}")


__all__ = ["RemoteSequenceManager"]
