"""Long contexts and the quantized KV cache: the attention kernel's key split
(decode), its tiles of query rows (long prompts) and
fused_moe.quantized_scaled_dot_product_attention over mlx-lm's
QuantizedKVCache.

Every case is checked against an fp64 reference built from the arrays the
kernel reads (a quantized cache dequantized as MLX does, scale·code + bias
in fp32), under the tolerance rule: mx.fast.scaled_dot_product_attention is
stock for a float cache, mlx-lm's quantized_scaled_dot_product_attention
for a quantized one. The CPU results are bit-identical at every thread count,
whether the keys are split across threads or not.
"""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import base, minimax
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import fused_moe as fm
from fused_moe import _ext
from fused_moe.models import minimax_attention
from support.tolerance import assert_within_tolerance, rel_err, slack

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
CHUNK = 512  # keys per partial softmax (cpu/kernels.h, kAttentionKeyChunk)


def normal(shape, dtype, seed, scale=1.0):
    return (mx.random.normal(shape, key=mx.random.key(seed)) * scale).astype(dtype)


def dequantized(codes, scales, biases, bits, group_size) -> np.ndarray:
    """fp64 values as the kernel reads them: scale·code + bias in fp32."""
    w = mx.dequantize(codes, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    return np.array(w, dtype=np.float64)


def reference(q, k, v, scale, causal) -> np.ndarray:
    """fp64 softmax(q·kᵀ·scale)·v over float arrays (k, v already fp64 or mx)."""
    q = np.array(q.astype(mx.float32), dtype=np.float64)
    k, v = (np.array(a.astype(mx.float32), dtype=np.float64) if isinstance(a, mx.array) else a for a in (k, v))
    L, S = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if causal:
        s = np.where(np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def quantized_stock(q, kq, vq, scale, mask, bits, group_size):
    # mlx-lm scales its queries in place (queries *= scale): a copy of q.
    return base.quantized_scaled_dot_product_attention(
        mx.array(q), kq, vq, scale=scale, mask=mask, group_size=group_size, bits=bits)


def at_threads(n, call):
    before = fm.get_num_threads()
    try:
        fm.set_num_threads(n)
        out = call()
        mx.eval(out)
        return np.array(out.astype(mx.float32))
    finally:
        fm.set_num_threads(before)


def assert_thread_invariant(call, counts=(1, 2, 3, 16)):
    outs = [at_threads(n, call) for n in counts]
    for n, o in zip(counts[1:], outs[1:]):
        assert np.array_equal(o, outs[0], equal_nan=True), f"{n} threads differ from {counts[0]}"


# ---------------------------------------------------------------------------
# Float cache: split decode, long prompts
# ---------------------------------------------------------------------------

# (B, Hq, Hkv, L, S, Dh, causal): decode at lengths around whole chunks (one
# key, one chunk less or more one key, many chunks and a remainder), MiniMax's
# GQA 48/8; a decode with more query heads per KV head than a task takes (12);
# a few rows (speculative decoding) over a split cache.
DECODE_CASES = [
    (1, 48, 8, 1, 1, 128, False),
    (1, 48, 8, 1, CHUNK - 1, 128, False),
    (1, 48, 8, 1, CHUNK + 1, 128, True),
    (2, 8, 2, 1, 3 * CHUNK + 77, 64, False),
    (1, 12, 1, 1, 2 * CHUNK + 5, 32, False),
    (1, 16, 4, 3, 4 * CHUNK - 3, 64, True),
]


def case_id(c):
    return "x".join(map(str, c[:6])) + ("c" if c[6] else "")


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_decode_matches_reference(case, dtype, stream):
    B, Hq, Hkv, L, S, Dh, causal = case
    q, k, v = normal((B, Hq, L, Dh), dtype, 1), normal((B, Hkv, S, Dh), dtype, 2), normal((B, Hkv, S, Dh), dtype, 3)
    scale, mask = Dh**-0.5, "causal" if causal else None
    fused = fm.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    assert_within_tolerance(fused, stock, reference(q, k, v, scale, causal), dtype, f"decode {case}")
    if stream == mx.cpu:
        assert_thread_invariant(lambda: fm.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))


# (B, Hq, Hkv, L, S, Dh): a whole prompt (S = L) and chunked prefill, the
# queries after a cached prefix (mlx-lm's prefill_step_size); row tiles and
# key chunks that do not divide L and S.
PREFILL_CASES = [
    (1, 12, 2, 300, 300, 64),
    (1, 6, 1, 137, 1200, 128),
    (2, 4, 4, 19, 19, 32),
    (1, 8, 1, 600, 600, 16),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_causal_prefill_matches_mlx_in_float32(case, stream):
    B, Hq, Hkv, L, S, Dh = case
    q, k, v = (normal(s, mx.float32, seed) for s, seed in (((B, Hq, L, Dh), 4), ((B, Hkv, S, Dh), 5), ((B, Hkv, S, Dh), 6)))
    scale = Dh**-0.5
    fused = fm.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal", stream=stream)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal", stream=stream)
    assert_within_tolerance(fused, stock, reference(q, k, v, scale, True), mx.float32, f"prefill {case}")
    if stream == mx.cpu:
        assert_thread_invariant(lambda: fm.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=str)
def test_causal_prefill_half_precision(dtype, stream):
    q, k, v = normal((1, 12, 200, 64), dtype, 7), normal((1, 2, 700, 64), dtype, 8), normal((1, 2, 700, 64), dtype, 9)
    fused = fm.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", stream=stream)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", stream=stream)
    assert_within_tolerance(fused, stock, reference(q, k, v, 0.125, True), dtype, "prefill")


