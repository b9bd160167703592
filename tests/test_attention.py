"""fused_moe.scaled_dot_product_attention against an fp64 reference, under the
tolerance rule with mx.fast.scaled_dot_product_attention as stock; the cache
layouts it reads in place; bad input; and fused_moe.MiniMaxAttention against
mlx-lm's in float32, with a KV cache.

The op runs on every stream backend present: the CPU kernel, and on a GPU
MLX's own fused attention (what the op calls there). There are no fused_moe
Metal kernels for attention, so the emulator has no part in it.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import minimax
from mlx_lm.models.cache import KVCache

import fused_moe as fm
from support.tolerance import assert_within_tolerance, rel_err, slack

DTYPES = [mx.float32, mx.float16, mx.bfloat16]



def normal(shape, dtype, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def reference(q, k, v, scale, causal) -> np.ndarray:
    """fp64 softmax(q·kᵀ·scale)·v with each KV head repeated for its group."""
    q, k, v = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (q, k, v))
    L, S = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if causal:
        seen = np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None]
        s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def check(q, k, v, causal, dtype, stream, what):
    scale = q.shape[-1] ** -0.5
    mask = "causal" if causal else None
    fused = fm.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    assert fused.shape == q.shape and fused.dtype == dtype
    assert_within_tolerance(fused, stock, reference(q, k, v, scale, causal), dtype, what)


# (B, Hq, Hkv, L, S, Dh, causal): MiniMax decode (GQA 48/8, head_dim 128) at a
# length that is not a whole number of key blocks (64) nor of vector lanes;
# prefill with the causal mask, queries after a cached prefix; multi-head
# attention; a group of more heads than one unit takes (8), so split; one key;
# the smallest and the largest head size.
CASES = [
    (1, 48, 8, 1, 1000, 128, False),
    (1, 48, 8, 1, 1000, 128, True),
    (2, 4, 2, 7, 37, 64, True),
    (1, 6, 6, 5, 130, 32, True),
    (1, 12, 1, 3, 70, 32, False),
    (1, 4, 1, 1, 1, 16, False),
    (1, 2, 1, 2, 9, 512, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("c" if c[6] else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, stream):
    B, Hq, Hkv, L, S, Dh, causal = case
    q, k, v = normal((B, Hq, L, Dh), dtype, 1), normal((B, Hkv, S, Dh), dtype, 2), normal((B, Hkv, S, Dh), dtype, 3)
    check(q, k, v, causal, dtype, stream, f"attention {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cache_views_are_read_in_place(dtype, stream):
    # What a KV cache hands over: a slice of a larger buffer along the
    # sequence axis; also a transposed key (last axis strided) and a batch
    # broadcast (stride 0).
    buf = normal((2, 2, 300, 64), dtype, 4)
    q = normal((2, 6, 1, 64), dtype, 5)
    check(q, buf[:, :, :257], buf[:, :, 3:260], False, dtype, stream, "cache slice")
    kt = normal((2, 2, 64, 90), dtype, 6).transpose(0, 1, 3, 2)
    check(q, kt, kt * 0.5, False, dtype, stream, "transposed keys")
    one = normal((1, 2, 40, 64), dtype, 7)
    check(q, mx.broadcast_to(one, (2, 2, 40, 64)), mx.broadcast_to(one, (2, 2, 40, 64)), False, dtype, stream, "broadcast batch")


def test_bit_identical_across_thread_counts():
    q, k, v = normal((1, 48, 2, 128), mx.bfloat16, 8), normal((1, 8, 700, 128), mx.bfloat16, 9), normal((1, 8, 700, 128), mx.bfloat16, 10)
    before = fm.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 7):
            fm.set_num_threads(n)
            outs.append(np.array(fm.scaled_dot_product_attention(q, k, v, scale=0.1, mask="causal").astype(mx.float32)))
    finally:
        fm.set_num_threads(before)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_under_compile(stream):
    q, k, v = normal((1, 4, 3, 32), mx.float32, 30), normal((1, 2, 10, 32), mx.float32, 31), normal((1, 2, 10, 32), mx.float32, 32)
    attend = lambda q, k, v: fm.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", stream=stream)
    assert np.array_equal(np.array(mx.compile(attend)(q, k, v)), np.array(attend(q, k, v)))
    x = normal((1, 3, 128), mx.float32, 33)
    rotate = lambda x: fm.norm_rope(x, None, heads=4, eps=1e-6, rotary_dim=16, base=1e4, offset=5, stream=stream)
    assert np.array_equal(np.array(mx.compile(rotate)(x)), np.array(rotate(x)))


def test_extreme_scores_stay_finite():
    # Scores far apart (one key dominates) and all equal: no overflow, no NaN.
    q = mx.full((1, 2, 1, 16), 30.0)
    k = mx.concatenate([mx.full((1, 1, 1, 16), 30.0), mx.full((1, 1, 99, 16), -30.0)], axis=2)
    v = normal((1, 1, 100, 16), mx.float32, 11)
    out = fm.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert np.allclose(np.array(out[0, 0, 0]), np.array(v[0, 0, 0]), rtol=1e-6, atol=1e-6)
    flat = fm.scaled_dot_product_attention(mx.zeros((1, 2, 1, 16)), k, v, scale=1.0)
    assert np.allclose(np.array(flat[0, 1, 0]), np.array(v[0, 0].mean(0)), rtol=1e-5, atol=1e-6)


def test_errors():
    q, k = mx.zeros((1, 4, 1, 32)), mx.zeros((1, 2, 8, 32))
    sdpa = fm.scaled_dot_product_attention
    cases = [
        (lambda: sdpa(q[0], k, k, scale=1.0), "q must be 4-D"),
        (lambda: sdpa(q, k.astype(mx.float16), k, scale=1.0), "k must be float16, bfloat16 or float32, in the dtype of q"),
        (lambda: sdpa(q.astype(mx.int32), k, k, scale=1.0), "q must be float16"),
        (lambda: sdpa(q, mx.zeros((1, 3, 8, 32)), mx.zeros((1, 3, 8, 32)), scale=1.0), "not a multiple of k's 3"),
        (lambda: sdpa(q, k, mx.zeros((1, 2, 9, 32)), scale=1.0), "must have the shape of k"),
        (lambda: sdpa(q, mx.zeros((2, 2, 8, 32)), mx.zeros((2, 2, 8, 32)), scale=1.0), "does not match q"),
        (lambda: sdpa(mx.zeros((1, 4, 1, 24)), mx.zeros((1, 2, 8, 24)), mx.zeros((1, 2, 8, 24)), scale=1.0), "head_dim=24"),
        (lambda: sdpa(mx.zeros((1, 4, 9, 32)), k, k, scale=1.0, mask="causal"), "q has 9, k 8"),
        (lambda: sdpa(q, k[:, :, :0], k[:, :, :0], scale=1.0), "no positions"),
        (lambda: sdpa(q, k, k, scale=1.0, mask="window"), "mask must be None or 'causal'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


# ---------------------------------------------------------------------------
# fused_moe.norm_rope: q/k RMSNorm + RoPE, heads split out
# ---------------------------------------------------------------------------


def norm_rope_reference(x, weight, heads, eps, rotary_dim, base, traditional, scale, offset) -> np.ndarray:
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    B, L, W = x.shape
    if weight is not None:
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.array(weight.astype(mx.float32), np.float64)
    y = x.reshape(B, L, heads, -1).transpose(0, 2, 1, 3).copy()
    half = rotary_dim // 2
    angle = ((offset + np.arange(L)) * scale)[:, None] * base ** (-2.0 * np.arange(half) / rotary_dim)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    lo = np.arange(half) * 2 if traditional else np.arange(half)
    hi = lo + 1 if traditional else lo + half
    x1, x2 = y[..., lo].copy(), y[..., hi].copy()
    y[..., lo], y[..., hi] = x1 * c - x2 * s, x1 * s + x2 * c
    return y


# (B, L, heads, Dh, rotary_dim, with weight, traditional, offset): MiniMax's
# q and k at decode (48 and 8 heads of 128, rotary 64) deep into the
# context; a prefill; the whole head rotated; no norm.
NORM_ROPE_CASES = [
    (1, 1, 48, 128, 64, True, False, 4000),
    (1, 1, 8, 128, 64, True, False, 17),
    (2, 9, 4, 32, 16, True, False, 0),
    (1, 5, 3, 64, 64, True, True, 100),
    (1, 3, 2, 32, 8, False, False, 7),
]


@pytest.mark.parametrize("case", NORM_ROPE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_rope_matches_reference(case, dtype, stream):
    B, L, H, Dh, rd, with_weight, traditional, offset = case
    x = normal((B, L, H * Dh), dtype, 20) * 3
    weight = (1 + 0.2 * normal((H * Dh,), mx.float32, 21)).astype(dtype) if with_weight else None
    kw = dict(rotary_dim=rd, base=5e6, traditional=traditional, scale=1.0, offset=offset)
    fused = fm.norm_rope(x, weight, heads=H, eps=1e-6, stream=stream, **kw)
    stock = mx.fast.rms_norm(x, weight, 1e-6, stream=stream) if with_weight else x
    stock = stock.reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
    stock = mx.fast.rope(stock, rd, traditional=traditional, base=5e6, scale=1.0, offset=offset, stream=stream)
    assert fused.shape == (B, H, L, Dh) and fused.dtype == stock.dtype == dtype
    ref = norm_rope_reference(x, weight, H, 1e-6, rd, 5e6, traditional, 1.0, offset)
    assert_within_tolerance(fused, stock, ref, dtype, f"norm_rope {case}")


def test_norm_rope_promotes_like_rms_norm_and_is_bit_identical_across_threads():
    x, w = normal((2, 40, 256), mx.bfloat16, 22), 1 + 0.1 * normal((256,), mx.float32, 23)
    assert fm.norm_rope(x, w, heads=2, eps=1e-5, rotary_dim=64, base=1e4).dtype == mx.float32
    before = fm.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 5):
            fm.set_num_threads(n)
            outs.append(np.array(fm.norm_rope(x, w.astype(mx.bfloat16), heads=2, eps=1e-5, rotary_dim=64, base=1e4, offset=3).astype(mx.float32)))
    finally:
        fm.set_num_threads(before)
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])


def test_norm_rope_errors():
    x = mx.zeros((1, 2, 64))
    nr = lambda x=x, w=None, **kw: fm.norm_rope(x, w, **{**dict(heads=2, eps=1e-6, rotary_dim=16, base=1e4), **kw})
    cases = [
        (lambda: nr(x[0]), "x must be float16, bfloat16 or float32 \\[B, L, heads\\*head_dim\\]"),
        (lambda: nr(x.astype(mx.int32)), "x must be float16"),
        (lambda: nr(heads=3), "64 values, not a whole number of heads=3"),
        (lambda: nr(rotary_dim=5), "rotary_dim=5 must be even"),
        (lambda: nr(rotary_dim=64), "rotary_dim=64 must be even, from 2 to head_dim=32"),
        (lambda: nr(w=mx.ones((32,))), "weight must be a float \\[64\\] array"),
        (lambda: nr(offset=-1), "offset at least 0"),
        (lambda: nr(base=0.0), "base must be positive"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------------------
# fused_moe.MiniMaxAttention against mlx-lm's, float32
# ---------------------------------------------------------------------------

ARGS = minimax.ModelArgs(
    model_type="minimax", hidden_size=256, intermediate_size=64, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=4096, num_experts_per_tok=2, num_local_experts=4,
    shared_intermediate_size=0, num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=5e6, rotary_dim=32,
    vocab_size=32, head_dim=64)


def attention_pair():
    stock = minimax.MiniMaxAttention(ARGS)
    mx.random.seed(12)
    stock.update(stock.parameters())  # materialize the initial weights
    for norm in (stock.q_norm, stock.k_norm):
        norm.weight = 1 + 0.1 * mx.random.normal(norm.weight.shape)
    mx.eval(stock.parameters())
    return stock, fm.MiniMaxAttention.from_attention(stock)


def test_minimax_attention_matches_mlx_lm_with_a_cache():
    stock, fused = attention_pair()
    assert fused.q_proj is stock.q_proj and fused.q_norm is stock.q_norm
    stock_cache, fused_cache = KVCache(), KVCache()
    # Prefill of 37 tokens (causal), then decode steps one token at a time.
    x = normal((1, 37, 256), mx.float32, 13)
    ys = stock(x, mask="causal", cache=stock_cache)
    yf = fused(x, mask="causal", cache=fused_cache)
    assert rel_err(yf, ys) <= slack(mx.float32)
    for step in range(3):
        t = normal((1, 1, 256), mx.float32, 14 + step)
        ys, yf = stock(t, cache=stock_cache), fused(t, cache=fused_cache)
        assert rel_err(yf, ys) <= slack(mx.float32), f"decode step {step}"
    assert fused_cache.offset == stock_cache.offset == 40


def test_minimax_attention_takes_array_masks_as_stock_does():
    stock, fused = attention_pair()
    x = normal((2, 5, 256), mx.float32, 17)
    mask = mx.array([[True] * 5, [False, False, True, True, True]])[:, None, None, :]
    assert rel_err(fused(x, mask=mask), stock(x, mask=mask)) == 0


def test_minimax_attention_refuses_unsupported_head_dims():
    args = minimax.ModelArgs(**{**ARGS.__dict__, "head_dim": 24})
    with pytest.raises(ValueError, match="head_dim 24"):
        fm.MiniMaxAttention.from_attention(minimax.MiniMaxAttention(args))
