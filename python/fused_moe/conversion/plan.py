"""The output plan of a conversion: how each module is stored under a
recipe, and the config.json entries that describe it. Everything here follows
from shapes and settings alone (see fused_moe.checkpoint.storage)."""

from __future__ import annotations

from typing import Optional

from fused_moe.checkpoint.minimax import MiniMaxShapes
from fused_moe.checkpoint.modules import ATTENTION, EMBED, EXPERTS, LM_HEAD, ROUTER, ROUTING_BIAS
from fused_moe.checkpoint.safetensors import dtype_name
from fused_moe.checkpoint.storage import Quant, Stored, first_and_down, packed_specs, stack_of, unit_experts
from fused_moe.conversion.recipes import Recipe
from fused_moe.packed import spec


def from_recipe(model: MiniMaxShapes, recipe: Recipe) -> list[list[Stored]]:
    """Per unit, how `recipe` stores each module."""
    float_dtype = dtype_name(recipe.dtype)
    return [
        [
            Stored(m, recipe.quant(m.role, m.layer, model.layers, m.name),
                   "F32" if m.role == ROUTING_BIAS else float_dtype)
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


def fused_config(units: list[list[Stored]], recipe_name: Optional[str], packed_path) -> dict:
    """The spec.CONFIG_KEY entry of a packed checkpoint: each stack of
    experts' packed projections, at `packed_path(stack path)`."""
    experts = {}
    for stored in units:
        if stack := unit_experts(stored):
            specs = packed_specs(*first_and_down(stack))
            experts[packed_path(stack_of(stack))] = {n: p.as_config() for n, p in specs.items()}
    return {
        spec.CONFIG_FORMAT_VERSION: spec.FORMAT_VERSION,
        spec.CONFIG_EXPERTS: experts,
        spec.CONFIG_RECIPE: recipe_name,
    }
