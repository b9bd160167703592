"""The experts' statistics of the calibration driver (fused_moe.quant.calibrate):
per-expert hessians against a direct computation on a tiny layer (every
expert, one of them reached by no token), near-miss samples, the shrinkage
prior, memory that does not grow with the number of experts, and the
options."""

from __future__ import annotations

import tracemalloc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import minimax

from fused_moe.quant import calibrate as cal
from fused_moe.quant import quantize_weight
from support.minimax_models import SMALL

K = 2


def tiny_layer(E=6, D=64, H=32, seed=0, bias=None):
    """A float32 mlx-lm MiniMax decoder layer with random weights and the
    given routing bias (default: -1 for expert 0, which sigmoid scores in
    (0, 1) then keep out of every token's top k)."""
    args = minimax.ModelArgs.from_dict(dict(
        SMALL, hidden_size=D, intermediate_size=H, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        rotary_dim=16, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=1))
    layer = minimax.MiniMaxDecoderLayer(args)
    rng = np.random.default_rng(seed)
    from mlx.utils import tree_flatten, tree_unflatten

    params = [(k, mx.array(rng.normal(0, 0.3 if "gate" in k else 0.1, size=v.shape).astype(np.float32)))
              for k, v in tree_flatten(layer.parameters())]
    layer.update(tree_unflatten(params))
    if bias is None:
        bias = np.zeros(E, np.float32)
        bias[0] = -1
    layer.block_sparse_moe.e_score_correction_bias = mx.array(np.asarray(bias, np.float32))
    layer.input_layernorm.weight = mx.ones((D,))
    layer.post_attention_layernorm.weight = mx.ones((D,))
    mx.eval(layer.parameters())
    return layer


def states(n=6, L=16, D=64, seed=1):
    return mx.array(np.random.default_rng(seed).normal(size=(n, L, D)).astype(np.float32))


def direct(layer, x):
    """The MoE block's inputs [T, D], each token's selection scores [T, E]
    and top-k [T, k], computed here from the layer's own modules."""
    xs = []
    for i in range(0, x.shape[0], cal.BATCH_SEQUENCES):
        b = x[i:i + cal.BATCH_SEQUENCES]
        r = b + layer.self_attn(layer.input_layernorm(b), "causal")
        xs.append(np.array(layer.post_attention_layernorm(r).reshape(-1, b.shape[-1])))
    xm = np.concatenate(xs)
    moe = layer.block_sparse_moe
    scores = np.array(mx.sigmoid(mx.array(xm) @ moe.gate.weight.T) + moe.e_score_correction_bias)
    topk = np.array(mx.argpartition(-mx.array(scores), kth=K - 1, axis=-1)[..., :K])
    return xm, scores, topk


def record(layer, x, options):
    moe = layer.block_sparse_moe
    sw = moe.switch_mlp
    rec = cal._RecordedExperts(sw, moe, cal.NEAR_MISS_RANKS if options.min_tokens else 0)
    moe.switch_mlp = rec
    try:
        for i in range(0, x.shape[0], cal.BATCH_SEQUENCES):
            mx.eval(layer(x[i:i + cal.BATCH_SEQUENCES], mask="causal"))
    finally:
        moe.switch_mlp = sw
    return cal._ExpertStatistics(rec, sw, options)


def h_of(layer, e, x):
    sw = layer.block_sparse_moe.switch_mlp
    xm = mx.array(x)
    return np.array(nn.silu(xm @ sw.gate_proj.weight[e].T) * (xm @ sw.up_proj.weight[e].T)).astype(np.float64)


def gram(a):
    a = np.asarray(a, np.float64)
    return a.T @ a


