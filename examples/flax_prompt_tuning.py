"""Deep prompt tuning of a model (any supported family) through any jaxseq or Petals swarm, with Flax NNX and optax.

The embedding and LM head run here (from the local checkpoint); the blocks run in the swarm.
The task is synthetic (make the model say one fixed sentence whatever it is given), so the loss
falls visibly in a few dozen steps.

    python examples/flax_prompt_tuning.py --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER \\
        --dht-prefix my-llama --checkpoint path/to/llama
"""

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxseq
from jaxseq import RemoteSequenceManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint (folder or hub id) of the model the swarm serves"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    config = jaxseq.ClientConfig(deadline=120.0, max_retries=10)
    with RemoteSequenceManager(args.initial_peers, args.dht_prefix, config) as manager:
        model = jaxseq.DistributedCausalLM(
            args.checkpoint, manager, tuning_mode="deep_ptune", prompt_len=args.prompt_len, rngs=nnx.Rngs(0)
        )
        optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
        vocab = model.config.vocab_size
        rng = np.random.default_rng(0)
        sentence = jnp.asarray(rng.integers(0, vocab, args.seq))

        @nnx.jit
        def train_step(model, optimizer, ids):
            def loss_fn(model):
                labels = jnp.broadcast_to(sentence, ids.shape)
                return optax.softmax_cross_entropy_with_integer_labels(model(ids), labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        for step in range(1, args.steps + 1):
            ids = jnp.asarray(rng.integers(0, vocab, (args.batch, args.seq)))
            start = time.perf_counter()
            loss = float(train_step(model, optimizer, ids))
            print(
                f"step {step:4d}  loss {loss:.4f}  {1000 * (time.perf_counter() - start):.0f} ms  "
                f"retries {manager.retries}"
            )


if __name__ == "__main__":
    main()
