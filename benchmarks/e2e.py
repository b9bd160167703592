"""``moe_tok_s.py --e2e N``: a synthetic full-width MiniMax with N layers, run
through mlx-lm's generation, stock against patched.

The model is mlx-lm's own MiniMax ``Model`` at the REAP widths (attention 48/8
heads of 128, vocabulary 200,064), quantized like the seed recipe: routed
experts at the benchmark's bits with random codes (4-bit in the first and the
last layer when there are at least three layers and --bits is 3), 8-bit
attention, embedding and lm_head, an unquantized router. Random weights: the
tokens are meaningless, the speed is not.

Prefill is timed over one prompt of ``--e2e-prompt`` tokens and decode over
``--e2e-decode`` tokens after it, with mlx-lm's ``generate_step``; the
patched model is the same model after ``fused_moe.patch``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

import fused_moe as fm

# Non-expert widths of MiniMax-M2.5 (DESIGN.md, "Model facts").
ATTENTION = dict(
    num_attention_heads=48,
    num_key_value_heads=8,
    head_dim=128,
    rotary_dim=64,
    rope_theta=5e6,
    use_qk_norm=True,
)
VOCAB = 200064


@dataclass
class E2EResult:
    layers: int
    prompt_tokens: int
    decode_tokens: int
    stock_prefill_tps: float
    stock_decode_tps: float
    fused_prefill_tps: float
    fused_decode_tps: float


def build_model(shapes, layers: int, make_projection: Callable, vocab: int = VOCAB) -> nn.Module:
    """An mlx-lm MiniMax model with random quantized weights at `shapes`
    (D, H, E, k, bits, group size, dtype of the benchmark)."""
    from mlx_lm.models import minimax

    args = minimax.ModelArgs.from_dict(
        dict(
            ATTENTION,
            model_type="minimax",
            hidden_size=shapes.D,
            intermediate_size=shapes.H,
            num_local_experts=shapes.E,
            num_experts_per_tok=shapes.k,
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            shared_intermediate_size=0,
            rms_norm_eps=1e-6,
            vocab_size=vocab,
        )
    )
    model = minimax.Model(args)
    for i, layer in enumerate(model.layers):
        bits = shapes.bits
        if shapes.bits == 3 and layers >= 3 and i in (0, layers - 1):
            bits = 4
        s = replace(shapes, bits=bits)
        glu = layer.block_sparse_moe.switch_mlp
        # Replaced before anything evaluates SwitchGLU's float weights.
        glu.gate_proj = make_projection(s, s.H, s.D)
        glu.up_proj = make_projection(s, s.H, s.D)
        glu.down_proj = make_projection(s, s.D, s.H)
    model.set_dtype(shapes.dtype, lambda d: mx.issubdtype(d, mx.floating))
    for layer in model.layers:  # mlx-lm keeps the routing bias in fp32
        layer.block_sparse_moe.e_score_correction_bias = (
            0.05 * mx.random.normal((shapes.E,))
        )
    nn.quantize(
        model,
        group_size=64,
        bits=8,
        class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding))
        and not p.endswith("block_sparse_moe.gate"),
    )
    mx.eval(model.parameters())
    return model


def _tokens_per_second(model, prompt: mx.array, decode: int) -> tuple[float, float]:
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=decode + 1)
    next(steps)  # the prompt's forward pass and the first token
    first = time.perf_counter()
    for _ in steps:
        pass
    end = time.perf_counter()
    return prompt.size / (first - start), decode / (end - first)


def run(shapes, layers: int, prompt_tokens: int, decode_tokens: int, make_projection, vocab: int = VOCAB) -> E2EResult:
    model = build_model(shapes, layers, make_projection, vocab)
    prompt = mx.random.randint(0, vocab, (prompt_tokens,))
    # Warm up both paths on a short prompt first, so neither pays one-time costs.
    _tokens_per_second(model, prompt[:4], 2)
    stock = _tokens_per_second(model, prompt, decode_tokens)
    fm.patch(model)
    _tokens_per_second(model, prompt[:4], 2)
    fused = _tokens_per_second(model, prompt, decode_tokens)
    return E2EResult(layers, prompt_tokens, decode_tokens, *stock, *fused)


def format_result(r: E2EResult) -> list[str]:
    return [
        f"end to end (mlx-lm generate_step, {r.layers} layers, prompt {r.prompt_tokens}, "
        f"decode {r.decode_tokens}):",
        f"  {'':8}{'prefill tok/s':>15}{'decode tok/s':>14}",
        f"  {'stock':8}{r.stock_prefill_tps:>15.2f}{r.stock_decode_tps:>14.2f}",
        f"  {'fused':8}{r.fused_prefill_tps:>15.2f}{r.fused_decode_tps:>14.2f}",
        f"  {'speedup':8}{r.fused_prefill_tps / r.stock_prefill_tps:>14.2f}x"
        f"{r.fused_decode_tps / r.stock_decode_tps:>13.2f}x",
    ]
