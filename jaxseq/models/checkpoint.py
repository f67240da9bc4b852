"""Read and write Hugging Face checkpoints (``config.json`` plus ``*.safetensors``) of every supported family.

``load_checkpoint`` turns a checkpoint (a local folder, or a hub model id: ``jaxseq.models.hub``) into
jaxseq's block parameters (one dict per block, matrices ``[in, out]``; the family's
``block_tensors`` name them), reading only the blocks asked for and opening (or, from the hub,
fetching) only the shard files that hold them. ``load_head`` reads the embedding, final norm and LM
head. ``write_checkpoint`` and ``random_checkpoint`` write folders that both jaxseq and transformers'
``AutoModelForCausalLM.from_pretrained`` (transformers 4 and 5) load.

bfloat16 checkpoints load through safetensors' numpy framework: importing ``ml_dtypes`` registers
``bfloat16`` with numpy, which is all safetensors needs to return bf16 arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, so safetensors can read bf16 tensors)
import numpy as np
import safetensors
import safetensors.numpy

from jaxseq.models.blocks import init_block_params
from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import BlockParams
from jaxseq.models.family import EMBED, LAYER_PREFIX, LM_HEAD, NORM, TensorSpec
from jaxseq.models.hub import CheckpointFiles, PathLike
from jaxseq.models.registry import family_of

BlockRange = range | tuple[int, int]

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# What a client needs besides the weights to turn text into ids and back.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _raw_config(files: CheckpointFiles) -> dict[str, Any]:
    path = files.path(_CONFIG)
    if path is None:
        raise ValueError(
            f"{files.where(_CONFIG)} not found: a Hugging Face checkpoint must hold config.json; "
            "download it with the weights (e.g. huggingface_hub.snapshot_download)"
        )
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{files.where(_CONFIG)} is not a JSON object")
    return raw


def _config(files: CheckpointFiles) -> tuple[ModelConfig, dict[str, Any]]:
    """Parse and validate ``config.json`` with its family's rules; the config and the raw dict."""
    raw = _raw_config(files)
    try:
        return family_of(str(raw.get("model_type"))).parse_config(raw), raw
    except (ValueError, KeyError, TypeError) as error:
        reason = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{files.where(_CONFIG)}: {reason}") from None


def _weight_map(files: CheckpointFiles) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None when the checkpoint has one ``model.safetensors``."""
    index = files.path(_INDEX)
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{files.where(_INDEX)} has no 'weight_map' object; re-download or re-save the checkpoint")
        return weight_map
    if files.path(_SINGLE) is not None:
        return None
    where = f"in {files}"
    if files.folder is not None:
        found = sorted(p.name for p in files.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        where += f" (found: {', '.join(found) or 'no weight files'})"
    raise ValueError(
        f"no {_SINGLE} or {_INDEX} {where}; jaxseq reads safetensors only: re-save the model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def _read_tensors(
    files: CheckpointFiles, shapes: dict[str, tuple[int, ...]], dtype: Any, optional: frozenset[str] = frozenset()
) -> dict[str, np.ndarray]:
    """Read the tensors named in ``shapes`` (their stored shapes) as numpy arrays of ``dtype``.

    Opens (and, from the hub, fetches) only the files holding them. Keys in ``optional`` that the
    checkpoint lacks are left out.
    """
    weight_map = _weight_map(files)
    by_file: dict[str, list[str]] = {}
    for key in shapes:
        if weight_map is None:
            by_file.setdefault(_SINGLE, []).append(key)
        elif key in weight_map:
            by_file.setdefault(weight_map[key], []).append(key)
        elif key not in optional:
            raise ValueError(
                f"tensor {key!r} is not listed in {files.where(_INDEX)}; the checkpoint is incomplete or "
                "not of the family its config.json names: re-download it"
            )
    np_dtype = np.dtype(dtype)
    tensors = {}
    for file_name, keys in by_file.items():
        file_path = files.path(file_name)
        if file_path is None:
            raise ValueError(
                f"{files.where(_INDEX)} maps tensor {keys[0]!r} to {file_name}, which can't be found "
                f"({files.where(file_name)}); re-download the checkpoint"
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


def _block_keys(block: int, spec: TensorSpec) -> list[str]:
    return [LAYER_PREFIX.format(block) + name for name in spec.names]


def _from_stored(stored: list[np.ndarray], spec: TensorSpec) -> jax.Array:
    """A parameter in jaxseq's layout from its stored tensor(s): matrices transposed, experts stacked."""
    arrays = [a.T if a.ndim == 2 else a for a in stored]
    return jnp.asarray(np.stack(arrays) if len(spec.names) > 1 else arrays[0])


