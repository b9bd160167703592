"""Names and numbers of the packed expert format: the single source of truth.

docs/FORMAT.md describes the byte layout; the converter, the MoE layer and
sharding all take their tensor names and config keys from here.
"""

# Bump on any change to the layout, the tensor names or the config keys.
FORMAT_VERSION = 1

# Attribute under which a MoE block holds its PackedExperts, so checkpoint
# tensors are named "<block path>.fused_experts.<projection>.<array>".
MODULE_NAME = "fused_experts"

# The two packed projections and the arrays each one holds.
PROJECTIONS = ("gate_up", "down")
ARRAYS = ("weight", "scales", "biases")

# Top-level config.json key of a packed checkpoint, e.g.
#   "fused_moe": {"format_version": 1,
#                 "layers": {"model.layers.0.block_sparse_moe":
#                            {"gate_up": {"bits": 4, "group_size": 64},
#                             "down": {"bits": 4, "group_size": 64}}},
#                 "recipe": "seed-3.7bit"}
CONFIG_KEY = "fused_moe"
CONFIG_FORMAT_VERSION = "format_version"
CONFIG_LAYERS = "layers"
# The converter's recipe that quantized the checkpoint, or null when it was
# repacked from an mlx-lm checkpoint or quantized with --bits.
CONFIG_RECIPE = "recipe"


def block_path(layer: int) -> str:
    """Module path of layer `layer`'s MoE block in an mlx-lm MiniMax model:
    the prefix of its tensor names and its key under CONFIG_LAYERS."""
    return f"model.layers.{layer}.block_sparse_moe"


def tensor_names(block_path: str) -> list[str]:
    """Checkpoint names of every packed tensor of the MoE block at `block_path`."""
    return [
        f"{block_path}.{MODULE_NAME}.{proj}.{arr}"
        for proj in PROJECTIONS
        for arr in ARRAYS
    ]
