"""Train deep prompts with a torch optimizer through a swarm of Llama blocks, via ``bridges.RemoteSequential``.

The task is synthetic: a "teacher" set of deep prompts produces targets from random hidden states,
and the student prompts (starting at zero) learn to reproduce them. The loss is the mean squared
error of the chain's outputs; it falls every step.

Runs on an in-process ``LocalSwarm`` over a tiny random Llama (three overlapping servers)::

    python examples/torch_bridge_training.py

or on a real swarm of ``jaxseq-server`` / Petals servers::

    python examples/torch_bridge_training.py --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... \\
        --dht-prefix my-llama --hidden-size 4096
"""

from __future__ import annotations

import argparse
import time

import jax
import torch

import bridges
import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.client.manager import SequenceManager


def local_manager(hidden_size: int, num_blocks: int) -> SequenceManager:
    """A tiny random Llama on three emulated servers whose spans overlap."""
    cfg = jaxseq.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_blocks,
    )
    params = jaxseq.init_block_params(cfg, jax.random.key(0), std=0.1)
    half = num_blocks // 2
    swarm = jaxseq.LocalSwarm(cfg, params, spans=[(0, half), (half, num_blocks), (1, num_blocks)])
    return swarm.sequence_manager(jaxseq.ClientConfig(min_backoff=0.05))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial-peers", nargs="+", help="multiaddrs of a swarm (default: an in-process LocalSwarm)")
    parser.add_argument("--dht-prefix", help="the model's name in the swarm (with --initial-peers)")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size (the model's, with --initial-peers)")
    parser.add_argument("--num-blocks", type=int, default=4, help="blocks of the local model (default 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    if bool(args.initial_peers) != bool(args.dht_prefix):
        parser.error("--initial-peers and --dht-prefix go together")

    manager: SequenceManager
    if args.initial_peers:
        manager = RemoteSequenceManager(args.initial_peers, args.dht_prefix)
    else:
        manager = local_manager(args.hidden_size, args.num_blocks)
    with manager:
        blocks = bridges.RemoteSequential(manager)
        torch.manual_seed(0)
        prompts_shape = (manager.num_blocks, args.batch, args.prompt_len, args.hidden_size)
        x = torch.randn(args.batch, args.seq, args.hidden_size)
        with torch.no_grad():  # the targets: what the blocks make of x with the teacher's prompts
            target = blocks(x, 0.5 * torch.randn(prompts_shape))

        prompts = torch.nn.Parameter(torch.zeros(prompts_shape))
        optimizer = torch.optim.AdamW([prompts], lr=args.lr, weight_decay=0.0)
        print(f"{blocks}: training deep prompts {tuple(prompts.shape)} on {manager.num_blocks} remote blocks")
        for step in range(args.steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(blocks(x, prompts), target)
            loss.backward()
            optimizer.step()
            print(f"step {step:3d}  loss {loss.item():.6f}  ({time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    main()
