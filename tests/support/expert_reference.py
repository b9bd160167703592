"""The expert ops of docs/kernel_contract.md for every setting, as test data
and references: every quantization (affine 2-8 bits, mxfp4, mxfp8, nvfp4
with or without its per-expert global scale), every activation, expert
biases, x per slot, down with the combine or per slot.

- ``make_projection`` quantizes random float weights with ``mx.quantize``,
  so the codes and scales are MLX's own.
- ``dequantize`` decodes them in numpy float64 from the contract's tables
  (e2m1, e4m3, e8m0 written out here, not MLX's decoder;
  ``test_metal_emulator.py`` checks that the two agree), so the reference
  is built from the very arrays the kernels read.
- ``reference_*`` compute in float64; ``stock_*`` the same with MLX ops in
  the activations' dtype (weights dequantized by MLX into that dtype), the
  baseline of the tolerance rule (support/tolerance.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from fused_moe import _ext

# The parameters each activation gets in these tests (the models' values
# where they have them: gpt-oss's alpha 1.702 and limit 7.0).
ACTIVATION_PARAMS = {
    "swiglu": {},
    "clamped_swiglu": {"limit": 0.9},
    "deepseek_v41_swiglu": {"limit": 0.8},
    "swiglu_oai": {"limit": 7.0, "alpha": 1.702},
    "geglu": {},
    "situ": {"beta": 1.5, "linear_beta": 2.0},
    "gelu_approx": {},
    "relu2": {},
}


@dataclass
class Projection:
    """One stacked quantized projection [E, R, C] as the ops take it."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    mode: str
    bits: int
    group_size: int
    global_scale: mx.array | None = None  # nvfp4: [E] float32
    dense: np.ndarray = field(default=None, repr=False)  # fp64 [E, R, C], decoded

    def arrays(self) -> tuple:
        """weight, scales, biases: the ops' arguments before indices."""
        return self.weight, self.scales, self.biases

    def quant(self) -> tuple:
        """bits, group_size: the ops' arguments after indices (and weights)."""
        return self.bits, self.group_size


def _quantize(w: mx.array, mode: str, bits: int, group_size: int, global_scale=None):
    kw = dict(mode=mode)
    if mode == "affine":
        kw.update(group_size=group_size, bits=bits)
    if global_scale is not None:
        kw["global_scale"] = global_scale
    out = mx.quantize(w, **kw)
    return out[0], out[1], (out[2] if mode == "affine" else None)


def make_projection(E, R, C, dtype, mode="affine", bits=4, group_size=64, global_scale=False,
                    gated_rows=False, seed=0) -> Projection:
    """Random weights (std C^-1/2) quantized by MLX. With `global_scale`
    (nvfp4), each expert is quantized with its own scale, max|w_e|: [E];
    with `gated_rows` too, its gate rows (even) and up rows (odd) each with
    their own: [E, 2], as gate_up takes them."""
    w = (mx.random.normal((E, R, C), key=mx.random.key(seed)) * C**-0.5).astype(dtype)
    if not global_scale:
        q, s, b = _quantize(w, mode, bits, group_size)
        p = Projection(q, s, b, mode, bits, group_size)
    else:
        assert mode == "nvfp4"
        halves = [w[:, 0::2], w[:, 1::2]] if gated_rows else [w]
        gs = mx.stack([mx.max(mx.abs(part.astype(mx.float32)), axis=(1, 2)) for part in halves], axis=1)
        parts = [[_quantize(part[e], mode, bits, group_size, gs[e, i]) for i, part in enumerate(halves)]
                 for e in range(E)]
        # Back to the rows' order: gate and up interleaved.
        q = mx.stack([mx.stack([p_[0] for p_ in pe], axis=1).reshape(R, -1) for pe in parts])
        s = mx.stack([mx.stack([p_[1] for p_ in pe], axis=1).reshape(R, -1) for pe in parts])
        p = Projection(q, s, None, mode, bits, group_size, gs if gated_rows else gs[:, 0])
    mx.eval(p.weight, p.scales)
    p.dense = dequantize(p)
    return p


# ---------------------------------------------------------------------------
# The contract's decoding, in numpy
# ---------------------------------------------------------------------------

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def e4m3(q: np.ndarray) -> np.ndarray:
    """MLX's from_fp8: E = bits 6..3, M = bits 2..0; E = 0: M*2^-9, else
    (8 + M)*2^(E-10); 0x7F and 0xFF are NaN."""
    q = q.astype(np.int64)
    e, m = (q >> 3) & 15, q & 7
    v = np.where(e == 0, m * 2.0**-9, (8 + m) * np.exp2(e - 10.0))
    v = np.where((q & 0x80) != 0, -v, v)
    return np.where((q & 0x7F) == 0x7F, np.nan, v)


