"""mlx's ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding`` with their
calls routed through fused_moe's ops (:func:`fused_moe.quantized_matmul`,
:func:`fused_moe.quantized_embedding`): same parameter names, so they load the
same checkpoints.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from fused_moe.ops.linear import quantized_embedding, quantized_matmul
from fused_moe.supported import quantization_unsupported


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why the fused ops cannot take this quantized layer, or None if they can."""
    return quantization_unsupported(layer, experts=False)


def _adopt(cls, layer: nn.Module) -> nn.Module:
    # The same parameters (the very arrays) and settings, in the subclass.
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
    for name, value in layer.items():
        new[name] = value
    new.freeze()
    return new


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` computed by :func:`quantized_matmul`.

    Same parameters (``weight``, ``scales``, ``biases``, optional ``bias``),
    same result dtype: ``x`` is first cast to its promotion with the scales,
    as ``mx.quantized_matmul`` does."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "QuantizedLinear":
        if reason := unsupported_reason(layer):
            raise ValueError(f"fused_moe.QuantizedLinear: {reason}")
        return _adopt(cls, layer)

    def __call__(self, x: mx.array) -> mx.array:
        scales = self["scales"]
        x = x.astype(mx.result_type(x.dtype, scales.dtype))
        y = quantized_matmul(x, self["weight"], scales.astype(x.dtype), self["biases"].astype(x.dtype), self.bits, self.group_size)
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` with its lookup computed by
    :func:`quantized_embedding` and ``as_linear`` (tied output heads) by
    :func:`quantized_matmul`. Same parameters."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "QuantizedEmbedding":
        if reason := unsupported_reason(layer):
            raise ValueError(f"fused_moe.QuantizedEmbedding: {reason}")
        new = _adopt(cls, layer)
        new.num_embeddings, new.dims = layer.num_embeddings, layer.dims
        return new

    def __call__(self, x: mx.array) -> mx.array:
        return quantized_embedding(x, self["weight"], self["scales"], self["biases"], self.bits, self.group_size)

    def as_linear(self, x: mx.array) -> mx.array:
        scales = self["scales"]
        x = x.astype(mx.result_type(x.dtype, scales.dtype))
        return quantized_matmul(x, self["weight"], scales.astype(x.dtype), self["biases"].astype(x.dtype), self.bits, self.group_size)


def swap_quantized_layers(model: nn.Module) -> int:
    """Replaces, in place, every ``nn.QuantizedLinear`` and
    ``nn.QuantizedEmbedding`` of ``model`` (exactly those classes, not
    subclasses such as mlx's sharded layers) that the fused ops support with
    :class:`QuantizedLinear` / :class:`QuantizedEmbedding`; returns how many.
    Layers outside the supported grid stay as they are."""
    swaps = []
    for path, module in model.named_modules():
        kind = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}.get(type(module))
        if kind is not None and unsupported_reason(module) is None:
            swaps.append((path, kind.from_quantized(module)))
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)