@pytest.mark.parametrize("strength", [0.0, 32.0])
def test_full_hessians_match_a_direct_computation(strength):
    layer, x = tiny_layer(), states()
    xm, _, topk = direct(layer, x)
    stats = record(layer, x, cal.ExpertCalibration("full", strength, 0))
    T = xm.shape[0]
    sample = np.unique(np.linspace(0, T - 1, min(T, cal.PRIOR_TOKENS)).round().astype(int))
    prior_x = xm[sample]
    assert (stats.counts == [(topk == e).any(-1).sum() for e in range(6)]).all()
    assert stats.counts[0] == 0 and (stats.counts[1:] > 0).all()  # expert 0 is reached by no token
    for e in range(6):
        rows = np.flatnonzero((topk == e).any(-1))
        own_gu, own_d = gram(xm[rows]), gram(h_of(layer, e, xm[rows]))
        prior_gu, prior_d = gram(prior_x) / len(sample), gram(h_of(layer, e, prior_x)) / len(sample)
        n = rows.size
        want = [(own + strength * prior) / (n + strength) if n + strength else prior
                for own, prior in ((own_gu, prior_gu), (own_d, prior_d))]
        got = stats.hessians(e)
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6 * np.abs(w).max())


def test_diagonal_statistics_pool_over_the_experts_as_before():
    """"diagonal" keeps the converter's earlier rule: E[x^2] and E[h^2] over
    each expert's tokens, shrunk toward the layer's pool over all experts."""
    layer, x = tiny_layer(seed=2), states(seed=3)
    xm, _, topk = direct(layer, x)
    stats = record(layer, x, cal.ExpertCalibration("diagonal", 64.0, 0))
    sums, counts = [], []
    for e in range(6):
        rows = np.flatnonzero((topk == e).any(-1))
        sums.append(((xm[rows].astype(np.float64) ** 2).sum(0), (h_of(layer, e, xm[rows]) ** 2).sum(0)))
        counts.append(rows.size)
    for i in range(2):
        pooled = sum(s[i] for s in sums) / sum(counts)
        for e in range(6):
            want = (sums[e][i] + 64 * pooled) / (counts[e] + 64)
            np.testing.assert_allclose(stats.hessians(e)[i], want, rtol=2e-4)


