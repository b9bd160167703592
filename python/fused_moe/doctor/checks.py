"""The correctness rows of `fused-moe doctor`: every kernel family of the
installed grid, run on one device at small shapes and compared with a float64
reference built from the same quantized arrays, under the project's tolerance
rule:

    err(x, ref) = max|x - ref| / max|ref|
    pass  <=>  err(fused, ref) <= 2 * err(stock, ref) + slack

with "stock" the same computation by MLX's and mlx-lm's own ops in the same
dtype, and slack 1e-3 for float16/bfloat16 (1e-5 for float32).

`CHECKS` is the list of rows; each computes its fused result through
`FUSED[op]`, the one table a test may replace to plant a wrong kernel.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fused_moe import _ext
from fused_moe.ops import attention as attention_ops
from fused_moe.ops import experts as expert_ops
from fused_moe.ops import linear as linear_ops
from fused_moe.ops import router as router_ops
from fused_moe.ops.experts import Activation
from fused_moe.packed.experts import PackedExperts, QuantizedProjection, pack_experts
from fused_moe.supported import (
    ACTIVATION_PARAMETERS,
    FP_MODES,
    GATED_ACTIVATIONS,
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_LINEAR_BITS,
    SUPPORTED_ROUTER_BITS,
)

# The ops each row calls, by name: a test replaces one to plant an error.
FUSED: dict[str, Callable] = {
    "gate_up": expert_ops.gate_up,
    "down_combine": expert_ops.down_combine,
    "down_slots": expert_ops.down_slots,
    "route": router_ops.route,
    "quantized_matmul": linear_ops.quantized_matmul,
    "quantized_embedding": linear_ops.quantized_embedding,
    "scaled_dot_product_attention": attention_ops.scaled_dot_product_attention,
    "norm_rope": attention_ops.norm_rope,
}

# The small shapes every row runs at.
E, D, H, K, T = 6, 256, 128, 3, 5
DTYPE = mx.bfloat16
SLACK = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 1e-3}

# An example value for each activation parameter, where clamps bite.
PARAMETER_VALUES = {"limit": 1.0, "alpha": 1.702, "beta": 0.8, "linear_beta": 1.5}
# mlx-lm's activation modules, as the zoo's models build them (the stock side).
STOCK_ACTIVATIONS = {
    "swiglu": ("mlx_lm.models.switch_layers", "SwiGLU", ()),
    "clamped_swiglu": ("mlx_lm.models.step3p5", "ClampedSwiGLU", ("limit",)),
    "deepseek_v41_swiglu": ("mlx_lm.models.deepseek_v41", "DeepseekV41SwiGLU", ("limit",)),
    "swiglu_oai": ("mlx_lm.models.activations", "SwigluOAI", ("alpha", "limit")),
    "geglu": ("mlx_lm.models.gemma4_text", "GeGLU", ()),
    "situ": ("mlx_lm.models.kimi_k3", "SiTU", ("beta", "linear_beta")),
    "gelu_approx": ("mlx.nn", "GELU", ()),
    "relu2": ("mlx.nn", "ReLU2", ()),
}


@dataclass
class Row:
    """One row of the report."""

    family: str  # e.g. "gate_up affine"
    kernel: str  # e.g. "gate_up affine b3 gs64 swiglu"
    error: float = float("nan")  # err(fused, ref)
    bound: float = float("nan")  # 2 * err(stock, ref) + slack
    passed: bool = False
    seconds: float = 0.0  # wall time of the first call: the Metal compile on a GPU
    message: str = ""  # why it failed to run, if it did

    def as_json(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass
class Check:
    family: str
    kernel: str
    run: Callable[[mx.Stream], tuple[mx.array, mx.array, np.ndarray]]  # -> fused, stock, ref
    dtype: mx.Dtype = DTYPE
    tags: dict = field(default_factory=dict)


def _err(a, ref: np.ndarray) -> float:
    a = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(a - ref)) / scale) if scale > 0 else float("inf")


def run_check(check: Check, stream) -> Row:
    row = Row(check.family, check.kernel)
    start = time.perf_counter()
    try:
        fused, stock, ref = check.run(stream)
        mx.eval(fused, stock)
        row.seconds = time.perf_counter() - start
        fused32 = np.asarray(fused.astype(mx.float32))
        if not np.all(np.isfinite(fused32)):
            row.message = "the fused result has NaN or Inf"
            return row
        row.error = _err(fused, ref)
        row.bound = 2 * _err(stock, ref) + SLACK[check.dtype]
        row.passed = row.error <= row.bound
    except Exception as e:  # a failed compile or run: reported, the others still run
        row.seconds = time.perf_counter() - start
        row.message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


# ---------------------------------------------------------------- data


def _f32(a: Optional[mx.array]) -> Optional[mx.array]:
    return None if a is None else a.astype(mx.float32)


def _dequantized(p: QuantizedProjection) -> np.ndarray:
    """Float64 [E, out, in]: what the kernels read (affine scales and biases
    widened to float32 first, so no rounding enters the reference)."""
    affine = p.mode == "affine"
    w = mx.dequantize(p.weight, _f32(p.scales) if affine else p.scales, _f32(p.biases), group_size=p.group_size,
                      bits=p.bits, mode=p.mode, dtype=mx.float32)
    return np.asarray(w, dtype=np.float64)


def _projection(key, rows: int, cols: int, mode: str, bits: int, group_size: int, bias: bool,
                dtype: mx.Dtype) -> QuantizedProjection:
    k1, k2 = mx.random.split(key)
    w = (mx.random.normal((E, rows, cols), key=k1) * cols**-0.5).astype(dtype)
    arrays = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    b = (mx.random.normal((E, rows), key=k2) * 0.1).astype(dtype) if bias else None
    return QuantizedProjection(arrays[0], arrays[1], arrays[2] if mode == "affine" else None, bits, group_size,
                               mode, b)


def _routing(seed: int):
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.uint32)
    w = rng.random((T, K)) + 0.1
    return mx.array(idx), mx.array((w / w.sum(1, keepdims=True)).astype(np.float32))


def _x(seed: int, shape, dtype: mx.Dtype = DTYPE) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _np(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32), dtype=np.float64)


# ---------------------------------------------------------------- the expert ops


def _activation(name: str) -> Activation:
    required, optional = ACTIVATION_PARAMETERS[name]
    return Activation(name, **{p: PARAMETER_VALUES[p] for p in (*required, *optional)})


def _stock_activation(name: str):
    module, cls, params = STOCK_ACTIVATIONS[name]
    act = getattr(importlib.import_module(module), cls)
    if name == "gelu_approx":
        return act(approx="precise")
    return act(*(PARAMETER_VALUES[p] for p in params))


def _activation64(name: str, g: np.ndarray, u: Optional[np.ndarray]) -> np.ndarray:
    """The activation in float64 (docs/kernel_contract.md)."""
    v = PARAMETER_VALUES

    def sigmoid(a):
        return 1 / (1 + np.exp(-a))

    def gelu_tanh(a):
        return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))

    if name == "swiglu":
        return g * sigmoid(g) * u
    if name == "clamped_swiglu":
        return np.minimum(g * sigmoid(g), v["limit"]) * np.clip(u, -v["limit"], v["limit"])
    if name == "deepseek_v41_swiglu":
        gl = np.minimum(g, v["limit"])
        return gl * sigmoid(gl) * np.clip(u, -v["limit"], v["limit"])
    if name == "swiglu_oai":
        gl, ul = np.minimum(g, v["limit"]), np.clip(u, -v["limit"], v["limit"])
        return (ul + 1) * gl * sigmoid(v["alpha"] * gl)
    if name == "geglu":
        return gelu_tanh(g) * u
    if name == "situ":
        b, lb = v["beta"], v["linear_beta"]
        return b * np.tanh(g / b) * sigmoid(g) * lb * np.tanh(u / lb)
    if name == "gelu_approx":
        return gelu_tanh(g)
    if name == "relu2":
        return np.maximum(g, 0) ** 2
    raise KeyError(name)


def _experts(mode: str, bits: int, group_size: int, gated: bool, bias: bool, seed: int,
             dtype: mx.Dtype) -> PackedExperts:
    keys = mx.random.split(mx.random.key(seed), 3)
    if gated:
        gate, up = (_projection(k, H, D, mode, bits, group_size, bias, dtype) for k in keys[:2])
        down = _projection(keys[2], D, H, mode, bits, group_size, bias, dtype)
        return pack_experts(gate, up, down)
    return pack_experts(_projection(keys[0], H, D, mode, bits, group_size, bias, dtype),
                        _projection(keys[1], D, H, mode, bits, group_size, bias, dtype))


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def _gate_up_check(mode: str, bits: int, group_size: int, activation: str, bias: bool = False,
                   dtype: mx.Dtype = DTYPE) -> Check:
    gated = activation in GATED_ACTIVATIONS
    label = f"b{bits}" if mode == "affine" else mode

    def run(stream):
        packed = _experts(mode, bits, group_size, gated, bias, bits * 7 + group_size, dtype)
        x = _x(1, (T, D), dtype)
        idx, _ = _routing(2)
        act = _activation(activation)
        fused = FUSED["gate_up"](x, packed, idx, act, stream=stream)
        first = packed.projection(packed.projection_names[0])
        w = _dequantized(first)  # [E, rows, D]
        x64, i = _np(x), np.asarray(idx)
        lin = np.einsum("td,tkrd->tkr", x64, w[i])
        if first.bias is not None:
            lin = lin + _np(first.bias)[i]
        ref = _activation64(activation, lin[..., 0::2], lin[..., 1::2]) if gated else _activation64(activation, lin, None)
        # Stock: MLX's gather_qmm per projection, then mlx-lm's activation module.
        stock_act = _stock_activation(activation)

        def stock_proj(p: QuantizedProjection, parity: Optional[int]):
            arrays = [p.weight, p.scales, p.biases]
            if parity is not None:
                arrays = [None if a is None else a.reshape(E, H, 2, *a.shape[2:])[:, :, parity] for a in arrays]
            # As mlx-lm's SwitchGLU: x [T, 1, 1, D] against each slot's expert.
            y = mx.gather_qmm(x[:, None, None, :], arrays[0], arrays[1], arrays[2], rhs_indices=idx,
                              transpose=True, group_size=p.group_size, bits=p.bits, mode=p.mode,
                              global_scale=p.global_scale, stream=stream).squeeze(-2)
            if p.bias is not None:
                b = p.bias if parity is None else p.bias.reshape(E, H, 2)[:, :, parity]
                y = y + b[idx]
            return y

        if gated:
            stock = stock_act(stock_proj(first, 1), stock_proj(first, 0))
        else:
            stock = stock_act(stock_proj(first, None))
        return fused, stock, ref

    kernel = f"gate_up {label} gs{group_size} {activation} {_dtype_name(dtype)}" + (" +bias" if bias else "")
    return Check(f"gate_up {mode}", kernel, run, dtype)


def _down_check(mode: str, bits: int, group_size: int, combine: bool, bias: bool = False,
                dtype: mx.Dtype = DTYPE) -> Check:
    label = f"b{bits}" if mode == "affine" else mode
    op = "down_combine" if combine else "down_slots"

    def run(stream):
        packed = _experts(mode, bits, group_size, True, bias, bits * 11 + group_size, dtype)
        h = _x(3, (T, K, H), dtype)
        idx, weights = _routing(4)
        down = packed.projection("down")
        w = _dequantized(down)  # [E, D, H]
        i = np.asarray(idx)
        per_slot = np.einsum("tkh,tkdh->tkd", _np(h), w[i])
        if down.bias is not None:
            per_slot = per_slot + _np(down.bias)[i]
        y = mx.gather_qmm(h[:, :, None, :], down.weight, down.scales, down.biases, rhs_indices=idx,
                          transpose=True, group_size=down.group_size, bits=down.bits, mode=down.mode,
                          global_scale=down.global_scale, stream=stream).squeeze(-2)
        if down.bias is not None:
            y = y + down.bias[idx]
        if combine:
            fused = FUSED["down_combine"](h, packed, idx, weights, stream=stream)
            ref = np.einsum("tkd,tk->td", per_slot, np.asarray(weights, dtype=np.float64))
            stock = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        else:
            fused = FUSED["down_slots"](h, packed, idx, stream=stream)
            ref, stock = per_slot, y
        return fused, stock, ref

    kernel = f"{op} {label} gs{group_size} {_dtype_name(dtype)}" + (" +bias" if bias else "")
    return Check(f"{op} {mode}", kernel, run, dtype)


def expert_checks() -> list[Check]:
    """Gate/up and down for every quantization of the grid in bfloat16 and
    float32 (SwiGLU, and for the down op the combine and the per-slot form),
    every activation at one quantization, and the expert biases."""
    checks = []
    # Half precision (the fast integer paths on the CPU) and float32 (exact
    # fp32 arithmetic: its tolerance catches an error of 1e-4).
    for dtype in (DTYPE, mx.float32):
        for mode, bits, group_size in _ext.supported_quantizations():
            checks.append(_gate_up_check(mode, bits, group_size, "swiglu", dtype=dtype))
            checks.append(_down_check(mode, bits, group_size, combine=True, dtype=dtype))
    for activation in SUPPORTED_ACTIVATIONS:
        if activation != "swiglu":
            checks.append(_gate_up_check("affine", 4, 64, activation))
    for mode in ("affine", *FP_MODES):
        bits, group_size = (4, 64) if mode == "affine" else (FP_MODES[mode]["bits"], FP_MODES[mode]["group_size"])
        checks.append(_down_check(mode, bits, group_size, combine=False))
    checks.append(_gate_up_check("affine", 4, 64, "swiglu_oai", bias=True))
    checks.append(_down_check("affine", 4, 64, combine=False, bias=True))
    return checks


# ---------------------------------------------------------------- router, dense ops, attention


def _route_check(gate_form: str) -> Check:
    def run(stream):
        x = _x(5, (T, D))
        w = (mx.random.normal((E, D), key=mx.random.key(6)) * D**-0.5)
        bias = mx.random.normal((E,), key=mx.random.key(7)) * 0.05
        if gate_form == "q8":
            wq, s, b = mx.quantize(w.astype(DTYPE), group_size=64, bits=8)
            gate = nn.QuantizedLinear(D, E, bias=False, group_size=64, bits=8)
            gate.weight, gate.scales, gate.biases = wq, s, b
            w_deq = mx.dequantize(wq, _f32(s), _f32(b), group_size=64, bits=8)
        else:
            gate = w_deq = w.astype(getattr(mx, gate_form))
        w64 = _np(w_deq)
        # mlx-lm's MiniMax router: float32 logits.
        stock_logits = mx.matmul(x.astype(mx.float32), w_deq.astype(mx.float32).T, stream=stream)
        _, weights = FUSED["route"](x, gate, bias, K, stream=stream)
        # Compare the renormalised weights of the experts each picks, in
        # the reference's expert order (the set equals stock's off near-ties).
        logits = _np(x) @ w64.T
        scores = 1 / (1 + np.exp(-logits))
        order = np.argsort(-(scores + np.asarray(bias, dtype=np.float64)), axis=1, kind="stable")[:, :K]
        picked = np.take_along_axis(scores, order, 1)
        ref = picked / (picked.sum(1, keepdims=True) + 1e-20)
        s = mx.sigmoid(stock_logits.astype(mx.float32))
        stock_picked = mx.take_along_axis(s, mx.array(order.astype(np.uint32)), axis=1)
        stock = stock_picked / (stock_picked.sum(axis=1, keepdims=True) + 1e-20)
        return weights, stock, ref

    return Check("route", f"route gate {gate_form}", run)


def _linear_check(bits: int) -> Check:
    def run(stream):
        x = _x(8, (T, D))
        w = mx.random.normal((64, D), key=mx.random.key(9)).astype(DTYPE) * D**-0.5
        wq, s, b = mx.quantize(w, group_size=64, bits=bits)
        fused = FUSED["quantized_matmul"](x, wq, s, b, bits, 64, stream=stream)
        stock = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits, stream=stream)
        ref = _np(x) @ np.asarray(mx.dequantize(wq, _f32(s), _f32(b), group_size=64, bits=bits),
                                  dtype=np.float64).T
        return fused, stock, ref

    return Check("quantized_matmul", f"quantized_matmul b{bits} gs64", run)


def _embedding_check() -> Check:
    def run(stream):
        w = mx.random.normal((50, D), key=mx.random.key(10)).astype(DTYPE)
        wq, s, b = mx.quantize(w, group_size=64, bits=8)
        ids = mx.array([[3, 0, 49, 7]])
        fused = FUSED["quantized_embedding"](ids, wq, s, b, 8, 64, stream=stream)
        # Stock: the bf16 table nn.QuantizedEmbedding gathers; the reference
        # dequantizes in float32.
        table = mx.dequantize(wq, s, b, group_size=64, bits=8)
        exact = mx.dequantize(wq, _f32(s), _f32(b), group_size=64, bits=8)
        return fused, table[ids], _np(exact)[np.asarray(ids)]

    return Check("quantized_embedding", "quantized_embedding b8 gs64", run)


def _attention_check(L: int) -> Check:
    def run(stream):
        Hq, Hkv, S, Dh = 8, 2, 40, 64
        q = _x(11, (1, Hq, L, Dh))
        k, v = _x(12, (1, Hkv, S, Dh)), _x(13, (1, Hkv, S, Dh))
        mask = "causal" if L > 1 else None
        scale = Dh**-0.5
        fused = FUSED["scaled_dot_product_attention"](q, k, v, scale=scale, mask=mask, stream=stream)
        stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
        q64, k64, v64 = (np.repeat(_np(a), Hq // a.shape[1], axis=1) for a in (q, k, v))
        s = np.einsum("bhld,bhsd->bhls", q64, k64) * scale
        if mask:
            s = np.where(np.arange(S)[None, :] <= np.arange(L)[:, None] + S - L, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("bhls,bhsd->bhld", p / p.sum(-1, keepdims=True), v64)
        return fused, stock, ref

    return Check("attention", f"scaled_dot_product_attention L={L}", run)


def _norm_rope_check() -> Check:
    def run(stream):
        heads, Dh, L = 4, 64, 6
        x = _x(14, (1, L, heads * Dh))
        weight = (1 + 0.1 * mx.random.normal((heads * Dh,), key=mx.random.key(15))).astype(DTYPE)
        kw = dict(heads=heads, eps=1e-6, rotary_dim=32, base=10000.0, offset=3)
        fused = FUSED["norm_rope"](x, weight, **kw, stream=stream)
        normed = mx.fast.rms_norm(x, weight, 1e-6, stream=stream)
        stock = mx.fast.rope(normed.reshape(1, L, heads, Dh).transpose(0, 2, 1, 3), 32, traditional=False,
                             base=10000.0, scale=1.0, offset=3, stream=stream)
        x64 = _np(x)
        n = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * _np(weight)
        n = n.reshape(1, L, heads, Dh).transpose(0, 2, 1, 3)
        pos = np.arange(3, 3 + L)[:, None] * 10000.0 ** (-np.arange(16) / 16)
        cos, sin = np.cos(pos), np.sin(pos)
        a, b = n[..., :16], n[..., 16:32]
        ref = np.concatenate([a * cos - b * sin, a * sin + b * cos, n[..., 32:]], axis=-1)
        return fused, stock, ref

    return Check("norm_rope", "norm_rope", run)


def checks(device: mx.Device) -> list[Check]:
    """Every row for this device: the expert ops and the router everywhere;
    the dense ops and attention where fused_moe's own kernels run them (the
    CPU; on a GPU they are MLX's own ops)."""
    out = expert_checks() + [_route_check(f) for f in ("float32", "bfloat16", "q8")]
    if device.type == mx.DeviceType.cpu:
        out += [_linear_check(b) for b in SUPPORTED_LINEAR_BITS] + [_embedding_check()]
        out += [_attention_check(1), _attention_check(7), _norm_rope_check()]
    assert SUPPORTED_ROUTER_BITS == (8,), "the router rows cover 8-bit gates"
    return out
