"""Routed-expert throughput: fused_moe against mlx-lm's stock SwitchGLU,
and the router: fused_moe.route against mlx-lm's MiniMax router.

Measures one MoE layer's routed experts (default: the MiniMax-M2.5-REAP
shapes D=3072, H=1536, E=154, k=8, 3-bit, group size 64, bfloat16; ``--preset``
picks another published MoE at the quantization it ships in, ``--mode``
another quantization) with random weights and fresh random routing on every call (k distinct experts
per token, positive weights summing to 1). ``--layers`` distinct layers are
rotated through, one per call, so the weights do not stay in the caches.

For each token count T it times the median of at least ``--repeats`` calls
(``mx.eval`` between ``time.perf_counter`` reads) of the ops below. The
fused and router ops are timed first, in ``Plan.fused_rounds`` passes over
the token counts whose samples are pooled, for at least ``Plan.sample_min_s``
per op and T; the stock ops follow, one T at a time, and each T's row is
printed as soon as its stock ops are done (a progress line on stderr says
what runs meanwhile):

* stock: ``SwitchGLU(x, indices)`` then ``(y * weights[..., None]).sum(-2)``;
* fused: ``fm.down_combine(fm.gate_up(x, ...), ...)`` (A+B); for presets
  other than MiniMax, B is ``fm.down_slots`` and the same weighted sum, as
  ``FusedExperts`` runs under a family's own router (which is not timed);
* the parts on their own: A = ``gate_up``, B = ``down_combine``,
  stock A = ``silu(gate_proj) * up_proj``, stock B = ``down_proj`` plus the
  weighted sum (both through the unsorted gather path, whereas SwitchGLU
  sorts the tokens by expert once T*k >= 64);
* the router, per layer a gate ``nn.Linear`` [E, D] in the benchmark dtype
  (bfloat16 by default, as in MiniMax) and a float32 score bias: fused =
  ``fm.route``, stock = mlx-lm's chain (gate on fp32 x, sigmoid, bias,
  argpartition, take_along_axis, renormalisation). Its calls draw only a
  fresh x, and it takes at least ``Plan.router_min_repeats`` samples, being
  short; stock gets at most ``Plan.router_stock_seconds`` of calls per T.

The stock path is very slow on CPU, so it gets at most
``Plan.stock_seconds_per_op`` seconds of calls per op and T (at least one
call; a warm-up call longer than WARMUP_IS_SAMPLE_S counts as a sample), and
for T above ``--stock-max-tokens`` it is not run: in the full run its times
are extrapolated linearly per token from the largest measured T and marked
with ``*``. ``--quick`` (about a minute) times fewer token counts for less
time and runs stock at T=1 only (``QUICK``).

A legend before the table says what each column means (``LEGEND``). Probe
samples are taken before and after each fused measurement; the end of the
run checks the project's CPU targets against their medians, unless the
probes look throttled (a wide spread between their samples, or a load
average above the number of CPUs: ``Probes.warnings``), when it prints the
values without verdicts. ``--e2e N`` adds a synthetic full-width MiniMax
through mlx-lm's generation (e2e.py), ``--e2e-profile`` one decode step of
it timed piece by piece (decode_profile.py); ``--json`` and ``--plot`` write
the results out.

It only measures and reports; it exits 0 however slow either path is.
"""

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

import fused_moe as fm
from fused_moe.supported import FP_MODES
import decode_profile
import e2e
import linear
from probes import Probes

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class Preset:
    """A model's routed experts: shapes, quantization, activation, and how
    the fused path runs them there."""

    D: int
    H: int
    E: int
    k: int
    mode: str
    bits: int
    group_size: int
    activation: fm.Activation = fm.Activation()
    bias: bool = False  # the experts add a bias after each matmul
    # MiniMax's block is fused whole: gate/up, then the down projection with
    # the router weights and the sum folded in (down_combine). Every other
    # family keeps its own router and sum: gate/up, the down projection per
    # slot (down_slots) and the model's weighted sum, as FusedExperts runs it.
    fused_combine: bool = False


