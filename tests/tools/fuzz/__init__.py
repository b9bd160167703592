"""A differential fuzzer for the ops: seeded random cases on every backend
present, against the fp64 reference under the tolerance rule.

Each case is drawn from one integer seed (`draw(seed)`), so a failure
reproduces with ``python -m tests.tools.fuzz --case SEED`` (plus the FUSED_MOE_ISA
it ran under). The ops and what each case checks:

* ``gate_up_swiglu`` and ``down_combine``: shapes up to D, H = 3072, E = 300,
  k = 16, T = 600 (large ones rarely, and only where the case stays cheap);
  bits and group size from the grid, gate/up and down apart; every dtype;
  contiguous or strided x and h; uint32 or int32 ids; duplicate experts in a
  token, every token on one expert, unused experts, ids at 0 and E-1; some
  experts with all-zero scales; magnitudes scaled near the dtype's limit,
  subnormal and all-zero tokens. Checked against the fp64 reference from the
  same quantized weights (tolerance.py); on the CPU also bit-identical at one
  and several threads.
* Half the MoE cases go beyond what the Metal kernels cover (CPU only until
  they do): ``_ext.gate_up`` and ``down_combine``/``down_slots`` with any
  mode of the grid (affine 2-8 bits, mxfp4, mxfp8, nvfp4 with or without
  global scales) on each projection, any activation of the zoo (limits
  that clamp), expert biases, x per slot, down per slot; against the fp64
  reference from mx.dequantize and mlx-lm's own modules as stock, with the
  same thread, NaN/Inf and bad-id checks.
* NaN/Inf in a few tokens: every other token is bit-identical to a run
  without them (they stay in their own tokens).
* ids just outside [0, E) (or negative int32): the CPU raises naming the
  entry; the Metal kernels give NaN in exactly the affected rows, with the
  emulator's guard pages checking that nothing is read out of bounds.
* ``route``: E 1..300, k 1..min(E, 16), every x dtype and gate form, exact
  ties (duplicated gate rows), NaN scores and NaN bias entries, under the
  router's own semantics (docs/api.md, "The router").
* ``pack_experts``/``unpack_experts``: bit-exact round trip.
* ``scaled_dot_product_attention``: B up to 3, KV heads up to 8 with groups
  up to 12 query heads, L up to 16 (mostly 1, decode; now and then up to
  40, several tiles of rows), S up to 2000 (now and then up to 9000, many
  key chunks), head sizes 16..256, every dtype, causal or not; keys and
  values contiguous, a slice of a longer cache buffer, transposed (last
  axis strided) or broadcast over the batch; scores spread wide (peaked
  softmax) or all equal. Half the cases read a quantized cache instead
  (``quantized_scaled_dot_product_attention``, mlx-lm's QuantizedKVCache:
  4 or 8 bits at a group size dividing the head, the same layouts applied
  to codes, scales and biases). Against the fp64 reference (from the
  dequantized arrays) with mx.fast's attention, or mlx-lm's quantized one,
  as stock; on the CPU bit-identical at one and several threads (the keys
  split across threads or not); a NaN in one query row stays in that row.
  Stream backends only (no fused_moe Metal kernel).
* ``norm_rope``: up to 64 heads of 16..256, rotary dims, with or without the
  norm weight, traditional or not, offsets up to 10^6, every dtype.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

import fused_moe as fm  # noqa: E402
from fused_moe import _ext  # noqa: E402
from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # noqa: E402

from support.moe_reference import (  # noqa: E402
    ACTIVATION_PARAMS,
    ALL_QUANTS,
    Experts,
    Quant,
    gated,
    raw_down,
    raw_gate_up,
    reference_down,
    reference_gate_up,
    stock_down,
    stock_gate_up,
    stock_h,
    stock_y,
)
from support.router_reference import GATE_FORMS, MIN_SELECTION_GAP, gate_weight64, make_gate  # noqa: E402
from support.tolerance import assert_within_tolerance  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Multiply-adds a case may cost the fp64 reference and the stock path (the
# CPU has two cores); the emulator runs scalar code, so it gets less.
MAX_WORK = 1e7
MAX_EMULATOR_WORK = 4e6
ROUTINGS = ("random", "duplicates", "one_expert", "few_experts", "edges")
VALUES = ("normal", "large", "tiny_tokens", "zero_tokens")


class _Case:
    def describe(self) -> str:
        """The case as one line of JSON, as failures print it."""
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass
class MoeCase(_Case):
    seed: int
    T: int
    E: int
    k: int
    D: int
    H: int
    bits: int
    group_size: int
    down_bits: int
    down_group_size: int
    dtype: str
    index_dtype: str
    routing: str
    values: str
    strided_x: bool
    strided_h: bool
    zero_scale_experts: list
    nonfinite_tokens: list  # [(token, "nan" | "inf")]
    bad_ids: list  # [(token, slot, id)]
    # The settings beyond the Metal kernels' (extended(): CPU only for now).
    mode: str = "affine"
    down_mode: str = "affine"
    global_scale: bool = False  # nvfp4 gate/up with per-expert tensor scales
    down_global_scale: bool = False
    activation: str = "swiglu"
    bias: bool = False
    x_per_slot: bool = False
    down_slots: bool = False

    def extended(self) -> bool:
        return (self.mode, self.down_mode, self.activation) != ("affine", "affine", "swiglu") or \
            self.bias or self.x_per_slot or self.down_slots

    def quant(self) -> Quant:
        return Quant(self.mode, self.bits, self.group_size, self.global_scale)

    def down_quant(self) -> Quant:
        return Quant(self.down_mode, self.down_bits, self.down_group_size, self.down_global_scale)


@dataclass
class RouteCase(_Case):
    seed: int
    T: int
    E: int
    k: int
    D: int
    dtype: str
    gate: str
    group_size: int
    ties: bool
    nan_tokens: list
    nan_bias: list


@dataclass
class AttentionCase(_Case):
    seed: int
    B: int
    Hkv: int
    group: int
    L: int
    S: int
    Dh: int
    dtype: str
    causal: bool
    layout: str  # contiguous | cache_slice | transposed | broadcast
    values: str  # normal | wide | equal
    nan_query: bool
    kv_bits: int = 0  # 0: a float cache; 4 or 8: quantized (QuantizedKVCache)
    kv_group_size: int = 0


@dataclass
class NormRopeCase(_Case):
    seed: int
    B: int
    L: int
    heads: int
    Dh: int
    rotary_dim: int
    with_weight: bool
    traditional: bool
    offset: int
    dtype: str


def _dim(rng, limit: int, multiple: int) -> int:
    """A width, a multiple of `multiple`: mostly small, now and then up to `limit`."""
    if rng.random() < 0.08:
        top = limit
    else:
        top = 512
    return multiple * int(rng.integers(1, top // multiple + 1))


def draw(seed: int):
    """The case of `seed`: one in five is a router case, about one in seven
    an attention case, one in ten a norm + RoPE case."""
    rng = np.random.default_rng(seed)
    u = rng.random()
    if u < 0.2:
        return _draw_route(seed, rng)
    if u < 0.35:
        return _draw_attention(seed, rng)
    if u < 0.45:
        return _draw_norm_rope(seed, rng)
    return _draw_moe(seed, rng)


def _draw_attention(seed, rng) -> AttentionCase:
    L = 1 if rng.random() < 0.6 else int(rng.integers(2, 17))
    S = int(rng.integers(1, 2001)) if rng.random() < 0.7 else int(rng.integers(1, 100))
    causal = bool(rng.random() < 0.5) and L <= S
    if L > S:
        S = L
    case = AttentionCase(
        seed, int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 13)), L, S,
        16 * int(rng.integers(1, 17)), str(rng.choice(list(DTYPES))), causal,
        str(rng.choice(["contiguous", "cache_slice", "transposed", "broadcast"])),
        str(rng.choice(["normal", "wide", "equal"])), bool(rng.random() < 0.15))
    # Drawn after the fields above, so older seeds keep those.
    u = rng.random()
    if u < 0.1:  # a long cache: many key chunks
        case.S = max(case.S, int(rng.integers(2000, 9001)))
        # At most about 2e8 multiply-adds for the fp64 reference.
        case.B, case.L, case.group, case.Dh = 1, min(case.L, 4), min(case.group, 6), min(case.Dh, 128)
    elif u < 0.2 and case.L > 1:  # a longer prompt: several tiles of rows
        case.L = int(rng.integers(17, 41))
        case.S = max(case.S, case.L)
    sizes = [g for g in (32, 64, 128) if case.Dh % g == 0]
    if rng.random() < 0.5 and sizes:
        case.kv_bits = int(rng.choice([4, 8]))
        case.kv_group_size = int(rng.choice(sizes))
    return case


def _draw_norm_rope(seed, rng) -> NormRopeCase:
    Dh = 16 * int(rng.integers(1, 17))
    return NormRopeCase(
        seed, int(rng.integers(1, 4)), int(rng.integers(1, 33)), int(rng.integers(1, 65)), Dh,
        2 * int(rng.integers(1, Dh // 2 + 1)), bool(rng.random() < 0.8), bool(rng.random() < 0.3),
        int(rng.choice([0, int(rng.integers(0, 5000)), int(rng.integers(0, 10**6))])),
        str(rng.choice(list(DTYPES))))


def _draw_moe(seed, rng) -> MoeCase:
    bits, down_bits = (int(rng.choice(fm.SUPPORTED_BITS)) for _ in range(2))
    gs, dgs = (int(rng.choice(fm.SUPPORTED_GROUP_SIZES)) for _ in range(2))
    D, H = _dim(rng, 3072, gs), _dim(rng, 3072, dgs)
    E = int(rng.choice([rng.integers(1, 9), rng.integers(1, 301)]))
    k = int(rng.integers(1, 17))
    T = int(rng.choice([rng.integers(1, 9), rng.integers(1, 601)]))
    # Shrink what costs most until the case is cheap: T first, then E, then widths.
    while T * k * D * H * 3 > MAX_WORK and T > 1:
        T = max(1, T // 2)
    while E * D * H * 3 > MAX_WORK * 2 and E > 1:
        E = max(1, E // 2)
    while T * k * D * H * 3 > MAX_WORK or E * D * H * 3 > MAX_WORK * 2:
        if D >= H and D > gs:
            D = max(gs, (D // 2) // gs * gs)
        elif H > dgs:
            H = max(dgs, (H // 2) // dgs * dgs)
        else:
            break
    dtype = str(rng.choice(list(DTYPES)))
    values = str(rng.choice(VALUES, p=[0.55, 0.15, 0.15, 0.15]))
    nonfinite = []
    if rng.random() < 0.2 and T > 1:
        for t in rng.choice(T, size=min(T - 1, int(rng.integers(1, 3))), replace=False):
            nonfinite.append((int(t), str(rng.choice(["nan", "inf", "-inf"]))))
    bad = []
    index_dtype = str(rng.choice(["uint32", "int32"]))
    if rng.random() < 0.15:
        for _ in range(int(rng.integers(1, 3))):
            t, j = int(rng.integers(0, T)), int(rng.integers(0, k))
            choices = [E, E + 1, 2**31 - 1] + ([-1] if index_dtype == "int32" else [2**32 - 1])
            bad.append((t, j, int(rng.choice(choices))))
    zero_scales = sorted({int(e) for e in rng.integers(0, E, size=int(rng.integers(0, 3)))}) if rng.random() < 0.3 else []
    case = MoeCase(
        seed, T, E, k, D, H, bits, gs, down_bits, dgs, dtype, index_dtype,
        str(rng.choice(ROUTINGS)), values, bool(rng.random() < 0.4), bool(rng.random() < 0.3),
        zero_scales, nonfinite, bad,
    )
    if rng.random() < 0.5:
        _extend(case, rng)
    return case


def _extend(c: MoeCase, rng) -> None:
    """Any setting of the grid on each projection, and the options of the
    new ops; widths rounded to the new group sizes."""
    q, dq = (ALL_QUANTS[int(rng.integers(len(ALL_QUANTS)))] for _ in range(2))
    c.mode, c.bits, c.group_size, c.global_scale = q.mode, q.bits, q.group_size, q.global_scale
    c.down_mode, c.down_bits, c.down_group_size, c.down_global_scale = dq.mode, dq.bits, dq.group_size, dq.global_scale
    g, dg = max(32, q.group_size), max(32, dq.group_size)
    c.D, c.H = max(g, c.D // g * g), max(dg, c.H // dg * dg)
    c.activation = str(rng.choice(list(_ext.SUPPORTED_ACTIVATIONS)))
    c.bias = bool(rng.random() < 0.3)
    c.x_per_slot = bool(rng.random() < 0.25)
    c.down_slots = bool(rng.random() < 0.3)
    c.strided_x = c.strided_x and not c.x_per_slot


def _draw_route(seed, rng) -> RouteCase:
    E = int(rng.choice([rng.integers(1, 17), rng.integers(1, 301)]))
    k = int(rng.integers(1, min(E, fm.MAX_TOP_K) + 1))
    gate = str(rng.choice(GATE_FORMS))
    gs = int(rng.choice(fm.SUPPORTED_GROUP_SIZES))
    D = _dim(rng, 3072, gs if gate == "q8" else 32)
    T = int(rng.choice([rng.integers(1, 9), rng.integers(1, 601)]))
    while T * E * D > MAX_WORK and T > 1:
        T = max(1, T // 2)
    nan_tokens = sorted({int(t) for t in rng.integers(0, T, size=2)}) if rng.random() < 0.2 else []
    nan_bias = sorted({int(e) for e in rng.integers(0, E, size=2)}) if rng.random() < 0.2 else []
    return RouteCase(seed, T, E, k, D, str(rng.choice(list(DTYPES))), gate, gs,
                     bool(rng.random() < 0.4), nan_tokens, nan_bias)


# ---------------------------------------------------------------- MoE cases


def _random_quantized(E, d_in, d_out, bits, group_size, dtype, rng):
    """A QuantizedSwitchLinear with random codes (every bit pattern is a valid
    code) and scales/biases centring each weight group on zero: the grid's
    arrays directly, far cheaper than quantizing random weights."""
    layer = QuantizedSwitchLinear(d_in, d_out, E, bias=False, group_size=group_size, bits=bits)
    groups = (E, d_out, d_in // group_size)
    top = 2**bits - 1
    scales = rng.uniform(0.5, 1.5, size=groups) * 3.4 / np.sqrt(d_in) / top
    layer.weight = mx.array(rng.integers(0, 2**32, size=(E, d_out, d_in * bits // 32), dtype=np.uint32))
    layer.scales = mx.array(scales.astype(np.float32)).astype(dtype)
    layer.biases = mx.array((-scales * top / 2).astype(np.float32)).astype(dtype)
    return layer


def _experts(c: MoeCase) -> Experts:
    dtype = DTYPES[c.dtype]
    rng = np.random.default_rng(c.seed + 3)
    gate = _random_quantized(c.E, c.D, c.H, c.bits, c.group_size, dtype, rng)
    up = _random_quantized(c.E, c.D, c.H, c.bits, c.group_size, dtype, rng)
    down = _random_quantized(c.E, c.H, c.D, c.down_bits, c.down_group_size, dtype, rng)
    if c.zero_scale_experts:
        rows = mx.array(np.isin(np.arange(c.E), c.zero_scale_experts))[:, None, None]
        for layer in (gate, up, down):
            layer.scales = mx.where(rows, mx.zeros_like(layer.scales), layer.scales)
    packed = fm.pack_experts(gate, up, down)
    mx.eval(packed.parameters(), gate.parameters(), up.parameters(), down.parameters())
    return Experts(gate, up, down, packed, dtype)


def _routing(c: MoeCase, rng):
    T, E, k = c.T, c.E, c.k
    if c.routing == "one_expert":
        idx = np.full((T, k), int(rng.integers(0, E)))
    elif c.routing == "few_experts":  # most experts never used
        used = rng.choice(E, size=max(1, min(E, 2)), replace=False)
        idx = rng.choice(used, size=(T, k))
    elif c.routing == "edges":  # the first and the last expert
        idx = rng.choice([0, E - 1], size=(T, k))
    elif c.routing == "duplicates" or k > E:
        idx = rng.integers(0, E, size=(T, k))
        idx[:, -1] = idx[:, 0]
    else:
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    w = rng.random((T, k)) + 0.05
    w /= w.sum(axis=1, keepdims=True)
    return idx.astype(np.int64), w.astype(np.float32)


def _activations(c: MoeCase, rng, ex: Experts, idx, w) -> np.ndarray:
    """x [T, D] in float64, each value exactly representable in the dtype.
    Token 0 always stays normal, so the reference is never all zeros."""
    x = rng.standard_normal((c.T, c.D))
    some = rng.random(c.T) < 0.3
    some[0] = False
    if c.values == "large":
        # Scaled so that h and y come near 1/64 of the dtype's largest value:
        # both grow about as the square of the scale (silu(g)*u, then D*h).
        limit = {"float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38}[c.dtype] / 64
        x64 = _rounded(x, c.dtype)
        h = _reference(ex, x64, idx)
        y = _reference(ex, x64, idx, h, w)
        peak = max(float(np.abs(h).max()), float(np.abs(y).max()), 1e-30)
        x *= np.sqrt(limit / peak) / 2
    elif c.values == "tiny_tokens":  # a few tokens in the subnormal range
        x[some] *= {"float32": 1e-39, "float16": 1e-6, "bfloat16": 1e-39}[c.dtype]
    elif c.values == "zero_tokens":
        x[some] = 0.0
    return _rounded(x, c.dtype)


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.array(mx.array(x.astype(np.float32)).astype(DTYPES[dtype]).astype(mx.float32), dtype=np.float64)


def _dequantized_expert(layer, e: int) -> np.ndarray:
    w = mx.dequantize(layer.weight[e], layer.scales[e].astype(mx.float32), layer.biases[e].astype(mx.float32),
                      layer.group_size, layer.bits)
    return np.array(w, dtype=np.float64)


def _reference(ex: Experts, x64, idx, h_in=None, weights=None):
    """fp64 h [T, k, H] (from x) or y [T, D] (from h_in), one used expert at a
    time, so memory stays at one expert's weights."""
    T, k = idx.shape
    if h_in is None:
        np.seterr(over="ignore")  # exp(-g) of a large negative g: silu is 0 there, as it should be
        H = ex.packed.intermediate_dims
        h = np.zeros((T, k, H))
        for e in np.unique(idx):
            t, j = np.nonzero(idx == e)
            g = x64[t] @ _dequantized_expert(ex.gate, e).T
            u = x64[t] @ _dequantized_expert(ex.up, e).T
            h[t, j] = g / (1.0 + np.exp(-g)) * u
        return h
    y = np.zeros((T, ex.packed.hidden_dims))
    for e in np.unique(idx):
        t, j = np.nonzero(idx == e)
        np.add.at(y, t, (h_in[t, j] @ _dequantized_expert(ex.down, e).T) * weights[t, j][:, None])
    return y


