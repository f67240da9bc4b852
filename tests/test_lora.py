"""LoRA adapters served by jaxseq servers (``--adapters``, picked per request by ``active_adapter``) against
transformers + ``peft`` on the same checkpoint and adapter: logits, gradients of inputs and deep prompts,
and greedy generation through two real servers, for Llama (biases, tied embeddings, llama3 rope, rank-
stabilised scaling) and Qwen2 (sliding windows); what is refused, and how fast a missing adapter fails."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from test_families import SHAPE, _hf_model, offline_hub  # noqa: F401  (offline_hub: a fixture used below)

import jaxseq
from jaxseq.client.routing import Span, route
from jaxseq.models.blocks import local_sequential
from jaxseq.models.checkpoint import load_checkpoint, load_head
from jaxseq.models.decoder import lm_logits
from jaxseq.models.lora import CONFIG_FILE, WEIGHTS_FILE, load_adapter, random_adapter, with_adapter
from jaxseq.remote.records import ServerInfo, ServerRecord, ServerState
from jaxseq.server.activation_cache import CacheMiss
from jaxseq.server.backend import BlockBackend
from jaxseq.server.batching import StepBatcher
from jaxseq.server.compute_queue import ComputeQueue
from jaxseq.testing.reference import block_outputs, fresh_rope

from helpers import Swarms, matches, random_inputs, rel_err, training_step

TOL = 1e-5
SEQ = 13
# family -> (test_families' model, the adapter's peft LoraConfig arguments)
ADAPTED = {
    "llama": ("llama3", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "qwen2": ("qwen2", dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])),
}  # fmt: skip
CLIENT = dict(min_backoff=0.05, max_backoff=0.5, deadline=60.0)


def _peft_model(name: str, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the transformers model, the same model with a random adapter, saved by peft at ``path``, on it). Both
    A and B are random (peft's ``init_lora_weights=False``): a fresh adapter's B is zero and would test nothing."""
    base = _hf_model(ADAPTED[name][0])
    torch.manual_seed(1)
    adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **ADAPTED[name][1]))
    adapted.save_pretrained(path)
    return base, adapted.base_model.model.eval()


