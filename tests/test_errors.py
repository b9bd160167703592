"""Bad input: clear errors at the call, and no out-of-bounds access at eval."""

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from support.moe_reference import make_experts, random_routing


@pytest.fixture(scope="module")
def ex():
    return make_experts(6, 256, 128, mx.bfloat16, bits=3, group_size=64)


@pytest.fixture
def args(ex):
    indices, weights = random_routing(3, 6, 2)
    x = mx.random.normal((3, 256)).astype(mx.bfloat16)
    h = fm.gate_up_swiglu(x, ex.packed, indices)
    return x, indices, weights, h


@pytest.mark.parametrize(
    "bad_index,dtype",
    [(6, mx.uint32), (2**32 - 1, mx.uint32), (-1, mx.int32), (2**31 - 1, mx.int32), (1000, mx.int32)],
)
def test_out_of_range_expert_raises_at_eval(ex, args, bad_index, dtype):
    # CPU semantics; the Metal kernels make the rows NaN instead
    # (test_metal_emulator.py::test_bad_expert_ids_give_nan_rows_in_bounds).
    device = mx.cpu
    x, indices, weights, h = args
    bad = np.array(indices).astype(np.int64)
    bad[2, 1] = bad_index
    bad = mx.array(bad.astype(np.uint32 if dtype == mx.uint32 else np.int32))
    expected = rf"indices\[2, 1\] = {bad_index if dtype == mx.int32 else bad_index} is out of range for 6 experts"
    with pytest.raises(RuntimeError, match=expected):
        mx.eval(fm.gate_up_swiglu(x, ex.packed, bad, stream=device))
    with pytest.raises(RuntimeError, match=expected):
        mx.eval(fm.down_combine(h, ex.packed, bad, weights, stream=device))
    # The process and the stream are still usable afterwards.
    mx.eval(fm.down_combine(h, ex.packed, indices, weights, stream=device))


def test_x_dtype_must_match_scales(ex, args):
    x, indices, _, _ = args
    with pytest.raises(ValueError, match="gate_up_scales has dtype bfloat16 but x has dtype float16"):
        fm.gate_up_swiglu(x.astype(mx.float16), ex.packed, indices)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got int32"):
        fm.gate_up_swiglu(x.astype(mx.int32), ex.packed, indices)


def test_x_width_must_match(ex, args):
    x, indices, _, _ = args
    with pytest.raises(ValueError, match=r"gate_up_weight has shape \[6, 256, 24\] but 3-bit rows of D=512 inputs need \[6, 256, 48\]"):
        fm.gate_up_swiglu(mx.concatenate([x, x], axis=1), ex.packed, indices)
    with pytest.raises(ValueError, match=r"D \(x.shape\[-1\]\)=100 must be a positive multiple of 32"):
        fm.gate_up_swiglu(x[:, :100], ex.packed, indices)


def test_indices_checks(ex, args):
    x, indices, weights, h = args
    with pytest.raises(ValueError, match=r"indices must have shape \[3\] \+ \[k\], got \[2, 2\]"):
        fm.gate_up_swiglu(x, ex.packed, indices[:2])
    with pytest.raises(ValueError, match="indices must be uint32 or int32, got float32"):
        fm.gate_up_swiglu(x, ex.packed, indices.astype(mx.float32))
    too_many = mx.zeros((3, 17), dtype=mx.uint32)
    with pytest.raises(ValueError, match=r"k=17 experts per token is not supported; supported k: 1..16"):
        fm.gate_up_swiglu(x, ex.packed, too_many)


