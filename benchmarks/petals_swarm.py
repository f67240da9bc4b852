"""The Petals 2.2 side of the benchmark: real Petals servers and a Petals client, run from the Petals
venv (``tests/interop/petals_venv.sh``), on a checkpoint that venv's transformers writes (so that
both Petals and jaxseq load the very same file)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jaxseq

from common import BATCH, CFG, PROMPT_LEN, SEQ

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
from petals_helpers import (  # noqa: E402
    PetalsServer,
    find_petals_python,
    petals_server,
    run_in_petals_venv,
    write_tiny_checkpoint_with_petals_venv,
)

__all__ = ["PetalsServer", "petals_row", "python_unless", "write_checkpoint"]

# Runs in the Petals venv: median step time through the Petals swarm and of the same blocks locally in torch.
_PETALS_STEPS = r"""
import json, statistics, sys, time
import torch, petals, transformers
ckpt, peers, prefix = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
steps, batch, seq, prompt_len = map(int, sys.argv[4:8])
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


def petals_row(python: str, checkpoint: Path, spans, steps: int, prefix: str, log_dir: str) -> dict:
    """Median seconds of a Petals training step through servers holding ``spans`` ("step"), of the same
    blocks locally in torch ("local"), and the median per-pair ratio ("ratio")."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(
            petals_server(
                python, checkpoint, block_indices="{}:{}".format(*spans[0]), dht_prefix=prefix, log_dir=log_dir
            )
        )
        for span in spans[1:]:
            stack.enter_context(
                petals_server(
                    python,
                    checkpoint,
                    block_indices="{}:{}".format(*span),
                    dht_prefix=prefix,
                    initial_peers=[first.maddr],
                    log_dir=log_dir,
                )
            )
        stdout = run_in_petals_venv(
            python,
            _PETALS_STEPS,
            str(checkpoint),
            json.dumps([first.maddr]),
            prefix,
            str(steps),
            str(BATCH),
            str(SEQ),
            str(PROMPT_LEN),
            timeout=1800,
        )
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def python_unless(no_petals: bool) -> tuple[str | None, str]:
    """The Petals venv's python (None with the reason, also when ``no_petals``: the ``--no-petals`` flag)."""
    return (None, "--no-petals") if no_petals else find_petals_python()


def write_checkpoint(python: str | None, path: Path) -> Path:
    """The benchmark's model (``common.CFG``, random float32 weights), written by the Petals venv (so that
    Petals and jaxseq load the very same file), or by jaxseq when there is no Petals venv (``python`` None)."""
    if python is None:
        return jaxseq.random_checkpoint(path, CFG, seed=0)
    return write_tiny_checkpoint_with_petals_venv(
        python,
        path,
        hidden=CFG.hidden_size,
        layers=CFG.num_hidden_layers,
        heads=CFG.num_attention_heads,
        kv_heads=CFG.num_key_value_heads,
        intermediate=CFG.intermediate_size,
        vocab=CFG.vocab_size,
    )
