"""The expert ops at every setting of the grid (fused_moe._ext.gate_up,
down_combine, down_slots): every mode, width and group size, every dtype and
activation, expert biases or not, x shared or per slot, the combine or per
slot, and gate/up and down at different settings. Against the fp64
reference from the same quantized arrays, under the tolerance rule against
mlx-lm's stock path in the same dtype (QuantizedSwitchLinear pieces and the
models' own activation modules). docs/kernel_contract.md is the spec.

A pairwise covering design (support/covering.py) makes every value of every
axis meet every value of every other axis once (gate/up's and down's
settings each meet all the rest, not each other).
"""

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe import _ext
from support.covering import missing_pairs, pairwise_cases
from support.moe_reference import (
    ACTIVATION_PARAMS,
    ALL_QUANTS,
    Quant,
    gated,
    make_projection,
    random_routing,
    raw_down,
    raw_gate_up,
    reference_down,
    reference_gate_up,
    stock_down,
    stock_gate_up,
)
from support.tolerance import assert_within_tolerance

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
E, D, H = 6, 256, 128

AXES = {
    "gate_up": ALL_QUANTS,
    "down": ALL_QUANTS,
    "dtype": DTYPES,
    "activation": list(_ext.SUPPORTED_ACTIVATIONS),
    "bias": [False, True],
    "x": ["shared", "per_slot"],
    "form": ["combine", "slots"],
    "T": [1, 6, 40],
}
SKIP_PAIRS = [("gate_up", "down")]
CASES = pairwise_cases(AXES, SKIP_PAIRS)


def case_id(c) -> str:
    return (f"gu_{c['gate_up']}-d_{c['down']}-{str(c['dtype']).split('.')[-1]}-{c['activation']}"
            f"{'-bias' if c['bias'] else ''}-x_{c['x']}-{c['form']}-T{c['T']}")


def test_the_design_covers_every_pair():
    assert not missing_pairs(CASES, AXES, SKIP_PAIRS)
    # Every setting of the grid is in it, on both projections.
    assert {c["gate_up"] for c in CASES} == set(ALL_QUANTS) == {c["down"] for c in CASES}


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def metal_has(c) -> bool:
    q, dq = c["gate_up"], c["down"]
    return _ext.metal_has_expert_kernel(
        "gate_up", q.mode, q.bits, q.group_size, activation=c["activation"], bias=c["bias"],
        global_scale=q.global_scale, x_per_slot=c["x"] == "per_slot",
    ) and _ext.metal_has_expert_kernel(
        "down", dq.mode, dq.bits, dq.group_size, bias=c["bias"], global_scale=dq.global_scale,
        combine=c["form"] == "combine",
    )


def skip_without_metal_kernel(device, c):
    if device.name != "cpu" and not metal_has(c):
        pytest.skip(
            f"{device.name}: no Metal kernel yet for gate_up {c['gate_up']} / {c['activation']}"
            f"{' / bias' if c['bias'] else ''} / x {c['x']}, down {c['down']} / {c['form']} "
            "(not in the Metal allow-list; fused_moe._ext.metal_has_expert_kernel)"
        )


def run_gate_up(device, x, g, indices, activation, params):
    return device.ext_gate_up(x, *g.args(), indices, g.quant.bits, g.quant.group_size, activation=activation,
                              **params, **g.kwargs())


def run_down(device, h, d, indices, weights):
    if weights is None:
        return device.ext_down_slots(h, *d.args(), indices, d.quant.bits, d.quant.group_size, **d.kwargs())
    return device.ext_down_combine(h, *d.args(), indices, weights, d.quant.bits, d.quant.group_size,
                                   **d.kwargs())


# ---------------------------------------------------------------------------
# The covering design
# ---------------------------------------------------------------------------


