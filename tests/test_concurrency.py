"""The ops from several Python threads at once: on the shared CPU stream and
on a stream per thread, each result bit-identical to the serial call, and no
deadlock in the thread pool, including while one thread's call raises on a
bad expert id. It runs in a subprocess with a timeout, so a deadlock fails
the test instead of hanging the suite."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, sys.argv[1])
    import mlx.core as mx, numpy as np, fused_moe as fm
    from support.moe_reference import make_experts, random_routing

    mode, threads, rounds = sys.argv[2], 6, 4
    ex = make_experts(16, 512, 256, mx.bfloat16, bits=3, group_size=64, down_bits=4, down_group_size=32)
    cases = []
    for i in range(threads):
        T = [1, 3, 40, 7, 64, 2][i]
        idx, w = random_routing(T, 16, 8, seed=i)
        x = mx.random.normal((T, 512), key=mx.random.key(i)).astype(mx.bfloat16)
        cases.append((x, idx, w))

    def layer(x, idx, w, stream):
        h = fm.gate_up_swiglu(x, ex.packed, idx, stream=stream)
        y = fm.down_combine(h, ex.packed, idx, w, stream=stream)
        mx.eval(y)
        return np.array(y.astype(mx.float32))

    serial = [layer(x, i, w, mx.cpu) for x, i, w in cases]
    bad = np.array(cases[0][1]); bad[0, 3] = 16
    bad = mx.array(bad)
    errors, raised = [], []

    def work(n):
        stream = mx.new_stream(mx.cpu) if mode == "own_streams" else mx.cpu
        try:
            for r in range(rounds):
                if n == 0 and r % 2 == 0:  # a call that raises while the others run
                    try:
                        layer(cases[0][0], bad, cases[0][2], stream)
                    except RuntimeError as e:
                        raised.append(str(e))
                    continue
                got = layer(*cases[n], stream)
                if not np.array_equal(got, serial[n], equal_nan=True):
                    errors.append(f"thread {n} round {r}: differs from the serial result")
        except Exception as e:
            errors.append(f"thread {n}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors, errors
    assert len(raised) == rounds // 2 and all("out of range for 16 experts" in m for m in raised), raised
    # The pool still works, at one thread and at several.
    for n in (1, 3):
        fm.set_num_threads(n)
        assert all(np.array_equal(layer(*c, mx.cpu), s) for c, s in zip(cases, serial))
    print("ok", mode, threads, "threads x", rounds, "rounds")
    """
)


@pytest.mark.parametrize("mode", ["cpu_stream", "own_streams"])
def test_ops_from_many_threads_match_serial_calls(mode):
    tests = str(Path(__file__).resolve().parent)
    try:
        r = subprocess.run([sys.executable, "-c", WORKER, tests, mode], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: no answer within 180 s (a deadlock)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"ok {mode}" in r.stdout
