"""For every test: full-precision float32 matmuls. For the docstring examples (``pytest --doctest-modules``
over ``jaxseq`` and ``bridges``): a namespace with a tiny Llama, its blocks, an in-process swarm with its
manager, inputs for it, and a checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxseq
from jaxseq.testing.launch import ServerProcess

# The 1e-5 float32 comparisons need full-precision matmuls: on GPUs XLA's default uses TF32 (about
# 1e-3 off); jaxseq-server defaults to this too (--matmul-precision). No effect on CPUs.
jax.config.update("jax_default_matmul_precision", "highest")

# The examples' model: 4 blocks of hidden size 32, and a vocabulary of 100 tokens.
DOCTEST_MODEL = jaxseq.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    vocab_size=100,
)  # fmt: skip


@pytest.fixture(scope="session")
def _doctest_objects(tmp_path_factory):
    cfg = DOCTEST_MODEL
    tmp = tmp_path_factory.mktemp("doctest")
    checkpoint = jaxseq.random_checkpoint(tmp / "llama", cfg, seed=0)
    _, params = jaxseq.load_checkpoint(checkpoint)
    swarm = jaxseq.LocalSwarm(cfg, params, spans=[(0, 2), (2, 4)])
    manager = swarm.sequence_manager(jaxseq.ClientConfig(min_backoff=0.01, max_backoff=0.05))
    kx, kp = jax.random.split(jax.random.key(0))
    objects = {
        "tmp": tmp,  # a folder for examples that write files
        "cfg": cfg,
        "params": params,
        "checkpoint": checkpoint,
        "swarm": swarm,
        "manager": manager,
        "x": jax.random.normal(kx, (2, 5, cfg.hidden_size)),
        "prompts": 0.1 * jax.random.normal(kp, (cfg.num_hidden_layers, 2, 3, cfg.hidden_size)),
    }
    yield objects
    manager.close()


@pytest.fixture(autouse=True)
def _doctest_namespace(request, doctest_namespace):
    if isinstance(request.node, pytest.DoctestItem):
        doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax, nnx=nnx, jaxseq=jaxseq)
        doctest_namespace.update({name: getattr(jaxseq, name) for name in jaxseq.__all__})
        doctest_namespace.update(ServerProcess=ServerProcess)
        doctest_namespace.update(request.getfixturevalue("_doctest_objects"))
