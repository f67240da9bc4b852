"""One training client for the concurrency test: ``steps`` steps through the swarm, each compared with
the same step computed locally. Prints one ``RESULT`` line (JSON); exits 1 on any mismatch or error.

    python tests/programs/concurrent_client.py MADDR DHT_PREFIX CHECKPOINT STEPS SEED
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager


def main() -> int:
    maddr, prefix, checkpoint, steps, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    cfg, params = jaxseq.load_checkpoint(checkpoint)

    def loss(blocks):
        return jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(jnp.sin(blocks(x, p))), argnums=(0, 1)))

    local = loss(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
    worst = 0.0
    config = jaxseq.ClientConfig(deadline=300.0, request_timeout=120.0, min_backoff=0.2)
    with RemoteSequenceManager([maddr], prefix, config) as manager:
        remote = loss(lambda x, p: jaxseq.remote_sequential(x, p, manager))
        key = jax.random.key(seed)
        for _ in range(steps):
            key, kx, kp = jax.random.split(key, 3)
            x = jax.random.normal(kx, (2, 8, cfg.hidden_size))
            prompts = 0.5 * jax.random.normal(kp, (cfg.num_hidden_layers, 2, 2, cfg.hidden_size))
            (_, got), (_, want) = remote(x, prompts), local(x, prompts)
            for g, w in zip(got, want):
                g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
                worst = max(worst, float(np.linalg.norm(g - w) / np.linalg.norm(w)))
        retries = manager.retries
    print("RESULT " + json.dumps({"steps": steps, "worst_rel_err": worst, "retries": retries}), flush=True)
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
