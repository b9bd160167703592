"""An experiment, not part of the package: GPTQ-style error compensation on
SmolLM2-135M-Instruct, with each group's scale and bias chosen by the
importance-weighted search (fused_moe.quant) on the weights as updated so far.

Full Hessians E[x x^T] of every block linear's inputs, in one pass over the
reference model; columns in order, each quantized error spread over the
columns after it through the upper Cholesky factor of H^-1 (1% damping).
Compared with the weighted search alone on the same statistics and text.
Slow (a Python loop per column) and it needs full Hessians, which the
converter cannot hold for MoE experts (7.3 GB per layer at the REAP shapes).

    python benchmarks/gptq_experiment.py
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

import quant_quality as qq
from fused_moe import quant
from fused_moe.quant import quantizer
from fused_moe.quant.text import read_texts, tokenize

BITS, GROUP_SIZE, DAMPING = 3, 64, 0.01


def gptq(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """w [out, in] (bf16 values) quantized with error compensation; returns
    the dequantized weights transposed, [in, out], as qq.Llama reads them."""
    top = float((1 << BITS) - 1)
    out, n = w.shape
    d = np.diag(h).astype(np.float64).copy()
    h = h.astype(np.float64) + np.eye(n) * DAMPING * d.mean()
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    w = w.astype(np.float64).copy()
    what = np.zeros((out, n), np.float32)
    for g in range(n // GROUP_SIZE):
        cols = slice(g * GROUP_SIZE, (g + 1) * GROUP_SIZE)
        wg = w[:, cols].astype(np.float32)
        _, rs, rb = mx.quantize(mx.array(wg).astype(mx.bfloat16), group_size=GROUP_SIZE, bits=BITS)
        _, s, b = quantizer._search(wg[:, None, :], d[cols].astype(np.float32)[None, :],
                                    np.array(rs.astype(mx.float32)), np.array(rb.astype(mx.float32)),
                                    BITS, mx.bfloat16)
        s, b = s[:, 0].astype(np.float64), b[:, 0].astype(np.float64)
        for j in range(g * GROUP_SIZE, (g + 1) * GROUP_SIZE):
            q = np.clip(np.rint((w[:, j] - b) / s), 0, top)
            what[:, j] = s * q + b
            err = (w[:, j] - what[:, j]) / u[j, j]
            w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return np.ascontiguousarray(what.T)


def main() -> None:
    tensors, md = mx.load(str(qq.find_gguf()), return_metadata=True)
    model, tok = qq.Llama(tensors, md), qq.gguf_tokenizer(md)
    data = tokenize(read_texts(qq.DEFAULT_TEXT[0]), lambda t: tok.encode(t).ids, seq_len=256, max_tokens=4096,
                    separator=md["tokenizer.ggml.eos_token_id"].item())
    calib, held = data.calibration[:8], data.held_out[:2]
    t0 = time.perf_counter()
    stats = {n: quant.InputStats(model.input_dim(n), full=True) for n in model.wt}
    for i in range(0, len(calib), 4):
        x = model.embed[calib[i:i + 4]]
        for layer in range(model.layers):
            x = model.block(layer, x, {}, stats)
    print(f"full statistics {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    bf16 = {n: np.array(mx.array(model.w[n]).astype(mx.bfloat16).astype(mx.float32)) for n in model.wt}
    compensated = {n: gptq(bf16[n], stats[n].hessian()) for n in model.wt}
    print(f"GPTQ {time.perf_counter() - t0:.0f} s", flush=True)
    weighted, _ = qq.quantize_linears(model, stats, BITS, GROUP_SIZE)
    rtn, _ = qq.quantize_linears(model, None, BITS, GROUP_SIZE)
    for name, weights in (("RTN", rtn), ("weighted", weighted), ("GPTQ+weighted", compensated)):
        m = qq.Metrics()
        for i in range(0, len(held), 4):
            x = held[i:i + 4]
            ref = model(x[:, :-1], {})
            m.add(ref, model(x[:, :-1], weights), x[:, 1:])
        print(name, m.row(), flush=True)


if __name__ == "__main__":
    main()
