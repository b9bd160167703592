"""The Metal launch plan (csrc/metal/launch_plan.cpp), on every platform."""

import itertools
import re
import struct
from pathlib import Path

import pytest

import fused_moe as fm
from fused_moe import _ext

ROOT = Path(__file__).resolve().parents[1]
OPS = ["gate_up_swiglu", "down_combine"]
VARIANTS = ["decode", "prefill"]
DTYPES = ["float16", "bfloat16", "float32"]
ARGS_FIELDS = ["tokens", "top_k", "hidden", "intermediate", "experts", "row_bytes", "groups_per_row", "pairs"]
ROUTE_ARGS_FIELDS = ["tokens", "top_k", "hidden", "experts", "groups_per_row"]
# The router's gate forms: an unquantized dtype, or bits and group size.
ROUTE_GATES = DTYPES + [f"b{b}_gs{g}" for b in fm.SUPPORTED_ROUTER_BITS for g in fm.SUPPORTED_GROUP_SIZES]


# The affine bits the Metal kernels cover for now (csrc/ops/common.cpp,
# metal_has_kernel); a GPU stream raises for the rest of fm.SUPPORTED_BITS.
METAL_BITS = [b for b in fm.SUPPORTED_BITS if _ext.metal_has_expert_kernel("gate_up", "affine", b, 64)]


def plan(op="gate_up_swiglu", dtype="bfloat16", bits=3, group_size=64, T=1, k=8, D=3072, H=1536, E=154):
    return _ext.metal_launch_plan(op, dtype, bits, group_size, T, k, D, H, E)


def route_plan(dtype="bfloat16", gate="float32", T=1, k=8, D=3072, E=154):
    """The router's plan; `gate` is a dtype name or "b<bits>_gs<group>"."""
    if gate in DTYPES:
        return _ext.metal_launch_plan("route", dtype, 0, 0, T, k, D, 0, E, gate_dtype=gate)
    bits, gs = (int(p[1:]) for p in gate.replace("_gs", "_g").split("_"))
    return _ext.metal_launch_plan("route", dtype, bits, gs, T, k, D, 0, E)


def test_allow_list_is_the_supported_grid():
    expected = {
        f"{op}_{v}_{t}_b{b}_gs{g}"
        for op, v, t, b, g in itertools.product(OPS, VARIANTS, DTYPES, METAL_BITS, fm.SUPPORTED_GROUP_SIZES)
    }
    # The router: every x dtype with every gate form route() accepts.
    expected |= {f"route_{t}_gate_{g}" for t, g in itertools.product(DTYPES, ROUTE_GATES)}
    names = _ext.metal_kernel_names()
    assert len(names) == len(set(names))
    assert set(names) == expected


@pytest.mark.parametrize("op", OPS)
def test_every_grid_point_and_variant_gets_its_kernel(op):
    for t, b, g in itertools.product(DTYPES, METAL_BITS, fm.SUPPORTED_GROUP_SIZES):
        for T, variant in [(1, "decode"), (8, "prefill")]:
            p = plan(op, t, b, g, T=T, k=8, D=256, H=128, E=6)
            assert p["variant"] == variant
            assert p["kernel"] == f"{op}_{variant}_{t}_b{b}_gs{g}"


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Metal kernel 'gate_up_swiglu_decode_float16_b2_gs64' is not instantiated"):
        plan(dtype="float16", bits=2)
    with pytest.raises(ValueError, match=r"'down_combine_prefill_float32_b3_gs16' is not instantiated.*down_combine_prefill_float32_b3_gs32"):
        plan("down_combine", "float32", 3, 16, T=100)


def test_variant_threshold():
    assert plan(T=7, k=8)["variant"] == "decode"  # 56 pairs
    assert plan(T=8, k=8)["variant"] == "prefill"  # 64 pairs
    assert plan(T=63, k=1)["variant"] == "decode"
    assert plan(T=64, k=1)["variant"] == "prefill"


