"""``moe_tok_s.py --e2e N``: a synthetic full-width MiniMax with N layers, run
through mlx-lm's generation, stock against patched.

The model is mlx-lm's own MiniMax ``Model`` at the REAP widths (attention 48/8
heads of 128, vocabulary 200,064), quantized like the seed recipe: routed
experts at the benchmark's bits with random codes (4-bit in the first and the
last layer when there are at least three layers and --bits is 3), 8-bit
attention, embedding and lm_head, an unquantized router. Random weights: the
tokens are meaningless, the speed is not.

Prefill is timed as generation does it (mlx-lm's generate_step, and
llama-bench's prompt test): the cache for all but the last of the
``--e2e-prompt`` tokens, in steps of mlx-lm's prefill_step_size (2048),
then the last token's logits; the logits of the other prompt positions are
never computed. Decode is timed over ``--e2e-decode`` greedy steps after
``--e2e-context`` cached positions; the KV cache is filled directly with the
same random keys and values for both models (a 1k-token stock prefill would
take about an hour on the CPU), bf16 or, with ``kv_bits``, mlx-lm's
QuantizedKVCache. The patched model is the same model after
``fused_moe.patch``. The decode floor is the bytes one token must read
(experts routed to, router, attention projections, lm_head, one embedding
row, KV cache) over the run's read probe.
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
    vocab: int
    prompt_tokens: int
    decode_tokens: int
    context: int
    stock_prefill_tps: float
    stock_decode_tps: float
    fused_prefill_tps: float
    fused_decode_tps: float
    floor_bytes: dict  # bytes read per decode token, by part
    read_gb_s: float  # the read probe's median in this run

    @property
    def floor_s(self) -> float:
        return sum(self.floor_bytes.values()) / (self.read_gb_s * 1e9)


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


# mlx-lm's generate_step default: the prompt's cache is built this many
# tokens at a time.
PREFILL_STEP = 2048
# mlx-lm's default kv_group_size.
KV_GROUP_SIZE = 64


def prefill_s(model, prompt: mx.array, step: int = PREFILL_STEP) -> float:
    """Seconds to take in `prompt` as generation does: the cache for all but
    the last token, `step` tokens at a time (only the cache is evaluated,
    so the lm_head of those positions never runs), then the last token's
    logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    start = time.perf_counter()
    for i in range(0, prompt.size - 1, step):
        model(prompt[i : min(i + step, prompt.size - 1)][None], cache=cache)
        mx.eval([c.state for c in cache])
    mx.eval(model(prompt[-1:][None], cache=cache)[:, -1, :])
    return time.perf_counter() - start


def _prefill_tps(model, prompt: mx.array) -> float:
    return prompt.size / prefill_s(model, prompt)


