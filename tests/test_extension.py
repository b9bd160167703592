"""The native extension itself: ABI, streams, thread and ISA controls."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import fused_moe as fm
from fused_moe import _ext
from support.moe_reference import make_experts, random_routing


def test_arrays_pass_through_the_extension():
    # A nanobind ABI mismatch with MLX makes every mx.array argument fail to
    # convert (TypeError: incompatible function arguments).
    ex = make_experts(2, 256, 128, mx.float32)
    w, s, b, bits, gs = ex.packed.projection("gate_up")[:5]
    x = mx.ones((1, 256))
    idx = mx.array([[1]], dtype=mx.uint32)
    h = _ext.gate_up_swiglu(x, w, s, b, idx, bits, gs)
    assert isinstance(h, mx.array) and h.shape == (1, 1, 128)
    mx.eval(h)


@pytest.mark.parametrize("stream", [None, mx.cpu, "new"])
def test_stream_argument(stream):
    if stream == "new":
        stream = mx.new_stream(mx.cpu)
    ex = make_experts(3, 256, 128, mx.float32)
    indices, weights = random_routing(2, 3, 2)
    x = mx.random.normal((2, 256))
    h = fm.gate_up_swiglu(x, ex.packed, indices, stream=stream)
    y = fm.down_combine(h, ex.packed, indices, weights, stream=stream)
    h0 = fm.gate_up_swiglu(x, ex.packed, indices)
    assert mx.array_equal(y, fm.down_combine(h0, ex.packed, indices, weights)).item()


def test_grid_constants():
    assert fm.SUPPORTED_BITS == (2, 3, 4, 5, 6, 8)
    assert fm.SUPPORTED_GROUP_SIZES == (32, 64, 128)
    assert (fm.MIN_TOP_K, fm.MAX_TOP_K) == (1, 16)
    assert fm.SUPPORTED_ROUTER_BITS == (8,)


def _run_python(code, **env):
    full_env = dict(os.environ)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_isa_forced_by_environment():
    for isa in _ext.available_cpu_isas():
        r = _run_python("import fused_moe; print(fused_moe.cpu_isa())", FUSED_MOE_ISA=isa)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa


def test_unknown_isa_is_an_error():
    r = _run_python("import fused_moe; fused_moe.cpu_isa()", FUSED_MOE_ISA="avx9000")
    assert r.returncode != 0
    assert "FUSED_MOE_ISA=avx9000 is not a CPU level of this build" in r.stderr


def test_num_threads_from_environment():
    r = _run_python("import fused_moe; print(fused_moe.get_num_threads())", FUSED_MOE_NUM_THREADS="3")
    assert r.stdout.strip() == "3", r.stderr
    r = _run_python("import fused_moe; fused_moe.get_num_threads()", FUSED_MOE_NUM_THREADS="many")
    assert "FUSED_MOE_NUM_THREADS must be a positive integer, got 'many'" in r.stderr


def test_every_isa_agrees_with_the_active_one():
    """Each other level this CPU supports, forced in a child process, gives the
    result of this process's level within fp32 rounding."""
    code = (
        "import mlx.core as mx, numpy as np, fused_moe as fm, sys\n"
        "sys.path.insert(0, %r)\n"
        "from support.moe_reference import make_experts, random_routing\n"
        "assert fm.cpu_isa() == sys.argv[2], (fm.cpu_isa(), sys.argv[2])\n"
        "ex = make_experts(5, 256, 128, mx.float32, bits=3, group_size=32, down_bits=4)\n"
        "i, w = random_routing(9, 5, 3)\n"
        "x = mx.random.normal((9, 256), key=mx.random.key(1))\n"
        "y = fm.down_combine(fm.gate_up_swiglu(x, ex.packed, i), ex.packed, i, w)\n"
        "np.save(sys.argv[1], np.array(y))\n"
    ) % os.path.dirname(__file__)
    import tempfile

    import numpy as np

    active = fm.cpu_isa()
    available = _ext.available_cpu_isas()
    assert active in available
    # The levels this CPU has must all be built and offered, so that the
    # comparison below cannot pass by having nothing to compare.
    missing = _levels_this_cpu_has() - set(available)
    assert not missing, f"this CPU has {sorted(missing)}, but the extension offers only {available}"
    with tempfile.TemporaryDirectory() as tmp:

        def run(isa: str) -> np.ndarray:
            path = os.path.join(tmp, f"{isa}.npy")
            env = dict(os.environ, FUSED_MOE_ISA=isa)
            r = subprocess.run([sys.executable, "-c", code, path, isa], capture_output=True, text=True, env=env,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            return np.load(path)

        # The active level in a child too: the same code path as the others.
        ref = run(active)
        others = [isa for isa in available if isa != active]
        for isa in others:
            y = run(isa)
            np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=f"{isa} vs {active}")
    assert len(available) == 1 or others, f"levels {available}: none compared with {active}"


def _levels_this_cpu_has() -> set:
    """The kernel levels the CPU's own feature flags allow (Linux x86-64;
    elsewhere only "generic" is known without asking the extension)."""
    levels = {"generic"}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return levels
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        levels.add("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi"} <= flags:
            levels.add("avx512")
    return levels


def test_bandwidth_probe_reads_a_buffer():
    import numpy as np

    from fused_moe import _ext

    buffer = np.ones(1 << 20, dtype=np.uint8)
    seconds = _ext.timed_read(buffer)
    assert 0 < seconds < 10
    with pytest.raises(TypeError):
        _ext.timed_read(buffer[::2])  # not contiguous: refused, not misread
