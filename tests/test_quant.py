"""fused_moe.quant: the quantizer for one matrix and the input statistics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from fused_moe.quant import InputStats, pack_codes, quantize_weight, shrink, unpack_codes, weighted_error

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}


def raw(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint8))


def assert_bits_equal(got, want):
    for a, b, name in zip(got, want, ("weight", "scales", "biases")):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(raw(a), raw(b)), name


def weights(shape, dtype, seed=0):
    """Gaussian weights with a few large outliers, like trained matrices."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, size=shape)
    w[rng.random(shape) < 0.01] *= 8
    return mx.array(w.astype(np.float32)).astype(dtype)


def importance(inputs, seed=1, experts=None):
    """A heavy-tailed E[x^2] per input channel, as real activations have."""
    rng = np.random.default_rng(seed)
    shape = (inputs,) if experts is None else (experts, inputs)
    return (rng.lognormal(0, 1.5, size=shape)).astype(np.float32)


# ---------------------------------------------------------------- round to nearest


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_rtn_is_bit_identical_to_mx_quantize(bits, group_size, dtype):
    w = weights((12, 256), DTYPES[dtype], seed=bits * group_size)
    want = mx.quantize(w, group_size=group_size, bits=bits)
    assert_bits_equal(quantize_weight(w, bits, group_size, method="rtn"), want)
    # No hessian: auto is RTN too, for stacked weights as well.
    assert_bits_equal(quantize_weight(w, bits, group_size), want)
    stacked = mx.stack([w, -w])
    assert_bits_equal(quantize_weight(stacked, bits, group_size, hessian=None), mx.quantize(stacked, group_size, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_code_packing_matches_mlx(bits):
    """Our packing reproduces mx.quantize's words from its own codes."""
    w = weights((5, 512), mx.float32, seed=bits)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    codes = unpack_codes(np.array(wq), bits)
    assert codes.max() == (1 << bits) - 1 and codes.min() == 0
    assert np.array_equal(pack_codes(codes, bits), np.array(wq))
    # And the codes are what mx.dequantize reads.
    s = np.repeat(np.array(scales), 64, axis=-1)
    b = np.repeat(np.array(biases), 64, axis=-1)
    want = np.array(mx.dequantize(wq, scales, biases, group_size=64, bits=bits))
    np.testing.assert_allclose(s * codes + b, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- weighted search


def group_errors(w, out, bits, group_size, diag):
    """sum_j d_j (w_j - w_hat_j)^2 per group [rows, groups]."""
    wq, scales, biases = out
    w_hat = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    diff = np.array(w.astype(mx.float32) - w_hat, np.float64)
    e = diff * diff * np.asarray(diag, np.float64)
    return e.reshape(*e.shape[:-1], -1, group_size).sum(-1)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 64), (2, 32), (8, 128)])
def test_weighted_search_is_never_worse_than_rtn(bits, group_size, dtype):
    w = weights((64, 512), DTYPES[dtype], seed=bits)
    d = importance(512)
    rtn = quantize_weight(w, bits, group_size, method="rtn")
    ours = quantize_weight(w, bits, group_size, hessian=d)
    e_rtn, e_ours = group_errors(w, rtn, bits, group_size, d), group_errors(w, ours, bits, group_size, d)
    assert (e_ours <= e_rtn * (1 + 1e-6) + 1e-30).all()  # group by group
    # ...and clearly better overall: the search does something.
    assert e_ours.sum() < 0.9 * e_rtn.sum()
    assert weighted_error(w, *ours, bits, group_size, d) == pytest.approx(e_ours.sum(), rel=1e-6)
    for a, b in zip(ours, rtn):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_scales_are_rounded_before_the_codes_are_chosen():
    """Each code is the nearest one for the scale and bias as stored."""
    bits, gs = 3, 64
    w = weights((16, 256), mx.bfloat16)
    wq, scales, biases = quantize_weight(w, bits, gs, hessian=importance(256))
    codes = unpack_codes(np.array(wq), bits).astype(np.float32)
    s = np.repeat(np.array(scales.astype(mx.float32)), gs, -1)
    b = np.repeat(np.array(biases.astype(mx.float32)), gs, -1)
    nearest = np.clip(np.rint((np.array(w.astype(mx.float32)) - b) / s), 0, 7)
    assert np.array_equal(codes, nearest)


def test_full_hessian_and_its_diagonal_agree_and_stacked_experts_are_independent():
    bits, gs, E = 3, 64, 3
    w = weights((E, 32, 256), mx.bfloat16)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(E, 500, 256)).astype(np.float32) * importance(256, experts=E)[:, None, :] ** 0.5
    full = np.einsum("eti,etj->eij", x, x) / 500
    diag = np.diagonal(full, axis1=1, axis2=2).copy()
    stacked = quantize_weight(w, bits, gs, hessian=full.astype(np.float32), method="weighted")
    assert_bits_equal(stacked, quantize_weight(w, bits, gs, hessian=diag))
    for e in range(E):
        one = quantize_weight(w[e], bits, gs, hessian=diag[e])
        assert_bits_equal([a[e] for a in stacked], one)


