"""Packing stock MLX quantized experts into the fused_moe layout, and back.

The layout (docs/FORMAT.md, version spec.FORMAT_VERSION):

* ``gate_up.weight`` ``[E, 2H, D*bits/32]`` uint32: gate row r at 2r, up row r
  at 2r+1, each row in MLX's own bit packing. ``gate_up.scales`` and
  ``gate_up.biases`` ``[E, 2H, D/group_size]`` follow the same row order.
* ``down.weight`` ``[E, D, H*bits/32]`` and its scales and biases are MLX's
  stock arrays, unchanged.

Packing only moves whole rows, so it is lossless, and a slice of rows
``[2a, 2b)`` of gate_up with columns ``[a*gsw, b*gsw)`` of down equals the
packing of the stock arrays sliced to ``H[a:b]``.
"""

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from fused_moe.packed.spec import FORMAT_VERSION, check_format_version
from fused_moe.supported import SUPPORTED_BITS, SUPPORTED_DTYPES, grid_unsupported, quantization_unsupported


class QuantizedProjection(NamedTuple):
    """One stacked projection in MLX's affine format: weight [E, out, in*bits/32]."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int


def _check_grid(what: str, bits: int, group_size: int) -> None:
    if reason := grid_unsupported(bits, group_size):
        raise ValueError(f"{what}: {reason}")


def _check_projection(what: str, p: QuantizedProjection) -> tuple[int, int, int]:
    """Checks one projection; returns (E, out, in)."""
    _check_grid(what, p.bits, p.group_size)
    if p.weight.dtype != mx.uint32 or p.weight.ndim != 3:
        raise ValueError(
            f"{what}.weight must be a uint32 array [E, out, in*bits/32], got "
            f"{p.weight.dtype} {tuple(p.weight.shape)}"
        )
    E, out, words = p.weight.shape
    if (words * 32) % p.bits:
        raise ValueError(
            f"{what}.weight has {words} words per row, which is not a whole "
            f"number of {p.bits}-bit codes"
        )
    cols = words * 32 // p.bits
    expected = (E, out, cols // p.group_size)
    for name, a in (("scales", p.scales), ("biases", p.biases)):
        if a is None:
            raise ValueError(f"{what}.{name} is missing: only affine quantization is supported")
        if tuple(a.shape) != expected:
            raise ValueError(
                f"{what}.{name} has shape {tuple(a.shape)}, expected {expected} "
                f"for weight {tuple(p.weight.shape)} at {p.bits} bits, "
                f"group_size={p.group_size}"
            )
        if a.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{what}.{name} has dtype {a.dtype}; supported: float16, bfloat16, float32"
            )
    if p.scales.dtype != p.biases.dtype:
        raise ValueError(
            f"{what}.scales is {p.scales.dtype} but {what}.biases is {p.biases.dtype}"
        )
    return E, out, cols


def _as_projection(what: str, obj) -> QuantizedProjection:
    if isinstance(obj, nn.Module):
        # QuantizedSwitchLinear from mlx_lm.models.switch_layers.
        if reason := quantization_unsupported(obj, SUPPORTED_BITS, additive_bias=False):
            hint = "; quantize the experts first (e.g. mlx_lm.convert -q)" if "not quantized" in reason else ""
            raise ValueError(f"{what} cannot be packed: {reason}{hint}")
        return QuantizedProjection(obj["weight"], obj["scales"], obj["biases"], obj.bits, obj.group_size)
    if isinstance(obj, tuple) and len(obj) == 5:
        return QuantizedProjection(*obj)
    raise TypeError(
        f"{what} must be a QuantizedSwitchLinear or a tuple (weight, scales, "
        f"biases, bits, group_size), got {type(obj).__name__}"
    )


class PackedExperts(nn.Module):
    """The expert weights of one MoE layer in the fused_moe layout.

    Parameters: ``gate_up.{weight,scales,biases}`` and
    ``down.{weight,scales,biases}`` (see docs/FORMAT.md). The integer
    metadata is kept as plain attributes.
    """

    def __init__(
        self,
        gate_up: QuantizedProjection,
        down: QuantizedProjection,
        *,
        format_version: int = FORMAT_VERSION,
    ):
        super().__init__()
        check_format_version(format_version, "PackedExperts")
        E, two_h, D = _check_projection("gate_up", gate_up)
        if two_h % 2:
            raise ValueError(
                f"gate_up.weight has {two_h} rows; interleaved gate/up rows must be even"
            )
        E_d, D_d, H = _check_projection("down", down)
        if (E_d, D_d, H) != (E, D, two_h // 2):
            raise ValueError(
                f"down.weight {tuple(down.weight.shape)} does not match gate_up "
                f"(E={E}, D={D}, H={two_h // 2})"
            )
        if gate_up.scales.dtype != down.scales.dtype:
            raise ValueError(
                f"gate_up scales are {gate_up.scales.dtype} but down scales are "
                f"{down.scales.dtype}"
            )
        self.gate_up = {"weight": gate_up.weight, "scales": gate_up.scales, "biases": gate_up.biases}
        self.down = {"weight": down.weight, "scales": down.scales, "biases": down.biases}
        self.gate_up_bits, self.gate_up_group_size = gate_up.bits, gate_up.group_size
        self.down_bits, self.down_group_size = down.bits, down.group_size
        self.format_version = format_version
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.down["weight"].shape[0]

    @property
    def hidden_dims(self) -> int:
        """D: the model width, input of gate/up and output of down."""
        return self.down["weight"].shape[1]

    @property
    def intermediate_dims(self) -> int:
        """H: the expert width."""
        return self.gate_up["weight"].shape[1] // 2

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype the kernels expect: that of the scales."""
        return self.gate_up["scales"].dtype

    def projection(self, name: str) -> QuantizedProjection:
        """The packed arrays of "gate_up" or "down" with their bits and group size."""
        arrays = self[name]
        bits = getattr(self, f"{name}_bits")
        group_size = getattr(self, f"{name}_group_size")
        return QuantizedProjection(arrays["weight"], arrays["scales"], arrays["biases"], bits, group_size)

    def _extra_repr(self) -> str:
        return (
            f"E={self.num_experts}, D={self.hidden_dims}, H={self.intermediate_dims}, "
            f"gate_up={self.gate_up_bits}bit/g{self.gate_up_group_size}, "
            f"down={self.down_bits}bit/g{self.down_group_size}, format_version={self.format_version}"
        )


