"""LoRA trained by the client through frozen servers (``tuning_mode="lora"``): the servers apply the client's
LoRA weights, kept by content hash, and return their gradients. Against a local JAX reference with the same
LoRA (forward and gradients w.r.t. LoRA matrices, inputs and deep prompts), transformers + ``peft`` (the
exported adapter, greedy generation), and through failures: a server SIGKILLed mid-training loses no step."""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import jaxseq
from jaxseq.client.lora import LoraWeights
from jaxseq.client.routing import route
from jaxseq.models.blocks import local_sequential
from jaxseq.models.lora import load_adapter, random_lora_weights, with_adapter
from jaxseq.remote.records import ServerInfo, ServerRecord, ServerState
from jaxseq.testing.reference import fresh_rope

from helpers import Swarms, random_inputs, rel_err

pytestmark = pytest.mark.network
TOL = 1e-5
CLIENT = dict(min_backoff=0.05, max_backoff=0.5, deadline=60.0)
STEPS = 8


@pytest.fixture(scope="module")
def lora_swarm(checkpoint):
    """Servers of the tiny checkpoint: blocks 0:2, and 2:4 twice (one may be killed), the last two taking
    LoRA of rank up to 16. Yields (servers, prefix)."""
    with Swarms(checkpoint[0]) as swarms:
        yield swarms.start([(0, 2), (2, 4), (2, 4)], extra_args=["--max-lora-rank", "16"])


def _manager(lora_swarm, **config) -> jaxseq.RemoteSequenceManager:
    servers, prefix = lora_swarm
    live = [s for s in servers if s.process.poll() is None]
    return jaxseq.RemoteSequenceManager([live[0].maddr], prefix, jaxseq.ClientConfig(**{**CLIENT, **config}))


def _local(cfg, params, x, prompts, lora):
    """The reference: the blocks with the LoRA arrays merged in, run locally."""
    blocks = with_adapter(params, [{name: a[i] for name, a in lora.items()} for i in range(len(params))])
    return local_sequential(cfg, blocks, x, prompts)


def _loss(blocks):
    def loss(x, prompts, lora):
        out = blocks(x, prompts, lora)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=out.dtype)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _assert_equal(got, want):
    ((_, out), grads), ((_, out_ref), grads_ref) = got, want
    errors = {"outputs": rel_err(out, out_ref)}
    errors["inputs"], errors["prompts"] = rel_err(grads[0], grads_ref[0]), rel_err(grads[1], grads_ref[1])
    errors |= {name: rel_err(grads[2][name], grads_ref[2][name]) for name in grads_ref[2]}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("batch,seq,prompt_len,max_tokens", [(2, 7, 3, 8192), (5, 9, 0, 20)])
def test_forward_and_gradients_through_servers_equal_local(checkpoint, lora_swarm, batch, seq, prompt_len, max_tokens):
    """Through two real servers, with micro-batches too (max_tokens 20: three of them, whose LoRA gradients add,
    maybe through both servers of blocks 2:4)."""
    _, cfg, params = checkpoint
    x, prompts = random_inputs(cfg, batch, seq, prompt_len)
    lora = random_lora_weights(cfg, rank=4)
    want = _loss(lambda x, p, w: _local(cfg, params, x, p, w))(x, prompts, lora)
    with _manager(lora_swarm, max_tokens_in_batch=max_tokens) as manager:
        got = _loss(lambda x, p, w: jaxseq.remote_sequential(x, p, manager, w))(x, prompts, lora)
        given = sorted(t.peer for t in manager.timings if t.stage == "lora")
        used = sorted({t.peer for t in manager.timings if t.stage == "forward"})
    _assert_equal(got, want)
    assert given == used, given  # once per server used in the step: not per micro-batch, nor for backward


def test_weights_are_given_once_and_again_only_when_they_change(checkpoint, lora_swarm):
    _, cfg, params = checkpoint
    x, prompts = random_inputs(cfg, 2, 5, 0)
    lora = random_lora_weights(cfg, rank=2, targets=("q_proj", "down_proj"))
    step = _loss(lambda x, p, w: jaxseq.remote_sequential(x, p, manager, w))
    servers, _ = lora_swarm
    with _manager(lora_swarm, allowed_servers=(servers[0].peer_id, servers[1].peer_id)) as manager:
        given = lambda: sum(t.stage == "lora" for t in manager.timings)  # noqa: E731
        step(x, prompts, lora)
        step(x, prompts, lora)
        assert given() == 2  # to each of the two servers, once
        changed = {**lora, "q_proj_lora_a": lora["q_proj_lora_a"] * 1.5}
        got = step(x, prompts, changed)
        assert given() == 4
    _assert_equal(got, _loss(lambda x, p, w: _local(cfg, params, x, p, w))(x, prompts, changed))


