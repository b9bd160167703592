"""The Metal launch plan (csrc/metal/launch_plan.cpp), on every platform."""

import itertools
import re
import struct
from pathlib import Path

import pytest

import fused_moe as fm
from fused_moe import _ext

ROOT = Path(__file__).resolve().parents[1]
OPS = ["gate_up", "down"]
VARIANTS = ["decode", "prefill"]
DTYPES = ["float16", "bfloat16", "float32"]
ARGS_FIELDS = ["tokens", "top_k", "hidden", "intermediate", "experts", "row_bytes", "groups_per_row", "pairs",
               "has_bias", "has_global_scale", "x_per_slot", "combine"]
ARGS_PARAMS = ["limit", "alpha", "beta", "linear_beta"]
ROUTE_ARGS_FIELDS = ["tokens", "top_k", "hidden", "experts", "groups_per_row"]
# The router's gate forms: an unquantized dtype, or bits and group size.
ROUTE_GATES = DTYPES + [f"b{b}_gs{g}" for b in fm.SUPPORTED_ROUTER_BITS for g in fm.SUPPORTED_GROUP_SIZES]
QUANTS = [tuple(q) for q in _ext.supported_quantizations()]
ACTIVATIONS = list(_ext.SUPPORTED_ACTIVATIONS)


def quant_name(mode, bits, gs):
    return f"b{bits}_gs{gs}" if mode == "affine" else mode


def plan(op="gate_up", dtype="bfloat16", bits=3, group_size=64, T=1, k=8, D=3072, H=1536, E=154, **kw):
    return _ext.metal_launch_plan(op, dtype, bits, group_size, T, k, D, H, E, **kw)


def args_of(p):
    values = struct.unpack("<12I4f", p["args"])
    return dict(zip(ARGS_FIELDS + ARGS_PARAMS, values))


def route_plan(dtype="bfloat16", gate="float32", T=1, k=8, D=3072, E=154):
    """The router's plan; `gate` is a dtype name or "b<bits>_gs<group>"."""
    if gate in DTYPES:
        return _ext.metal_launch_plan("route", dtype, 0, 0, T, k, D, 0, E, gate_dtype=gate)
    bits, gs = (int(p[1:]) for p in gate.replace("_gs", "_g").split("_"))
    return _ext.metal_launch_plan("route", dtype, bits, gs, T, k, D, 0, E)


def test_allow_list_is_the_supported_grid():
    """Every quantization of csrc/supported.h with every activation (gate_up)
    and down, both variants, every dtype; the router's forms."""
    expected = {
        f"gate_up_{a}_{v}_{t}_{quant_name(*q)}"
        for a, v, t, q in itertools.product(ACTIVATIONS, VARIANTS, DTYPES, QUANTS)
    }
    expected |= {f"down_{v}_{t}_{quant_name(*q)}" for v, t, q in itertools.product(VARIANTS, DTYPES, QUANTS)}
    # The router: every x dtype with every gate form route() accepts.
    expected |= {f"route_{t}_gate_{g}" for t, g in itertools.product(DTYPES, ROUTE_GATES)}
    names = _ext.metal_kernel_names()
    assert len(names) == len(set(names)) == len(expected) == 1152
    assert set(names) == expected


def test_metal_covers_every_setting():
    """metal_has_expert_kernel: every quantization with every setting; a GPU
    stream refuses nothing of the grid."""
    for (mode, bits, gs), op in itertools.product(QUANTS, OPS):
        for activation, bias, x_per_slot, combine in itertools.product(ACTIVATIONS, [False, True], [False, True],
                                                                         [False, True]):
            assert _ext.metal_has_expert_kernel(op, mode, bits, gs, activation=activation, bias=bias,
                                                global_scale=mode == "nvfp4", x_per_slot=x_per_slot,
                                                combine=combine)
    assert not _ext.metal_has_expert_kernel("gate_up", "affine", 7, 64)
    assert not _ext.metal_has_expert_kernel("down", "mxfp4", 8, 32)


