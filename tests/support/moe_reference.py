"""Test data and the fp64 reference for the fused MoE ops.

The reference dequantizes the very arrays the kernels read (mx.dequantize in
fp32: scale*q + bias, or the fp modes' codes times their scales), then does
the matmuls in fp64, so a comparison measures kernel error and not
quantization error.

The first part serves the PackedExperts ops (affine, SwiGLU); the second,
every setting of the grid through fused_moe._ext's raw-array ops
(tests/test_experts.py): any mode, the zoo's activations with mlx-lm's own
modules as the stock path, expert biases, x per slot, and down per slot.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, _quantize_experts

import fused_moe as fm
from fused_moe import _ext


@dataclass
class Experts:
    gate: QuantizedSwitchLinear
    up: QuantizedSwitchLinear
    down: QuantizedSwitchLinear
    packed: fm.PackedExperts
    dtype: mx.Dtype


def quantized_switch_linear(E, d_in, d_out, bits, group_size, dtype, key) -> QuantizedSwitchLinear:
    layer = QuantizedSwitchLinear(d_in, d_out, E, bias=False, group_size=group_size, bits=bits)
    w = (mx.random.normal((E, d_out, d_in), key=key) * d_in**-0.5).astype(dtype)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size, bits)
    return layer


def make_experts(E, D, H, dtype, bits=3, group_size=64, down_bits=None, down_group_size=None, seed=0) -> Experts:
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    gate = quantized_switch_linear(E, D, H, bits, group_size, dtype, k1)
    up = quantized_switch_linear(E, D, H, bits, group_size, dtype, k2)
    down = quantized_switch_linear(
        E, H, D, down_bits or bits, down_group_size or group_size, dtype, k3
    )
    packed = fm.pack_experts(gate, up, down)
    mx.eval(packed.parameters())
    return Experts(gate, up, down, packed, dtype)


def random_routing(T, E, k, seed=0, distinct=True):
    """indices [T, k] uint32 and normalized weights [T, k] float32."""
    rng = np.random.default_rng(seed)
    if distinct and k <= E:
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    else:
        idx = rng.integers(0, E, size=(T, k))
    w = rng.random((T, k)) + 0.1
    w /= w.sum(axis=1, keepdims=True)
    return mx.array(idx.astype(np.uint32)), mx.array(w.astype(np.float32))


def dequantized(layer) -> np.ndarray:
    """Float64 weights exactly as the kernels see them: [E, out, in] for a
    QuantizedSwitchLinear, [out, in] for a QuantizedLinear; any mode, with
    nvfp4's per-expert global scales."""
    mode = getattr(layer, "mode", "affine")
    if mode == "affine":
        w = mx.dequantize(
            layer.weight,
            layer.scales.astype(mx.float32),
            layer.biases.astype(mx.float32),
            layer.group_size,
            layer.bits,
        )
        return np.array(w, dtype=np.float64)
    gs = getattr(layer, "global_scale", None)
    if gs is None:
        w = mx.dequantize(layer.weight, layer.scales, None, layer.group_size, layer.bits, mode=mode, dtype=mx.float32)
        return np.array(w, dtype=np.float64)
    return np.stack([
        np.array(mx.dequantize(layer.weight[e], layer.scales[e], None, layer.group_size, layer.bits, mode=mode,
                               global_scale=gs[e], dtype=mx.float32), dtype=np.float64)
        for e in range(layer.weight.shape[0])
    ])


def _np(a) -> np.ndarray:
    if isinstance(a, mx.array):
        a = a.astype(mx.float32)
    return np.array(a, dtype=np.float64)


def reference_h(ex: Experts, x, indices) -> np.ndarray:
    """[T, k, H] in fp64."""
    G, U = dequantized(ex.gate), dequantized(ex.up)
    x64, idx = _np(x), np.array(indices).astype(np.int64)
    g = np.einsum("td,tkhd->tkh", x64, G[idx])
    u = np.einsum("td,tkhd->tkh", x64, U[idx])
    return g / (1.0 + np.exp(-g)) * u


def reference_y(ex: Experts, h, indices, weights) -> np.ndarray:
    """[T, D] in fp64 from a given h."""
    Dn = dequantized(ex.down)
    idx = np.array(indices).astype(np.int64)
    return np.einsum("tkh,tkdh,tk->td", _np(h), Dn[idx], _np(weights))


# The stock mlx-lm path, in the dtype of the experts.
def _expand(x):
    return mx.expand_dims(x, (-2, -3))


def stock_h(ex: Experts, x, indices):
    xe = _expand(x)
    h = SwiGLU()(ex.up(xe, indices), ex.gate(xe, indices))
    return h.squeeze(-2)


def stock_y(ex: Experts, h, indices, weights):
    y = ex.down(mx.expand_dims(h, -2), indices).squeeze(-2)
    return (y * weights.astype(h.dtype)[..., None]).sum(axis=-2)