@pytest.fixture(scope="module", params=list(ADAPTED))
def adapted_swarm(request, tmp_path_factory):
    """A family's checkpoint and peft adapter, and two servers (blocks 0:3 and 1:4) serving the adapter under
    its folder's name and as ``renamed``: (name, base model, adapted model, checkpoint, adapter, maddr, prefix)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"lora-{name}")
    base, adapted = _peft_model(name, tmp / "my-lora")
    base.save_pretrained(tmp / "model")
    with Swarms(tmp / "model") as swarms:
        adapters = ["--adapters", str(tmp / "my-lora"), f"renamed={tmp / 'my-lora'}"]
        servers, prefix = swarms.start([(0, 3), (1, 4)], extra_args=adapters)
        yield name, base, adapted, tmp / "model", tmp / "my-lora", servers[0].maddr, prefix


def _manager(swarm, adapter: str | None) -> jaxseq.RemoteSequenceManager:
    *_, maddr, prefix = swarm
    return jaxseq.RemoteSequenceManager([maddr], prefix, jaxseq.ClientConfig(active_adapter=adapter, **CLIENT))


_WEIGHTS = np.linspace(-1, 1, SHAPE["vocab_size"]).astype(np.float32)


def _loss_of_logits(logits):
    """A read-out that weighs every logit differently, in torch or JAX."""
    if isinstance(logits, torch.Tensor):
        return (logits.sin() * torch.from_numpy(_WEIGHTS)).sum()
    return (jnp.sin(logits) * _WEIGHTS).sum()


def _torch_reference(model, x: np.ndarray, deep: np.ndarray):
    """transformers' logits of ``inputs_embeds=x`` with ``deep[i]`` added to the first positions before block
    i, and the gradients of ``_loss_of_logits`` w.r.t. ``x`` and ``deep``."""
    x_t, deep_t = (torch.from_numpy(a).requires_grad_(True) for a in (x, deep))

    def add(module, args, kwargs, i):
        hidden = args[0].clone()
        hidden[:, : deep.shape[2]] += deep_t[i]
        return (hidden, *args[1:]), kwargs

    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: add(m, a, k, i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    fresh_rope(model)
    try:
        logits = model(inputs_embeds=x_t).logits
        _loss_of_logits(logits).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return logits.detach().numpy(), x_t.grad.numpy(), deep_t.grad.numpy()


def _inputs(cfg, batch: int = 2, prompt_len: int = 3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, SEQ, cfg.hidden_size)).astype(np.float32)
    deep = rng.normal(0, 0.5, (cfg.num_hidden_layers, batch, prompt_len, cfg.hidden_size)).astype(np.float32)
    return x, deep


@pytest.mark.network
def test_outputs_and_gradients_with_the_adapter_equal_peft(adapted_swarm):
    name, _, adapted, path, _, *_ = adapted_swarm
    cfg, head = jaxseq.load_config(path), load_head(path)
    x, deep = _inputs(cfg)
    want = _torch_reference(adapted, x, deep)

    with _manager(adapted_swarm, "renamed") as manager:

        def loss(x, deep):
            logits = lm_logits(
                jaxseq.remote_sequential(x, deep, manager), head["norm"], head["lm_head"], cfg.rms_norm_eps
            )
            return _loss_of_logits(logits), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, deep)
    errors = [rel_err(got, ref) for got, ref in zip((logits, *grads), want)]
    assert max(errors) < TOL, errors
    base_logits = _torch_reference(adapted_swarm[1], x, deep)[0]
    assert rel_err(want[0], base_logits) > 0.05  # the adapter matters


@pytest.mark.network
def test_readme_lora_example_generates_as_peft(adapted_swarm):
    """The README's LoRA client example, its placeholders filled in: greedy tokens equal transformers + peft's."""
    _, _, adapted, path, _, maddr, prefix = adapted_swarm
    section = (Path(__file__).parents[1] / "README.md").read_text().split("## LoRA adapters", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    for placeholder, value in [
        ("/ip4/127.0.0.1/tcp/PORT/p2p/PEER", maddr), ('"my-llama"', repr(prefix)), ('"path/to/llama"', repr(str(path)))
    ]:  # fmt: skip
        assert placeholder in code, f"the README's example no longer has {placeholder}"
        code = code.replace(placeholder, value)
    ids = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], (2, 5))
    namespace = {"jaxseq": jaxseq, "input_ids": ids}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        if "manager" in namespace:
            namespace["manager"].close()
    fresh_rope(adapted)
    want = adapted.generate(torch.from_numpy(ids), max_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(namespace["new_ids"], want)


@pytest.mark.network
def test_without_active_adapter_servers_compute_the_base_model(adapted_swarm):
    _, base, _, path, *_ = adapted_swarm
    cfg = jaxseq.load_config(path)
    x, deep = _inputs(cfg)
    with _manager(adapted_swarm, None) as manager:
        assert {r.info.adapters for r in manager.records} == {("my-lora", "renamed")}
        model = jaxseq.DistributedCausalLM(path, manager)
        ids = np.random.default_rng(4).integers(0, SHAPE["vocab_size"], (2, 7))
        got = model(jnp.asarray(ids))
    fresh_rope(base)
    with torch.no_grad():
        want = base(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(got, want) < TOL


@pytest.mark.network
def test_a_missing_adapter_fails_fast_and_by_name(adapted_swarm):
    *_, path, _, _, _ = adapted_swarm
    x = jnp.ones((1, 4, SHAPE["hidden_size"]))
    with _manager(adapted_swarm, "org/no-such-lora") as manager:
        started = time.monotonic()
        with pytest.raises(jaxseq.MissingAdapterError, match=r"adapter 'org/no-such-lora' \(they serve: 'my-lora'"):
            with jaxseq.swarm_errors(manager):
                jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))(x)
        assert time.monotonic() - started < 5  # not retried until the deadline
        # a server asked for it directly refuses, by name, and keeps serving
        peer = next(r.peer for r in manager.records if r.start == 0)
        with pytest.raises(Exception, match=r"adapter 'org/no-such-lora' not found: this server serves 'my-lora'"):
            manager.run(manager.forward(Span(peer, 0, 3), np.ones((1, 4, SHAPE["hidden_size"]), np.float32),
                                        np.zeros((3, 1, 0, SHAPE["hidden_size"]), np.float32), timeout=30))  # fmt: skip
        assert manager.server_info(peer)["jaxseq_computed"]["forward"] >= 0


@pytest.mark.network
def test_an_inference_session_keeps_the_adapter_of_its_first_request(adapted_swarm):
    """``rpc_inference`` as a Petals client speaks it: a session naming an adapter the server lacks is refused, and
    one opened with an adapter refuses a step naming another."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from jaxseq.remote import protocol

    *_, prefix = adapted_swarm
    x = protocol.serialize(np.zeros((1, 2, SHAPE["hidden_size"]), np.float32))

    def request(**metadata) -> runtime_pb2.ExpertRequest:
        uids = protocol.span_uids(prefix, 0, 3)
        return runtime_pb2.ExpertRequest(uid=uids, tensors=[x], metadata=protocol.encode_metadata(metadata))

    with _manager(adapted_swarm, None) as manager:
        peer = PeerID.from_base58(next(r.peer for r in manager.records if r.start == 0))

        async def replies(*requests: runtime_pb2.ExpertRequest) -> list:
            """A reply per request, the stream left open meanwhile as a client's session leaves it."""

            async def sent():
                for one in requests:
                    yield one
                await asyncio.sleep(60)

            name = f"{protocol.HANDLER}.rpc_inference"
            stream = await manager._open_p2p.iterate_protobuf_handler(peer, name, sent(), runtime_pb2.ExpertResponse)
            return [await asyncio.wait_for(stream.__anext__(), 30) for _ in requests]

        with pytest.raises(Exception, match="adapter 'nope' not found: this server serves 'my-lora', 'renamed'"):
            manager.run(replies(request(max_length=8, active_adapter="nope")))
        with pytest.raises(Exception, match="must name adapter 'renamed', as its first request did"):
            manager.run(replies(request(max_length=8, active_adapter="renamed"), request(active_adapter="my-lora")))
        opened = request(max_length=8, active_adapter="renamed")
        assert len(manager.run(replies(opened, request(active_adapter="renamed")))) == 2


