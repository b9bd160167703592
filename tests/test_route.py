"""fused_moe.route: the MoE router as one primitive, against mlx-lm's.

Every case that takes `device` runs on each backend of conftest.py: the CPU
kernels, the Metal kernel on a real GPU, and the same Metal kernel in the
Linux emulator (skipped, naming the missing backend, where absent)."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import fused_moe as fm
from fused_moe import _ext
from support.router_reference import GATE_FORMS, check_against_stock, clear_inputs, make_gate, stock_route

D = 256


def random_bias(E, seed=1, scale=0.05):
    return mx.random.normal((E,), key=mx.random.key(seed)) * scale


@pytest.mark.parametrize("form", GATE_FORMS)
@pytest.mark.parametrize("E", [8, 154])
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_matches_stock(form, E, k, lead, device):
    gate, bias = make_gate(E, D, form, seed=E + k), random_bias(E)
    x = clear_inputs((*lead, D), gate, bias, k, seed=len(lead))
    check_against_stock(x, gate, bias, k, route=device.route)


@pytest.mark.parametrize("form", ["bfloat16", "q8"])
def test_minimax_shapes(form, device):
    gate, bias = make_gate(154, 3072, form), random_bias(154)
    x = clear_inputs((3, 3072), gate, bias, 8, seed=2)
    check_against_stock(x, gate, bias, 8, route=device.route)


@pytest.mark.parametrize("x_dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bias_dtype", [mx.float32, mx.bfloat16])
def test_half_precision_x_and_bias(x_dtype, bias_dtype, device):
    gate, bias = make_gate(154, D, "bfloat16"), random_bias(154).astype(bias_dtype)
    x = clear_inputs((7, D), gate, bias, 8, seed=3, dtype=x_dtype)
    check_against_stock(x, gate, bias, 8, route=device.route)


@pytest.mark.parametrize("group_size", fm.SUPPORTED_GROUP_SIZES)
def test_quantized_group_sizes(group_size, device):
    gate, bias = make_gate(154, D, "q8", group_size=group_size), random_bias(154)
    x = clear_inputs((4, D), gate, bias, 8, seed=4)
    check_against_stock(x, gate, bias, 8, route=device.route)


@pytest.mark.parametrize("d", [1, 7, 100])
def test_widths_with_a_tail(d, device):
    # Widths that are not a whole number of vectors take the scalar tail.
    for form in ("float32", "bfloat16", "float16"):
        gate, bias = make_gate(8, d, form, seed=d), random_bias(8, scale=0.01)
        x = clear_inputs((6, d), gate, bias, 3, seed=5)
        check_against_stock(x, gate, bias, 3, route=device.route)


def test_negative_bias_changes_the_selection(device):
    E, k = 154, 8
    gate = make_gate(E, D, "bfloat16")
    x = clear_inputs((6, D), gate, mx.zeros((E,)), k, seed=6)
    unbiased, _ = stock_route(x, gate, mx.zeros((E,)), k)
    # Push every expert the unbiased router picks for token 0 out of reach.
    bias = np.zeros(E, dtype=np.float32)
    bias[np.array(unbiased[0])] = -2.0
    bias = mx.array(bias)
    x = clear_inputs((6, D), gate, bias, k, seed=6)
    indices, _ = device.route(x, gate, bias, k)
    assert not set(np.array(indices[0]).tolist()) & set(np.array(unbiased[0]).tolist())
    check_against_stock(x, gate, bias, k, route=device.route)


# ---------------------------------------------------------------- ties


@pytest.mark.parametrize("k", [1, 8])
def test_planted_tie_goes_to_the_lower_index(k, device):
    """Experts 3 and E-1 have identical rows and biases and compete for the
    k-th place: expert 3 takes it."""
    E = 154
    gate = make_gate(E, D, "float32")
    w = np.array(gate.weight)
    w[E - 1] = w[3]
    gate.weight = mx.array(w)
    bias = np.zeros(E, dtype=np.float32)
    leaders = [10, 20, 30, 40, 50, 60, 70][: k - 1]
    bias[leaders] = 10.0  # clearly ahead of the pair
    bias[[3, E - 1]] = 5.0  # the pair: clearly ahead of the rest
    x = mx.random.normal((4, D), key=mx.random.key(7))
    indices, weights = device.route(x, gate, mx.array(bias), k)
    for row in np.array(indices):
        assert sorted(row.tolist()) == sorted(leaders + [3])


def test_all_scores_tied_chooses_the_lowest_indices(device):
    # Saturated sigmoids: every score is exactly 1.0 and every bias 0.
    E, k = 154, 8
    gate = mx.ones((E, D))
    x = mx.ones((2, D))
    indices, weights = device.route(x, gate, mx.zeros((E,)), k)
    assert np.array(indices).tolist() == [list(range(k))] * 2
    np.testing.assert_array_equal(np.array(weights), np.full((2, k), 1 / k, np.float32))


def test_nan_biased_scores_rank_last(device):
    E = 8
    gate = make_gate(E, D, "float32")
    bias = np.full(E, 0.0, dtype=np.float32)
    nan_experts = [0, 2, 5]
    bias[nan_experts] = np.nan
    x = mx.random.normal((3, D), key=mx.random.key(8))
    # k = number of numbers: exactly the experts with a numeric score.
    indices, weights = device.route(x, gate, mx.array(bias), E - 3)
    for row in np.array(indices):
        assert sorted(row.tolist()) == [1, 3, 4, 6, 7]
    assert np.all(np.isfinite(np.array(weights)))
    # k = E: the NaN experts come last, lower index first; their weights are
    # their (finite) unbiased scores, normalised with the others.
    indices, weights = device.route(x, gate, mx.array(bias), E)
    assert np.array(indices)[:, -3:].tolist() == [nan_experts] * 3
    np.testing.assert_allclose(np.array(weights).sum(axis=1), 1.0, rtol=1e-6)


def test_order_is_best_first_and_weights_follow_indices(device):
    E, k = 154, 8
    gate = make_gate(E, D, "float32")
    bias = random_bias(E)
    x = mx.random.normal((5, D), key=mx.random.key(9))
    indices, weights = device.route(x, gate, bias, k)
    biased = mx.sigmoid(x @ gate.weight.T) + bias
    ranked = np.take_along_axis(np.array(biased), np.array(indices).astype(np.int64), 1)
    assert np.all(np.diff(ranked, axis=1) <= 0)
    scores = np.take_along_axis(np.array(mx.sigmoid(x @ gate.weight.T)), np.array(indices).astype(np.int64), 1)
    np.testing.assert_allclose(np.array(weights), scores / scores.sum(1, keepdims=True), rtol=1e-5)


# ------------------------------------------------------- threads, ISAs


@pytest.mark.parametrize("T", [1, 3, 40, 100])
@pytest.mark.parametrize("form", ["bfloat16", "q8"])
def test_bit_identical_for_any_thread_count(T, form, device):
    # T <= 16 splits the experts across threads, larger T the tokens.
    gate = make_gate(154, D, form)
    x = mx.random.normal((T, D), key=mx.random.key(10))
    bias = random_bias(154)
    before = fm.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            fm.set_num_threads(n)
            results.append([np.array(a) for a in device.route(x, gate, bias, 8)])
    finally:
        fm.set_num_threads(before)
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])


def test_every_isa_matches_stock():
    """Each forced CPU level, on every gate form and a width with a tail."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import mlx.core as mx, fused_moe as fm\n"
        "from support.router_reference import GATE_FORMS, check_against_stock, clear_inputs, make_gate\n"
        "for form in GATE_FORMS:\n"
        "    for d in ([256, 100] if form != 'q8' else [256]):\n"
        "        for T in (1, 37):\n"
        "            gate = make_gate(154, d, form)\n"
        "            bias = mx.random.normal((154,), key=mx.random.key(1)) * 0.05\n"
        "            x = clear_inputs((T, d), gate, bias, 8, seed=T)\n"
        "            check_against_stock(x, gate, bias, 8)\n"
        "print(fm.cpu_isa())\n"
    ) % os.path.dirname(__file__)
    for isa in _ext.available_cpu_isas():
        env = dict(os.environ, FUSED_MOE_ISA=isa)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, f"{isa}: {r.stderr}"
        assert r.stdout.strip() == isa