# ---------------------------------------------------------------------------
# Every setting of the grid, through fused_moe._ext
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    """One projection's quantization; global_scale: nvfp4 with mlx-lm's
    per-expert tensor scales."""

    mode: str
    bits: int
    group_size: int
    global_scale: bool = False

    def __str__(self) -> str:
        if self.mode == "affine":
            return f"affine{self.bits}g{self.group_size}"
        return self.mode + ("+gs" if self.global_scale else "")


# Every (mode, bits, group size) the expert ops take, read from C++, and
# nvfp4 with global scales.
ALL_QUANTS = [Quant(m, b, g) for m, b, g in _ext.supported_quantizations()] + [Quant("nvfp4", 4, 16, True)]

# The activations' parameters in the tests: limits small enough that the
# clamps act on many values (the projections are about N(0, 1)).
ACTIVATION_PARAMS = {
    "swiglu": {},
    "clamped_swiglu": {"limit": 0.8},
    "deepseek_v41_swiglu": {"limit": 0.8},
    "swiglu_oai": {"alpha": 1.702, "limit": 0.8},
    "geglu": {},
    "situ": {"beta": 1.3, "linear_beta": 0.9},
    "gelu_approx": {},
    "relu2": {},
}


def gated(activation: str) -> bool:
    return activation in _ext.GATED_ACTIVATIONS


def make_projection(E, d_in, d_out, quant: Quant, dtype, seed, bias=False) -> QuantizedSwitchLinear:
    """A stock QuantizedSwitchLinear of the setting (mlx-lm quantizes it the
    way checkpoints are made), with an expert bias [E, d_out] if asked."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    layer = QuantizedSwitchLinear(
        d_in, d_out, E, bias=False, group_size=quant.group_size, bits=quant.bits, mode=quant.mode
    )
    w = mx.random.normal((E, d_out, d_in), key=k1) * d_in**-0.5
    if quant.global_scale:
        # Experts of different magnitudes: each global scale matters.
        w = w * mx.exp(mx.random.normal((E, 1, 1), key=k3))
        layer.weight, layer.scales, layer.global_scale = _quantize_experts(
            w.astype(dtype), group_size=quant.group_size, bits=quant.bits, mode=quant.mode
        )
        layer.biases = None
    else:
        q = mx.quantize(w.astype(dtype), quant.group_size, quant.bits, mode=quant.mode)
        layer.weight, layer.scales = q[0], q[1]
        layer.biases = q[2] if quant.mode == "affine" else None
    if bias:
        layer.bias = (mx.random.normal((E, d_out), key=k2) * 0.5).astype(dtype)
    mx.eval(layer.parameters())
    return layer


@dataclass
class RawProjection:
    """A projection's arrays as fused_moe._ext takes them."""

    weight: mx.array
    scales: mx.array
    biases: Optional[mx.array]
    bias: Optional[mx.array]
    global_scale: Optional[mx.array]
    quant: Quant

    def args(self):
        return self.weight, self.scales, self.biases

    def kwargs(self):
        return dict(mode=self.quant.mode, bias=self.bias, global_scale=self.global_scale)

    def projection(self, name=None):
        """PackedExperts.projection's tuple, for the Metal emulator."""
        return self.weight, self.scales, self.biases, self.quant.bits, self.quant.group_size


def _interleave(a: mx.array, b: mx.array) -> mx.array:
    """Rows of a and b alternating along axis 1 (a's row r at 2r)."""
    return mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])


def _get(layer, name):
    return layer[name] if name in layer else None


def raw_gate_up(gate, up, quant: Quant) -> RawProjection:
    """gate and up rows interleaved (with their scales, biases, expert biases
    and global scales [E, 2]); `up` None: fc1 as it is (not gated)."""
    if up is None:
        return RawProjection(gate.weight, gate.scales, gate.biases, _get(gate, "bias"),
                             getattr(gate, "global_scale", None), quant)
    inter = lambda a, b: None if a is None else _interleave(a, b)  # noqa: E731
    gs = getattr(gate, "global_scale", None)
    arrays = RawProjection(
        _interleave(gate.weight, up.weight), _interleave(gate.scales, up.scales),
        inter(gate.biases, up.biases), inter(_get(gate, "bias"), _get(up, "bias")),
        None if gs is None else mx.stack([gs, up.global_scale], axis=1), quant)
    mx.eval([a for a in (arrays.weight, arrays.scales, arrays.biases, arrays.bias, arrays.global_scale)
             if a is not None])
    return arrays


def raw_down(down, quant: Quant) -> RawProjection:
    return RawProjection(down.weight, down.scales, down.biases, _get(down, "bias"),
                         getattr(down, "global_scale", None), quant)


def _bias64(layer):
    b = _get(layer, "bias")
    return None if b is None else _np(b)


