"""Calibrated quantization: one matrix to MLX's affine format, the input
statistics that guide it, and the layer-by-layer calibration driver. Knows
nothing of checkpoint files; the converter calls it (docs/calibration.md)."""

from fused_moe.quant.quantizer import METHODS, pack_codes, quantize_weight, unpack_codes, weighted_error
from fused_moe.quant.stats import InputStats, shrink

__all__ = ["METHODS", "InputStats", "pack_codes", "quantize_weight", "shrink", "unpack_codes", "weighted_error"]