def make_case(c, seed):
    dtype, act = c["dtype"], c["activation"]
    gq, dq = c["gate_up"], c["down"]
    gate = make_projection(E, D, H, gq, dtype, seed, bias=c["bias"])
    up = make_projection(E, D, H, gq, dtype, seed + 1, bias=c["bias"]) if gated(act) else None
    down = make_projection(E, H, D, dq, dtype, seed + 2, bias=c["bias"])
    return gate, up, down


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_covering_design(c, device):
    skip_without_metal_kernel(device, c)
    seed = CASES.index(c)
    dtype, act, T, k = c["dtype"], c["activation"], c["T"], 3
    params = ACTIVATION_PARAMS[act]
    per_slot, combine = c["x"] == "per_slot", c["form"] == "combine"
    gate, up, down = make_case(c, 10 * seed)
    g, d = raw_gate_up(gate, up, c["gate_up"]), raw_down(down, c["down"])
    indices, weights = random_routing(T, E, k, seed=seed, distinct=seed % 2 == 0)
    x_shape = (T, k, D) if per_slot else (T, D)
    x = mx.random.normal(x_shape, key=mx.random.key(seed)).astype(dtype)

    h = run_gate_up(device, x, g, indices, act, params)
    assert h.shape == (T, k, H) and h.dtype == dtype
    h_ref = reference_gate_up(gate, up, x, indices, act, params, per_slot)
    h_stock = stock_gate_up(gate, up, x, indices, act, params, per_slot)
    assert_within_tolerance(h, h_stock, h_ref, dtype, "gate_up")

    w = weights if combine else None
    y = run_down(device, h, d, indices, w)
    assert y.shape == ((T, D) if combine else (T, k, D)) and y.dtype == dtype
    # The down op alone, from the fused h.
    assert_within_tolerance(y, stock_down(down, h, indices, w), reference_down(down, h, indices, w), dtype,
                            "down_combine" if combine else "down_slots")
    # Both ops end to end against stock end to end, both judged from the exact h.
    assert_within_tolerance(y, stock_down(down, h_stock, indices, w), reference_down(down, h_ref, indices, w),
                            dtype, "gate_up + down")


# ---------------------------------------------------------------------------
# Properties on the CPU
# ---------------------------------------------------------------------------

# Settings that exercise each kernel path (int16 widths, fp4 codes and
# scales, fp8, global scales), with the epilogues' options.
PROPERTY_SETTINGS = [
    (Quant("affine", 4, 64), "swiglu", False, False),
    (Quant("affine", 8, 32), "swiglu_oai", True, True),
    (Quant("affine", 5, 128), "gelu_approx", True, False),
    (Quant("affine", 2, 32), "geglu", False, True),
    (Quant("affine", 6, 64), "relu2", False, False),
    (Quant("affine", 3, 128), "situ", True, True),
    (Quant("mxfp4", 4, 32), "swiglu_oai", True, False),
    (Quant("mxfp8", 8, 32), "clamped_swiglu", False, True),
    (Quant("nvfp4", 4, 16), "deepseek_v41_swiglu", False, False),
    (Quant("nvfp4", 4, 16, True), "swiglu", True, True),
]
PROPERTY_IDS = [f"{q}-{a}{'-bias' if b else ''}{'-per_slot' if p else ''}" for q, a, b, p in PROPERTY_SETTINGS]


def _ops(q, act, bias, per_slot, dtype, T, k, seed=0, x=None, indices=None):
    gate = make_projection(E, D, H, q, dtype, seed, bias=bias)
    up = make_projection(E, D, H, q, dtype, seed + 1, bias=bias) if gated(act) else None
    down = make_projection(E, H, D, q, dtype, seed + 2, bias=bias)
    g, d = raw_gate_up(gate, up, q), raw_down(down, q)
    params = ACTIVATION_PARAMS[act]

    def run(x, indices, weights):
        h = _ext.gate_up(x, *g.args(), indices, q.bits, q.group_size, activation=act, stream=mx.cpu,
                         **params, **g.kwargs())
        y = _ext.down_combine(h, *d.args(), indices, weights, q.bits, q.group_size, stream=mx.cpu, **d.kwargs())
        ys = _ext.down_slots(h, *d.args(), indices, q.bits, q.group_size, stream=mx.cpu, **d.kwargs())
        mx.eval(h, y, ys)
        return h, y, ys

    return run


