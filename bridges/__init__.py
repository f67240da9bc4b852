"""bridges: JAX and torch in one program, sharing memory and gradients.

* ``to_torch`` / ``to_jax``: zero-copy conversion through DLPack (``copy=True`` for an explicit copy).
* ``RemoteSequential``: the swarm's chain of Llama blocks as a ``torch.nn.Module`` (train deep prompts
  with a torch optimizer through ``jaxseq``'s fault-tolerant client).
* ``jax_function_as_torch``: a JAX function as a differentiable torch function.
* ``torch_module_as_jax``: a torch module (an embedding, an LM head) as a differentiable JAX function.

Example:
    >>> import bridges, torch
    >>> blocks = bridges.RemoteSequential(manager)
    >>> prompts = torch.nn.Parameter(torch.zeros(4, 2, 3, 32))
    >>> opt = torch.optim.AdamW([prompts], lr=1e-2)
    >>> blocks(torch.ones(2, 5, 32), prompts).pow(2).mean().backward(); opt.step()
"""

from bridges.dlpack import to_jax, to_torch
from bridges.torch_autograd import RemoteSequential, jax_function_as_torch
from bridges.torch_in_jax import torch_module_as_jax

__all__ = ["RemoteSequential", "jax_function_as_torch", "to_jax", "to_torch", "torch_module_as_jax"]
