"""What the fused ops accept: the grid written once in C++ (csrc/supported.h),
read here through the extension, and the one check of whether a quantized
module fits it."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from fused_moe import _ext

# The routed experts (gate_up, down_combine, down_slots): affine
# SUPPORTED_BITS at SUPPORTED_GROUP_SIZES, and MLX's fp modes (FP_MODES:
# name -> {"bits", "group_size", ...}) at exactly MLX's settings.
SUPPORTED_BITS = tuple(_ext.SUPPORTED_BITS)
SUPPORTED_GROUP_SIZES = tuple(_ext.SUPPORTED_GROUP_SIZES)
SUPPORTED_MODES = tuple(_ext.SUPPORTED_MODES)
FP_MODES = {name: dict(layout) for name, layout in _ext.FP_MODES.items()}
# The gate/up activations (GATED_ACTIVATIONS need gate and up rows; the
# others are a non-gated SwitchMLP's) and the float parameters each takes,
# name -> (required, optional).
SUPPORTED_ACTIVATIONS = tuple(_ext.SUPPORTED_ACTIVATIONS)
GATED_ACTIVATIONS = tuple(_ext.GATED_ACTIVATIONS)
ACTIVATION_PARAMETERS = {name: tuple(map(tuple, p)) for name, p in _ext.ACTIVATION_PARAMETERS.items()}
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
# A quantized KV cache the attention kernel reads: these bits (mlx-lm's
# kv_bits), at any of SUPPORTED_GROUP_SIZES dividing the head size.
SUPPORTED_KV_CACHE_BITS = tuple(_ext.SUPPORTED_KV_CACHE_BITS)


def expert_quantization_unsupported(mode: str, bits: int, group_size: int) -> Optional[str]:
    """Why the expert ops cannot take a projection quantized so, or None."""
    if mode == "affine":
        return grid_unsupported(bits, group_size)
    if mode not in FP_MODES:
        return f"mode {mode!r} is not supported; supported modes: {SUPPORTED_MODES}"
    want = FP_MODES[mode]
    if (bits, group_size) != (want["bits"], want["group_size"]):
        return (f"mode {mode} with bits={bits}, group_size={group_size} is not supported; {mode} is "
                f"{want['bits']}-bit with group size {want['group_size']}")
    return None


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


def quantization_unsupported(module: nn.Module, *, experts: bool) -> Optional[str]:
    """Why the fused ops cannot take this quantized module, or None if they
    can. ``experts``: an mlx-lm ``QuantizedSwitchLinear`` for the expert ops
    (every mode of the grid, an additive bias, nvfp4's tensor scale);
    otherwise an ``nn.QuantizedLinear`` or ``nn.QuantizedEmbedding`` for the
    dense ops (affine, SUPPORTED_LINEAR_BITS, an additive bias)."""
    if not hasattr(module, "bits") or "scales" not in module:
        return f"not quantized ({type(module).__name__})"
    mode = getattr(module, "mode", "affine")
    if experts:
        if reason := expert_quantization_unsupported(mode, module.bits, module.group_size):
            return reason
        if mode == "affine" and module.get("biases") is None:
            return "no biases (affine quantization has them)"
        return None
    if mode != "affine":
        return f"quantization mode {mode!r}; only 'affine' is supported"
    if module.get("biases") is None:
        return "no biases (affine quantization has them)"
    if getattr(module, "global_scale", None) is not None:
        return "a global scale, which is not supported"
    if grid_unsupported(module.bits, module.group_size, SUPPORTED_LINEAR_BITS):
        return (
            f"{module.bits}-bit with group size {module.group_size}; supported: bits "
            f"{SUPPORTED_LINEAR_BITS}, group sizes {SUPPORTED_GROUP_SIZES}"
        )
    return None
