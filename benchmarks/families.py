"""A training step per model family, locally under jit and through one real ``jaxseq-server`` holding all
8 blocks (loopback, same-machine memory files), at the usual shape; Mixtral's sparse block against a
dense block with the same active parameters per token (intermediate 2 x 1344), to show that expert
routing computes only the chosen experts rather than looping over tokens; and what bfloat16 and
float16 servers cost in accuracy, per family, beside what they cost transformers.

    python benchmarks/families.py [--steps 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from run import loopback_swarm

import jaxseq
from jaxseq.testing.reference import low_precision_errors

from common import CFG, inputs, machine, paired_times, run_step, training_step

EXPERTS, TOP_K = 4, 2
FAMILIES = {
    "llama": dataclasses.replace(CFG),
    "mistral": dataclasses.replace(CFG, family="mistral", sliding_window=64, layer_types=()),
    "qwen2": dataclasses.replace(CFG, family="qwen2", attention_bias=True),
    "qwen3": dataclasses.replace(CFG, family="qwen3", qk_norm=True, attention_bias=False),
    "mixtral": dataclasses.replace(
        CFG, family="mixtral", num_experts=EXPERTS, num_experts_per_token=TOP_K, sliding_window=64, layer_types=()
    ),
}
# A dense block computing as many multiply-adds per token as Mixtral's top-2 of 4 experts.
DENSE_ACTIVE = dataclasses.replace(CFG, intermediate_size=TOP_K * CFG.intermediate_size)


LOW = ("bfloat16", "float16")


def _transformers(path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def local_step(cfg: jaxseq.ModelConfig, params):
    return training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row (default 7)")
    args = parser.parse_args()
    x, prompts = inputs()
    x_low = np.asarray(x[:2, :64])
    rows, errors = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, cfg in FAMILIES.items():
            path = jaxseq.random_checkpoint(Path(folder) / name, cfg, std=0.02)
            _, params = jaxseq.load_checkpoint(path)
            local = functools.partial(run_step, local_step(cfg, params), x, prompts)
            with loopback_swarm(str(path), [(0, cfg.num_hidden_layers)], f"bench-{name}", True) as manager:
                remote = functools.partial(
                    run_step, training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager)), x, prompts
                )
                timing = paired_times(remote, local, args.steps)
            rows.append((name, timing))
            errors[name] = [low_precision_errors(_transformers(path), path, dtype, x_low) for dtype in LOW]
        dense_params = jaxseq.init_block_params(DENSE_ACTIVE, jax.random.key(0))
        mixtral_params = jaxseq.load_checkpoint(Path(folder) / "mixtral")[1]
        dense = functools.partial(run_step, local_step(DENSE_ACTIVE, dense_params), x, prompts)
        sparse = functools.partial(run_step, local_step(FAMILIES["mixtral"], mixtral_params), x, prompts)
        moe = paired_times(sparse, dense, args.steps)

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"8 blocks, hidden {CFG.hidden_size}, intermediate {CFG.intermediate_size} (Mixtral: {EXPERTS} experts, "
        f"top {TOP_K}), float32; batch 8 x 128, 16 deep prompts; forward + backward; median of {args.steps}"
    )
    print(f"{'family':<10}{'local ms':>10}{'1 x 8 ms':>10}{'remote / local':>16}")
    for name, timing in rows:
        print(f"{name:<10}{1000 * timing.baseline_s:>10.0f}{1000 * timing.step_s:>10.0f}{timing.ratio:>16.2f}")
    print(f"relative error of 8 blocks' output against transformers' float32, batch 2 x 64 ({' / '.join(LOW)}):")
    print(f"{'family':<10}{'jaxseq server':>22}{'transformers':>22}")
    for name, pairs in errors.items():
        ours, theirs = (" / ".join(f"{e[i]:.1e}" for e in pairs) for i in (0, 1))
        print(f"{name:<10}{ours:>22}{theirs:>22}")
    print(
        f"Mixtral's block, local: {1000 * moe.step_s:.0f} ms a step against {1000 * moe.baseline_s:.0f} ms for a dense "
        f"block of intermediate {DENSE_ACTIVE.intermediate_size} (the same active multiply-adds): {moe.ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
