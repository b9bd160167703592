"""`fused-moe doctor`: every kernel family of the grid checked on each device
present, the report's JSON, and a planted wrong kernel failing by name."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from fused_moe import _ext
from fused_moe.cli import main
from fused_moe.doctor import checks
from support.backends import METAL_MISSING, metal_available

FUSED_MOE = Path(sys.executable).parent / "fused-moe"


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    if request.param == "gpu" and not metal_available():
        pytest.skip(METAL_MISSING)
    return request.param


def test_doctor_passes_and_reports_every_family(device, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["doctor", "--device", device, "--no-speed", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "result: every kernel passed" in out
    record = json.loads(report.read_text())
    assert record["passed"] and record["header"]["cpu_level"] == _ext.cpu_isa()
    kernels = {r["kernel"] for r in record["correctness"]}
    # Every quantization of the grid, for gate/up and for the down op.
    for mode, bits, group_size in _ext.supported_quantizations():
        label = f"b{bits}" if mode == "affine" else mode
        for dtype in ("bfloat16", "float32"):
            assert f"gate_up {label} gs{group_size} swiglu {dtype}" in kernels
            assert f"down_combine {label} gs{group_size} {dtype}" in kernels
    # Every activation.
    for activation in _ext.SUPPORTED_ACTIVATIONS:
        assert any(k.startswith("gate_up ") and f" {activation} " in k for k in kernels), activation
    assert {"route gate q8", "route gate float32"} <= kernels
    for row in record["correctness"]:
        assert row["passed"] and row["error"] <= row["bound"], row


def test_a_planted_wrong_kernel_fails_by_name(monkeypatch, tmp_path, capsys):
    right = checks.FUSED["down_combine"]

    def one_percent_off(h, packed, indices, weights, **kw):
        return right(h, packed, indices, weights, **kw) * 1.01

    monkeypatch.setitem(checks.FUSED, "down_combine", one_percent_off)
    report = tmp_path / "report.json"
    assert main(["doctor", "--device", "cpu", "--no-speed", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAIL down_combine b3 gs64 float32" in out and "result: some kernels FAILED" in out
    record = json.loads(report.read_text())
    failed = {r["kernel"] for r in record["correctness"] if not r["passed"]}
    assert failed and all(k.startswith("down_combine ") for k in failed)


def test_a_kernel_that_raises_is_reported_and_the_rest_still_run(monkeypatch, capsys):
    def broken(*args, **kw):
        raise RuntimeError("compile failed: planted")

    monkeypatch.setitem(checks.FUSED, "route", broken)
    assert main(["doctor", "--device", "cpu", "--no-speed"]) == 1
    out = capsys.readouterr().out
    assert "FAIL route gate float32: RuntimeError: compile failed: planted" in out
    assert "gate_up affine" in out and "quantized_matmul" in out


@pytest.mark.slow
def test_doctor_from_the_command_line_with_its_speed_rows(tmp_path):
    report = tmp_path / "report.json"
    r = subprocess.run([str(FUSED_MOE), "doctor", "--quick", "--json", str(report)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    speed = json.loads(report.read_text())["speed"]
    assert speed["shape"]["E"] == 154 and len(speed["rows"]) == 1
    row = speed["rows"][0]
    assert row["tokens"] == 1 and row["fused_ms"] > 0 and row["speedup"] > 1
    assert "weights GB/s" in r.stdout