def test_nan_query_rows_stay_in_their_rows():
    # Decode (keys split) and a tile of prompt rows: a NaN in one query
    # vector makes that output row NaN and changes no other bit.
    for L, S in ((1, 3 * CHUNK + 10), (11, 900)):
        q, k, v = normal((1, 8, L, 64), mx.float32, 10), normal((1, 2, S, 64), mx.float32, 11), normal((1, 2, S, 64), mx.float32, 12)
        call = lambda q: fm.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
        clean = at_threads(2, lambda: call(q))
        bad = np.array(q)
        bad[0, 5, L // 2, 3] = np.nan
        got = at_threads(2, lambda: call(mx.array(bad)))
        assert np.isnan(got[0, 5, L // 2]).all()
        got[0, 5, L // 2] = clean[0, 5, L // 2]
        assert np.array_equal(got, clean)


def test_nan_key_reaches_only_the_rows_that_see_it():
    # A NaN in the key and value of prompt position 40: rows before it
    # (causal) keep every bit, rows from it on are NaN.
    L = 64
    q, k, v = normal((1, 4, L, 32), mx.float32, 13), normal((1, 1, L, 32), mx.float32, 14), normal((1, 1, L, 32), mx.float32, 15)
    clean = np.array(fm.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal"))
    kb, vb = np.array(k), np.array(v)
    kb[0, 0, 40, 0] = vb[0, 0, 40, 1] = np.nan
    got = np.array(fm.scaled_dot_product_attention(q, mx.array(kb), mx.array(vb), scale=0.2, mask="causal"))
    assert np.array_equal(got[:, :, :40], clean[:, :, :40])
    assert np.isnan(got[:, :, 40:]).all()


@pytest.mark.slow
def test_long_decode_many_chunks():
    # 40k cached positions, MiniMax's heads: 79 chunks per KV head.
    S = 40_000
    q, k, v = normal((1, 48, 1, 128), mx.bfloat16, 16), normal((1, 8, S, 128), mx.bfloat16, 17), normal((1, 8, S, 128), mx.bfloat16, 18)
    fused = fm.scaled_dot_product_attention(q, k, v, scale=128**-0.5)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)
    assert_within_tolerance(fused, stock, reference(q, k, v, 128**-0.5, False), mx.bfloat16, "40k decode")
    assert_thread_invariant(lambda: fm.scaled_dot_product_attention(q, k, v, scale=128**-0.5), counts=(1, 2, 5))


# ---------------------------------------------------------------------------
# Quantized cache
# ---------------------------------------------------------------------------


def quantized_kv(B, Hkv, S, Dh, dtype, bits, group_size, seed, pad=0):
    """k, v quantized as QuantizedKVCache stores them, each (codes, scales,
    biases); with `pad`, slices of buffers `pad` positions longer (the cache
    hands over its buffers' first `offset` positions)."""
    out = []
    for i in range(2):
        x = normal((B, Hkv, S + pad, Dh), dtype, seed + i)
        parts = mx.quantize(x, group_size=group_size, bits=bits)
        out.append(tuple(p[:, :, :S] for p in parts))
    return out


def check_quantized(q, kq, vq, causal, bits, group_size, stream, what):
    scale = q.shape[-1] ** -0.5
    mask = "causal" if causal else None
    fused = fm.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=scale, mask=mask, bits=bits, group_size=group_size, stream=stream)
    stock = quantized_stock(q, kq, vq, scale, mask, bits, group_size)
    ref = reference(q, dequantized(*kq, bits, group_size), dequantized(*vq, bits, group_size), scale, causal)
    assert fused.shape == q.shape and fused.dtype == q.dtype
    assert_within_tolerance(fused, stock, ref, q.dtype, what)
    return fused


# (B, Hq, Hkv, L, S, Dh, causal, group_size): MiniMax decode at mlx-lm's
# default group size, over one key, one chunk and one key past it, several
# chunks; a prompt after a cached prefix; multi-head; the largest groups; a
# head of 256 in groups of 32 (8 groups).
QUANT_CASES = [
    (1, 48, 8, 1, 1, 128, False, 64),
    (1, 48, 8, 1, CHUNK + 1, 128, False, 64),
    (2, 8, 2, 1, 3 * CHUNK - 5, 64, True, 32),
    (1, 12, 2, 23, 700, 128, True, 64),
    (1, 6, 6, 5, 130, 128, True, 128),
    (1, 4, 1, 2, 70, 256, False, 32),
]


@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: case_id(c) + f"g{c[7]}")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantized_cache_matches_reference(case, bits, dtype, stream):
    B, Hq, Hkv, L, S, Dh, causal, gs = case
    q = normal((B, Hq, L, Dh), dtype, 20)
    kq, vq = quantized_kv(B, Hkv, S, Dh, dtype, bits, gs, 21, pad=37)
    check_quantized(q, kq, vq, causal, bits, gs, stream, f"quantized {case} bits={bits}")
    if stream == mx.cpu:
        assert_thread_invariant(lambda: fm.quantized_scaled_dot_product_attention(
            q, kq, vq, scale=0.1, mask="causal" if causal else None, bits=bits, group_size=gs))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_as_mlx_lm_hands_it_over(bits, stream):
    # A real QuantizedKVCache: a prompt of 300 positions then decode steps;
    # update_and_fetch returns slices of its 256-step buffers.
    cache = QuantizedKVCache(group_size=64, bits=bits)
    q = normal((1, 16, 1, 128), mx.bfloat16, 22)
    kq, vq = cache.update_and_fetch(normal((1, 4, 300, 128), mx.bfloat16, 23), normal((1, 4, 300, 128), mx.bfloat16, 24))
    assert kq[0].shape[2] == 300 and cache.keys[0].shape[2] == 512
    check_quantized(q, kq, vq, False, bits, 64, stream, "QuantizedKVCache, 300")
    for step in range(2):
        kq, vq = cache.update_and_fetch(normal((1, 4, 1, 128), mx.bfloat16, 25 + step), normal((1, 4, 1, 128), mx.bfloat16, 27 + step))
    check_quantized(q, kq, vq, False, bits, 64, stream, "QuantizedKVCache, 302")


def test_quantized_cache_strided_views(stream):
    # Codes whose last axis is strided (gathered row by row), a batch
    # broadcast (stride 0).
    q = normal((2, 4, 1, 64), mx.bfloat16, 30)
    k = normal((2, 2, 90, 64), mx.bfloat16, 31)
    codes, scales, biases = mx.quantize(k, group_size=32, bits=4)
    strided = mx.contiguous(codes.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    check_quantized(q, (strided, scales, biases), (codes, scales, biases), False, 4, 32, stream, "strided codes")
    one = tuple(mx.broadcast_to(p, (2,) + p.shape[1:]) for p in mx.quantize(k[:1] * 2, group_size=32, bits=4))
    check_quantized(q, one, one, False, 4, 32, stream, "broadcast batch")


def test_quantized_nan_rows_stay_in_their_rows():
    kq, vq = quantized_kv(1, 2, 2 * CHUNK + 3, 64, mx.bfloat16, 8, 64, 32)
    for L in (1, 9):
        q = normal((1, 8, L, 64), mx.bfloat16, 33)
        call = lambda q: fm.quantized_scaled_dot_product_attention(q, kq, vq, scale=0.125, bits=8, group_size=64)
        clean = at_threads(2, lambda: call(q))
        bad = np.array(q.astype(mx.float32))
        bad[0, 2, L - 1, 0] = np.nan
        got = at_threads(2, lambda: call(mx.array(bad).astype(mx.bfloat16)))
        assert np.isnan(got[0, 2, L - 1]).all()
        got[0, 2, L - 1] = clean[0, 2, L - 1]
        assert np.array_equal(got, clean)


def test_quantized_under_compile(stream):
    q = normal((1, 4, 3, 64), mx.float32, 34)
    kq, vq = quantized_kv(1, 2, 40, 64, mx.float32, 8, 32, 35)
    attend = lambda q: fm.quantized_scaled_dot_product_attention(q, kq, vq, scale=0.2, mask="causal", bits=8,
                                                                 group_size=32, stream=stream)
    assert np.array_equal(np.array(mx.compile(attend)(q)), np.array(attend(q)))


def test_quantized_errors():
    q = mx.zeros((1, 4, 1, 64))
    kq = mx.quantize(mx.zeros((1, 2, 8, 64)), group_size=32, bits=8)
    k4 = mx.quantize(mx.zeros((1, 2, 8, 64)), group_size=32, bits=4)
    qsdpa = lambda q=q, k=kq, v=kq, bits=8, gs=32, **kw: fm.quantized_scaled_dot_product_attention(
        q, k, v, scale=1.0, bits=bits, group_size=gs, **kw)
    cases = [
        (lambda: qsdpa(bits=3), "KV cache bits=3 is not supported; supported bits: {4, 8}"),
        (lambda: qsdpa(gs=16), "KV cache group_size=16 is not supported"),
        (lambda: qsdpa(q=mx.zeros((1, 4, 1, 48)), gs=32), "head_dim=48 is not a multiple of group_size=32"),
        (lambda: qsdpa(bits=4), "must both be [1, 2, 8, 8] for q [1, 4, 1, 64] at bits=4"),
        (lambda: qsdpa(k=k4, bits=4, v=(k4[0], k4[1][..., :1], k4[2])), "v_scales must be [1, 2, 8, 2] (one per 32 values), got [1, 2, 8, 1]"),
        (lambda: qsdpa(k=(kq[0].astype(mx.int32), *kq[1:])), "k_codes must be uint32"),
        (lambda: qsdpa(k=(kq[0], kq[1][..., :1], kq[2])), "k_scales must be [1, 2, 8, 2]"),
        (lambda: qsdpa(k=(kq[0], kq[1], kq[2].astype(mx.float16))), "k_biases must be in the dtype of q (float32), got float16"),
        (lambda: qsdpa(q=mx.zeros((1, 3, 1, 64))), "q has 3 heads, not a multiple of k's 2"),
        (lambda: qsdpa(q=mx.zeros((1, 4, 9, 64)), mask="causal"), "q has 9, k 8"),
        (lambda: qsdpa(q=q.astype(mx.int32)), "q must be float16, bfloat16 or float32"),
        (lambda: qsdpa(mask="window"), "mask must be None or 'causal'"),
        (lambda: qsdpa(k=tuple(p[:, :, :0] for p in kq), v=tuple(p[:, :, :0] for p in kq)), "no positions"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_supported_kv_cache_bits_come_from_the_extension():
    assert fm.SUPPORTED_KV_CACHE_BITS == _ext.SUPPORTED_KV_CACHE_BITS == (4, 8)


# ---------------------------------------------------------------------------
# MiniMaxAttention with a QuantizedKVCache
# ---------------------------------------------------------------------------

ARGS = minimax.ModelArgs(
    model_type="minimax", hidden_size=256, intermediate_size=64, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=4096, num_experts_per_tok=2, num_local_experts=4,
    shared_intermediate_size=0, num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=5e6, rotary_dim=32,
    vocab_size=32, head_dim=64)


class _Rope(nn.RoPE):
    pass


class _RMSNorm(nn.RMSNorm):
    pass


def attention_pair(stock_qk: bool = False):
    """mlx-lm's MiniMaxAttention and the fused one on the same modules. With
    `stock_qk`, q and k go through MLX's own norm and RoPE on both sides
    (MiniMaxAttention calls modules of other classes as they are): the
    caches then get the very same keys, so a quantized cache the very same
    codes, and only the attention differs."""
    mx.random.seed(40)
    stock = minimax.MiniMaxAttention(ARGS)
    for norm in (stock.q_norm, stock.k_norm):
        norm.weight = 1 + 0.1 * mx.random.normal(norm.weight.shape)
    if stock_qk:
        rope = _Rope(stock.rope.dims, traditional=stock.rope.traditional, base=stock.rope.base)
        stock.rope = rope
        for name in ("q_norm", "k_norm"):
            norm = _RMSNorm(stock[name].weight.shape[0], eps=stock[name].eps)
            norm.weight = stock[name].weight
            stock[name] = norm
    mx.eval(stock.parameters())
    return stock, fm.MiniMaxAttention.from_attention(stock)


@pytest.mark.parametrize("bits", [8, 4])
def test_minimax_attention_runs_a_quantized_cache_on_the_fused_kernel(bits, monkeypatch):
    # The same keys on both sides (stock_qk): codes a rounding apart in the
    # inputs of mx.quantize would differ by a whole step.
    stock, fused = attention_pair(stock_qk=True)
    calls = []
    real = minimax_attention.quantized_scaled_dot_product_attention
    monkeypatch.setattr(minimax_attention, "quantized_scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw["bits"]) or real(*a, **kw))
    stock_cache, fused_cache = QuantizedKVCache(64, bits), QuantizedKVCache(64, bits)
    # Chunked prefill (two chunks, the second after a cached prefix), then
    # decode steps.
    x = normal((1, 45, 256), mx.float32, 41)
    for chunk in (x[:, :30], x[:, 30:]):
        ys = stock(chunk, mask="causal", cache=stock_cache)
        yf = fused(chunk, mask="causal", cache=fused_cache)
        assert rel_err(yf, ys) <= slack(mx.float32)
    for step in range(3):
        t = normal((1, 1, 256), mx.float32, 42 + step)
        ys, yf = stock(t, cache=stock_cache), fused(t, cache=fused_cache)
        assert rel_err(yf, ys) <= slack(mx.float32), f"decode step {step}"
    assert fused_cache.offset == stock_cache.offset == 48
    assert calls == [bits] * 5


def test_minimax_attention_leaves_other_kv_bits_to_mlx():
    # kv_bits outside SUPPORTED_KV_CACHE_BITS: MLX's own attention, as stock.
    stock, fused = attention_pair()
    stock_cache, fused_cache = QuantizedKVCache(64, 6), QuantizedKVCache(64, 6)
    x = normal((1, 9, 256), mx.float32, 45)
    assert rel_err(fused(x, mask="causal", cache=fused_cache), stock(x, mask="causal", cache=stock_cache)) == 0


def test_minimax_attention_float_cache_unchanged():
    stock, fused = attention_pair()
    stock_cache, fused_cache = KVCache(), KVCache()
    x = normal((1, 20, 256), mx.float32, 46)
    assert rel_err(fused(x, mask="causal", cache=fused_cache), stock(x, mask="causal", cache=stock_cache)) <= slack(mx.float32)


# ---------------------------------------------------------------------------
# Generation with a quantized cache: mlx-lm's generate, fused-moe generate
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from support.minimax_models import SMALL, build_model, save_checkpoint

    model, config = build_model(SMALL, seed=3)
    return save_checkpoint(model, config, tmp_path_factory.mktemp("kv") / "stock")


def test_generation_with_kv_bits_reads_the_quantized_cache_on_the_fused_kernel(small_checkpoint, monkeypatch):
    from mlx_lm import generate

    model, tokenizer = fm.load(str(small_checkpoint))
    calls = []
    real = minimax_attention.quantized_scaled_dot_product_attention
    monkeypatch.setattr(minimax_attention, "quantized_scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw["bits"]) or real(*a, **kw))
    generate(model, tokenizer, [5, 17, 42, 99, 7], max_tokens=3, kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    # The prompt's cache is quantized after the prompt is processed: every
    # step from the first sampled token on reads it, in every layer.
    assert calls and set(calls) == {8} and len(calls) % len(model.layers) == 0


def test_fused_moe_generate_passes_kv_bits_through(small_checkpoint):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fused_moe", "generate", "--model", str(small_checkpoint), "--prompt", "Hello world",
         "--max-tokens", "4", "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Generation: 4 tokens" in result.stdout, result.stdout
