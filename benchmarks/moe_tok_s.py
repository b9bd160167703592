"""Routed-expert throughput: fused_moe against mlx-lm's stock SwitchGLU,
and the router: fused_moe.route against mlx-lm's MiniMax router.

Measures one MoE layer's routed experts (default: the MiniMax-M2.5-REAP
shapes D=3072, H=1536, E=154, k=8, 3-bit, group size 64, bfloat16) with
random weights and fresh random routing on every call (k distinct experts
per token, positive weights summing to 1). ``--layers`` distinct layers are
rotated through, one per call, so the weights do not stay in the caches.

For each token count T it times the median of at least ``--repeats`` calls
(``mx.eval`` between ``time.perf_counter`` reads) of the ops below. The
fused and router ops are timed first, in FUSED_ROUNDS passes over the token
counts whose samples are pooled, for at least SAMPLE_MIN_S per op and T; the
stock ops follow, one T at a time:

* stock: ``SwitchGLU(x, indices)`` then ``(y * weights[..., None]).sum(-2)``;
* fused: ``fm.down_combine(fm.gate_up_swiglu(x, ...), ...)`` (A+B);
* the parts on their own: A = ``gate_up_swiglu``, B = ``down_combine``,
  stock A = ``silu(gate_proj) * up_proj``, stock B = ``down_proj`` plus the
  weighted sum (both through the unsorted gather path, whereas SwitchGLU
  sorts the tokens by expert once T*k >= 64);
* the router, per layer a gate ``nn.Linear`` [E, D] in the benchmark dtype
  (bfloat16 by default, as in MiniMax) and a float32 score bias: fused =
  ``fm.route``, stock = mlx-lm's chain (gate on fp32 x, sigmoid, bias,
  argpartition, take_along_axis, renormalisation). Its calls draw only a
  fresh x, and it takes at least ROUTER_MIN_REPEATS samples, being short;
  stock gets at most ROUTER_STOCK_SECONDS of calls per T, and runs at every
  T (no extrapolation).

The stock path is very slow on CPU, so it gets at most STOCK_SECONDS_PER_OP
seconds of calls per op and T (at least one call; a warm-up call longer than
WARMUP_IS_SAMPLE_S counts as a sample), and for T above
``--stock-max-tokens`` it is not run: its times are extrapolated linearly
per token from the largest measured T and marked with ``*``.

Reading a result line:

* ``stock ms`` / ``fused ms``: one layer's routed experts for T tokens;
* ``speedup``: stock ms / fused ms;
* ``tok/s``: T / fused time, i.e. tokens per second through one layer;
* ``GB/s``: the bytes of weights, scales and biases of the distinct experts
  the call selected (all three projections), averaged over the calls, over
  the fused time: how close the fused path gets to memory bandwidth;
* ``%BW``: that bandwidth as a share of the read probe (probes.py);
* ``GFLOP/s``: 2·k·3·D·H flops per token over the fused time, and ``%fp32``
  its share of numpy's fp32 matmul probe;
* ``A``, ``B``, ``stock A``, ``stock B``: the per-op breakdown in ms;
* ``router``, ``stock router``: the router alone in ms.

Probe samples are taken before and after each fused measurement; the end
of the run checks the project's CPU targets against their medians.
``--e2e N`` adds a synthetic full-width MiniMax through mlx-lm's generation
(e2e.py), ``--e2e-profile`` one decode step of it timed piece by piece
(decode_profile.py); ``--json`` and ``--plot`` write the results out.

It only measures and reports; it exits 0 however slow either path is.
"""

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

import fused_moe as fm
from fused_moe import _ext
import decode_profile
import e2e
import linear
from probes import Probes

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# Routed-expert shapes of MiniMax-M2.5-REAP: D, H, E, k.
MINIMAX_M25_REAP = (3072, 1536, 154, 8)