def test_down_combine_checks(ex, args):
    x, indices, weights, h = args
    with pytest.raises(ValueError, match=r"h has 1 expert slots .* but indices has k=2"):
        fm.down_combine(h[:, :1], ex.packed, indices, weights)
    with pytest.raises(ValueError, match=r"weights must have the shape of indices \[3, 2\], got \[3, 1\]"):
        fm.down_combine(h, ex.packed, indices, weights[:, :1])
    with pytest.raises(ValueError, match=r"weights must be float32 or the dtype of h \(bfloat16\), got float16"):
        fm.down_combine(h, ex.packed, indices, weights.astype(mx.float16))
    with pytest.raises(ValueError, match="down_scales has dtype bfloat16 but h has dtype float32"):
        fm.down_combine(h.astype(mx.float32), ex.packed, indices, weights)
    with pytest.raises(ValueError, match=r"h must have shape \[..., k, H\]"):
        fm.down_combine(h[0, 0], ex.packed, indices, weights)


def test_packed_must_be_packed_experts(args):
    x, indices, weights, h = args
    with pytest.raises(TypeError, match="packed must be a fused_moe.PackedExperts"):
        fm.gate_up_swiglu(x, {"weight": 1}, indices)
    with pytest.raises(TypeError, match="packed must be a fused_moe.PackedExperts"):
        fm.down_combine(h, None, indices, weights)


def test_packed_from_other_layer_shape(args):
    x, indices, _, _ = args
    other = make_experts(6, 512, 128, mx.bfloat16)
    with pytest.raises(ValueError, match="gate_up_weight has shape"):
        fm.gate_up_swiglu(x, other.packed, indices)


def test_unsupported_grid_in_raw_op(ex, args):
    from fused_moe import _ext

    x, indices, _, _ = args
    w, s, b, _, _ = ex.packed.projection("gate_up")[:5]
    with pytest.raises(ValueError, match=r"gate_up bits=7 is not supported; supported bits: \{2, 3, 4, 5, 6, 8\}"):
        _ext.gate_up_swiglu(x, w, s, b, indices, 7, 64)
    with pytest.raises(ValueError, match=r"gate_up group_size=16 is not supported; supported group sizes: \{32, 64, 128\}"):
        _ext.gate_up_swiglu(x, w, s, b, indices, 3, 16)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        fm.set_num_threads(0)


@pytest.mark.skipif(
    not mx.is_available(mx.gpu) or mx.metal.is_available(),
    reason="needs an MLX GPU backend other than Metal (e.g. CUDA); this MLX has none",
)
def test_non_metal_gpu_raises(ex, args):
    x, indices, weights, h = args
    with pytest.raises(RuntimeError, match="GateUp has no GPU implementation in this build"):
        mx.eval(fm.gate_up_swiglu(x, ex.packed, indices, stream=mx.gpu))
    with pytest.raises(RuntimeError, match="DownCombine has no GPU implementation in this build"):
        mx.eval(fm.down_combine(h, ex.packed, indices, weights, stream=mx.gpu))
    gate = mx.random.normal((8, x.shape[-1]))
    with pytest.raises(RuntimeError, match="Route has no GPU implementation in this build"):
        mx.eval(fm.route(x, gate, mx.zeros((8,)), 2, stream=mx.gpu))


_FAILED_EVALS = """
import sys
import mlx.core as mx
import fused_moe as fm
sys.path.insert(0, sys.argv[1])
from support.moe_reference import make_experts

ex = make_experts(4, 256, 128, mx.float32)
x = mx.ones((1, 256))
bad, good = mx.array([[7]], dtype=mx.uint32), mx.array([[1]], dtype=mx.uint32)
raised = 0
for i in range(300):
    for indices in (bad, good):
        try:
            mx.eval(fm.gate_up_swiglu(x, ex.packed, indices))
        except RuntimeError as e:
            assert "is out of range for" in str(e), e
            raised += 1
mx.eval(fm.gate_up_swiglu(x, ex.packed, good))
print("raised", raised)
"""


def test_many_failed_evals_do_not_hang(tmp_path):
    # An error raised from MLX's enqueue leaves a task counted forever; enough
    # of them make every later eval wait for good (MLX 0.32.4). The ops raise
    # a pending error before MLX counts their task, so none is left counted.
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FAILED_EVALS, os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # Every bad call raises; a good call right after one may raise that
    # failure instead of running (MLX reports a stream's error on its next op).
    assert 300 <= int(r.stdout.split()[-1]) <= 600, r.stdout
