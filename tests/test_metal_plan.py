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


def plan(op="gate_up_swiglu", dtype="bfloat16", bits=3, group_size=64, T=1, k=8, D=3072, H=1536, E=154):
    return _ext.metal_launch_plan(op, dtype, bits, group_size, T, k, D, H, E)


def test_allow_list_is_the_supported_grid():
    expected = {
        f"{op}_{v}_{t}_b{b}_gs{g}"
        for op, v, t, b, g in itertools.product(OPS, VARIANTS, DTYPES, fm.SUPPORTED_BITS, fm.SUPPORTED_GROUP_SIZES)
    }
    names = _ext.metal_kernel_names()
    assert len(names) == len(set(names))
    assert set(names) == expected


@pytest.mark.parametrize("op", OPS)
def test_every_grid_point_and_variant_gets_its_kernel(op):
    for t, b, g in itertools.product(DTYPES, fm.SUPPORTED_BITS, fm.SUPPORTED_GROUP_SIZES):
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
    with pytest.raises(ValueError, match="op must be one of gate_up_swiglu, down_combine, got 'up'"):
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
    assert set(decls) == {f"{op}_{v}" for op in OPS for v in VARIANTS}
    for name, params in decls.items():
        op, variant = name.rsplit("_", 1)
        slots = [int(s) for s in re.findall(r"\[\[buffer\((\d+)\)\]\]", params)]
        p = plan(op, T=1 if variant == "decode" else 100)
        assert p["variant"] == variant
        assert slots == [b[0] for b in p["buffers"]], name
        attrs = re.findall(r"\[\[(\w+)\]\]", params)
        assert attrs[-4:] == POSITIONS, name
