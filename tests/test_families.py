"""Every supported family against transformers 5 itself: checkpoints written by ``XForCausalLM.save_pretrained``
(sharded) with the family's own features switched on; blocks, logits (with and without deep prompts) and a
training step through real servers, each within 1e-5 of the reference; what is refused; hub ids offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxseq
from jaxseq.models.blocks import local_sequential
from jaxseq.models.checkpoint import load_checkpoint, load_head
from jaxseq.testing.reference import block_outputs, fresh_rope, low_precision_errors

from helpers import Swarms, rel_err, training_step

TOL = 1e-5
SEQ = 23  # longer than the sliding windows (8) and the llama3/dynamic original lengths (16), not a power of two
SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    vocab_size=101, rms_norm_eps=1e-5, max_position_embeddings=64,
)  # fmt: skip

# name -> (transformers config class, its arguments): each family with its own features on
MODELS = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
        attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=True,
    )),
    "llama-dynamic": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, max_position_embeddings=16,
    )),
    "llama-linear": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    )),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen3": (transformers.Qwen3Config, dict(
        head_dim=24, attention_bias=True, use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}  # fmt: skip
FAMILY = {"llama3": "llama", "llama-dynamic": "llama", "llama-linear": "llama"}


def _hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model whose weights (norms included) are far from their init, so that layout errors show."""
    config_class, features = MODELS[name]
    config = config_class(**{**SHAPE, **features}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def _written(name: str, tmp_path_factory) -> tuple[str, transformers.PreTrainedModel, Path]:
    """(name, transformers model, the sharded checkpoint transformers wrote of it)."""
    model = _hf_model(name)
    path = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return name, model, path


@pytest.fixture(scope="module", params=list(MODELS))
def family_model(request, tmp_path_factory):
    return _written(request.param, tmp_path_factory)


def _inputs(seed: int = 0, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, SEQ, SHAPE["hidden_size"])).astype(np.float32)


def test_config_has_the_family_features(family_model):
    name, _, path = family_model
    cfg = jaxseq.load_config(path)
    assert cfg.family == FAMILY.get(name, name)
    sliding, full = "sliding_attention", "full_attention"
    want = {
        "llama3": dict(head_dim=24, attention_bias=True, attention_out_bias=True, mlp_bias=True),
        "mistral": dict(sliding_window=8, layer_types=(sliding,) * 4),
        "qwen2": dict(attention_bias=True, attention_out_bias=False, layer_types=(full,) * 2 + (sliding,) * 2),
        "qwen3": dict(qk_norm=True, head_dim=24, attention_out_bias=True, sliding_window=8),
        "mixtral": dict(num_experts=4, num_experts_per_token=2, sliding_window=8),
    }.get(name, {})  # fmt: skip
    assert {key: getattr(cfg, key) for key in want} == want
    assert cfg.tie_word_embeddings == (name == "llama3")


def test_transformers4_config_form_gives_the_same_config(family_model, tmp_path):
    """transformers 4 wrote ``rope_theta`` and ``rope_scaling`` where transformers 5 writes ``rope_parameters``."""
    _, _, path = family_model
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert jaxseq.load_config(tmp_path) == jaxseq.load_config(path)


@pytest.mark.parametrize("start,end", [(0, 4), (1, 3), (2, 4)])
def test_blocks_equal_transformers(family_model, start, end):
    _, model, path = family_model
    x = _inputs()
    outputs = block_outputs(model, x)
    cfg, params = load_checkpoint(path, blocks=(start, end))
    got = jax.jit(lambda x: local_sequential(cfg, params, x, first=start))(outputs[start - 1] if start else x)
    assert rel_err(got, outputs[end - 1]) < TOL


def _swarm_model(path: Path, tuning_mode, prompt_len: int = 3):
    cfg, params = load_checkpoint(path)
    manager = jaxseq.LocalSwarm(cfg, params, [(0, 3), (2, 4)]).sequence_manager()
    model = jaxseq.DistributedCausalLM(path, manager, tuning_mode=tuning_mode, prompt_len=prompt_len, rngs=nnx.Rngs(1))
    return model, manager


