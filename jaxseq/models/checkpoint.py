"""Read and write Hugging Face Llama checkpoints (``config.json`` plus ``*.safetensors``).

``load_checkpoint`` turns a local checkpoint folder into jaxseq's block parameters (see
``jaxseq.models.llama``: one dict per block, matrices ``[in, out]``), reading only the blocks asked for
and opening only the shard files that hold them. ``load_head`` reads the embedding, final norm and
LM head. ``write_checkpoint`` and ``random_checkpoint`` write folders that both jaxseq and
``transformers.LlamaForCausalLM.from_pretrained`` (transformers 4 and 5) load.

bfloat16 checkpoints load through safetensors' numpy framework: importing ``ml_dtypes`` registers
``bfloat16`` with numpy, which is all safetensors needs to return bf16 arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, so safetensors can read bf16 tensors)
import numpy as np
import safetensors
import safetensors.numpy

from jaxseq.models.config import LlamaConfig
from jaxseq.models.llama import BlockParams, block_param_shapes, init_block_params

PathLike = str | os.PathLike
BlockRange = range | tuple[int, int]

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"

# jaxseq block parameter name -> tensor name inside "model.layers.{i}.", in checkpoint order.
_BLOCK_TENSORS = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
_EMBED, _NORM, _LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _block_key(index: int, name: str) -> str:
    return f"model.layers.{index}.{_BLOCK_TENSORS[name]}"


def _folder(path: PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} does not exist; pass a local folder holding config.json "
            "and model.safetensors (or model-*.safetensors shards with model.safetensors.index.json)"
        )
    return folder


def _load_config(folder: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """Parse and validate ``config.json``; return the jaxseq config and the raw dict."""
    config_path = folder / _CONFIG
    if not config_path.is_file():
        raise ValueError(
            f"{config_path} not found: a Hugging Face checkpoint folder must hold config.json; "
            "download it with the weights (e.g. huggingface_hub.snapshot_download)"
        )
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != "llama":
        raise ValueError(
            f"{config_path}: model_type is {raw.get('model_type')!r}, but jaxseq loads only 'llama' checkpoints"
        )
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key, False):
            raise ValueError(
                f"{config_path}: {key} is true, but jaxseq's Llama blocks have no biases; use a checkpoint without them"
            )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{config_path}: hidden_act is {raw['hidden_act']!r}, but jaxseq's Llama MLP uses 'silu' only")
    for key in ("rope_parameters", "rope_scaling"):
        rope = raw.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{config_path}: {key} must be a JSON object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            raise ValueError(
                f"{config_path}: {key} has rope_type {rope_type!r}; jaxseq implements only the default "
                "rotary embedding (rope_type 'default'), so this model's positions would be wrong"
            )
    rope_parameters = raw.get("rope_parameters") or {}
    rope_theta = rope_parameters.get("rope_theta", raw.get("rope_theta", 10000.0))
    missing = [
        key
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        if key not in raw
    ]
    if missing:
        raise ValueError(f"{config_path}: missing required key(s) {', '.join(missing)}")
    cfg = LlamaConfig(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        num_hidden_layers=raw["num_hidden_layers"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        head_dim=raw.get("head_dim") or 0,
        vocab_size=raw.get("vocab_size", 32000),
    )
    return cfg, raw


def _weight_map(folder: Path) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None when the folder has one ``model.safetensors``."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object; re-download or re-save the checkpoint")
        return weight_map
    if (folder / _SINGLE).is_file():
        return None
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise ValueError(
        f"no {_SINGLE} or {_INDEX} in {folder} (found: {', '.join(found) or 'no weight files'}); jaxseq "
        "reads safetensors only: re-save the model with save_pretrained(..., safe_serialization=True)"
    )


def _read_tensors(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: Any,
    optional: frozenset[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """Read the tensors named in ``shapes`` (checkpoint layout) as numpy arrays of ``dtype``.

    Opens only the files holding them. Keys in ``optional`` that the checkpoint lacks are left out.
    """
    weight_map = _weight_map(folder)
    by_file: dict[str, list[str]] = {}
    for key in shapes:
        if weight_map is None:
            by_file.setdefault(_SINGLE, []).append(key)
        elif key in weight_map:
            by_file.setdefault(weight_map[key], []).append(key)
        elif key not in optional:
            raise ValueError(
                f"tensor {key!r} is not listed in {folder / _INDEX}; the checkpoint is incomplete or "
                "not a Llama model: re-download it"
            )
    np_dtype = np.dtype(dtype)
    tensors = {}
    for file_name, keys in by_file.items():
        file_path = folder / file_name
        if not file_path.is_file():
            raise ValueError(
                f"{folder / _INDEX} maps tensor {keys[0]!r} to {file_name}, which does not exist; "
                "re-download the checkpoint"
            )
        with safetensors.safe_open(str(file_path), framework="numpy") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    if key in optional:
                        continue
                    raise ValueError(
                        f"tensor {key!r} is missing from {file_path}; the checkpoint is incomplete: re-download it"
                    )
                shape = tuple(f.get_slice(key).get_shape())
                if shape != shapes[key]:
                    raise ValueError(
                        f"tensor {key!r} in {file_path} has shape {shape}, but {_CONFIG} implies "
                        f"{shapes[key]}; config.json does not match the weights"
                    )
                tensors[key] = f.get_tensor(key).astype(np_dtype)
    return tensors


def _block_range(blocks: BlockRange | None, num_layers: int) -> range:
    if blocks is None:
        return range(num_layers)
    if isinstance(blocks, tuple):
        if len(blocks) != 2:
            raise ValueError(f"blocks must be a range or a (start, end) tuple, got {blocks!r}")
        blocks = range(*blocks)
    if not isinstance(blocks, range) or blocks.step != 1:
        raise ValueError(f"blocks must be a contiguous range or a (start, end) tuple, got {blocks!r}")
    if not 0 <= blocks.start < blocks.stop <= num_layers:
        raise ValueError(
            f"blocks {blocks.start}:{blocks.stop} are outside the checkpoint's num_hidden_layers="
            f"{num_layers}; ask for a non-empty range within 0:{num_layers}"
        )
    return blocks


def load_config(path: PathLike) -> LlamaConfig:
    """The ``LlamaConfig`` of a local Hugging Face Llama checkpoint (validated as ``load_checkpoint`` does).

    Example:
        >>> load_config(checkpoint).num_hidden_layers
        4
    """
    return _load_config(_folder(path))[0]


def load_checkpoint(
    path: PathLike, blocks: BlockRange | None = None, dtype: Any = jnp.float32
) -> tuple[LlamaConfig, list[BlockParams]]:
    """Load a local Hugging Face Llama checkpoint's decoder blocks in jaxseq's layout.

    Reads ``config.json`` in the transformers-4 form (top-level ``rope_theta``, ``rope_scaling``) or
    the transformers-5 form (``rope_parameters``), and ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``. Only the requested blocks' tensors are read, and only the
    shard files holding them are opened. Any stored dtype (float32, float16, bfloat16) is cast to
    ``dtype``.

    Args:
        path: the checkpoint folder.
        blocks: the blocks to load, as a ``range`` or a ``(start, end)`` tuple; None loads all.
        dtype: dtype of the returned arrays.

    Returns:
        The model's config and a list of block parameter dicts; element 0 is block ``blocks.start``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder is not a supported Llama checkpoint (the message names the key or
            tensor at fault), or ``blocks`` is outside ``num_hidden_layers``.

    Example:
        >>> cfg, params = load_checkpoint(checkpoint, blocks=range(1, 3))
        >>> len(params), local_sequential(cfg, params, x).shape  # blocks 1 and 2
        (2, (2, 5, 32))
    """
    folder = _folder(path)
    cfg, _ = _load_config(folder)
    span = _block_range(blocks, cfg.num_hidden_layers)
    param_shapes = block_param_shapes(cfg)
    stored_shapes = {_block_key(i, name): shape[::-1] for i in span for name, shape in param_shapes.items()}
    tensors = _read_tensors(folder, stored_shapes, dtype)
    params = [{name: jnp.asarray(tensors[_block_key(i, name)].T) for name in param_shapes} for i in span]
    return cfg, params


def load_head(path: PathLike, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Load a Llama checkpoint's token embedding, final norm and LM head, and nothing else.

    When ``tie_word_embeddings`` is true, or the checkpoint has no ``lm_head.weight``, the LM head
    is the transposed embedding.

    Args:
        path: the checkpoint folder.
        dtype: dtype of the returned arrays.

    Returns:
        ``{"embed_tokens": [vocab, hidden], "norm": [hidden], "lm_head": [hidden, vocab]}``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder is not a supported Llama checkpoint.

    Example:
        >>> from jaxseq.models.llama import rms_norm
        >>> head = load_head(checkpoint)
        >>> logits = rms_norm(x, head["norm"], cfg.rms_norm_eps) @ head["lm_head"]
        >>> logits.shape
        (2, 5, 100)
    """
    folder = _folder(path)
    cfg, raw = _load_config(folder)
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    shapes = {_EMBED: (vocab, hidden), _NORM: (hidden,)}
    tied = bool(raw.get("tie_word_embeddings", False))
    if not tied:
        shapes[_LM_HEAD] = (vocab, hidden)
    tensors = _read_tensors(folder, shapes, dtype, optional=frozenset({_LM_HEAD}))
    embed = jnp.asarray(tensors[_EMBED])
    lm_head = tensors.get(_LM_HEAD)
    return {
        "embed_tokens": embed,
        "norm": jnp.asarray(tensors[_NORM]),
        "lm_head": embed.T if lm_head is None else jnp.asarray(lm_head.T),
    }


