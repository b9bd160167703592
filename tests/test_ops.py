"""The fused ops against the fp64 reference, under the tolerance rule."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from support.moe_reference import (
    make_experts,
    random_routing,
    reference_h,
    reference_y,
    stock_h,
    stock_y,
)
from support.tolerance import assert_within_tolerance

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def check_case(ex, x, indices, weights, device, compile_=False):
    """Runs A, B and A+B, checking each against reference and stock."""
    dtype = ex.dtype

    def fused(x, indices, weights):
        h = device.gate_up_swiglu(x, ex.packed, indices)
        return h, device.down_combine(h, ex.packed, indices, weights)

    # The emulator runs eagerly; compilation is MLX's, not the kernels'.
    run = mx.compile(fused) if compile_ and device.compiles else fused
    h, y = run(x, indices, weights)
    lead = x.shape[:-1]
    k = indices.shape[-1]
    assert h.shape == (*lead, k, ex.packed.intermediate_dims) and h.dtype == dtype
    assert y.shape == (*lead, ex.packed.hidden_dims) and y.dtype == dtype

    # Flatten leading dims for the references.
    D, H = ex.packed.hidden_dims, ex.packed.intermediate_dims
    x2, i2, w2 = x.reshape(-1, D), indices.reshape(-1, k), weights.reshape(-1, k)
    h2 = h.reshape(-1, k, H)
    h_ref, h_stock = reference_h(ex, x2, i2), stock_h(ex, x2, i2)
    assert_within_tolerance(h2, h_stock, h_ref, dtype, "gate_up_swiglu")
    # Kernel B alone: from the fused h, against reference and stock on that h.
    assert_within_tolerance(
        y.reshape(-1, D),
        stock_y(ex, h2, i2, w2),
        reference_y(ex, h2, i2, w2),
        dtype,
        "down_combine",
    )
    # A+B end to end against stock A+B, both judged from the exact h.
    y_ref = reference_y(ex, h_ref, i2, w2)
    y_stock = stock_y(ex, h_stock, i2, w2)
    assert_within_tolerance(y.reshape(-1, D), y_stock, y_ref, dtype, "A+B")


# ---------------------------------------------------------------------------
# The full supported grid at small shapes
# ---------------------------------------------------------------------------

# The cartesian grid at MiniMax's widths; tests/test_experts.py covers every
# mode, width and activation by a covering design.
GRID_BITS = (3, 4)
GRID = list(
    itertools.product(GRID_BITS, fm.SUPPORTED_GROUP_SIZES, GRID_BITS, fm.SUPPORTED_GROUP_SIZES, DTYPES)
)


@pytest.mark.parametrize(
    "bits,group_size,down_bits,down_group_size,dtype",
    GRID,
    ids=[f"gu{b}g{g}-d{db}g{dg}-{str(t).split('.')[-1]}" for b, g, db, dg, t in GRID],
)
def test_full_grid(bits, group_size, down_bits, down_group_size, dtype, device):
    case = GRID.index((bits, group_size, down_bits, down_group_size, dtype))
    k = fm.MIN_TOP_K + case % (fm.MAX_TOP_K - fm.MIN_TOP_K + 1)  # every k appears
    E = max(k, 5)
    ex = make_experts(
        E, 256, 128, dtype, bits, group_size, down_bits, down_group_size, seed=case
    )
    indices, weights = random_routing(3, E, k, seed=case)
    x = mx.random.normal((3, 256), key=mx.random.key(case)).astype(dtype)
    check_case(ex, x, indices, weights, device)


# ---------------------------------------------------------------------------
# Pairwise coverage of the remaining features
# ---------------------------------------------------------------------------

# Each case mixes several features so that every pair of (T, E, routing,
# layout, batching, compile) values meets at least once.
PAIRWISE = [
    # T, E, D, H, routing, layout, lead, compile, dtype, bits
    (1, 4, 256, 128, "random", "contiguous", None, False, mx.bfloat16, 3),
    (2, 154, 256, 128, "same_expert", "transposed", None, True, mx.float16, 4),
    (7, 4, 256, 128, "duplicates", "contiguous", (7,), True, mx.float32, 3),
    (64, 154, 256, 128, "random", "sliced", (4, 16), False, mx.bfloat16, 4),
    (300, 4, 256, 128, "same_expert", "contiguous", (3, 100), False, mx.float32, 3),
    (300, 154, 256, 128, "duplicates", "transposed", None, False, mx.bfloat16, 3),
    (64, 4, 256, 128, "duplicates", "sliced", None, True, mx.float16, 3),
    (1, 154, 256, 128, "duplicates", "sliced", (1, 1), False, mx.float32, 4),
    (2, 4, 256, 128, "random", "contiguous", (2, 1), True, mx.bfloat16, 4),
    (7, 154, 256, 128, "same_expert", "sliced", None, False, mx.bfloat16, 3),
    (64, 154, 256, 128, "same_expert", "contiguous", (8, 8), True, mx.float32, 4),
    (300, 4, 256, 128, "random", "sliced", None, True, mx.float16, 4),
    # Widths that are multiples of 32 but not of 64 (group size 32 below).
    (5, 6, 288, 160, "random", "contiguous", None, False, mx.bfloat16, 3),
    (5, 6, 288, 160, "duplicates", "sliced", None, False, mx.float16, 4),
    # The MiniMax shapes, once.
    (7, 4, 3072, 1536, "random", "contiguous", None, False, mx.float32, 3),
]


def routing(kind, T, E, k, seed):
    if kind == "random":
        return random_routing(T, E, k, seed)
    indices, weights = random_routing(T, E, k, seed, distinct=False)
    if kind == "same_expert":
        indices = mx.full((T, k), E - 1, dtype=mx.uint32)
    else:  # duplicates: every token repeats its first choice in its last slot
        indices = mx.concatenate([indices[:, :-1], indices[:, :1]], axis=1)
    return indices, weights


def activations(layout, T, D, dtype, seed):
    key = mx.random.key(seed)
    if layout == "transposed":  # a [D, T] array viewed as [T, D]
        return mx.random.normal((D, T), key=key).astype(dtype).T
    if layout == "sliced":  # every other row and a column window of a wider array
        return mx.random.normal((2 * T, D + 64), key=key).astype(dtype)[::2, 32 : 32 + D]
    return mx.random.normal((T, D), key=key).astype(dtype)


@pytest.mark.parametrize(
    "T,E,D,H,kind,layout,lead,compile_,dtype,bits",
    PAIRWISE,
    ids=[f"T{c[0]}-E{c[1]}-D{c[2]}-{c[4]}-{c[5]}-lead{c[6]}-compile{c[7]}" for c in PAIRWISE],
)
def test_pairwise(T, E, D, H, kind, layout, lead, compile_, dtype, bits, device):
    seed = PAIRWISE.index((T, E, D, H, kind, layout, lead, compile_, dtype, bits))
    k = 8 if E >= 8 else 4
    group_size = 64 if D % 64 == 0 and H % 64 == 0 else 32
    ex = make_experts(E, D, H, dtype, bits, group_size, seed=seed)
    indices, weights = routing(kind, T, E, k, seed)
    x = activations(layout, T, D, dtype, seed)
    if lead is not None:
        x = x.reshape(*lead, D)
        indices = indices.reshape(*lead, k)
        weights = weights.reshape(*lead, k)
    check_case(ex, x, indices, weights, device, compile_=compile_)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def test_int32_and_uint32_indices_agree(device):
    ex = make_experts(6, 256, 128, mx.bfloat16)
    indices, weights = random_routing(5, 6, 3)
    x = mx.random.normal((5, 256)).astype(mx.bfloat16)
    a = device.down_combine(device.gate_up_swiglu(x, ex.packed, indices), ex.packed, indices, weights)
    i32 = indices.astype(mx.int32)
    b = device.down_combine(device.gate_up_swiglu(x, ex.packed, i32), ex.packed, i32, weights)
    assert mx.array_equal(a, b).item()


def test_weights_in_dtype_of_h(device):
    ex = make_experts(6, 256, 128, mx.float16)
    indices, weights = random_routing(4, 6, 2)
    x = mx.random.normal((4, 256)).astype(mx.float16)
    h = device.gate_up_swiglu(x, ex.packed, indices)
    y16 = device.down_combine(h, ex.packed, indices, weights.astype(mx.float16))
    ref = reference_y(ex, h, indices, weights.astype(mx.float16))
    stock = stock_y(ex, h, indices, weights.astype(mx.float16))
    assert_within_tolerance(y16, stock, ref, mx.float16, "float16 weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_across_thread_counts(dtype, device):
    ex = make_experts(16, 512, 256, dtype, 3, 64)
    indices, weights = random_routing(40, 16, 8, seed=3)
    x = mx.random.normal((40, 512)).astype(dtype)
    before = fm.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            fm.set_num_threads(n)
            h = device.gate_up_swiglu(x, ex.packed, indices)
            y = device.down_combine(h, ex.packed, indices, weights)
            mx.eval(h, y)
            results.append((np.array(h.astype(mx.float32)), np.array(y.astype(mx.float32))))
    finally:
        fm.set_num_threads(before)
    for h, y in results[1:]:
        assert np.array_equal(h, results[0][0], equal_nan=True)
        assert np.array_equal(y, results[0][1], equal_nan=True)


@pytest.mark.parametrize("bits", fm.SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_result_of_a_token_does_not_depend_on_its_batch(dtype, bits):
    # Six tokens on the same experts (each expert's rows serve a tile of six
    # pairs) against each token alone (a tile of one): the CPU kernels give
    # every token the same bits either way, on every path and level.
    ex = make_experts(8, 256, 128, dtype, bits, 64)
    T, k = 6, 3
    indices = mx.array(np.tile(np.array([[5, 0, 2]], dtype=np.uint32), (T, 1)))
    weights = mx.array(np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (T, 1)))
    x = mx.random.normal((T, 256), key=mx.random.key(7)).astype(dtype)
    h = fm.gate_up_swiglu(x, ex.packed, indices, stream=mx.cpu)
    y = fm.down_combine(h, ex.packed, indices, weights, stream=mx.cpu)
    for t in range(T):
        h1 = fm.gate_up_swiglu(x[t : t + 1], ex.packed, indices[t : t + 1], stream=mx.cpu)
        y1 = fm.down_combine(h[t : t + 1], ex.packed, indices[t : t + 1], weights[t : t + 1], stream=mx.cpu)
        assert np.array_equal(np.array(h1.astype(mx.float32)), np.array(h[t : t + 1].astype(mx.float32)))
        assert np.array_equal(np.array(y1.astype(mx.float32)), np.array(y[t : t + 1].astype(mx.float32)))


def test_nan_and_inf_stay_in_their_token(device):
    ex = make_experts(6, 256, 128, mx.bfloat16)
    indices, weights = random_routing(4, 6, 3)
    x = mx.random.normal((4, 256)).astype(mx.bfloat16)
    bad = mx.array(np.where(np.arange(4)[:, None] == 1, np.nan, 0.0).astype(np.float32))
    bad = bad + mx.array(np.where((np.arange(4)[:, None] == 2) & (np.arange(256) == 7), np.inf, 0.0).astype(np.float32))
    x_bad = (x.astype(mx.float32) + bad).astype(mx.bfloat16)
    h = device.gate_up_swiglu(x_bad, ex.packed, indices)
    y = device.down_combine(h, ex.packed, indices, weights)
    h_ok = device.gate_up_swiglu(x, ex.packed, indices)
    y_ok = device.down_combine(h_ok, ex.packed, indices, weights)
    yn = np.array(y.astype(mx.float32))
    assert np.isnan(yn[1]).all()
    assert not np.isfinite(yn[2]).all()
    for t in (0, 3):
        assert np.array_equal(yn[t], np.array(y_ok.astype(mx.float32))[t])
