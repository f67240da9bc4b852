"""The reference jaxseq is measured against: a transformers model's own block outputs, for tests and
benchmarks (transformers and torch are imported by the caller; this module needs them only as passed in).

Example:
    >>> import torch, transformers
    >>> hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    >>> outputs = block_outputs(hf, np.zeros((1, 3, 32), np.float32))
    >>> len(outputs), outputs[-1].shape
    (4, (1, 3, 32))
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fresh_rope(model: Any) -> None:
    """Forget the longest sequence seen: transformers' dynamic rope keeps the frequencies of the longest
    one so far, so that a shorter one later is computed with them. A fresh model computes each forward
    from its own length, as jaxseq does."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len


def block_outputs(model: Any, x: np.ndarray, dtype: Any = None) -> list[np.ndarray]:
    """Each block's output, as float32, for ``inputs_embeds=x`` (cast to ``dtype``, default the model's).

    Taken by hooks: the last entry of transformers' ``output_hidden_states`` has the final norm applied."""
    import torch

    outputs: list[Any] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in model.model.layers]
    fresh_rope(model)
    try:
        with torch.no_grad():
            model.model(inputs_embeds=torch.from_numpy(x).to(dtype or model.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return [(out[0] if isinstance(out, tuple) else out).float().numpy() for out in outputs]


def low_precision_errors(model: Any, checkpoint: Any, dtype: str, x: np.ndarray) -> tuple[float, float]:
    """Relative errors, against transformers' float32 blocks, of a jaxseq server's blocks in ``dtype``
    (``"bfloat16"`` or ``"float16"``) and of transformers' own blocks in ``dtype``: the yardstick of what
    that dtype costs. ``model`` is the float32 transformers model of ``checkpoint``."""
    import copy

    import jax.numpy as jnp
    import torch

    from jaxseq.models.checkpoint import load_checkpoint
    from jaxseq.server.backend import BlockBackend

    cfg, low = load_checkpoint(checkpoint, dtype=jnp.dtype(dtype))
    reference = block_outputs(model, x)[-1]
    prompts = np.zeros((cfg.num_hidden_layers, len(x), 0, cfg.hidden_size), dtype)
    ours = BlockBackend(cfg, low).forward(x.astype(dtype), prompts, 0, cfg.num_hidden_layers)
    theirs = block_outputs(copy.deepcopy(model).to(getattr(torch, dtype)), x)[-1]
    return _rel_err(ours, reference), _rel_err(theirs, reference)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))
