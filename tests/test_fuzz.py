"""The differential fuzzer (tests/tools/fuzz/) on a fixed CI budget.

About 50 s of cases on this process's CPU level, the Metal emulator and
Metal where present, then 20 s under each other CPU level of this build in
its own process. `python -m tests.tools.fuzz --minutes 60 --seed S --all-isas`
runs longer; a failure prints its case and the command that reproduces it.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import fused_moe as fm
from tools import fuzz
from support.backends import StreamBackend
from fused_moe import _ext

SEED = int(os.environ.get("FUSED_MOE_FUZZ_SEED", "0"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fuzz_every_backend_here():
    backends = fuzz.backends(["cpu", "metal", "metal_emulator"])
    result = fuzz.run(SEED, 50, backends)
    counts = ", ".join(f"{k} {v}" for k, v in result["per_backend"].items())
    print(f"\nfuzz: CPU level {result['isa']}: {result['cases']} cases ({counts}), seed {SEED}")
    assert result["cases"] >= 10
    assert not result["failures"], "\n".join(result["failures"])


@pytest.mark.slow
def test_fuzz_every_other_cpu_level():
    for isa in _ext.available_cpu_isas():
        if isa == fm.cpu_isa():
            continue
        r = subprocess.run(
            [sys.executable, "-m", "tests.tools.fuzz", "--seconds", "20", "--seed", str(SEED + 1), "--backends", "cpu"],
            cwd=ROOT, env=dict(os.environ, FUSED_MOE_ISA=isa), capture_output=True, text=True, timeout=300,
        )
        print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:])
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]


class _OffByOnePercent(StreamBackend):
    def down_combine(self, h, packed, indices, weights):
        return super().down_combine(h, packed, indices, weights) * 1.01


def test_a_wrong_backend_fails_with_its_reproducer():
    """The fuzzer can fail: a backend 1% off is caught, with the command."""
    seed = next(s for s in range(100) if isinstance(fuzz.draw(s), fuzz.MoeCase) and fuzz.draw(s).dtype == "float32"
                and not fuzz.draw(s).extended())
    failures = fuzz.run_case(seed, [_OffByOnePercent("cpu", mx.cpu)])
    assert failures and "down_combine: err(fused)" in failures[0], failures
    assert f"python -m tests.tools.fuzz --case {seed} --backends cpu" in failures[0]


def test_a_wrong_kernel_at_the_new_settings_fails(monkeypatch):
    """The cases beyond the Metal kernels' settings can fail too: a gate_up 1%
    off is caught."""
    seed = next(s for s in range(1000) if isinstance(fuzz.draw(s), fuzz.MoeCase) and fuzz.draw(s).extended()
                and fuzz.draw(s).dtype == "float32")

    class OffByOnePercent:
        def __getattr__(self, name):
            return getattr(_ext, name)

        def gate_up(self, *args, **kwargs):
            return _ext.gate_up(*args, **kwargs) * 1.01

    monkeypatch.setattr(fuzz, "_ext", OffByOnePercent())
    failures = fuzz.run_case(seed, [StreamBackend("cpu", mx.cpu)])
    assert failures and "gate_up: err(fused)" in failures[0], failures


class _AttentionOffByOnePercent(StreamBackend):
    def attention(self, q, k, v, scale, mask):
        return super().attention(q, k, v, scale, mask) * 1.01

    def norm_rope(self, x, weight, **kw):
        return super().norm_rope(x, weight, **kw) * 1.01


@pytest.mark.parametrize("kind", ["AttentionCase", "NormRopeCase"])
def test_a_wrong_attention_backend_fails(kind):
    # float32, and for norm_rope positions where stock's fp32 angles are
    # still accurate (the rule's bound grows with stock's own error).
    seed = next(s for s in range(1000) if type(fuzz.draw(s)).__name__ == kind and fuzz.draw(s).dtype == "float32"
                and getattr(fuzz.draw(s), "offset", 0) < 5000)
    failures = fuzz.run_case(seed, [_AttentionOffByOnePercent("cpu", mx.cpu)])
    assert failures and "err(fused)" in failures[0], failures
