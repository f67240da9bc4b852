"""What tests share besides fixtures: the tiny model, comparisons within a tolerance, inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxseq

TINY = jaxseq.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64, of arrays or torch tensors on any device."""
    a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, np.float64) for v in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def training_step(blocks):
    """jit(value_and_grad) w.r.t. hidden states and prompts of a non-linear read-out of ``blocks(x, prompts)``
    (so gradients depend on every output differently); returns ``((loss, outputs), (grad_x, grad_prompts))``."""

    def loss(x, p):
        out = blocks(x, p)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=out.dtype)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def matches(got, want, tol: float = 1e-5) -> bool:
    """Whether two ``training_step`` results agree: outputs and both gradients within ``tol`` (relative)."""
    ((_, out), grads), ((_, out_ref), grads_ref) = got, want
    return rel_err(out, out_ref) < tol and all(rel_err(g, r) < tol for g, r in zip(grads, grads_ref))


def assert_matches(got, want, tol: float = 1e-5) -> None:
    ((_, out), (gx, gp)), ((_, out_ref), (gx_ref, gp_ref)) = got, want
    assert rel_err(out, out_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    assert rel_err(gp, gp_ref) < tol


def random_inputs(cfg, batch, seq, prompt_len, seed=1, num_blocks=None):
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, seq, cfg.hidden_size), jnp.float32)
    n = num_blocks or cfg.num_hidden_layers
    prompts = 0.5 * jax.random.normal(kp, (n, batch, prompt_len, cfg.hidden_size), jnp.float32)
    return x, prompts
