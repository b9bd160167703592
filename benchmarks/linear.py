"""``moe_tok_s.py --linear``: fm.quantized_matmul against mx.quantized_matmul
on the CPU, at MiniMax's 8-bit dense shapes (attention q/k/v/o, lm_head).

Weights are random 8-bit codes, group size 64, in the benchmark's dtype, with
enough copies of each matrix that every call reads from memory, not the
caches. T=1 is compared with the read probe (weight bytes per second), T=512
with the fp32 matmul probe (GFLOP/s); the lm_head shape is timed at T=1 only
(at T=512 stock would take minutes). Medians of a few calls.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

import fused_moe as fm

# (name, K in, N out)
SHAPES = [
    ("q_proj 3072->6144", 3072, 6144),
    ("k/v_proj 3072->1024", 3072, 1024),
    ("o_proj 6144->3072", 6144, 3072),
    ("lm_head 3072->200064", 3072, 200064),
]
BITS, GROUP = 8, 64
# Bytes of weights cycled through per shape: well beyond the caches.
CYCLE_BYTES = 256 << 20


def _matrices(K: int, N: int, dtype, copies: int):
    out = []
    for _ in range(copies):
        codes = mx.random.randint(0, 2**31 - 1, (N, K * BITS // 32), dtype=mx.int32).view(mx.uint32)
        scales = (mx.random.uniform(0.5, 1.5, (N, K // GROUP)) * (2 * K**-0.5 / 255)).astype(dtype)
        biases = (-scales.astype(mx.float32) * 127.5).astype(dtype)
        out.append((codes, scales, biases))
    mx.eval(out)
    return out


# Seconds of calls a measurement takes at least: a 0.3 ms call needs many
# for its median to settle (the probe before it leaves the threads idle).
MIN_SECONDS = 0.3


def _median_time(fn, calls: int) -> float:
    """Median of at least `calls` calls and at least MIN_SECONDS of them."""
    mx.eval(fn())
    times = []
    begin = time.perf_counter()
    while len(times) < calls or time.perf_counter() - begin < MIN_SECONDS:
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(dtype, probes, stock: bool = True) -> list[str]:
    lines = [
        f"quantized_matmul, {BITS}-bit g{GROUP}, {str(dtype).split('.')[-1]} activations, CPU "
        f"({fm.cpu_isa()}, {fm.get_num_threads()} threads):",
        f"  {'shape':22}{'T':>5}{'fused ms':>10}{'stock ms':>10}{'speedup':>9}{'GB/s':>8}{'%read':>7}"
        f"{'GFLOP/s':>9}{'%fp32':>7}",
    ]
    for name, K, N in SHAPES:
        weight_bytes = N * K * BITS // 8 + 2 * N * (K // GROUP) * dtype.size
        copies = max(1, min(8, CYCLE_BYTES // weight_bytes))
        mats = _matrices(K, N, dtype, copies)
        for T in (1, 512):
            if T > 1 and N > 10000:
                continue
            x = mx.random.normal((T, K)).astype(dtype)
            turn = [0]

            def call(op):
                turn[0] = (turn[0] + 1) % copies
                w, s, b = mats[turn[0]]
                return op(x, w, s, b)

            fused = lambda: call(lambda x, w, s, b: fm.quantized_matmul(x, w, s, b, BITS, GROUP))
            ref = lambda: call(lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, True, GROUP, BITS))
            probes.sample()
            t_fused = _median_time(fused, 7 if T == 1 else 3)
            t_stock = _median_time(ref, 2 if T == 1 else 1) if stock else float("nan")
            probes.sample()
            gb_s = weight_bytes / t_fused / 1e9
            gflop_s = 2 * T * N * K / t_fused / 1e9
            lines.append(
                f"  {name:22}{T:>5}{t_fused * 1e3:>10.2f}{t_stock * 1e3:>10.1f}{t_stock / t_fused:>8.1f}x"
                f"{gb_s:>8.1f}{100 * gb_s / probes.gb_s:>6.0f}%{gflop_s:>9.1f}{100 * gflop_s / probes.gflop_s:>6.0f}%"
            )
        del mats
    lines.append(
        f"  probes (medians): read {probes.gb_s:.1f} GB/s, fp32 matmul {probes.gflop_s:.1f} GFLOP/s; "
        f"targets: T=1 >= 80% of read, T=512 >= 50% of fp32"
    )
    return lines
