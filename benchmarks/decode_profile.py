"""``moe_tok_s.py --e2e N --e2e-profile``: where one decode step's time goes.

One greedy decode step of the end-to-end model (e2e.py) is taken apart into
the pieces mlx-lm's MiniMax runs, each evaluated on its own and timed, over
a KV cache filled to each context length. It is run with the MoE blocks
patched only (``fused_moe.patch(model, experts_only=True)``: before the
dense layers and the attention had fused kernels) and fully patched. The
extra synchronisation between pieces costs a little; the per-piece split,
not the sum, is the point.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

import e2e
import fused_moe as fm

PARTS = (
    "embedding", "layer norms", "q/k/v projections", "q/k RMSNorm + RoPE", "KV cache update",
    "attention (SDPA)", "o projection", "MoE block", "lm_head",
)


class _Timer:
    def __init__(self) -> None:
        self.ms = dict.fromkeys(PARTS, 0.0)

    def __call__(self, part: str, fn):
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        self.ms[part] += (time.perf_counter() - start) * 1e3
        return out


def _step(model, cache, timer: _Timer) -> mx.array:
    """One decode step of mlx-lm's MiniMax, piece by piece."""
    t = timer
    h = t("embedding", lambda: model.model.embed_tokens(mx.array([[1]])))
    for layer, c in zip(model.layers, cache):
        a = layer.self_attn
        x = t("layer norms", lambda: layer.input_layernorm(h))
        q, k, v = t("q/k/v projections", lambda: (a.q_proj(x), a.k_proj(x), a.v_proj(x)))
        heads = lambda y, n: y.reshape(1, 1, n, -1).transpose(0, 2, 1, 3)
        if isinstance(a, fm.MiniMaxAttention):
            q, k = t("q/k RMSNorm + RoPE", lambda: (a.split_heads(q, a.q_norm, a.num_attention_heads, c.offset),
                                                    a.split_heads(k, a.k_norm, a.num_key_value_heads, c.offset)))
        else:
            q, k = t("q/k RMSNorm + RoPE", lambda: (
                a.rope(heads(a.q_norm(q), a.num_attention_heads), offset=c.offset),
                a.rope(heads(a.k_norm(k), a.num_key_value_heads), offset=c.offset)))
        v = heads(v, a.num_key_value_heads)
        k, v = t("KV cache update", lambda: c.update_and_fetch(k, v))
        if hasattr(c, "bits"):  # mlx-lm's QuantizedKVCache
            sdpa = (partial(fm.quantized_scaled_dot_product_attention, bits=c.bits, group_size=c.group_size)
                    if isinstance(a, fm.MiniMaxAttention)
                    else partial(quantized_scaled_dot_product_attention, bits=c.bits, group_size=c.group_size,
                                 mask=None))
        else:
            sdpa = (fm.scaled_dot_product_attention if isinstance(a, fm.MiniMaxAttention)
                    else mx.fast.scaled_dot_product_attention)
        o = t("attention (SDPA)", lambda: sdpa(q, k, v, scale=a.scale))
        r = h + t("o projection", lambda: a.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1)))
        y = t("layer norms", lambda: layer.post_attention_layernorm(r))
        h = r + t("MoE block", lambda: layer.block_sparse_moe(y))
    out = t("layer norms", lambda: model.model.norm(h))
    return t("lm_head", lambda: model.lm_head(out))


def profile(model, context: int, dtype, steps: int = 3, kv_bits: int | None = None) -> dict[str, float]:
    """Median ms per decode step of each part (all layers together), after
    `context` cached positions (bf16, or quantized to `kv_bits`); one
    warm-up step first."""
    cache = e2e.filled_cache(model, context, dtype, kv_bits=kv_bits)
    _step(model, cache, _Timer())
    runs = []
    for _ in range(steps):
        timer = _Timer()
        _step(model, cache, timer)
        runs.append(timer.ms)
    return {p: statistics.median(r[p] for r in runs) for p in PARTS}


def run(shapes, layers: int, make_projection, vocab: int, contexts=(1024, 4096)) -> dict:
    """{(label, context): {part: ms}} for the MoE-only and the full patch."""
    model = e2e.build_model(shapes, layers, make_projection, vocab)
    out = {}
    fm.patch(model, experts_only=True)
    for ctx in contexts:
        out[("MoE only", ctx)] = profile(model, ctx, shapes.dtype)
    fm.patch(model)
    for ctx in contexts:
        out[("full patch", ctx)] = profile(model, ctx, shapes.dtype)
    return out


def format_result(result: dict, layers: int, vocab: int) -> list[str]:
    cols = list(result)
    lines = [
        f"one decode step, piece by piece ({layers} layers at full width, vocabulary {vocab}; ms, "
        f"median of 3 steps; 'MoE only' = patch(model, experts_only=True)):",
        f"  {'part':20}" + "".join(f"{f'{label} {ctx // 1024}k':>16}" for label, ctx in cols),
    ]
    for part in PARTS:
        lines.append(f"  {part:20}" + "".join(f"{result[c][part]:>16.2f}" for c in cols))
    lines.append(f"  {'total':20}" + "".join(f"{sum(result[c].values()):>16.2f}" for c in cols))
    return lines