# The published shapes and the quantizations people run them in (mlx-lm's
# community conversions: 4-bit affine, gpt-oss in mxfp4 as released).
PRESETS = {
    "minimax-m2.5-reap": Preset(3072, 1536, 154, 8, "affine", 3, 64, fused_combine=True),
    "qwen3-30b-a3b": Preset(2048, 768, 128, 8, "affine", 4, 64),
    "qwen3-235b-a22b": Preset(4096, 1536, 128, 8, "affine", 4, 64),
    "gpt-oss-120b": Preset(2880, 2880, 128, 4, "mxfp4", 4, 32, fm.Activation("swiglu_oai", limit=7.0, alpha=1.702),
                           bias=True),
    "glm-4.5-air": Preset(4096, 1408, 128, 8, "affine", 4, 64),
    "deepseek-v3": Preset(7168, 2048, 256, 8, "affine", 4, 64),
}
DEFAULT_PRESET = "minimax-m2.5-reap"
# The seed model's expert shapes (D, H, E, k), for the end-to-end benchmarks.
MINIMAX_M25_REAP = tuple(getattr(PRESETS[DEFAULT_PRESET], f) for f in ("D", "H", "E", "k"))

# A warm-up call at least this long is kept as a sample: its one-time costs
# are noise at that length, and repeating it would only cost time.
WARMUP_IS_SAMPLE_S = 1.0


@dataclass(frozen=True)
class Plan:
    """How much the run measures: which token counts, how many layers, and
    how long each op is sampled. Options given on the command line override
    the plan's token counts, layers, repeats and --stock-max-tokens."""

    name: str
    tokens: tuple[int, ...]
    layers: int
    repeats: int
    # Largest T the stock path runs at; above it, it is extrapolated per
    # token from the largest measured T when `extrapolate_stock`.
    stock_max_tokens: int
    extrapolate_stock: bool
    # Most seconds of stock calls per op and token count (at least one call).
    stock_seconds_per_op: float
    # Fused and router ops run this long before their samples are taken...
    warmup_min_s: float
    # ... and are sampled for at least this long per T (and --repeats calls),
    # spread over `fused_rounds` passes over the token counts whose samples
    # are pooled: samples taken in one stretch can fall entirely inside a
    # slow spell of the host, which once took a decode median from 1.8 to
    # 2.9 ms.
    sample_min_s: float
    fused_rounds: int
    # The router takes well under a millisecond at decode: more samples than
    # --repeats make its median stable, and its stock path gets a small budget.
    router_min_repeats: int
    router_stock_seconds: float


FULL = Plan("full", tokens=(1, 8, 64, 512), layers=3, repeats=5, stock_max_tokens=64,
            extrapolate_stock=True, stock_seconds_per_op=20.0, warmup_min_s=0.3,
            sample_min_s=1.0, fused_rounds=3, router_min_repeats=25, router_stock_seconds=2.0)
# About a minute on 2 cores: no T=512 (a fused call there takes about a
# second on the CPU), two layers (setting up a layer and its stock copy takes
# seconds), short sampling, and stock at T=1 only, where it is fastest.
QUICK = Plan("quick", tokens=(1, 8, 64), layers=2, repeats=3, stock_max_tokens=1,
             extrapolate_stock=False, stock_seconds_per_op=3.0, warmup_min_s=0.1,
             sample_min_s=0.3, fused_rounds=2, router_min_repeats=10, router_stock_seconds=0.5)


@dataclass
class Shapes:
    D: int
    H: int
    E: int
    k: int
    bits: int
    group_size: int
    dtype: mx.Dtype
    mode: str = "affine"
    activation: fm.Activation = fm.Activation()
    bias: bool = False
    fused_combine: bool = True


