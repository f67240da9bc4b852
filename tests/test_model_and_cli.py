"""DistributedLlama against transformers, one training step against a local reference, and the CLIs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxseq
from jaxseq import DistributedLlama
from jaxseq.models.checkpoint import load_head
from jaxseq.models.decoder import rms_norm

from helpers import rel_err

TOL = 1e-5


@pytest.fixture
def local_manager(checkpoint):
    _, cfg, params = checkpoint
    manager = jaxseq.LocalSwarm(cfg, params, [(0, 3), (2, 4)]).sequence_manager()
    yield manager
    manager.close()


def test_logits_equal_transformers(checkpoint, local_manager):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, cfg, _ = checkpoint
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    model = DistributedLlama(path, local_manager)
    got = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(ids))
    assert got.shape == (2, 11, cfg.vocab_size)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_training_step_gradient_equals_local_reference(checkpoint, local_manager, tuning_mode):
    path, cfg, params = checkpoint
    model = DistributedLlama(path, local_manager, tuning_mode=tuning_mode, prompt_len=3, rngs=nnx.Rngs(1))
    if tuning_mode == "deep_ptune":  # non-zero deep prompts, so that they matter in the forward too
        model.deep_prompts[...] = 0.1 * jax.random.normal(jax.random.key(2), model.deep_prompts.shape)
    head = load_head(path)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)))
    targets = jnp.roll(ids, -1, axis=1)

    def loss_of_logits(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def reference(prefix, deep):
        hidden = jnp.concatenate([jnp.broadcast_to(prefix, (2,) + prefix.shape), head["embed_tokens"][ids]], axis=1)
        prompts = None if deep is None else jnp.broadcast_to(deep, (deep.shape[0], 2) + deep.shape[2:])
        out = jaxseq.local_sequential(cfg, params, hidden, prompts)[:, prefix.shape[0] :]
        return loss_of_logits(rms_norm(out, head["norm"], cfg.rms_norm_eps) @ head["lm_head"])

    loss, grads = nnx.jit(nnx.value_and_grad(lambda m: loss_of_logits(m(ids))))(model)
    deep = model.deep_prompts[...] if tuning_mode == "deep_ptune" else None
    argnums = (0, 1) if deep is not None else 0
    ref_loss, ref_grads = jax.value_and_grad(reference, argnums=argnums)(model.prompt_embeddings[...], deep)
    ref_grads = ref_grads if deep is not None else (ref_grads,)
    assert rel_err(loss, ref_loss) < TOL
    assert rel_err(grads["prompt_embeddings"][...], ref_grads[0]) < TOL
    if deep is not None:
        assert rel_err(grads["deep_prompts"][...], ref_grads[1]) < TOL
    # Only prompts are trained; the checkpoint's weights stay frozen under nnx.Optimizer(wrt=nnx.Param).
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    embed_before = np.asarray(model.embed_tokens[...])
    optimizer.update(model, grads)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), embed_before)


@pytest.mark.parametrize(
    "change,served",
    [
        (dict(num_hidden_layers=3, layer_types=()), "4 blocks, not 3"),
        (dict(hidden_size=64, head_dim=0), "hidden size 32, not 64"),
        (dict(family="mistral"), "family llama, not mistral"),
    ],
)
def test_model_rejects_a_swarm_of_another_model(checkpoint, tiny_cfg, make_swarm, tmp_path, change, served):
    _, manager = make_swarm([(0, 2), (2, 4)])  # a swarm of the tiny 4-block Llama ...
    other = jaxseq.random_checkpoint(tmp_path / "other", dataclasses.replace(tiny_cfg, **change))
    with pytest.raises(ValueError, match=f"the swarm serves another model than .*: {served}"):
        jaxseq.DistributedCausalLM(other, manager)


def _processes_marked(mark: str) -> list[int]:
    """PIDs whose environment carries ``mark`` (every descendant of a process started with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.network
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_demo_end_to_end(tmp_path, family):
    mark = f"JAXSEQ_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "JAXSEQ_CACHE": str(tmp_path / "cache"), mark.split("=")[0]: mark.split("=")[1]}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxseq.cli",
            "demo",
            "--steps",
            "20",
            "--out",
            str(tmp_path / "out"),
            "--family",
            family,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    losses = np.load(tmp_path / "out" / "losses.npy")
    assert len(losses) == 20 and losses[-5:].mean() < losses[:5].mean() - 0.3
    assert "swarm after the kill" in result.stdout and "none lost" in result.stdout
    assert _processes_marked(mark) == []


@pytest.fixture(scope="module")
def two_servers(module_servers):
    """Blocks 0:2 and 2:4 on two real servers, shared by the tests of this module that only use them."""
    return module_servers([(0, 2), (2, 4)])


@pytest.mark.network
def test_swarm_command_lists_servers(two_servers):
    servers, prefix = two_servers
    result = subprocess.run(
        [sys.executable, "-m", "jaxseq.cli", "swarm", "--initial-peers", servers[0].maddr, "--dht-prefix", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    for server in servers:
        assert server.peer_id[-12:] in result.stdout
    assert "0:2" in result.stdout and "2:4" in result.stdout and "all covered" in result.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["jaxseq.cli", "demo", "--checkpoint", "/nonexistent/llama"],
            "checkpoint folder '/nonexistent/llama' does not exist",
        ),
        (
            [
                "jaxseq.cli",
                "swarm",
                "--initial-peers",
                "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWQ9aLNvG8q8WGY997cyw6QvhQaD8HcEBtq7NouxcybgQw",
                "--dht-prefix",
                "x",
            ],
            "could not join the swarm through initial peers",
        ),
        (
            ["jaxseq.server.main", "--checkpoint", "CKPT", "--blocks", "2:9", "--dht-prefix", "x", "--new-swarm"],
            "blocks 2:9 are outside the checkpoint's num_hidden_layers=4",
        ),
        (
            [
                "jaxseq.server.main",
                "--checkpoint",
                "/nonexistent/llama",
                "--blocks",
                "0:1",
                "--dht-prefix",
                "x",
                "--new-swarm",
            ],
            "does not exist",
        ),
    ],
)
def test_bad_arguments_exit_with_one_line(checkpoint, argv, message):
    argv = [str(checkpoint[0]) if a == "CKPT" else a for a in argv]
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("preallocate", [None, "true"], ids=["default", "user-set"])
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_server_shares_a_gpu_and_sets_its_matmul_precision(monkeypatch, preallocate, precision):
    """Before anything touches a device, jaxseq-server opts out of XLA's 75%-of-the-GPU preallocation
    (unless the user chose) and sets the float32 matmul precision it was given."""
    from jaxseq.server import main as server

    if preallocate is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preallocate)
    argv = ["--checkpoint", "/nonexistent/llama", "--blocks", "0:1", "--dht-prefix", "x", "--new-swarm"]
    try:
        assert server.main([*argv, "--matmul-precision", precision]) == 2  # the checkpoint is missing
        assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == (preallocate or "false")
        assert jax.config.jax_default_matmul_precision == precision
    finally:
        jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets it


