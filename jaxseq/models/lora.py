"""LoRA adapters in PEFT's format (``adapter_config.json`` and ``adapter_model.safetensors``), on the blocks
of any supported family.

A projection ``W`` with an adapter computes ``h @ W + (h @ A) @ B`` (``A: [in, r]``, ``B: [r, out]`` already
multiplied by the adapter's scaling, ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``), as
``peft``'s ``lora.Linear`` computes it without dropout. The pair rides in a block's parameter dict next to
the projection (``LORA_A.format(name)``, ``LORA_B.format(name)``), so that the block functions see the
adapter as more arguments: a server compiles once per adapter shape, not once per adapter.

``load_adapter`` reads the adapter of a range of blocks (a local folder, or a hub id as checkpoints are
read: only the adapter's two files); ``random_adapter`` writes one that ``peft`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import LORA_A, LORA_B, BlockParams
from jaxseq.models.family import LAYER_PREFIX, TensorSpec
from jaxseq.models.hub import CheckpointFiles, PathLike
from jaxseq.models.registry import family_of

# The projections jaxseq applies LoRA to (where the family has them: Mixtral's experts take none).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT's names of a causal LM's block tensors: "base_model.model." + the model's own name.
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
# adapter_config.json keys that change the computation in ways jaxseq does not implement when set (true,
# non-empty); and "bias", when other than "none"
_REFUSED = (
    "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
    "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter over blocks ``start..start+len(blocks)-1``: per block, the ``LORA_A``/``LORA_B``
    arrays of each projection it adapts (a block it leaves alone has none).

    Example:
        >>> path = random_adapter(tmp / "adapter", cfg, rank=2, alpha=4, targets=("q_proj", "v_proj"))
        >>> adapter = load_adapter(path, cfg, range(1, 3))
        >>> adapter.scaling, sorted(adapter.blocks[0]), adapter.blocks[0]["q_proj_lora_b"].shape
        (2.0, ['q_proj_lora_a', 'q_proj_lora_b', 'v_proj_lora_a', 'v_proj_lora_b'], (2, 32))
    """

    name: str
    start: int
    blocks: tuple[BlockParams, ...]
    rank: int
    scaling: float

    def span(self, start: int, end: int) -> Adapter:
        """The adapter of blocks ``start..end-1`` only (a server's share of it).

        Example:
            >>> adapter = load_adapter(random_adapter(tmp / "whole", cfg, rank=2), cfg, range(4))
            >>> adapter.span(2, 4).start, len(adapter.span(2, 4).blocks)
            (2, 2)
        """
        if not self.start <= start < end <= self.start + len(self.blocks):
            raise ValueError(
                f"blocks {start}:{end} are not all within the adapter's {self.start}:{self.start + len(self.blocks)}"
            )
        return dataclasses.replace(self, start=start, blocks=self.blocks[start - self.start : end - self.start])

    def shapes(self, start: int, end: int) -> tuple:
        """The names and shapes of its arrays over blocks ``start..end-1``: what a function compiled with them
        depends on (their values are arguments)."""
        span = self.blocks[start - self.start : end - self.start]
        return tuple(tuple(sorted((k, v.shape) for k, v in block.items())) for block in span)