def test_routing_takes_only_servers_announcing_the_adapter():
    def record(peer: str, start: int, end: int, *adapters: str) -> ServerRecord:
        return ServerRecord(peer, start, end, ServerInfo(state=ServerState.ONLINE, throughput=10.0, adapters=adapters))

    # the fastest, furthest-reaching server lacks the adapter
    records = [record("fast", 0, 4), record("a", 0, 2, "x", "y"), record("b", 2, 4, "y")]
    assert [(s.peer, s.start, s.end) for s in route(records, 0, 4, adapter="y")] == [("a", 0, 2), ("b", 2, 4)]
    assert [s.peer for s in route(records, 0, 4)] == ["fast"]
    with pytest.raises(
        jaxseq.MissingAdapterError, match=r"no server of block 2 serves adapter 'x' \(they serve: 'y'\)"
    ):
        route(records, 0, 4, adapter="x")
    with pytest.raises(jaxseq.MissingBlocksError):  # no holder at all: the servers may be coming, so retried
        route(records[1:2], 0, 4, adapter="x")


# --- loading, without servers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """(transformers model, peft model, checkpoint, adapter folder) of the Llama case."""
    tmp = tmp_path_factory.mktemp("lora-local")
    base, adapted = _peft_model("llama", tmp / "adapter")
    base.save_pretrained(tmp / "model")
    return base, adapted, tmp / "model", tmp / "adapter"