@pytest.mark.network
def test_readme_flax_in_ten_lines_runs_as_written(checkpoint, two_servers):
    """The README's "Flax in ten lines", with only its placeholders filled in: real servers, a real checkpoint."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Flax in ten lines", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    servers, prefix = two_servers
    for placeholder, value in [
        ("/ip4/127.0.0.1/tcp/PORT/p2p/PEER", servers[0].maddr),
        ('"my-llama"', repr(prefix)),
        ('"path/to/llama"', repr(str(checkpoint[0]))),
    ]:
        assert placeholder in code, f"the README's example no longer has {placeholder}"
        code = code.replace(placeholder, value)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    try:
        ids = jnp.asarray(np.random.default_rng(0).integers(0, checkpoint[1].vocab_size, (2, 8)))
        losses = [
            float(namespace["train_step"](namespace["model"], namespace["optimizer"], ids, ids)) for _ in range(3)
        ]
    finally:
        namespace["manager"].close()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


EXAMPLES = Path(__file__).parents[1] / "examples"


def test_torch_bridge_example_runs_on_a_local_swarm():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "torch_bridge_training.py"), "--steps", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.network
def test_flax_example_runs_through_servers(checkpoint, two_servers):
    servers, prefix = two_servers
    args = ["--initial-peers", servers[0].maddr, "--dht-prefix", prefix, "--checkpoint", str(checkpoint[0])]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "flax_prompt_tuning.py"), *args, "--steps", "3", "--batch", "2", "--seq", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith("step")]) == 3