# ------------------------------------------------------- MLX integration


def test_lazy_compiled_and_empty(device):
    gate = make_gate(8, D, "float32")
    bias = random_bias(8)
    x = mx.random.normal((4, D), key=mx.random.key(11))
    eager = device.route(x, gate, bias, 2)
    if device.compiles:
        compiled = mx.compile(lambda a: device.route(a, gate.weight, bias, 2))(x)
        for a, b in zip(eager, compiled):
            assert mx.array_equal(a, b).item()
    indices, weights = device.route(x[:0], gate, bias, 2)
    assert indices.shape == weights.shape == (0, 2)
    mx.eval(indices, weights)


def test_strided_inputs(device):
    # Evaluated views that are not row-contiguous: a transposed gate, every
    # other column of x, every other bias entry.
    E, k = 154, 8
    gate = make_gate(E, D, "bfloat16")
    bias = random_bias(2 * E)[::2]
    x = clear_inputs((5, D), gate, mx.array(np.array(bias)), k, seed=12)
    wide_x = mx.repeat(x, 2, axis=1)[:, ::2]
    gate_t = mx.array(np.ascontiguousarray(np.array(gate.weight.astype(mx.float32)).T)).astype(mx.bfloat16).T
    mx.eval(bias, wide_x, gate_t)
    want = device.route(x, gate.weight, mx.array(np.array(bias)), k)
    got = device.route(wide_x, gate_t, bias, k)
    for a, b in zip(want, got):
        assert mx.array_equal(a, b).item()


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    return mx.random.normal((3, 64)), make_gate(8, 64, "bfloat16", group_size=32), mx.zeros((8,))


