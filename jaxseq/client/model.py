"""``DistributedCausalLM``: a Flax NNX causal LM of any supported family, whose decoder blocks run in a swarm.

The embedding, final norm and LM head are read from the checkpoint and run locally (frozen); the
blocks run through ``remote_sequential``. Trainable prompts follow Petals' tuning modes:
``"ptune"`` prepends ``prompt_len`` trainable embeddings, ``"deep_ptune"`` also adds a trainable
prompt before every block (``deep_prompts``: ``[num_blocks, 1, prompt_len, hidden]``, broadcast over
the batch). Prompt positions are dropped from the logits. ``"lora"`` (alone, or with either as
``"ptune+lora"``, ``"deep_ptune+lora"``) trains LoRA matrices of the blocks' projections, kept here and
applied by the servers (``ClientLora``); ``save_lora`` writes them as a PEFT adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseq.client.manager import SequenceManager
from jaxseq.client.primitive import remote_sequential
from jaxseq.models.checkpoint import generation_defaults, load_config, load_head
from jaxseq.models.config import ModelConfig
from jaxseq.models.decoder import LORA_A, LORA_B, lm_logits
from jaxseq.models.hub import PathLike
from jaxseq.models.lora import check_targets, save_adapter, scaling
from jaxseq.models.lora import lora_targets as target_specs

TUNING_MODES = (None, "ptune", "deep_ptune", "lora", "ptune+lora", "deep_ptune+lora")


class Frozen(nnx.Variable):
    """Weights loaded from the checkpoint and never trained (optimizers take ``wrt=nnx.Param``)."""


class ClientLora(nnx.Module):
    """Trainable LoRA matrices of every block's ``targets``, as PEFT initialises them: ``a[target]: [blocks, in,
    rank]`` uniform in ±1/sqrt(in) (PEFT's Kaiming-uniform), ``b[target]: [blocks, rank, out]`` zero, so the
    model starts equal to the checkpoint's. ``weights()`` gives what the servers apply (``b`` scaled).

    Example:
        >>> lora = ClientLora(cfg, rank=4, alpha=8, targets=("q_proj", "v_proj"), rngs=nnx.Rngs(0))
        >>> {name: w.shape for name, w in lora.weights().items()}["q_proj_lora_a"]
        (4, 32, 4)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rank: int,
        alpha: float,
        targets: Sequence[str],
        use_rslora: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_targets(cfg, targets)
        if rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = scaling(rank, alpha, use_rslora)
        specs, blocks = target_specs(cfg), cfg.num_hidden_layers
        bounds = {t: 1 / np.sqrt(specs[t].shape[0]) for t in targets}
        self.a = nnx.Dict({
            t: nnx.Param(jax.random.uniform(rngs.params(), (blocks, specs[t].shape[0], rank), dtype, -b, b))
            for t, b in bounds.items()
        })  # fmt: skip
        self.b = nnx.Dict({t: nnx.Param(jnp.zeros((blocks, rank, specs[t].shape[1]), dtype)) for t in targets})

    def weights(self) -> dict[str, jax.Array]:
        """The arrays the servers apply, in ``jaxseq.models.lora``'s layout (``b`` times the scaling)."""
        weights = {}
        for target in self.a:
            weights[LORA_A.format(target)] = self.a[target][...]
            weights[LORA_B.format(target)] = self.b[target][...] * self.scaling
        return weights


class DistributedCausalLM(nnx.Module):
    """A causal LM: local embedding and head, remote blocks, trainable prompts. The family (Llama,
    Mistral, Qwen2, Qwen3, Mixtral) comes from the checkpoint, a local folder or a hub model id (of which
    only the config and the shards of the embedding and head are fetched).

    With ``tuning_mode`` ending in ``"lora"``, ``lora`` (a ``ClientLora``) trains rank ``lora_rank`` matrices of
    ``lora_targets`` (default: every projection of the family that takes LoRA), scaled by ``lora_alpha /
    lora_rank`` (``/ sqrt(lora_rank)`` with ``use_rslora``), through servers that apply them.

    Raises ``ValueError`` when the swarm serves another model: another number of blocks, hidden size or
    family than the checkpoint's.

    Example:
        >>> model = DistributedCausalLM(checkpoint, manager, tuning_mode="deep_ptune", prompt_len=2)
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        >>> ids = jnp.array([[1, 2, 3, 4]])
        >>> loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(ids), ids).mean()
        >>> loss, grads = nnx.value_and_grad(loss_fn)(model)
        >>> _ = optimizer.update(model, grads)
        >>> model(ids).shape
        (1, 4, 100)
    """

    def __init__(
        self,
        checkpoint: PathLike,
        manager: SequenceManager,
        *,
        tuning_mode: str | None = None,
        prompt_len: int = 16,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] | None = None,
        use_rslora: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
        revision: str | None = None,
    ):
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {tuning_mode!r}")
        cfg = load_config(checkpoint, revision)
        _check_swarm(manager, cfg, checkpoint)
        prompt_mode = (tuning_mode or "").removesuffix("lora").removesuffix("+") or None
        if prompt_mode and prompt_len < 1:
            raise ValueError(f"prompt_len must be at least 1 with tuning_mode={tuning_mode!r}, got {prompt_len}")
        head = load_head(checkpoint, dtype, revision)
        self.generation_defaults = generation_defaults(checkpoint, revision)
        self.config = cfg
        self.manager = manager
        self.tuning_mode = tuning_mode
        self.prompt_mode = prompt_mode
        self.prompt_len = prompt_len if prompt_mode else 0
        self.embed_tokens = Frozen(head["embed_tokens"])
        self.norm = Frozen(head["norm"])
        self.lm_head = Frozen(head["lm_head"])
        rngs = rngs or nnx.Rngs(0)
        if prompt_mode:
            self.prompt_embeddings = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (prompt_len, cfg.hidden_size), dtype)
            )
        if prompt_mode == "deep_ptune":
            self.deep_prompts = nnx.Param(jnp.zeros((cfg.num_hidden_layers, 1, prompt_len, cfg.hidden_size), dtype))
        self.lora = (
            ClientLora(
                cfg, rank=lora_rank, alpha=lora_alpha, targets=lora_targets or tuple(target_specs(cfg)),
                use_rslora=use_rslora, dtype=dtype, rngs=rngs,
            )
            if tuning_mode and tuning_mode.endswith("lora")
            else None
        )  # fmt: skip

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` for token ids ``[batch, seq]``."""
        hidden, prompts = self.embed(input_ids, with_prompts=True)
        out = remote_sequential(hidden, prompts, self.manager, self.lora_weights())
        return self.logits(out[:, self.prompt_len :])

    def lora_weights(self) -> dict[str, jax.Array] | None:
        """The LoRA weights the servers apply (``ClientLora.weights``), or None without LoRA."""
        return None if self.lora is None else self.lora.weights()

    def save_lora(self, path: PathLike) -> Path:
        """Write the trained LoRA matrices as a PEFT adapter folder, which ``peft`` loads onto the checkpoint's
        transformers model and ``jaxseq-server --adapters`` serves.

        Example:
            >>> model = DistributedCausalLM(checkpoint, manager, tuning_mode="lora", lora_rank=2)
            >>> sorted(p.name for p in model.save_lora(tmp / "trained").iterdir())
            ['adapter_config.json', 'adapter_model.safetensors']
        """
        if self.lora is None:
            raise ValueError(f"this model trains no LoRA (tuning_mode={self.tuning_mode!r}); use tuning_mode='lora'")
        lora = self.lora
        weights = {t: (np.asarray(lora.a[t][...]), np.asarray(lora.b[t][...])) for t in lora.a}
        return save_adapter(path, self.config, weights, alpha=lora.alpha, use_rslora=lora.use_rslora)

    def embed(self, input_ids: jax.Array, with_prompts: bool) -> tuple[jax.Array, jax.Array | None]:
        """Hidden states of token ids ``[batch, seq]``, and (``with_prompts``) the trained prompts put where
        the blocks take them: prompt embeddings before the tokens, deep prompts ``[blocks, batch, prompt_len,
        hidden]`` (or None)."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {input_ids.shape}")
        hidden = self.embed_tokens[...][input_ids]
        batch, hidden_size = hidden.shape[0], hidden.shape[-1]
        prompts = None
        if with_prompts and self.prompt_mode:
            prefix = jnp.broadcast_to(self.prompt_embeddings[...], (batch, self.prompt_len, hidden_size))
            hidden = jnp.concatenate([prefix.astype(hidden.dtype), hidden], axis=1)
        if with_prompts and self.prompt_mode == "deep_ptune":
            deep = self.deep_prompts[...]
            prompts = jnp.broadcast_to(deep, (deep.shape[0], batch) + deep.shape[2:])
        return hidden, prompts

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head's logits of the last block's hidden states."""
        return lm_logits(hidden, self.norm[...], self.lm_head[...], self.config.rms_norm_eps)

    def generate(self, input_ids: Any, *, max_new_tokens: int, **options: Any) -> np.ndarray:
        """Token ids ``[batch, prompt + new]``, as transformers' ``generate`` returns them, generated through
        an inference session of the swarm (``jaxseq.client.generation.generate`` has the options: sampling,
        ``temperature``, ``top_k``, ``top_p``, ``key``, ``eos_token_id``, ``pad_token_id``, ``on_tokens``).
        ``eos_token_id`` and ``pad_token_id`` default to the checkpoint's, as in transformers. Trained prompts
        apply as in training.

        Example:
            >>> model = DistributedCausalLM(checkpoint, manager)
            >>> model.generate(np.array([[1, 2, 3]]), max_new_tokens=4).shape
            (1, 7)
        """
        from jaxseq.client.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **{**self.generation_defaults, **options})


DistributedLlama = DistributedCausalLM  # its name from before there were other families


def _check_swarm(manager: SequenceManager, cfg: ModelConfig, checkpoint: PathLike) -> None:
    """Refuse a swarm that serves another model than ``checkpoint``: its hidden states would mean nothing."""
    served = []
    if manager.num_blocks != cfg.num_hidden_layers:
        served.append(f"{manager.num_blocks} blocks, not {cfg.num_hidden_layers}")
    if manager.hidden_size is not None and manager.hidden_size != cfg.hidden_size:
        served.append(f"hidden size {manager.hidden_size}, not {cfg.hidden_size}")
    families = manager.model_families
    if families and families != {cfg.family}:
        served.append(f"family {', '.join(sorted(families))}, not {cfg.family}")
    if served:
        raise ValueError(
            f"the swarm serves another model than {checkpoint}: {'; '.join(served)}. "
            "Use the checkpoint of the model the swarm serves (or the dht_prefix of the model you mean)"
        )
