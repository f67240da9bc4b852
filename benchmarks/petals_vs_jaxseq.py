"""jaxseq against Petals 2.2 on the same work: one checkpoint (hidden 512, 8 blocks, float32), the same
shapes (batch 8 x 128, 16 deep prompts), one server holding all blocks, then two servers of 4 blocks.
For each: the median training-step time (forward + backward w.r.t. inputs and prompts) of a Petals
client through Petals servers and of a jaxseq client through jaxseq servers, each also as a ratio to
its own local step (torch for Petals, jit for jaxseq). Petals runs from its own venv
(tests/interop/petals_venv.sh).

    python benchmarks/petals_vs_jaxseq.py [--steps 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

import jaxseq
from jaxseq.remote import RemoteSequenceManager
from jaxseq.remote.launch import ServerProcess

from common import BATCH, CFG, PROMPT_LEN, SEQ, inputs, machine, paired_times, training_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
from petals_helpers import petals_python, petals_server, run_in_petals_venv, write_tiny_checkpoint_with_petals_venv  # noqa: E402

# Runs in the Petals venv: median step time through the Petals swarm and of the same blocks locally in torch.
_PETALS_STEPS = r"""
import json, statistics, sys, time
import torch, petals, transformers
ckpt, peers, prefix, steps, batch, seq, prompt_len = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:8])
torch.manual_seed(0)
remote = petals.DistributedLlamaForCausalLM.from_pretrained(ckpt, initial_peers=peers, dht_prefix=prefix,
                                                             torch_dtype=torch.float32, max_retries=3)
local = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).model
n, hidden = local.config.num_hidden_layers, local.config.hidden_size
x = torch.randn(batch, seq, hidden)
prompts = 0.1 * torch.randn(n, batch, prompt_len, hidden)
mask = local._prepare_decoder_attention_mask(None, (batch, seq), x, 0)
positions = torch.arange(seq)[None].expand(batch, seq)

def local_blocks(h, p):
    for i, layer in enumerate(local.layers):
        h = torch.cat([h[:, :prompt_len] + p[i], h[:, prompt_len:]], dim=1)
        h = layer(h, attention_mask=mask, position_ids=positions)[0]
    return h

def step(blocks):
    xs, ps = x.clone().requires_grad_(), prompts.clone().requires_grad_()
    blocks(xs, ps).pow(2).mean().backward()

remote_step = lambda: step(lambda h, p: remote.model.layers(h, prompts=p))
local_step = lambda: step(local_blocks)
for _ in range(2):
    remote_step(); local_step()
pairs = []
for _ in range(steps):
    t0 = time.perf_counter(); remote_step(); t1 = time.perf_counter(); local_step(); t2 = time.perf_counter()
    pairs.append((t1 - t0, t2 - t1))
out = dict(step=statistics.median(a for a, _ in pairs), local=statistics.median(b for _, b in pairs),
           ratio=statistics.median(a / b for a, b in pairs))
remote.model.layers.sequence_manager.shutdown()
remote.model.layers.sequence_manager.dht.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""

LAYOUTS = {"1 server x 8 blocks": [(0, 8)], "2 servers x 4 blocks": [(0, 4), (4, 8)]}


def petals_row(python: str, checkpoint: Path, spans, steps: int, prefix: str, log_dir: str) -> dict:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(
            petals_server(python, checkpoint, block_indices="%d:%d" % spans[0], dht_prefix=prefix, log_dir=log_dir)
        )
        for span in spans[1:]:
            stack.enter_context(petals_server(python, checkpoint, block_indices="%d:%d" % span, dht_prefix=prefix,
                                              initial_peers=[first.maddr], log_dir=log_dir))  # fmt: skip
        stdout = run_in_petals_venv(python, _PETALS_STEPS, str(checkpoint), json.dumps([first.maddr]), prefix,
                                    str(steps), str(BATCH), str(SEQ), str(PROMPT_LEN), timeout=1800)  # fmt: skip
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def jaxseq_row(checkpoint: Path, spans, steps: int, prefix: str) -> dict:
    cfg, params = jaxseq.load_checkpoint(checkpoint)
    x, prompts = inputs(cfg)
    local_step = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
    servers = []
    try:
        servers.append(ServerProcess(str(checkpoint), spans[0], prefix, None, ["--throughput", "1000"]).wait_ready())
        servers += [ServerProcess(str(checkpoint), s, prefix, [servers[0].maddr], ["--throughput", "1000"]) for s in spans[1:]]
        for server in servers[1:]:
            server.wait_ready()
        with RemoteSequenceManager([servers[0].maddr], prefix, jaxseq.ClientConfig(request_timeout=300.0)) as manager:
            step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
            median, local, ratio = paired_times(
                lambda: jax.block_until_ready(step(x, prompts)), lambda: jax.block_until_ready(local_step(x, prompts)), steps
            )
    finally:
        for server in servers:
            server.terminate()
    return dict(step=median, local=local, ratio=ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    python = petals_python()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint_with_petals_venv(
            python, Path(tmp) / "llama", hidden=CFG.hidden_size, layers=CFG.num_hidden_layers,
            heads=CFG.num_attention_heads, kv_heads=CFG.num_key_value_heads, intermediate=CFG.intermediate_size,
            vocab=CFG.vocab_size,
        )  # fmt: skip
        for i, (layout, spans) in enumerate(LAYOUTS.items()):
            rows[layout] = (
                petals_row(python, checkpoint, spans, args.steps, f"bench-petals{i}", tmp),
                jaxseq_row(checkpoint, spans, args.steps, f"bench-jaxseq{i}"),
            )
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}; petals 2.2.0.post1 (torch, its own venv)")
    print(f"{CFG.num_hidden_layers} blocks, hidden {CFG.hidden_size}, intermediate {CFG.intermediate_size}, "
          f"{CFG.num_attention_heads} heads, float32; batch {BATCH} x {SEQ}, {PROMPT_LEN} deep prompts; "
          f"forward + backward w.r.t. inputs and prompts; median of {args.steps} steps\n")
    print(f"{'layout':<22}{'Petals ms':>10}{'/ torch':>9}{'jaxseq ms':>11}{'/ jit':>7}{'jaxseq / Petals':>17}")
    for layout, (petals, ours) in rows.items():
        print(f"{layout:<22}{1000 * petals['step']:>10.0f}{petals['ratio']:>9.2f}{1000 * ours['step']:>11.0f}"
              f"{ours['ratio']:>7.2f}{ours['step'] / petals['step']:>17.2f}")
    print("\nlocal steps: " + ", ".join(f"torch {1000 * p['local']:.0f} ms / jit {1000 * o['local']:.0f} ms" for p, o in rows.values()))


if __name__ == "__main__":
    main()
