"""Names and numbers of the packed expert format: the single source of truth.

docs/FORMAT.md describes the byte layout; the converter, the MoE layers,
loading and tensor parallelism take their tensor names and config keys from
here.
"""

from __future__ import annotations

from fused_moe.errors import CheckpointError

# Bump on any change to the layout, the tensor names or the config keys.
FORMAT_VERSION = 1

# Attribute under which a MoE block holds its PackedExperts, so checkpoint
# tensors are named "<block path>.fused_experts.<projection>.<array>".
MODULE_NAME = "fused_experts"

# The two packed projections and the arrays each one holds.
PROJECTIONS = ("gate_up", "down")
ARRAYS = ("weight", "scales", "biases")
# mlx-lm's stacked expert projections (SwitchGLU) that pack into them:
# gate_proj and up_proj into gate_up, down_proj into down.
STOCK_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

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


def tensor_names(block_path: str) -> list[str]:
    """Checkpoint names of every packed tensor of the MoE block at `block_path`."""
    return [
        f"{block_path}.{MODULE_NAME}.{proj}.{arr}"
        for proj in PROJECTIONS
        for arr in ARRAYS
    ]


def check_format_version(version, where: str) -> None:
    """Raises CheckpointError unless this package reads packed format `version`."""
    if type(version) is int and version == FORMAT_VERSION:
        return
    newer = type(version) is int and version > FORMAT_VERSION
    raise CheckpointError(
        f"{where}: packed format version {version!r}"
        + (" is newer than this fused_moe" if newer else " is not supported")
        + f" (it reads version {FORMAT_VERSION})"
        + ("; upgrade mlx-fused-moe" if newer else "")
    )


def packed_layers(config: dict, where: str) -> dict | None:
    """The per-layer settings of a packed checkpoint's config.json (the
    CONFIG_LAYERS entry), or None when the config is not a packed one. Refuses
    format versions this package cannot read."""
    section = config.get(CONFIG_KEY)
    if section is None:
        return None
    check_format_version(section.get(CONFIG_FORMAT_VERSION) if isinstance(section, dict) else None, where)
    return section.get(CONFIG_LAYERS)
