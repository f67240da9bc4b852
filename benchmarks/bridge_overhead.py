"""What the torch bridge costs: a training step through ``bridges.RemoteSequential`` vs the same step
through ``jax.jit(jax.value_and_grad(... jaxseq.remote_sequential ...))`` on one ``LocalSwarm``, and
the time of a zero-copy conversion of a 64 MiB tensor each way.

A step is a forward and a backward w.r.t. the hidden states and the deep prompts, loss
``mean(out ** 2)``. Steps of the two kinds alternate (so drift hits both alike); after warm-up the
median of ``--steps`` steps is reported.

    python benchmarks/bridge_overhead.py [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import torch

import bridges
import jaxseq
from jaxseq.client.manager import SequenceManager

from common import BATCH, CFG, PROMPT_LEN, SEQ, timed


def training_steps(manager: SequenceManager) -> tuple[Callable[[], object], Callable[[], object]]:
    """One training step through torch and one through JAX, on the same inputs."""
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, CFG.hidden_size), jnp.float32)
    prompts = 0.1 * jax.random.normal(jax.random.key(2), (CFG.num_hidden_layers, BATCH, PROMPT_LEN, CFG.hidden_size))

    jax_step = jax.jit(
        jax.value_and_grad(lambda x, p: jnp.mean(jaxseq.remote_sequential(x, p, manager) ** 2), argnums=(0, 1))
    )

    blocks = bridges.RemoteSequential(manager)
    x_t = bridges.to_torch(x, copy=True).requires_grad_()
    prompts_t = bridges.to_torch(prompts, copy=True).requires_grad_()

    def torch_step():
        x_t.grad = prompts_t.grad = None
        loss = blocks(x_t, prompts_t).pow(2).mean()
        loss.backward()
        return loss.item(), x_t.grad, prompts_t.grad

    return torch_step, lambda: jax.block_until_ready(jax_step(x, prompts))


def conversion_times(reps: int = 200) -> tuple[float, float]:
    """Median seconds of ``to_torch`` and ``to_jax`` of a 64 MiB float32 tensor."""
    array = jnp.ones((16 * 1024 * 1024,), jnp.float32).block_until_ready()
    tensor = torch.ones(16 * 1024 * 1024)
    assert bridges.to_torch(array).data_ptr() == array.unsafe_buffer_pointer()
    assert bridges.to_jax(tensor).unsafe_buffer_pointer() == tensor.data_ptr()
    to_torch = statistics.median(timed(lambda: bridges.to_torch(array)) for _ in range(reps))
    to_jax = statistics.median(timed(lambda: bridges.to_jax(tensor)) for _ in range(reps))
    return to_torch, to_jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default 2)")
    args = parser.parse_args()

    params = jaxseq.init_block_params(CFG, jax.random.key(0))
    swarm = jaxseq.LocalSwarm(CFG, params, spans=[(0, 4), (4, 8)])
    with swarm.sequence_manager() as manager:
        torch_step, jax_step = training_steps(manager)
        for _ in range(args.warmup):
            torch_step(), jax_step()
        times: dict[str, list[float]] = {"torch (bridges.RemoteSequential)": [], "jax (jit value_and_grad)": []}
        for _ in range(args.steps):
            times["torch (bridges.RemoteSequential)"].append(timed(torch_step))
            times["jax (jit value_and_grad)"].append(timed(jax_step))
    to_torch, to_jax = conversion_times()

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"jax {jax.__version__}, torch {torch.__version__}"
    )
    print(
        f"hidden {CFG.hidden_size}, intermediate {CFG.intermediate_size}, {CFG.num_attention_heads} heads, "
        f"{CFG.num_hidden_layers} blocks on 2 servers; batch {BATCH} x {SEQ}, prompts {PROMPT_LEN}, float32"
    )
    print(f"\n{'training step':<36}{'median s':>10}{'min s':>10}")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        print(f"{name:<36}{medians[name]:>10.3f}{min(values):>10.3f}")
    torch_median, jax_median = medians.values()
    print(f"{'ratio torch / jax':<36}{torch_median / jax_median:>10.3f}")
    print(f"\n{'zero-copy conversion, 64 MiB':<36}{'median us':>10}")
    print(f"{'to_torch (jax -> torch)':<36}{to_torch * 1e6:>10.1f}")
    print(f"{'to_jax (torch -> jax)':<36}{to_jax * 1e6:>10.1f}")


if __name__ == "__main__":
    main()
