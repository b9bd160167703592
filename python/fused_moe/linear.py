"""Dense affine-quantized layers on fused_moe's own CPU kernels.

:func:`quantized_matmul` and :func:`quantized_embedding` are MLX primitives
from the native extension (lazy, usable under ``mx.compile``, ``stream=``
like MLX ops). :class:`QuantizedLinear` and :class:`QuantizedEmbedding` are
mlx's own layers of the same names with their call routed through them, so
they keep every parameter name and load the same checkpoints.

On a GPU stream both ops are MLX's own (``mx.quantized_matmul``, and the
gather plus ``mx.dequantize`` that ``nn.QuantizedEmbedding`` does): the same
computation, already fast there.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from fused_moe import _ext
from fused_moe.ops import StreamLike
from fused_moe.packing import SUPPORTED_GROUP_SIZES

SUPPORTED_LINEAR_BITS = tuple(_ext.SUPPORTED_LINEAR_BITS)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group_size: int,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """``x · dequant(w)ᵀ`` for MLX's affine format, what
    ``mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)`` computes.

    Args:
        x: ``[..., K]``, float16, bfloat16 or float32, in the dtype of ``scales``.
        w: ``[N, K*bits/32]`` uint32, as ``mx.quantize`` packs it.
        scales, biases: ``[N, K/group_size]``.
        bits: one of ``SUPPORTED_LINEAR_BITS`` (2, 3, 4, 5, 6, 8).
        group_size: 32, 64 or 128.

    Returns:
        ``[..., N]`` in the dtype of ``x``, accumulated in fp32.
    """
    return _ext.quantized_matmul(x, w, scales, biases, bits, group_size, stream=stream)


def quantized_embedding(
    ids: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group_size: int,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """Rows ``ids`` of an affine-quantized matrix, dequantized: ``[..., K]`` in
    the dtype of ``scales``. An id outside ``[0, N)`` raises from ``mx.eval``
    on the CPU, naming the entry."""
    return _ext.quantized_embedding(ids, w, scales, biases, bits, group_size, stream=stream)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why the fused ops cannot take this quantized layer, or None if they can."""
    mode = getattr(layer, "mode", "affine")
    if mode != "affine":
        return f"quantization mode {mode!r}; only 'affine' is supported"
    if layer.get("biases") is None:
        return "no biases (affine quantization has them)"
    if layer.bits not in SUPPORTED_LINEAR_BITS or layer.group_size not in SUPPORTED_GROUP_SIZES:
        return (
            f"{layer.bits}-bit with group size {layer.group_size}; supported: bits "
            f"{SUPPORTED_LINEAR_BITS}, group sizes {SUPPORTED_GROUP_SIZES}"
        )
    return None


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
    for path, new in swaps:
        *parents, leaf = path.split(".")
        parent = model
        for p in parents:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        if isinstance(parent, list):
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)
    return len(swaps)