def test_weights_evicted_by_a_server_are_given_again(checkpoint, tmp_path):
    """A server whose LoRA store holds one client's weights at a time: two clients in turn still compute exactly."""
    _, cfg, params = checkpoint
    x, prompts = random_inputs(cfg, 1, 4, 0)
    loras = [random_lora_weights(cfg, rank=2, targets=("q_proj",), seed=seed) for seed in (1, 2)]
    per_server = LoraWeights.of({k: np.asarray(v) for k, v in loras[0].items()})
    one_lora_mb = 1.5 * sum(a.nbytes for a in per_server.arrays.values()) / 2**20
    with Swarms(checkpoint[0]) as swarms:
        (server,), prefix = swarms.start([(0, 4)], extra_args=["--lora-mb", f"{one_lora_mb:.6f}"])
        with jaxseq.RemoteSequenceManager([server.maddr], prefix, jaxseq.ClientConfig(**CLIENT)) as manager:
            forward = jax.jit(lambda x, w: jaxseq.remote_sequential(x, None, manager, w))
            for lora in [*loras, loras[0]]:  # the third call names weights the second evicted
                assert rel_err(forward(x, lora), _local(cfg, params, x, None, lora)) < TOL
            # each given once, then the first again, once: its third call named weights the server had evicted
            assert sum(t.stage == "lora" for t in manager.timings) == 3
            info = manager.server_info(server.peer_id)
    assert info["jaxseq_lora"]["bytes"] <= one_lora_mb * 2**20


def _train(model, ids, steps: int, on_step=None) -> list[float]:
    """Adam on a small task, to answer token 7 after any token; the loss of each step."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full_like(ids, 7)).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        losses.append(float(step(model, optimizer)))
        if on_step is not None:
            on_step(i)
    return losses


def test_training_lowers_the_loss_and_loses_no_step_to_a_sigkill(checkpoint, lora_swarm):
    """deep_ptune+lora through the servers, with the 2:4 server SIGKILLed in the third step, between its forward
    and its backward (which then re-runs that span's forward on the other): the losses equal those of the same
    training on a local swarm, step for step."""
    path, cfg, params = checkpoint
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 12)))
    options = dict(tuning_mode="deep_ptune+lora", prompt_len=2, lora_rank=8, lora_alpha=16)
    local = jaxseq.LocalSwarm(cfg, params, spans=[(0, 2), (2, 4)])
    with local.sequence_manager(jaxseq.ClientConfig(**CLIENT)) as manager:
        want = _train(jaxseq.DistributedCausalLM(path, manager, **options, rngs=nnx.Rngs(0)), ids, STEPS)
    servers, _ = lora_swarm
    with _manager(lora_swarm) as manager:
        steps_done, killed = [0], []

        def killing_before_the_third_backward(call):
            async def call_after_the_kill(span, *args):
                if steps_done[0] == 2 and span.start == 2 and not killed:
                    killed.append(next(s for s in servers[1:] if s.peer_id == span.peer))
                    killed[0].kill()
                return await call(span, *args)

            return call_after_the_kill

        # a backward is one call, or part of a run of server-to-server hops: either way the server dies first
        manager._call_backward = killing_before_the_third_backward(manager._call_backward)
        manager._call_backward_hop = killing_before_the_third_backward(manager._call_backward_hop)
        model = jaxseq.DistributedCausalLM(path, manager, **options, rngs=nnx.Rngs(0))
        got = _train(model, ids, STEPS, lambda i: steps_done.__setitem__(0, i + 1))
        assert killed and manager.retries > 0  # the kill was met, and routed around
    assert rel_err(np.array(got), np.array(want)) < 1e-4, (got, want)
    # it learns the task, down to what the frozen head allows (from 10.35 to 9.80 here, on a local swarm too)
    assert got[-1] < got[0] - 0.4, got


def test_readme_client_lora_example_trains_and_saves(checkpoint, lora_swarm, monkeypatch, tmp_path):
    """The README's client LoRA example, its placeholders filled in: it trains, and saves an adapter."""
    path, cfg, _ = checkpoint
    servers, prefix = lora_swarm
    section = (Path(__file__).parents[1] / "README.md").read_text().split("## Training LoRA from the client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    for placeholder, value in [
        ("/ip4/127.0.0.1/tcp/PORT/p2p/PEER", servers[0].maddr), ('"my-llama"', repr(prefix)),
        ('"path/to/llama"', repr(str(path))),
    ]:  # fmt: skip
        assert placeholder in code, f"the README's example no longer has {placeholder}"
        code = code.replace(placeholder, value)
    ids = jnp.asarray(np.tile(np.arange(10) % 5, (2, 1)))  # a sequence to learn
    losses: list[float] = []

    def batches():  # the same batch, 5 times; and each step's loss
        for _ in range(5):
            losses.extend([float(namespace["loss"])] if "loss" in namespace else [])
            yield ids

    namespace = {"jaxseq": jaxseq, "nnx": nnx, "optax": optax, "batches": batches()}
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        if "manager" in namespace:
            namespace["manager"].close()
    losses.append(float(namespace["loss"]))
    assert len(losses) == 5 and np.isfinite(losses).all(), losses  # (learning is test_training_lowers_the_loss...'s)
    lora = namespace["model"].lora
    assert all(
        np.abs(np.asarray(b[...])).max() > 0 for b in lora.b.values()
    )  # trained away from PEFT's zeros    assert load_adapter(tmp_path / "my-trained-lora", cfg, range(4)).rank == 8


@pytest.fixture(scope="module")
def trained(checkpoint, lora_swarm, tmp_path_factory):
    """A model whose LoRA B matrices are random (as after training) saved with ``save_lora``: (model's logits of
    ``ids``, ids, the adapter's folder)."""
    path, cfg, _ = checkpoint
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 6))
    with _manager(lora_swarm) as manager:
        model = jaxseq.DistributedCausalLM(
            path, manager, tuning_mode="lora", lora_rank=4, lora_alpha=8, use_rslora=True, rngs=nnx.Rngs(1)
        )
        for i, target in enumerate(model.lora.b):
            b = model.lora.b[target]
            b[...] = 0.3 * jax.random.normal(jax.random.key(i), b[...].shape)
        folder = model.save_lora(tmp_path_factory.mktemp("trained") / "my-trained-lora")
        logits = np.asarray(model(jnp.asarray(ids)))
        tokens = model.generate(ids, max_new_tokens=6)
    return logits, ids, folder, tokens


