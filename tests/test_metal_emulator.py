"""The Metal kernels on the Linux emulator (tests/tools/metal_emulator/): every
instantiated kernel, the MiniMax shapes, bad expert ids, and proof that the
guard pages catch what they must. The op cases of test_ops.py and
test_route.py also run here through the `metal_emulator` backend of
conftest.py."""

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe import _ext
from tools.metal_emulator import EmulatorError
from support.moe_reference import (
    dequantized,
    make_experts,
    random_routing,
    reference_h,
    reference_y,
    stock_h,
    stock_y,
)
from support.router_reference import check_against_stock, clear_inputs, make_gate
from support.tolerance import assert_within_tolerance

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
EXPERT_KERNELS = [n for n in _ext.metal_kernel_names() if not n.startswith("route_")]
ROUTE_KERNELS = [n for n in _ext.metal_kernel_names() if n.startswith("route_")]


def parse_kernel_name(name):
    """'gate_up_swiglu_prefill_bfloat16_b3_gs64' -> its pieces."""
    head, bits, gs = name.rsplit("_", 2)
    op_variant, dtype = head.rsplit("_", 1)
    op, variant = op_variant.rsplit("_", 1)
    return op, variant, DTYPES[dtype], int(bits[1:]), int(gs[2:])


def test_emulator_registers_exactly_the_allow_list(metal_emulator):
    assert sorted(metal_emulator.kernel_names()) == sorted(_ext.metal_kernel_names())


@pytest.mark.parametrize("name", EXPERT_KERNELS)
def test_every_kernel(name, metal_emulator):
    op, variant, dtype, bits, gs = parse_kernel_name(name)
    seed = _ext.metal_kernel_names().index(name)
    T = 2 if variant == "decode" else 24  # 6 or 72 (token, slot) pairs
    E, k, D, H = 5, 3, 256, 128
    # The other projection gets the other bits, so both code paths meet.
    other = 7 - bits
    if op == "gate_up_swiglu":
        ex = make_experts(E, D, H, dtype, bits, gs, other, 64, seed=seed)
    else:
        ex = make_experts(E, D, H, dtype, other, 64, bits, gs, seed=seed)
    indices, weights = random_routing(T, E, k, seed=seed, distinct=False)
    x = mx.random.normal((T, D), key=mx.random.key(seed)).astype(dtype)
    if op == "gate_up_swiglu":
        r = metal_emulator.gate_up_swiglu(x, ex.packed, indices)
        assert_within_tolerance(r.out, stock_h(ex, x, indices), reference_h(ex, x, indices), dtype, name)
    else:
        h = fm.gate_up_swiglu(x, ex.packed, indices, stream=mx.cpu)
        r = metal_emulator.down_combine(h, ex.packed, indices, weights)
        assert_within_tolerance(
            r.out, stock_y(ex, h, indices, weights), reference_y(ex, h, indices, weights), dtype, name
        )
    assert r.kernel == name


def emulated_route(metal_emulator, kernels):
    """A route(x, gate, bias, k) on the emulator that records each kernel."""

    def route(x, gate, bias, k):
        w, s, b, bits, gs = fm.router.gate_arrays(gate)
        r = metal_emulator.route(x, w, s, b, bias, k, bits, gs)
        kernels.append(r.kernel)
        return r.out

    return route


@pytest.mark.parametrize("name", ROUTE_KERNELS)
def test_every_route_kernel(name, metal_emulator):
    """route_<x dtype>_gate_<form>: 37 experts (a partial block of rows per
    SIMD group), k=5, against stock under the rules of test_route.py."""
    _, x_dtype, _, form = name.split("_", 3)
    seed = ROUTE_KERNELS.index(name)
    E, k, D = 37, 5, 256
    if form in DTYPES:
        gate = make_gate(E, D, form, seed=seed)
    else:
        gate = make_gate(E, D, "q8", seed=seed, group_size=int(form.split("_gs")[1]))
    bias = mx.random.normal((E,), key=mx.random.key(seed)) * 0.05
    x = clear_inputs((3, D), gate, bias, k, seed=seed, dtype=DTYPES[x_dtype])
    kernels = []
    check_against_stock(x, gate, bias, k, route=emulated_route(metal_emulator, kernels))
    assert kernels == [name]


def test_route_at_the_expert_cap(metal_emulator):
    """E = kRouteMaxExperts (1024), the most the kernel's threadgroup memory
    holds, with the largest k."""
    E, k, D = 1024, 16, 64
    gate, bias = make_gate(E, D, "bfloat16", seed=3), mx.random.normal((E,), key=mx.random.key(3)) * 0.05
    x = clear_inputs((2, D), gate, bias, k, seed=3)
    check_against_stock(x, gate, bias, k, route=emulated_route(metal_emulator, []))