def _interleave_rows(a: mx.array, b: mx.array) -> mx.array:
    """[E, H, c] and [E, H, c] -> [E, 2H, c] with a's row r at 2r, b's at 2r+1."""
    return mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], a.shape[2])


def pack_experts(gate, up=None, down=None) -> PackedExperts:
    """Packs quantized expert projections into a :class:`PackedExperts`.

    Accepts either one mlx-lm ``SwitchGLU`` with quantized projections, or
    ``gate``, ``up`` and ``down`` each as a ``QuantizedSwitchLinear`` or a
    tuple ``(weight, scales, biases, bits, group_size)``. Lossless:
    :func:`unpack_experts` gives back bit-identical arrays.
    """
    if up is None and down is None and isinstance(gate, nn.Module) and "gate_proj" in gate:
        gate, up, down = gate["gate_proj"], gate["up_proj"], gate["down_proj"]
    if up is None or down is None:
        raise TypeError("pack_experts takes a SwitchGLU, or gate, up and down")
    g, u, d = (_as_projection(n, p) for n, p in (("gate", gate), ("up", up), ("down", down)))
    shape_g = _check_projection("gate", g)
    shape_u = _check_projection("up", u)
    if (g.bits, g.group_size) != (u.bits, u.group_size):
        raise ValueError(
            f"gate ({g.bits}-bit, group_size={g.group_size}) and up ({u.bits}-bit, "
            f"group_size={u.group_size}) must share bits and group size"
        )
    if shape_g != shape_u or g.scales.dtype != u.scales.dtype:
        raise ValueError(
            f"gate {tuple(g.weight.shape)} {g.scales.dtype} and up "
            f"{tuple(u.weight.shape)} {u.scales.dtype} must match"
        )
    gate_up = QuantizedProjection(
        _interleave_rows(g.weight, u.weight),
        _interleave_rows(g.scales, u.scales),
        _interleave_rows(g.biases, u.biases),
        g.bits,
        g.group_size,
    )
    return PackedExperts(gate_up, d)


def unpack_experts(packed: PackedExperts):
    """Returns ``(gate, up, down)`` as :class:`QuantizedProjection` tuples,
    bit-identical to what was packed."""
    gu = packed.projection("gate_up")

    def rows(a: mx.array, parity: int) -> mx.array:
        E, two_h, c = a.shape
        return a.reshape(E, two_h // 2, 2, c)[:, :, parity, :]

    gate = QuantizedProjection(*(rows(a, 0) for a in gu[:3]), gu.bits, gu.group_size)
    up = QuantizedProjection(*(rows(a, 1) for a in gu[:3]), gu.bits, gu.group_size)
    return gate, up, packed.projection("down")