def _hf_logits(model, ids: np.ndarray, prompts=None, deep=None) -> np.ndarray:
    """transformers' logits; with ``prompts`` prepended to the embeddings and ``deep[i]`` added to the first
    positions before block i (what deep prompt tuning computes), the prompt positions dropped."""
    embeds = model.model.embed_tokens(torch.from_numpy(ids))
    hooks = []
    if prompts is not None:
        embeds = torch.cat([torch.from_numpy(prompts)[None].expand(len(ids), -1, -1), embeds], dim=1)
        for i, layer in enumerate(model.model.layers):

            def add(module, args, kwargs, i=i):
                hidden = args[0].clone()
                hidden[:, : deep.shape[1]] += torch.from_numpy(deep[i])
                return (hidden, *args[1:]), kwargs

            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    fresh_rope(model)
    try:
        with torch.no_grad():
            logits = model(inputs_embeds=embeds).logits.numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return logits if prompts is None else logits[:, prompts.shape[0] :]


@pytest.mark.parametrize("tuning_mode", [None, "deep_ptune"])
def test_logits_equal_transformers(family_model, tuning_mode):
    _, hf, path = family_model
    model, manager = _swarm_model(path, tuning_mode)
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, SEQ - 3))
    try:
        prompts = deep = None
        if tuning_mode:
            deep = np.random.default_rng(1).normal(0, 0.5, model.deep_prompts[...].shape).astype(np.float32)
            model.deep_prompts[...] = jnp.asarray(deep)
            prompts, deep = np.array(model.prompt_embeddings[...]), deep[:, 0]
        got = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(ids))
    finally:
        manager.close()
    assert rel_err(got, _hf_logits(hf, ids, prompts, deep)) < TOL


