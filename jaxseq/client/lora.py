"""A client's own LoRA weights as its calls carry them: host arrays of every block of the chain, and each
block's digest (``jaxseq.arrays.digest``), by which servers keep them between calls.

The arrays are what the blocks apply: ``{target}_lora_a: [blocks, in, rank]`` and ``{target}_lora_b:
[blocks, rank, out]`` with the scaling already in ``b`` (``jaxseq.models.lora``'s convention, one array per
name for the whole chain). Servers return their gradients in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from jaxseq.arrays import digest


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """LoRA arrays of blocks ``0..num_blocks-1`` by name (each ``[num_blocks, ...]``) and their digests
    (computed when first asked for: a backward that reuses its forward's weights never hashes them again).

    Example:
        >>> lora = LoraWeights.of({"q_proj_lora_a": np.zeros((4, 32, 2), np.float32),
        ...                        "q_proj_lora_b": np.zeros((4, 2, 32), np.float32)})
        >>> lora.rank, len(lora.digests), sorted(lora.block(1))
        (2, 4, ['q_proj_lora_a', 'q_proj_lora_b'])
        >>> LoraWeights.of({"q_proj_lora_a": np.zeros((4, 32, 2), np.float32)})
        Traceback (most recent call last):
        ...
        ValueError: LoRA arrays come in _lora_a/_lora_b pairs; missing ['q_proj_lora_b']
    """

    arrays: Mapping[str, np.ndarray]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> LoraWeights:
        """The weights of ``arrays``, checked to be float ``_lora_a``/``_lora_b`` pairs of one number of blocks."""
        if not arrays:
            raise ValueError("LoRA weights need at least one pair of {target}_lora_a and {target}_lora_b arrays")
        arrays = {name: np.ascontiguousarray(arrays[name]) for name in sorted(arrays)}
        for name, array in arrays.items():
            if not name.endswith(("_lora_a", "_lora_b")) or array.ndim != 3:
                raise ValueError(f"LoRA array {name!r} {array.shape}: want {{target}}_lora_a/_lora_b, [blocks, ., .]")
        unpaired = sorted({name[:-1] + ("b" if name[-1] == "a" else "a") for name in arrays} - set(arrays))
        if unpaired:
            raise ValueError(f"LoRA arrays come in _lora_a/_lora_b pairs; missing {unpaired}")
        blocks = {array.shape[0] for array in arrays.values()}
        if len(blocks) != 1:
            raise ValueError(f"LoRA arrays cover different numbers of blocks: {sorted(blocks)}")
        return cls(arrays)

    @functools.cached_property
    def digests(self) -> tuple[str, ...]:
        """Each block's digest, by which servers keep its arrays."""
        return tuple(digest(self.block(i)) for i in range(next(iter(self.arrays.values())).shape[0]))

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    @property
    def rank(self) -> int:
        return max(a.shape[2] for name, a in self.arrays.items() if name.endswith("_lora_a"))

    def block(self, index: int) -> dict[str, np.ndarray]:
        """Block ``index``'s arrays, by name (views)."""
        return {name: array[index] for name, array in self.arrays.items()}

    def grad_shapes(self, start: int, end: int) -> list[tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtype of a backward's LoRA gradients over blocks ``start..end-1``, in the reply's order."""
        return [(array.shape[1:], np.dtype(np.float32)) for _ in range(start, end) for array in self.arrays.values()]

    def zero_grads(self) -> dict[str, np.ndarray]:
        """Gradients of all zeros, to add the spans' into."""
        return {name: np.zeros(array.shape, np.float32) for name, array in self.arrays.items()}
