"""Dense affine-quantized ops on fused_moe's own CPU kernels.

:func:`quantized_matmul` and :func:`quantized_embedding` are MLX primitives
from the native extension (lazy, usable under ``mx.compile``, ``stream=``
like MLX ops). On a GPU stream both are MLX's own (``mx.quantized_matmul``,
and the gather plus ``mx.dequantize`` that ``nn.QuantizedEmbedding`` does):
the same computation, already fast there.
"""

from __future__ import annotations

import mlx.core as mx

from fused_moe import _ext
from fused_moe.ops.common import StreamLike


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
