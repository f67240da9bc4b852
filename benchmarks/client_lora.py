"""A training step with client-owned LoRA (rank 8 and 64 on all seven projections) through real ``jaxseq-server``
processes on loopback (1 x 8 and 2 x 4 blocks), against the same step locally under jit, and the bytes a step
moves: the LoRA weights given to the servers, their gradients, and the hidden states.

Every step trains new weights (as a real loop does), so every step gives each server its blocks' weights once.
Steps alternate with local jit steps; the ratio is the median of per-pair ratios.

    python benchmarks/client_lora.py [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxseq
from jaxseq.models.blocks import local_sequential
from jaxseq.models.lora import LORA_TARGETS, random_lora_weights, with_adapter
from jaxseq.testing.launch import ServerProcess

from common import BATCH, CFG, PROMPT_LEN, SEQ, inputs, machine, paired_times, run_step

LAYOUTS = {"1 x 8": [(0, 8)], "2 x 4": [(0, 4), (4, 8)]}
RANKS = (8, 64)


def training_step(blocks):
    """jit(value_and_grad) of a read-out of ``blocks(x, prompts, lora)`` w.r.t. all three."""
    return jax.jit(jax.value_and_grad(lambda x, p, w: jnp.mean(blocks(x, p, w) ** 2), argnums=(0, 1, 2)))


@contextlib.contextmanager
def swarm(checkpoint: str, spans, prefix: str):
    args = ["--throughput", "1000", "--max-lora-rank", str(max(RANKS))]
    servers = [ServerProcess(checkpoint, spans[0], prefix, None, args).wait_ready()]
    try:
        servers += [ServerProcess(checkpoint, s, prefix, [servers[0].maddr], args) for s in spans[1:]]
        for server in servers[1:]:
            server.wait_ready()
        config = jaxseq.ClientConfig(request_timeout=300.0, deadline=600.0)
        with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
            yield manager
    finally:
        for server in servers:
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    x, prompts = inputs()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(jaxseq.random_checkpoint(f"{tmp}/llama", CFG))
        _, params = jaxseq.load_checkpoint(checkpoint)

        def local(x, p, lora):
            blocks = with_adapter(params, [{k: v[i] for k, v in lora.items()} for i in range(len(params))])
            return local_sequential(CFG, blocks, x, p)

        local_step = training_step(local)
        rows = []
        for (layout, spans), rank in itertools.product(LAYOUTS.items(), RANKS):
            lora = random_lora_weights(CFG, rank, LORA_TARGETS, std=0.02)
            versions = itertools.count(1)
            with swarm(checkpoint, spans, f"bench-lora-{rank}-{len(spans)}") as manager:
                remote_step = training_step(lambda x, p, w: jaxseq.remote_sequential(x, p, manager, w))

                def trained(lora=lora, versions=versions):  # new weights each step, as training makes them
                    return {k: v * (1 + 1e-3 * next(versions)) for k, v in lora.items()}

                def remote(step=remote_step, trained=trained):
                    return run_step(step, x, prompts, trained())

                timing = paired_times(remote, functools.partial(run_step, local_step, x, prompts, lora), args.steps)
                since = len(manager.timings)
                run_step(remote_step, x, prompts, trained())
                calls = list(manager.timings)[since:]
            lora_bytes = sum(int(np.prod(v.shape)) * 4 for v in lora.values())
            given = sum(c.bytes_sent for c in calls if c.stage == "lora")
            moved = sum(c.bytes_sent + c.bytes_received for c in calls if c.stage in ("forward", "backward"))
            rows.append((layout, rank, timing, lora_bytes, given, lora_bytes, moved - lora_bytes))
    print(f"machine: {machine()}; {CFG.num_hidden_layers} blocks, hidden {CFG.hidden_size}; batch {BATCH} x {SEQ},")
    print(f"{PROMPT_LEN} deep prompts, LoRA on {', '.join(LORA_TARGETS)}; median of {args.steps} paired steps\n")
    print(f"{'layout':<8}{'rank':>5}{'step s':>9}{'local s':>9}{'ratio':>7}{'min ratio':>11}"
          f"{'LoRA MB':>9}{'given MB':>10}{'grads MB':>10}{'hidden MB':>11}")  # fmt: skip
    for layout, rank, timing, lora_bytes, given, grads, hidden in rows:
        print(
            f"{layout:<8}{rank:>5}{timing.step_s:>9.2f}{timing.baseline_s:>9.2f}{timing.ratio:>7.2f}"
            f"{timing.min_ratio:>11.2f}{lora_bytes / 1e6:>9.2f}{given / 1e6:>10.2f}{grads / 1e6:>10.2f}"
            f"{hidden / 1e6:>11.2f}"
        )


if __name__ == "__main__":
    main()