@pytest.mark.parametrize("op", OPS)
def test_every_grid_point_and_variant_gets_its_kernel(op):
    for t, q in itertools.product(DTYPES, QUANTS):
        mode, bits, gs = q
        for activation in ACTIVATIONS if op == "gate_up" else ["swiglu"]:
            for T, variant in [(1, "decode"), (8, "prefill")]:
                p = plan(op, t, bits, gs, T=T, k=8, D=256, H=128, E=6, mode=mode, activation=activation)
                assert p["variant"] == variant
                head = f"gate_up_{activation}" if op == "gate_up" else "down"
                assert p["kernel"] == f"{head}_{variant}_{t}_{quant_name(*q)}"


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no Metal kernel for mode affine bits=7 group_size=64 .*supported: "
                                         r"affine b2 gs32, .*nvfp4 b4 gs16"):
        plan(dtype="float16", bits=7)
    with pytest.raises(ValueError, match=r"no Metal kernel for mode mxfp4 bits=4 group_size=16"):
        plan("down", "float32", 4, 16, T=100, mode="mxfp4")
    with pytest.raises(ValueError, match=r"activation='silu' is not supported; supported activations: \{swiglu, "):
        plan(activation="silu")
    with pytest.raises(ValueError, match=r"global_scale is only for mode nvfp4, not mxfp4"):
        plan(bits=4, group_size=32, mode="mxfp4", global_scale=True)


def test_variant_threshold():
    assert plan(T=7, k=8)["variant"] == "decode"  # 56 pairs
    assert plan(T=8, k=8)["variant"] == "prefill"  # 64 pairs
    assert plan(T=63, k=1)["variant"] == "decode"
    assert plan(T=64, k=1)["variant"] == "prefill"


