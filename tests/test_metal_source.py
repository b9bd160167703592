"""The Metal source embedded in the extension and compiled at run time
(issue 13): what `_ext.metal_source()` holds, the per-kernel sources a GPU
stream compiles on first use, and their library names."""

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import fused_moe as fm
from fused_moe import _ext
from support.moe_reference import make_experts, random_routing, reference_h, stock_h
from support.tolerance import assert_within_tolerance
from tools import metal_kernels

ROOT = Path(__file__).resolve().parents[1]
INSTANTIATION = re.compile(r"^FM_INSTANTIATE_(GATE_UP|DOWN|ROUTE)\(", re.M)


def test_metal_source_is_the_whole_translation_unit():
    src = _ext.metal_source()
    assert src.isascii()
    # Every header is inlined; only the compiler's own headers stay.
    assert not re.search(r'^\s*#\s*include\s+"', src, re.M)
    assert re.search(r"^#include <metal_stdlib>$", src, re.M)
    assert "#pragma once" not in src
    # The kernel bodies of every header are there.
    for template in ("gate_up_decode", "gate_up_prefill", "down_decode", "down_prefill",
                     "route_float_gate", "route_quantized_gate"):
        assert re.search(rf"\]\] void {template}\(", src), template
    # The block instantiates the allow-list through its three expansions.
    assert INSTANTIATION.findall(src) == []
    assert "FM_FOR_EACH_GATE_UP_KERNEL(FM_INSTANTIATE_GATE_UP)" in src
    assert "FM_FOR_EACH_DOWN_KERNEL(FM_INSTANTIATE_DOWN)" in src
    assert "FM_FOR_EACH_ROUTE_KERNEL(FM_INSTANTIATE_ROUTE)" in src


def test_metal_source_is_what_the_files_embed(tmp_path):
    """The string is the files of metal/ as the build script reads them, so
    the emulator and the checks test what the Mac compiles."""
    out = tmp_path / "source.inc"
    subprocess.run([sys.executable, str(ROOT / "csrc" / "metal" / "embed_source.py"),
                    str(ROOT / "metal" / "fused_moe.metal"), str(out)], check=True)
    pieces = re.findall(r'R"fm_msl\((.*?)\)fm_msl"', out.read_text(), re.S)
    assert "".join(pieces) == _ext.metal_source()


def test_embedding_refuses_non_ascii(tmp_path):
    (tmp_path / "k.h").write_text("// \u00b7 a middle dot\n", encoding="utf-8")
    (tmp_path / "k.metal").write_text('#include "k.h"\n// fused_moe:instantiations-begin\n'
                                      "// fused_moe:instantiations-end\n")
    proc = subprocess.run([sys.executable, str(ROOT / "csrc" / "metal" / "embed_source.py"),
                           str(tmp_path / "k.metal"), str(tmp_path / "out.inc")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "k.h:1: non-ASCII byte 0xc2" in proc.stderr


def test_each_kernel_source_instantiates_only_its_kernel():
    """Every kernel's source is the head and tail of the whole source around
    one instantiation line, which names that kernel's own pieces."""
    whole = _ext.metal_source()
    begin = whole.index("// fused_moe:instantiations-begin\n") + len("// fused_moe:instantiations-begin\n")
    end = whole.index("// fused_moe:instantiations-end")
    for name in _ext.metal_kernel_names():
        src = _ext.metal_kernel_source(name)
        assert src[:begin] == whole[:begin] and src.endswith(whole[end:]), name
        block = src[begin : len(src) - len(whole) + end]
        assert len(INSTANTIATION.findall(block)) == 1 and block.count("\n") == 1, name
        k = metal_kernels.parse(name)
        args = [a.strip() for a in block[block.index("(") + 1 : block.rindex(")")].split(",")]
        if k.op == "gate_up":
            assert (args[0], args[3], args[4], args[6]) == (k.activation, k.variant, k.dtype, k.quant), name
            assert (int(args[8]), int(args[9])) == (k.bits, k.group_size), name
        elif k.op == "down":
            assert (args[0], args[1], args[3]) == (k.variant, k.dtype, k.quant), name
            assert (int(args[5]), int(args[6])) == (k.bits, k.group_size), name


def test_kernel_source_names_the_supported_set():
    with pytest.raises(ValueError, match=r"'gate_up_swiglu_decode_float64_b3_gs64' is not in the "
                                         r"allow-list .*1152 kernels\)$"):
        _ext.metal_kernel_source("gate_up_swiglu_decode_float64_b3_gs64")
    with pytest.raises(ValueError, match=r"'gate_up_swiglu_decode_float16_b7_gs64' is not in the allow-list "
                                         r".*; supported gate_up_swiglu_decode_float16_\*: "
                                         r"gate_up_swiglu_decode_float16_b2_gs32, .*_nvfp4$"):
        _ext.metal_kernel_source("gate_up_swiglu_decode_float16_b7_gs64")


def test_library_names_carry_the_version_and_kernel():
    names = {_ext.metal_library_name(k) for k in _ext.metal_kernel_names()}
    assert len(names) == len(_ext.metal_kernel_names())
    assert _ext.metal_library_name("route_float16_gate_b8_gs64") == \
        f"fused_moe_{fm.__version__}_route_float16_gate_b8_gs64"


def test_build_files_have_no_metallib_step():
    for f in ("CMakeLists.txt", "pyproject.toml"):
        text = (ROOT / f).read_text()
        assert "mlx_build_metallib" not in text and ".metallib" not in text, f


@pytest.mark.parametrize("name", ["gate_up_swiglu_decode_bfloat16_b3_gs64"])
def test_a_kernel_compiled_alone_runs_in_the_emulator(name, tmp_path):
    """One kernel's own source, as a GPU stream compiles it on first use,
    built into an emulator that then holds that kernel alone and computes
    the op within tolerance."""
    from tools import metal_emulator

    if not metal_emulator.compiler_available():
        pytest.skip(f"no C++ compiler ({metal_emulator.CXX}) for the emulator")
    emu = metal_emulator.Emulator(tmp_path, source=_ext.metal_kernel_source(name))
    assert emu.kernel_names() == [name]
    E, k, D, H, T = 5, 3, 256, 128, 2
    ex = make_experts(E, D, H, mx.bfloat16, 3, 64, 4, 64, seed=3)
    indices, _ = random_routing(T, E, k, seed=3, distinct=False)
    x = mx.random.normal((T, D), key=mx.random.key(3)).astype(mx.bfloat16)
    r = emu.gate_up_swiglu(x, ex.packed, indices)
    assert r.kernel == name
    assert_within_tolerance(r.out, stock_h(ex, x, indices), reference_h(ex, x, indices), mx.bfloat16, name)
