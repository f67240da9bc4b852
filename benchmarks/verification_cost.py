"""What client-side verification costs: a training step through a ``LocalSwarm`` of two servers that
both hold every block, with ``verify_fraction`` 0, 0.25 and 1, as a ratio to the step without it.

    python benchmarks/verification_cost.py [--steps 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax

import jaxseq

from common import CFG, inputs, machine, paired_times, run_step, training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    params = jaxseq.init_block_params(CFG, jax.random.key(0))
    x, prompts = inputs()
    swarm = jaxseq.LocalSwarm(CFG, params, [(0, 8), (0, 8)])
    managers = {f: swarm.sequence_manager(jaxseq.ClientConfig(verify_fraction=f), seed=1) for f in (0.0, 0.25, 1.0)}
    steps = {f: training_step(lambda x, p, m=m: jaxseq.remote_sequential(x, p, m)) for f, m in managers.items()}
    baseline = functools.partial(run_step, steps[0.0], x, prompts)
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}; 8 blocks hidden {CFG.hidden_size}, batch 8 x 128, prompts 16")
    print(f"{'verify_fraction':<18}{'median ms':>10}{'/ without':>11}{'spans checked':>15}")
    for fraction, step in steps.items():
        timing = paired_times(functools.partial(run_step, step, x, prompts), baseline, args.steps)
        median, ratio = timing.step_s, timing.ratio
        manager = managers[fraction]
        print(f"{fraction:<18}{1000 * median:>10.1f}{ratio:>11.2f}{manager.verified_spans:>15}")
    for manager in managers.values():
        manager.close()


if __name__ == "__main__":
    main()