@pytest.mark.parametrize("activation", ["swiglu", "relu2"], ids=["gated", "not_gated"])
@pytest.mark.parametrize("T,k", [(1, 8), (3, 5), (8, 8), (300, 8), (17, 16)])
def test_grids_cover_every_output_once(T, k, activation):
    D, H = 3072, 1536
    a = plan("gate_up", T=T, k=k, D=D, H=H, activation=activation)
    rows = a["rows_per_simdgroup"] * a["simdgroups"]
    # Eight packed rows in flight per SIMD group at decode (four at
    # prefill): gate and up rows in pairs, or fc1 rows one each.
    per_row = 2 if activation == "swiglu" else 1
    assert a["rows_per_simdgroup"] * per_row == (8 if a["variant"] == "decode" else 4)
    assert a["threads_per_threadgroup"] == [32 * a["simdgroups"], 1, 1]
    if a["variant"] == "decode":
        assert a["threadgroups"] == [H // rows, T * k, 1]
    else:
        per = a["pairs_per_threadgroup"]
        assert a["threadgroups"] == [H // rows, -(-T * k // per), 1]
    for combine in (True, False):
        b = plan("down", T=T, k=k, D=D, H=H, combine=combine)
        rows = b["rows_per_simdgroup"] * b["simdgroups"]
        per = b["tokens_per_threadgroup"]
        assert b["threadgroups"] == [D // rows, -(-T // per), 1]


def test_no_tokens_means_no_threadgroups():
    assert plan(T=0)["threadgroups"] == [0, 0, 0]
    assert plan("down", T=0)["threadgroups"] == [0, 0, 0]


@pytest.mark.parametrize("op,T", [("gate_up", 1), ("gate_up", 100), ("down", 1), ("down", 100)])
@pytest.mark.parametrize("mode,bits,gs", [("affine", 3, 64), ("nvfp4", 4, 16)])
@pytest.mark.parametrize("bias,global_scale,combine", [(False, False, True), (True, True, False)])
def test_bindings_and_args(op, T, mode, bits, gs, bias, global_scale, combine):
    """Every slot bound, in the kernels' order; the Primitive's inputs in its
    input order (expert_slots), absent ones marked; the argument struct."""
    global_scale = global_scale and mode == "nvfp4"
    p = plan(op, bits=bits, group_size=gs, T=T, k=8, D=3072, H=1536, E=154, mode=mode, bias=bias,
             global_scale=global_scale, combine=combine, activation="swiglu_oai", limit=7.0, alpha=1.702)
    slots = [b[0] for b in p["buffers"]]
    assert slots == list(range(len(slots)))
    proj = "gate_up" if op == "gate_up" else "down"
    present = {f"{proj}_biases": mode == "affine", "weights": combine, "bias": bias, "global_scale": global_scale}
    first = ["x" if op == "gate_up" else "h", f"{proj}_weight", f"{proj}_scales", f"{proj}_biases", "indices"]
    if op == "down":
        first.append("weights")
    first += ["bias", "global_scale"]
    if p["variant"] == "prefill":
        first.append("order")
    names = [b[1] for b in p["buffers"]]
    assert names == first + ["h" if op == "gate_up" else "y", "args"]
    sources = [b[2] for b in p["buffers"][: len(first)]]
    assert sources == ["input" if present.get(n, True) else "absent" for n in first]
    # The inputs present are bound in the Primitive's input order.
    assert [b[3] for b in p["buffers"] if b[2] == "input"] == list(range(sources.count("input")))
    inputs = 3072 if op == "gate_up" else 1536
    expected = dict(
        tokens=T, top_k=8, hidden=3072, intermediate=1536, experts=154,
        row_bytes=inputs * bits // 8, groups_per_row=inputs // gs, pairs=T * 8,
        has_bias=int(bias), has_global_scale=int(global_scale), x_per_slot=0,
        combine=int(op == "down" and combine),
    )
    args = args_of(p)
    assert {f: args[f] for f in ARGS_FIELDS} == expected
    if op == "gate_up":
        assert args["limit"] == 7.0 and args["alpha"] == pytest.approx(1.702) and args["beta"] == 0.0


@pytest.mark.parametrize("mode,bits,gs", [("affine", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
@pytest.mark.parametrize("bias,global_scale,x_per_slot,combine,T", [
    (False, False, False, True, 2), (True, True, True, False, 2), (True, False, False, False, 40),
    (False, True, True, True, 40)])
def test_plan_binds_exactly_the_metal_inputs(mode, bits, gs, bias, global_scale, x_per_slot, combine, T):
    """The plan's input bindings are the inputs the op function hands a GPU
    stream (_ext.*_metal_inputs), one for one and with their shapes: the
    plan and expert_slots (ops/common.h) agree on every setting."""
    import mlx.core as mx

    global_scale = global_scale and mode == "nvfp4"
    E, k, D, H = 4, 2, 256, 128
    sdt = mx.float32 if mode == "affine" else mx.uint8
    x = mx.zeros((T, k, D) if x_per_slot else (T, D))
    indices = mx.zeros((T, k), dtype=mx.uint32)
    w = mx.zeros((E, 2 * H, D * bits // 32), dtype=mx.uint32)
    s = mx.zeros((E, 2 * H, D // gs), dtype=sdt)
    b = mx.zeros_like(s) if mode == "affine" else None
    gu = _ext.gate_up_metal_inputs(x, w, s, b, indices, bits, gs, mode=mode, bias=mx.zeros((E, 2 * H)) if bias else None,
                                   global_scale=mx.ones((E, 2)) if global_scale else None, stream=mx.cpu)
    p = plan("gate_up", "float32", bits, gs, T=T, k=k, D=D, H=H, E=E, mode=mode, bias=bias,
             global_scale=global_scale, x_per_slot=x_per_slot)
    bound = {bd[3]: bd[1] for bd in p["buffers"] if bd[2] == "input"}
    assert sorted(bound) == list(range(len(gu)))
    assert gu[[i for i, n in bound.items() if n == "x"][0]].shape == ((T * k, D) if x_per_slot else (T, D))
    if bias:
        assert gu[[i for i, n in bound.items() if n == "bias"][0]].dtype == mx.float32

    wd = mx.zeros((E, D, H * bits // 32), dtype=mx.uint32)
    sd = mx.zeros((E, D, H // gs), dtype=sdt)
    bd_ = mx.zeros_like(sd) if mode == "affine" else None
    dn = _ext.down_metal_inputs(mx.zeros((T, k, H)), wd, sd, bd_, indices, mx.ones((T, k)) if combine else None,
                                bits, gs, mode=mode, bias=mx.zeros((E, D), dtype=mx.float16) if bias else None,
                                global_scale=mx.ones((E,)) if global_scale else None, stream=mx.cpu)
    p = plan("down", "float32", bits, gs, T=T, k=k, D=D, H=H, E=E, mode=mode, bias=bias,
             global_scale=global_scale, combine=combine)
    bound = {bd[3]: bd[1] for bd in p["buffers"] if bd[2] == "input"}
    assert sorted(bound) == list(range(len(dn)))
    for i, name in bound.items():
        if name in ("weights", "bias", "global_scale"):
            assert dn[i].dtype == mx.float32, name


def test_plan_errors_name_the_field():
    with pytest.raises(ValueError, match=r"gate_up \(Metal launch plan\): D=100 must be a multiple of 16 and of group_size=64"):
        plan(D=100)
    with pytest.raises(ValueError, match=r"H=36 is not a multiple of the 8 rows per threadgroup of gate_up_swiglu_decode_bfloat16_b3_gs64"):
        plan(H=36, D=256)
    with pytest.raises(ValueError, match=r"H=40 is not a multiple of the 16 rows per threadgroup of gate_up_relu2_decode_bfloat16_b3_gs64"):
        plan(H=40, D=256, activation="relu2")
    with pytest.raises(ValueError, match=r"experts \(E\)=0 must be >= 1"):
        plan(E=0)
    with pytest.raises(ValueError, match="op must be one of gate_up, down, route, got 'up'"):
        _ext.metal_launch_plan("up", "float32", 3, 64, 1, 8, 256, 128, 4)
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, got 'int8'"):
        _ext.metal_launch_plan("down", "int8", 3, 64, 1, 8, 256, 128, 4)


KERNEL_DECL = re.compile(r"\[\[kernel\]\]\s+void\s+(\w+)\((.*?)\)\s*\{", re.S)
POSITIONS = [
    "threadgroup_position_in_grid",
    "thread_index_in_threadgroup",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup",
]


def kernel_declarations():
    decls = {}
    for path in sorted((ROOT / "metal").glob("*.h")):
        for name, params in KERNEL_DECL.findall(path.read_text()):
            decls[name] = params
    return decls


def test_kernel_parameters_follow_the_plan_slots():
    """Buffers in slot order, then the four position attributes: the
    convention the emulator binds by (metal/README.md). Every slot is
    declared whatever the settings (absent inputs are bound all the same)."""
    decls = kernel_declarations()
    route_kernels = {"route_float_gate": "float32", "route_quantized_gate": "b8_gs64"}
    assert set(decls) == {f"{op}_{v}" for op in OPS for v in VARIANTS} | set(route_kernels)
    for name, params in decls.items():
        slots = [int(s) for s in re.findall(r"\[\[buffer\((\d+)\)\]\]", params)]
        if name in route_kernels:
            assert slots == [b[0] for b in route_plan(gate=route_kernels[name])["buffers"]], name
        else:
            op, variant = name.rsplit("_", 1)
            p = plan(op, T=1 if variant == "decode" else 100)
            assert p["variant"] == variant
            assert slots == [b[0] for b in p["buffers"]], name
            # The parameter names follow the plan's buffer names.
            declared = re.findall(r"(\w+) \[\[buffer", params)
            rename = {"router_weights": "weights", "weight": f"{op}_weight", "scales": f"{op}_scales",
                      "biases": f"{op}_biases"}
            assert [rename.get(d, d) for d in declared] == [b[1] for b in p["buffers"]], name
        assert re.findall(r"\[\[(\w+)\]\]", params)[-4:] == POSITIONS, name


# ---------------------------------------------------------------- router


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_every_gate_form_gets_its_kernel(dtype):
    for gate in ROUTE_GATES:
        p = route_plan(dtype, gate, D=256, E=8)
        assert p["kernel"] == f"route_{dtype}_gate_{gate}"
        assert p["variant"] is None


@pytest.mark.parametrize("T", [0, 1, 5, 300])
def test_route_grid_is_one_threadgroup_per_token(T):
    p = route_plan(T=T)
    assert p["threads_per_threadgroup"] == [32 * p["simdgroups"], 1, 1]
    assert p["threadgroups"] == ([T, 1, 1] if T else [0, 0, 0])
    assert p["tokens_per_threadgroup"] == 1


@pytest.mark.parametrize("gate", ["bfloat16", "b8_gs64"])
def test_route_bindings_and_args(gate):
    p = route_plan("float16", gate, T=3, k=8, D=3072, E=154)
    assert [b[0] for b in p["buffers"]] == list(range(len(p["buffers"])))
    names = [b[1] for b in p["buffers"]]
    quantized = gate != "bfloat16"
    inputs = ["x", "gate_weight", "bias"] + (["gate_scales", "gate_biases"] if quantized else [])
    assert names == inputs + ["indices", "weights", "args"]
    # Inputs in the Route Primitive's input order, then its two outputs.
    assert [(b[2], b[3]) for b in p["buffers"]] == (
        [("input", i) for i in range(len(inputs))] + [("output", 0), ("output", 1), ("args", -1)]
    )
    args = dict(zip(ROUTE_ARGS_FIELDS, struct.unpack("<5I", p["args"])))
    assert args == dict(tokens=3, top_k=8, hidden=3072, experts=154, groups_per_row=3072 // 64 if quantized else 0)


def test_route_plan_errors_name_the_field():
    with pytest.raises(ValueError, match=r"route \(Metal launch plan\): E=1025 experts exceed the 1024 the Metal router kernel holds \(kRouteMaxExperts"):
        route_plan(E=1025)
    route_plan(E=1024, D=64)
    with pytest.raises(ValueError, match=r"route \(Metal launch plan\): top_k=9 is more than E=8"):
        route_plan(k=9, E=8)
    with pytest.raises(ValueError, match=r"D=100 must be a multiple of group_size=64"):
        route_plan(gate="b8_gs64", D=100)
    with pytest.raises(ValueError, match=r"Metal kernel 'route_float32_gate_b4_gs64' is not instantiated.*route_float32_gate_b8_gs64"):
        route_plan("float32", "b4_gs64")
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, got 'int8'"):
        _ext.metal_launch_plan("route", "float32", 0, 0, 1, 8, 256, 0, 8, gate_dtype="int8")