def _strided(a: mx.array) -> mx.array:
    """The same values as a non-contiguous view (rows two apart in memory)."""
    return mx.stack([a, a], axis=-2)[..., 0, :]


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


class Failure(AssertionError):
    pass


def _with_threads(n: int, call):
    before = fm.get_num_threads()
    fm.set_num_threads(n)
    try:
        return call()
    finally:
        fm.set_num_threads(before)


def check_moe(c: MoeCase, backend, ex: Experts) -> None:
    rng = np.random.default_rng(c.seed + 1)
    idx, w = _routing(c, rng)
    x64 = _activations(c, rng, ex, idx, w)
    dtype = DTYPES[c.dtype]
    index_dtype = mx.uint32 if c.index_dtype == "uint32" else mx.int32
    indices = mx.array(idx.astype(np.uint32 if index_dtype == mx.uint32 else np.int32))
    weights = mx.array(w)
    x = mx.array(x64.astype(np.float32)).astype(dtype)
    if c.strided_x:
        x = _strided(x)

    def run(x, indices, threads=None):
        def go():
            h = backend.gate_up_swiglu(x, ex.packed, indices)
            hh = _strided(h) if c.strided_h else h
            y = backend.down_combine(hh, ex.packed, indices, weights)
            mx.eval(h, y)
            return h, y
        return _with_threads(threads, go) if threads else go()

    h, y = run(x, indices)
    # The tolerance rule, on every token, against the fp64 reference.
    h_ref = _reference(ex, x64, idx)
    xs, ids = x.astype(dtype), indices
    assert_within_tolerance(h, stock_h(ex, xs, ids), h_ref, dtype, "gate_up_swiglu")
    h64 = _np(h)
    assert_within_tolerance(y, stock_y(ex, h, ids, weights), _reference(ex, x64, idx, h64, w), dtype, "down_combine")
    zero = np.all(x64 == 0, axis=1)
    if zero.any():
        assert np.all(_np(y)[zero] == 0), "an all-zero token gave a non-zero y"

    if backend.name == "cpu":
        n = max(3, fm.get_num_threads())
        h1, y1 = run(x, indices, threads=1)
        hn, yn = run(x, indices, threads=n)
        for a, b, what in ((h1, hn, "h"), (y1, yn, "y"), (h1, h, "h"), (y1, y, "y")):
            if not np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), equal_nan=True):
                raise Failure(f"{what} differs between 1 and {n} threads")

    if c.nonfinite_tokens:
        bad_x = x64.copy()
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
        for t, v in c.nonfinite_tokens:
            bad_x[t, int(rng.integers(0, c.D))] = value[v]
        xb = mx.array(bad_x.astype(np.float32)).astype(dtype)
        hb, yb = run(_strided(xb) if c.strided_x else xb, indices)
        bad_tokens = sorted({t for t, _ in c.nonfinite_tokens})
        ok = np.setdiff1d(np.arange(c.T), bad_tokens)
        if not (np.array_equal(_np(hb)[ok], _np(h)[ok]) and np.array_equal(_np(yb)[ok], _np(y)[ok])):
            raise Failure(f"NaN/Inf in tokens {bad_tokens} changed other tokens")
        for t, v in c.nonfinite_tokens:
            if np.isfinite(_np(yb)[t]).all():
                raise Failure(f"token {t} with {v} in x gave a finite y")

    if c.bad_ids:
        bad = np.array(indices).astype(np.int64)
        for t, j, v in c.bad_ids:
            bad[t, j] = v
        bad_indices = mx.array(bad.astype(np.uint32 if index_dtype == mx.uint32 else np.int32))
        _check_bad_ids(c, backend, ex, x, bad_indices, weights, h, y)


