"""The Metal kernels on the Linux emulator (tests/tools/metal_emulator/): every
setting of docs/kernel_contract.md by a covering design, the MiniMax shapes,
bad expert ids, fp codes and scales at their edges, and proof that the guard
pages catch what they must. The op cases of test_ops.py and test_route.py
also run here through the `metal_emulator` backend of conftest.py.

The allow-list holds over a thousand kernels; the emulator builds a kernel's
family (six kernels) on its first run, from each kernel's own instantiation
line (_ext.metal_kernel_source, as a GPU stream compiles it), and caches it,
so these tests compile only the families they run."""

import math
import struct

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe import _ext
from fused_moe.ops.router import gate_arrays
from support.expert_reference import (
    ACTIVATION_PARAMS,
    dequantize,
    e4m3,
    gated,
    make_projection,
    mlx_dequantize,
    reference_down,
    reference_gate_up,
    stock_down,
    stock_gate_up,
)
from support.moe_reference import (
    dequantized,
    make_experts,
    random_routing,
    stock_h,
    stock_y,
)
from support.router_reference import check_against_stock, clear_inputs, make_gate
from support.tolerance import assert_within_tolerance
from tools import metal_emulator as metal_emulator_module
from tools import metal_kernels
from tools.metal_emulator import EmulatorError

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
QUANTS = [tuple(q) for q in _ext.supported_quantizations()]
ACTIVATIONS = list(_ext.SUPPORTED_ACTIVATIONS)
ROUTE_KERNELS = [n for n in _ext.metal_kernel_names() if n.startswith("route_")]


# ---------------------------------------------------------------------------
# Every setting, by a covering design
# ---------------------------------------------------------------------------