def test_served_blocks_read_only_their_tensors_and_equal_peft_blocks(llama_adapter):
    _, adapted, path, folder = llama_adapter
    cfg, params = load_checkpoint(path, blocks=(1, 3))
    adapter = load_adapter(folder, cfg, range(1, 3))
    assert adapter.name == "adapter" and adapter.start == 1 and len(adapter.blocks) == 2
    assert adapter.scaling == pytest.approx(8 / 2)  # use_rslora: alpha / sqrt(r)
    x = np.random.default_rng(0).normal(size=(2, SEQ, cfg.hidden_size)).astype(np.float32)
    outputs = block_outputs(adapted, x)
    got = local_sequential(cfg, with_adapter(params, adapter.blocks), jnp.asarray(outputs[0]), first=1)
    assert rel_err(got, outputs[2]) < TOL


def test_adapters_of_the_same_shapes_share_compiled_functions(llama_adapter, tmp_path):
    _, _, path, folder = llama_adapter
    cfg, params = load_checkpoint(path)
    other = random_adapter(tmp_path / "other", cfg, rank=4, alpha=2, use_rslora=True, seed=5)
    backend = BlockBackend(
        cfg, params, adapters=[load_adapter(folder, cfg, range(4)), load_adapter(other, cfg, range(4))]
    )
    x, prompts = np.ones((1, 5, cfg.hidden_size), np.float32), np.zeros((4, 1, 0, cfg.hidden_size), np.float32)
    outputs = [backend.forward(x, prompts, 0, 4, adapter=name) for name in ("", "adapter", "other")]
    assert backend.compile_count == 2  # without an adapter, and with one of these shapes
    assert rel_err(outputs[1], outputs[2]) > 0.01 and rel_err(outputs[0], outputs[1]) > 0.01
    with pytest.raises(ValueError, match="adapter 'nope' not found: this server serves"):
        backend.forward(x, prompts, 0, 4, adapter="nope")


def test_random_adapter_loads_in_peft_with_equal_outputs(llama_adapter, tmp_path):
    base, _, path, _ = llama_adapter
    cfg, params = load_checkpoint(path)
    folder = random_adapter(tmp_path / "random", cfg, rank=2, alpha=3, targets=("k_proj", "up_proj"), std=0.3)
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).base_model.model.eval()
    x = np.random.default_rng(1).normal(size=(1, SEQ, cfg.hidden_size)).astype(np.float32)
    adapter = load_adapter(folder, cfg, range(4))
    got = local_sequential(cfg, with_adapter(params, adapter.blocks), jnp.asarray(x))
    assert rel_err(got, block_outputs(adapted, x)[-1]) < TOL
    assert rel_err(got, block_outputs(base, x)[-1]) > 0.01


def _changed(folder: Path, tmp: Path, config=None, tensors=None) -> Path:
    """A copy of the adapter ``folder`` with ``config(dict)`` and ``tensors(dict)`` applied."""
    raw = json.loads((folder / CONFIG_FILE).read_text())
    weights = safetensors.numpy.load_file(str(folder / WEIGHTS_FILE))
    tmp.mkdir()
    (tmp / CONFIG_FILE).write_text(json.dumps(config(raw) if config else raw))
    safetensors.numpy.save_file(tensors(weights) if tensors else weights, str(tmp / WEIGHTS_FILE))
    return tmp


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
REFUSED = [
    ("dora", lambda c: {**c, "use_dora": True}, None, "use_dora=True is not supported"),
    ("bias", lambda c: {**c, "bias": "all"}, None, "bias='all' is not supported"),
    ("modules-to-save", lambda c: {**c, "modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ("rank-pattern", lambda c: {**c, "rank_pattern": {"q_proj": 2}}, None, "rank_pattern"),
    ("not-lora", lambda c: {**c, "peft_type": "IA3"}, None, "peft_type 'IA3' is not supported"),
    ("rank", lambda c: {**c, "r": 5}, None, "has shape (4, 96); r=5 and the model need (5, 96)"),
    ("target", None, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)},
     "tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA weight of a projection jaxseq adapts"),
    ("lora-bias", None, lambda t: {**t, Q_A.replace("weight", "bias"): np.zeros(4, np.float32)}, "lora_A.bias"),
    ("beyond-the-model", None, lambda t: {**t, Q_A.replace("layers.1", "layers.9"): t[Q_A]}, "of block 9"),
    ("half-a-pair", None, lambda t: {k: v for k, v in t.items() if k != Q_A}, "q_proj has lora_B without its pair"),
]  # fmt: skip


