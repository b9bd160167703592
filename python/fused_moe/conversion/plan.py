"""The output plan of a conversion: how each module is stored under a
recipe, and the config.json entries that describe it. Everything here follows
from shapes and settings alone (see fused_moe.checkpoint.storage)."""

from __future__ import annotations

from typing import Optional

from fused_moe.checkpoint.minimax import ATTENTION, EMBED, EXPERTS, LM_HEAD, ROUTER, ROUTING_BIAS, MiniMaxShapes, block_path
from fused_moe.checkpoint.safetensors import dtype_name
from fused_moe.checkpoint.storage import Quant, Stored, unit_experts
from fused_moe.conversion.recipes import Recipe
from fused_moe.packed import spec


def from_recipe(model: MiniMaxShapes, recipe: Recipe) -> list[list[Stored]]:
    """Per unit, how `recipe` stores each module."""
    float_dtype = dtype_name(recipe.dtype)
    return [
        [
            Stored(m, recipe.quant(m.role, m.layer, model.layers), "F32" if m.role == ROUTING_BIAS else float_dtype)
            for m in modules
        ]
        for _, modules in model.units()
    ]


def quantization_config(units: list[list[Stored]], recipe_default: Optional[Quant], to: str,
                        base: Optional[dict] = None) -> dict:
    """mlx-lm's "quantization" entry: the default plus one entry per
    quantizable module (False where it stays in floating point). Entries in
    `base` are kept; packed expert modules get none (they are described under
    spec.CONFIG_KEY instead)."""
    q = dict(base) if base else recipe_default.as_config()
    for stored in units:
        for s in stored:
            path = s.module.path
            if s.module.role == EXPERTS:
                if to == "packed":
                    q.pop(path, None)
                else:
                    q.setdefault(path, s.quant.as_config())
            elif s.module.role in (EMBED, LM_HEAD, ATTENTION, ROUTER):
                q.setdefault(path, s.quant.as_config() if s.quant else False)
    return q


def fused_config(units: list[list[Stored]], recipe_name: Optional[str]) -> dict:
    """The spec.CONFIG_KEY entry of a packed checkpoint."""
    layers = {}
    for stored in units:
        experts = unit_experts(stored)
        if not experts:
            continue
        gate, down = experts["gate_proj"].quant, experts["down_proj"].quant
        layers[block_path(stored[0].module.layer)] = {
            "gate_up": {"bits": gate.bits, "group_size": gate.group_size},
            "down": {"bits": down.bits, "group_size": down.group_size},
        }
    return {
        spec.CONFIG_FORMAT_VERSION: spec.FORMAT_VERSION,
        spec.CONFIG_LAYERS: layers,
        spec.CONFIG_RECIPE: recipe_name,
    }
