"""pack_experts / unpack_experts and the PackedExperts layout."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

import fused_moe as fm
from fused_moe.packed import spec
from support.moe_reference import make_experts


def quantized_switch_glu(D=256, H=128, E=6, bits=3, group_size=64, dtype=mx.bfloat16):
    m = SwitchGLU(D, H, E)
    m.set_dtype(dtype)
    nn.quantize(m, group_size=group_size, bits=bits, class_predicate=lambda _, mod: hasattr(mod, "to_quantized"))
    return m


def assert_bit_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(np.array(a.view(mx.uint8) if a.dtype != mx.uint32 else a),
                          np.array(b.view(mx.uint8) if b.dtype != mx.uint32 else b))


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 32), (3, 128)])
def test_round_trip_from_switch_glu(bits, group_size):
    m = quantized_switch_glu(bits=bits, group_size=group_size)
    packed = fm.pack_experts(m)
    gate, up, down = fm.unpack_experts(packed)
    for got, layer in ((gate, m.gate_proj), (up, m.up_proj), (down, m.down_proj)):
        for name in ("weight", "scales", "biases"):
            assert_bit_identical(getattr(got, name), layer[name])
        assert (got.bits, got.group_size) == (layer.bits, layer.group_size)


def test_round_trip_from_tuples_with_mixed_precision():
    ex = make_experts(4, 256, 128, mx.float16, bits=4, group_size=32, down_bits=3, down_group_size=128)
    projections = [
        (l.weight, l.scales, l.biases, l.bits, l.group_size) for l in (ex.gate, ex.up, ex.down)
    ]
    packed = fm.pack_experts(*projections)
    assert (packed.gate_up_bits, packed.gate_up_group_size) == (4, 32)
    assert (packed.down_bits, packed.down_group_size) == (3, 128)
    for got, want in zip(fm.unpack_experts(packed), projections):
        for a, b in zip(got[:3], want[:3]):
            assert_bit_identical(a, b)
        assert got[3:5] == want[3:5] and got.mode == "affine" and got.bias is None


def test_gate_row_beside_up_row():
    ex = make_experts(3, 256, 128, mx.bfloat16)
    gu = ex.packed.gate_up
    for name in ("weight", "scales", "biases"):
        assert mx.array_equal(gu[name][:, 0::2], ex.gate[name]).item()
        assert mx.array_equal(gu[name][:, 1::2], ex.up[name]).item()
        assert mx.array_equal(ex.packed.down[name], ex.down[name]).item()


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 64), (3, 128)])
def test_slice_along_h_equals_pack_of_sliced(bits, group_size):
    """A contiguous H slice at group boundaries is the packing of the sliced stock arrays."""
    H = 4 * group_size
    ex = make_experts(3, 256, H, mx.bfloat16, bits, group_size)
    a, b = group_size, 3 * group_size  # rows [a, b) of H
    words = group_size * bits // 32  # uint32 words per group of down's rows
    groups = lambda h: h // group_size

    sliced_stock = fm.pack_experts(
        *(
            (l.weight[:, a:b], l.scales[:, a:b], l.biases[:, a:b], l.bits, l.group_size)
            for l in (ex.gate, ex.up)
        ),
        (
            ex.down.weight[..., a // group_size * words : b // group_size * words],
            ex.down.scales[..., groups(a) : groups(b)],
            ex.down.biases[..., groups(a) : groups(b)],
            bits,
            group_size,
        ),
    )
    p = ex.packed
    for name in ("weight", "scales", "biases"):
        assert mx.array_equal(p.gate_up[name][:, 2 * a : 2 * b], sliced_stock.gate_up[name]).item()
    w = p.down["weight"][..., a // group_size * words : b // group_size * words]
    assert mx.array_equal(w, sliced_stock.down["weight"]).item()
    assert mx.array_equal(p.down["scales"][..., groups(a) : groups(b)], sliced_stock.down["scales"]).item()


def test_parameter_tree_names_match_format():
    ex = make_experts(2, 256, 128, mx.bfloat16)
    names = {k for k, _ in nn.utils.tree_flatten(ex.packed.parameters())}
    assert sorted(f"blk.{n}" for n in names) == sorted(spec.tensor_names("blk", ex.packed.specs()))
    assert ex.packed.format_version == spec.FORMAT_VERSION == fm.FORMAT_VERSION
    # Frozen, like QuantizedSwitchLinear: nothing trainable.
    assert nn.utils.tree_flatten(ex.packed.trainable_parameters()) == []


def test_properties():
    ex = make_experts(5, 256, 128, mx.float16, bits=4, group_size=32)
    p = ex.packed
    assert (p.num_experts, p.hidden_dims, p.intermediate_dims, p.dtype) == (5, 256, 128, mx.float16)


def test_pack_rejects_mismatched_gate_and_up():
    a = make_experts(2, 256, 128, mx.bfloat16, bits=3)
    b = make_experts(2, 256, 128, mx.bfloat16, bits=4)
    with pytest.raises(ValueError, match="gate .*3-bit.* and up .*4-bit"):
        fm.pack_experts(a.gate, b.up, a.down)


def test_pack_rejects_unsupported_grid():
    ex = make_experts(2, 256, 128, mx.bfloat16)
    # 7 bits: MLX has no such width (256 inputs are 56 words of 7-bit codes).
    w, s = mx.zeros((2, 128, 56), dtype=mx.uint32), mx.zeros((2, 128, 4), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match=r"bits=7 is not supported; supported bits: \(2, 3, 4, 5, 6, 8\)"):
        fm.pack_experts((w, s, s, 7, 64), (w, s, s, 7, 64), ex.down)
    w, s = mx.zeros((2, 128, 32), dtype=mx.uint32), mx.zeros((2, 128, 16))
    b = s
    with pytest.raises(ValueError, match=r"group_size=16 is not supported"):
        fm.pack_experts((w, s, b, 4, 16), (w, s, b, 4, 16), ex.down)


def test_pack_rejects_wrong_down_shape():
    ex = make_experts(2, 256, 128, mx.bfloat16)
    other = make_experts(2, 256, 64, mx.bfloat16)
    with pytest.raises(ValueError, match="down.weight .* does not match gate_up"):
        fm.pack_experts(ex.gate, ex.up, other.down)


def test_pack_rejects_unquantized_and_wrong_types():
    m = SwitchGLU(256, 128, 2)
    with pytest.raises(ValueError, match="not quantized"):
        fm.pack_experts(m)
    with pytest.raises(TypeError, match="QuantizedSwitchLinear, a QuantizedProjection or a tuple"):
        fm.pack_experts("gate", "up", "down")
    with pytest.raises(TypeError, match="takes a SwitchGLU or SwitchMLP"):
        fm.pack_experts(make_experts(2, 256, 128, mx.bfloat16).gate)


def test_pack_rejects_scales_of_wrong_shape():
    ex = make_experts(2, 256, 128, mx.bfloat16)
    g = ex.gate
    with pytest.raises(ValueError, match=r"gate.scales has shape \(2, 128, 3\), expected \(2, 128, 4\)"):
        fm.pack_experts((g.weight, g.scales[..., :3], g.biases, 3, 64), ex.up, ex.down)