def _check_bad_ids(c, backend, ex, x, bad_indices, weights, h, y) -> None:
    t, j, v = c.bad_ids[0]
    if backend.name == "cpu":
        for call in (lambda: backend.gate_up_swiglu(x, ex.packed, bad_indices),
                     lambda: backend.down_combine(h, ex.packed, bad_indices, weights)):
            try:
                mx.eval(call())
            except RuntimeError as e:
                if "is out of range for" not in str(e):
                    raise Failure(f"bad id raised an unexpected error: {e}") from e
            else:
                raise Failure(f"indices[{t}, {j}] = {v} did not raise on the CPU")
        return
    hb = backend.gate_up_swiglu(x, ex.packed, bad_indices)
    yb = backend.down_combine(h, ex.packed, bad_indices, weights)
    hb, yb, h0, y0 = _np(hb), _np(yb), _np(h), _np(y)
    pairs = {(t, j) for t, j, _ in c.bad_ids}
    tokens = {t for t, _, _ in c.bad_ids}
    for tt in range(c.T):
        for jj in range(c.k):
            nan = np.isnan(hb[tt, jj]).all()
            if (tt, jj) in pairs and not nan:
                raise Failure(f"h[{tt}, {jj}] of a bad id is not NaN")
            if (tt, jj) not in pairs and not np.array_equal(hb[tt, jj], h0[tt, jj], equal_nan=True):
                raise Failure(f"a bad id changed h[{tt}, {jj}]")
        if tt in tokens and not np.isnan(yb[tt]).all():
            raise Failure(f"y[{tt}] of a token with a bad id is not NaN")
        if tt not in tokens and not np.array_equal(yb[tt], y0[tt], equal_nan=True):
            raise Failure(f"a bad id changed y[{tt}]")


