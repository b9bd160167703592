"""`FusedExperts`: mlx-lm's ``SwitchGLU`` and ``SwitchMLP`` on the fused ops.

Every MoE model of mlx-lm sends its routed experts through one of those two
modules, called as ``experts(x, indices)`` and returning one row per slot,
``[..., k, D]``; the model's own code routes, weighs and sums. A
`FusedExperts` keeps that call contract, so every model's routing stays
exactly its own, and holds the experts in the packed layout (it *is* a
PackedExperts: its parameters are ``gate_up.*``/``up.*`` and ``down.*``).
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from fused_moe.ops.experts import Activation, down_slots, gate_up
from fused_moe.packed.experts import PackedExperts, QuantizedProjection, empty_projection, pack_experts
from fused_moe.packed import spec
from fused_moe.packed.spec import DOWN, ProjectionSpec
from fused_moe.supported import quantization_unsupported

# mlx-lm's activation modules by "module.QualName", each mapped to the fused
# kernels' activation: mlx-lm's model files are the spec (docs/kernel_contract.md).
# Keyed by name so that no model module is imported to look one up.
_GATED = {
    "mlx_lm.models.switch_layers.SwiGLU": lambda a: Activation("swiglu"),
    "mlx_lm.models.muse_spark.PreciseSwiGLU": lambda a: Activation("swiglu"),
    "mlx_lm.models.activations.SwigluOAI": lambda a: Activation("swiglu_oai", limit=a._limit, alpha=a._alpha),
    "mlx_lm.models.gemma4_text.GeGLU": lambda a: Activation("geglu"),
    "mlx_lm.models.kimi_k3.SiTU": lambda a: Activation("situ", beta=a.beta, linear_beta=a.linear_beta),
    "mlx_lm.models.step3p5.ClampedSwiGLU": lambda a: Activation("clamped_swiglu", limit=a.limit),
    "mlx_lm.models.deepseek_v41.DeepseekV41SwiGLU": lambda a: Activation("deepseek_v41_swiglu", limit=a.limit),
}
_NOT_GATED = {
    "mlx.nn.layers.activations.ReLU2": lambda a: Activation("relu2"),
    # mlx's "precise" GELU is its tanh approximation, SwitchMLP's default.
    "mlx.nn.layers.activations.GELU": lambda a: Activation("gelu_approx") if a._approx in ("precise", "tanh") else None,
}


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def activation_of(module: nn.Module) -> Union[Activation, str]:
    """The fused activation of an mlx-lm SwitchGLU/SwitchMLP, or why there is none."""
    gated = "gate_proj" in module
    table = _GATED if gated else _NOT_GATED
    act = getattr(module, "activation", None)
    convert = table.get(_qualname(act))
    activation = convert(act) if convert else None
    if activation is None:
        detail = f" (approx={act._approx!r})" if hasattr(act, "_approx") else ""
        return (f"activation {_qualname(act)}{detail} has no fused kernel; supported: "
                f"{sorted(table)}")
    return activation


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a SwitchGLU/SwitchMLP cannot run on the fused ops, or None."""
    act = activation_of(module)
    if isinstance(act, str):
        return act
    names = ("gate_proj", "up_proj", "down_proj") if "gate_proj" in module else ("fc1", "fc2")
    for name in names:
        if reason := quantization_unsupported(module[name], experts=True):
            return f"{name}: {reason}"
    if "gate_proj" in module:
        gate, up = module["gate_proj"], module["up_proj"]
        if (getattr(gate, "mode", "affine"), gate.bits, gate.group_size) != (
                getattr(up, "mode", "affine"), up.bits, up.group_size):
            return "gate_proj and up_proj are quantized differently; the packed rows share one setting"
    return None


def _extra_children(module: nn.Module) -> dict:
    """The child modules of a SwitchGLU/SwitchMLP besides its projections and
    activation."""
    own = {*spec.STOCK_PROJECTIONS, *spec.STOCK_MLP_PROJECTIONS, "activation"}
    return {name: child for name, child in module.children().items() if name not in own}


class FusedExperts(PackedExperts):
    """mlx-lm's ``SwitchGLU`` (gated) or ``SwitchMLP`` on the fused ops:
    ``experts(x, indices)`` with ``x`` ``[..., D]`` (or ``[..., k, D]``, one
    row per slot) and ``indices`` ``[..., k]`` returns ``[..., k, D]``, as
    the stock module does, in the dtype it would give."""

    def __init__(self, first: QuantizedProjection, down: QuantizedProjection, activation: Activation, *,
                 gated: bool = True, extra: Optional[dict] = None):
        super().__init__(first, down, gated=gated)
        self.activation = activation
        # Other modules the stock one held, which the model's own code uses
        # (muse_spark keeps a norm there): kept under the same names.
        for name, child in (extra or {}).items():
            self[name] = child

    @classmethod
    def from_switch(cls, module: nn.Module) -> "FusedExperts":
        """Packs a quantized mlx-lm SwitchGLU/SwitchMLP (lazily: evaluate the
        result to materialise it). Raises ValueError naming what is not
        supported."""
        if reason := unsupported_reason(module):
            raise ValueError(f"fused_moe.FusedExperts: {reason}")
        packed = pack_experts(module)
        first, down = (packed.projection(n) for n in packed.projection_names)
        return cls(first, down, activation_of(module), gated=packed.gated, extra=_extra_children(module))

    @classmethod
    def placeholder(cls, module: nn.Module, specs: dict[str, ProjectionSpec], dtype: mx.Dtype) -> "FusedExperts":
        """An empty FusedExperts with the shapes a packed checkpoint must
        supply for the stock `module` (a SwitchGLU/SwitchMLP built by mlx-lm,
        float or quantized), stored as `specs` say; lazy zeros, replaced by
        loading before anything evaluates them."""
        act = activation_of(module)
        if isinstance(act, str):
            raise ValueError(f"fused_moe.FusedExperts: {act}")
        gated = "gate_proj" in module
        first_stock = module["gate_proj" if gated else "fc1"]
        E, H, D = first_stock.num_experts, first_stock.output_dims, first_stock.input_dims
        first_name, = (n for n in specs if n != DOWN)
        shapes = {first_name: (2 * H if gated else H, D), DOWN: (D, H)}
        projections = [empty_projection(E, *shapes[n], specs[n], dtype, n == spec.GATE_UP) for n in (first_name, DOWN)]
        return cls(*projections, act, gated=gated, extra=_extra_children(module))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # The kernels take activations in the dtype of the affine scales; the
        # result has the dtype stock gives (x promoted with the scales).
        dtype = self.dtype or x.dtype
        out_dtype = mx.result_type(x.dtype, dtype)
        h = gate_up(x.astype(dtype), self, indices, self.activation)
        return down_slots(h, self, indices).astype(out_dtype)

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, activation={self.activation.name}"
