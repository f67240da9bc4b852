"""JAX arrays <-> torch tensors through DLPack, sharing memory (zero-copy) or saying why not.

Both functions take ``copy`` with the array-API meaning:

* ``copy=False`` (default): share memory, or raise ``ValueError`` saying why and what to do.
* ``copy=True``: always an independent copy (on the same device when the other framework sees it,
  else on the CPU).
* ``copy=None``: share when possible, else copy as ``copy=True`` does.

``copy`` never changes values: a dtype the other side can't hold is always an error.

What each dtype does (jax 0.10.2 and torch 2.13 on CPU; the same on CUDA when both see the GPU):

==========  ==========================================  ==========================================
dtype       ``to_torch`` (JAX -> torch)                 ``to_jax`` (torch -> JAX)
==========  ==========================================  ==========================================
float32     zero-copy                                   zero-copy
bfloat16    zero-copy                                   zero-copy
float16     zero-copy                                   zero-copy
int32       zero-copy                                   zero-copy
bool        zero-copy                                   zero-copy
int64       zero-copy with ``jax_enable_x64``; without  zero-copy with ``jax_enable_x64``; without
            it JAX has no int64 arrays (``jnp.asarray``  it ``ValueError``, also with ``copy=True``:
            of an int64 numpy array makes int32)        ``jax.dlpack.from_dlpack`` alone would copy
                                                        to int32 silently, even with ``copy=False``
                                                        (2**40 becomes 0)
==========  ==========================================  ==========================================

float64, uint64 and complex128 behave like int64. Dtypes without a DLPack code (e.g. ``jnp.int4``)
raise. Layouts: JAX on CPU can only share a row-major buffer aligned to 64 bytes, so ``to_jax`` of a
non-contiguous tensor or of a view at an offset (``t[1:]``) needs a copy; so does a tensor that
requires grad (DLPack carries no autograd history: ``detach()`` it to share its memory).

Writes: the tensor and the array are one buffer. A torch in-place write is seen by JAX code that
reads the array afterwards, but JAX assumes arrays are immutable (results it already computed are
not updated, and it may reuse buffers it owns): only write into memory you own, before JAX reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxseq.memory import ALIGNMENT


def to_torch(array: jax.Array, *, copy: bool | None = False) -> torch.Tensor:
    """The torch tensor sharing ``array``'s memory, on the same device.

    Example:
        >>> a = jnp.arange(4.0)
        >>> t = to_torch(a)
        >>> t.data_ptr() == a.unsafe_buffer_pointer()
        True
    """
    if isinstance(array, jax.core.Tracer):
        raise TypeError(
            "to_torch needs a concrete array, got a tracer (it was called inside jax.jit, grad or vmap); "
            "call it outside the transformation, or run the torch code through bridges.torch_module_as_jax"
        )
    if not isinstance(array, jax.Array):
        raise TypeError(f"to_torch takes a jax.Array, got {type(array).__name__}; use jnp.asarray first")
    if array.is_deleted():
        raise ValueError("to_torch got a deleted jax.Array (was it donated to a jitted function?)")
    reason = _why_torch_cannot_share(array)
    if reason and copy is False:
        raise ValueError(f"to_torch can't share this array's memory: {reason}. Pass copy=True to copy it")
    if copy or reason:
        array = jax.device_put(array, _device_torch_sees(array), may_alias=False)
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"torch can't import a {array.dtype} array through DLPack ({error}); "
            "convert it first with array.astype(...) to a dtype torch has"
        ) from error


def to_jax(tensor: torch.Tensor, *, copy: bool | None = False) -> jax.Array:
    """The JAX array sharing ``tensor``'s memory, on the same device.

    Example:
        >>> t = torch.arange(4.0)
        >>> a = to_jax(t)
        >>> a.unsafe_buffer_pointer() == t.data_ptr()
        True
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax takes a torch.Tensor, got {type(tensor).__name__}")
    dtype = jax_dtype(tensor.dtype)
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"JAX can't hold {tensor.dtype} while jax_enable_x64 is off: it would narrow the values to "
            f"{jax.dtypes.canonicalize_dtype(dtype)}. Enable x64 (jax.config.update('jax_enable_x64', True)) "
            f"to share it, or convert it explicitly in torch, e.g. tensor.to(torch.int32)"
        )
    reason = _why_jax_cannot_share(tensor)
    if reason and copy is False:
        raise ValueError(f"to_jax can't share this tensor's memory: {reason}. Pass copy=True to copy it")
    if copy or reason:
        tensor = tensor.detach().to(
            device=_device_jax_sees(tensor.device), memory_format=torch.contiguous_format, copy=True
        )
    return jax.dlpack.from_dlpack(tensor, copy=False)


def jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX (numpy) dtype with the same name as a torch dtype, e.g. ``torch.bfloat16 -> bfloat16``."""
    name = str(dtype).removeprefix("torch.")
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"JAX has no dtype {name}; convert the tensor with tensor.to(...) first") from None


def _why_torch_cannot_share(array: jax.Array) -> str | None:
    if len(array.devices()) > 1:
        return f"it is sharded over {len(array.devices())} devices and DLPack carries one buffer"
    device = next(iter(array.devices()))
    if device.platform != "cpu" and not torch.cuda.is_available():
        return f"it is on {device}, and this torch build sees no GPU"
    return None


def _device_torch_sees(array: jax.Array) -> jax.Device:
    device = min(array.devices(), key=lambda d: d.id)
    return device if device.platform == "cpu" or torch.cuda.is_available() else jax.devices("cpu")[0]


def _why_jax_cannot_share(tensor: torch.Tensor) -> str | None:
    if tensor.requires_grad:
        return (
            "it requires grad and DLPack carries no autograd history; tensor.detach() shares its memory "
            "without gradients, and bridges.jax_function_as_torch differentiates through JAX code"
        )
    if tensor.device != _device_jax_sees(tensor.device):
        return f"it is on {tensor.device}, a device JAX doesn't see (JAX has {jax.devices()})"
    if not tensor.is_contiguous():
        return f"it is not contiguous (strides {tensor.stride()}); tensor.contiguous() copies it in torch"
    if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
        return (
            f"its data is not {ALIGNMENT}-byte aligned, which JAX needs on CPU "
            "(a view at an offset into its storage, e.g. t[1:]); tensor.clone() copies it in torch"
        )
    return None


def _device_jax_sees(device: torch.device) -> torch.device:
    """``device`` if JAX has it, else the CPU."""
    if device.type == "cpu":
        return device
    if device.type == "cuda" and (device.index or 0) < _jax_gpu_count():
        return device
    return torch.device("cpu")


def _jax_gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0
