"""fused_moe.quantized_matmul and quantized_embedding against the fp64
reference from the same quantized arrays, under the tolerance rule; bad input.

Both ops run on every stream backend present: the CPU kernels, and on a GPU
MLX's own kernels (what the ops call there). The Metal emulator has no part
in them: there are no fused_moe Metal kernels for these ops.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from support.moe_reference import dequantized
from support.tolerance import assert_within_tolerance, rel_err, slack

DTYPES = [mx.float32, mx.float16, mx.bfloat16]



class Dense:
    """One quantized [N, K] matrix, as nn.QuantizedLinear holds it."""

    def __init__(self, N, K, bits, group_size, dtype, seed=0):
        w = (mx.random.normal((N, K), key=mx.random.key(seed)) * K**-0.5).astype(dtype)
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)
        self.bits, self.group_size = bits, group_size
        mx.eval(self.weight, self.scales, self.biases)

    def args(self):
        return self.weight, self.scales, self.biases, self.bits, self.group_size

    def reference(self, x) -> np.ndarray:
        x64 = np.array(x.astype(mx.float32), dtype=np.float64)
        return x64 @ dequantized(self).T

    def stock(self, x):
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, True, self.group_size, self.bits)


# ---------------------------------------------------------------------------
# quantized_matmul: the whole grid, at shapes that reach every code path
# ---------------------------------------------------------------------------

GRID = list(itertools.product(fm.SUPPORTED_LINEAR_BITS, fm.SUPPORTED_GROUP_SIZES, DTYPES))
# T = 1 (decode), a few tokens, more than one token block (64); N a multiple
# of 4 (integer tiles), one that is not (the fp32 path), and more than one
# row block (64); K a whole number of 64-code blocks or not (group size 32).
SHAPES = [(1, 64, 384), (5, 36, 384), (70, 130, 256), (3, 260, 288)]


@pytest.mark.parametrize(
    "bits,group_size,dtype", GRID, ids=[f"b{b}-g{g}-{str(t).split('.')[-1]}" for b, g, t in GRID]
)
def test_full_grid(bits, group_size, dtype, stream):
    case = GRID.index((bits, group_size, dtype))
    for i, (T, N, K) in enumerate(SHAPES):
        if K % group_size:
            continue
        m = Dense(N, K, bits, group_size, dtype, seed=10 * case + i)
        x = mx.random.normal((T, K), key=mx.random.key(case + 100 * i)).astype(dtype)
        y = fm.quantized_matmul(x, *m.args(), stream=stream)
        assert y.shape == (T, N) and y.dtype == dtype
        assert_within_tolerance(y, m.stock(x), m.reference(x), dtype, f"T={T} N={N} K={K}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_minimax_attention_shape(dtype, stream):
    # k_proj at full width, 8-bit group 64 (the seed recipe), two tokens.
    m = Dense(1024, 3072, 8, 64, dtype, seed=1)
    x = mx.random.normal((2, 3072), key=mx.random.key(2)).astype(dtype)
    y = fm.quantized_matmul(x, *m.args(), stream=stream)
    assert_within_tolerance(y, m.stock(x), m.reference(x), dtype, "k_proj")


def test_leading_dims_layouts_and_compile(stream):
    m = Dense(96, 256, 8, 64, mx.bfloat16, seed=3)
    base = mx.random.normal((2 * 3 * 5, 256 + 64), key=mx.random.key(4)).astype(mx.bfloat16)
    sliced = base[::2, 32 : 32 + 256].reshape(3, 5, 256)  # strided rows, column window
    transposed = mx.random.normal((256, 7), key=mx.random.key(5)).astype(mx.bfloat16).T
    for x in (sliced, transposed):
        y = fm.quantized_matmul(x, *m.args(), stream=stream)
        assert y.shape == (*x.shape[:-1], 96)
        flat = x.reshape(-1, 256)
        assert_within_tolerance(y.reshape(-1, 96), m.stock(flat), m.reference(flat), mx.bfloat16, "layout")
    f = mx.compile(lambda x: fm.quantized_matmul(x, *m.args(), stream=stream))
    assert mx.array_equal(f(sliced), fm.quantized_matmul(sliced, *m.args(), stream=stream)).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_across_thread_counts(dtype):
    m = Dense(260, 512, 8, 64, dtype, seed=6)
    x = mx.random.normal((70, 512), key=mx.random.key(7)).astype(dtype)
    before = fm.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            fm.set_num_threads(n)
            results.append(np.array(fm.quantized_matmul(x, *m.args(), stream=mx.cpu).astype(mx.float32)))
    finally:
        fm.set_num_threads(before)
    for r in results[1:]:
        assert np.array_equal(r, results[0], equal_nan=True)


def test_nan_stays_in_its_token():
    m = Dense(64, 256, 8, 64, mx.bfloat16, seed=8)
    x = mx.random.normal((3, 256), key=mx.random.key(9)).astype(mx.bfloat16)
    bad = mx.where(mx.arange(3)[:, None] == 1, mx.array(float("nan"), dtype=mx.bfloat16), x)
    y, ok = (np.array(fm.quantized_matmul(a, *m.args(), stream=mx.cpu).astype(mx.float32)) for a in (bad, x))
    assert np.isnan(y[1]).all()
    assert np.array_equal(y[[0, 2]], ok[[0, 2]])


# ---------------------------------------------------------------------------
# quantized_embedding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", fm.SUPPORTED_LINEAR_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_rows(bits, dtype, stream):
    group_size = fm.SUPPORTED_GROUP_SIZES[bits % 3]  # each group size appears
    m = Dense(50, 384, bits, group_size, dtype, seed=bits)
    ids = mx.array([[3, 49, 0], [3, 7, 12]], dtype=mx.int32)
    out = fm.quantized_embedding(ids, *m.args(), stream=stream)
    assert out.shape == (2, 3, 384) and out.dtype == dtype
    ref = dequantized(m)[np.array(ids)]
    stock = mx.dequantize(m.weight[ids], m.scales[ids], m.biases[ids], group_size, bits)
    assert_within_tolerance(out, stock, ref, dtype, "embedding")
    # uint32 ids give the same rows
    assert mx.array_equal(fm.quantized_embedding(ids.astype(mx.uint32), *m.args(), stream=stream), out).item()


@pytest.mark.parametrize("bad", [50, -1, 2**31 - 1])
def test_embedding_id_out_of_range_raises_at_eval(bad):
    m = Dense(50, 128, 8, 64, mx.bfloat16)
    ids = mx.array([1, bad, 2], dtype=mx.int32)
    with pytest.raises(RuntimeError, match=rf"ids\[1\] = {bad} is out of range for 50 rows"):
        mx.eval(fm.quantized_embedding(ids, *m.args(), stream=mx.cpu))


# ---------------------------------------------------------------------------
# Bad input: clear errors at the call
# ---------------------------------------------------------------------------


def test_matmul_errors():
    m = Dense(64, 256, 8, 64, mx.bfloat16)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    w, s, b, bits, gs = m.args()
    with pytest.raises(ValueError, match=r"w bits=7 is not supported; supported bits: \{2, 3, 4, 5, 6, 8\}"):
        fm.quantized_matmul(x, w, s, b, 7, gs)
    with pytest.raises(ValueError, match=r"w group_size=16 is not supported; supported group sizes: \{32, 64, 128\}"):
        fm.quantized_matmul(x, w, s, b, bits, 16)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got int32"):
        fm.quantized_matmul(x.astype(mx.int32), w, s, b, bits, gs)
    with pytest.raises(ValueError, match="scales has dtype bfloat16 but x has dtype float32; they must match"):
        fm.quantized_matmul(x.astype(mx.float32), w, s, b, bits, gs)
    with pytest.raises(ValueError, match=r"w has shape \[64, 64\] but 8-bit rows of K=512 inputs need \[64, 128\]"):
        fm.quantized_matmul(mx.concatenate([x, x], axis=1), w, s, b, bits, gs)
    with pytest.raises(ValueError, match=r"K=100 \(x.shape\[-1\]\) must be a positive multiple of group_size=64"):
        fm.quantized_matmul(x[:, :100], w, s, b, bits, gs)
    with pytest.raises(ValueError, match=r"w has shape \[64, 64\] but 4-bit rows of K=256 inputs need \[64, 32\]"):
        fm.quantized_matmul(x, w, s, b, 4, gs)
    with pytest.raises(ValueError, match=r"biases has shape \[64, 2\], expected \[64, 4\] for group_size=64"):
        fm.quantized_matmul(x, w, s, b[:, :2], bits, gs)
    with pytest.raises(ValueError, match="w must be uint32, got float32"):
        fm.quantized_matmul(x, w.astype(mx.float32), s, b, bits, gs)


def test_embedding_errors():
    m = Dense(64, 256, 8, 64, mx.bfloat16)
    w, s, b, bits, gs = m.args()
    ids = mx.array([0, 1])
    with pytest.raises(ValueError, match="ids must have an integer dtype, got float32"):
        fm.quantized_embedding(ids.astype(mx.float32), w, s, b, bits, gs)
    with pytest.raises(ValueError, match=r"w bits=1 is not supported"):
        fm.quantized_embedding(ids, w, s, b, 1, gs)
    with pytest.raises(ValueError, match="biases has dtype float16 but scales has dtype bfloat16"):
        fm.quantized_embedding(ids, w, s, b.astype(mx.float16), bits, gs)


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16])
def test_quantized_linear_matches_mlx_layer(x_dtype):
    import mlx.nn as nn

    mx.random.seed(7)
    stock = nn.QuantizedLinear(256, 96, bias=True, group_size=64, bits=8)
    stock.update({"bias": mx.random.normal((96,))})
    stock.set_dtype(mx.bfloat16)
    fused = fm.QuantizedLinear.from_quantized(stock)
    assert set(dict(fused.parameters())) == set(dict(stock.parameters()))
    assert fused.weight is stock.weight
    x = mx.random.normal((4, 256)).astype(x_dtype)
    a, b = fused(x), stock(x)
    assert a.dtype == b.dtype
    # The tolerance rule against an fp64 reference from the same quantized
    # weights, with mlx's own layer as the baseline.
    w = mx.dequantize(stock.weight, stock.scales, stock.biases, group_size=64, bits=8)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ np.array(w.astype(mx.float32), dtype=np.float64).T
    ref += np.array(stock.bias.astype(mx.float32), dtype=np.float64)
    assert_within_tolerance(a, b, ref, x_dtype, f"QuantizedLinear, {x_dtype} x")


def test_quantized_embedding_layer_and_as_linear():
    import mlx.nn as nn

    stock = nn.QuantizedEmbedding(50, 128, group_size=64, bits=8)
    fused = fm.QuantizedEmbedding.from_quantized(stock)
    ids = mx.array([[0, 5, 49]])
    assert mx.allclose(fused(ids), stock(ids)).item()
    x = mx.random.normal((2, 128))
    assert rel_err(fused.as_linear(x), stock.as_linear(x)) <= slack(mx.float32)
