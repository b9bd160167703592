"""Checkpoint conversion: MiniMax checkpoints to packed fused_moe checkpoints.

``fused_moe.convert(src, dst, ...)`` from Python, ``fused-moe convert SRC DST``
from the command line (this module provides the subcommand's
``add_arguments`` and ``run``). See the README, "Converting checkpoints".
"""

from fused_moe.convert.command import add_arguments, run
from fused_moe.convert.errors import ConversionError
from fused_moe.convert.pipeline import Summary, bits_per_weight_of, convert
from fused_moe.convert.recipes import RECIPES, Quant, Recipe

__all__ = [
    "RECIPES",
    "ConversionError",
    "Quant",
    "Recipe",
    "Summary",
    "add_arguments",
    "bits_per_weight_of",
    "convert",
    "run",
]
