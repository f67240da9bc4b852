"""jaxseq.checkpoint against real transformers Llama checkpoints: loading, validation, round trips."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

from jaxseq.models.blocks import local_sequential
from jaxseq.models.checkpoint import load_checkpoint, load_head, random_checkpoint, write_checkpoint
from jaxseq.models.config import LlamaConfig

NUM_LAYERS = 4
HF_KWARGS = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_hidden_layers=NUM_LAYERS,
    vocab_size=101,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)


def _hf_model(seed: int, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random Llama whose weights (norms included) have std 0.2, so layout errors show."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**HF_KWARGS, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def _inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 7, HF_KWARGS["hidden_size"])).astype(np.float32)


def _hf_hidden(model: transformers.LlamaForCausalLM, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.model(inputs_embeds=torch.from_numpy(x), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rms_norm(x, weight, eps):
    x = jnp.asarray(x, jnp.float32)
    return weight * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


@functools.partial(jax.jit, static_argnums=0)
def _prefixes(cfg: LlamaConfig, params, x):
    """Outputs after blocks 0, 0..1, ..., 0..n-1: what HF calls hidden_states[1:]."""
    return [local_sequential(cfg, params, x, end=n) for n in range(1, len(params) + 1)]


def _assert_matches_hf(cfg, params, head, hidden):
    """jaxseq's blocks reproduce every HF hidden state; the last one after the final norm."""
    ours = _prefixes(cfg, params, jnp.asarray(hidden[0]))
    ours[-1] = _rms_norm(ours[-1], head["norm"], cfg.rms_norm_eps)
    for n, (got, want) in enumerate(zip(ours, hidden[1:]), start=1):
        assert _rel_err(got, want) < 1e-5, f"hidden state {n}"


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model(seed=0)


@pytest.fixture(scope="module")
def hf_hidden(hf_model):
    return _hf_hidden(hf_model, _inputs())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model) -> Path:
    """The model saved by transformers 5 in 100 KB shards (9 files, blocks spread over them)."""
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    cfg, params = load_checkpoint(hf_dir)
    return cfg, params, load_head(hf_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _to_transformers4(config: dict) -> None:
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None


def test_load_matches_transformers(loaded, hf_hidden):
    cfg, params, head = loaded
    assert cfg == LlamaConfig(**HF_KWARGS, head_dim=8)
    assert len(params) == NUM_LAYERS
    _assert_matches_hf(cfg, params, head, hf_hidden)


def test_load_transformers4_config(hf_dir, tmp_path, hf_hidden):
    path = _copy(hf_dir, tmp_path / "t4")
    _edit_config(path, _to_transformers4)
    cfg, params = load_checkpoint(path)
    assert cfg.rope_theta == HF_KWARGS["rope_theta"]
    _assert_matches_hf(cfg, params, load_head(path), hf_hidden)


@pytest.mark.parametrize("blocks", [range(1, 3), (1, 3)])
def test_load_block_range_opens_only_its_shards(hf_dir, loaded, monkeypatch, blocks):
    opened = []
    real_open = safetensors.safe_open

    def recording_open(filename, *args, **kwargs):
        opened.append(Path(filename).name)
        return real_open(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording_open)
    cfg, params = load_checkpoint(hf_dir, blocks=blocks)

    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {file for key, file in weight_map.items() if re.match(r"model\.layers\.[12]\.", key)}
    other_blocks_only = set(weight_map.values()) - needed
    assert other_blocks_only, "the fixture should have shards holding only blocks 0 and 3"
    assert sorted(opened) == sorted(needed)  # each needed shard opened once, no other
    full = loaded[1]
    assert len(params) == 2
    for got, want in zip(params, full[1:3]):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def _drop_tensor(path: Path, key: str) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][key]
    tensors = safetensors.numpy.load_file(shard)
    del tensors[key]
    safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})


def _remove(path: Path, pattern: str) -> None:
    for file in path.glob(pattern):
        file.unlink()


def _set_config(**values):
    return lambda path: _edit_config(path, lambda config: config.update(values))


def _llama3_transformers4(config: dict) -> None:
    _to_transformers4(config)
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}


MISSING_KEY = "model.layers.2.self_attn.k_proj.weight"

