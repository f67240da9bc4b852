"""Torch code inside JAX: ``torch_module_as_jax`` wraps a torch callable (an embedding, an LM head kept
in torch) as a differentiable JAX function that works under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import torch

from bridges.dlpack import jax_dtype, to_jax, to_torch

OutShape = Any  # a pytree of jax.ShapeDtypeStruct, or a function of the inputs' that returns one


def torch_module_as_jax(module: Callable[..., Any], *, out_shape: OutShape | None = None) -> Callable[..., Any]:
    """``module`` (a torch callable of tensors) as a JAX function of arrays, differentiable w.r.t. its inputs.

    Runs in host callbacks (``jax.pure_callback``), so it works eagerly and under ``jax.jit``;
    under ``jax.vmap`` the module is called once per example. Inputs are placed on the device of
    the module's parameters (the CPU for a module without any). The module returns a tensor or a
    pytree (tuple, list, dict) of tensors; JAX gets arrays in the same structure.

    JAX must know the output's shapes and dtypes before running it. ``out_shape`` declares them:
    a pytree of ``jax.ShapeDtypeStruct``, or a function from the inputs' ``ShapeDtypeStruct`` s to one.
    Without it, the module is run once under ``torch.no_grad()`` on zeros of each new input
    signature (shapes and dtypes), and the result's shapes are cached: pass ``out_shape`` for a
    module whose call has side effects (e.g. batch-norm statistics) or is expensive.

    Gradients are w.r.t. the floating inputs only: the module's parameters are constants to JAX
    and their ``.grad`` is not touched. The backward re-runs the module's forward with torch
    autograd (nothing is kept between JAX's forward and backward), so the module must be
    deterministic (e.g. in ``eval()`` mode, or without dropout) and must not modify its inputs in place.

    Example:
        >>> head = torch_module_as_jax(torch.nn.Linear(32, 10))
        >>> jax.jit(jax.grad(lambda h: head(h).sum()))(jnp.ones((2, 32))).shape
        (2, 32)
    """
    return _TorchAsJax(module, out_shape)


class _TorchAsJax:
    def __init__(self, module: Callable[..., Any], out_shape: OutShape | None):
        self.module = module
        self.out_shape = out_shape
        self.device = _device_of(module)
        self.inferred: dict[tuple, Any] = {}  # input signature -> output ShapeDtypeStructs
        self.call = jax.custom_vjp(self._forward)
        self.call.defvjp(self._fwd, self._bwd)

    def __call__(self, *args) -> Any:
        return self.call(*(jnp.asarray(a) for a in args))

    # --- JAX side: shapes and callbacks ------------------------------------------------------------
    def _forward(self, *args):
        return jax.pure_callback(self._host_forward, self._result_shape(args), *args, vmap_method="sequential")

    def _fwd(self, *args):
        return self._forward(*args), args

    def _bwd(self, args, cotangents):
        diff = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
        result: list[jax.Array | None] = [None] * len(args)
        if not diff:
            return tuple(result)
        cotangents = [c for c in jax.tree.leaves(cotangents) if c.dtype != jax.dtypes.float0]
        specs = [jax.ShapeDtypeStruct(args[i].shape, args[i].dtype) for i in diff]
        host = functools.partial(self._host_backward, len(args))
        grads = jax.pure_callback(host, specs, *args, *cotangents, vmap_method="sequential")
        for i, g in zip(diff, grads):
            result[i] = g
        return tuple(result)

    def _result_shape(self, args) -> Any:
        specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
        if self.out_shape is not None:
            return self.out_shape(*specs) if callable(self.out_shape) else self.out_shape
        if specs not in self.inferred:
            with jax.ensure_compile_time_eval():  # concrete zeros, also while jit traces
                zeros = [jnp.zeros(s.shape, s.dtype) for s in specs]
            with torch.no_grad():
                out = self.module(*(self._tensor(z) for z in zeros))
            self.inferred[specs] = jax.tree.map(lambda t: jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(t.dtype)), out)
        return self.inferred[specs]

    # --- host side: torch ---------------------------------------------------------------------------
    def _tensor(self, a) -> torch.Tensor:
        return to_torch(jnp.asarray(a)).to(self.device)

    def _host_forward(self, *args):
        with torch.no_grad():
            out = self.module(*(self._tensor(a) for a in args))
        return jax.tree.map(lambda t: to_jax(t.detach(), copy=None), out)

    def _host_backward(self, n_args: int, *arrays):
        inputs = [self._tensor(a) for a in arrays[:n_args]]
        diff = [t.requires_grad_() for t in inputs if t.is_floating_point()]
        with torch.enable_grad():
            outs = [o for o in jax.tree.leaves(self.module(*inputs)) if o.is_floating_point()]
        pairs = [(o, self._tensor(c)) for o, c in zip(outs, arrays[n_args:]) if o.requires_grad]
        grads = (
            torch.autograd.grad([o for o, _ in pairs], diff, [c for _, c in pairs], allow_unused=True)
            if pairs
            else [None] * len(diff)
        )
        return [to_jax((torch.zeros_like(t) if g is None else g).detach(), copy=None) for t, g in zip(diff, grads)]


def _device_of(module: Callable[..., Any]) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for parameter in module.parameters():
            return parameter.device
        for buffer in module.buffers():
            return buffer.device
    return torch.device("cpu")
