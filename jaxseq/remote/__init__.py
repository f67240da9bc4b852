"""The network layer: ``jaxseq-server`` and ``RemoteSequenceManager`` on hivemind, speaking Petals 2.2."""

from jaxseq.remote.client import RemoteSequenceManager

__all__ = ["RemoteSequenceManager"]
