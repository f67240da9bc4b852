"""jaxseq: train and generate through a swarm of servers that each host a span of a model's blocks, from JAX
and Flax.

The data path: ``DistributedCausalLM`` (Flax NNX) -> ``remote_sequential`` (a ``jax.custom_vjp``) -> host
callback -> the chain and the sequence manager (routing, retries, bans) -> the wire (Petals 2.2's
protocol) -> a server -> the blocks. Generation: ``DistributedCausalLM.generate`` -> an inference session
(the servers keep the attention caches) -> the sequence manager and the wire, as above.

The package is laid out by the process that runs the code:
``jaxseq.client`` (the user's process), ``jaxseq.server`` (a ``jaxseq-server``), ``jaxseq.models``
and ``jaxseq.remote`` (both sides: model math, checkpoints and the wire), ``jaxseq.testing`` (an
in-process swarm, a server launcher) and ``jaxseq.cli``.

This module exports the user's API. ``RemoteSequenceManager`` is imported on first use, so that
``import jaxseq`` doesn't import hivemind.
"""

import logging
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from jaxseq.client.config import ClientConfig
from jaxseq.client.errors import (
    LoraUnsupportedError,
    MissingAdapterError,
    MissingBlocksError,
    RemoteCallError,
    SwarmError,
    swarm_errors,
)
from jaxseq.client.model import DistributedCausalLM, DistributedLlama
from jaxseq.client.primitive import remote_sequential
from jaxseq.models.blocks import init_block_params, local_sequential
from jaxseq.models.checkpoint import load_checkpoint, load_config, load_head, random_checkpoint, write_checkpoint
from jaxseq.models.config import LlamaConfig, ModelConfig, RopeScaling
from jaxseq.models.registry import family_of
from jaxseq.testing.local_swarm import LocalSwarm

if TYPE_CHECKING:
    from jaxseq.client.remote_manager import RemoteSequenceManager

__version__ = version("jaxseq")

# A library logs, its user decides where to: nothing is printed unless the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name == "RemoteSequenceManager":
        from jaxseq.client.remote_manager import RemoteSequenceManager

        return RemoteSequenceManager
    raise AttributeError(f"module 'jaxseq' has no attribute {name!r}")


__all__ = [
    "ClientConfig",
    "DistributedCausalLM",
    "DistributedLlama",
    "LlamaConfig",
    "LocalSwarm",
    "LoraUnsupportedError",
    "MissingAdapterError",
    "MissingBlocksError",
    "ModelConfig",
    "RemoteCallError",
    "RemoteSequenceManager",
    "RopeScaling",
    "SwarmError",
    "family_of",
    "init_block_params",
    "load_checkpoint",
    "load_config",
    "load_head",
    "local_sequential",
    "random_checkpoint",
    "remote_sequential",
    "swarm_errors",
    "write_checkpoint",
]