@dataclass
class Router:
    gate: nn.Linear  # [E, D], no bias
    bias: mx.array  # [E] float32 e_score_correction_bias
    k: int


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
    (and affine biases) giving weights of about +-1/sqrt(in) like mlx-lm's
    initialization; an additive bias where the preset has one."""
    proj = QuantizedSwitchLinear(
        in_dims, out_dims, 1, bias=False, group_size=s.group_size, bits=s.bits, mode=s.mode
    )
    words = in_dims * s.bits // 32
    codes = mx.random.randint(-(2**31), 2**31 - 1, (s.E, out_dims, words), dtype=mx.int32).view(mx.uint32)
    groups = (s.E, out_dims, in_dims // s.group_size)
    if s.mode == "affine":
        levels = 2**s.bits - 1
        step = 2 * in_dims**-0.5 / levels
        scales = mx.random.uniform(0.5, 1.5, groups) * step
        proj.scales = scales.astype(s.dtype)
        proj.biases = (-scales * levels / 2).astype(s.dtype)
    else:
        if s.mode == "mxfp8":
            codes = codes & mx.array(0xBFBFBFBF, dtype=mx.uint32)  # e4m3 exponents below 8: no NaN code
        if s.mode == "nvfp4":  # e4m3 scales of about 2^-8 .. 2^-6
            proj.scales = mx.random.randint(0x08, 0x18, groups).astype(mx.uint8)
        else:  # e8m0 2^(s-127) of about 2^-9 .. 2^-7 (e4m3 codes reach 448: 2^-11 .. 2^-9)
            low = 116 if s.mode == "mxfp8" else 118
            proj.scales = mx.random.randint(low, low + 3, groups).astype(mx.uint8)
        proj.biases = None
    proj.weight = codes
    if s.bias:
        proj.bias = (0.01 * mx.random.normal((s.E, out_dims))).astype(s.dtype)
    return proj


def stock_activation(a: fm.Activation):
    """mlx-lm's module for the preset's activation."""
    if a.name == "swiglu":
        from mlx_lm.models.switch_layers import SwiGLU

        return SwiGLU()
    if a.name == "swiglu_oai":
        from mlx_lm.models.activations import SwigluOAI

        return SwigluOAI(alpha=a.alpha, limit=a.limit)
    raise ValueError(f"no stock module for activation {a.name} in this benchmark")


def random_layer(s: Shapes, with_stock: bool) -> Layer:
    # SwitchGLU's float weights are lazy and replaced before they are evaluated.
    glu = SwitchGLU(s.D, s.H, s.E, activation=stock_activation(s.activation))
    glu.gate_proj = random_projection(s, s.H, s.D)
    glu.up_proj = random_projection(s, s.H, s.D)
    glu.down_proj = random_projection(s, s.D, s.H)
    mx.eval(glu.parameters())
    packed = fm.pack_experts(glu)
    mx.eval(packed.parameters())
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


# The preset's activation and combine, set by main(): the ops below take
# only (layer, inputs), as the timing loop calls them.
SHAPES: Optional["Shapes"] = None


def fused_a(layer: Layer, inp: Inputs) -> mx.array:
    return fm.gate_up(inp.x, layer.packed, inp.indices, SHAPES.activation)


def fused_b(layer: Layer, inp: Inputs) -> mx.array:
    if SHAPES.fused_combine:
        return fm.down_combine(inp.h, layer.packed, inp.indices, inp.weights)
    # FusedExperts returns one row per slot; the model sums them itself.
    return weighted_sum(fm.down_slots(inp.h, layer.packed, inp.indices), inp.weights)


def fused_ab(layer: Layer, inp: Inputs) -> mx.array:
    h = fused_a(layer, inp)
    return fused_b(layer, Inputs(inp.x, inp.indices, inp.weights, h, inp.distinct_experts))


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


# ---------------------------------------------------------------- progress


class Progress:
    """A line on stderr saying what runs now, so minutes of stock calls do
    not look like a hang. On a terminal it is rewritten in place and cleared
    before each result line; elsewhere (a log) each step is one line and the
    per-call details are left out."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def step(self, text: str) -> None:
        if self.tty:
            self.detail(text)
        else:
            print(f"... {text}", file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.tty:
            # A line wider than the terminal wraps, and "\r" would then
            # rewrite only its last row.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write(("\r\x1b[K... " + text)[: 4 + width])
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def out(text: str = "", progress: Optional[Progress] = None) -> None:
    """Prints a result line at once, after clearing the progress line."""
    if progress is not None:
        progress.clear()
    print(text, flush=True)


# ---------------------------------------------------------------- timing


class Bench:
    """Runs ops on fresh inputs, one layer per call, round robin."""

    def __init__(self, shapes: Shapes, layers: list[Layer], plan: Plan, progress: Progress):
        self.shapes = shapes
        self.layers = itertools.cycle(layers)
        self.expert_bytes = bytes_per_expert(layers[0])
        self.plan = plan
        self.progress = progress
        # fm.route is MiniMax's router; other families keep their own.
        self.with_router = shapes.fused_combine

    def call(self, op: Op, T: int) -> tuple[float, int]:
        """One timed call: (seconds, bytes of the distinct experts selected)."""
        inp = random_inputs(self.shapes, T, router_only=op in ROUTER_OPS)
        layer = next(self.layers)
        start = time.perf_counter()
        mx.eval(op(layer, inp))
        return time.perf_counter() - start, inp.distinct_experts * self.expert_bytes

    def samples(self, op: Op, T: int, repeats: int, min_s: float) -> list[tuple[float, int]]:
        """Timed calls of a fast op: at least `repeats` of them, for at least
        `min_s`, after warming up for Plan.warmup_min_s (a core that idled
        through the probe's pause runs the first calls slowly)."""
        warm_until = time.perf_counter() + self.plan.warmup_min_s
        self.call(op, T)
        while time.perf_counter() < warm_until:
            self.call(op, T)
        samples = []
        sample_until = time.perf_counter() + min_s
        while len(samples) < repeats or time.perf_counter() < sample_until:
            samples.append(self.call(op, T))
        return samples

    def median_s(self, op: Op, T: int, repeats: int, budget_s: float, label: str) -> tuple[float, float]:
        """(median seconds, mean bytes touched) of a slow op (the stock path)
        over at most `repeats` calls after a warm-up call: calls stop once the
        next one would exceed `budget_s`, and a warm-up of WARMUP_IS_SAMPLE_S
        or more counts as a sample. `label` names the op on the progress line."""
        self.progress.step(f"T={T}: {label} (at most {budget_s:g} s of calls)")
        warmup = self.call(op, T)
        samples = [warmup] if warmup[0] >= WARMUP_IS_SAMPLE_S else []
        spent = warmup[0]
        while len(samples) < repeats and not (samples and spent + warmup[0] > budget_s):
            self.progress.detail(f"T={T}: {label}, call {len(samples) + 1} of at most {repeats}, "
                                 f"{spent:.1f} s of at most {budget_s:g} s")
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

    @property
    def floor(self) -> float:
        """ms to read the selected experts' bytes once at the read probe's rate."""
        return self.fused * self.gb_s / self.probe_gb_s


FUSED_OPS = (fused_ab, fused_a, fused_b, fused_router)


def measure_fused(bench: Bench, probes: Probes, tokens: list[int], repeats: int) -> dict[int, Row]:
    """The fused ops at every T, in Plan.fused_rounds passes over the token
    counts with a probe sample before each T; each op's samples are pooled
    over the passes. Between them the passes take --repeats calls (the
    router at least Plan.router_min_repeats) and Plan.sample_min_s of each
    op at each T."""
    plan = bench.plan
    ops = FUSED_OPS if bench.with_router else tuple(op for op in FUSED_OPS if op is not fused_router)
    pooled = {(T, op): [] for T in tokens for op in ops}
    for round_ in range(plan.fused_rounds):
        for T in tokens:
            bench.progress.step(f"fused kernels and router, pass {round_ + 1} of {plan.fused_rounds}, "
                                f"T={T}")
            probes.sample()
            for op in ops:
                n = max(repeats, plan.router_min_repeats) if op is fused_router else repeats
                pooled[T, op] += bench.samples(
                    op, T, -(-n // plan.fused_rounds), plan.sample_min_s / plan.fused_rounds
                )
    probes.sample()
    s = bench.shapes
    rows = {}
    for T in tokens:
        fused_s, touched = median(pooled[T, fused_ab])
        a_s, b_s = (median(pooled[T, op])[0] for op in (fused_a, fused_b))
        router_s = median(pooled[T, fused_router])[0] if bench.with_router else None
        flops = 2 * s.k * 3 * s.D * s.H * T
        rows[T] = Row(T, 1e3 * fused_s, 1e3 * a_s, 1e3 * b_s, touched / fused_s / 1e9,
                      flops / fused_s / 1e9, router=None if router_s is None else 1e3 * router_s)
    return rows


def measure_stock_router(bench: Bench, row: Row, repeats: int) -> None:
    plan = bench.plan
    seconds, _ = bench.median_s(stock_router, row.T, max(repeats, plan.router_min_repeats),
                                plan.router_stock_seconds, "stock router")
    row.stock_router = Timing(1e3 * seconds)


def measure_stock(bench: Bench, row: Row, repeats: int) -> None:
    def ms(op: Op, label: str) -> Timing:
        seconds = bench.median_s(op, row.T, repeats, bench.plan.stock_seconds_per_op, label)[0]
        return Timing(1e3 * seconds)

    row.stock = ms(stock_ab, "stock A+B (SwitchGLU and the weighted sum)")
    row.stock_a = ms(stock_a, "stock A (gate and up gather_qmm, SiLU)")
    row.stock_b = ms(stock_b, "stock B (down gather_qmm, weighted sum)")


def extrapolate_stock(row: Row, ref: Row) -> None:
    """Stock times for row.T scaled linearly per token from `ref`."""

    def scale(t: Timing) -> Timing:
        return Timing(t.ms * row.T / ref.T, extrapolated=True)

    row.stock, row.stock_a, row.stock_b = scale(ref.stock), scale(ref.stock_a), scale(ref.stock_b)


# ---------------------------------------------------------------- output

# What the table's words mean, printed before it: a reader should not need
# the source to read a row.
LEGEND = (
    "legend:",
    "  stock    mlx-lm as it runs MoE layers today: SwitchGLU, three gather_qmm calls (the gate,",
    "           up and down projections of each token's k experts), then the weighted sum of",
    "           the k outputs",
    "  fused    fused_moe's two kernels: A = gate_up (gate and up projections with the",
    "           activation in one pass), then B = down_combine (down projection and the",
    "           weighted sum in one pass; for presets other than MiniMax, down_slots and the",
    "           model's own weighted sum); the parts table times A and B alone, and stock's",
    "           same two halves",
    "  floor    the time to read the weights a call selects (codes, scales and biases of the",
    "           distinct experts) once at the read probe's bandwidth: a call whose weights come",
    "           from memory cannot be faster",
    "  probes   this machine's limits, measured in this run between the kernel runs: 'read'",
    "           streams 512 MB on every CPU thread (GB/s); 'fp32' is numpy's 2048x2048 float32",
    "           matmul (GFLOP/s)",
    "  columns  stock/fused ms: one layer's routed experts for T tokens; speedup: stock/fused;",
    "           tok/s: T / fused time; floor ms: see floor; GB/s: selected weight bytes / fused",
    "           time; %BW: of the read probe (100% = at the floor); GFLOP/s: 2*k*3*D*H per",
    "           token / fused time; %fp32: of the fp32 probe",
)

COLUMNS = (
    f"{'tokens':>6}  {'stock ms':>10}  {'fused ms':>9}  {'speedup':>8}  {'tok/s':>9}  "
    f"{'floor ms':>8}  {'GB/s':>6}  {'%BW':>5}  {'GFLOP/s':>7}  {'%fp32':>5}"
)
PART_COLUMNS = (
    f"{'tokens':>6}  {'A ms':>8}  {'B ms':>8}  {'stock A ms':>10}  {'stock B ms':>10}  "
    f"{'router ms':>9}  {'stock router ms':>15}"
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
        f"{r.T / r.fused * 1e3:>9.1f}  {r.floor:>8.2f}  {r.gb_s:>6.2f}  "
        f"{100 * r.gb_s / r.probe_gb_s:>5.1f}  {r.gflop_s:>7.1f}  {100 * r.gflop_s / r.probe_gflop_s:>5.1f}"
    ).rstrip()


def format_parts(r: Row) -> str:
    return (
        f"{r.T:>6}  {r.a:>8.2f}  {r.b:>8.2f}  {fmt_stock(r.stock_a, 10)}  {fmt_stock(r.stock_b, 10)}  "
        f"{fmt_router(None if r.router is None else Timing(r.router), 9)}  {fmt_router(r.stock_router, 15)}"
    ).rstrip()


def header(args, plan: Plan, s: Shapes, device: str) -> list[str]:
    lines = [
        "fused_moe routed-expert benchmark (one MoE layer, random weights and routing)",
        f"device:    {device}",
        f"cpu:       {cpu_model()} ({os.cpu_count()} logical CPUs), "
        f"fused_moe ISA {fm.cpu_isa()}, {fm.get_num_threads()} threads",
        f"versions:  mlx {mx.__version__}, fused_moe {fm.__version__}",
        f"model:     {args.preset} routed experts: D={s.D} H={s.H} E={s.E} k={s.k}, {quantization(s)}, "
        f"{args.dtype}, {s.activation.name}{' with biases' if s.bias else ''}",
    ]
    if s.fused_combine:
        lines.append(f"router:    gate nn.Linear [{s.E}, {s.D}] {args.dtype}, float32 bias, top-{s.k}")
    else:
        lines.append("combine:   fused = A, then down_slots and the model's weighted sum (as FusedExperts runs "
                     "under the family's own router); the router is not timed (fm.route is MiniMax's)")
    if args.no_stock:
        stock = "stock not run (--no-stock)"
    elif plan.extrapolate_stock:
        stock = f"stock up to T={args.stock_max_tokens}, extrapolated above"
    else:
        stock = f"stock up to T={args.stock_max_tokens} only"
    tokens = ", ".join(map(str, args.tokens))
    if plan is QUICK:
        lines.append(f"run:       quick (about a minute): T={tokens}; {stock}; shorter sampling. "
                     f"The full run (no --quick) samples longer and adds T=512")
    else:
        lines.append(f"run:       {plan.name}: T={tokens}; {stock}")
    return lines


def quantization(s: Shapes) -> str:
    if s.mode == "affine":
        return f"{s.bits}-bit affine, group size {s.group_size}"
    return f"{s.mode} (group size {s.group_size})"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def weights_line(args, plan: Plan, layer_gb: float, expert_mb: float) -> str:
    return (
        f"weights:   {plural(args.layers, 'layer')} x {layer_gb:.2f} GB packed"
        f"{' (+ as much stock)' if not args.no_stock else ''}, "
        f"{expert_mb:.2f} MB per expert; medians of >= {args.repeats} calls "
        f"(fused: and >= {plan.sample_min_s:g} s, over {plan.fused_rounds} passes)"
    )


# ------------------------------------------------------------------ main


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="the model whose routed experts to time: its D, H, E, k, quantization, activation "
                        f"and combine (default {DEFAULT_PRESET}; the options below override it)")
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute: T={', '.join(map(str, QUICK.tokens))}, {QUICK.layers} layers, "
                        f"short sampling, stock at T=1 only (the options below still override it)")
    p.add_argument("--mode", choices=fm.SUPPORTED_MODES,
                   help="quantization mode (default: the preset's); the fp modes take their own bits and group "
                        "size (mxfp4 4/32, mxfp8 8/32, nvfp4 4/16)")
    p.add_argument("--bits", type=int, choices=fm.SUPPORTED_BITS, help="affine bits (default: the preset's)")
    p.add_argument("--group-size", type=int, choices=fm.SUPPORTED_GROUP_SIZES,
                   help="affine group size (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=positive, nargs="+",
                   help=f"token counts T (default {' '.join(map(str, FULL.tokens))}; "
                        f"--quick: {' '.join(map(str, QUICK.tokens))})")
    p.add_argument("--experts", type=positive, help="experts per layer E (default: the preset's)")
    p.add_argument("--top-k", type=positive, help="experts per token k (default: the preset's)")
    p.add_argument("--layers", type=positive,
                   help=f"distinct layers rotated through, one per call (default {FULL.layers}; "
                        f"--quick: {QUICK.layers})")
    p.add_argument("--threads", type=positive, help="fused_moe CPU threads (default: its own)")
    p.add_argument("--stock-max-tokens", type=int,
                   help=f"largest T the stock path runs at; above it, it is extrapolated "
                        f"(default {FULL.stock_max_tokens}; --quick: {QUICK.stock_max_tokens}, "
                        f"not extrapolated)")
    p.add_argument("--repeats", type=positive,
                   help=f"calls per median at least (default {FULL.repeats}; --quick: {QUICK.repeats})")
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
    if (args.e2e or args.linear) and args.preset != DEFAULT_PRESET:
        p.error(f"--e2e, --e2e-profile and --linear build MiniMax; they run with --preset {DEFAULT_PRESET} only")
    if args.e2e_profile and not args.e2e:
        p.error("--e2e-profile needs --e2e N (the layers of the profiled model)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed: "
                    "pip install matplotlib (or 'mlx-fused-moe[plot]')")
    return args