def activation64(name: str, g: np.ndarray, u: Optional[np.ndarray], p: dict) -> np.ndarray:
    """The activation in fp64, from mlx-lm's definitions."""
    with np.errstate(over="ignore"):
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
        gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
        if name == "swiglu":
            return g * sig(g) * u
        if name == "clamped_swiglu":
            lim = p["limit"]
            return np.minimum(g * sig(g), lim) * np.clip(u, -lim, lim)
        if name == "deepseek_v41_swiglu":
            lim = p["limit"]
            if lim <= 0:
                return g * sig(g) * u
            gc = np.minimum(g, lim)
            return gc * sig(gc) * np.clip(u, -lim, lim)
        if name == "swiglu_oai":
            lim, alpha = p["limit"], p["alpha"]
            gc = np.minimum(g, lim)
            return (np.clip(u, -lim, lim) + 1) * gc * sig(alpha * gc)
        if name == "geglu":
            return gelu(g) * u
        if name == "situ":
            beta, lb = p["beta"], p.get("linear_beta")
            a = beta * np.tanh(g / beta) * sig(g)
            return a * (u if lb is None else lb * np.tanh(u / lb))
        if name == "gelu_approx":
            return gelu(g)
        if name == "relu2":
            return np.maximum(g, 0) ** 2
    raise ValueError(name)


def activation_module(name: str, p: dict):
    """mlx-lm's own module for the activation: the stock path."""
    from mlx_lm.models.activations import SwigluOAI
    from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU
    from mlx_lm.models.gemma4_text import GeGLU
    from mlx_lm.models.kimi_k3 import SiTU
    from mlx_lm.models.step3p5 import ClampedSwiGLU

    return {
        "swiglu": lambda: SwiGLU(),
        "clamped_swiglu": lambda: ClampedSwiGLU(p["limit"]),
        "deepseek_v41_swiglu": lambda: DeepseekV41SwiGLU(p["limit"]),
        "swiglu_oai": lambda: SwigluOAI(alpha=p["alpha"], limit=p["limit"]),
        "geglu": lambda: GeGLU(),
        "situ": lambda: SiTU(p["beta"], p.get("linear_beta")),
        "gelu_approx": lambda: nn.GELU(approx="precise"),
        "relu2": lambda: nn.ReLU2(),
    }[name]()


def _rows_of(x, per_slot: bool, k: int) -> np.ndarray:
    """x as fp64 [T, k, D]: per slot as it is, shared broadcast over k."""
    x64 = _np(x)
    return x64 if per_slot else np.repeat(x64[:, None, :], k, axis=1)


def reference_gate_up(gate, up, x, indices, activation: str, params: dict, per_slot: bool) -> np.ndarray:
    """h [T, k, H] in fp64 (x [T, D] shared or [T, k, D] per slot); `up`
    None: not gated (gate is fc1)."""
    idx = np.array(indices).astype(np.int64)
    xr = _rows_of(x, per_slot, idx.shape[1])

    def project(layer):
        o = np.einsum("tkd,tkhd->tkh", xr, dequantized(layer)[idx])
        b = _bias64(layer)
        return o if b is None else o + b[idx]

    g = project(gate)
    return activation64(activation, g, None if up is None else project(up), params)


def reference_down(down, h, indices, weights=None) -> np.ndarray:
    """y [T, D] (with weights: the combine) or [T, k, D] in fp64."""
    idx = np.array(indices).astype(np.int64)
    o = np.einsum("tkh,tkdh->tkd", _np(h), dequantized(down)[idx])
    b = _bias64(down)
    if b is not None:
        o = o + b[idx]
    return o if weights is None else np.einsum("tkd,tk->td", o, _np(weights))


def _stock_project(layer, xe, indices):
    """mlx-lm's QuantizedSwitchLinear call; nvfp4 with global scales (which
    MLX's CPU gather_qmm refuses) as MLX dequantizes them, in the dtype."""
    gs = getattr(layer, "global_scale", None)
    if gs is None:
        return layer(xe, indices)
    w = mx.stack([
        mx.dequantize(layer.weight[e], layer.scales[e], None, layer.group_size, layer.bits, mode=layer.mode,
                      global_scale=gs[e], dtype=xe.dtype)
        for e in range(layer.weight.shape[0])
    ]).astype(xe.dtype)  # a float32 global scale promotes the result
    # (MLX's CPU gather_mm takes float32 only: a gather, then matmul.)
    y = xe @ w[indices].swapaxes(-1, -2)
    if "bias" in layer:
        y = y + mx.expand_dims(layer["bias"][indices], -2)
    return y


def stock_gate_up(gate, up, x, indices, activation: str, params: dict, per_slot: bool):
    """mlx-lm's SwitchGLU / SwitchMLP first half in the experts' dtype."""
    xe = mx.expand_dims(x, -2) if per_slot else mx.expand_dims(x, (-2, -3))
    act = activation_module(activation, params)
    if up is None:
        return act(_stock_project(gate, xe, indices)).squeeze(-2)
    return act(_stock_project(up, xe, indices), _stock_project(gate, xe, indices)).squeeze(-2)


def stock_down(down, h, indices, weights=None):
    """mlx-lm's down projection per slot, and the model's weighted sum."""
    y = _stock_project(down, mx.expand_dims(h, -2), indices).squeeze(-2)
    if weights is None:
        return y
    return (y * weights.astype(h.dtype)[..., None]).sum(axis=-2)
