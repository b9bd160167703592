"""How each module is stored, and the tensors that makes: the output plan.

Everything here follows from shapes, dtypes and quantization settings alone,
so the converter knows every output tensor before it reads any data, and
bits per weight can be computed for a model that is not on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple, Optional

from fused_moe import format as fmt
from fused_moe.convert.model import EXPERTS, ROUTING_BIAS, MiniMax, Module, block_path, expert_path
from fused_moe.convert.recipes import Quant, Recipe
from fused_moe.convert.safetensors_io import dtype_name, itemsize


@dataclass(frozen=True)
class Stored:
    """A module as stored: quantized (weight, scales, biases) or one float tensor.

    `dtype` is the safetensors dtype of the float weight, or of the scales and
    biases of a quantized one."""

    module: Module
    quant: Optional[Quant]
    dtype: str


class OutTensor(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    params: int  # weights it stands for; 0 for scales and biases

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * prod(self.shape)


def quantized_shapes(shape: tuple[int, ...], q: Quant) -> tuple[tuple, tuple]:
    """(weight shape, scales/biases shape) of a quantized `shape` matrix."""
    *lead, out, inputs = shape
    return (*lead, out, inputs * q.bits // 32), (*lead, out, inputs // q.group_size)


def stored_tensors(s: Stored) -> list[OutTensor]:
    """The tensors of one module in mlx-lm's stock layout."""
    m = s.module
    if s.quant is None:
        return [OutTensor(m.tensor, s.dtype, m.shape, prod(m.shape))]
    w, g = quantized_shapes(m.shape, s.quant)
    return [
        OutTensor(f"{m.path}.weight", "U32", w, prod(m.shape)),
        OutTensor(f"{m.path}.scales", s.dtype, g, 0),
        OutTensor(f"{m.path}.biases", s.dtype, g, 0),
    ]


def packed_tensors(layer: int, gate: Stored, down: Stored) -> list[OutTensor]:
    """The tensors of one MoE block's PackedExperts (docs/FORMAT.md)."""
    E, H, D = gate.module.shape
    gu_w, gu_g = quantized_shapes((E, 2 * H, D), gate.quant)
    d_w, d_g = quantized_shapes((E, D, H), down.quant)
    shapes = [(gu_w, 2 * E * H * D), (gu_g, 0), (gu_g, 0), (d_w, E * D * H), (d_g, 0), (d_g, 0)]
    names = fmt.tensor_names(block_path(layer))
    return [
        OutTensor(n, "U32" if params else gate.dtype, shape, params)
        for n, (shape, params) in zip(names, shapes)
    ]


def plan_unit(stored: list[Stored], to: str) -> list[OutTensor]:
    """The output tensors of one unit (the embedding, a layer, or the head)."""
    out: list[OutTensor] = []
    experts = {s.module.path.rsplit(".", 1)[1]: s for s in stored if s.module.role == EXPERTS}
    for s in stored:
        if s.module.role != EXPERTS or to == "stock":
            out += stored_tensors(s)
    if experts and to == "packed":
        out += packed_tensors(stored[0].module.layer, experts["gate_proj"], experts["down_proj"])
    return out


def from_recipe(model: MiniMax, recipe: Recipe) -> list[list[Stored]]:
    """Per unit, how `recipe` stores each module."""
    float_dtype = dtype_name(recipe.dtype)
    units = []
    for _, modules in model.units():
        units.append([
            Stored(
                m,
                recipe.quant(m.role, m.layer, model.layers),
                "F32" if m.role == ROUTING_BIAS else float_dtype,
            )
            for m in modules
        ])
    return units


def bits_per_weight(tensors) -> float:
    """Stored bits per weight, counting scales and biases, as mlx-lm reports it."""
    nbytes = sum(t.nbytes for t in tensors)
    params = sum(t.params for t in tensors)
    return 8 * nbytes / params


def quantization_config(units: list[list[Stored]], recipe_default: Quant, to: str, base: dict | None = None) -> dict:
    """mlx-lm's "quantization" entry: the default plus one entry per
    quantizable module (False where it stays in floating point). Entries in
    `base` are kept; packed expert modules get none (they are described under
    format.CONFIG_KEY instead)."""
    q = dict(base) if base else recipe_default.as_config()
    for stored in units:
        for s in stored:
            path = s.module.path
            if s.module.role == EXPERTS:
                if to == "packed":
                    q.pop(path, None)
                else:
                    q.setdefault(path, s.quant.as_config())
            elif s.module.role in ("embed", "lm_head", "attention", "router"):
                q.setdefault(path, s.quant.as_config() if s.quant else False)
    return q


def fused_config(units: list[list[Stored]], recipe_name: Optional[str]) -> dict:
    """The format.CONFIG_KEY entry of a packed checkpoint."""
    layers = {}
    for stored in units:
        experts = {s.module.path: s for s in stored if s.module.role == EXPERTS}
        if not experts:
            continue
        layer = stored[0].module.layer
        gate = experts[expert_path(layer, "gate_proj")].quant
        down = experts[expert_path(layer, "down_proj")].quant
        layers[block_path(layer)] = {
            "gate_up": {"bits": gate.bits, "group_size": gate.group_size},
            "down": {"bits": down.bits, "group_size": down.group_size},
        }
    return {
        fmt.CONFIG_FORMAT_VERSION: fmt.FORMAT_VERSION,
        fmt.CONFIG_LAYERS: layers,
        fmt.CONFIG_RECIPE: recipe_name,
    }
