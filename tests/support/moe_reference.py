"""Test data and the fp64 reference for the fused MoE ops.

The reference dequantizes the very arrays the kernels read (scale*q + bias in
fp32), then does the matmuls in fp64, so a comparison measures kernel error
and not quantization error.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU

import fused_moe as fm


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
    QuantizedSwitchLinear, [out, in] for a QuantizedLinear."""
    w = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        layer.biases.astype(mx.float32),
        layer.group_size,
        layer.bits,
    )
    return np.array(w, dtype=np.float64)


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