def _f32(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q,act,bias,per_slot", PROPERTY_SETTINGS, ids=PROPERTY_IDS)
def test_bit_identical_across_thread_counts(q, act, bias, per_slot, dtype):
    T, k = 40, 8
    run = _ops(q, act, bias, per_slot, dtype, T, k)
    indices, weights = random_routing(T, E, k, seed=3, distinct=False)
    x = mx.random.normal((T, k, D) if per_slot else (T, D), key=mx.random.key(5)).astype(dtype)
    before = fm.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            fm.set_num_threads(n)
            results.append([_f32(a) for a in run(x, indices, weights)])
    finally:
        fm.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", ALL_QUANTS, ids=[str(q) for q in ALL_QUANTS])
def test_result_of_a_token_does_not_depend_on_its_batch(q, dtype):
    # Six tokens on the same experts (each expert's rows serve a tile of six
    # pairs) against each token alone (a tile of one), on every path.
    T, k = 6, 3
    run = _ops(q, "swiglu_oai", True, False, dtype, T, k)
    indices = mx.array(np.tile(np.array([[5, 0, 2]], dtype=np.uint32), (T, 1)))
    weights = mx.array(np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (T, 1)))
    x = mx.random.normal((T, D), key=mx.random.key(7)).astype(dtype)
    h, y, ys = (_f32(a) for a in run(x, indices, weights))
    for t in range(T):
        h1, y1, ys1 = (_f32(a) for a in run(x[t : t + 1], indices[t : t + 1], weights[t : t + 1]))
        assert np.array_equal(h1, h[t : t + 1]) and np.array_equal(y1, y[t : t + 1])
        assert np.array_equal(ys1, ys[t : t + 1])


@pytest.mark.parametrize("q,act,bias,per_slot", PROPERTY_SETTINGS, ids=PROPERTY_IDS)
def test_nan_and_inf_stay_in_their_token(q, act, bias, per_slot):
    T, k, dtype = 4, 3, mx.bfloat16
    run = _ops(q, act, bias, per_slot, dtype, T, k)
    indices, weights = random_routing(T, E, k, seed=1)
    shape = (T, k, D) if per_slot else (T, D)
    x = mx.random.normal(shape, key=mx.random.key(2)).astype(dtype)
    bad = np.zeros(shape, dtype=np.float32)
    bad[1] = np.nan
    bad[2].reshape(-1)[7] = np.inf
    h0, y0, ys0 = (_f32(a) for a in run(x, indices, weights))
    h, y, ys = (_f32(a) for a in run((x.astype(mx.float32) + mx.array(bad)).astype(dtype), indices, weights))
    assert np.isnan(y[1]).all() and np.isnan(ys[1]).all()
    assert not np.isfinite(y[2]).all()
    for t in (0, 3):
        assert np.array_equal(h[t], h0[t]) and np.array_equal(y[t], y0[t]) and np.array_equal(ys[t], ys0[t])


def test_old_entry_points_are_the_new_ops():
    q, dtype = Quant("affine", 3, 64), mx.bfloat16
    gate, up, down = (make_projection(E, a, b, q, dtype, s) for a, b, s in ((D, H, 0), (D, H, 1), (H, D, 2)))
    g, d = raw_gate_up(gate, up, q), raw_down(down, q)
    indices, weights = random_routing(5, E, 3)
    x = mx.random.normal((5, D)).astype(dtype)
    h_old = _ext.gate_up_swiglu(x, *g.args(), indices, 3, 64)
    h_new = _ext.gate_up(x, *g.args(), indices, 3, 64, activation="swiglu")
    assert mx.array_equal(h_old, h_new).item()
    y_old = _ext.down_combine(h_old, *d.args(), indices, weights, 3, 64)
    slots = _ext.down_slots(h_old, *d.args(), indices, 3, 64)
    assert mx.array_equal(y_old, _ext.down_combine(h_old, *d.args(), indices, weights, 3, 64, mode="affine")).item()
    assert slots.shape == (5, 3, D)


