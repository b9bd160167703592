"""Packing mlx-lm's quantized experts into the fused_moe layout, and back.

The layout (docs/FORMAT.md, version spec.FORMAT_VERSION):

* gated experts (mlx-lm's ``SwitchGLU``): ``gate_up.weight`` ``[E, 2H,
  D*bits/32]`` uint32, gate row r at 2r, up row r at 2r+1, each row in MLX's
  own packing; the scales (and the affine biases, the expert bias)
  follow the same row order;
* non-gated experts (``SwitchMLP``): ``up`` holds fc1's rows as they are;
* ``down`` holds the down projection (fc2) as MLX stores it, unchanged.

Packing only moves whole rows, so it is lossless, and a slice of rows
``[2a, 2b)`` of gate_up with columns ``[a*gsw, b*gsw)`` of down equals the
packing of the stock arrays sliced to ``H[a:b]``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from fused_moe.packed import spec
from fused_moe.packed.spec import DOWN, GATE_UP, UP, ProjectionSpec, check_format_version
from fused_moe.supported import SUPPORTED_DTYPES, expert_quantization_unsupported, quantization_unsupported


class QuantizedProjection(NamedTuple):
    """One stacked projection as MLX quantizes it: ``weight`` ``[E, out,
    in*bits/32]`` uint32, ``scales`` ``[E, out, in/group_size]`` (the
    activations' float dtype in the affine mode, uint8 in the fp modes),
    ``biases`` like the scales (affine only, else None), an optional additive
    ``bias`` ``[E, out]`` and, for nvfp4, an optional ``global_scale`` ``[E]``
    float32."""

    weight: mx.array
    scales: mx.array
    biases: Optional[mx.array]
    bits: int
    group_size: int
    mode: str = "affine"
    bias: Optional[mx.array] = None
    global_scale: Optional[mx.array] = None

    @property
    def spec(self) -> ProjectionSpec:
        return ProjectionSpec(self.mode, self.bits, self.group_size, self.bias is not None,
                              self.global_scale is not None)

    def describe(self) -> str:
        """e.g. "3-bit, group_size=64" or "mxfp4, group_size=32, with bias"."""
        q = f"{self.bits}-bit" if self.mode == "affine" else self.mode
        extra = (", with bias" if self.bias is not None else "") + (
            ", with global_scale" if self.global_scale is not None else "")
        return f"{q}, group_size={self.group_size}{extra}"

    def arrays(self) -> dict[str, mx.array]:
        """Its arrays by name, those it has only (spec.arrays() order)."""
        return {name: getattr(self, name) for name in self.spec.arrays()}

    def map_arrays(self, f) -> "QuantizedProjection":
        """The same projection with `f(name, array)` applied to each array."""
        return self._replace(**{name: f(name, a) for name, a in self.arrays().items()})


def _check_projection(what: str, p: QuantizedProjection) -> tuple[int, int, int]:
    """Checks one projection; returns (E, out, in)."""
    if reason := expert_quantization_unsupported(p.mode, p.bits, p.group_size):
        raise ValueError(f"{what}: {reason}")
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
    affine = p.mode == "affine"
    if affine != (p.biases is not None):
        raise ValueError(f"{what}.biases: the affine mode has them, {p.mode} has none; got "
                         f"{'none' if p.biases is None else 'biases'} for mode {p.mode}")
    for name, a in (("scales", p.scales), ("biases", p.biases)):
        if a is None:
            continue
        if tuple(a.shape) != expected:
            raise ValueError(
                f"{what}.{name} has shape {tuple(a.shape)}, expected {expected} "
                f"for weight {tuple(p.weight.shape)} at {p.bits} bits, "
                f"group_size={p.group_size}"
            )
        if affine and a.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{what}.{name} has dtype {a.dtype}; supported: float16, bfloat16, float32")
        if not affine and a.dtype != mx.uint8:
            raise ValueError(f"{what}.{name} has dtype {a.dtype}; mode {p.mode} stores uint8 scales")
    if affine and p.scales.dtype != p.biases.dtype:
        raise ValueError(f"{what}.scales is {p.scales.dtype} but {what}.biases is {p.biases.dtype}")
    if p.bias is not None and (tuple(p.bias.shape) != (E, out) or p.bias.dtype not in SUPPORTED_DTYPES):
        raise ValueError(f"{what}.bias must be a float array [E, out] = [{E}, {out}], got "
                         f"{p.bias.dtype} {tuple(p.bias.shape)}")
    if p.global_scale is not None:
        if p.mode != "nvfp4":
            raise ValueError(f"{what}.global_scale: only nvfp4 has a tensor scale, not {p.mode}")
        # gate_up keeps gate's and up's side by side: [E, 2].
        shape = (E, 2) if what == GATE_UP else (E,)
        if tuple(p.global_scale.shape) != shape or p.global_scale.dtype != mx.float32:
            raise ValueError(f"{what}.global_scale must be float32 {list(shape)}, got "
                             f"{p.global_scale.dtype} {tuple(p.global_scale.shape)}")
    return E, out, cols


def _as_projection(what: str, obj) -> QuantizedProjection:
    if isinstance(obj, nn.Module):
        # QuantizedSwitchLinear from mlx_lm.models.switch_layers.
        if reason := quantization_unsupported(obj, experts=True):
            hint = "; quantize the experts first (e.g. mlx_lm.convert -q)" if "not quantized" in reason else ""
            raise ValueError(f"{what} cannot be packed: {reason}{hint}")
        return QuantizedProjection(
            obj["weight"], obj["scales"], obj.get("biases"), obj.bits, obj.group_size,
            getattr(obj, "mode", "affine"), obj.get("bias"), getattr(obj, "global_scale", None))
    if isinstance(obj, QuantizedProjection):
        return obj
    if isinstance(obj, tuple) and len(obj) == 5:
        return QuantizedProjection(*obj)
    raise TypeError(
        f"{what} must be a QuantizedSwitchLinear, a QuantizedProjection or a tuple "
        f"(weight, scales, biases, bits, group_size), got {type(obj).__name__}"
    )


class PackedExperts(nn.Module):
    """The expert weights of one MoE layer in the fused_moe layout.

    Parameters: ``gate_up`` (gated experts) or ``up`` (non-gated), and
    ``down``, each a dict of its arrays (``weight``, ``scales``, and
    ``biases``, ``bias``, ``global_scale`` where it has them; see
    docs/FORMAT.md). The quantization settings are plain attributes.
    """

    def __init__(
        self,
        first: QuantizedProjection,
        down: QuantizedProjection,
        *,
        gated: bool = True,
        format_version: int = spec.FORMAT_VERSION,
    ):
        super().__init__()
        check_format_version(format_version, "PackedExperts")
        name = GATE_UP if gated else UP
        E, rows, D = _check_projection(name, first)
        if gated and rows % 2:
            raise ValueError(f"gate_up.weight has {rows} rows; interleaved gate/up rows must be even")
        H = rows // 2 if gated else rows
        E_d, D_d, H_d = _check_projection(DOWN, down)
        if (E_d, D_d, H_d) != (E, D, H):
            raise ValueError(
                f"down.weight {tuple(down.weight.shape)} does not match {name} (E={E}, D={D}, H={H})"
            )
        if first.mode == "affine" and down.mode == "affine" and first.scales.dtype != down.scales.dtype:
            raise ValueError(f"{name} scales are {first.scales.dtype} but down scales are {down.scales.dtype}")
        self.gated = gated
        # The settings without the arrays (a mapping nn.Module keeps as a
        # plain attribute, not as parameters).
        self._settings = MappingProxyType({name: first._replace(**dict.fromkeys(first.arrays())),
                                           DOWN: down._replace(**dict.fromkeys(down.arrays()))})
        self[name] = first.arrays()
        self[DOWN] = down.arrays()
        self.format_version = format_version
        self.freeze()

    @property
    def projection_names(self) -> tuple[str, str]:
        return (GATE_UP if self.gated else UP), DOWN

    @property
    def num_experts(self) -> int:
        return self[DOWN]["weight"].shape[0]

    @property
    def hidden_dims(self) -> int:
        """D: the model width, input of gate/up and output of down."""
        return self[DOWN]["weight"].shape[1]

    @property
    def intermediate_dims(self) -> int:
        """H: the expert width."""
        rows = self[self.projection_names[0]]["weight"].shape[1]
        return rows // 2 if self.gated else rows

    @property
    def dtype(self) -> Optional[mx.Dtype]:
        """The activation dtype the kernels expect: that of the affine scales
        (of gate/up, else of down), or None when both are fp modes (any float
        dtype then)."""
        for name in self.projection_names:
            if self._settings[name].mode == "affine":
                return self[name]["scales"].dtype
        return None

    # The settings by projection, as attributes (docs/FORMAT.md).
    @property
    def gate_up_bits(self) -> int:
        return self._settings[self.projection_names[0]].bits

    @property
    def gate_up_group_size(self) -> int:
        return self._settings[self.projection_names[0]].group_size

    @property
    def down_bits(self) -> int:
        return self._settings[DOWN].bits

    @property
    def down_group_size(self) -> int:
        return self._settings[DOWN].group_size

    def projection(self, name: str) -> QuantizedProjection:
        """A projection ("gate_up", "up" or "down") with its settings."""
        return self._settings[name]._replace(**self[name])

    def specs(self) -> dict[str, ProjectionSpec]:
        """Each projection's stored form, as a packed config records it."""
        return {name: self._settings[name].spec for name in self.projection_names}

    def _extra_repr(self) -> str:
        def describe(p: QuantizedProjection) -> str:
            q = f"{p.bits}bit" if p.mode == "affine" else p.mode
            return f"{q}/g{p.group_size}" + ("+bias" if p.bias is not None else "")

        first, down = (self._settings[n] for n in self.projection_names)
        return (
            f"E={self.num_experts}, D={self.hidden_dims}, H={self.intermediate_dims}, "
            f"{self.projection_names[0]}={describe(first)}, down={describe(down)}, "
            f"format_version={self.format_version}"
        )


def empty_projection(E: int, rows: int, cols: int, s: ProjectionSpec, dtype: mx.Dtype,
                     rows_are_pairs: bool = False) -> QuantizedProjection:
    """Lazy zeros of the shapes a projection of `rows` x `cols` stored as `s`
    has (`rows_are_pairs`: gate/up's interleaved rows), with the affine
    scales (and the bias) in `dtype`: a placeholder that
    loading a checkpoint replaces before anything evaluates it, so nothing is
    allocated."""
    scale_dtype = dtype if s.mode == "affine" else mx.uint8
    groups = (E, rows, cols // s.group_size)
    return QuantizedProjection(
        mx.zeros((E, rows, cols * s.bits // 32), dtype=mx.uint32),
        mx.zeros(groups, dtype=scale_dtype),
        mx.zeros(groups, dtype=scale_dtype) if s.mode == "affine" else None,
        s.bits, s.group_size, s.mode,
        mx.zeros((E, rows), dtype=dtype) if s.bias else None,
        mx.zeros((E, 2) if rows_are_pairs else (E,), dtype=mx.float32) if s.global_scale else None,
    )


def _interleave_rows(a: mx.array, b: mx.array) -> mx.array:
    """[E, H, ...] and [E, H, ...] -> [E, 2H, ...] with a's row r at 2r, b's at 2r+1."""
    return mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])


def _gate_up(g: QuantizedProjection, u: QuantizedProjection) -> QuantizedProjection:
    # Rows interleaved; nvfp4's tensor scales side by side, [E, 2].
    packed = {name: mx.stack([a, u.global_scale], axis=1) if name == "global_scale"
              else _interleave_rows(a, u.arrays()[name]) for name, a in g.arrays().items()}
    return g._replace(**packed)


def pack_experts(*projections) -> PackedExperts:
    """Packs quantized expert projections into a :class:`PackedExperts`.

    Accepts one mlx-lm ``SwitchGLU`` (gated) or ``SwitchMLP`` (not gated)
    with quantized projections, or the projections themselves, each a
    ``QuantizedSwitchLinear``, a :class:`QuantizedProjection` or a tuple
    ``(weight, scales, biases, bits, group_size)``: ``gate, up, down``
    (gated) or ``fc1, fc2``. Lossless: :func:`unpack_experts` gives back
    bit-identical arrays.
    """
    if len(projections) == 1 and isinstance(projections[0], nn.Module):
        module = projections[0]
        names = spec.STOCK_PROJECTIONS if "gate_proj" in module else spec.STOCK_MLP_PROJECTIONS
        if not all(n in module for n in names):
            raise TypeError(f"pack_experts takes a SwitchGLU or SwitchMLP, got a {type(module).__name__}")
        projections = tuple(module[n] for n in names)
    if len(projections) == 2:
        fc1, fc2 = (_as_projection(n, p) for n, p in zip(spec.STOCK_MLP_PROJECTIONS, projections))
        return PackedExperts(fc1, fc2, gated=False)
    if len(projections) != 3:
        raise TypeError("pack_experts takes a SwitchGLU or SwitchMLP, or gate, up and down, or fc1 and fc2")
    g, u, d = (_as_projection(n, p) for n, p in zip(("gate", "up", "down"), projections))
    if g.spec != u.spec:
        raise ValueError(f"gate ({g.describe()}) and up ({u.describe()}) must share their quantization "
                         f"to be packed")
    for name, p in (("gate", g), ("up", u)):
        _check_projection(name, p)
    if g.weight.shape != u.weight.shape:
        raise ValueError(f"gate {tuple(g.weight.shape)} and up {tuple(u.weight.shape)} must match")
    if g.mode == "affine" and g.scales.dtype != u.scales.dtype:
        raise ValueError(f"gate scales {g.scales.dtype} and up scales {u.scales.dtype} must match")
    return PackedExperts(_gate_up(g, u), d)


def unpack_experts(packed: PackedExperts):
    """Returns ``(gate, up, down)`` (gated) or ``(fc1, fc2)`` as
    :class:`QuantizedProjection` tuples, bit-identical to what was packed."""
    if not packed.gated:
        return packed.projection(UP), packed.projection(DOWN)
    gu = packed.projection(GATE_UP)

    def rows(parity: int):
        def take(name, a):
            if name == "global_scale":
                return a[:, parity]
            E, two_h = a.shape[:2]
            return a.reshape(E, two_h // 2, 2, *a.shape[2:])[:, :, parity]
        return take

    return gu.map_arrays(rows(0)), gu.map_arrays(rows(1)), packed.projection(DOWN)