@pytest.mark.network
def test_training_and_generation_through_servers(family_model):
    """Two real servers with overlapping spans: a training step's outputs and gradients of inputs and deep
    prompts equal the same blocks under jax.jit in this process, and greedy generation (batch 1 and 3, 32
    new tokens) equals transformers' ``generate`` token for token."""
    _, hf, path = family_model
    cfg, params = load_checkpoint(path)
    x = jnp.asarray(_inputs(batch=2))
    prompts = 0.5 * jax.random.normal(jax.random.key(2), (cfg.num_hidden_layers, 2, 3, cfg.hidden_size))
    want = training_step(lambda x, p: local_sequential(cfg, params, x, p))(x, prompts)
    with Swarms(path) as swarms:
        servers, prefix = swarms.start([(0, 3), (1, 4)])
        config = jaxseq.ClientConfig(min_backoff=0.05)
        with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
            assert manager.model_families == {cfg.family}
            got = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))(x, prompts)
            model = jaxseq.DistributedCausalLM(path, manager)
            for batch in (1, 3):
                ids = np.random.default_rng(batch).integers(0, SHAPE["vocab_size"], (batch, 5))
                fresh_rope(hf)
                want_ids = hf.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False).numpy()
                np.testing.assert_array_equal(model.generate(ids, max_new_tokens=32), want_ids)
    ((_, out), grads), ((_, out_ref), grads_ref) = got, want
    assert rel_err(out, out_ref) < TOL and all(rel_err(g, r) < TOL for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_servers_are_as_close_to_float32_as_transformers(family_model, dtype):
    _, model, path = family_model
    ours, theirs = low_precision_errors(model, path, dtype, _inputs(batch=2))
    assert ours <= 1.5 * theirs, (ours, theirs)


# --- refused configs ----------------------------------------------------------------------------
REFUSED = [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
    ("mistral", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ("qwen3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_token"),
    ("gemma", {}, "model_type 'gemma' is not supported"),
]


@pytest.mark.parametrize("model_type,change,named", REFUSED, ids=[f"{t}-{n}" for t, _, n in REFUSED])
def test_unsupported_configs_are_refused_by_name(tmp_path, model_type, change, named):
    config = {**SHAPE, "model_type": model_type, "num_local_experts": 4, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(named)):
        jaxseq.load_config(tmp_path)


def test_model_families_round_trip_through_jaxseq_checkpoints(tmp_path):
    """``random_checkpoint`` writes every family so that transformers loads it and computes what jaxseq does."""
    for name, family in [("mixtral", "mixtral"), ("qwen3", "qwen3")]:
        config_class, features = MODELS[name]
        cfg = jaxseq.load_config(_save_config(tmp_path / name, config_class(**{**SHAPE, **features})))
        path = jaxseq.random_checkpoint(tmp_path / f"{name}-random", cfg, std=0.2)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        loaded_cfg, params = load_checkpoint(path)
        assert loaded_cfg == cfg and cfg.family == family
        x = _inputs()
        assert rel_err(local_sequential(cfg, params, jnp.asarray(x)), block_outputs(hf.eval(), x)[-1]) < TOL


def _save_config(folder: Path, config) -> Path:
    config.save_pretrained(folder)
    return folder


# --- hub ids, offline ---------------------------------------------------------------------------
def _hub_cache(root: Path, repo_id: str, checkpoint: Path, keep) -> Path:
    """A Hugging Face hub cache holding ``repo_id`` at one commit with those of ``checkpoint``'s files that
    ``keep(name)`` accepts, laid out as ``huggingface_hub`` writes it (blobs, refs, snapshot links)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(checkpoint.iterdir()):
        if keep(file.name):
            blob = repo / "blobs" / f"blob-{file.name}"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """``lay_out(checkpoint, keep)`` makes an offline hub cache holding ``jaxseq-test/tiny`` and returns the id."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def lay_out(checkpoint: Path, keep) -> str:
        _hub_cache(tmp_path / "hub", "jaxseq-test/tiny", checkpoint, keep)
        return "jaxseq-test/tiny"

    return lay_out


def _shards_holding(checkpoint: Path, pattern: str) -> set[str]:
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    return {file for key, file in weight_map.items() if re.match(pattern, key)}


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    return _written("qwen2", tmp_path_factory)


def test_hub_id_reads_only_the_shards_of_its_blocks(qwen2_model, offline_hub, monkeypatch):
    _, _, path = qwen2_model
    needed = _shards_holding(path, r"model\.layers\.[23]\.")
    assert needed != _shards_holding(path, r"model\.layers\.")  # the cache lacks other blocks' shards
    repo = offline_hub(path, lambda file: file in needed or not file.endswith(".safetensors"))
    fetched = []
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo_id, name, **kw: fetched.append(name) or real(repo_id, name, **kw),
    )
    cfg, params = load_checkpoint(repo, blocks=(2, 4))
    want_cfg, want = load_checkpoint(path, blocks=(2, 4))
    assert cfg == want_cfg and all(np.array_equal(params[i][k], want[i][k]) for i in range(2) for k in want[i])
    assert set(fetched) - {"config.json", "model.safetensors.index.json"} == needed
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set: only the hub cache was searched"):
        load_checkpoint(repo, blocks=(0, 1))


def test_hub_id_client_fetches_only_the_head(qwen2_model, offline_hub):
    _, _, path = qwen2_model
    head_shards = _shards_holding(path, r"model\.(embed_tokens|norm)\.|lm_head\.")
    assert head_shards != _shards_holding(path, r".")  # the cache lacks the blocks' shards
    repo = offline_hub(path, lambda file: file in head_shards or not file.endswith(".safetensors"))
    head = load_head(repo)
    want = load_head(path)
    assert all(np.array_equal(head[k], want[k]) for k in want)
    cfg, params = load_checkpoint(path)
    with jaxseq.LocalSwarm(cfg, params, [(0, 4)]).sequence_manager() as manager:
        model = jaxseq.DistributedCausalLM(repo, manager)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (1, 5)))
        assert model(ids).shape == (1, 5, SHAPE["vocab_size"])


@pytest.mark.network
def test_servers_load_a_hub_id_offline(qwen2_model, tmp_path):
    _, _, path = qwen2_model
    cache = _hub_cache(tmp_path / "hub", "jaxseq-test/tiny", path, lambda file: True)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cfg, params = load_checkpoint(path)
    x = jnp.asarray(_inputs(batch=1))
    with Swarms("jaxseq-test/tiny", env=env) as swarms:
        servers, prefix = swarms.start([(0, 4)], extra_args=["--revision", "main"])
        with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix) as manager:
            got = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))(x)
    assert rel_err(got, local_sequential(cfg, params, x)) < TOL