@pytest.mark.parametrize("T,k", [(1, 8), (3, 5), (8, 8), (300, 8), (17, 16)])
def test_grids_cover_every_output_once(T, k):
    D, H = 3072, 1536
    a = plan("gate_up_swiglu", T=T, k=k, D=D, H=H)
    rows = a["rows_per_simdgroup"] * a["simdgroups"]
    assert a["threads_per_threadgroup"] == [32 * a["simdgroups"], 1, 1]
    if a["variant"] == "decode":
        assert a["threadgroups"] == [H // rows, T * k, 1]
    else:
        per = a["pairs_per_threadgroup"]
        assert a["threadgroups"] == [H // rows, -(-T * k // per), 1]
    b = plan("down_combine", T=T, k=k, D=D, H=H)
    rows = b["rows_per_simdgroup"] * b["simdgroups"]
    per = b["tokens_per_threadgroup"]
    assert b["threadgroups"] == [D // rows, -(-T // per), 1]


def test_no_tokens_means_no_threadgroups():
    assert plan(T=0)["threadgroups"] == [0, 0, 0]
    assert plan("down_combine", T=0)["threadgroups"] == [0, 0, 0]


@pytest.mark.parametrize("op,T", [("gate_up_swiglu", 1), ("gate_up_swiglu", 100), ("down_combine", 1), ("down_combine", 100)])
def test_bindings_and_args(op, T):
    p = plan(op, bits=3, group_size=64, T=T, k=8, D=3072, H=1536, E=154)
    slots = [b[0] for b in p["buffers"]]
    assert slots == list(range(len(slots)))
    names = [b[1] for b in p["buffers"]]
    proj = "gate_up" if op == "gate_up_swiglu" else "down"
    first = ["x" if op == "gate_up_swiglu" else "h", f"{proj}_weight", f"{proj}_scales", f"{proj}_biases", "indices"]
    if op == "down_combine":
        first.append("weights")
    if p["variant"] == "prefill":
        first.append("order")
    assert names == first + ["h" if op == "gate_up_swiglu" else "y", "args"]
    # Inputs are bound in the Primitive's input order.
    assert [b[3] for b in p["buffers"] if b[2] == "input"] == list(range(len(first)))
    args = dict(zip(ARGS_FIELDS, struct.unpack("<8I", p["args"])))
    inputs = 3072 if op == "gate_up_swiglu" else 1536
    assert args == dict(
        tokens=T, top_k=8, hidden=3072, intermediate=1536, experts=154,
        row_bytes=inputs * 3 // 8, groups_per_row=inputs // 64, pairs=T * 8,
    )


def test_plan_errors_name_the_field():
    with pytest.raises(ValueError, match=r"gate_up_swiglu \(Metal launch plan\): D=100 must be a multiple of 16 and of group_size=64"):
        plan(D=100)
    with pytest.raises(ValueError, match=r"H=36 is not a multiple of the 8 rows per threadgroup of gate_up_swiglu_decode_bfloat16_b3_gs64"):
        plan(H=36, D=256)
    with pytest.raises(ValueError, match=r"experts \(E\)=0 must be >= 1"):
        plan(E=0)
    with pytest.raises(ValueError, match="op must be one of gate_up_swiglu, down_combine, route, got 'up'"):
        _ext.metal_launch_plan("up", "float32", 3, 64, 1, 8, 256, 128, 4)
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, got 'int8'"):
        _ext.metal_launch_plan("down_combine", "int8", 3, 64, 1, 8, 256, 128, 4)


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
    convention the emulator binds by (metal/README.md)."""
    decls = kernel_declarations()
    route_kernels = {"route_float_gate": "float32", "route_quantized_gate": "b8_gs64"}
    assert set(decls) == {f"{op}_{v}" for op in OPS for v in VARIANTS} | set(route_kernels)
    for name, params in decls.items():
        if name in route_kernels:
            slots = [int(s) for s in re.findall(r"\[\[buffer\((\d+)\)\]\]", params)]
            assert slots == [b[0] for b in route_plan(gate=route_kernels[name])["buffers"]], name
            assert re.findall(r"\[\[(\w+)\]\]", params)[-4:] == POSITIONS, name
            continue
        op, variant = name.rsplit("_", 1)
        slots = [int(s) for s in re.findall(r"\[\[buffer\((\d+)\)\]\]", params)]
        p = plan(op, T=1 if variant == "decode" else 100)
        assert p["variant"] == variant
        assert slots == [b[0] for b in p["buffers"]], name
        attrs = re.findall(r"\[\[(\w+)\]\]", params)
        assert attrs[-4:] == POSITIONS, name


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
