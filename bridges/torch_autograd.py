"""JAX code inside torch autograd: ``jax_function_as_torch`` for any JAX function of arrays, and
``RemoteSequential``, the swarm's chain of blocks as a ``torch.nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from bridges.dlpack import jax_dtype, to_jax, to_torch
from jaxseq.client.calls import run_backward, run_forward
from jaxseq.client.manager import SequenceManager
from jaxseq.models.inputs import check_span_inputs


class RemoteSequential(torch.nn.Module):
    """Every block of ``manager``'s chain, run remotely, as a torch module.

    ``module(x, prompts=None)``: ``x`` is ``[batch, seq, hidden]``, ``prompts`` (deep prompts)
    ``[num_blocks, batch, prompt_len, hidden]`` or None. Differentiable w.r.t. both; the output is on
    ``x``'s device with its dtype. Calls go through the same code as ``jaxseq.remote_sequential``
    (``jaxseq.client.calls``): micro-batching, re-routing and retries, and forward state kept in
    ``manager.saved`` until backward (bounded; a backward whose state was dropped recomputes it).
    Swarm failures raise the typed ``jaxseq`` errors (``MissingBlocksError``, ``RemoteCallError``).

    Example:
        >>> blocks = RemoteSequential(manager)
        >>> prompts = torch.nn.Parameter(torch.zeros(4, 2, 3, 32))
        >>> blocks(torch.ones(2, 5, 32), prompts).pow(2).mean().backward()
        >>> prompts.grad.shape
        torch.Size([4, 2, 3, 32])
    """

    def __init__(self, manager: SequenceManager):
        super().__init__()
        self.manager = manager

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        for name, value in (("x", x), ("prompts", prompts)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(value).__name__}; "
                    "for JAX arrays use jaxseq.remote_sequential"
                )
        check_span_inputs(
            _spec(x),
            _spec(prompts),
            hidden_size=self.manager.hidden_size or x.shape[-1],
            num_blocks=self.manager.num_blocks,
            name="x",
        )
        if prompts is None:
            prompts = x.new_zeros((self.manager.num_blocks, x.shape[0], 0, x.shape[2]))
        save = torch.is_grad_enabled() and (x.requires_grad or prompts.requires_grad)
        return _RemoteSequentialFunction.apply(x, prompts, self.manager, save)

    def extra_repr(self) -> str:
        return f"num_blocks={self.manager.num_blocks}"


class _RemoteSequentialFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prompts, manager, save):
        out, ctx.handle = run_forward(manager, _as_numpy(x), _as_numpy(prompts), save)
        ctx.manager = manager
        ctx.save_for_backward(x, prompts)
        return _from_numpy(out, like=x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, prompts = ctx.saved_tensors
        grads = run_backward(ctx.manager, _as_numpy(x), _as_numpy(prompts), _as_numpy(grad_out), ctx.handle)
        return _from_numpy(grads.inputs, like=x), _from_numpy(grads.prompts, like=prompts), None, None


def jax_function_as_torch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a JAX function of arrays) as a differentiable function of torch tensors.

    The forward runs ``jax.jit(fn)``; the backward runs ``jax.vjp`` of ``fn`` (jitted), recomputing
    ``fn``'s forward rather than keeping JAX residuals between torch's forward and backward.
    Tensors go to JAX and back through ``bridges.dlpack`` (zero-copy where possible); ``fn`` may return
    an array or a pytree of arrays (tuple, list, dict). Outputs are on the first input's device.
    Gradients flow to floating inputs; integer inputs and outputs are not differentiable.

    Example:
        >>> f = jax_function_as_torch(lambda x, w: jnp.tanh(x @ w))
        >>> x, w = torch.ones(2, 3), torch.ones(3, 4, requires_grad=True)
        >>> f(x, w).sum().backward()
        >>> w.grad.shape
        torch.Size([3, 4])
    """
    return _JaxFunction(fn)


class _JaxFunction:
    def __init__(self, fn: Callable[..., Any]):
        self.forward = jax.jit(fn)

        def pullback(diff: tuple[int, ...], args: tuple, cotangents):
            def of_diff(*diff_args):
                full = list(args)
                for i, value in zip(diff, diff_args):
                    full[i] = value
                return fn(*full)

            return jax.vjp(of_diff, *(args[i] for i in diff))[1](cotangents)

        self.pullback = jax.jit(pullback, static_argnums=0)

    def __call__(self, *tensors: torch.Tensor) -> Any:
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"argument {i} is {type(t).__name__}; pass torch tensors (close over other values)")
        out_tree: list = []  # filled by the forward: the structure of fn's result
        outs = _JaxFunctionApply.apply(self, out_tree, *tensors)
        return jax.tree.unflatten(out_tree[0], outs)


class _JaxFunctionApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, jax_fn: _JaxFunction, out_tree: list, *tensors):
        outs, tree = jax.tree.flatten(jax_fn.forward(*(to_jax(t.detach(), copy=None) for t in tensors)))
        out_tree.append(tree)
        ctx.jax_fn, ctx.tree = jax_fn, tree
        ctx.out_specs = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs]
        ctx.save_for_backward(*tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        results = tuple(to_torch(o).to(device) for o in outs)
        ctx.mark_non_differentiable(*(r for r in results if not r.is_floating_point()))
        return results

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        diff = tuple(i for i, t in enumerate(tensors) if ctx.needs_input_grad[i + 2])
        args = tuple(to_jax(t.detach(), copy=None) for t in tensors)
        cotangents = [
            to_jax(g.detach(), copy=None)
            if jnp.issubdtype(s.dtype, jnp.inexact)
            else np.zeros(s.shape, jax.dtypes.float0)
            for g, s in zip(grads, ctx.out_specs)
        ]
        grads_in = ctx.jax_fn.pullback(diff, args, jax.tree.unflatten(ctx.tree, cotangents))
        result: list[torch.Tensor | None] = [None] * len(tensors)
        for i, g in zip(diff, grads_in):
            result[i] = to_torch(g).to(tensors[i].device)
        return (None, None, *result)


def _spec(t: torch.Tensor | None) -> jax.ShapeDtypeStruct | None:
    """Shape and dtype of a tensor, as ``check_span_inputs`` reads them."""
    return None if t is None else jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(t.dtype))


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array in the client's memory (where the manager works): zero-copy for a CPU
    tensor JAX can share."""
    return np.asarray(to_jax(t.detach().cpu(), copy=None))


def _from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return to_torch(jnp.asarray(a)).to(like.device)