def test_an_expert_no_token_reaches_gets_near_miss_samples():
    """Experts 1 and 2 lead every token's ranking (routing bias +2), so the
    other six are reached by no token; expert 0 ranks anywhere among those
    six, and gets the tokens that ranked it within NEAR_MISS_RANKS below
    the top k, best rank then best score first."""
    E = 8
    assert E - K > cal.NEAR_MISS_RANKS  # some tokens rank expert 0 too low
    layer, x = tiny_layer(E=E, bias=[0, 2, 2, 0, 0, 0, 0, 0]), states()
    xm, scores, topk = direct(layer, x)
    assert set(np.unique(topk)) == {1, 2}
    need = 20
    stats = record(layer, x, cal.ExpertCalibration("full", 0.0, need))
    assert stats.counts[0] == 0 and stats.counts[1] == stats.counts[2] == xm.shape[0]
    rank = (scores > scores[:, :1]).sum(-1)  # experts scored above expert 0
    candidates = np.flatnonzero(rank < K + cal.NEAR_MISS_RANKS)
    assert (rank == K).sum() < need < candidates.size < xm.shape[0]  # rank and score both order the choice
    order = np.lexsort((candidates, -scores[candidates, 0], rank[candidates]))
    chosen = candidates[order][:need]
    assert stats.topped_up[0] == need and np.array_equal(stats.tokens[0], chosen)
    np.testing.assert_allclose(stats.hessians(0)[0], gram(xm[chosen]) / need, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(stats.hessians(0)[1], gram(h_of(layer, 0, xm[chosen])) / need, rtol=2e-4,
                               atol=1e-9)
    # Experts the text reaches often enough get nothing more.
    for e in (1, 2):
        assert stats.topped_up[e] == 0 and np.array_equal(stats.tokens[e], stats.routed[e])
    assert all(stats.topped_up[e] == need for e in range(3, E))


def test_near_misses_never_change_the_forward_pass():
    layer, x = tiny_layer(), states()
    want = np.array(layer(x, mask="causal"))
    moe = layer.block_sparse_moe
    sw = moe.switch_mlp
    moe.switch_mlp = cal._RecordedExperts(sw, moe, cal.NEAR_MISS_RANKS)
    try:
        got = np.array(layer(x, mask="causal"))
    finally:
        moe.switch_mlp = sw
    assert np.array_equal(got, want)


def test_calibrated_experts_are_gptq_with_the_expert_hessians():
    """The driver's expert triples are quantize_weight's GPTQ with the
    statistics above, gate and up stacked on one hessian."""
    layer, x = tiny_layer(), states()
    options = cal.ExpertCalibration("full", 16.0, 8)
    quants = {f"{cal.SWITCH}.{p}": (3, 32) for p in cal.STOCK_PROJECTIONS}
    stats = record(tiny_layer(), x, options)
    got, _ = cal.Calibrator(x, x[:1], experts=options).layer(layer, quants, mx.bfloat16)
    sw = layer.block_sparse_moe.switch_mlp
    for e in (0, 3):
        gate_up, down = stats.hessians(e)
        gu = quantize_weight(mx.concatenate([sw.gate_proj.weight[e], sw.up_proj.weight[e]]).astype(mx.bfloat16),
                             3, 32, hessian=gate_up, method="gptq")
        d = quantize_weight(sw.down_proj.weight[e].astype(mx.bfloat16), 3, 32, hessian=down, method="gptq")
        for path, want in (("gate_proj", [a[:32] for a in gu]), ("up_proj", [a[32:] for a in gu]),
                           ("down_proj", d)):
            for a, b in zip(got[f"{cal.SWITCH}.{path}"], want):
                assert np.array_equal(np.array(a[e].view(mx.uint8)), np.array(b.view(mx.uint8))), (e, path)


def test_statistics_memory_does_not_grow_with_the_experts():
    """Only one expert's hessians exist at a time: recording a layer and
    building every expert's statistics in turn, for 4 or 32 experts, peak
    alike (numpy allocations, traced), while keeping them all would add 28
    experts x (D^2 + H^2) float64. The recorded inputs are one float32 copy
    of the MoE block's inputs (plus the routing), whatever the experts."""
    D, H = 128, 64
    x = states(n=4, L=64, D=D)
    peaks = {}
    for E in (4, 32):
        layer = tiny_layer(E=E, D=D, H=H)
        tracemalloc.start()
        stats = record(layer, x, cal.ExpertCalibration("full", 16.0, 16))
        for e in range(E):
            h = stats.hessians(e)
            del h
        peaks[E] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.x.nbytes == x.size * 4
    all_of_them = 28 * (D * D + H * H) * 8
    assert peaks[32] - peaks[4] < all_of_them / 4, (peaks, all_of_them)


@pytest.mark.parametrize("kw,match", [
    (dict(statistics="half"), r"expert statistics 'half': expected one of full, diagonal"),
    (dict(shrinkage=-1.0), r"expert shrinkage -1.0: expected a finite number of tokens >= 0"),
    (dict(shrinkage=float("inf")), r"expert shrinkage inf"),
    (dict(min_tokens=-3), r"expert min_tokens -3: expected a whole number of tokens >= 0"),
    (dict(min_tokens=2.5), r"expert min_tokens 2.5"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        cal.ExpertCalibration(**kw)


def test_experts_the_recipe_keeps_are_not_recorded():
    layer, x = tiny_layer(), states()
    quants = {f"self_attn.{n}": (4, 32) for n in ("q_proj", "k_proj", "v_proj")}
    triples, report = cal.Calibrator(x, x[:1]).layer(layer, quants, mx.bfloat16)
    assert set(triples) == set(quants) and report.min_expert_tokens is None and report.topped_up_experts == 0
    assert isinstance(layer.block_sparse_moe.switch_mlp, type(tiny_layer().block_sparse_moe.switch_mlp))