def test_deepseek_v41_without_limit_is_swiglu():
    q, dtype = Quant("mxfp4", 4, 32), mx.float16
    gate, up = (make_projection(E, D, H, q, dtype, s) for s in (0, 1))
    g = raw_gate_up(gate, up, q)
    indices, _ = random_routing(4, E, 2)
    x = mx.random.normal((4, D)).astype(dtype)
    plain = _ext.gate_up(x, *g.args(), indices, 4, 32, mode="mxfp4")
    for limit in (0.0, -1.0):
        h = _ext.gate_up(x, *g.args(), indices, 4, 32, mode="mxfp4", activation="deepseek_v41_swiglu", limit=limit)
        assert mx.array_equal(h, plain).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_situ_without_linear_beta(dtype):
    q = Quant("affine", 4, 64)
    gate, up = (make_projection(E, D, H, q, dtype, s) for s in (0, 1))
    g = raw_gate_up(gate, up, q)
    indices, _ = random_routing(4, E, 2)
    x = mx.random.normal((4, D)).astype(dtype)
    p = {"beta": 0.7}
    h = _ext.gate_up(x, *g.args(), indices, 4, 64, activation="situ", **p)
    assert_within_tolerance(h, stock_gate_up(gate, up, x, indices, "situ", p, False),
                            reference_gate_up(gate, up, x, indices, "situ", p, False), dtype, "situ")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mx4():
    q = Quant("mxfp4", 4, 32)
    gate, up, down = (make_projection(E, a, b, q, mx.bfloat16, s) for a, b, s in ((D, H, 0), (D, H, 1), (H, D, 2)))
    return raw_gate_up(gate, up, q), raw_down(down, q)


BAD_CALLS = [
    # (description, call kwargs for gate_up on the mxfp4 arrays, error pattern)
    ("nvfp4 at group size 32", dict(bits=4, group_size=32, mode="nvfp4"),
     r"gate_up group_size=32 is not supported for mode nvfp4; supported group sizes: \{16\}"),
    ("mxfp8 at 4 bits", dict(bits=4, group_size=32, mode="mxfp8"),
     r"gate_up bits=4 is not supported for mode mxfp8; supported bits: \{8\}"),
    ("mxfp4 at group size 64", dict(bits=4, group_size=64, mode="mxfp4"),
     r"gate_up group_size=64 is not supported for mode mxfp4; supported group sizes: \{32\}"),
    ("affine 7 bits", dict(bits=7, group_size=32, mode="affine"),
     r"gate_up bits=7 is not supported; supported bits: \{2, 3, 4, 5, 6, 8\}"),
    ("affine group size 16", dict(bits=4, group_size=16, mode="affine"),
     r"gate_up group_size=16 is not supported; supported group sizes: \{32, 64, 128\}"),
    ("unknown mode", dict(bits=4, group_size=32, mode="int4"),
     r"gate_up mode='int4' is not supported; supported modes: \{affine, mxfp4, mxfp8, nvfp4\}"),
    ("unknown activation", dict(bits=4, group_size=32, mode="mxfp4", activation="swish"),
     r"activation='swish' is not supported; supported activations: \{swiglu, clamped_swiglu, "),
    ("missing parameter", dict(bits=4, group_size=32, mode="mxfp4", activation="swiglu_oai", limit=7.0),
     r"activation 'swiglu_oai' needs alpha"),
    ("foreign parameter", dict(bits=4, group_size=32, mode="mxfp4", activation="geglu", beta=1.0),
     r"beta is not a parameter of activation 'geglu'"),
    ("non-positive limit", dict(bits=4, group_size=32, mode="mxfp4", activation="clamped_swiglu", limit=0.0),
     r"limit=0.000000 of activation 'clamped_swiglu' must be > 0"),
    ("zero beta", dict(bits=4, group_size=32, mode="mxfp4", activation="situ", beta=0.0),
     r"beta=0.000000 must be finite and nonzero"),
    ("nan limit", dict(bits=4, group_size=32, mode="mxfp4", activation="swiglu_oai", limit=float("nan"), alpha=1.0),
     r"limit=nan must be finite"),
    ("global scale outside nvfp4", dict(bits=4, group_size=32, mode="mxfp4", global_scale=mx.ones((E, 2))),
     r"global_scale is only for mode nvfp4, not mxfp4"),
    ("expert bias of the wrong shape", dict(bits=4, group_size=32, mode="mxfp4", bias=mx.zeros((E, H))),
     r"bias must have shape \[E, 2H\] = \[6, 256\], got \[6, 128\]"),
    ("affine reading uint8 scales", dict(bits=4, group_size=32, mode="affine"),
     r"gate_up_biases is missing: mode affine needs biases"),
]


