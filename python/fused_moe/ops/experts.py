"""The fused MoE ops on a :class:`PackedExperts`.

Both are MLX primitives from the native extension: they are lazy, work under
``mx.compile`` and take ``stream=`` like MLX ops. Argument checking happens
here and in the extension at call time (``ValueError`` naming the argument).
Expert ids outside ``[0, E)`` never cause an out-of-bounds access; the CPU
raises from ``mx.eval``, Metal returns NaN rows (docs/reliability.md, "Bad expert ids").
"""

import mlx.core as mx

from fused_moe import _ext
from fused_moe.ops.common import StreamLike
from fused_moe.packed.experts import PackedExperts


def _check_packed(packed) -> None:
    if not isinstance(packed, PackedExperts):
        raise TypeError(
            f"packed must be a fused_moe.PackedExperts (see pack_experts), got "
            f"{type(packed).__name__}"
        )


def gate_up_swiglu(x: mx.array, packed: PackedExperts, indices: mx.array, *, stream: StreamLike = None) -> mx.array:
    """``h = silu(x·Gᵀ) ⊙ (x·Uᵀ)`` for each selected expert.

    Args:
        x: ``[..., D]`` activations, in the dtype of ``packed``'s scales.
        packed: the layer's :class:`PackedExperts`.
        indices: ``[..., k]`` expert ids, uint32 or int32.

    Returns:
        ``h`` of shape ``[..., k, H]`` in the dtype of ``x``.
    """
    _check_packed(packed)
    w, s, b, bits, group_size = packed.projection("gate_up")
    return _ext.gate_up_swiglu(x, w, s, b, indices, bits, group_size, stream=stream)


def down_combine(
    h: mx.array,
    packed: PackedExperts,
    indices: mx.array,
    weights: mx.array,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """``y = Σ_j weights[..., j] · (h[..., j, :]·Dᵀ)``, accumulated in fp32.

    Args:
        h: ``[..., k, H]``, e.g. the output of :func:`gate_up_swiglu`.
        packed: the layer's :class:`PackedExperts`.
        indices: ``[..., k]`` expert ids, uint32 or int32.
        weights: ``[..., k]`` router weights, float32 or the dtype of ``h``.

    Returns:
        ``y`` of shape ``[..., D]`` in the dtype of ``h``.
    """
    _check_packed(packed)
    w, s, b, bits, group_size = packed.projection("down")
    return _ext.down_combine(h, w, s, b, indices, weights, bits, group_size, stream=stream)
