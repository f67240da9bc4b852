"""``jaxseq demo``: a real local swarm, a Flax/optax prompt-tuning loop through it, a server killed
halfway without losing a step, and a loss-curve PNG."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from tqdm import tqdm

from jaxseq.client.config import ClientConfig
from jaxseq.client.model import DistributedCausalLM
from jaxseq.client.remote_manager import RemoteSequenceManager
from jaxseq.client.status import print_status, swarm_status
from jaxseq.models.checkpoint import load_config, random_checkpoint
from jaxseq.models.config import ModelConfig
from jaxseq.testing.launch import ServerProcess

_LLAMA = ModelConfig(
    hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8,
    vocab_size=256, rms_norm_eps=1e-5,
)  # fmt: skip
# One small random model per family, each with its family's own features switched on.
DEMO_MODELS = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, family="mistral", sliding_window=16, layer_types=()),
    "qwen2": dataclasses.replace(_LLAMA, family="qwen2", attention_bias=True),
    "qwen3": dataclasses.replace(_LLAMA, family="qwen3", qk_norm=True),
    "mixtral": dataclasses.replace(
        _LLAMA, family="mixtral", num_experts=4, num_experts_per_token=2, sliding_window=16, layer_types=()
    ),
}
DEMO_CHECKPOINT_VERSION = "v2"  # bump when DEMO_MODELS or their init change


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSEQ_CACHE", Path.home() / ".cache" / "jaxseq"))


def demo_checkpoint(family: str = "llama") -> Path:
    """The demo's random checkpoint of ``family``, built once in the cache folder (written aside, then renamed)."""
    if family not in DEMO_MODELS:
        raise ValueError(f"no demo model of family {family!r}; choose one of {', '.join(DEMO_MODELS)}")
    path = cache_dir() / f"demo-{family}-{DEMO_CHECKPOINT_VERSION}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
        random_checkpoint(staging / "model", DEMO_MODELS[family], seed=0, std=0.1)
        try:
            (staging / "model").rename(path)
        except OSError:  # another demo built it meanwhile
            pass
        shutil.rmtree(staging, ignore_errors=True)
    return path


def server_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    """Server 0 holds every block; the others split the chain into overlapping spans.

    Example:
        >>> server_spans(8, 3)
        [(0, 8), (0, 5), (3, 8)]
    """
    if servers < 2:
        raise ValueError(f"the demo needs at least 2 servers (one is killed halfway), got {servers}")
    rest = servers - 1
    bounds = np.linspace(0, num_blocks, rest + 1).round().astype(int)
    overlap = 1 if rest > 1 else 0
    spans = [(0, num_blocks)]
    for i in range(rest):
        start = max(int(bounds[i]) - overlap, 0)
        end = min(int(bounds[i + 1]) + overlap, num_blocks)
        spans.append((start, end))
    return spans


def _plot(losses: list[float], kill_step: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, marker=".", label="training loss")
    if kill_step is not None:
        ax.axvline(kill_step + 0.5, color="red", linestyle="--", label=f"server SIGKILLed before step {kill_step + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("jaxseq demo: deep prompt tuning through a local swarm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    checkpoint: str | None = None,
    steps: int = 100,
    servers: int = 3,
    kill: bool = True,
    out: str | None = None,
    console: Console | None = None,
    family: str = "llama",
) -> Path:
    """Run the demo; returns the path of the loss-curve PNG. Every process it starts is stopped."""
    console = console or Console()
    if steps < 2:
        raise ValueError(f"--steps must be at least 2, got {steps}")
    path = Path(checkpoint) if checkpoint else demo_checkpoint(family)
    cfg = load_config(path)
    out_dir = Path(out) if out else Path.cwd() / "jaxseq-demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    spans = server_spans(cfg.num_hidden_layers, servers)
    prefix = f"jaxseq-demo-{os.getpid()}"
    started: list[ServerProcess] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [server.terminate(timeout=15) for server in started])
        console.print(f"starting {servers} jaxseq-server processes on 127.0.0.1 for {path} ...")
        started.append(ServerProcess(str(path), spans[0], prefix).wait_ready())
        started += [ServerProcess(str(path), span, prefix, [started[0].maddr]) for span in spans[1:]]
        for server in started[1:]:
            server.wait_ready()
        config = ClientConfig(deadline=120.0, min_backoff=0.2, max_backoff=2.0, request_timeout=30.0, ban_timeout=30.0)
        manager = cleanup.enter_context(RemoteSequenceManager([started[0].maddr], prefix, config))
        print_status(swarm_status(manager), cfg.num_hidden_layers, "swarm at start", console)

        model = DistributedCausalLM(path, manager, tuning_mode="deep_ptune", prompt_len=8, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
        rng = np.random.default_rng(0)
        seq = 32
        target = jnp.asarray(rng.integers(0, cfg.vocab_size, seq))  # the task: always say this sentence

        def loss_fn(model, ids):
            logits = model(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(target, ids.shape)).mean()

        @nnx.jit
        def train_step(model, optimizer, ids):
            loss, grads = nnx.value_and_grad(loss_fn)(model, ids)
            optimizer.update(model, grads)
            return loss

        kill_step = steps // 2 if kill else None
        losses = []
        bar = tqdm(range(steps), desc="training", unit="step")
        for step in bar:
            if step == kill_step:
                victim = started[0]
                bar.write(
                    f"SIGKILL server {victim.peer_id[-12:]} (blocks {victim.blocks[0]}:{victim.blocks[1]}) "
                    f"before step {step + 1}"
                )
                victim.kill()
                print_status(swarm_status(manager), cfg.num_hidden_layers, "swarm after the kill", console)
            ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, seq)))
            start = time.perf_counter()
            loss = float(train_step(model, optimizer, ids))
            losses.append(loss)
            bar.set_postfix(
                loss=f"{loss:.3f}", step_ms=f"{1000 * (time.perf_counter() - start):.0f}", retries=manager.retries
            )
        bar.close()

        # The tuned prompts at work: generated through the swarm, the model says the sentence it was taught
        prompt = 4
        said = model.generate(rng.integers(0, cfg.vocab_size, (1, prompt)), max_new_tokens=8, eos_token_id=None)
        said = said[0, prompt:]
        taught = np.asarray(target[prompt - 1 : prompt + 7])
        console.print(
            f"generated through the swarm with the tuned prompts: {said.tolist()}; the sentence taught: "
            f"{taught.tolist()} ({int((said == taught).sum())} of 8 tokens agree)"
        )

    png = out_dir / "loss.png"
    _plot(losses, kill_step, png)
    console.print(
        f"trained {steps} steps, none lost: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (f"; a server was SIGKILLed before step {kill_step + 1}" if kill_step is not None else "")
    )
    console.print(f"loss curve: {png}")
    np.save(out_dir / "losses.npy", np.asarray(losses))
    return png