def test_route_guard_pages_catch_a_write_past_the_weights(metal_emulator):
    """The router's outputs are guarded like the others: a weights buffer one
    token short fails and names it."""
    E, k, D, T = 8, 2, 64, 3
    gate = make_gate(E, D, "float32")
    inputs = _ext.route_metal_inputs(mx.random.normal((T, D)), gate.weight, None, None, mx.zeros((E,)), k, None, None)
    mx.eval(inputs)
    problem = dict(bits=0, group_size=0, tokens=T, top_k=k, hidden=D, intermediate=0, experts=E)
    with pytest.raises(EmulatorError, match=r"kernel route_float32_gate_float32: out-of-bounds access .* past the end of buffer 'weights'"):
        metal_emulator.run_outputs("route", problem, inputs, [((T, k), mx.uint32), ((T - 1, k), mx.float32)], mx.float32)


def per_pair_reference(ex, x, indices, weights):
    """fp64 h and y without materialising [T, k, H, D] (MiniMax shapes)."""
    G, U, Dn = dequantized(ex.gate), dequantized(ex.up), dequantized(ex.down)
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    idx = np.array(indices).astype(np.int64)
    T, k = idx.shape
    h = np.zeros((T, k, G.shape[1]))
    for t in range(T):
        for j in range(k):
            g, u = G[idx[t, j]] @ x64[t], U[idx[t, j]] @ x64[t]
            h[t, j] = g / (1.0 + np.exp(-g)) * u
    return h, Dn, idx


@pytest.mark.parametrize("T", [1, 8], ids=["decode", "prefill"])
def test_minimax_shapes(T, metal_emulator):
    """D=3072, H=1536, k=8 at 3 bits, group size 64, bfloat16 (the target)."""
    E, k, D, H, dtype = 12, 8, 3072, 1536, mx.bfloat16
    ex = make_experts(E, D, H, dtype, 3, 64, seed=11)
    indices, weights = random_routing(T, E, k, seed=11)
    x = mx.random.normal((T, D), key=mx.random.key(11)).astype(dtype)
    ra = metal_emulator.gate_up_swiglu(x, ex.packed, indices)
    rb = metal_emulator.down_combine(ra.out, ex.packed, indices, weights)
    variant = "decode" if T == 1 else "prefill"
    assert (ra.kernel, rb.kernel) == (
        f"gate_up_swiglu_{variant}_bfloat16_b3_gs64",
        f"down_combine_{variant}_bfloat16_b3_gs64",
    )
    h_ref, Dn, idx = per_pair_reference(ex, x, indices, weights)
    assert_within_tolerance(ra.out, stock_h(ex, x, indices), h_ref, dtype, "gate_up_swiglu")
    h64 = np.array(ra.out.astype(mx.float32), dtype=np.float64)
    w64 = np.array(weights, dtype=np.float64)
    y_ref = np.stack([sum(w64[t, j] * (Dn[idx[t, j]] @ h64[t, j]) for j in range(k)) for t in range(T)])
    assert_within_tolerance(rb.out, stock_y(ex, ra.out, indices, weights), y_ref, dtype, "down_combine")


