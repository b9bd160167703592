"""The machine's own limits, measured in the benchmark's run: achievable read
bandwidth on all threads, and dense fp32 matmul GFLOP/s (numpy's BLAS).

Samples are taken between kernel measurements, so the probes see the same
machine state the kernels do; the benchmark reports their medians. Each
sample also records the load average, and ``warnings`` says when the samples
look throttled: a wide spread between them, or other work on the cores.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import fused_moe as fm
from fused_moe import _ext

# Far larger than any cache, so every byte comes from memory.
READ_BYTES = 512 << 20
# A square fp32 matmul big enough to run at BLAS's full speed.
MATMUL_N = 2048
# Pause after each probe sample, longer than BLAS threads spin when idle.
SETTLE_S = 0.5
# Samples of one steady machine stay within a few percent of each other; a
# spread (max - min over the median) above this means the machine changed
# under the run, e.g. a neighbour took cores or memory bandwidth.
SPREAD_LIMIT = 0.25
# A run keeps up to os.cpu_count() threads busy itself, and the system's own
# housekeeping adds a little: a 1-minute load average this far above the
# number of CPUs means other work competed for the cores.
LOAD_MARGIN = 0.5


class Probes:
    def __init__(self) -> None:
        # numpy backs large arrays with transparent huge pages where the
        # kernel allows, so this reads at the machine's best, not at the
        # rate some allocator's page size permits.
        self.buffer = np.ones(READ_BYTES // 8, dtype=np.float64)
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
        self.b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
        self.read_gb_s: list[float] = []
        self.matmul_gflop_s: list[float] = []
        # 1-minute load averages, one per sample and per note_load().
        self.load_1m: list[float] = []
        self.a @ self.b  # BLAS warm-up (thread start, page faults)

    def sample(self) -> None:
        """One sample of each probe. Reads use every hardware thread, whatever
        the kernels were set to, since the probe measures the machine."""
        threads = fm.get_num_threads()
        fm.set_num_threads(os.cpu_count() or 1)
        try:
            self.read_gb_s.append(self.buffer.nbytes / _ext.timed_read(self.buffer) / 1e9)
        finally:
            fm.set_num_threads(threads)
        start = time.perf_counter()
        self.a @ self.b
        self.matmul_gflop_s.append(2 * MATMUL_N**3 / (time.perf_counter() - start) / 1e9)
        self.load_1m.append(load_average())
        # BLAS worker threads spin for a while after a matmul; let them go
        # idle, or they take cores from the kernel runs that follow.
        time.sleep(SETTLE_S)

    def note_load(self) -> None:
        """Records the load average between probe samples, e.g. after
        minutes of stock calls."""
        self.load_1m.append(load_average())

    @property
    def gb_s(self) -> float:
        return statistics.median(self.read_gb_s)

    @property
    def gflop_s(self) -> float:
        return statistics.median(self.matmul_gflop_s)

    def warnings(self) -> list[str]:
        """Why the probes (and so the kernel times beside them) may not
        describe a steady machine; empty when nothing looks throttled."""
        out = []
        for name, unit, samples in (("read", "GB/s", self.read_gb_s),
                                    ("fp32 matmul", "GFLOP/s", self.matmul_gflop_s)):
            if len(samples) >= 2 and spread(samples) > SPREAD_LIMIT:
                out.append(
                    f"the {name} probe's {len(samples)} samples ranged from {min(samples):.1f} to "
                    f"{max(samples):.1f} {unit} (median {statistics.median(samples):.1f}, spread "
                    f"{100 * spread(samples):.0f}% > {100 * SPREAD_LIMIT:.0f}%)"
                )
        cpus = os.cpu_count() or 1
        loads = [v for v in self.load_1m if v == v]  # NaN where there is no load average
        if loads and max(loads) > cpus + LOAD_MARGIN:
            out.append(
                f"the 1-minute load average reached {max(loads):.1f} on {cpus} logical CPUs "
                f"(samples {min(loads):.1f}-{max(loads):.1f}; this run alone keeps at most "
                f"{cpus} busy): other work was running"
            )
        return out


def spread(samples: list[float]) -> float:
    """(max - min) / median of probe samples."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def load_average() -> float:
    """The 1-minute load average, NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")