@pytest.mark.parametrize("case,config,tensors,named", REFUSED, ids=[case for case, *_ in REFUSED])
def test_what_jaxseq_does_not_compute_is_refused_by_name(llama_adapter, tmp_path, case, config, tensors, named):
    _, _, path, folder = llama_adapter
    changed = _changed(folder, tmp_path / case, config, tensors)
    with pytest.raises(ValueError, match=re.escape(named)):
        load_adapter(changed, jaxseq.load_config(path), range(4))


@pytest.mark.parametrize(
    "adapters,message",
    [
        (["ADAPTER"], "use_dora=True is not supported by jaxseq's LoRA"),
        (["a=ADAPTER", "a=ADAPTER"], "adapter names must be unique and not empty; 'a' is not"),
        (["=ADAPTER"], "NAME=LOCATION needs both parts"),
    ],
    ids=["dora", "same-name", "no-name"],
)
def test_a_server_given_a_bad_adapter_exits_with_one_line(llama_adapter, tmp_path, adapters, message):
    _, _, path, folder = llama_adapter
    dora = _changed(folder, tmp_path / "dora", lambda c: {**c, "use_dora": True})
    argv = ["--checkpoint", str(path), "--blocks", "0:4", "--dht-prefix", "x", "--new-swarm", "--adapters"]
    argv += [a.replace("ADAPTER", str(dora if "dora" in message else folder)) for a in adapters]
    result = subprocess.run(
        [sys.executable, "-m", "jaxseq.server.main", *argv], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and message in lines[-1] and "Traceback" not in result.stderr, result.stderr


def test_missing_files_are_named(llama_adapter, tmp_path):
    _, _, path, folder = llama_adapter
    cfg = jaxseq.load_config(path)
    with pytest.raises(FileNotFoundError, match="is neither a folder nor a hub id"):
        load_adapter(tmp_path / "nowhere", cfg, range(4))
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="adapter_model.safetensors not found; jaxseq reads safetensors only"):
        load_adapter(tmp_path / "no-weights", cfg, range(4))


def test_a_hub_id_is_read_offline_and_named_by_it(llama_adapter, offline_hub):  # noqa: F811
    _, _, path, folder = llama_adapter
    cfg = jaxseq.load_config(path)
    repo = offline_hub(folder, lambda file: True)
    adapter, want = load_adapter(repo, cfg, range(2, 4)), load_adapter(folder, cfg, range(2, 4))
    assert adapter.name == repo == "jaxseq-test/tiny"
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(adapter.blocks, want.blocks) for k in b)


def test_a_local_swarm_serves_adapters_as_servers_do(llama_adapter):
    _, _, path, folder = llama_adapter
    cfg, params = load_checkpoint(path)
    adapter = load_adapter(folder, cfg, range(4))
    adapted = with_adapter(params, adapter.blocks)
    swarm = jaxseq.LocalSwarm(cfg, params, [(0, 3), (1, 4)], adapters=[adapter])
    x, prompts = random_inputs(cfg, 2, 7, 3)
    want = training_step(lambda x, p: local_sequential(cfg, adapted, x, p))(x, prompts)
    with swarm.sequence_manager(jaxseq.ClientConfig(active_adapter="adapter")) as manager:
        got = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))(x, prompts)
        with manager.inference_session(max_length=8, batch_size=2) as session:
            stepped = session.step(np.asarray(x[:, :5]))
    assert matches(got, want)
    assert rel_err(stepped, local_sequential(cfg, adapted, x[:, :5])) < TOL
    with swarm.sequence_manager(jaxseq.ClientConfig(active_adapter="nope")) as manager:
        with pytest.raises(jaxseq.MissingAdapterError, match="adapter 'nope'"), jaxseq.swarm_errors(manager):
            jaxseq.remote_sequential(x, None, manager)