# Most seconds of stock calls per op and token count (at least one call).
STOCK_SECONDS_PER_OP = 20.0
# A warm-up call at least this long is kept as a sample: its one-time costs
# are noise at that length, and repeating it would only cost time.
WARMUP_IS_SAMPLE_S = 1.0
# Fused and router ops run this long before their samples are taken.
WARMUP_MIN_S = 0.3
# ... and are sampled for at least this long per T (and --repeats calls),
# spread over FUSED_ROUNDS passes over the token counts whose samples are
# pooled: samples taken in one stretch can fall entirely inside a slow spell
# of the host, which once took a decode median from 1.8 to 2.9 ms.
SAMPLE_MIN_S = 1.0
FUSED_ROUNDS = 3
# The router takes well under a millisecond at decode: more samples than
# --repeats make its median stable, and its stock path gets a small budget.
ROUTER_MIN_REPEATS = 25
ROUTER_STOCK_SECONDS = 2.0


@dataclass
class Shapes:
    D: int
    H: int
    E: int
    k: int
    bits: int
    group_size: int
    dtype: mx.Dtype
    mode: str = "affine"  # --mode: the fp modes run through fused_moe._ext (RawExperts)


@dataclass
class Router:
    gate: nn.Linear  # [E, D], no bias
    bias: mx.array  # [E] float32 e_score_correction_bias
    k: int


# --mode other than affine ------------------------------------------------
# The Python PackedExperts takes affine projections only for now, so the fp
# modes (mxfp4, mxfp8, nvfp4) are packed here as the kernels read them (gate
# and up rows interleaved, no biases) and run through fused_moe._ext.


class RawExperts:
    def __init__(self, glu: SwitchGLU, s: Shapes):
        def inter(a, b):
            return mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], a.shape[2])

        g, u, d = glu.gate_proj, glu.up_proj, glu.down_proj
        self.arrays = {
            "gate_up": {"weight": inter(g.weight, u.weight), "scales": inter(g.scales, u.scales)},
            "down": {"weight": d.weight, "scales": d.scales},
        }
        self.num_experts, self.s = s.E, s

    def __getitem__(self, proj: str) -> dict:
        return self.arrays[proj]

    def gate_up_swiglu(self, x, indices):
        a, s = self.arrays["gate_up"], self.s
        return _ext.gate_up_swiglu(x, a["weight"], a["scales"], None, indices, s.bits, s.group_size, mode=s.mode)

    def down_combine(self, h, indices, weights):
        a, s = self.arrays["down"], self.s
        return _ext.down_combine(h, a["weight"], a["scales"], None, indices, weights, s.bits, s.group_size,
                                 mode=s.mode)