def _random_head(cfg: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> dict[str, jax.Array]:
    embed_key, head_key = jax.random.split(key)
    shape = (cfg.vocab_size, cfg.hidden_size)
    return {
        "embed_tokens": (std * jax.random.normal(embed_key, shape)).astype(dtype),
        "norm": jnp.ones((cfg.hidden_size,), dtype),
        "lm_head": (std * jax.random.normal(head_key, shape[::-1])).astype(dtype),
    }


def _hf_config(cfg: LlamaConfig, dtype_name: str) -> dict[str, Any]:
    """A ``config.json`` that transformers 5 (``rope_parameters``) and 4 (``rope_theta``) both read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _check_shapes(what: str, arrays: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in arrays:
            raise ValueError(f"{what} has no {name!r}; it needs {sorted(shapes)}")
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(arrays[name].shape)}, but the config needs {shape}")


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Pack tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    return shards


def write_checkpoint(
    path: PathLike,
    cfg: LlamaConfig,
    params: Sequence[BlockParams],
    head: dict[str, jax.Array] | None = None,
    *,
    max_shard_bytes: int | None = None,
    dtype: Any = None,
) -> Path:
    """Write a Hugging Face Llama checkpoint folder that transformers and ``load_checkpoint`` load.

    Writes ``config.json`` (transformers-5 ``rope_parameters`` plus a top-level ``rope_theta`` for
    transformers 4) and the weights as ``model.safetensors``, or, with ``max_shard_bytes``, as
    ``model-XXXXX-of-YYYYY.safetensors`` shards with ``model.safetensors.index.json``.

    Args:
        path: the folder to write; created if missing. It must not already hold safetensors files.
        cfg: the model's config.
        params: one parameter dict per block, all ``cfg.num_hidden_layers`` of them.
        head: ``{"embed_tokens", "norm", "lm_head"}`` as returned by ``load_head``; None writes a
            random head (normal(0, 0.02) embedding and LM head, unit norm; fixed seed).
        max_shard_bytes: the largest shard size in bytes; None writes a single file.
        dtype: the stored dtype (e.g. ``jnp.bfloat16``); None keeps the dtype of ``params``.

    Returns:
        The folder's path.

    Example:
        >>> cfg, params = load_checkpoint(checkpoint)
        >>> copy = write_checkpoint(tmp / "copy", cfg, params, load_head(checkpoint), max_shard_bytes=50_000)
        >>> sorted(p.name for p in copy.iterdir())[:3]
        ['config.json', 'model-00001-of-00004.safetensors', 'model-00002-of-00004.safetensors']
    """
    if len(params) != cfg.num_hidden_layers:
        raise ValueError(
            f"params has {len(params)} blocks, but cfg.num_hidden_layers={cfg.num_hidden_layers}; "
            "a checkpoint needs every block"
        )
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive or None, got {max_shard_bytes}")
    param_shapes = block_param_shapes(cfg)
    for i, block in enumerate(params):
        _check_shapes(f"params[{i}]", block, param_shapes)
    if head is None:
        head = _random_head(cfg, jax.random.key(0))
    _check_shapes(
        "head",
        head,
        {
            "embed_tokens": (cfg.vocab_size, cfg.hidden_size),
            "norm": (cfg.hidden_size,),
            "lm_head": (cfg.hidden_size, cfg.vocab_size),
        },
    )
    np_dtype = np.dtype(params[0]["q_proj"].dtype if dtype is None else dtype)

    def stored(array: Any, transpose: bool = False) -> np.ndarray:
        array = np.asarray(array).astype(np_dtype)
        return np.ascontiguousarray(array.T if transpose else array)

    tensors = {_EMBED: stored(head["embed_tokens"])}
    for i, block in enumerate(params):
        for name in _BLOCK_TENSORS:
            tensors[_block_key(i, name)] = stored(block[name], transpose=block[name].ndim == 2)
    tensors[_NORM] = stored(head["norm"])
    tensors[_LM_HEAD] = stored(head["lm_head"], transpose=True)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in folder.glob("*.safetensors*"))
    if existing:
        raise ValueError(f"{folder} already holds {', '.join(existing)}; write to an empty or new folder")
    (folder / _CONFIG).write_text(json.dumps(_hf_config(cfg, np_dtype.name), indent=2) + "\n")
    if max_shard_bytes is None:
        safetensors.numpy.save_file(tensors, str(folder / _SINGLE), metadata={"format": "pt"})
        return folder
    shards = _shards(tensors, max_shard_bytes)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (folder / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def random_checkpoint(
    path: PathLike, cfg: LlamaConfig, seed: int = 0, max_shard_bytes: int | None = None, std: float = 0.02
) -> Path:
    """Write a randomly initialised Llama checkpoint (``init_block_params`` blocks, random head).

    Args:
        path: the folder to write; created if missing.
        cfg: the model's config.
        seed: seeds the blocks and the head.
        max_shard_bytes: the largest shard size in bytes; None writes a single file.
        std: standard deviation of the random matrices and embeddings (Llama's initializer_range by default).

    Returns:
        The folder's path.

    Example:
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
        ...                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=100)
        >>> load_config(random_checkpoint(tmp / "random", cfg)) == cfg
        True
    """
    block_key, head_key = jax.random.split(jax.random.key(seed))
    params = init_block_params(cfg, block_key, std=std)
    return write_checkpoint(path, cfg, params, _random_head(cfg, head_key, std=std), max_shard_bytes=max_shard_bytes)