def test_k_out_of_range(small):
    x, gate, bias = small
    with pytest.raises(ValueError, match=r"fused_moe.route: k=9 is more than the E=8 experts of gate_weight"):
        fm.route(x, gate, bias, 9)
    with pytest.raises(ValueError, match=r"k=0 experts per token is not supported; supported k: 1..16"):
        fm.route(x, gate, bias, 0)
    big = make_gate(32, 64, "float32")
    with pytest.raises(ValueError, match=r"k=17 experts per token is not supported; supported k: 1..16"):
        fm.route(x, big, mx.zeros((32,)), 17)


def test_wrong_gate_shape(small):
    x, gate, bias = small
    with pytest.raises(ValueError, match=r"gate_weight has shape \[8, 32\] but x has D=64; expected \[E, 64\]"):
        fm.route(x, gate.weight[:, :32], bias, 2)
    with pytest.raises(ValueError, match=r"gate_weight must be \[E, 64\] with E >= 1, got \[8, 64, 1\]"):
        fm.route(x, gate.weight[..., None], bias, 2)
    q = nn.QuantizedLinear.from_linear(make_gate(8, 128, "float32"), group_size=32, bits=8)
    with pytest.raises(ValueError, match=r"gate_weight has shape \[8, 32\] but 8-bit rows of D=64 inputs need \[8, 16\]"):
        fm.route(x, q, bias, 2)


def test_wrong_bias_shape_or_dtype(small):
    x, gate, bias = small
    with pytest.raises(ValueError, match=r"bias must have shape \[E\] = \[8\], got \[7\]"):
        fm.route(x, gate, bias[:7], 2)
    with pytest.raises(ValueError, match=r"bias must have shape \[E\] = \[8\], got \[1, 8\]"):
        fm.route(x, gate, bias[None], 2)
    with pytest.raises(ValueError, match="bias must be float16, bfloat16 or float32, got int32"):
        fm.route(x, gate, bias.astype(mx.int32), 2)


def test_wrong_dtypes(small):
    x, gate, bias = small
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got int32"):
        fm.route(x.astype(mx.int32), gate, bias, 2)
    with pytest.raises(ValueError, match="an unquantized gate_weight must be float16, bfloat16 or float32, got int32"):
        fm.route(x, gate.weight.astype(mx.int32), bias, 2)


@pytest.mark.parametrize("bits", [4, 6])
def test_other_quantized_gates_are_refused(small, bits):
    x, gate, bias = small
    q = nn.QuantizedLinear.from_linear(make_gate(8, 64, "float32"), group_size=32, bits=bits)
    with pytest.raises(ValueError, match=rf"gate is a {bits}-bit QuantizedLinear; supported bits: \(8,\)"):
        fm.route(x, q, bias, 2)
    # The extension refuses them too, naming what it got.
    with pytest.raises(ValueError, match=rf"gate bits={bits} is not supported; supported bits: \{{8\}}"):
        _ext.route(x, q.weight, q.scales, q.biases, bias, 2, bits, 32)


def test_other_quantized_forms_are_refused(small):
    x, gate, bias = small
    q = nn.QuantizedLinear.from_linear(make_gate(8, 64, "float32"), group_size=32, bits=8)
    with pytest.raises(ValueError, match=r"gate group_size=16 is not supported; supported group sizes: \{32, 64, 128\}"):
        _ext.route(x, q.weight, q.scales, q.biases, bias, 2, 8, 16)
    with pytest.raises(ValueError, match="a quantized gate needs both gate_scales and gate_biases; got only gate_scales"):
        _ext.route(x, q.weight, q.scales, None, bias, 2, 8, 32)
    with pytest.raises(ValueError, match="bits and group_size are only for a quantized gate"):
        _ext.route(x, gate.weight, None, None, bias, 2, 8, 32)
    with pytest.raises(ValueError, match="gate_weight must be uint32, got bfloat16"):
        _ext.route(x, gate.weight, q.scales, q.biases, bias, 2, 8, 32)
    mx4 = nn.QuantizedLinear(64, 8, bias=False, group_size=32, bits=4, mode="mxfp4")
    with pytest.raises(ValueError, match="gate is quantized in mode 'mxfp4'; only 'affine' is supported"):
        fm.route(x, mx4, bias, 2)


def test_gate_of_another_type_or_with_a_bias(small):
    x, _, bias = small
    with pytest.raises(TypeError, match="gate must be an mx.array \\[E, D\\], an nn.Linear or an 8-bit nn.QuantizedLinear, got dict"):
        fm.route(x, {"weight": 1}, bias, 2)
    with pytest.raises(ValueError, match="gate is a Linear with a bias"):
        fm.route(x, nn.Linear(64, 8), bias, 2)