# ---------------------------------------------------------------------------
# Bad expert ids: NaN rows on the GPU, no out-of-bounds access
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [3, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize(
    "bad_index,idx_dtype",
    [(6, np.uint32), (2**32 - 1, np.uint32), (-1, np.int32), (1000, np.int32)],
)
def test_bad_expert_ids_give_nan_rows_in_bounds(T, bad_index, idx_dtype, gpu_device):
    """A GPU cannot raise mid-kernel: the rows that depend on an expert id
    outside [0, E) become NaN (the CPU raises instead, test_errors.py), and
    the emulator's guard pages prove no byte outside the buffers is read or
    written. Every other row is exactly what valid ids give."""
    E, k = 6, 2
    ex = make_experts(E, 256, 128, mx.bfloat16, 3, 64)
    indices, weights = random_routing(T, E, k, seed=T)
    x = mx.random.normal((T, 256), key=mx.random.key(T)).astype(mx.bfloat16)
    bad = np.array(indices).astype(np.int64)
    bad[1, 1] = bad_index
    bad = mx.array(bad.astype(idx_dtype))
    good = mx.array(np.array(indices).astype(idx_dtype))

    h_good = np.array(gpu_device.gate_up_swiglu(x, ex.packed, good).astype(mx.float32))
    h_bad = np.array(gpu_device.gate_up_swiglu(x, ex.packed, bad).astype(mx.float32))
    assert np.isnan(h_bad[1, 1]).all()
    mask = np.ones((T, k), bool)
    mask[1, 1] = False
    assert np.array_equal(h_bad[mask], h_good[mask])

    h = mx.array(h_good).astype(mx.bfloat16)
    y_good = np.array(gpu_device.down_combine(h, ex.packed, good, weights).astype(mx.float32))
    y_bad = np.array(gpu_device.down_combine(h, ex.packed, bad, weights).astype(mx.float32))
    assert np.isnan(y_bad[1]).all()
    others = np.arange(T) != 1
    assert np.array_equal(y_bad[others], y_good[others])


# ---------------------------------------------------------------------------
# The emulator's own checks can fail
# ---------------------------------------------------------------------------


def raw_inputs(ex, x, indices, proj="gate_up"):
    w, s, b, bits, gs = ex.packed.projection(proj)[:5]
    inputs = _ext.gate_up_swiglu_metal_inputs(x, w, s, b, indices, bits, gs, stream=mx.cpu)
    mx.eval(inputs)
    return inputs, bits, gs


@pytest.mark.parametrize("T", [1, 40], ids=["decode", "prefill"])
def test_guard_pages_catch_a_read_past_a_buffer(T, metal_emulator):
    """The weights of the last expert left out: reading them must fail and
    name the kernel and the buffer."""
    E, k, D, H = 4, 2, 256, 128
    ex = make_experts(E, D, H, mx.float32, 4, 64)
    indices = mx.full((T, k), E - 1, dtype=mx.uint32)
    x = mx.random.normal((T, D))
    inputs, bits, gs = raw_inputs(ex, x, indices)
    inputs[1] = inputs[1][: E - 1]
    problem = dict(bits=bits, group_size=gs, tokens=T, top_k=k, hidden=D, intermediate=H, experts=E)
    variant = "decode" if T == 1 else "prefill"
    with pytest.raises(
        EmulatorError,
        match=rf"kernel gate_up_swiglu_{variant}_float32_b4_gs64: out-of-bounds access \(SIGSEGV\) "
        r"\d+ bytes past the end of buffer 'gate_up_weight'",
    ):
        metal_emulator.run("gate_up_swiglu", problem, inputs, (T, k, H), mx.float32)


def test_guard_pages_catch_a_write_past_the_output(metal_emulator):
    """The same call with a problem claiming more tokens than the output
    holds: the write past the end fails and names the buffer."""
    E, k, D, H, T = 4, 2, 256, 128, 3
    ex = make_experts(E, D, H, mx.float32, 4, 64)
    indices, _ = random_routing(T, E, k)
    inputs, bits, gs = raw_inputs(ex, mx.random.normal((T, D)), indices)
    problem = dict(bits=bits, group_size=gs, tokens=T, top_k=k, hidden=D, intermediate=H, experts=E)
    # Output buffer one token short.
    with pytest.raises(EmulatorError, match=r"past the end of buffer '(h|x|indices)'"):
        metal_emulator.run("gate_up_swiglu", problem, inputs, (T - 1, k, H), mx.float32)


def test_unwritten_outputs_show_as_nan(metal_emulator):
    """The output buffer starts as NaN bytes: a plan whose grid misses rows
    would leave NaN, which the tolerance rule rejects."""
    E, k, D, H, T = 4, 2, 256, 128, 3
    ex = make_experts(E, D, H, mx.float32, 4, 64)
    indices, _ = random_routing(T, E, k)
    inputs, bits, gs = raw_inputs(ex, mx.random.normal((T, D)), indices)
    # Claim fewer tokens than the output holds: the last token's rows stay unwritten.
    problem = dict(bits=bits, group_size=gs, tokens=T - 1, top_k=k, hidden=D, intermediate=H, experts=E)
    out = np.array(metal_emulator.run("gate_up_swiglu", problem, inputs, (T, k, H), mx.float32).out)
    assert np.isfinite(out[: T - 1]).all()
    assert np.isnan(out[T - 1]).all()


def test_every_kernel_ran(metal_emulator, request):
    """Runs last in this module (pytest keeps file order): every kernel of
    the allow-list has run in the emulator."""
    if request.config.option.keyword or request.config.option.markexpr:
        pytest.skip("a -k or -m selection may leave kernels out")
    missing = set(_ext.metal_kernel_names()) - metal_emulator.kernels_run
    assert not missing, f"kernels never run in the emulator: {sorted(missing)}"
