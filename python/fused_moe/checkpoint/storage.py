"""How a module is stored in a checkpoint, and the tensors that makes.

Everything here follows from shapes, dtypes and quantization settings alone,
so the tensors of a checkpoint are known before any data is read or written,
and bits per weight can be computed for a model that is not on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple, Optional

from fused_moe.checkpoint.modules import EXPERTS, Module
from fused_moe.checkpoint.safetensors import itemsize
from fused_moe.packed import spec


class Quant(NamedTuple):
    """MLX quantization: `bits` per code, one scale (and, in the affine mode,
    one bias) per group of `group_size`; `mode` as MLX names it."""

    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict:
        """The entry mlx-lm's config.json "quantization" holds for this module."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays MLX stores for a matrix quantized so."""
        return ("weight", "scales", "biases") if self.mode == "affine" else ("weight", "scales")

    @property
    def scales_dtype(self) -> Optional[str]:
        """The safetensors dtype of the scales, or None where it is the model's
        float dtype (affine)."""
        return None if self.mode == "affine" else "U8"


@dataclass(frozen=True)
class Stored:
    """A module as stored: quantized (weight, scales and, affine, biases) or one
    float tensor.

    `dtype` is the safetensors dtype of the float weight, or of an affine
    module's scales and biases (an fp mode's scales are uint8)."""

    module: Module
    quant: Optional[Quant]
    dtype: str
    # Stacked experts only: the dtype of an additive bias [E, out], if any,
    # and whether an nvfp4 tensor scale [E] (float32) is stored.
    bias: Optional[str] = None
    global_scale: bool = False


class OutTensor(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    params: int  # weights it stands for; 0 for scales and biases

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * prod(self.shape)


def unit_experts(stored: list[Stored]) -> dict[str, Stored]:
    """The stacked expert projections of a unit by name ("gate_proj", ...);
    empty for a unit without experts."""
    return {s.module.name: s for s in stored if s.module.role == EXPERTS}


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
    out = [OutTensor(f"{m.path}.weight", "U32", w, prod(m.shape))]
    out += [OutTensor(f"{m.path}.{name}", s.quant.scales_dtype or s.dtype, g, 0) for name in s.quant.arrays[1:]]
    if s.bias:
        out.append(OutTensor(f"{m.path}.bias", s.bias, m.shape[:-1], 0))
    if s.global_scale:
        out.append(OutTensor(f"{m.path}.global_scale", "F32", m.shape[:1], 0))
    return out


def packed_specs(first: Stored, down: Stored) -> dict[str, spec.ProjectionSpec]:
    """The packed projections of a stack of experts stored so: `first` is
    gate_proj (gated) or fc1."""
    name = spec.GATE_UP if first.module.name == "gate_proj" else spec.UP
    return {n: spec.ProjectionSpec(s.quant.mode, s.quant.bits, s.quant.group_size, s.bias is not None,
                                   s.global_scale)
            for n, s in ((name, first), (spec.DOWN, down))}


def packed_tensors(packed_path: str, first: Stored, down: Stored) -> list[OutTensor]:
    """The tensors of one PackedExperts (docs/FORMAT.md) at `packed_path`,
    packed from a stack of experts stored as `first` (gate_proj or fc1) and
    `down` are."""
    E, H, D = first.module.shape
    out = []
    for name, p in packed_specs(first, down).items():
        stored = down if name == spec.DOWN else first
        rows, cols = (D, H) if name == spec.DOWN else ((2 * H if name == spec.GATE_UP else H), D)
        groups = (E, rows, cols // p.group_size)
        shapes = {
            "weight": ((E, rows, cols * p.bits // 32), "U32", E * rows * cols),
            "scales": (groups, stored.quant.scales_dtype or stored.dtype, 0),
            "biases": (groups, stored.dtype, 0),
            "bias": ((E, rows), stored.bias, 0),
            "global_scale": ((E, 2) if name == spec.GATE_UP else (E,), "F32", 0),
        }
        for arr in p.arrays():
            shape, dtype, params = shapes[arr]
            out.append(OutTensor(f"{packed_path}.{name}.{arr}", dtype, shape, params))
    return out


def stack_of(experts: dict[str, Stored]) -> str:
    """The module path of a unit's stacked experts (mlx-lm's SwitchGLU/SwitchMLP)."""
    return next(iter(experts.values())).module.parent


def first_and_down(experts: dict[str, Stored]) -> tuple[Stored, Stored]:
    """(gate_proj or fc1, down_proj or fc2) of a unit's experts."""
    if "gate_proj" in experts:
        return experts["gate_proj"], experts["down_proj"]
    return experts["fc1"], experts["fc2"]


def unit_tensors(stored: list[Stored], to: str, packed_path) -> list[OutTensor]:
    """The tensors of one unit (the embedding, a layer, the head, or any
    checkpoint's other tensors) stored in mlx-lm's layout (`to` "stock") or
    with packed experts ("packed", at `packed_path(stack path)`)."""
    out: list[OutTensor] = []
    for s in stored:
        if s.module.role != EXPERTS or to == "stock":
            out += stored_tensors(s)
    experts = unit_experts(stored)
    if experts and to == "packed":
        out += packed_tensors(packed_path(stack_of(experts)), *first_and_down(experts))
    return out


def bits_per_weight(tensors) -> float:
    """Stored bits per weight, counting scales and biases, as mlx-lm reports it."""
    nbytes = sum(t.nbytes for t in tensors)
    params = sum(t.params for t in tensors)
    return 8 * nbytes / params