@pytest.mark.parametrize("what,kw,pattern", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_setting_raises_naming_value_and_set(mx4, what, kw, pattern):
    g, _ = mx4
    x = mx.random.normal((2, D)).astype(mx.bfloat16)
    indices, _ = random_routing(2, E, 2)
    kw = dict(kw)
    bits, gs = kw.pop("bits"), kw.pop("group_size")
    with pytest.raises(ValueError, match=pattern):
        _ext.gate_up(x, g.weight, g.scales, None, indices, bits, gs, **kw)


def test_bad_arrays_raise(mx4):
    g, d = mx4
    x = mx.random.normal((2, D)).astype(mx.bfloat16)
    indices, weights = random_routing(2, E, 2)
    with pytest.raises(ValueError, match=r"gate_up_biases must be None for mode mxfp4: it has no biases"):
        _ext.gate_up(x, g.weight, g.scales, g.scales, indices, 4, 32, mode="mxfp4")
    with pytest.raises(ValueError, match=r"gate_up_scales must be uint8 \(e8m0 scales\) for mode mxfp4, got bfloat16"):
        _ext.gate_up(x, g.weight, g.scales.astype(mx.bfloat16), None, indices, 4, 32, mode="mxfp4")
    with pytest.raises(ValueError, match=r"gate_up_weight has shape \[6, 256, 32\] but mxfp4 rows of D=512 inputs"):
        _ext.gate_up(mx.concatenate([x, x], axis=1), g.weight, g.scales, None, indices, 4, 32, mode="mxfp4")
    with pytest.raises(ValueError, match=r"weight must be \[E, H, D\*bits/32\] \(fc1, not gated\)"):
        _ext.gate_up(x, g.weight[0], g.scales, None, indices, 4, 32, mode="mxfp4", activation="relu2")
    h = _ext.gate_up(x, g.weight, g.scales, None, indices, 4, 32, mode="mxfp4")
    nv = raw_down(make_projection(E, H, D, Quant("nvfp4", 4, 16, True), mx.bfloat16, 3), Quant("nvfp4", 4, 16, True))
    with pytest.raises(ValueError, match=r"global_scale must be float32 \[6\] \(one per expert\), got float32 \[6, 2\]"):
        _ext.down_slots(h, nv.weight, nv.scales, None, indices, 4, 16, mode="nvfp4", global_scale=mx.ones((E, 2)))
    with pytest.raises(ValueError, match=r"global_scale must be float32 \[6\] \(one per expert\), got float16 \[6\]"):
        _ext.down_slots(h, nv.weight, nv.scales, None, indices, 4, 16, mode="nvfp4",
                        global_scale=nv.global_scale.astype(mx.float16))
    with pytest.raises(ValueError, match=r"bias must have shape \[E, D\] = \[6, 256\], got \[256\]"):
        _ext.down_combine(h, d.weight, d.scales, None, indices, weights, 4, 32, mode="mxfp4", bias=mx.zeros((D,)))
    # x per slot: [..., k, D] with the lead and k of indices; anything else names both forms.
    with pytest.raises(ValueError, match=r"indices must have shape \[2, 3\] \+ \[k\], got \[2, 2\]"):
        _ext.gate_up(mx.zeros((2, 3, D), dtype=mx.bfloat16), g.weight, g.scales, None, indices, 4, 32, mode="mxfp4")


@pytest.mark.parametrize("computed", ["at the call", "in the graph"])
def test_bad_expert_ids_raise_on_the_cpu(mx4, computed):
    g, d = mx4
    x = mx.random.normal((3, D)).astype(mx.bfloat16)
    indices, weights = random_routing(3, E, 2)
    h = _ext.gate_up(x, g.weight, g.scales, None, indices, 4, 32, mode="mxfp4")
    bad = np.array(indices).astype(np.int64)
    bad[2, 1] = E
    bad = mx.array(bad.astype(np.uint32))
    if computed == "in the graph":  # not known at the call: the kernel task checks it
        bad = bad + mx.array(0, dtype=mx.uint32)
    calls = [
        lambda: _ext.gate_up(x, g.weight, g.scales, None, bad, 4, 32, mode="mxfp4"),
        lambda: _ext.down_combine(h, d.weight, d.scales, None, bad, weights, 4, 32, mode="mxfp4"),
        lambda: _ext.down_slots(h, d.weight, d.scales, None, bad, 4, 32, mode="mxfp4"),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=rf"indices\[2, 1\] = {E} is out of range for {E} experts"):
            mx.eval(call())
    # The stream is still usable afterwards.
    mx.eval(_ext.down_slots(h, d.weight, d.scales, None, indices, 4, 32, mode="mxfp4"))


def test_every_setting_of_the_grid_has_a_metal_kernel(mx4):
    # metal/allow_list.h covers the whole supported grid: every quantization
    # with every activation and flag, so a GPU stream never meets a setting
    # the CPU runs but Metal refuses.
    quants = [("affine", b, gs) for b in _ext.SUPPORTED_BITS for gs in _ext.SUPPORTED_GROUP_SIZES]
    quants += [(mode, layout["bits"], layout["group_size"]) for mode, layout in _ext.FP_MODES.items()]
    for mode, bits, gs in quants:
        for activation in _ext.SUPPORTED_ACTIVATIONS:
            for bias in (False, True):
                for x_per_slot in (False, True):
                    assert _ext.metal_has_expert_kernel(
                        "gate_up", mode, bits, gs, activation=activation, bias=bias,
                        global_scale=mode == "nvfp4", x_per_slot=x_per_slot), (mode, bits, gs, activation)
        for combine in (False, True):
            assert _ext.metal_has_expert_kernel("down", mode, bits, gs, bias=False, global_scale=False,
                                                combine=combine), (mode, bits, gs, combine)
    # The Metal inputs (what a GPU stream gets, and the emulator runs) take
    # the settings the first Metal kernels lacked: an fp mode, another
    # activation, x per slot, down per slot.
    g, d = mx4
    x = mx.random.normal((2, D)).astype(mx.bfloat16)
    indices, _ = random_routing(2, E, 2)
    h = mx.random.normal((2, 2, H)).astype(mx.bfloat16)
    q = Quant("affine", 4, 64)
    gate, up = (make_projection(E, D, H, q, mx.bfloat16, s) for s in (0, 1))
    a = raw_gate_up(gate, up, q)
    mx.eval(
        _ext.gate_up_metal_inputs(x, g.weight, g.scales, None, indices, 4, 32, mode="mxfp4", stream=mx.cpu),
        _ext.down_metal_inputs(h, d.weight, d.scales, None, indices, None, 4, 32, mode="mxfp4", stream=mx.cpu),
        _ext.gate_up_metal_inputs(x, *a.args(), indices, 4, 64, activation="geglu", stream=mx.cpu),
        _ext.gate_up_metal_inputs(mx.zeros((2, 2, D), dtype=mx.bfloat16), *a.args(), indices, 4, 64,
                                  stream=mx.cpu),
    )
