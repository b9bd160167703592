"""How a module is stored in a checkpoint, and the tensors that makes.

Everything here follows from shapes, dtypes and quantization settings alone,
so the tensors of a checkpoint are known before any data is read or written,
and bits per weight can be computed for a model that is not on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple, Optional

from fused_moe.checkpoint.minimax import EXPERTS, Module, block_path
from fused_moe.checkpoint.safetensors import itemsize
from fused_moe.packed import spec


class Quant(NamedTuple):
    """MLX affine quantization: `bits` per code, one scale and bias per group."""

    bits: int
    group_size: int

    def as_config(self) -> dict:
        """The entry mlx-lm's config.json "quantization" holds for this module."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


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
    names = spec.tensor_names(block_path(layer))
    return [
        OutTensor(n, "U32" if params else gate.dtype, shape, params)
        for n, (shape, params) in zip(names, shapes)
    ]


def unit_tensors(stored: list[Stored], to: str) -> list[OutTensor]:
    """The tensors of one unit (the embedding, a layer, or the head) stored
    in mlx-lm's layout (`to` "stock") or with packed experts ("packed")."""
    out: list[OutTensor] = []
    for s in stored:
        if s.module.role != EXPERTS or to == "stock":
            out += stored_tensors(s)
    experts = unit_experts(stored)
    if experts and to == "packed":
        out += packed_tensors(stored[0].module.layer, experts["gate_proj"], experts["down_proj"])
    return out


def bits_per_weight(tensors) -> float:
    """Stored bits per weight, counting scales and biases, as mlx-lm reports it."""
    nbytes = sum(t.nbytes for t in tensors)
    params = sum(t.params for t in tensors)
    return 8 * nbytes / params