def e8m0(s: np.ndarray) -> np.ndarray:
    """2^(s-127); s = 255 is +inf, as MLX computes it in fp32."""
    return np.where(s == 255, np.inf, np.exp2(s.astype(np.float64) - 127.0))


def unpack_codes(weight: mx.array, bits: int, cols: int) -> np.ndarray:
    """[..., cols] codes of a uint32 [..., cols*bits/32] little-endian bit
    stream (code i at bit bits*i): each read from the 64 bits of its word
    and the next."""
    words = np.array(weight, dtype=np.uint32).astype(np.uint64)
    words = np.concatenate([words, np.zeros((*words.shape[:-1], 1), np.uint64)], axis=-1)
    offset = np.arange(cols, dtype=np.uint64) * np.uint64(bits)
    j = (offset // np.uint64(32)).astype(np.int64)
    pair = words[..., j] | (words[..., j + 1] << np.uint64(32))
    return ((pair >> (offset % np.uint64(32))) & np.uint64((1 << bits) - 1)).astype(np.int64)


def _np64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def dequantize(p: Projection) -> np.ndarray:
    """fp64 [E, R, C] from the packed arrays, by the contract's table."""
    E, R, words = p.weight.shape
    C = words * 32 // p.bits
    q = unpack_codes(p.weight, p.bits, C)
    per_group = lambda a: np.repeat(a, p.group_size, axis=-1)  # noqa: E731
    if p.mode == "affine":
        return per_group(_np64(p.scales)) * q + per_group(_np64(p.biases))
    s = np.array(p.scales, dtype=np.uint8)
    if p.mode == "nvfp4":
        scale = e4m3(s)
        if p.global_scale is not None:
            # fp32, the quotient first (the contract); [E, 2]: gate rows
            # (even) and up rows (odd).
            ratio = np.array(p.global_scale, dtype=np.float32) / np.float32(2688)
            ratio = ratio[:, np.arange(R) % 2] if ratio.ndim == 2 else ratio[:, None]
            scale = (scale.astype(np.float32) * ratio[:, :, None]).astype(np.float64)
        codes = E2M1[q]
    else:
        scale = e8m0(s)
        codes = E2M1[q] if p.mode == "mxfp4" else e4m3(q)
    return codes * per_group(scale)


def mlx_dequantize(p: Projection, dtype=mx.float32) -> mx.array:
    """The same weights decoded by MLX (mx.dequantize), in `dtype`."""
    if p.global_scale is not None:
        E, R = p.weight.shape[:2]
        gs = p.global_scale if p.global_scale.ndim == 2 else p.global_scale[:, None]
        rows = [slice(i, None, gs.shape[1]) for i in range(gs.shape[1])]
        out = [[mx.dequantize(p.weight[e, r], p.scales[e, r], None, p.group_size, p.bits, mode=p.mode,
                              global_scale=gs[e, i], dtype=dtype) for i, r in enumerate(rows)]
               for e in range(E)]
        return mx.stack([mx.stack(o, axis=1).reshape(R, -1) for o in out])
    return mx.dequantize(p.weight, p.scales, p.biases, p.group_size, p.bits, mode=p.mode, dtype=dtype)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def gated(activation: str) -> bool:
    return activation in _ext.GATED_ACTIVATIONS


def act_np(activation: str, g, u, limit=None, alpha=None, beta=None, linear_beta=None):
    """fp64 act(g, u) (u unused when not gated): the contract's table."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    gelu = lambda z: 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    clip = lambda z, lo, hi: np.minimum(np.maximum(z, lo), hi)  # noqa: E731
    if activation == "swiglu" or (activation == "deepseek_v41_swiglu" and limit <= 0):
        return g * sig(g) * u
    if activation == "clamped_swiglu":
        return np.minimum(g * sig(g), limit) * clip(u, -limit, limit)
    if activation == "deepseek_v41_swiglu":
        gc = np.minimum(g, limit)
        return gc * sig(gc) * clip(u, -limit, limit)
    if activation == "swiglu_oai":
        gc = np.minimum(g, limit)
        return (clip(u, -limit, limit) + 1.0) * gc * sig(alpha * gc)
    if activation == "geglu":
        return gelu(g) * u
    if activation == "situ":
        lin = linear_beta * np.tanh(u / linear_beta) if linear_beta else u
        return beta * np.tanh(g / beta) * sig(g) * lin
    if activation == "gelu_approx":
        return gelu(g)
    if activation == "relu2":
        return np.maximum(g, 0.0) ** 2
    raise ValueError(activation)


def act_mx(activation: str, g, u, limit=None, alpha=None, beta=None, linear_beta=None):
    """act(g, u) with MLX ops in the dtype of g (the stock path)."""
    import mlx.nn as nn

    if activation == "swiglu" or (activation == "deepseek_v41_swiglu" and limit <= 0):
        return nn.silu(g) * u
    if activation == "clamped_swiglu":
        return mx.minimum(nn.silu(g), limit) * mx.clip(u, -limit, limit)
    if activation == "deepseek_v41_swiglu":
        return nn.silu(mx.minimum(g, limit)) * mx.clip(u, -limit, limit)
    if activation == "swiglu_oai":
        gc = mx.minimum(g, limit)
        return (mx.clip(u, -limit, limit) + 1.0) * (gc * mx.sigmoid(alpha * gc))
    if activation == "geglu":
        return nn.gelu_approx(g) * u
    if activation == "situ":
        lin = linear_beta * mx.tanh(u / linear_beta) if linear_beta else u
        return beta * mx.tanh(g / beta) * mx.sigmoid(g) * lin
    if activation == "gelu_approx":
        return nn.gelu_approx(g)
    if activation == "relu2":
        return mx.square(mx.maximum(g, 0))
    raise ValueError(activation)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def _per_pair(all_experts, idx):
    """[..., k, R] from every expert's rows [E, P, R] (P = pairs, in order)."""
    flat = idx.reshape(-1)
    return all_experts[flat, np.arange(flat.size)].reshape(*idx.shape, -1)


def _pair_rows(x, idx):
    """x per pair [P, C]: x [..., C] shared by the k slots, or [..., k, C]."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.shape[0] == idx.size else np.repeat(x, idx.shape[-1], axis=0)


def reference_gate_up(p: Projection, x, indices, activation, params, bias=None) -> np.ndarray:
    """fp64 h [..., k, H]; x [..., D] or [..., k, D] (per slot). Every
    expert's rows times every pair's x, then each pair's expert: no gather
    of [T, k, R, D]."""
    idx = np.array(indices).astype(np.int64)
    xs = _pair_rows(_np64(x), idx)
    a = _per_pair(np.einsum("erd,pd->epr", p.dense, xs), idx)
    if bias is not None:
        a = a + _np64(bias)[idx]
    if gated(activation):
        return act_np(activation, a[..., 0::2], a[..., 1::2], **params)
    return act_np(activation, a, None, **params)


def _per_pair_mx(all_experts: mx.array, indices: mx.array) -> mx.array:
    flat = indices.reshape(-1).astype(mx.uint32)
    return all_experts[flat, mx.arange(flat.size)].reshape(*indices.shape, -1)


def stock_gate_up(p: Projection, x, indices, activation, params, bias=None) -> mx.array:
    """The same with MLX ops in x's dtype."""
    dtype = x.dtype
    xs = x.reshape(-1, x.shape[-1])
    if xs.shape[0] != indices.size:
        xs = mx.repeat(xs, indices.shape[-1], axis=0)
    a = _per_pair_mx(mx.swapaxes(mlx_dequantize(p, dtype) @ xs.T, 1, 2), indices)
    if bias is not None:
        a = a + bias.astype(dtype)[indices]
    if gated(activation):
        return act_mx(activation, a[..., 0::2], a[..., 1::2], **params)
    return act_mx(activation, a, None, **params)


def reference_down(p: Projection, h, indices, weights=None, bias=None) -> np.ndarray:
    """fp64 y: [..., D] with the combine (weights given), else [..., k, D]."""
    idx = np.array(indices).astype(np.int64)
    hs = _np64(h).reshape(-1, h.shape[-1])
    o = _per_pair(np.einsum("edh,ph->epd", p.dense, hs), idx)
    if bias is not None:
        o = o + _np64(bias)[idx]
    if weights is None:
        return o
    return np.einsum("...k,...kd->...d", _np64(weights), o)


def stock_down(p: Projection, h, indices, weights=None, bias=None) -> mx.array:
    dtype = h.dtype
    hs = h.reshape(-1, h.shape[-1])
    o = _per_pair_mx(mx.swapaxes(mlx_dequantize(p, dtype) @ hs.T, 1, 2), indices)
    if bias is not None:
        o = o + bias.astype(dtype)[indices]
    if weights is None:
        return o
    return (o * weights.astype(dtype)[..., None]).sum(axis=-2)
