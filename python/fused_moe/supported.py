"""What the fused ops accept: the grid written once in C++ (csrc/supported.h),
read here through the extension, and the one check of whether a quantized
module fits it."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from fused_moe import _ext

# The routed experts (gate_up_swiglu, down_combine).
SUPPORTED_BITS = tuple(_ext.SUPPORTED_BITS)
SUPPORTED_GROUP_SIZES = tuple(_ext.SUPPORTED_GROUP_SIZES)
SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MIN_TOP_K = _ext.MIN_TOP_K
MAX_TOP_K = _ext.MAX_TOP_K
# A quantized router gate.
SUPPORTED_ROUTER_BITS = tuple(_ext.SUPPORTED_ROUTER_BITS)
# One dense matrix (quantized_matmul, quantized_embedding): every width
# mx.quantize's affine mode offers, so also the widths a checkpoint may hold.
SUPPORTED_LINEAR_BITS = tuple(_ext.SUPPORTED_LINEAR_BITS)
AFFINE_BITS = SUPPORTED_LINEAR_BITS
AFFINE_GROUP_SIZES = SUPPORTED_GROUP_SIZES
# Attention head sizes: multiples of ATTENTION_HEAD_DIM_MULTIPLE up to
# MAX_ATTENTION_HEAD_DIM.
ATTENTION_HEAD_DIM_MULTIPLE = _ext.ATTENTION_HEAD_DIM_MULTIPLE
MAX_ATTENTION_HEAD_DIM = _ext.MAX_ATTENTION_HEAD_DIM


def grid_unsupported(bits: int, group_size: int, allowed_bits: tuple[int, ...] = SUPPORTED_BITS) -> Optional[str]:
    """Why `bits`/`group_size` are outside the grid, or None."""
    if bits not in allowed_bits:
        return f"bits={bits} is not supported; supported bits: {allowed_bits}"
    if group_size not in SUPPORTED_GROUP_SIZES:
        return f"group_size={group_size} is not supported; supported group sizes: {SUPPORTED_GROUP_SIZES}"
    return None


def width_unsupported(inputs: int, bits: int, group_size: int) -> Optional[str]:
    """Why rows of `inputs` values cannot be quantized at `bits` in groups of
    `group_size` (MLX packs whole groups into whole 32-bit words), or None."""
    if inputs <= 0 or inputs % group_size or (inputs * bits) % 32:
        return f"{inputs} inputs are not a whole number of groups of {group_size} at {bits} bits"
    return None


def quantization_unsupported(module: nn.Module, bits: tuple[int, ...], *, additive_bias: bool = True) -> Optional[str]:
    """Why the fused ops cannot take this quantized module (an
    ``nn.QuantizedLinear``, ``nn.QuantizedEmbedding`` or mlx-lm
    ``QuantizedSwitchLinear``) at these ``bits``, or None if they can: the
    affine mode with its biases, no global scale, bits and group size in the
    grid, and an additive ``bias`` only where ``additive_bias``."""
    if not hasattr(module, "bits") or "scales" not in module:
        return f"not quantized ({type(module).__name__})"
    mode = getattr(module, "mode", "affine")
    if mode != "affine":
        return f"quantization mode {mode!r}; only 'affine' is supported"
    if module.get("biases") is None:
        return "no biases (affine quantization has them)"
    if getattr(module, "global_scale", None) is not None:
        return "a global scale, which is not supported"
    if not additive_bias and "bias" in module:
        return "an additive bias, which is not supported"
    if grid_unsupported(module.bits, module.group_size, bits):
        return (
            f"{module.bits}-bit with group size {module.group_size}; supported: bits "
            f"{bits}, group sizes {SUPPORTED_GROUP_SIZES}"
        )
    return None