def resolve_plan(args: argparse.Namespace) -> Plan:
    """The run's plan; fills the options left out from it."""
    plan = QUICK if args.quick else FULL
    for name in ("tokens", "layers", "repeats", "stock_max_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(plan, name))
    args.tokens = sorted(set(args.tokens))
    return plan


def shapes_from_args(args: argparse.Namespace) -> Shapes:
    """The one place the benchmark's layer shapes are decided: the preset,
    with the options given overriding it."""
    p = PRESETS[args.preset]
    mode = args.mode or p.mode
    if mode == "affine":
        bits = args.bits or (p.bits if p.mode == "affine" else 4)
        group_size = args.group_size or (p.group_size if p.mode == "affine" else 64)
    else:
        bits, group_size = FP_MODES[mode]["bits"], FP_MODES[mode]["group_size"]
        if args.bits not in (None, bits) or args.group_size not in (None, group_size):
            raise SystemExit(f"error: {mode} has {bits} bits and group size {group_size}; "
                             f"--bits and --group-size apply to --mode affine")
    args.experts = args.experts or p.E
    args.top_k = args.top_k or p.k
    args.bits, args.group_size, args.mode = bits, group_size, mode
    return Shapes(p.D, p.H, args.experts, args.top_k, bits, group_size, DTYPES[args.dtype], mode, p.activation,
                  p.bias, p.fused_combine)


def measure_all(bench: Bench, probes: Probes, args: argparse.Namespace) -> list[Row]:
    """Measures the fused ops at every token count (measure_fused), then
    stock, and prints each token count's row as soon as it is done,
    smallest T first."""
    fused = measure_fused(bench, probes, args.tokens, args.repeats)
    rows, ref = [], None  # ref: the row of the largest T stock ran at
    for T in args.tokens:
        row = fused[T]
        row.probe_gb_s, row.probe_gflop_s = probes.gb_s, probes.gflop_s
        if not args.no_stock and bench.with_router:
            measure_stock_router(bench, row, args.repeats)
        if not args.no_stock and T <= args.stock_max_tokens:
            measure_stock(bench, row, args.repeats)
            ref = row
        elif not args.no_stock and ref is not None and bench.plan.extrapolate_stock:
            extrapolate_stock(row, ref)
        probes.note_load()
        out(format_row(row), bench.progress)
        rows.append(row)
    return rows


# The project's targets for kernels A+B on the CPU of the development machine:
# (T, what is compared, target, how a row's value is computed).
TARGETS = (
    (1, "fused time / bandwidth floor", "<= 1.4", lambda r, p: p.gb_s / r.gb_s, lambda v: v <= 1.4),
    (8, "% of probe bandwidth", ">= 50", lambda r, p: 100 * r.gb_s / p.gb_s, lambda v: v >= 50),
    (512, "% of probe fp32 GFLOP/s", ">= 50", lambda r, p: 100 * r.gflop_s / p.gflop_s, lambda v: v >= 50),
)


def targets(rows: list[Row], probes: Probes, reliable: bool) -> list[dict]:
    by_t = {r.T: r for r in rows}
    out = []
    for T, what, target, value, met in TARGETS:
        if T in by_t:
            v = value(by_t[T], probes)
            out.append({"T": T, "what": what, "target": target, "value": v, "met": met(v),
                        "reliable": reliable})
    return out


def format_targets(results: list[dict], warnings: list[str]) -> list[str]:
    if not results:
        return []
    if warnings:
        lines = ["targets (fused kernels A+B): not judged, since the probes look throttled (see the",
                 "warning above) and a verdict would say more about the host than the kernels; the",
                 "values, for the record:"]
    else:
        lines = ["targets (fused kernels A+B):"]
    for t in results:
        verdict = "" if warnings else f": {'met' if t['met'] else 'MISSED'}"
        lines.append(f"  T={t['T']:<4} {t['what']}: {t['value']:.2f} (target {t['target']}){verdict}")
    return lines


def footnotes(rows: list[Row], probes: Probes, args: argparse.Namespace, plan: Plan) -> list[str]:
    notes = [
        f"probes (medians of {len(probes.read_gb_s)} samples taken between the kernel runs): "
        f"read {probes.gb_s:.1f} GB/s on {os.cpu_count()} threads; "
        f"fp32 matmul {probes.gflop_s:.1f} GFLOP/s (numpy {np.__version__} BLAS)",
    ]
    if rows and rows[0].router is not None:
        notes.append(f"router / stock router: fm.route / mlx-lm's router chain alone, median of "
                     f">= {plan.router_min_repeats} calls (stock: at most {plan.router_stock_seconds:g} s of calls)")
    measured = [r.T for r in rows if r.stock and not r.stock.extrapolated]
    if any(r.stock and r.stock.extrapolated for r in rows):
        notes.append(f"* extrapolated linearly per token from stock at T={max(measured)} "
                     f"(--stock-max-tokens {args.stock_max_tokens})")
    if not args.no_stock and any(r.stock is None for r in rows):
        if not plan.extrapolate_stock:
            why = (f"the quick mode runs stock only at T<={args.stock_max_tokens} and does not "
                   f"extrapolate (the full run does)")
        else:
            why = "there is no smaller T to extrapolate from"
        notes.append(f"-: stock not run above --stock-max-tokens {args.stock_max_tokens}: {why}")
    if args.no_stock:
        notes.append("stock not run (--no-stock)")
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
    plan = resolve_plan(args)
    progress = Progress()
    device = pick_device()
    if args.threads:
        fm.set_num_threads(args.threads)
    s = shapes_from_args(args)
    global SHAPES
    SHAPES = s
    lines = header(args, plan, s, device)
    out("\n".join(lines))
    progress.step("probing the machine (read bandwidth, fp32 matmul)")
    probes = Probes()
    for _ in range(2):
        probes.sample()
    if probes.warnings():
        # Said now, so a user can stop and rerun on a quieter machine.
        out("warning: the machine looks busy before the run starts:", progress)
        out("\n".join(f"  - {w}" for w in probes.warnings()))
    progress.step(f"setting up {plural(args.layers, 'layer')} of random weights"
                  f"{'' if args.no_stock else ' (packed and stock)'}")
    layers = [random_layer(s, not args.no_stock) for _ in range(args.layers)]
    bench = Bench(s, layers, plan, progress)
    layer_gb = bench.expert_bytes * s.E / 1e9
    lines.append(weights_line(args, plan, layer_gb, bench.expert_bytes / 1e6))
    out(lines[-1], progress)
    out()
    out("\n".join(LEGEND))
    out()
    out(COLUMNS)
    rows = measure_all(bench, probes, args)
    out()
    out("parts: A and B alone, stock's same halves, and the router")
    out(PART_COLUMNS)
    for r in rows:
        out(format_parts(r))
    out()
    out("\n".join(footnotes(rows, probes, args, plan)))
    warnings = probes.warnings()
    if warnings:
        out()
        out("warning: the probes look throttled, so the machine was not steady during this run:")
        out("\n".join(f"  - {w}" for w in warnings))
    results = targets(rows, probes, reliable=not warnings)
    if results:
        out()
        out("\n".join(format_targets(results, warnings)))
    if args.linear:
        out()
        progress.step("quantized_matmul against mx.quantized_matmul (--linear)")
        out("\n".join(linear.run(s.dtype, probes, stock=not args.no_stock)), progress)
    e2e_result = None
    if args.e2e:
        del layers, bench  # the end-to-end model needs the memory
        out()
        progress.step(f"end to end, {args.e2e} layers, stock then fused (--e2e)")
        e2e_result = e2e.run(s, args.e2e, args.e2e_prompt, args.e2e_decode, random_projection, args.e2e_vocab,
                             args.e2e_context, probes)
        out("\n".join(e2e.format_result(e2e_result)), progress)
    profile_result = None
    if args.e2e_profile:
        out()
        progress.step("one decode step piece by piece (--e2e-profile)")
        profile_result = decode_profile.run(s, args.e2e, random_projection, args.e2e_vocab)
        out("\n".join(decode_profile.format_result(profile_result, args.e2e, args.e2e_vocab)), progress)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": lines,
                    "legend": list(LEGEND),
                    "plan": dataclasses.asdict(plan),
                    "device": device,
                    "threads": fm.get_num_threads(),
                    "isa": fm.cpu_isa(),
                    "mlx": mx.__version__,
                    "preset": args.preset,
                    "shapes": {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                               "activation": dataclasses.asdict(s.activation), "dtype": args.dtype},
                    "tokens": args.tokens,
                    "layers": args.layers,
                    "repeats": args.repeats,
                    "stock_max_tokens": None if args.no_stock else args.stock_max_tokens,
                    "probes": {"read_gb_s": probes.read_gb_s, "matmul_gflop_s": probes.matmul_gflop_s,
                               "load_1m": probes.load_1m},
                    "warnings": warnings,
                    "rows": [{**dataclasses.asdict(r), "floor": r.floor} for r in rows],
                    "targets": results,
                    "e2e": dataclasses.asdict(e2e_result) if e2e_result else None,
                    "decode_profile": {f"{label} {ctx}": parts for (label, ctx), parts in profile_result.items()}
                    if profile_result else None,
                },
                f,
                indent=2,
            )
        out(f"\nwrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"{args.preset}: D={s.D} H={s.H} E={s.E} k={s.k}, {quantization(s)}, {args.dtype}, "
                              f"{device}")
        out(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