def test_the_exported_adapter_loads_in_peft_with_equal_logits_and_generation(hf_model, trained):
    logits, ids, folder, tokens = trained
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), folder).eval()
    fresh_rope(adapted.base_model.model)
    with torch.no_grad():
        want = adapted(torch.from_numpy(ids)).logits.numpy()
        base = hf_model(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(logits, want) < TOL
    assert rel_err(want, base) > 0.01  # the adapter matters
    want_tokens = adapted.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False).numpy()
    np.testing.assert_array_equal(tokens, want_tokens)  # greedy generation with the client's LoRA equals peft's


def test_the_exported_adapter_is_served_by_jaxseq_server(checkpoint, trained):
    """Train on the client, then publish to the swarm: a server serving the folder computes the same logits."""
    path, cfg, _ = checkpoint
    logits, ids, folder, _ = trained
    assert load_adapter(folder, cfg, range(4)).name == "my-trained-lora"
    with Swarms(path) as swarms:
        (server,), prefix = swarms.start([(0, 4)], extra_args=["--adapters", str(folder)])
        config = jaxseq.ClientConfig(active_adapter="my-trained-lora", **CLIENT)
        with jaxseq.RemoteSequenceManager([server.maddr], prefix, config) as manager:
            served = np.asarray(jaxseq.DistributedCausalLM(path, manager)(jnp.asarray(ids)))
    assert rel_err(served, logits) < TOL


def test_a_model_without_lora_has_nothing_to_save(checkpoint, lora_swarm):
    with _manager(lora_swarm) as manager:
        model = jaxseq.DistributedCausalLM(checkpoint[0], manager, tuning_mode="deep_ptune", prompt_len=2)
        with pytest.raises(ValueError, match="trains no LoRA.*tuning_mode='lora'"):
            model.save_lora("unused")
        with pytest.raises(ValueError, match="not projections of a llama block"):
            jaxseq.DistributedCausalLM(checkpoint[0], manager, tuning_mode="lora", lora_targets=("qkv",))


def _record(peer: str, start: int, end: int, rank: int) -> ServerRecord:
    return ServerRecord(peer, start, end, ServerInfo(state=ServerState.ONLINE, throughput=1.0, client_lora_rank=rank))


def test_routing_skips_servers_that_take_no_client_lora_and_says_why():
    """Petals servers announce no client LoRA rank: a chain with LoRA goes around them, or fails by name."""
    records = [_record("petals", 0, 4, 0), _record("jaxseq-a", 0, 2, 16), _record("jaxseq-b", 2, 4, 8)]
    assert [s.peer for s in route(records, 0, 4, lora_rank=8)] == ["jaxseq-a", "jaxseq-b"]
    assert [s.peer for s in route(records, 0, 4)] == ["petals"]  # without LoRA, one hop is best
    with pytest.raises(jaxseq.LoraUnsupportedError, match="block 2 .* rank 16 .* highest rank its servers take is 8"):
        route(records, 0, 4, lora_rank=16)