def lora_targets(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The projections of ``cfg``'s blocks that take LoRA, with their tensors.

    Example:
        >>> sorted(lora_targets(cfg))
        ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
    """
    specs = family_of(cfg).block_tensors(cfg)
    return {name: specs[name] for name in LORA_TARGETS if name in specs}


def _config(files: CheckpointFiles) -> tuple[int, float]:
    """The adapter's rank and scaling, after refusing what jaxseq does not compute."""
    path = files.path(CONFIG_FILE)
    if path is None:
        raise ValueError(f"{files.where(CONFIG_FILE)} not found: a PEFT LoRA adapter holds {CONFIG_FILE}")
    config = json.loads(path.read_text())
    where = files.where(CONFIG_FILE)
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; jaxseq serves LoRA")
    for key in _REFUSED:
        if config.get(key):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported by jaxseq's LoRA")
    if config.get("bias") not in ("none", None):
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported by jaxseq's LoRA (only 'none')")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"{where}: r must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return rank, scaling(rank, alpha, bool(config.get("use_rslora")))


def load_adapter(
    location: PathLike,
    cfg: ModelConfig,
    blocks: range,
    dtype: Any = jnp.float32,
    *,
    name: str | None = None,
    revision: str | None = None,
) -> Adapter:
    """Read a PEFT LoRA adapter's weights for ``blocks`` of a model of ``cfg``.

    ``location`` is a folder, or a hub id (``org/name``, at ``revision``) of which only the adapter's two
    files are fetched. Every tensor name is checked (a projection jaxseq does not adapt, a bias, a block
    beyond the model: refused by name); only the blocks asked for are read, each checked against its
    projection's shape. ``name`` defaults to the hub id, or the folder's name.

    Raises:
        FileNotFoundError: no such folder (and no hub id).
        ValueError: the adapter is not a LoRA jaxseq computes, or does not fit ``cfg``; the message says why.
    """
    try:
        files = CheckpointFiles(location, revision)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"adapter {str(location)!r} is neither a folder nor a hub id ('org/name'); a PEFT LoRA adapter "
            f"folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        ) from None
    rank, scaling = _config(files)
    path = files.path(WEIGHTS_FILE)
    if path is None:
        raise ValueError(
            f"{files.where(WEIGHTS_FILE)} not found; jaxseq reads safetensors only: re-save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    targets = lora_targets(cfg)
    by_module = {spec.names[0].removesuffix(".weight"): target for target, spec in targets.items()}
    read: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safetensors.safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            match = _KEY.fullmatch(key)
            if match is None or match[2] not in by_module:
                raise ValueError(
                    f"{path}: tensor {key!r} is not a LoRA weight of a projection jaxseq adapts "
                    f"({', '.join(targets)} of model.layers.N)"
                )
            block, target = int(match[1]), by_module[match[2]]
            if block >= cfg.num_hidden_layers:
                raise ValueError(f"{path}: tensor {key!r} is of block {block}; the model has {cfg.num_hidden_layers}")
            if block in blocks:
                fan_in, fan_out = targets[target].shape
                want = (rank, fan_in) if match[3] == "A" else (fan_out, rank)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != want:
                    raise ValueError(f"{path}: tensor {key!r} has shape {shape}; r={rank} and the model need {want}")
                read.setdefault((block, target), {})[match[3]] = f.get_tensor(key).astype(np.float32)
    adapted: list[BlockParams] = [{} for _ in blocks]
    for (block, target), pair in sorted(read.items()):
        if len(pair) != 2:
            raise ValueError(f"{path}: block {block}'s {target} has lora_{''.join(pair)} without its pair")
        adapted[block - blocks.start][LORA_A.format(target)] = jnp.asarray(pair["A"].T, dtype)
        adapted[block - blocks.start][LORA_B.format(target)] = jnp.asarray(pair["B"].T * scaling, dtype)
    name = name or (files.repo_id or Path(location).name)
    return Adapter(name, blocks.start, tuple(adapted), rank, scaling)


def random_adapter(
    path: PathLike,
    cfg: ModelConfig,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = LORA_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """Write a PEFT LoRA adapter folder for every block of ``cfg`` with normal(0, ``std``) ``A`` and ``B``
    (both non-zero, unlike a fresh adapter's ``B``), which ``peft`` (0.5 on) and ``load_adapter`` load.

    Example:
        >>> path = random_adapter(tmp / "random-adapter", cfg, rank=4, targets=("q_proj",))
        >>> sorted(p.name for p in path.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    check_targets(cfg, targets)
    rng = np.random.default_rng(seed)
    weights = {}
    for target in targets:
        fan_in, fan_out = lora_targets(cfg)[target].shape
        a = rng.normal(0, std, (cfg.num_hidden_layers, rank, fan_in)).astype(np.float32)
        b = rng.normal(0, std, (cfg.num_hidden_layers, fan_out, rank)).astype(np.float32)
        weights[target] = (a.transpose(0, 2, 1), b.transpose(0, 2, 1))
    return save_adapter(path, cfg, weights, alpha=alpha, use_rslora=use_rslora)


def random_lora_weights(
    cfg: ModelConfig, rank: int, targets: Sequence[str] | None = None, *, seed: int = 0, std: float = 0.2
) -> dict[str, jax.Array]:
    """LoRA arrays of every block of ``cfg`` in the layout blocks take (``{target}_lora_a: [blocks, in, rank]``,
    ``{target}_lora_b: [blocks, rank, out]``), normal(0, ``std``), both non-zero: for tests and benchmarks of a
    client's LoRA (``remote_sequential(..., lora=...)``). ``targets`` default to all of ``lora_targets(cfg)``.

    Example:
        >>> weights = random_lora_weights(cfg, rank=2, targets=("q_proj",))
        >>> {name: w.shape for name, w in weights.items()}
        {'q_proj_lora_a': (4, 32, 2), 'q_proj_lora_b': (4, 2, 32)}
    """
    specs = lora_targets(cfg)
    targets = tuple(specs) if targets is None else tuple(targets)
    check_targets(cfg, targets)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(targets)))
    weights = {}
    for target in targets:
        fan_in, fan_out = specs[target].shape
        weights[LORA_A.format(target)] = std * jax.random.normal(next(keys), (cfg.num_hidden_layers, fan_in, rank))
        weights[LORA_B.format(target)] = std * jax.random.normal(next(keys), (cfg.num_hidden_layers, rank, fan_out))
    return weights


def check_targets(cfg: ModelConfig, targets: Sequence[str]) -> None:
    """Refuse targets that are not projections of ``cfg``'s blocks that take LoRA, naming those that are."""
    specs = lora_targets(cfg)
    unknown = [t for t in targets if t not in specs]
    if unknown or not targets:
        raise ValueError(
            f"targets {unknown or '()'} are not projections of a {cfg.family} block; use some of {list(specs)}"
        )


def save_adapter(
    path: PathLike,
    cfg: ModelConfig,
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    alpha: float,
    use_rslora: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter folder of every block of ``cfg``: ``weights`` maps each target to its ``A:
    [blocks, in, rank]`` and ``B: [blocks, rank, out]`` (without the scaling, which ``alpha`` and
    ``use_rslora`` give), as ``peft`` saves them (``lora_A.weight: [rank, in]``, ``lora_B.weight: [out, rank]``).
    """
    check_targets(cfg, list(weights))
    specs = lora_targets(cfg)
    ranks = {a.shape[-1] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise ValueError(f"a PEFT adapter has one rank; these weights have ranks {sorted(ranks)}")
    tensors = {}
    for target, (a, b) in weights.items():
        for block in range(cfg.num_hidden_layers):
            key = _PEFT_PREFIX + LAYER_PREFIX.format(block) + specs[target].names[0].removesuffix(".weight")
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a[block], np.float32).T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b[block], np.float32).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(), "lora_alpha": alpha,
        "target_modules": list(weights), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": None,
    }  # fmt: skip
    if use_rslora:  # only when set: peft before 0.7 (Petals 2.2's) lacks the key and refuses unknown ones
        config["use_rslora"] = True
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rank-stabilised LoRA.

    Example:
        >>> scaling(8, 16), scaling(16, 16, use_rslora=True)
        (2.0, 4.0)
    """
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def with_adapter(blocks: Sequence[BlockParams], adapted: Sequence[BlockParams]) -> list[BlockParams]:
    """Each block's parameters with its adapter's (no copy of any array).

    Example:
        >>> merged = with_adapter(params[:1], [{"q_proj_lora_a": jnp.zeros((32, 2))}])
        >>> "q_proj" in merged[0] and "q_proj_lora_a" in merged[0]
        True
    """
    return [{**block, **extra} for block, extra in zip(blocks, adapted, strict=True)]


def on_device(adapter: Adapter, device: jax.Device | None) -> Adapter:
    """``adapter`` with its arrays on ``device`` (None: JAX's default)."""
    return dataclasses.replace(adapter, blocks=tuple(jax.device_put(b, device) for b in adapter.blocks))