def contract_design():
    """One case per row: gate/up's and down's quantizations (mixed widths:
    each of the 21 appears once on each side), dtype, activation with its
    parameters, expert bias, nvfp4 global scales, x per slot, down with the
    combine or per slot, decode or prefill, k, the index dtype and two
    shapes (one step of 512 inputs, partial; and several). Every value of
    every factor appears at least once; not the full product."""
    n = len(QUANTS)
    cases = []
    for i in range(n):
        gu, dn = QUANTS[i], QUANTS[(5 * i + 7) % n]
        k = [3, 1, 8, 2][i % 4]
        cases.append(dict(
            gate_up=gu, down=dn, dtype=DTYPES[i % 3], activation=ACTIVATIONS[i % len(ACTIVATIONS)],
            bias=(i // 3) % 2 == 0, x_per_slot=i % 4 in (1, 2), combine=i % 5 != 2,
            prefill=i % 7 in (1, 4, 5), k=k, index_dtype=np.int32 if i % 2 else np.uint32,
            wide=i % 3 == 2, global_scale=True,
        ))
    # nvfp4 without its global scale, situ without linear_beta and
    # deepseek_v41_swiglu with limit <= 0 (plain swiglu) once each.
    cases.append(dict(gate_up=("nvfp4", 4, 16), down=("nvfp4", 4, 16), dtype=mx.bfloat16,
                      activation="situ", params={"beta": 0.7}, bias=True, x_per_slot=False,
                      combine=True, prefill=True, k=4, index_dtype=np.uint32, wide=True,
                      global_scale=False))
    cases.append(dict(gate_up=("mxfp4", 4, 32), down=("b4_gs64"), dtype=mx.float32,
                      activation="deepseek_v41_swiglu", params={"limit": -1.0}, bias=False,
                      x_per_slot=True, combine=False, prefill=False, k=2, index_dtype=np.int32,
                      wide=False, global_scale=False))
    cases[-1]["down"] = ("affine", 4, 64)
    return cases


DESIGN = contract_design()


def case_id(c):
    q = lambda m: metal_kernels.quant_name(*m)  # noqa: E731
    return (f"{q(c['gate_up'])}-{c['activation']}-{q(c['down'])}-{str(c['dtype']).split('.')[-1]}"
            f"-{'prefill' if c['prefill'] else 'decode'}")


def test_design_covers_every_setting():
    """The design's promise, checked, so that a new mode or activation
    cannot slip past it."""
    assert {c["gate_up"] for c in DESIGN} == set(QUANTS)
    assert {c["down"] for c in DESIGN} == set(QUANTS)
    assert {c["activation"] for c in DESIGN} == set(ACTIVATIONS)
    for factor in ("bias", "x_per_slot", "combine", "prefill", "wide"):
        assert {c[factor] for c in DESIGN} == {True, False}, factor
    assert {c["dtype"] for c in DESIGN} == set(DTYPES)
    nv = [c for c in DESIGN if c["gate_up"][0] == "nvfp4"] + [c for c in DESIGN if c["down"][0] == "nvfp4"]
    assert {c["global_scale"] for c in nv} == {True, False}


def design_kernels():
    """The kernels the design runs (prebuilt in parallel by the fixture)."""
    names = set()
    for c in DESIGN:
        variant = "prefill" if c["prefill"] else "decode"
        dt = str(c["dtype"]).split(".")[-1]
        act = c["activation"]
        if c.get("params", {}).get("limit", 1) <= 0 and act == "deepseek_v41_swiglu":
            act = "swiglu"
        names.add(metal_kernels.expert_name("gate_up", variant, dt, metal_kernels.quant_name(*c["gate_up"]), act))
        names.add(metal_kernels.expert_name("down", variant, dt, metal_kernels.quant_name(*c["down"])))
    return names


@pytest.fixture(scope="module")
def built(metal_emulator):
    """Builds the design's kernel families side by side before the cases run."""
    metal_emulator.prebuild(design_kernels())
    return metal_emulator


def case_arrays(c, seed):
    dtype, k = c["dtype"], c["k"]
    E = max(5, k + 1)
    D, H = (640, 384) if c["wide"] else (256, 128)
    T = max(2, math.ceil(72 / k)) if c["prefill"] else 2
    act = c["activation"]
    params = c.get("params", ACTIVATION_PARAMS[act])
    R = 2 * H if gated(act) else H
    gm, gb, gg = c["gate_up"]
    dm, db, dg = c["down"]
    gu = make_projection(E, R, D, dtype, gm, gb, gg, global_scale=c["global_scale"] and gm == "nvfp4",
                         gated_rows=gated(act), seed=seed)
    dn = make_projection(E, D, H, dtype, dm, db, dg, global_scale=c["global_scale"] and dm == "nvfp4",
                         seed=seed + 1000)
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(c["index_dtype"])
    indices = mx.array(idx)
    weights = mx.array((rng.random((T, k)) + 0.1).astype(np.float32))
    x_shape = (T, k, D) if c["x_per_slot"] else (T, D)
    x = mx.random.normal(x_shape, key=mx.random.key(seed)).astype(dtype)
    h = mx.random.normal((T, k, H), key=mx.random.key(seed + 1)).astype(dtype)
    bias_dtype = [mx.float32, dtype, mx.bfloat16][seed % 3]
    gu_bias = (mx.random.normal((E, R), key=mx.random.key(seed + 2)) * 0.1).astype(bias_dtype) if c["bias"] else None
    dn_bias = (mx.random.normal((E, D), key=mx.random.key(seed + 3)) * 0.1).astype(bias_dtype) if c["bias"] else None
    return gu, dn, x, h, indices, weights, act, params, gu_bias, dn_bias


@pytest.mark.parametrize("c", DESIGN, ids=[case_id(c) for c in DESIGN])
def test_contract_case(c, gpu_device, request):
    """gate_up and down (with the combine or per slot) of one design row
    against the fp64 reference from the same quantized arrays, under the
    tolerance rule; on the emulator, the kernels the launch plan picks."""
    if gpu_device.name == "metal_emulator":
        request.getfixturevalue("built")
    seed = DESIGN.index(c)
    gu, dn, x, h, indices, weights, act, params, gu_bias, dn_bias = case_arrays(c, seed)
    dtype = c["dtype"]
    out = gpu_device.ext_gate_up(x, *gu.arrays(), indices, *gu.quant(), mode=gu.mode, activation=act,
                                 bias=gu_bias, global_scale=gu.global_scale, **params)
    lead = x.shape[:-2] if c["x_per_slot"] else x.shape[:-1]
    H = h.shape[-1]
    assert out.shape == (*lead, c["k"], H) and out.dtype == dtype
    assert_within_tolerance(out, stock_gate_up(gu, x, indices, act, params, gu_bias),
                            reference_gate_up(gu, x, indices, act, params, gu_bias), dtype, "gate_up")
    if c["combine"]:
        y = gpu_device.ext_down_combine(h, *dn.arrays(), indices, weights, *dn.quant(), mode=dn.mode,
                                        bias=dn_bias, global_scale=dn.global_scale)
        w = weights
    else:
        y = gpu_device.ext_down_slots(h, *dn.arrays(), indices, *dn.quant(), mode=dn.mode, bias=dn_bias,
                                      global_scale=dn.global_scale)
        w = None
    D = dn.weight.shape[1]
    assert y.shape == ((*h.shape[:-2], D) if c["combine"] else (*h.shape[:-1], D)) and y.dtype == dtype
    assert_within_tolerance(y, stock_down(dn, h, indices, w, dn_bias), reference_down(dn, h, indices, w, dn_bias),
                            dtype, "down_combine" if c["combine"] else "down_slots")


@pytest.mark.parametrize("mode,bits,group_size", [q for q in QUANTS if q[0] != "affine" or q[2] == 64])
def test_reference_decoding_is_mlx(mode, bits, group_size):
    """The reference's own decoding of the contract (e2m1, e4m3, e8m0,
    nvfp4's global scale) gives MLX's dequantized weights, so a kernel that
    matches it matches MLX."""
    for global_scale in ([False, True] if mode == "nvfp4" else [False]):
        p = make_projection(3, 8, 256, mx.float32, mode, bits, group_size, global_scale=global_scale,
                            gated_rows=global_scale)
        ours, mlx = dequantize(p), np.array(mlx_dequantize(p))
        # MLX's affine s*q + b rounds in fp32; the fp modes are exact.
        atol = 1e-6 * np.abs(ours).max() if mode == "affine" else 0
        np.testing.assert_allclose(ours, mlx, rtol=1e-6, atol=atol)


# ---------------------------------------------------------------------------
# On-demand builds
# ---------------------------------------------------------------------------


def test_kernels_are_built_on_demand(tmp_path):
    """A fresh emulator holds no kernel; a run builds the family of the
    kernel its launch plan names (both variants, every dtype: six kernels)
    in one library, and nothing else (cached: a second emulator of the same
    directory builds nothing)."""
    if not metal_emulator_module.compiler_available():
        pytest.skip(f"no C++ compiler ({metal_emulator_module.CXX}) for the emulator")
    emu = metal_emulator_module.Emulator(tmp_path)
    assert emu.kernel_names() == []
    p = make_projection(4, 64, 256, mx.float16, "affine", 5, 32, seed=1)
    x = mx.random.normal((1, 256)).astype(mx.float16)
    idx = mx.array([[0, 3]], dtype=mx.uint32)
    r = emu.gate_up(x, *p.arrays(), idx, *p.quant(), activation="relu2")
    assert r.kernel == "gate_up_relu2_decode_float16_b5_gs32"
    assert sorted(emu.kernel_names()) == sorted(
        f"gate_up_relu2_{v}_{t}_b5_gs32" for v in ("decode", "prefill") for t in ("float16", "bfloat16", "float32"))
    assert metal_kernels.family(r.kernel) == [k for k in _ext.metal_kernel_names() if k in emu.kernel_names()]
    libraries = sorted(tmp_path.glob("libfm_kernels-*.so"))
    assert len(libraries) == 1
    again = metal_emulator_module.Emulator(tmp_path)
    again.gate_up(x, *p.arrays(), idx, *p.quant(), activation="relu2")
    assert sorted(tmp_path.glob("libfm_kernels-*.so")) == libraries


def test_a_kernel_outside_the_allow_list_is_refused(metal_emulator):
    with pytest.raises(EmulatorError, match=r"no Metal kernel for mode affine bits=7 group_size=64"):
        metal_emulator.run("gate_up", dict(bits=7, group_size=64, tokens=1, top_k=1, hidden=256,
                                           intermediate=128, experts=2), [], (1, 1, 128), mx.float32)


# ---------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------


def emulated_route(metal_emulator, kernels):
    """A route(x, gate, bias, k) on the emulator that records each kernel."""

    def route(x, gate, bias, k):
        w, s, b, bits, gs = gate_arrays(gate)
        r = metal_emulator.route(x, w, s, b, bias, k, bits, gs)
        kernels.append(r.kernel)
        return r.out

    return route


@pytest.mark.parametrize("name", ROUTE_KERNELS)
def test_every_route_kernel(name, metal_emulator):
    """route_<x dtype>_gate_<form>: 37 experts (a partial block of rows per
    SIMD group), k=5, against stock under the rules of test_route.py."""
    _, x_dtype, _, form = name.split("_", 3)
    dtypes = {str(t).split(".")[-1]: t for t in DTYPES}
    seed = ROUTE_KERNELS.index(name)
    E, k, D = 37, 5, 256
    if form in dtypes:
        gate = make_gate(E, D, form, seed=seed)
    else:
        gate = make_gate(E, D, "q8", seed=seed, group_size=int(form.split("_gs")[1]))
    bias = mx.random.normal((E,), key=mx.random.key(seed)) * 0.05
    x = clear_inputs((3, D), gate, bias, k, seed=seed, dtype=dtypes[x_dtype])
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


# ---------------------------------------------------------------------------
# The MiniMax shapes
# ---------------------------------------------------------------------------


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
    """D=3072, H=1536, k=8 at 3 bits, group size 64, bfloat16 (the target):
    several steps of 512 inputs and two chunks of staged scales per row."""
    E, k, D, H, dtype = 12, 8, 3072, 1536, mx.bfloat16
    ex = make_experts(E, D, H, dtype, 3, 64, seed=11)
    indices, weights = random_routing(T, E, k, seed=11)
    x = mx.random.normal((T, D), key=mx.random.key(11)).astype(dtype)
    ra = metal_emulator.gate_up_swiglu(x, ex.packed, indices)
    rb = metal_emulator.down_combine_packed(ra.out, ex.packed, indices, weights)
    variant = "decode" if T == 1 else "prefill"
    assert (ra.kernel, rb.kernel) == (
        f"gate_up_swiglu_{variant}_bfloat16_b3_gs64",
        f"down_{variant}_bfloat16_b3_gs64",
    )
    h_ref, Dn, idx = per_pair_reference(ex, x, indices, weights)
    assert_within_tolerance(ra.out, stock_h(ex, x, indices), h_ref, dtype, "gate_up_swiglu")
    h64 = np.array(ra.out.astype(mx.float32), dtype=np.float64)
    w64 = np.array(weights, dtype=np.float64)
    y_ref = np.stack([sum(w64[t, j] * (Dn[idx[t, j]] @ h64[t, j]) for j in range(k)) for t in range(T)])
    assert_within_tolerance(rb.out, stock_y(ex, ra.out, indices, weights), y_ref, dtype, "down_combine")


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_fp_scale_chunks(mode, metal_emulator):
    """Rows of more fp groups than one staged chunk (kStageGroupsFp = 64):
    D = 2560 is 80 mxfp4 groups, 160 nvfp4 groups; decode, with the
    global scale where the mode has one."""
    _, bits, gs = next(q for q in QUANTS if q[0] == mode)
    E, k, D, H, dtype = 4, 2, 2560, 64, mx.float16
    gu = make_projection(E, 2 * H, D, dtype, mode, bits, gs, global_scale=mode == "nvfp4", gated_rows=True, seed=5)
    dn = make_projection(E, D, H, dtype, mode, bits, gs, global_scale=mode == "nvfp4", seed=6)
    indices = mx.array([[1, 3], [2, 0]], dtype=mx.uint32)
    x = mx.random.normal((2, D), key=mx.random.key(5)).astype(dtype)
    r = metal_emulator.gate_up(x, *gu.arrays(), indices, *gu.quant(), mode=mode, global_scale=gu.global_scale)
    assert_within_tolerance(r.out, stock_gate_up(gu, x, indices, "swiglu", {}),
                            reference_gate_up(gu, x, indices, "swiglu", {}), dtype, mode)
    h = mx.random.normal((2, k, H), key=mx.random.key(6)).astype(dtype)
    y = metal_emulator.down_slots(h, *dn.arrays(), indices, *dn.quant(), mode=mode,
                                  global_scale=dn.global_scale).out
    assert_within_tolerance(y, stock_down(dn, h, indices), reference_down(dn, h, indices), dtype, mode)


# ---------------------------------------------------------------------------
# fp codes and scales at their edges
# ---------------------------------------------------------------------------


def test_fp_nan_codes_and_scales_stay_in_their_rows(metal_emulator):
    """e4m3's NaN codes (0x7F, 0xFF) in an mxfp8 weight and an e8m0 scale of
    255 (+inf) make exactly the rows that read them non-finite, as MLX
    decodes them; every other row equals the reference."""
    E, D, H, dtype = 3, 256, 64, mx.float32
    p = make_projection(E, 2 * H, D, dtype, "mxfp8", 8, 32, seed=9)
    w = np.array(p.weight)
    w[1, 6, 0] = (w[1, 6, 0] & ~np.uint32(0xFF)) | np.uint32(0x7F)  # expert 1, gate row 3, code 0
    w[2, 9, 5] = (w[2, 9, 5] & ~np.uint32(0xFF << 8)) | np.uint32(0xFF << 8)  # expert 2, up row 4
    s = np.array(p.scales)
    s[0, 20, 1] = 255  # expert 0, gate row 10, group 1: +inf scale
    p.weight, p.scales = mx.array(w), mx.array(s)
    assert np.isnan(e4m3(np.array([0x7F, 0xFF]))).all()
    p.dense = dequantize(p)
    assert (~np.isfinite(p.dense)).sum() == 2 + 32  # two NaN codes, a group of inf weights
    x = mx.random.normal((3, D), key=mx.random.key(9))
    indices = mx.array([[0, 1], [2, 0], [1, 2]], dtype=mx.uint32)
    out = np.array(metal_emulator.gate_up(x, *p.arrays(), indices, *p.quant(), mode="mxfp8").out)
    with np.errstate(all="ignore"):
        ref = reference_gate_up(p, x, indices, "swiglu", {})
    bad = ~np.isfinite(ref)
    assert bad.sum() == 3 * 2  # each bad row meets two pairs
    assert (~np.isfinite(out) == bad).all()
    np.testing.assert_allclose(out[~bad], ref[~bad], rtol=2e-4, atol=2e-5)


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
    written. Every other row is exactly what valid ids give: with the
    combine the token's y row, per slot only that pair's."""
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

    w, s, b, bits, gs = ex.packed.projection("down")[:5]
    o_good = np.array(gpu_device.ext_down_slots(h, w, s, b, good, bits, gs).astype(mx.float32))
    o_bad = np.array(gpu_device.ext_down_slots(h, w, s, b, bad, bits, gs).astype(mx.float32))
    assert np.isnan(o_bad[1, 1]).all()
    assert np.array_equal(o_bad[mask], o_good[mask])


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
        metal_emulator.run("gate_up", problem, inputs, (T, k, H), mx.float32)


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
        metal_emulator.run("gate_up", problem, inputs, (T - 1, k, H), mx.float32)


def test_an_absent_input_is_a_buffer_of_no_bytes(metal_emulator):
    """An input the call does not have is bound as a buffer of no bytes, so
    a kernel that read it would fault and name it: the plan of a call
    without an expert bias, run with the argument struct's has_bias forced
    on, must fail on 'bias (absent)'. And a plan that binds more inputs than
    the call has is refused before it runs."""
    E, k, D, H, T = 4, 2, 256, 128, 1
    ex = make_experts(E, D, H, mx.float32, 4, 64)
    indices, _ = random_routing(T, E, k)
    inputs, bits, gs = raw_inputs(ex, mx.random.normal((T, D)), indices)
    problem = dict(bits=bits, group_size=gs, tokens=T, top_k=k, hidden=D, intermediate=H, experts=E)
    plan = metal_emulator_module.plan_of("gate_up", mx.float32, problem)
    assert [b[1:3] for b in plan["buffers"] if b[1] in ("bias", "global_scale")] == [
        ("bias", "absent"), ("global_scale", "absent")]
    out = metal_emulator.run_plan(plan, inputs, [((T, k, H), mx.float32)])[0]
    assert np.isfinite(np.array(out)).all()
    args = bytearray(plan["args"])
    struct.pack_into("<I", args, 32, 1)  # FusedMoeArgs.has_bias
    with pytest.raises(EmulatorError, match=r"past the end of buffer 'bias \(absent\)'"):
        metal_emulator.run_plan(plan, inputs, [((T, k, H), mx.float32)], args=bytes(args))
    with pytest.raises(EmulatorError, match=r"binds input 5 \('bias'\) but 5 inputs were given"):
        metal_emulator.run("gate_up", dict(problem, bias=True), inputs, (T, k, H), mx.float32)


def test_unwritten_outputs_show_as_nan(metal_emulator):
    """The output buffer starts as NaN bytes: a plan whose grid misses rows
    would leave NaN, which the tolerance rule rejects."""
    E, k, D, H, T = 4, 2, 256, 128, 3
    ex = make_experts(E, D, H, mx.float32, 4, 64)
    indices, _ = random_routing(T, E, k)
    inputs, bits, gs = raw_inputs(ex, mx.random.normal((T, D)), indices)
    # Claim fewer tokens than the output holds: the last token's rows stay unwritten.
    problem = dict(bits=bits, group_size=gs, tokens=T - 1, top_k=k, hidden=D, intermediate=H, experts=E)
    out = np.array(metal_emulator.run("gate_up", problem, inputs, (T, k, H), mx.float32).out)
    assert np.isfinite(out[: T - 1]).all()
    assert np.isnan(out[T - 1]).all()