def random_fp_projection(s: Shapes, proj: QuantizedSwitchLinear, out_dims: int, in_dims: int):
    """Random codes (no NaN codes) and per-group scales near 1/sqrt(in)/4
    (e2m1 and e4m3 values reach 6 and 448)."""
    words = in_dims * s.bits // 32
    codes = mx.random.randint(-(2**31), 2**31 - 1, (s.E, out_dims, words), dtype=mx.int32).view(mx.uint32)
    if s.mode == "mxfp8":
        codes = codes & mx.array(0xBFBFBFBF, dtype=mx.uint32)  # e4m3 exponents below 8: no NaN
    groups = (s.E, out_dims, in_dims // s.group_size)
    if s.mode == "nvfp4":  # e4m3 scales of about 2^-8 .. 2^-6
        scales = mx.random.randint(0x08, 0x18, groups).astype(mx.uint8)
    else:  # e8m0 2^(s-127) of about 2^-9 .. 2^-7 (2^-11 .. 2^-9 for e4m3 codes)
        low = 116 if s.mode == "mxfp8" else 118
        scales = mx.random.randint(low, low + 3, groups).astype(mx.uint8)
    proj.weight, proj.scales, proj.biases = codes, scales, None
    return proj


@dataclass
class Layer:
    packed: fm.PackedExperts
    stock: Optional[SwitchGLU]
    router: Router


@dataclass
class Inputs:
    """One call's inputs, evaluated before the clock starts. A router call
    draws only x."""

    x: mx.array  # [T, D]
    indices: Optional[mx.array] = None  # [T, k] uint32
    weights: Optional[mx.array] = None  # [T, k]
    h: Optional[mx.array] = None  # [T, k, H]: the input of the down projection alone
    distinct_experts: int = 0


@dataclass
class Timing:
    ms: float
    extrapolated: bool = False


# ----------------------------------------------------------------- setup


def pick_device() -> str:
    """Sets the device to run on; returns how it was chosen."""
    device = mx.default_device()
    if device.type == mx.gpu and mx.metal.is_available():
        return "gpu (Metal)"
    if device.type == mx.gpu:
        mx.set_default_device(mx.cpu)
        return "cpu (MLX's default is a CUDA GPU, where fused_moe has no kernels)"
    return "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_projection(s: Shapes, out_dims: int, in_dims: int) -> QuantizedSwitchLinear:
    """A stock quantized projection [E, out, in] with random codes, and scales
    and biases spanning about +-1/sqrt(in) like mlx-lm's initialization."""
    proj = QuantizedSwitchLinear(
        in_dims, out_dims, 1, bias=False, group_size=s.group_size, bits=s.bits, mode=s.mode
    )
    if s.mode != "affine":
        return random_fp_projection(s, proj, out_dims, in_dims)
    words = in_dims * s.bits // 32
    codes = mx.random.randint(-(2**31), 2**31 - 1, (s.E, out_dims, words), dtype=mx.int32)
    levels = 2**s.bits - 1
    step = 2 * in_dims**-0.5 / levels
    scales = mx.random.uniform(0.5, 1.5, (s.E, out_dims, in_dims // s.group_size)) * step
    proj.weight = codes.view(mx.uint32)
    proj.scales = scales.astype(s.dtype)
    proj.biases = (-scales * levels / 2).astype(s.dtype)
    return proj


def random_layer(s: Shapes, with_stock: bool) -> Layer:
    # SwitchGLU's float weights are lazy and replaced before they are evaluated.
    glu = SwitchGLU(s.D, s.H, s.E)
    glu.gate_proj = random_projection(s, s.H, s.D)
    glu.up_proj = random_projection(s, s.H, s.D)
    glu.down_proj = random_projection(s, s.D, s.H)
    mx.eval(glu.parameters())
    packed = fm.pack_experts(glu) if s.mode == "affine" else RawExperts(glu, s)
    mx.eval(packed.parameters() if s.mode == "affine" else packed.arrays)
    gate = nn.Linear(s.D, s.E, bias=False)
    gate.set_dtype(s.dtype)
    router = Router(gate, 0.1 * mx.random.normal((s.E,)), s.k)
    mx.eval(router.gate.parameters(), router.bias)
    return Layer(packed, glu if with_stock else None, router)


def bytes_per_expert(layer: Layer) -> int:
    arrays = [a for proj in ("gate_up", "down") for a in layer.packed[proj].values()]
    return sum(a.nbytes for a in arrays) // layer.packed.num_experts


def random_inputs(s: Shapes, T: int, router_only: bool = False) -> Inputs:
    if router_only:
        x = mx.random.normal((T, s.D)).astype(s.dtype)
        mx.eval(x)
        return Inputs(x)
    scores = mx.random.uniform(shape=(T, s.E))
    indices = mx.argpartition(scores, kth=s.E - s.k, axis=-1)[:, s.E - s.k :]
    indices = indices.astype(mx.uint32)
    weights = mx.random.uniform(0.05, 1.0, (T, s.k))
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(s.dtype)
    x = mx.random.normal((T, s.D)).astype(s.dtype)
    h = (0.1 * mx.random.normal((T, s.k, s.H))).astype(s.dtype)
    mx.eval(x, indices, weights, h)
    distinct = len(set(indices.reshape(-1).tolist()))
    return Inputs(x, indices, weights, h, distinct)


# ------------------------------------------------------------------- ops

Op = Callable[[Layer, Inputs], mx.array]


def fused_a(layer: Layer, inp: Inputs) -> mx.array:
    if isinstance(layer.packed, RawExperts):
        return layer.packed.gate_up_swiglu(inp.x, inp.indices)
    return fm.gate_up_swiglu(inp.x, layer.packed, inp.indices)


def fused_b(layer: Layer, inp: Inputs) -> mx.array:
    if isinstance(layer.packed, RawExperts):
        return layer.packed.down_combine(inp.h, inp.indices, inp.weights)
    return fm.down_combine(inp.h, layer.packed, inp.indices, inp.weights)


def fused_ab(layer: Layer, inp: Inputs) -> mx.array:
    return fused_b(layer, dataclasses.replace(inp, h=fused_a(layer, inp)))


def weighted_sum(y: mx.array, weights: mx.array) -> mx.array:
    return (y * weights[..., None]).sum(axis=-2)


def stock_a(layer: Layer, inp: Inputs) -> mx.array:
    glu = layer.stock
    x = mx.expand_dims(inp.x, (-2, -3))
    up = glu.up_proj(x, inp.indices)
    gate = glu.gate_proj(x, inp.indices)
    return glu.activation(up, gate).squeeze(-2)


def stock_b(layer: Layer, inp: Inputs) -> mx.array:
    y = layer.stock.down_proj(mx.expand_dims(inp.h, -2), inp.indices)
    return weighted_sum(y.squeeze(-2), inp.weights)


def stock_ab(layer: Layer, inp: Inputs) -> mx.array:
    return weighted_sum(layer.stock(inp.x, inp.indices), inp.weights)


def fused_router(layer: Layer, inp: Inputs) -> tuple[mx.array, mx.array]:
    r = layer.router
    return fm.route(inp.x, r.gate, r.bias, r.k)


def stock_router(layer: Layer, inp: Inputs) -> tuple[mx.array, mx.array]:
    """mlx-lm's MiniMaxSparseMoeBlock routing, op for op."""
    r, k = layer.router, layer.router.k
    scores = mx.sigmoid(r.gate(inp.x.astype(mx.float32)))
    orig_scores = scores
    scores = scores + r.bias
    inds = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(orig_scores, inds, axis=-1)
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return inds, scores.astype(inp.x.dtype)


ROUTER_OPS = (fused_router, stock_router)


# ---------------------------------------------------------------- timing


class Bench:
    """Runs ops on fresh inputs, one layer per call, round robin."""

    def __init__(self, shapes: Shapes, layers: list[Layer]):
        self.shapes = shapes
        self.layers = itertools.cycle(layers)
        self.expert_bytes = bytes_per_expert(layers[0])

    def call(self, op: Op, T: int) -> tuple[float, int]:
        """One timed call: (seconds, bytes of the distinct experts selected)."""
        inp = random_inputs(self.shapes, T, router_only=op in ROUTER_OPS)
        layer = next(self.layers)
        start = time.perf_counter()
        mx.eval(op(layer, inp))
        return time.perf_counter() - start, inp.distinct_experts * self.expert_bytes

    def samples(self, op: Op, T: int, repeats: int, min_s: float) -> list[tuple[float, int]]:
        """Timed calls of a fast op: at least `repeats` of them, for at least
        `min_s`, after warming up for WARMUP_MIN_S (a core that idled
        through the probe's pause runs the first calls slowly)."""
        warm_until = time.perf_counter() + WARMUP_MIN_S
        self.call(op, T)
        while time.perf_counter() < warm_until:
            self.call(op, T)
        samples = []
        sample_until = time.perf_counter() + min_s
        while len(samples) < repeats or time.perf_counter() < sample_until:
            samples.append(self.call(op, T))
        return samples

    def median_s(self, op: Op, T: int, repeats: int, budget_s: float) -> tuple[float, float]:
        """(median seconds, mean bytes touched) of a slow op (the stock path)
        over at most `repeats` calls after a warm-up call: calls stop once the
        next one would exceed `budget_s`, and a warm-up of WARMUP_IS_SAMPLE_S
        or more counts as a sample."""
        warmup = self.call(op, T)
        samples = [warmup] if warmup[0] >= WARMUP_IS_SAMPLE_S else []
        spent = warmup[0]
        while len(samples) < repeats and not (samples and spent + warmup[0] > budget_s):
            samples.append(self.call(op, T))
            spent += samples[-1][0]
        return median(samples)


def median(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """(median seconds, mean bytes touched) of timed calls."""
    return statistics.median(s for s, _ in samples), statistics.fmean(b for _, b in samples)


@dataclass
class Row:
    T: int
    fused: float  # ms
    a: float
    b: float
    gb_s: float  # distinct expert bytes / fused time
    gflop_s: float  # 2·k·3·D·H flops per token / fused time
    probe_gb_s: float = 0.0  # the read-bandwidth probe's median, fused passes
    probe_gflop_s: float = 0.0  # the fp32 matmul probe's median, fused passes
    stock: Optional[Timing] = None
    stock_a: Optional[Timing] = None
    stock_b: Optional[Timing] = None
    router: Optional[float] = None
    stock_router: Optional[Timing] = None


FUSED_OPS = (fused_ab, fused_a, fused_b, fused_router)


def measure_fused(bench: Bench, probes: Probes, tokens: list[int], repeats: int) -> dict[int, Row]:
    """The fused ops at every T, in FUSED_ROUNDS passes over the token counts
    with a probe sample before each T; each op's samples are pooled over the
    passes. Between them the passes take --repeats calls (the router at least
    ROUTER_MIN_REPEATS) and SAMPLE_MIN_S of each op at each T."""
    pooled = {(T, op): [] for T in tokens for op in FUSED_OPS}
    for _ in range(FUSED_ROUNDS):
        for T in tokens:
            probes.sample()
            for op in FUSED_OPS:
                n = max(repeats, ROUTER_MIN_REPEATS) if op is fused_router else repeats
                pooled[T, op] += bench.samples(
                    op, T, -(-n // FUSED_ROUNDS), SAMPLE_MIN_S / FUSED_ROUNDS
                )
    probes.sample()
    s = bench.shapes
    rows = {}
    for T in tokens:
        fused_s, touched = median(pooled[T, fused_ab])
        a_s, b_s, router_s = (median(pooled[T, op])[0] for op in FUSED_OPS[1:])
        flops = 2 * s.k * 3 * s.D * s.H * T
        rows[T] = Row(T, 1e3 * fused_s, 1e3 * a_s, 1e3 * b_s, touched / fused_s / 1e9,
                      flops / fused_s / 1e9, router=1e3 * router_s)
    return rows


def measure_stock_router(bench: Bench, row: Row, repeats: int) -> None:
    seconds, _ = bench.median_s(
        stock_router, row.T, max(repeats, ROUTER_MIN_REPEATS), ROUTER_STOCK_SECONDS
    )
    row.stock_router = Timing(1e3 * seconds)


def measure_stock(bench: Bench, row: Row, repeats: int) -> None:
    def ms(op: Op) -> Timing:
        return Timing(1e3 * bench.median_s(op, row.T, repeats, STOCK_SECONDS_PER_OP)[0])

    row.stock, row.stock_a, row.stock_b = ms(stock_ab), ms(stock_a), ms(stock_b)


def extrapolate_stock(row: Row, ref: Row) -> None:
    """Stock times for row.T scaled linearly per token from `ref`."""

    def scale(t: Timing) -> Timing:
        return Timing(t.ms * row.T / ref.T, extrapolated=True)

    row.stock, row.stock_a, row.stock_b = scale(ref.stock), scale(ref.stock_a), scale(ref.stock_b)


# ---------------------------------------------------------------- output

COLUMNS = (
    f"{'tokens':>6}  {'stock ms':>10}  {'fused ms':>9}  {'speedup':>8}  "
    f"{'tok/s':>9}  {'GB/s':>6}  {'%BW':>5}  {'GFLOP/s':>7}  {'%fp32':>5}  |  "
    f"{'A ms':>8}  {'B ms':>8}  "
    f"{'stock A ms':>10}  {'stock B ms':>10}  |  {'router ms':>9}  {'stock router ms':>15}"
)


def fmt_stock(t: Optional[Timing], width: int) -> str:
    if t is None:
        return f"{'-':>{width}}"
    return f"{t.ms:>{width - 1}.1f}{'*' if t.extrapolated else ' '}"


def fmt_router(t: Optional[Timing], width: int) -> str:
    return f"{'-':>{width}}" if t is None else f"{t.ms:>{width}.3f}"



def format_row(r: Row) -> str:
    speedup = f"{r.stock.ms / r.fused:>7.1f}x" if r.stock else f"{'-':>8}"
    return (
        f"{r.T:>6}  {fmt_stock(r.stock, 10)}  {r.fused:>9.2f}  {speedup}  "
        f"{r.T / r.fused * 1e3:>9.1f}  {r.gb_s:>6.2f}  {100 * r.gb_s / r.probe_gb_s:>5.1f}  "
        f"{r.gflop_s:>7.1f}  {100 * r.gflop_s / r.probe_gflop_s:>5.1f}  |  {r.a:>8.2f}  {r.b:>8.2f}  "
        f"{fmt_stock(r.stock_a, 10)}  {fmt_stock(r.stock_b, 10)}  |  "
        f"{r.router:>9.3f}  {fmt_router(r.stock_router, 15)}"
    ).rstrip()


def header(args, s: Shapes, device: str, layer_gb: float, expert_mb: float) -> list[str]:
    return [
        "fused_moe routed-expert benchmark (one MoE layer, random weights and routing)",
        f"device:    {device}",
        f"cpu:       {cpu_model()} ({os.cpu_count()} logical CPUs), "
        f"fused_moe ISA {fm.cpu_isa()}, {fm.get_num_threads()} threads",
        f"versions:  mlx {mx.__version__}, fused_moe {fm.__version__}",
        f"shapes:    D={s.D} H={s.H} E={s.E} k={s.k}, {s.mode} {s.bits}-bit, group size "
        f"{s.group_size}, {args.dtype}",
        f"router:    gate nn.Linear [{s.E}, {s.D}] {args.dtype}, float32 bias, top-{s.k}",
        f"weights:   {args.layers} layers x {layer_gb:.2f} GB packed"
        f"{' (+ as much stock)' if not args.no_stock else ''}, "
        f"{expert_mb:.2f} MB per expert; medians of >= {args.repeats} calls "
        f"(fused: and >= {SAMPLE_MIN_S:g} s, over {FUSED_ROUNDS} passes)",
    ]


# ------------------------------------------------------------------ main


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    D, H, E, k = MINIMAX_M25_REAP
    p.add_argument("--bits", type=int, choices=fm.SUPPORTED_BITS, default=3)
    p.add_argument("--group-size", type=int, choices=fm.SUPPORTED_GROUP_SIZES, default=64)
    p.add_argument("--mode", choices=_ext.SUPPORTED_MODES, default="affine",
                   help="quantization mode; the fp modes take their own bits and group size "
                        "(mxfp4 4/32, mxfp8 8/32, nvfp4 4/16) and ignore --bits/--group-size")
    p.add_argument("--hidden", type=positive, default=D, help=f"hidden size D (default {D})")
    p.add_argument("--intermediate", type=positive, default=H, help=f"expert intermediate size H (default {H})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=positive, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--experts", type=positive, default=E, help=f"experts per layer E (default {E})")
    p.add_argument("--top-k", type=positive, default=k, help=f"experts per token k (default {k})")
    p.add_argument("--layers", type=positive, default=3,
                   help="distinct layers rotated through, one per call (default 3)")
    p.add_argument("--threads", type=positive, help="fused_moe CPU threads (default: its own)")
    p.add_argument("--stock-max-tokens", type=int, default=64,
                   help="largest T the stock path runs at; above it, it is extrapolated")
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--no-stock", action="store_true", help="time the fused path only")
    p.add_argument("--e2e", type=positive, metavar="N",
                   help="also run a synthetic full-width MiniMax with N layers through "
                        "mlx-lm's generation, stock against patched (slow on CPU)")
    p.add_argument("--e2e-prompt", type=positive, default=16, help="prompt tokens of --e2e (default 16)")
    p.add_argument("--e2e-decode", type=positive, default=8, help="decoded tokens of --e2e (default 8)")
    p.add_argument("--e2e-context", type=positive, default=1024,
                   help="cached positions before the decode steps of --e2e (default 1024)")
    p.add_argument("--e2e-vocab", type=positive, default=e2e.VOCAB,
                   help=f"vocabulary of --e2e (default {e2e.VOCAB}, MiniMax's; its 8-bit lm_head "
                        f"dominates decode on MLX's CPU backend)")
    p.add_argument("--e2e-profile", action="store_true",
                   help="also time one decode step of the --e2e model piece by piece at 1k and 4k "
                        "context, MoE-only patch against full patch (decode_profile.py)")
    p.add_argument("--linear", action="store_true",
                   help="also time fm.quantized_matmul against mx.quantized_matmul at the 8-bit "
                        "attention and lm_head shapes (linear.py)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="also draw tokens per second against T, stock and fused, as a PNG "
                        "(needs matplotlib: pip install 'mlx-fused-moe[plot]')")
    args = p.parse_args()
    if args.e2e_profile and not args.e2e:
        p.error("--e2e-profile needs --e2e N (the layers of the profiled model)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed: "
                    "pip install matplotlib (or 'mlx-fused-moe[plot]')")
    return args


def measure_all(bench: Bench, probes: Probes, args: argparse.Namespace) -> list[Row]:
    """Measures the fused ops at every token count (measure_fused), then
    stock and prints one row per token count, smallest first."""
    tokens = sorted(set(args.tokens))
    fused = measure_fused(bench, probes, tokens, args.repeats)
    rows, ref = [], None  # ref: the row of the largest T stock ran at
    for T in tokens:
        row = fused[T]
        row.probe_gb_s, row.probe_gflop_s = probes.gb_s, probes.gflop_s
        if not args.no_stock:
            measure_stock_router(bench, row, args.repeats)
        if not args.no_stock and T <= args.stock_max_tokens:
            measure_stock(bench, row, args.repeats)
            ref = row
        elif not args.no_stock and ref is not None:
            extrapolate_stock(row, ref)
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


# Issue 6's targets for kernels A+B on the development machine:
# (T, what is compared, target, how a row's value is computed).
TARGETS = (
    (1, "fused time / bandwidth floor", "<= 1.4", lambda r, p: p.gb_s / r.gb_s, lambda v: v <= 1.4),
    (8, "% of probe bandwidth", ">= 50", lambda r, p: 100 * r.gb_s / p.gb_s, lambda v: v >= 50),
    (512, "% of probe fp32 GFLOP/s", ">= 50", lambda r, p: 100 * r.gflop_s / p.gflop_s, lambda v: v >= 50),
)


def targets(rows: list[Row], probes: Probes) -> list[dict]:
    by_t = {r.T: r for r in rows}
    out = []
    for T, what, target, value, met in TARGETS:
        if T in by_t:
            v = value(by_t[T], probes)
            out.append({"T": T, "what": what, "target": target, "value": v, "met": met(v)})
    return out


def footnotes(rows: list[Row], probes: Probes, args: argparse.Namespace) -> list[str]:
    notes = [
        f"probes (medians of {len(probes.read_gb_s)} samples taken between the kernel runs): "
        f"read {probes.gb_s:.1f} GB/s on {os.cpu_count()} threads; "
        f"fp32 matmul {probes.gflop_s:.1f} GFLOP/s (numpy {np.__version__} BLAS)",
        "tok/s: tokens per second through one layer (fused); GB/s: bytes of the "
        "distinct experts selected / fused time; %BW: of the read probe; "
        "GFLOP/s: 2*k*3*D*H per token / fused time; %fp32: of the matmul probe",
        f"router / stock router: fm.route / mlx-lm's router chain alone, median of "
        f">= {ROUTER_MIN_REPEATS} calls (stock: at most {ROUTER_STOCK_SECONDS:g} s of calls)",
    ]
    measured = [r.T for r in rows if r.stock and not r.stock.extrapolated]
    if any(r.stock and r.stock.extrapolated for r in rows):
        notes.append(f"* extrapolated linearly per token from stock at T={max(measured)} "
                     f"(--stock-max-tokens {args.stock_max_tokens})")
    if not args.no_stock and any(r.stock is None for r in rows):
        notes.append(f"-: stock not run above --stock-max-tokens {args.stock_max_tokens}, "
                     f"and no smaller T to extrapolate from")
    return notes


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    T = [r.T for r in rows]
    ax.plot(T, [r.T / r.fused * 1e3 for r in rows], "o-", label="fused_moe")
    stock = [(r.T, r.T / r.stock.ms * 1e3, r.stock.extrapolated) for r in rows if r.stock]
    if stock:
        ax.plot([t for t, _, _ in stock], [v for _, v, _ in stock], "s--", label="stock mlx-lm")
        extra = [(t, v) for t, v, e in stock if e]
        if extra:
            ax.plot(*zip(*extra), "s", mfc="none", color="C1", label="stock, extrapolated")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per call (T)")
    ax.set_ylabel("tokens per second, one MoE layer")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    device = pick_device()
    if args.threads:
        fm.set_num_threads(args.threads)
    bits, group_size = args.bits, args.group_size
    if args.mode != "affine":
        bits, group_size = _ext.FP_MODES[args.mode]["bits"], _ext.FP_MODES[args.mode]["group_size"]
        if args.e2e or args.e2e_profile:
            raise SystemExit("--e2e and --e2e-profile build MiniMax through PackedExperts: affine only")
    s = Shapes(args.hidden, args.intermediate, args.experts, args.top_k, bits, group_size,
               DTYPES[args.dtype], args.mode)
    layers = [random_layer(s, not args.no_stock) for _ in range(args.layers)]
    bench = Bench(s, layers)
    probes = Probes()
    for _ in range(2):
        probes.sample()
    layer_gb = bench.expert_bytes * s.E / 1e9
    lines = header(args, s, device, layer_gb, bench.expert_bytes / 1e6)
    print("\n".join(lines))
    print()
    print(COLUMNS, flush=True)
    rows = measure_all(bench, probes, args)
    print()
    print("\n".join(footnotes(rows, probes, args)))
    results = targets(rows, probes)
    if results:
        print()
        print("targets (kernels A+B, issue 6):")
        for t in results:
            print(f"  T={t['T']:<4} {t['what']}: {t['value']:.2f} (target {t['target']}): "
                  f"{'met' if t['met'] else 'MISSED'}")
    if args.linear:
        print(flush=True)
        print("\n".join(linear.run(s.dtype, probes, stock=not args.no_stock)), flush=True)
    e2e_result = None
    if args.e2e:
        del layers, bench  # the end-to-end model needs the memory
        print(flush=True)
        e2e_result = e2e.run(s, args.e2e, args.e2e_prompt, args.e2e_decode, random_projection, args.e2e_vocab,
                             args.e2e_context, probes)
        print("\n".join(e2e.format_result(e2e_result)), flush=True)
    profile_result = None
    if args.e2e_profile:
        print(flush=True)
        profile_result = decode_profile.run(s, args.e2e, random_projection, args.e2e_vocab)
        print("\n".join(decode_profile.format_result(profile_result, args.e2e, args.e2e_vocab)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": lines,
                    "device": device,
                    "threads": fm.get_num_threads(),
                    "isa": fm.cpu_isa(),
                    "mlx": mx.__version__,
                    "shapes": {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                               "dtype": args.dtype},
                    "probes": {"read_gb_s": probes.read_gb_s, "matmul_gflop_s": probes.matmul_gflop_s},
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "targets": results,
                    "e2e": dataclasses.asdict(e2e_result) if e2e_result else None,
                    "decode_profile": {f"{label} {ctx}": parts for (label, ctx), parts in profile_result.items()}
                    if profile_result else None,
                },
                f,
                indent=2,
            )
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"D={s.D} H={s.H} E={s.E} k={s.k}, {s.bits}-bit, {args.dtype}, {device}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