# --- what a backend keeps apart ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(llama_adapter, tmp_path_factory):
    """A backend of the Llama checkpoint's 4 blocks serving two adapters of the same shapes, and its config."""
    _, _, path, folder = llama_adapter
    cfg, params = load_checkpoint(path)
    other = random_adapter(tmp_path_factory.mktemp("other") / "other", cfg, rank=4, alpha=2, use_rslora=True, seed=5)
    adapters = [load_adapter(folder, cfg, range(4)), load_adapter(other, cfg, range(4))]
    return BlockBackend(cfg, params, adapters=adapters), cfg


def test_a_kept_forward_serves_only_a_backward_with_its_adapter(two_adapters):
    backend, cfg = two_adapters
    rng = np.random.default_rng(2)
    x, grad = (rng.normal(size=(2, 6, cfg.hidden_size)).astype(np.float32) for _ in range(2))
    prompts = np.zeros((4, 2, 0, cfg.hidden_size), np.float32)
    want = backend.backward(x, prompts, grad, 0, 4, adapter="other")[0]  # computed afresh
    backend.forward(x, prompts, 0, 4, cache_key="k", adapter="adapter")
    hits = backend.cache.hits
    got = backend.backward(x, prompts, grad, 0, 4, cache_key="k", adapter="other")[0]
    assert backend.cache.hits == hits and rel_err(got, want) < TOL  # not the other adapter's kept forward
    with pytest.raises(CacheMiss):
        backend.backward_of_cached(grad, 0, 4, "k", adapter="other")


def test_sessions_with_different_adapters_are_never_computed_together(two_adapters):
    """Decode steps of concurrent sessions are batched only with sessions of the same adapter; each session's
    outputs equal those of a session alone."""
    backend, cfg = two_adapters
    batcher = StepBatcher(backend, ComputeQueue(max_waiting=8), max_rows=64, wait_s=0.05)
    rng = np.random.default_rng(3)
    first, step = rng.normal(size=(1, 3, cfg.hidden_size)), rng.normal(size=(1, 1, cfg.hidden_size))
    first, step = first.astype(np.float32), step.astype(np.float32)
    names = ["adapter", "other", "other", ""]

    async def run(together: bool) -> list[np.ndarray]:
        sessions = [await backend.open_session(1, 8, 0, 4, timeout=0.0, adapter=name) for name in names]
        try:
            for session in sessions:
                await batcher.run(session, first, backend.no_prompts(session))
            if together:
                replies = await asyncio.gather(*[batcher.run(s, step, backend.no_prompts(s)) for s in sessions])
            else:
                replies = [await batcher.run(s, step, backend.no_prompts(s)) for s in sessions]
            return [out for out, _ in replies]
        finally:
            for session in sessions:
                session.close()

    alone = asyncio.run(run(together=False))
    calls = batcher.calls
    together = asyncio.run(run(together=True))
    assert batcher.calls - calls == len(names) + 3  # first steps alone, then one call per adapter
    assert all(rel_err(a, b) < TOL for a, b in zip(together, alone))
    assert rel_err(alone[0], alone[1]) > 0.01 and rel_err(alone[1], alone[3]) > 0.01


def test_mixtral_attention_adapter_equals_peft(tmp_path):
    """Mixtral's experts take no LoRA in jaxseq; its attention projections do, as peft computes them."""
    base = _hf_model("mixtral")
    torch.manual_seed(2)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(base), config)
    adapted.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "model")
    cfg, params = load_checkpoint(tmp_path / "model")
    adapter = load_adapter(tmp_path / "adapter", cfg, range(cfg.num_hidden_layers))
    x = np.random.default_rng(0).normal(size=(2, SEQ, cfg.hidden_size)).astype(np.float32)
    got = local_sequential(cfg, with_adapter(params, adapter.blocks), jnp.asarray(x))
    assert rel_err(got, block_outputs(adapted.base_model.model.eval(), x)[-1]) < TOL
    with pytest.raises(ValueError, match="targets \\['gate_proj'\\] are not projections of a mixtral block"):
        random_adapter(tmp_path / "experts", cfg, targets=("gate_proj",))
