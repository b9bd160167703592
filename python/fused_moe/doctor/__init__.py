"""`fused-moe doctor`: a report a user runs on any machine and attaches to a
bug report. It says what the machine is, checks every kernel family of the
installed grid against a float64 reference on the default device (pass or
FAIL, with the error), times one MiniMax MoE layer fused against stock, and
on Metal the first-use compile of each kernel family.

`run(device, quick)` returns the whole record; the command line (fused_moe.
cli.doctor) prints a short table of it and writes it as JSON.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import OrderedDict

import mlx.core as mx

from fused_moe import _ext
from fused_moe._version import __version__
from fused_moe.doctor import checks as checks_mod
from fused_moe.doctor import speed as speed_mod


def header(device: mx.Device) -> dict:
    """The machine, OS, MLX and package versions, the device and memory."""
    info = {
        "fused_moe": __version__,
        "mlx": mx.__version__,
        "python": sys.version.split()[0],
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "cpu_level": _ext.cpu_isa(),
        "cpu_levels_available": list(_ext.available_cpu_isas()),
        "threads": _ext.get_num_threads(),
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    if device.type == mx.DeviceType.gpu and mx.metal.is_available():
        gpu = mx.metal.device_info()
        info["gpu"] = {k: gpu[k] for k in ("architecture", "memory_size", "max_recommended_working_set_size")
                       if k in gpu}
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run(device: mx.Device, quick: bool = False, speed: bool = True, progress=None) -> dict:
    """The whole report. `progress(text)` is called as each part starts."""
    say = progress or (lambda text: None)
    record = {"header": header(device)}
    say("correctness")
    start = time.perf_counter()
    stream = mx.default_stream(device)
    rows = [checks_mod.run_check(c, stream) for c in checks_mod.checks(device)]
    record["correctness"] = [r.as_json() for r in rows]
    record["correctness_seconds"] = time.perf_counter() - start
    families = OrderedDict()
    for r in rows:
        families.setdefault(r.family, []).append(r)
    record["families"] = [
        {"family": name, "kernels": len(rs), "failed": [r.kernel for r in rs if not r.passed],
         "worst_error_over_bound": max((r.error / r.bound for r in rs if r.passed), default=None),
         "first_call_seconds": max(r.seconds for r in rs)}
        for name, rs in families.items()
    ]
    record["passed"] = all(r.passed for r in rows)
    if device.type == mx.DeviceType.gpu:
        # On Metal the first call of each kernel compiles it: the rows above
        # timed it.
        record["metal_compile"] = {f["family"]: f["first_call_seconds"] for f in record["families"]}
    if speed:
        say("speed")
        speed_rows, probe = speed_mod.run(device, quick=quick)
        probe_gb_s = sorted(probe)[len(probe) // 2]
        record["speed"] = {
            "shape": {"D": speed_mod.D, "H": speed_mod.H, "E": speed_mod.E, "k": speed_mod.K,
                      "bits": speed_mod.BITS, "group_size": speed_mod.GROUP, "dtype": "bfloat16"},
            "read_probe_gb_s": probe,
            "rows": [r.as_json(probe_gb_s) for r in speed_rows],
        }
    return record
