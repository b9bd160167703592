"""Checkpoint conversion: MiniMax checkpoints to packed fused_moe checkpoints.

``fused_moe.convert(src, dst, ...)`` from Python, ``fused-moe convert SRC DST``
from the command line (fused_moe.cli.convert). See docs/converting.md.
"""

from fused_moe.checkpoint.storage import Quant
from fused_moe.conversion.pipeline import Summary, bits_per_weight_of, convert
from fused_moe.conversion.recipes import RECIPES, Recipe
from fused_moe.errors import ConversionError

__all__ = [
    "RECIPES",
    "ConversionError",
    "Quant",
    "Recipe",
    "Summary",
    "bits_per_weight_of",
    "convert",
]
