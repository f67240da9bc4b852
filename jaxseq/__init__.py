"""jaxseq: train through a swarm of servers that each host a span of Llama blocks, from JAX and Flax.

The data path: a Flax module -> ``remote_sequential`` (a ``jax.custom_vjp``) -> host callback ->
``SequenceManager`` (routing, retries, bans) -> the wire (Petals 2.2's protocol) -> a server -> Llama blocks.
"""

from jaxseq.backend import BlockBackend, bucket
from jaxseq.checkpoint import load_checkpoint, load_config, load_head, random_checkpoint, write_checkpoint
from jaxseq.config import ClientConfig, LlamaConfig
from jaxseq.emulation import EmulatedServer, LocalSwarm
from jaxseq.errors import MissingBlocksError, RemoteCallError, SwarmError
from jaxseq.llama import block_forward, init_block_params, local_sequential
from jaxseq.manager import SequenceManager
from jaxseq.model import DistributedLlama
from jaxseq.primitive import remote_sequential
from jaxseq.routing import ServerRecord, ServerState, Span, route

__version__ = "0.1.0"

__all__ = [
    "BlockBackend",
    "ClientConfig",
    "DistributedLlama",
    "EmulatedServer",
    "LlamaConfig",
    "LocalSwarm",
    "MissingBlocksError",
    "RemoteCallError",
    "SequenceManager",
    "ServerRecord",
    "ServerState",
    "Span",
    "SwarmError",
    "block_forward",
    "bucket",
    "init_block_params",
    "load_checkpoint",
    "load_config",
    "load_head",
    "local_sequential",
    "random_checkpoint",
    "remote_sequential",
    "route",
    "write_checkpoint",
]