# ---------------------------------------------------------------- every setting


@dataclass
class ExtendedExperts:
    gate: QuantizedSwitchLinear
    up: object  # QuantizedSwitchLinear, or None when not gated
    down: QuantizedSwitchLinear


def _random_projection(E, d_in, d_out, q: Quant, dtype, rng, bias: bool) -> QuantizedSwitchLinear:
    """Random codes and scales in the setting's own format, magnitudes about
    1/sqrt(d_in); the fp modes' codes avoid e4m3's NaN codes."""
    if q.mode == "affine":
        layer = _random_quantized(E, d_in, d_out, q.bits, q.group_size, dtype, rng)
    else:
        layer = QuantizedSwitchLinear(d_in, d_out, E, bias=False, group_size=q.group_size, bits=q.bits, mode=q.mode)
        codes = rng.integers(0, 2**32, size=(E, d_out, d_in * q.bits // 32), dtype=np.uint32)
        if q.mode == "mxfp8":
            codes &= np.uint32(0xBFBFBFBF)  # exponents below 8: |e4m3| <= 1.875
        groups = (E, d_out, d_in // q.group_size)
        # Typical code magnitude: about 2 (fp4) or 1 (fp8 as drawn); scales to 1/sqrt(d_in).
        target = np.log2(1.0 / np.sqrt(d_in) / (2.0 if q.bits == 4 else 1.0))
        if q.mode == "nvfp4" and q.global_scale:  # e4m3 scales near 1, the global scale brings 2^target
            e = 7 + rng.integers(-1, 2, size=groups)
            layer.global_scale = mx.array((2688.0 * 2.0**target * rng.uniform(0.5, 2.0, size=E)).astype(np.float32))
        elif q.mode == "nvfp4":  # e4m3 scales near 2^target (the smallest normal at least)
            e = np.clip(np.round(target + rng.uniform(-1, 1, size=groups)) + 7, 1, 14)
        if q.mode == "nvfp4":
            scales = (e.astype(np.uint32) << 3) | rng.integers(0, 8, size=groups, dtype=np.uint32)
        else:  # e8m0
            scales = np.round(target + 127 + rng.uniform(-1, 1, size=groups))
        layer.weight = mx.array(codes)
        layer.scales = mx.array(scales.astype(np.uint8))
        layer.biases = None
    if bias:
        layer.bias = mx.array(rng.normal(0, 0.3, size=(E, d_out)).astype(np.float32)).astype(dtype)
    return layer


def _extended_experts(c: MoeCase) -> ExtendedExperts:
    dtype = DTYPES[c.dtype]
    rng = np.random.default_rng(c.seed + 3)
    gate = _random_projection(c.E, c.D, c.H, c.quant(), dtype, rng, c.bias)
    up = _random_projection(c.E, c.D, c.H, c.quant(), dtype, rng, c.bias) if gated(c.activation) else None
    down = _random_projection(c.E, c.H, c.D, c.down_quant(), dtype, rng, c.bias)
    if c.zero_scale_experts and c.mode == "affine":
        rows = mx.array(np.isin(np.arange(c.E), c.zero_scale_experts))[:, None, None]
        gate.scales = mx.where(rows, mx.zeros_like(gate.scales), gate.scales)
    mx.eval(gate.parameters(), down.parameters(), *([up.parameters()] if up is not None else []))
    return ExtendedExperts(gate, up, down)


def check_moe_extended(c: MoeCase, backend, ex: ExtendedExperts) -> None:
    """The new ops on the CPU at the case's settings (docs/kernel_contract.md)."""
    rng = np.random.default_rng(c.seed + 1)
    idx, w = _routing(c, rng)
    dtype = DTYPES[c.dtype]
    index_dtype = mx.uint32 if c.index_dtype == "uint32" else mx.int32
    indices = mx.array(idx.astype(np.uint32 if index_dtype == mx.uint32 else np.int32))
    weights = mx.array(w)
    act, params = c.activation, ACTIVATION_PARAMS[c.activation]
    g, d = raw_gate_up(ex.gate, ex.up, c.quant()), raw_down(ex.down, c.down_quant())
    shape = (c.T, c.k, c.D) if c.x_per_slot else (c.T, c.D)
    x64 = rng.standard_normal(shape)
    some = rng.random(c.T) < 0.3
    some[0] = False
    if c.values == "tiny_tokens":
        x64[some] *= {"float32": 1e-39, "float16": 1e-6, "bfloat16": 1e-39}[c.dtype]
    elif c.values == "zero_tokens":
        x64[some] = 0.0
    elif c.values == "large":
        # h and y near 1/64 of the dtype's largest value, or as near as the
        # activation lets them grow (a clamped one stops; an unclamped one
        # grows about as the square of the scale).
        limit = {"float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38}[c.dtype] / 64
        xr = mx.array(x64.astype(np.float32)).astype(dtype)
        hr = reference_gate_up(ex.gate, ex.up, xr, indices, act, params, c.x_per_slot)
        yr = reference_down(ex.down, hr, indices, None if c.down_slots else weights)
        peak = max(float(np.abs(hr).max()), float(np.abs(yr).max()), 1e-30)
        x64 *= np.sqrt(limit / peak) / 2
    x = mx.array(x64.astype(np.float32)).astype(dtype)
    if c.strided_x:
        x = _strided(x)

    def run(x, indices, threads=None):
        def go():
            h = _ext.gate_up(x, *g.args(), indices, g.quant.bits, g.quant.group_size, activation=act,
                             stream=backend.stream, **params, **g.kwargs())
            hh = _strided(h) if c.strided_h else h
            if c.down_slots:
                y = _ext.down_slots(hh, *d.args(), indices, d.quant.bits, d.quant.group_size,
                                    stream=backend.stream, **d.kwargs())
            else:
                y = _ext.down_combine(hh, *d.args(), indices, weights, d.quant.bits, d.quant.group_size,
                                      stream=backend.stream, **d.kwargs())
            mx.eval(h, y)
            return h, y
        return _with_threads(threads, go) if threads else go()

    h, y = run(x, indices)
    wts = None if c.down_slots else weights
    h_ref = reference_gate_up(ex.gate, ex.up, x, indices, act, params, c.x_per_slot)
    assert_within_tolerance(h, stock_gate_up(ex.gate, ex.up, x, indices, act, params, c.x_per_slot), h_ref,
                            dtype, "gate_up")
    assert_within_tolerance(y, stock_down(ex.down, h, indices, wts), reference_down(ex.down, h, indices, wts),
                            dtype, "down_slots" if c.down_slots else "down_combine")

    n = max(3, fm.get_num_threads())
    h1, y1 = run(x, indices, threads=1)
    hn, yn = run(x, indices, threads=n)
    for a, b, what in ((h1, hn, "h"), (y1, yn, "y"), (h1, h, "h"), (y1, y, "y")):
        if not np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), equal_nan=True):
            raise Failure(f"{what} differs between 1 and {n} threads")

    if c.nonfinite_tokens:
        bad_x = np.array(x.astype(mx.float32), dtype=np.float64)
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
        for t, v in c.nonfinite_tokens:
            bad_x[t].reshape(-1)[int(rng.integers(0, bad_x[t].size))] = value[v]
        hb, yb = run(mx.array(bad_x.astype(np.float32)).astype(dtype), indices)
        bad_tokens = sorted({t for t, _ in c.nonfinite_tokens})
        ok = np.setdiff1d(np.arange(c.T), bad_tokens)
        if not (np.array_equal(_np(hb)[ok], _np(h)[ok]) and np.array_equal(_np(yb)[ok], _np(y)[ok])):
            raise Failure(f"NaN/Inf in tokens {bad_tokens} changed other tokens")

    if c.bad_ids:
        bad = np.array(indices).astype(np.int64)
        for t, j, v in c.bad_ids:
            bad[t, j] = v
        bad_indices = mx.array(bad.astype(np.uint32 if index_dtype == mx.uint32 else np.int32))
        t, j, v = c.bad_ids[0]
        for call in (lambda: _ext.gate_up(x, *g.args(), bad_indices, g.quant.bits, g.quant.group_size,
                                          activation=act, stream=backend.stream, **params, **g.kwargs()),
                     lambda: _ext.down_slots(h, *d.args(), bad_indices, d.quant.bits, d.quant.group_size,
                                             stream=backend.stream, **d.kwargs())):
            try:
                mx.eval(call())
            except RuntimeError as e:
                if "is out of range for" not in str(e):
                    raise Failure(f"bad id raised an unexpected error: {e}") from e
            else:
                raise Failure(f"indices[{t}, {j}] = {v} did not raise on the CPU")


def check_packing(ex: Experts) -> None:
    for layer, got in zip((ex.gate, ex.up, ex.down), fm.unpack_experts(ex.packed)):
        for name, a in zip(("weight", "scales", "biases"), got[:3]):
            b = getattr(layer, name)
            if a.dtype != b.dtype or not mx.array_equal(a.reshape(b.shape), b).item():
                raise Failure(f"unpack(pack()) changed {name}")


# ---------------------------------------------------------------- router


def check_route(c: RouteCase, backend) -> None:
    rng = np.random.default_rng(c.seed + 2)
    gate = make_gate(c.E, c.D, c.gate, seed=c.seed, group_size=c.group_size)
    bias = rng.normal(0, 0.05, size=c.E).astype(np.float32)
    twins = []
    if c.ties and c.E > 1:
        # Expert b copies expert a's gate row and bias: their scores tie exactly.
        a, b = sorted(rng.choice(c.E, size=2, replace=False).tolist())
        twins.append((a, b))
        _copy_gate_row(gate, a, b)
        bias[b] = bias[a]
    for e in c.nan_bias:
        bias[e] = np.nan
    x64 = rng.standard_normal((c.T, c.D)) * 2
    for t in c.nan_tokens:
        x64[t, 0] = np.nan
    dtype = DTYPES[c.dtype]
    x = mx.array(x64.astype(np.float32)).astype(dtype)
    bias_mx = mx.array(bias)
    indices, weights = backend.route(x, gate, bias_mx, c.k)
    mx.eval(indices, weights)
    idx = np.array(indices).astype(np.int64)
    w = np.array(weights, dtype=np.float64)
    if idx.shape != (c.T, c.k) or indices.dtype != mx.uint32 or weights.dtype != mx.float32:
        raise Failure(f"route returned {indices.dtype}{idx.shape}, {weights.dtype}")
    if idx.min() < 0 or idx.max() >= c.E:
        raise Failure("route returned an id outside [0, E)")
    # The kernel's own fp32 scores, as MLX computes them (logits in fp32).
    scores = mx.sigmoid(gate(x.astype(mx.float32)))
    biased = np.array(scores + bias_mx, dtype=np.float64)
    s32 = np.array(scores, dtype=np.float64)
    for t in range(c.T):
        row, chosen = biased[t], idx[t]
        if len(set(chosen.tolist())) != c.k:
            raise Failure(f"token {t}: duplicate experts {chosen.tolist()}")
        key = _rank_keys(row)
        order = sorted(range(c.E), key=lambda e: key[e])
        want = order[: c.k]
        # Ranked best first; numbers equal within fp32 summation-order noise may swap.
        tol = MIN_SELECTION_GAP
        for pos, e in enumerate(chosen):
            w_row = row[want[pos]]
            got_row = row[e]
            same = (np.isnan(w_row) and np.isnan(got_row) and e == want[pos]) or (
                not np.isnan(w_row) and not np.isnan(got_row) and abs(w_row - got_row) <= tol)
            if not same:
                raise Failure(f"token {t}: slot {pos} chose expert {e} ({got_row}), expected {want[pos]} ({w_row})")
        for a, b in twins:
            if b in chosen and (a not in chosen or list(chosen).index(a) > list(chosen).index(b)):
                if not np.isnan(row[a]):
                    raise Failure(f"token {t}: tie between {a} and {b} not broken toward the lower index: {chosen}")
    # Weights: the stock chain on the chosen experts, and fp64.
    chosen_scores = np.take_along_axis(s32, idx, 1)
    ok = np.isfinite(chosen_scores).all(axis=1)
    if (~ok).any() and np.isfinite(w[~ok]).all():
        raise Failure("NaN scores gave finite weights")
    if ok.any():
        x_ok = x64[ok]
        g64 = gate_weight64(gate)
        s64 = 1.0 / (1.0 + np.exp(-(np.array(mx.array(x_ok.astype(np.float32)).astype(dtype).astype(mx.float32), dtype=np.float64) @ g64.T)))
        ref_c = np.take_along_axis(s64, idx[ok], 1)
        ref_w = ref_c / (ref_c.sum(axis=1, keepdims=True) + 1e-20)
        stock_c = mx.take_along_axis(scores[mx.array(np.nonzero(ok)[0])], mx.array(idx[ok].astype(np.uint32)), axis=-1)
        stock_w = stock_c / (mx.sum(stock_c, axis=-1, keepdims=True) + 1e-20)
        assert_within_tolerance(w[ok], stock_w, ref_w, mx.float32, "route weights")


def _rank_keys(row: np.ndarray):
    """Sort keys of the router's order: higher score first, NaN last, then lower index."""
    return [((1, 0.0) if np.isnan(v) else (0, -v), e) for e, v in enumerate(row)]


def _copy_gate_row(gate, a: int, b: int) -> None:
    if isinstance(gate, nn.QuantizedLinear):
        for name in ("weight", "scales", "biases"):
            arr = getattr(gate, name)
            arr[b] = arr[a]
            setattr(gate, name, arr)
    else:
        w = gate.weight
        w[b] = w[a]
        gate.weight = w
    mx.eval(gate.parameters())


# ---------------------------------------------------------------- attention


def _attention_reference(q, k, v, scale, causal) -> np.ndarray:
    q, k, v = (_np(a) if isinstance(a, mx.array) else a for a in (q, k, v))
    L, S = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if causal:
        s = np.where(np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _cache_view(a64: np.ndarray, layout: str, dtype, rng) -> mx.array:
    """`a64` [B, H, S, Dh] as the layout a cache may hand over."""
    a = mx.array(a64.astype(np.float32)).astype(dtype)
    if layout == "cache_slice":
        pad = int(rng.integers(1, 300))
        return mx.concatenate([a, mx.zeros(a.shape[:2] + (pad, a.shape[3]), dtype=dtype)], axis=2)[:, :, : a.shape[2]]
    if layout == "transposed":
        return mx.contiguous(a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    if layout == "broadcast":
        return mx.broadcast_to(a[:1], a.shape)
    return a


def _quantized_view(a64: np.ndarray, layout: str, dtype, bits: int, group_size: int, rng):
    """`a64` [B, H, S, Dh] quantized as QuantizedKVCache stores it, (codes,
    scales, biases) each in the layout a cache may hand over, and its fp64
    dequantized values (scale·code + bias in fp32, as the kernel reads them)."""
    parts = mx.quantize(mx.array(a64.astype(np.float32)).astype(dtype), group_size=group_size, bits=bits)
    deq = np.array(mx.dequantize(parts[0], parts[1].astype(mx.float32), parts[2].astype(mx.float32),
                                 group_size, bits), dtype=np.float64)
    views = []
    for p in parts:
        if layout == "cache_slice":
            pad = int(rng.integers(1, 300))
            p = mx.concatenate([p, mx.zeros(p.shape[:2] + (pad, p.shape[3]), dtype=p.dtype)], axis=2)[:, :, : a64.shape[2]]
        elif layout == "transposed":
            p = mx.contiguous(p.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        elif layout == "broadcast":
            p = mx.broadcast_to(p[:1], p.shape)
        views.append(p)
    return tuple(views), deq


def check_attention(c: AttentionCase, backend) -> None:
    rng = np.random.default_rng(c.seed + 3)
    dtype, Hq = DTYPES[c.dtype], c.Hkv * c.group
    spread = {"normal": 1.0, "wide": 6.0, "equal": 0.0}[c.values]
    q64 = rng.standard_normal((c.B, Hq, c.L, c.Dh)) * spread
    k64 = rng.standard_normal((c.B, c.Hkv, c.S, c.Dh))
    v64 = rng.standard_normal((c.B, c.Hkv, c.S, c.Dh))
    if c.layout == "broadcast":  # every batch entry the same
        k64[:], v64[:] = k64[:1], v64[:1]
    q = mx.array(q64.astype(np.float32)).astype(dtype)
    scale, mask = c.Dh ** -0.5, "causal" if c.causal else None
    if c.kv_bits:
        (kq, k_deq), (vq, v_deq) = (_quantized_view(a, c.layout, dtype, c.kv_bits, c.kv_group_size, rng)
                                    for a in (k64, v64))
        run = lambda q: fm.quantized_scaled_dot_product_attention(
            q, kq, vq, scale=scale, mask=mask, bits=c.kv_bits, group_size=c.kv_group_size, stream=backend.stream)
        with mx.stream(backend.stream):
            # mlx-lm scales its queries in place: a copy.
            stock = quantized_scaled_dot_product_attention(
                mx.array(q), kq, vq, scale=scale, mask=mask, group_size=c.kv_group_size, bits=c.kv_bits)
        ref = _attention_reference(q, k_deq, v_deq, scale, c.causal)
    else:
        k, v = _cache_view(k64, c.layout, dtype, rng), _cache_view(v64, c.layout, dtype, rng)
        run = lambda q: backend.attention(q, k, v, scale, mask)
        stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=backend.stream)
        ref = _attention_reference(q, k, v, scale, c.causal)
    out = run(q)
    if out.shape != q.shape or out.dtype != dtype:
        raise Failure(f"attention returned {out.dtype}{tuple(out.shape)}")
    assert_within_tolerance(out, stock, ref, dtype, "quantized attention" if c.kv_bits else "attention")
    if backend.name == "cpu":
        # One thread never splits the keys; three split them where there
        # are few tiles.
        for n in (1, 3):
            other = _with_threads(n, lambda: run(q))
            if not np.array_equal(np.array(other.astype(mx.float32)), np.array(out.astype(mx.float32))):
                raise Failure(f"attention differs between thread counts ({n} and {fm.get_num_threads()})")
    if c.nan_query:
        b, h, l = (int(rng.integers(0, n)) for n in (c.B, Hq, c.L))
        bad = np.array(q.astype(mx.float32))
        bad[b, h, l, 0] = np.nan
        got = np.array(run(mx.array(bad).astype(dtype)).astype(mx.float32))
        want = np.array(out.astype(mx.float32))
        if not np.isnan(got[b, h, l]).all():
            raise Failure("a NaN query row did not give a NaN output row")
        got[b, h, l], want[b, h, l] = 0, 0
        if not np.array_equal(got, want):
            raise Failure("a NaN in one query row changed other rows")


def check_norm_rope(c: NormRopeCase, backend) -> None:
    rng = np.random.default_rng(c.seed + 4)
    dtype, W = DTYPES[c.dtype], c.heads * c.Dh
    x = mx.array((rng.standard_normal((c.B, c.L, W)) * 2).astype(np.float32)).astype(dtype)
    weight = mx.array((1 + 0.3 * rng.standard_normal(W)).astype(np.float32)).astype(dtype) if c.with_weight else None
    kw = dict(rotary_dim=c.rotary_dim, base=float(rng.choice([1e4, 5e6])), traditional=c.traditional,
              scale=1.0, offset=c.offset)
    out = backend.norm_rope(x, weight, heads=c.heads, eps=1e-6, **kw)
    stock = mx.fast.rms_norm(x, weight, 1e-6, stream=backend.stream) if c.with_weight else x
    stock = mx.fast.rope(stock.reshape(c.B, c.L, c.heads, c.Dh).transpose(0, 2, 1, 3), c.rotary_dim,
                         traditional=c.traditional, base=kw["base"], scale=1.0, offset=c.offset,
                         stream=backend.stream)
    x64 = _np(x)
    if c.with_weight:
        x64 = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * _np(weight)
    ref = x64.reshape(c.B, c.L, c.heads, c.Dh).transpose(0, 2, 1, 3).copy()
    half = c.rotary_dim // 2
    angle = (c.offset + np.arange(c.L))[:, None] * kw["base"] ** (-2.0 * np.arange(half) / c.rotary_dim)[None, :]
    lo = np.arange(half) * 2 if c.traditional else np.arange(half)
    hi = lo + 1 if c.traditional else lo + half
    x1, x2 = ref[..., lo].copy(), ref[..., hi].copy()
    ref[..., lo], ref[..., hi] = x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)
    if out.shape != stock.shape or out.dtype != stock.dtype:
        raise Failure(f"norm_rope returned {out.dtype}{tuple(out.shape)}, stock {stock.dtype}{tuple(stock.shape)}")
    assert_within_tolerance(out, stock, ref, dtype, "norm_rope")


# ---------------------------------------------------------------- the loop


def runs_on(case, backend) -> bool:
    """Whether `case` runs on `backend`: the emulator skips the costliest,
    and the attention ops have no kernel of ours there."""
    if isinstance(case, (AttentionCase, NormRopeCase)):
        return hasattr(backend, "attention")
    cost = case.T * case.k * case.D * case.H * 3 if isinstance(case, MoeCase) else 0
    if isinstance(case, MoeCase) and backend.name != "cpu" and not _metal_has(case):
        return False
    return backend.name != "metal_emulator" or cost <= MAX_EMULATOR_WORK


def _metal_has(c: MoeCase) -> bool:
    """Whether the Metal kernels cover the case's settings yet (a GPU stream
    raises for the others); the emulator runs what PackedExperts carries."""
    return not c.extended() and \
        _ext.metal_has_expert_kernel("gate_up", "affine", c.bits, c.group_size) and \
        _ext.metal_has_expert_kernel("down", "affine", c.down_bits, c.down_group_size)


def run_case(seed: int, backends) -> list[str]:
    """Runs case `seed` on every backend; returns the failures, each a line
    with the reproducing command."""
    case = draw(seed)
    failures = []
    ex = None
    if isinstance(case, MoeCase):
        ex = _extended_experts(case) if case.extended() else _experts(case)
    for backend in backends:
        if not runs_on(case, backend):
            continue
        try:
            if isinstance(case, MoeCase) and case.extended():
                check_moe_extended(case, backend, ex)
            elif isinstance(case, MoeCase):
                check_moe(case, backend, ex)
            elif isinstance(case, AttentionCase):
                check_attention(case, backend)
            elif isinstance(case, NormRopeCase):
                check_norm_rope(case, backend)
            else:
                check_route(case, backend)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failures.append(
                f"FAIL on {backend.name} ({fm.cpu_isa()}): {type(e).__name__}: {first}\n"
                f"  case: {case.describe()}\n"
                f"  reproduce: FUSED_MOE_ISA={fm.cpu_isa()} python -m tests.tools.fuzz --case {seed} --backends {backend.name}\n"
                + "".join(traceback.format_exception(e)[-3:])
            )
    if isinstance(case, MoeCase) and not case.extended() and not failures:
        try:
            check_packing(ex)
        except Exception as e:  # noqa: BLE001
            failures.append(f"FAIL pack/unpack: {e}\n  case: {case.describe()}\n  reproduce: python -m tests.tools.fuzz --case {seed}")
    return failures


def run(seed: int, seconds: float, backends, max_cases: int | None = None, log=print) -> dict:
    """Runs cases seed*10**6, seed*10**6 + 1, ... until `seconds` pass (or
    `max_cases`). Returns the counts and failures."""
    start = time.monotonic()
    counts = {b.name: 0 for b in backends}
    counts["route"] = counts["attention"] = counts["norm_rope"] = 0
    failures = []
    i = 0
    while time.monotonic() - start < seconds and (max_cases is None or i < max_cases):
        case_seed = seed * 1_000_000 + i
        case_failures = run_case(case_seed, backends)
        failures += case_failures
        for f in case_failures:
            log(f)
        case = draw(case_seed)
        kind = {RouteCase: "route", AttentionCase: "attention", NormRopeCase: "norm_rope"}.get(type(case))
        if kind:
            counts[kind] += 1
        for b in backends:
            counts[b.name] += runs_on(case, b)
        i += 1
    return {"cases": i, "per_backend": counts, "failures": failures, "seconds": time.monotonic() - start,
            "isa": fm.cpu_isa()}


def backends(names) -> list:
    """The named backends that are present here (cpu, metal, metal_emulator)."""
    from support.backends import EmulatorBackend, StreamBackend, metal_available

    out = []
    for name in names:
        if name == "cpu":
            out.append(StreamBackend("cpu", mx.cpu))
        elif name == "metal" and metal_available():
            out.append(StreamBackend("metal", mx.gpu))
        elif name == "metal_emulator":
            from tools import metal_emulator

            if metal_emulator.compiler_available():
                cache = TESTS.parent / ".pytest_cache" / "d" / "metal_emulator"
                out.append(EmulatorBackend(metal_emulator.Emulator(cache)))
    return out