def test_quantization_is_reproducible():
    w = weights((40, 384), mx.bfloat16)
    d = importance(384)
    assert_bits_equal(quantize_weight(w, 3, 64, hessian=d), quantize_weight(w, 3, 64, hessian=d))


# ---------------------------------------------------------------- GPTQ


def correlated_hessian(inputs, seed=4, experts=None, tokens=2000):
    """E[x x^T] of inputs mixed across channels, with heavy-tailed channel scales."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(experts or 1):
        mix = rng.normal(size=(inputs, inputs)) * 0.3 + np.eye(inputs)
        x = rng.normal(size=(tokens, inputs)) @ mix * rng.lognormal(0, 1, inputs)
        out.append(x.T @ x / tokens)
    h = np.stack(out).astype(np.float32)
    return h if experts else h[0]


def output_error(w, triple, h, bits, gs):
    """tr((W - W_hat) H (W - W_hat)^T): the output error over the calibration inputs."""
    q, s, b = triple
    w_hat = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    diff = np.array(w.astype(mx.float32) - w_hat, dtype=np.float64)
    return float(np.einsum("oi,ij,oj->", diff, h.astype(np.float64), diff))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,gs", [(3, 64), (4, 32), (2, 128)])
def test_gptq_gives_the_triple_mx_dequantize_reads(bits, gs, dtype):
    w = weights((24, 256), DTYPES[dtype])
    got = quantize_weight(w, bits, gs, hessian=correlated_hessian(256), method="gptq")
    want = mx.quantize(w, group_size=gs, bits=bits)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
    w_hat = np.array(mx.dequantize(*got, group_size=gs, bits=bits).astype(mx.float32))
    assert np.isfinite(w_hat).all()
    # Every code is in range: the unpacked codes re-pack to the same words.
    codes = unpack_codes(np.array(got[0]), bits)
    assert codes.max() < 2 ** bits and np.array_equal(pack_codes(codes, bits), np.array(got[0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_output_error_is_below_the_weighted_search_and_rtn(seed):
    bits, gs = 3, 64
    w = weights((64, 256), mx.bfloat16, seed=seed)
    h = correlated_hessian(256, seed=seed + 10)
    errors = {m: output_error(w, quantize_weight(w, bits, gs, hessian=h, method=m), h, bits, gs)
              for m in ("rtn", "weighted", "gptq")}
    assert errors["gptq"] < errors["weighted"] < errors["rtn"], errors


def test_gptq_is_reproducible_and_stacked_experts_match_single_calls():
    bits, gs, E = 3, 64, 3
    w = weights((E, 16, 256), mx.bfloat16)
    h = correlated_hessian(256, experts=E)
    stacked = quantize_weight(w, bits, gs, hessian=h, method="gptq")
    assert_bits_equal(stacked, quantize_weight(w, bits, gs, hessian=h, method="gptq"))
    for e in range(E):
        assert_bits_equal([a[e] for a in stacked], quantize_weight(w[e], bits, gs, hessian=h[e], method="gptq"))


def test_gptq_with_dead_inputs():
    w = weights((16, 256), mx.bfloat16)
    h = correlated_hessian(256)
    dead = np.arange(256) % 7 == 0
    h[dead, :] = 0
    h[:, dead] = 0
    got = quantize_weight(w, 3, 64, hessian=h, method="gptq")
    assert output_error(w, got, h, 3, 64) < output_error(w, quantize_weight(w, 3, 64, method="rtn"), h, 3, 64)
    # A dead input's weight is kept (within its group's rounding), not zeroed.
    w_hat = np.array(mx.dequantize(*got, group_size=64, bits=3).astype(mx.float32))
    s = np.repeat(np.array(got[1].astype(mx.float32)), 64, -1)
    wf = np.array(w.astype(mx.float32))
    assert (np.abs(w_hat - wf)[:, dead] <= np.abs(s[:, dead]) * 0.5 + 1e-6).mean() > 0.9


def test_auto_picks_gptq_with_a_full_hessian_and_the_weighted_search_with_a_diagonal():
    w = weights((16, 256), mx.bfloat16)
    h = correlated_hessian(256)
    d = np.diagonal(h).copy()
    assert_bits_equal(quantize_weight(w, 3, 64, hessian=h), quantize_weight(w, 3, 64, hessian=h, method="gptq"))
    assert_bits_equal(quantize_weight(w, 3, 64, hessian=d), quantize_weight(w, 3, 64, hessian=d, method="weighted"))
    assert_bits_equal(quantize_weight(w, 3, 64), mx.quantize(w, group_size=64, bits=3))


def test_gptq_bad_hessian():
    w = weights((8, 256), mx.bfloat16)
    with pytest.raises(ValueError, match=r"method='gptq' needs the full hessian E\[x x\^T\] \(256, 256\), "
                                         r"got its diagonal \(256,\)"):
        quantize_weight(w, 3, 64, hessian=importance(256), method="gptq")
    with pytest.raises(ValueError, match=r"hessian has shape \(128, 128\)"):
        quantize_weight(w, 3, 64, hessian=np.eye(128, dtype=np.float32), method="gptq")
    h = correlated_hessian(256)
    h[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"hessian \(256, 256\) has NaN"):
        quantize_weight(w, 3, 64, hessian=h, method="gptq")
    # Not PSD: strong negative eigenvalues that no bounded damping removes.
    bad = np.full((256, 256), -10, np.float32)
    np.fill_diagonal(bad, 1)  # an eigenvalue of 1 - 10 * 255
    with pytest.raises(ValueError, match=r"hessian \(256, 256\) is not positive semidefinite: its Cholesky "
                                         r"factorization failed even with damping 1.0"):
        quantize_weight(w, 3, 64, hessian=bad, method="gptq")
    stacked = np.stack([correlated_hessian(256), bad])
    with pytest.raises(ValueError, match=r"hessian\[1\] \(256, 256\) is not positive semidefinite"):
        quantize_weight(weights((2, 8, 256), mx.bfloat16), 3, 64, hessian=stacked, method="gptq")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "hessian,match",
    [
        (np.eye(128, dtype=np.float32), r"hessian has shape \(128, 128\); for w \(8, 256\) expected one of \(256, 256\), \(256,\)"),
        (np.zeros((2, 256, 256), np.float32), r"hessian has shape \(2, 256, 256\)"),
        (np.eye(256), r"hessian must be float32, got float64 \(256, 256\)"),
        (np.eye(256, dtype=np.float16), r"hessian must be float32, got float16"),
        (np.full((256, 256), np.nan, np.float32), r"hessian \(256, 256\) has NaN"),
        (-np.ones(256, np.float32), r"negative diagonal"),
    ],
    ids=["shape", "stacked-shape-for-2d-w", "float64", "float16", "nan", "negative"],
)
def test_bad_hessian(hessian, match):
    w = weights((8, 256), mx.bfloat16)
    with pytest.raises(ValueError, match=match):
        quantize_weight(w, 3, 64, hessian=hessian)


def test_hessian_as_mlx_array():
    w = weights((8, 256), mx.bfloat16)
    d = importance(256)
    assert_bits_equal(quantize_weight(w, 3, 64, hessian=mx.array(d)), quantize_weight(w, 3, 64, hessian=d))
    with pytest.raises(ValueError, match=r"hessian must be float32, got mlx.core.bfloat16 \(256,\)"):
        quantize_weight(w, 3, 64, hessian=mx.array(d).astype(mx.bfloat16))


def test_bad_hessian_for_stacked_weights():
    w = weights((3, 8, 256), mx.bfloat16)
    with pytest.raises(ValueError, match=r"expected one of \(3, 256, 256\), \(3, 256\)"):
        quantize_weight(w, 3, 64, hessian=np.ones((256, 256), np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=7), "bits=7 is not supported"),
        (dict(group_size=48), "group_size=48 is not supported"),
        (dict(method="gptq"), "method='gptq' needs a hessian"),
        (dict(method="optimal"), "method='optimal': expected one of auto, rtn, weighted, gptq"),
        (dict(method="weighted"), "method='weighted' needs a hessian"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(weights((8, 256), mx.bfloat16), **kwargs)


def test_bad_weight():
    with pytest.raises(ValueError, match=r"w must be a float16/bfloat16/float32 mx.array"):
        quantize_weight(mx.zeros((8, 256), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"w \(8, 100\): 100 inputs are not a whole number of groups of 64"):
        quantize_weight(mx.zeros((8, 100)))


# ---------------------------------------------------------------- statistics


def test_input_stats_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 48)).astype(np.float32) * np.linspace(0.1, 3, 48) for n in (7, 1, 130, 64)]
    full, diag = InputStats(48), InputStats(48, full=False)
    for i, b in enumerate(batches):
        x = mx.array(b).astype(mx.bfloat16) if i == 2 else b.reshape(-1, 1, 48) if i == 3 else b
        full.update(x)
        diag.update(x)
    xs = [np.array(mx.array(b).astype(mx.bfloat16).astype(mx.float32)) if i == 2 else b for i, b in enumerate(batches)]
    x = np.concatenate(xs).astype(np.float64)
    assert full.count == diag.count == 202
    np.testing.assert_allclose(full.hessian(), x.T @ x / 202, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.diagonal(), (x * x).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(diag.diagonal(), full.diagonal())
    assert full.hessian().dtype == np.float32 and full.hessian().shape == (48, 48)
    with pytest.raises(ValueError, match=r"full=False\) keeps only the diagonal"):
        diag.hessian()
    with pytest.raises(ValueError, match=r"InputStats\(48\): got inputs of shape \(3, 47\)"):
        full.update(np.zeros((3, 47), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        full.update(np.full((2, 48), np.nan, np.float32))


def test_shrinkage_blend():
    pooled = np.array([1.0, 2.0], np.float32)
    own = InputStats(2, full=False)
    np.testing.assert_array_equal(shrink(own.sums, own.count, pooled, 256), pooled)  # no tokens: the pool
    own.update(np.full((256, 2), 3.0, np.float32))
    np.testing.assert_allclose(shrink(own.sums, own.count, pooled, 256), (9 + pooled) / 2)
