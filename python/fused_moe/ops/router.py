"""The MoE router as one MLX primitive: :func:`route`."""

from typing import Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from fused_moe import _ext
from fused_moe.ops.common import StreamLike
from fused_moe.supported import SUPPORTED_ROUTER_BITS

Gate = Union[mx.array, nn.Linear, nn.QuantizedLinear]


def gate_arrays(gate: Gate):
    """(weight, scales, biases, bits, group_size) for the extension; the last
    four are None for an unquantized gate."""
    if isinstance(gate, mx.array):
        return gate, None, None, None, None
    if isinstance(gate, (nn.Linear, nn.QuantizedLinear)) and "bias" in gate:
        raise ValueError(
            f"fused_moe.route: gate is a {type(gate).__name__} with a bias; the "
            f"router gate has none"
        )
    if isinstance(gate, nn.QuantizedLinear):
        if gate.mode != "affine":
            raise ValueError(
                f"fused_moe.route: gate is quantized in mode {gate.mode!r}; only "
                f"'affine' is supported"
            )
        if gate.bits not in SUPPORTED_ROUTER_BITS:
            raise ValueError(
                f"fused_moe.route: gate is a {gate.bits}-bit QuantizedLinear; "
                f"supported bits: {SUPPORTED_ROUTER_BITS}"
            )
        return gate.weight, gate.scales, gate.biases, gate.bits, gate.group_size
    if isinstance(gate, nn.Linear):
        return gate.weight, None, None, None, None
    raise TypeError(
        f"fused_moe.route: gate must be an mx.array [E, D], an nn.Linear or an "
        f"8-bit nn.QuantizedLinear, got {type(gate).__name__}"
    )


def route(
    x: mx.array, gate: Gate, bias: mx.array, k: int, *, stream: StreamLike = None
) -> Tuple[mx.array, mx.array]:
    """mlx-lm's MiniMax router in one primitive: sigmoid gate scores, top-k
    on the scores plus ``bias``, weights renormalised to sum to 1.

    ``logits = x · Wᵀ`` in fp32 (whatever the dtypes of ``x`` and ``W``),
    ``scores = sigmoid(logits)``; ``indices`` are the ``k`` experts of highest
    ``scores + bias``, and ``weights = scores[indices] / (Σ scores[indices] +
    1e-20)``.

    Ties: among equal biased scores the lower expert index is chosen; a NaN
    biased score ranks below every number (among NaNs, the lower index
    first). The k experts come best first, and each weight belongs to the
    index beside it.

    Args:
        x: ``[..., D]`` activations, float16, bfloat16 or float32.
        gate: the router weight ``[E, D]``: an ``mx.array`` or ``nn.Linear``
            (float16, bfloat16 or float32, no bias), or an ``nn.QuantizedLinear``
            (8-bit, affine mode, no bias, any supported group size).
        bias: ``[E]`` score correction bias (``e_score_correction_bias``),
            any float dtype; added in fp32.
        k: experts per token, ``1 <= k <= min(E, MAX_TOP_K)``.

    Returns:
        ``(indices, weights)``: ``[..., k]`` uint32 and ``[..., k]`` float32.
    """
    w, scales, biases, bits, group_size = gate_arrays(gate)
    indices, weights = _ext.route(
        x, w, scales, biases, bias, k, bits, group_size, stream=stream
    )
    return indices, weights