def test_a_swarm_that_takes_no_client_lora_fails_fast(checkpoint):
    path, cfg, _ = checkpoint
    with Swarms(path) as swarms:
        (server,), prefix = swarms.start([(0, 4)], extra_args=["--max-lora-rank", "0"])
        with jaxseq.RemoteSequenceManager([server.maddr], prefix, jaxseq.ClientConfig(**CLIENT)) as manager:
            model = jaxseq.DistributedCausalLM(path, manager, tuning_mode="lora", lora_rank=2)
            with pytest.raises(jaxseq.LoraUnsupportedError, match="block 0 .* Lower lora_rank"):
                with jaxseq.swarm_errors(manager):
                    model(jnp.ones((1, 3), jnp.int32))
            assert manager.retries == 0


def test_lora_weights_that_are_not_finite_are_refused_before_sending(checkpoint, lora_swarm):
    _, cfg, _ = checkpoint
    lora = random_lora_weights(cfg, rank=2, targets=("q_proj",))
    lora["q_proj_lora_b"] = lora["q_proj_lora_b"].at[1, 0, 0].set(jnp.nan)
    with _manager(lora_swarm) as manager:
        with pytest.raises(ValueError, match="LoRA weights q_proj_lora_b .* non-finite"):
            with jaxseq.swarm_errors(manager):
                jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager, lora))(jnp.ones((1, 2, cfg.hidden_size)))
        assert not [t for t in manager.timings if t.stage == "lora"]


def test_lora_under_vmap_is_refused_by_name(make_swarm, tiny_cfg):
    _, manager = make_swarm([(0, 4)])
    lora = random_lora_weights(tiny_cfg, rank=2, targets=("q_proj",))
    xs = jnp.ones((3, 1, 2, tiny_cfg.hidden_size))
    with pytest.raises(Exception, match="can't be vmapped"):
        jax.vmap(lambda x: jaxseq.remote_sequential(x, None, manager, lora))(xs)


def test_a_backward_names_the_weights_its_forward_hashed_without_hashing_them_again(
    checkpoint, lora_swarm, monkeypatch
):
    """A training step hashes each block's LoRA weights once (in its forward); its backward reuses them. A
    backward whose forward state is gone (recomputed) hashes them itself."""
    _, cfg, params = checkpoint
    hashed: list[int] = []
    digest = jaxseq.client.lora.digest
    monkeypatch.setattr(jaxseq.client.lora, "digest", lambda block: hashed.append(1) or digest(block))
    x, prompts = random_inputs(cfg, 2, 5, 2)
    lora = random_lora_weights(cfg, rank=2, targets=("q_proj",))
    live = [s.peer_id for s in lora_swarm[0] if s.process.poll() is None]  # an earlier test SIGKILLs one
    with _manager(lora_swarm, allowed_servers=tuple(live[:2])) as manager:
        step = _loss(lambda x, p, w: jaxseq.remote_sequential(x, p, manager, w))
        got = step(x, prompts, lora)
        assert len(hashed) == cfg.num_hidden_layers
        hashed.clear()
        manager.saved.capacity = 0  # nothing kept: the backward runs the forward again, with weights it hashes
        assert rel_err(step(x, prompts, lora)[1][2]["q_proj_lora_a"], got[1][2]["q_proj_lora_a"]) < TOL
        assert len(hashed) == 2 * cfg.num_hidden_layers
    _assert_equal(got, _loss(lambda x, p, w: _local(cfg, params, x, p, w))(x, prompts, lora))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_a_local_swarm_applies_client_lora_of_other_families(family, tmp_path):
    """Other families' projections (Qwen2's biased q/k/v, Mistral's windows), in process: equal to local."""
    from test_families import _hf_model

    _hf_model(family).save_pretrained(tmp_path / family)
    cfg, params = jaxseq.load_checkpoint(tmp_path / family)
    x, prompts = random_inputs(cfg, 2, 6, 2)
    lora = random_lora_weights(cfg, rank=3)
    swarm = jaxseq.LocalSwarm(cfg, params, spans=[(0, 3), (3, 4)])
    with swarm.sequence_manager(jaxseq.ClientConfig(**CLIENT)) as manager:
        got = _loss(lambda x, p, w: jaxseq.remote_sequential(x, p, manager, w))(x, prompts, lora)
    _assert_equal(got, _loss(lambda x, p, w: _local(cfg, params, x, p, w))(x, prompts, lora))
