"""The expert ops on a :class:`PackedExperts`.

All are MLX primitives from the native extension: lazy, usable under
``mx.compile``, with ``stream=`` like MLX ops. Argument checking happens here
and in the extension at call time (``ValueError`` naming the argument).
Expert ids outside ``[0, E)`` never cause an out-of-bounds access; the CPU
raises from ``mx.eval``, Metal returns NaN rows (docs/reliability.md, "Bad
expert ids"). docs/kernel_contract.md gives the math of every setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from fused_moe import _ext
from fused_moe.ops.common import StreamLike
from fused_moe.packed.experts import PackedExperts, QuantizedProjection
from fused_moe.packed.spec import DOWN


@dataclass(frozen=True)
class Activation:
    """The gate/up op's activation: a name of ``fused_moe.supported.
    SUPPORTED_ACTIVATIONS`` and the float parameters it takes (None where it
    takes none)."""

    name: str = "swiglu"
    limit: Optional[float] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    linear_beta: Optional[float] = None

    def kwargs(self) -> dict:
        return {"activation": self.name, "limit": self.limit, "alpha": self.alpha, "beta": self.beta,
                "linear_beta": self.linear_beta}


SWIGLU = Activation()


def _check_packed(packed) -> None:
    if not isinstance(packed, PackedExperts):
        raise TypeError(
            f"packed must be a fused_moe.PackedExperts (see pack_experts), got "
            f"{type(packed).__name__}"
        )


def _quantization(p: QuantizedProjection) -> dict:
    return {"mode": p.mode, "bias": p.bias, "global_scale": p.global_scale}


def gate_up(
    x: mx.array,
    packed: PackedExperts,
    indices: mx.array,
    activation: Activation = SWIGLU,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """``h = act(x·Gᵀ + b_g, x·Uᵀ + b_u)`` for each selected expert (a
    non-gated PackedExperts: ``act(x·Wᵀ + b)``).

    Args:
        x: ``[..., D]`` activations shared by the k slots, or ``[..., k, D]``
            one row per slot; in the dtype of ``packed``'s affine scales.
        packed: the layer's :class:`PackedExperts`.
        indices: ``[..., k]`` expert ids, uint32 or int32.
        activation: an :class:`Activation`; gated ones need a gated
            PackedExperts.

    Returns:
        ``h`` of shape ``[..., k, H]`` in the dtype of ``x``.
    """
    _check_packed(packed)
    p = packed.projection(packed.projection_names[0])
    return _ext.gate_up(x, p.weight, p.scales, p.biases, indices, p.bits, p.group_size,
                        **_quantization(p), **activation.kwargs(), stream=stream)


def gate_up_swiglu(x: mx.array, packed: PackedExperts, indices: mx.array, *, stream: StreamLike = None) -> mx.array:
    """``h = silu(x·Gᵀ) ⊙ (x·Uᵀ)`` for each selected expert: :func:`gate_up`
    with SwiGLU."""
    return gate_up(x, packed, indices, SWIGLU, stream=stream)


def down_combine(
    h: mx.array,
    packed: PackedExperts,
    indices: mx.array,
    weights: mx.array,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """``y = Σ_j weights[..., j] · (h[..., j, :]·Dᵀ + b)``, accumulated in fp32.

    Args:
        h: ``[..., k, H]``, e.g. the output of :func:`gate_up`.
        packed: the layer's :class:`PackedExperts`.
        indices: ``[..., k]`` expert ids, uint32 or int32.
        weights: ``[..., k]`` router weights, float32 or the dtype of ``h``.

    Returns:
        ``y`` of shape ``[..., D]`` in the dtype of ``h``.
    """
    _check_packed(packed)
    p = packed.projection(DOWN)
    return _ext.down_combine(h, p.weight, p.scales, p.biases, indices, weights, p.bits, p.group_size,
                             **_quantization(p), stream=stream)


def down_slots(h: mx.array, packed: PackedExperts, indices: mx.array, *, stream: StreamLike = None) -> mx.array:
    """``y[..., j, :] = h[..., j, :]·Dᵀ + b`` for each slot, no combine: what
    mlx-lm's ``SwitchGLU`` returns, for models that weigh and sum the slots
    themselves. Returns ``[..., k, D]`` in the dtype of ``h``."""
    _check_packed(packed)
    p = packed.projection(DOWN)
    return _ext.down_slots(h, p.weight, p.scales, p.biases, indices, p.bits, p.group_size,
                           **_quantization(p), stream=stream)
