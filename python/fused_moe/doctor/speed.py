"""The speed rows of `fused-moe doctor`: one MoE layer at MiniMax-M2.5-REAP's
shapes (D=3072, H=1536, E=154, k=8, 3-bit, group size 64, bfloat16, random
weights and routing), fused against mlx-lm's stock path in the same run, and
the weight bandwidth against a read probe of the device. About a minute.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from fused_moe import _ext
from fused_moe.ops.experts import down_combine, gate_up_swiglu
from fused_moe.packed.experts import QuantizedProjection, pack_experts

D, H, E, K, BITS, GROUP = 3072, 1536, 154, 8, 3, 64
DTYPE = mx.bfloat16
TOKENS = (1, 64, 512)
# Layers rotated through so the weights come from memory, not the caches.
LAYERS = 2
# The probe reads this much.
PROBE_BYTES = 512 << 20
# Stock mlx-lm on the CPU runs about 1 s per token per layer: above one token
# it is extrapolated per token there (and marked so) to keep the doctor short.
CPU_STOCK_TOKENS = 1


@dataclass
class SpeedRow:
    tokens: int
    fused_ms: float
    stock_ms: float
    stock_extrapolated: bool
    weight_gb_s: float  # bytes of the distinct experts touched / fused time

    @property
    def speedup(self) -> float:
        return self.stock_ms / self.fused_ms

    def as_json(self, probe_gb_s: float) -> dict:
        return {**self.__dict__, "speedup": self.speedup, "share_of_probe": self.weight_gb_s / probe_gb_s}


def _layer(seed: int):
    """Random codes, scales and biases of one layer (generated as they are
    stored: quantizing float weights of this size would take gigabytes)."""
    keys = mx.random.split(mx.random.key(seed), 9)
    projections = []
    for i, (rows, cols) in enumerate(((H, D), (H, D), (D, H))):
        k1, k2, k3 = keys[3 * i: 3 * i + 3]
        words = mx.random.randint(0, 2**31, (E, rows, cols * BITS // 32), key=k1).astype(mx.uint32)
        groups = (E, rows, cols // GROUP)
        scales = (mx.random.uniform(0.5, 1.5, groups, key=k2) * 0.02 / 2**BITS).astype(DTYPE)
        biases = (mx.random.normal(groups, key=k3) * 0.01).astype(DTYPE)
        projections.append(QuantizedProjection(words, scales, biases, BITS, GROUP))
    packed = pack_experts(*projections)
    mx.eval(packed.parameters(), *(p.weight for p in projections))
    return projections, packed


def _routing(T: int, seed: int):
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.uint32)
    w = rng.random((T, K)).astype(np.float32)
    return mx.array(idx), mx.array(w / w.sum(1, keepdims=True))


def _stock(x, projections, idx, weights, stream):
    """mlx-lm's SwitchGLU with SwiGLU, then the weighted sum, on MLX's ops."""
    gate, up, down = projections

    def proj(p, a):
        return mx.gather_qmm(a, p.weight, p.scales, p.biases, rhs_indices=idx, transpose=True,
                             group_size=p.group_size, bits=p.bits, stream=stream)

    xe = x[:, None, None, :]
    g = proj(gate, xe)
    h = g * mx.sigmoid(g) * proj(up, xe)
    y = proj(down, h).squeeze(-2)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def _time(f, seconds: float = 0.5, least: int = 3) -> float:
    """Median wall time of f() in ms over at least `least` calls and `seconds`."""
    mx.eval(f())  # warm-up: the first call compiles on Metal
    samples, start = [], time.perf_counter()
    while len(samples) < least or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        mx.eval(f())
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def read_probe(device: mx.Device) -> list[float]:
    """GB/s of plain reads: five samples. The CPU reads with every hardware
    thread (the extension's probe loop); a GPU sums a large array."""
    if device.type == mx.DeviceType.cpu:
        buffer = np.ones(PROBE_BYTES // 8, dtype=np.float64)
        threads = _ext.get_num_threads()
        _ext.set_num_threads(os.cpu_count() or 1)
        try:
            return [buffer.nbytes / _ext.timed_read(buffer) / 1e9 for _ in range(5)]
        finally:
            _ext.set_num_threads(threads)
    a = mx.ones((PROBE_BYTES // 4,), dtype=mx.uint32)
    mx.eval(a)
    out = []
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a.sum())
        out.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return out


def run(device: mx.Device, quick: bool = False) -> tuple[list[SpeedRow], list[float]]:
    stream = mx.default_stream(device)
    layers = [_layer(seed) for seed in range(LAYERS)]
    bytes_per_expert = sum(a.nbytes for a in layers[0][1].parameters()["down"].values()) + sum(
        a.nbytes for a in layers[0][1].parameters()["gate_up"].values())
    bytes_per_expert //= E
    probe = read_probe(device)
    rows = []
    for T in (TOKENS[:1] if quick else TOKENS):
        x = mx.random.normal((T, D), key=mx.random.key(T)).astype(DTYPE)
        idx, weights = _routing(T, T)
        turn = [0]

        def fused():
            projections, packed = layers[turn[0] % LAYERS]
            turn[0] += 1
            h = gate_up_swiglu(x, packed, idx, stream=stream)
            return down_combine(h, packed, idx, weights, stream=stream)

        fused_ms = _time(fused)
        measured_T = T if device.type != mx.DeviceType.cpu else min(T, CPU_STOCK_TOKENS)
        xs, (idx_s, w_s) = x[:measured_T], (idx[:measured_T], weights[:measured_T])
        stock_ms = _time(lambda: _stock(xs, layers[0][0], idx_s, w_s, stream), seconds=0.0, least=1) * T / measured_T
        distinct = len(np.unique(np.asarray(idx)))
        rows.append(SpeedRow(T, fused_ms, stock_ms, measured_T != T, distinct * bytes_per_expert / fused_ms / 1e6))
    return rows, probe
