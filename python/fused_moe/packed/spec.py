"""Names and numbers of the packed expert format: the single source of truth.

docs/FORMAT.md describes the byte layout; the converter, the modules,
loading and tensor parallelism take their tensor names and config keys from
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fused_moe.errors import CheckpointError

# Bump on any change to the layout, the tensor names or the config keys.
# Version 2 added the quantization mode, expert biases, nvfp4's tensor scales
# and non-gated experts, and keys the experts by their own module path.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Attribute under which MiniMax's fused block holds its PackedExperts.
MODULE_NAME = "fused_experts"

# The packed projections: gate and up rows interleaved ("gate_up"), or a
# non-gated expert's single input projection ("up", mlx-lm's fc1); then "down".
GATE_UP, UP, DOWN = "gate_up", "up", "down"
PROJECTIONS = (GATE_UP, DOWN)
# The arrays a projection may hold: weight and scales always; biases in the
# affine mode; bias when the experts add one after the matmul; global_scale
# for nvfp4 with a per-expert tensor scale.
ARRAYS = ("weight", "scales", "biases")
OPTIONAL_ARRAYS = ("bias", "global_scale")
# mlx-lm's stacked expert projections that pack into them: gate_proj and
# up_proj into gate_up, down_proj into down (SwitchGLU); fc1 into up, fc2
# into down (SwitchMLP).
STOCK_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
STOCK_MLP_PROJECTIONS = ("fc1", "fc2")

# Top-level config.json key of a packed checkpoint, e.g.
#   "fused_moe": {"format_version": 2,
#                 "experts": {"model.layers.0.block_sparse_moe.fused_experts":
#                             {"gate_up": {"mode": "affine", "bits": 4, "group_size": 64},
#                              "down": {"mode": "affine", "bits": 4, "group_size": 64}}},
#                 "recipe": "seed-3.7bit"}
CONFIG_KEY = "fused_moe"
CONFIG_FORMAT_VERSION = "format_version"
CONFIG_EXPERTS = "experts"
# Version 1's key: MiniMax blocks by block path, affine only.
CONFIG_LAYERS_V1 = "layers"
# The converter's recipe that quantized the checkpoint, or null when it was
# repacked from an mlx-lm checkpoint or quantized with --bits.
CONFIG_RECIPE = "recipe"


@dataclass(frozen=True)
class ProjectionSpec:
    """How one packed projection is stored: its quantization and which
    optional arrays it has."""

    mode: str
    bits: int
    group_size: int
    bias: bool = False
    global_scale: bool = False

    def arrays(self) -> tuple[str, ...]:
        """The names of its arrays, in file order."""
        names = ["weight", "scales"] + (["biases"] if self.mode == "affine" else [])
        return tuple(names + [n for n in OPTIONAL_ARRAYS if getattr(self, n)])

    def as_config(self) -> dict:
        out = {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}
        out.update({n: True for n in OPTIONAL_ARRAYS if getattr(self, n)})
        return out


def tensor_names(experts_path: str, projections: dict[str, ProjectionSpec]) -> list[str]:
    """Checkpoint names of every tensor of the PackedExperts at `experts_path`."""
    return [f"{experts_path}.{proj}.{arr}" for proj, p in projections.items() for arr in p.arrays()]


def check_format_version(version, where: str) -> None:
    """Raises CheckpointError unless this package reads packed format `version`."""
    if type(version) is int and version in READABLE_VERSIONS:
        return
    newer = type(version) is int and version > FORMAT_VERSION
    raise CheckpointError(
        f"{where}: packed format version {version!r}"
        + (" is newer than this fused_moe" if newer else " is not supported")
        + f" (it reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        + ("; upgrade mlx-fused-moe" if newer else "")
    )


def _projection(entry, where: str) -> ProjectionSpec:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} must be an object, got {entry!r}")
    unknown = set(entry) - {"mode", "bits", "group_size", *OPTIONAL_ARRAYS}
    if unknown:
        raise CheckpointError(f"{where} has unknown keys {sorted(unknown)}")
    mode = entry.get("mode", "affine")
    bits, group_size = entry.get("bits"), entry.get("group_size")
    if type(mode) is not str or type(bits) is not int or type(group_size) is not int:
        raise CheckpointError(f"{where} needs a mode (string), bits and group_size (integers), got {entry!r}")
    flags = {n: entry.get(n, False) for n in OPTIONAL_ARRAYS}
    if any(type(v) is not bool for v in flags.values()):
        raise CheckpointError(f"{where}: {', '.join(OPTIONAL_ARRAYS)} must be true or false, got {entry!r}")
    return ProjectionSpec(mode, bits, group_size, **flags)


def packed_experts(config: dict, where: str) -> Optional[dict[str, dict[str, ProjectionSpec]]]:
    """The packed experts a config.json describes, {experts path: {projection:
    ProjectionSpec}}, or None when it is not a packed checkpoint. Refuses
    format versions this package cannot read and malformed entries; the
    settings themselves are checked against the grid where they are used."""
    section = config.get(CONFIG_KEY)
    if section is None:
        return None
    version = section.get(CONFIG_FORMAT_VERSION) if isinstance(section, dict) else None
    check_format_version(version, where)
    key = CONFIG_LAYERS_V1 if version == 1 else CONFIG_EXPERTS
    entries = section.get(key)
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: {CONFIG_KEY}.{key} must be an object, got {entries!r}")
    out = {}
    for path, projections in entries.items():
        at = f"{where}: {CONFIG_KEY}.{key}[{path!r}]"
        if not isinstance(projections, dict):
            raise CheckpointError(f"{at} must be an object, got {projections!r}")
        if version == 1:
            path = f"{path}.{MODULE_NAME}"  # v1 keyed MiniMax's blocks
            if set(projections) != set(PROJECTIONS):
                raise CheckpointError(f"{at} must have exactly {list(PROJECTIONS)}")
            out[path] = {p: _projection(dict(projections[p], mode="affine"), f"{at}.{p}") for p in PROJECTIONS}
            continue
        first = GATE_UP if GATE_UP in projections else UP
        if set(projections) != {first, DOWN}:
            raise CheckpointError(f"{at} must have {GATE_UP!r} or {UP!r}, and {DOWN!r}; got {sorted(projections)}")
        out[path] = {p: _projection(projections[p], f"{at}.{p}") for p in (first, DOWN)}
    return out
