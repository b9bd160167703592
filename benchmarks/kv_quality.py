"""The quantized KV cache's quality cost on the synthetic model: logits over
mlx-lm's QuantizedKVCache against those over the bf16 cache.

The ``--e2e`` model (e2e.py, patched) takes a prompt of ``--context``
random tokens as generation does (steps of 2048; with ``kv_bits`` the cache
is quantized from the first step on, as ``quantized_kv_start=0`` does),
then ``--steps`` more tokens one at a time, the same tokens for every
cache (the bf16 run's greedy choices). Each step's logits are compared with
the bf16 cache's: relative max error, KL divergence of the softmax, top-1
agreement and top-5 overlap. Random weights: the tokens mean nothing, but
the cache holds what the model's own projections wrote.

    python benchmarks/kv_quality.py --context 8192 --steps 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import maybe_quantize_kv_cache  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import e2e  # noqa: E402
import fused_moe as fm  # noqa: E402
from vs_llamacpp import build_ours  # noqa: E402


def run(model, prompt: mx.array, steps: int, kv_bits, forced=None):
    """Logits (float64, [steps + 1, vocab]) after the prompt and after each
    next token; the next tokens are `forced`, or greedy."""
    cache = make_prompt_cache(model)
    quantize = lambda: maybe_quantize_kv_cache(cache, 0, e2e.KV_GROUP_SIZE, kv_bits)
    for i in range(0, prompt.size - 1, e2e.PREFILL_STEP):
        model(prompt[i : min(i + e2e.PREFILL_STEP, prompt.size - 1)][None], cache=cache)
        quantize()
        mx.eval([c.state for c in cache])
    token = prompt[-1:]
    out, tokens = [], []
    for s in range(steps + 1):
        logits = model(token[None], cache=cache)[0, -1].astype(mx.float32)
        quantize()
        mx.eval(logits)
        out.append(np.array(logits, dtype=np.float64))
        nxt = int(np.argmax(out[-1])) if forced is None else forced[s]
        tokens.append(nxt)
        token = mx.array([nxt])
    return np.stack(out), tokens


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top5 = lambda x: np.argsort(-x, axis=-1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5(ref), top5(got))]
    return dict(
        rel_err=float(np.abs(got - ref).max() / np.abs(ref).max()),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()),
        top1=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        top5=float(np.mean(overlap)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    model = build_ours(args.layers)
    prompt = mx.random.randint(0, e2e.VOCAB, (args.context,), key=mx.random.key(1))
    start = time.perf_counter()
    ref, tokens = run(model, prompt, args.steps, None)
    print(f"{args.layers}-layer synthetic MiniMax (patched, CPU kernels {fm.cpu_isa()}), a prompt of "
          f"{args.context} random tokens then {args.steps} tokens (the bf16 run's greedy ones); "
          f"logits against the bf16 cache's, {args.steps + 1} positions (bf16 run {time.perf_counter() - start:.0f} s):")
    print(f"  {'cache':>12} {'rel. max err':>13} {'KL mean':>10} {'KL max':>10} {'top-1 agree':>12} {'top-5 overlap':>14}")
    for bits in args.kv_bits:
        got, _ = run(model, prompt, args.steps, bits, forced=tokens)
        c = compare(ref, got)
        print(f"  {f'{bits}-bit g{e2e.KV_GROUP_SIZE}':>12} {c['rel_err']:>13.3g} {c['kl_mean']:>10.3g} "
              f"{c['kl_max']:>10.3g} {100 * c['top1']:>11.0f}% {100 * c['top5']:>13.0f}%", flush=True)


if __name__ == "__main__":
    main()