def _to_stored(param: Any, spec: TensorSpec, np_dtype: np.dtype) -> list[np.ndarray]:
    array = np.asarray(param).astype(np_dtype)
    parts = list(array) if len(spec.names) > 1 else [array]
    return [np.ascontiguousarray(p.T if p.ndim == 2 else p) for p in parts]


def load_config(path: PathLike, revision: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint (a local folder or a hub model id), validated as
    ``load_checkpoint`` validates it.

    Example:
        >>> load_config(checkpoint).num_hidden_layers
        4
    """
    return _config(CheckpointFiles(path, revision))[0]


def load_checkpoint(
    path: PathLike, blocks: BlockRange | None = None, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[ModelConfig, list[BlockParams]]:
    """Load a Hugging Face checkpoint's decoder blocks in jaxseq's layout.

    The family comes from ``config.json``'s ``model_type`` (``jaxseq.models.registry``), read in the
    transformers-4 or transformers-5 form. Weights are ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``; only the requested blocks' tensors are read, and only the shard
    files holding them are opened (from the hub: fetched). Any stored dtype (float32, float16,
    bfloat16) is cast to ``dtype``.

    Args:
        path: the checkpoint: a local folder, or a hub model id (``org/name``).
        blocks: the blocks to load, as a ``range`` or a ``(start, end)`` tuple; None loads all.
        dtype: dtype of the returned arrays.
        revision: for a hub model id, the branch, tag or commit (default: main).

    Returns:
        The model's config and a list of block parameter dicts; element 0 is block ``blocks.start``.

    Raises:
        FileNotFoundError: the folder does not exist (and ``path`` is no hub model id).
        ValueError: the checkpoint is not of a supported family, or its config asks for something jaxseq
            does not compute (the message names the key or tensor at fault), or ``blocks`` is outside
            ``num_hidden_layers``.

    Example:
        >>> cfg, params = load_checkpoint(checkpoint, blocks=range(1, 3))
        >>> len(params), local_sequential(cfg, params, x, first=1).shape  # blocks 1 and 2
        (2, (2, 5, 32))
    """
    files = CheckpointFiles(path, revision)
    cfg, _ = _config(files)
    span = _block_range(blocks, cfg.num_hidden_layers)
    specs = family_of(cfg).block_tensors(cfg)
    stored = {key: spec.stored_shape for i in span for spec in specs.values() for key in _block_keys(i, spec)}
    tensors = _read_tensors(files, stored, dtype)
    params = [
        {name: _from_stored([tensors[key] for key in _block_keys(i, spec)], spec) for name, spec in specs.items()}
        for i in span
    ]
    return cfg, params


def load_head(path: PathLike, dtype: Any = jnp.float32, revision: str | None = None) -> dict[str, jax.Array]:
    """Load a checkpoint's token embedding, final norm and LM head, and nothing else (from the hub: only
    the shards holding them).

    When ``tie_word_embeddings`` is true, or the checkpoint has no ``lm_head.weight``, the LM head
    is the transposed embedding.

    Returns:
        ``{"embed_tokens": [vocab, hidden], "norm": [hidden], "lm_head": [hidden, vocab]}``.

    Raises:
        FileNotFoundError, ValueError: as ``load_checkpoint``.

    Example:
        >>> from jaxseq.models.decoder import rms_norm
        >>> head = load_head(checkpoint)
        >>> logits = rms_norm(x, head["norm"], cfg.rms_norm_eps) @ head["lm_head"]
        >>> logits.shape
        (2, 5, 100)
    """
    files = CheckpointFiles(path, revision)
    cfg, _ = _config(files)
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    shapes = {EMBED: (vocab, hidden), NORM: (hidden,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (vocab, hidden)
    tensors = _read_tensors(files, shapes, dtype, optional=frozenset({LM_HEAD}))
    embed = jnp.asarray(tensors[EMBED])
    lm_head = tensors.get(LM_HEAD)
    return {
        "embed_tokens": embed,
        "norm": jnp.asarray(tensors[NORM]),
        "lm_head": embed.T if lm_head is None else jnp.asarray(lm_head.T),
    }


def generation_defaults(path: PathLike, revision: str | None = None) -> dict[str, Any]:
    """``eos_token_id`` and ``pad_token_id`` as transformers' ``generate`` defaults them: from
    ``generation_config.json`` when the checkpoint has one, else from ``config.json`` (None where neither
    gives them).

    Example:
        >>> generation_defaults(checkpoint)
        {'eos_token_id': 2, 'pad_token_id': None}
    """
    files = CheckpointFiles(path, revision)
    generation = files.path("generation_config.json")
    raw = json.loads(generation.read_text()) if generation is not None else _raw_config(files)
    return {key: raw.get(key) for key in ("eos_token_id", "pad_token_id")}


def tokenizer_files(path: PathLike, revision: str | None = None) -> list[Path]:
    """The checkpoint's tokenizer and generation files that exist (from the hub: fetched), in
    ``TOKENIZER_FILES`` order.

    Example:
        >>> [p.name for p in tokenizer_files(checkpoint)]
        []
    """
    files = CheckpointFiles(path, revision)
    return [p for p in (files.path(name) for name in TOKENIZER_FILES) if p is not None]


def _random_head(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> dict[str, jax.Array]:
    embed_key, head_key = jax.random.split(key)
    shape = (cfg.vocab_size, cfg.hidden_size)
    embed = (std * jax.random.normal(embed_key, shape)).astype(dtype)
    return {
        "embed_tokens": embed,
        "norm": jnp.ones((cfg.hidden_size,), dtype),
        "lm_head": embed.T
        if cfg.tie_word_embeddings
        else (std * jax.random.normal(head_key, shape[::-1])).astype(dtype),
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
    cfg: ModelConfig,
    params: Sequence[BlockParams],
    head: dict[str, jax.Array] | None = None,
    *,
    max_shard_bytes: int | None = None,
    dtype: Any = None,
) -> Path:
    """Write a Hugging Face checkpoint folder of ``cfg``'s family that transformers and ``load_checkpoint`` load.

    Writes ``config.json`` (transformers-5 ``rope_parameters`` plus transformers-4 ``rope_theta`` and
    ``rope_scaling``) and the weights as ``model.safetensors``, or, with ``max_shard_bytes``, as
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
    family = family_of(cfg)
    specs = family.block_tensors(cfg)
    for i, block in enumerate(params):
        _check_shapes(f"params[{i}]", block, {name: spec.shape for name, spec in specs.items()})
    if head is None:
        head = _random_head(cfg, jax.random.key(0))
    head_shapes = {
        "embed_tokens": (cfg.vocab_size, cfg.hidden_size), "norm": (cfg.hidden_size,),
        "lm_head": (cfg.hidden_size, cfg.vocab_size),
    }  # fmt: skip
    _check_shapes("head", head, head_shapes)
    np_dtype = np.dtype(params[0]["q_proj"].dtype if dtype is None else dtype)

    tensors = {EMBED: np.asarray(head["embed_tokens"]).astype(np_dtype)}
    for i, block in enumerate(params):
        for name, spec in specs.items():
            tensors.update(zip(_block_keys(i, spec), _to_stored(block[name], spec, np_dtype)))
    tensors[NORM] = np.asarray(head["norm"]).astype(np_dtype)
    if not cfg.tie_word_embeddings:
        tensors[LM_HEAD] = np.ascontiguousarray(np.asarray(head["lm_head"]).astype(np_dtype).T)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in folder.glob("*.safetensors*"))
    if existing:
        raise ValueError(f"{folder} already holds {', '.join(existing)}; write to an empty or new folder")
    config = {**family.hf_config(cfg), "dtype": np_dtype.name, "torch_dtype": np_dtype.name}
    (folder / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
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
    path: PathLike, cfg: ModelConfig, seed: int = 0, max_shard_bytes: int | None = None, std: float = 0.02
) -> Path:
    """Write a randomly initialised checkpoint of ``cfg``'s family (``init_block_params`` blocks, random head).

    Args:
        path: the folder to write; created if missing.
        cfg: the model's config.
        seed: seeds the blocks and the head.
        max_shard_bytes: the largest shard size in bytes; None writes a single file.
        std: standard deviation of the random matrices and embeddings (Llama's initializer_range by default).

    Returns:
        The folder's path.

    Example:
        >>> load_config(random_checkpoint(tmp / "random", cfg)) == cfg
        True
    """
    block_key, head_key = jax.random.split(jax.random.key(seed))
    params = init_block_params(cfg, block_key, std=std)
    return write_checkpoint(path, cfg, params, _random_head(cfg, head_key, std=std), max_shard_bytes=max_shard_bytes)