# case -> (break the checkpoint copy, load_checkpoint kwargs, error type, text the message must hold)
BROKEN = {
    "rope_parameters_yarn": (
        _set_config(rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0}),
        {},
        ValueError,
        "'yarn'",
    ),
    "rope_scaling_llama3_t4_incomplete": (lambda p: _edit_config(p, _llama3_transformers4), {}, ValueError, "llama3"),
    "partial_rotary_factor": (_set_config(partial_rotary_factor=0.5), {}, ValueError, "partial_rotary_factor"),
    "quantization_config": (_set_config(quantization_config={"quant_method": "gptq"}), {}, ValueError, "quantization"),
    "hidden_act": (_set_config(hidden_act="gelu"), {}, ValueError, "hidden_act"),
    "model_type": (_set_config(model_type="gemma"), {}, ValueError, "model_type"),
    "missing_tensor": (
        lambda p: _drop_tensor(p, MISSING_KEY),
        {},
        ValueError,
        f"{MISSING_KEY!r} is missing from",
    ),
    "blocks_out_of_range": (lambda p: None, {"blocks": range(3, 5)}, ValueError, "num_hidden_layers=4"),
    "missing_config": (lambda p: (p / "config.json").unlink(), {}, ValueError, "config.json"),
    "no_safetensors": (lambda p: _remove(p, "model*.safetensors*"), {}, ValueError, "model.safetensors"),
    "missing_folder": (shutil.rmtree, {}, FileNotFoundError, "does not exist"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_load_rejects_broken_checkpoints(hf_dir, tmp_path, case):
    break_it, kwargs, error, message = BROKEN[case]
    path = _copy(hf_dir, tmp_path / "ckpt")
    break_it(path)
    with pytest.raises(error, match=re.escape(message)):
        load_checkpoint(path, **kwargs)


def test_missing_tensor_error_names_the_shard(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path / "ckpt")
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][MISSING_KEY]
    _drop_tensor(path, MISSING_KEY)
    with pytest.raises(ValueError, match=re.escape(shard)):
        load_checkpoint(path, blocks=(2, 3))


@pytest.mark.parametrize("max_shard_bytes", [None, 100_000])
def test_write_checkpoint_round_trip(tmp_path, loaded, max_shard_bytes):
    cfg, params, head = loaded
    path = write_checkpoint(tmp_path / "out", cfg, params, head, max_shard_bytes=max_shard_bytes)
    sharded = (path / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes is not None)
    if sharded:
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1

    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert model.config.rope_parameters["rope_theta"] == cfg.rope_theta
    _assert_matches_hf(cfg, params, head, _hf_hidden(model, _inputs(1)))

    cfg2, params2 = load_checkpoint(path)
    assert cfg2 == cfg
    for got, want in zip(params2, params):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_write_checkpoint_refuses_a_used_folder(tmp_path, loaded):
    cfg, params, head = loaded
    write_checkpoint(tmp_path, cfg, params, head)
    with pytest.raises(ValueError, match="model.safetensors"):
        write_checkpoint(tmp_path, cfg, params, head)


def test_random_checkpoint_loads_in_transformers(tmp_path):
    cfg = LlamaConfig(**HF_KWARGS)
    path = random_checkpoint(tmp_path / "rand", cfg, seed=3, max_shard_bytes=50_000)
    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    cfg2, params = load_checkpoint(path)
    head = load_head(path)
    assert cfg2 == cfg
    np.testing.assert_array_equal(head["norm"], np.ones(cfg.hidden_size))
    _assert_matches_hf(cfg, params, head, _hf_hidden(model, _inputs(2)))


def test_load_bfloat16_checkpoint(tmp_path, hf_model):
    path = tmp_path / "bf16"
    model = copy.deepcopy(hf_model).to(torch.bfloat16)
    model.save_pretrained(path)
    want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    _, params = load_checkpoint(path, blocks=(1, 2))
    assert params[0]["q_proj"].dtype == jnp.float32
    np.testing.assert_array_equal(params[0]["q_proj"], want)
    _, params = load_checkpoint(path, blocks=(1, 2), dtype=jnp.bfloat16)
    assert params[0]["q_proj"].dtype == jnp.bfloat16


def test_load_head_gives_transformers_logits(hf_dir, hf_model, loaded):
    cfg, params, head = loaded
    x = _inputs(3)
    with torch.no_grad():
        logits = hf_model(inputs_embeds=torch.from_numpy(x)).logits.numpy()
    hidden = local_sequential(cfg, params, jnp.asarray(x))
    ours = _rms_norm(hidden, head["norm"], cfg.rms_norm_eps) @ head["lm_head"]
    assert head["embed_tokens"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert head["lm_head"].shape == (cfg.hidden_size, cfg.vocab_size)
    np.testing.assert_array_equal(head["embed_tokens"], hf_model.model.embed_tokens.weight.detach().numpy())
    assert _rel_err(ours, logits) < 1e-5


def test_load_head_tied_embeddings(tmp_path):
    model = _hf_model(seed=1, num_hidden_layers=1, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    head = load_head(tmp_path)
    embed = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(head["lm_head"], embed.T)
    cfg, params = load_checkpoint(tmp_path)
    x = _inputs(4)
    with torch.no_grad():
        logits = model(inputs_embeds=torch.from_numpy(x)).logits.numpy()
    hidden = local_sequential(cfg, params, jnp.asarray(x))
    ours = _rms_norm(hidden, head["norm"], cfg.rms_norm_eps) @ head["lm_head"]
    assert _rel_err(ours, logits) < 1e-5
