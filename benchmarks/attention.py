"""Decode attention alone over a long KV cache, against its floor.

One MiniMax layer's decode step (48 query heads, 8 KV heads of 128, one
query row) over a cache of ``--contexts`` positions, held the way mlx-lm's
caches hold it (a slice of a longer buffer, read in place): bf16
(``KVCache``), and 8- and 4-bit at group size 64 (``QuantizedKVCache``).
The floor is the cache's bytes (codes, scales and biases for the quantized
ones) over the run's read probe; each row is the median of ``--repeats``
calls, the read probe sampled between rows, at each thread count.

    python benchmarks/attention.py --contexts 32768 131072 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fused_moe as fm  # noqa: E402
from probes import Probes  # noqa: E402

HQ, HKV, DH = 48, 8, 128
STEP = 256  # mlx-lm's cache grows in steps of 256 positions


def caches(context: int, bits_list, seed: int = 0):
    """{label: (call, bytes)}: the attention over each cache form."""
    key = mx.random.key(seed)
    kq, kk, kv = mx.random.split(key, 3)
    alloc = (context + STEP) // STEP * STEP
    q = mx.random.normal((1, HQ, 1, DH), key=kq).astype(mx.bfloat16)
    k = mx.random.normal((1, HKV, alloc, DH), key=kk).astype(mx.bfloat16)
    v = mx.random.normal((1, HKV, alloc, DH), key=kv).astype(mx.bfloat16)
    mx.eval(q, k, v)
    scale = DH**-0.5
    out = {}
    ks, vs = k[:, :, :context], v[:, :, :context]
    out["bf16"] = (lambda: fm.scaled_dot_product_attention(q, ks, vs, scale=scale), 2 * ks.size * 2)
    for bits in bits_list:
        kq_ = mx.quantize(k, group_size=64, bits=bits)
        vq_ = mx.quantize(v, group_size=64, bits=bits)
        mx.eval(kq_, vq_)
        kc = [a[:, :, :context] for a in kq_]
        vc = [a[:, :, :context] for a in vq_]
        nbytes = sum(a.size * a.dtype.size for a in kc + vc)
        out[f"{bits}-bit"] = (
            lambda kc=kc, vc=vc, bits=bits: fm.quantized_scaled_dot_product_attention(
                q, kc, vc, scale=scale, bits=bits, group_size=64),
            nbytes,
        )
    del k, v
    return out


def time_call(call, repeats: int) -> float:
    mx.eval(call())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    probes = Probes()
    print(f"decode attention alone, {HQ}/{HKV} heads of {DH}, one query row; CPU kernels {fm.cpu_isa()}, "
          f"{os.cpu_count()} hardware threads; median of {args.repeats} calls")
    print(f"{'context':>8} {'cache':>6} {'threads':>7} {'ms':>8} {'GB/s':>7} {'probe GB/s':>10} {'% of floor':>10}")
    before = fm.get_num_threads()
    try:
        for context in args.contexts:
            forms = caches(context, args.bits)
            for threads in args.threads:
                for label, (call, nbytes) in forms.items():
                    fm.set_num_threads(threads)
                    s = time_call(call, args.repeats)
                    probes.sample()
                    probe = probes.read_gb_s[-1]
                    gb_s = nbytes / s / 1e9
                    print(f"{context:>8} {label:>6} {threads:>7} {s * 1e3:>8.2f} {gb_s:>7.1f} {probe:>10.1f} "
                          f"{100 * gb_s / probe:>9.0f}%", flush=True)
            del forms
    finally:
        fm.set_num_threads(before)
    print(f"read probe median {probes.gb_s:.1f} GB/s (all hardware threads); floor = cache bytes / probe")


if __name__ == "__main__":
    main()