def filled_cache(model, context: int, dtype, seed: int = 0, kv_bits: int | None = None):
    """A prompt cache holding `context` random keys and values in every layer,
    the same for any model of these shapes (a 1k-token stock prefill would
    take about an hour on the CPU); with `kv_bits`, mlx-lm's
    QuantizedKVCache at group size KV_GROUP_SIZE, as generation converts
    it."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    key = mx.random.key(seed)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        shape = (1, attn.num_key_value_heads, context, attn.head_dim)
        key, k1, k2 = mx.random.split(key, 3)
        cache[i].update_and_fetch(mx.random.normal(shape, key=k1).astype(dtype),
                                  mx.random.normal(shape, key=k2).astype(dtype))
        if kv_bits is not None:
            cache[i] = cache[i].to_quantized(group_size=KV_GROUP_SIZE, bits=kv_bits)
        mx.eval(cache[i].state)
    return cache


def _decode_tps(model, context: int, decode: int, vocab: int, dtype, kv_bits: int | None = None) -> float:
    """Greedy decode steps after `context` cached positions; each step's
    token feeds the next, evaluated one at a time as generation does."""
    cache = filled_cache(model, context, dtype, kv_bits=kv_bits)
    token = mx.array([[1]])
    mx.eval(model(token, cache=cache))  # warm-up step
    start = time.perf_counter()
    for _ in range(decode):
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
        mx.eval(token)
    return decode / (time.perf_counter() - start)


def _array_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def kv_cache_bytes(model, context: int, dtype, kv_bits: int | None = None) -> int:
    """Bytes of `context` cached positions over all layers: keys and values,
    bf16 (`dtype`), or codes plus a scale and a bias per KV_GROUP_SIZE
    values."""
    total = 0
    for layer in model.layers:
        values = 2 * context * layer.self_attn.num_key_value_heads * layer.self_attn.head_dim
        if kv_bits is None:
            total += values * dtype.size
        else:
            total += values * kv_bits // 8 + 2 * (values // KV_GROUP_SIZE) * dtype.size
    return total


def decode_floor_bytes(model, context: int, dtype, kv_bits: int | None = None) -> dict:
    """Bytes one decode token must read, by part: the experts it is routed
    to (k of E per layer, in the packed layout), the router gates, the
    attention projections, lm_head, one embedding row and the KV cache."""
    experts = router = attention = 0
    for layer in model.layers:
        moe = layer.block_sparse_moe
        if isinstance(moe, fm.MiniMaxMoE):
            packed = _array_bytes(moe.experts)
            E = moe.experts.num_experts
        else:
            packed = _array_bytes(moe.switch_mlp)
            E = moe.switch_mlp.gate_proj.weight.shape[0]
        experts += packed * moe.num_experts_per_tok // E
        router += _array_bytes(moe.gate)
        attention += sum(_array_bytes(layer.self_attn[p]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    embed = model.model.embed_tokens
    kv_bytes = kv_cache_bytes(model, context, dtype, kv_bits)
    return {
        "experts": experts,
        "router": router,
        "attention": attention,
        "lm_head": _array_bytes(model.lm_head),
        "embedding row": _array_bytes(embed) // embed.weight.shape[0],
        "KV cache": kv_bytes,
    }


def run(shapes, layers: int, prompt_tokens: int, decode_tokens: int, make_projection, vocab: int = VOCAB,
        context: int = 1024, probes=None) -> E2EResult:
    model = build_model(shapes, layers, make_projection, vocab)
    prompt = mx.random.randint(0, vocab, (prompt_tokens,))
    dtype = shapes.dtype
    # Warm up both paths on a short run first, so neither pays one-time costs.
    _prefill_tps(model, prompt[:4])
    stock = (_prefill_tps(model, prompt), _decode_tps(model, context, decode_tokens, vocab, dtype))
    fm.patch(model)
    _prefill_tps(model, prompt[:4])
    if probes is not None:
        probes.sample()
    fused = (_prefill_tps(model, prompt), _decode_tps(model, context, decode_tokens, vocab, dtype))
    if probes is not None:
        probes.sample()
    floor = decode_floor_bytes(model, context, dtype)
    return E2EResult(layers, vocab, prompt_tokens, decode_tokens, context, *stock, *fused, floor,
                     probes.gb_s if probes is not None else float("nan"))


def format_result(r: E2EResult) -> list[str]:
    floor_ms = r.floor_s * 1e3
    parts = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r.floor_bytes.items())
    lines = [
        f"end to end ({r.layers} layers at full width, vocabulary {r.vocab}; prefill: a prompt of "
        f"{r.prompt_tokens} tokens as generation takes it in, the cache for all but the last token "
        f"(steps of {PREFILL_STEP}), then the last token's logits; decode: {r.decode_tokens} greedy "
        f"steps after {r.context} cached positions of random keys and values):",
        f"  {'':8}{'prefill tok/s':>15}{'decode tok/s':>14}{'decode ms':>11}{'% of floor':>12}",
    ]
    for name, pre, dec in (("stock", r.stock_prefill_tps, r.stock_decode_tps),
                           ("fused", r.fused_prefill_tps, r.fused_decode_tps)):
        lines.append(f"  {name:8}{pre:>15.2f}{dec:>14.2f}{1e3 / dec:>11.1f}{100 * floor_ms * dec / 1e3:>11.1f}%")
    lines += [
        f"  {'speedup':8}{r.fused_prefill_tps / r.stock_prefill_tps:>14.2f}x"
        f"{r.fused_decode_tps / r.stock_decode_tps:>13.2f}x",
        f"  decode floor: {sum(r.floor_bytes.values()) / 1e6:.1f} MB per token ({parts}) / read probe "
        f"{r.read_gb_s:.1f} GB/s = {floor_ms:.1f} ms (target: fused >= 60% of the floor and >= 20x stock)",
    ]
    return lines
