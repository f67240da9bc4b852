"""``remote_sequential``: a ``jax.custom_vjp`` whose forward and backward rules reach the swarm
through ``jax.pure_callback``. Only JAX plumbing lives here: shapes, callbacks, residual handles.

The forward rule keeps each micro-batch's route and span inputs in the client's memory (in the manager's
bounded ``SavedStates``) and passes a handle to the backward rule as a residual. JAX may drop or
repeat a pure callback, so a backward whose state is missing recomputes the forward: it never fails
for that reason, and host memory stays bounded however many steps run.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.client.calls import run_backward, run_forward
from jaxseq.client.lora import LoraWeights
from jaxseq.client.manager import SequenceManager
from jaxseq.models.inputs import check_span_inputs


def remote_sequential(
    x: jax.Array,
    prompts: jax.Array | None,
    manager: SequenceManager,
    lora: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """Run every block of ``manager``'s chain on hidden states ``x: [batch, seq, hidden]``, remotely.

    Differentiable w.r.t. ``x``, ``prompts`` (deep prompts ``[num_blocks, batch, prompt_len, hidden]``,
    added to the first ``prompt_len`` positions before each block; None for none) and ``lora``: LoRA
    weights the servers apply to the blocks' projections, ``{target}_lora_a: [num_blocks, in, rank]`` and
    ``{target}_lora_b: [num_blocks, rank, out]`` (scaling included; ``jaxseq.models.lora``'s layout), which
    the servers keep by content hash between calls. Works under ``jax.jit``, ``jax.grad``,
    ``jax.value_and_grad`` and ``jax.vmap`` (a vmapped call is sent as one batched request; not with
    ``lora``, whose gradient is one for the whole batch). Failures of the swarm surface as an error whose
    message starts with the ``jaxseq`` error type (``MissingBlocksError``, ``RemoteCallError``);
    ``jaxseq.swarm_errors`` re-raises the typed exception.

    Example:
        >>> swarm = LocalSwarm(cfg, params, spans=[(0, 2), (2, 4)])
        >>> manager = swarm.sequence_manager(ClientConfig())
        >>> loss = lambda x, p: jnp.sum(remote_sequential(x, p, manager) ** 2)
        >>> grad_x, grad_prompts = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, prompts)
        >>> grad_x.shape, grad_prompts.shape
        ((2, 5, 32), (4, 2, 3, 32))
    """
    hidden_size = manager.hidden_size or x.shape[-1]
    check_span_inputs(x, prompts, hidden_size=hidden_size, num_blocks=manager.num_blocks, name="x")
    if prompts is None:
        prompts = jnp.zeros((manager.num_blocks, x.shape[0], 0, x.shape[2]), x.dtype)
    lora = dict(lora or {})
    for name, array in lora.items():
        if array.ndim != 3 or array.shape[0] != manager.num_blocks:
            raise ValueError(f"LoRA array {name!r} has shape {array.shape}; want [{manager.num_blocks} blocks, ., .]")
    return _remote(x, prompts, lora, manager)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _remote(x, prompts, lora, manager):
    out, _ = _forward_callback(x, prompts, lora, manager, save=False)
    return out


def _remote_fwd(x, prompts, lora, manager):
    out, handle = _forward_callback(x, prompts, lora, manager, save=True)
    return out, (x, prompts, lora, handle)


def _remote_bwd(manager, residuals, grad_out):
    x, prompts, lora, handle = residuals
    return _backward_callback(x, prompts, lora, handle, grad_out, manager)


_remote.defvjp(_remote_fwd, _remote_bwd)


def _flatten(x: np.ndarray, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Fold vmap's leading axes into the batch: one request for the whole vmapped call."""
    lead = x.shape[:-3]
    x_flat = x.reshape((-1,) + x.shape[-2:])
    shape: tuple[int, ...] = prompts.shape  # lead + [num_blocks, batch, prompt_len, hidden]
    prompts_flat = np.moveaxis(prompts, len(lead), 0).reshape((shape[len(lead)], len(x_flat), *shape[-2:]))
    return x_flat, prompts_flat, lead


def _unflatten_prompts(grad_prompts: np.ndarray, lead: tuple[int, ...], batch: int) -> np.ndarray:
    n = grad_prompts.shape[0]
    g = grad_prompts.reshape((n,) + lead + (batch,) + grad_prompts.shape[-2:])
    return np.moveaxis(g, 0, len(lead))


def _host_lora(x: np.ndarray, lora: dict) -> LoraWeights | None:
    """The LoRA weights as the chain sends them (None for none); refused under ``vmap`` (see ``remote_sequential``)."""
    if not lora:
        return None
    if x.ndim > 3:
        raise ValueError(
            "remote_sequential with lora can't be vmapped (its LoRA gradient is one for the whole batch): fold the "
            "vmapped axis into the batch instead"
        )
    return LoraWeights.of({name: np.asarray(array) for name, array in lora.items()})


def _forward_callback(x, prompts, lora, manager, save: bool):
    def callback(x, prompts, lora):
        x, prompts = np.asarray(x), np.asarray(prompts)
        x_flat, prompts_flat, lead = _flatten(x, prompts)
        out, handle = run_forward(manager, x_flat, prompts_flat, save, _host_lora(x, lora))
        return out.reshape(x.shape), np.full(lead, handle, np.int32)

    result_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((), jnp.int32))
    return jax.pure_callback(callback, result_shape, x, prompts, lora, vmap_method="broadcast_all")


def _backward_callback(x, prompts, lora, handle, grad_out, manager):
    def callback(x, prompts, lora, handle, grad_out):
        x, prompts, grad_out = np.asarray(x), np.asarray(prompts), np.asarray(grad_out)
        x_flat, prompts_flat, lead = _flatten(x, prompts)
        host_lora = _host_lora(x, lora)
        grads = run_backward(
            manager, x_flat, prompts_flat, grad_out.reshape(x_flat.shape), int(np.asarray(handle).reshape(-1)[0]),
            host_lora,
        )  # fmt: skip
        grad_lora = {name: grads.lora[name].astype(lora[name].dtype) for name in lora} if grads.lora else {}
        return grads.inputs.reshape(x.shape), _unflatten_prompts(grads.prompts, lead, x.shape[-3]), grad_lora

    result_shape = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(prompts.shape, prompts.dtype),
        {name: jax.ShapeDtypeStruct(array.shape, array.dtype) for name, array in lora.items()},
    )
    return jax.pure_callback(callback, result_shape, x, prompts, lora, handle, grad_out, vmap_method="broadcast_all")
