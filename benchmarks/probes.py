"""The machine's own limits, measured in the benchmark's run: achievable read
bandwidth on all threads, and dense fp32 matmul GFLOP/s (numpy's BLAS).

Samples are taken between kernel measurements, so the probes see the same
machine state the kernels do; the benchmark reports their medians.
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
        # BLAS worker threads spin for a while after a matmul; let them go
        # idle, or they take cores from the kernel runs that follow.
        time.sleep(SETTLE_S)

    @property
    def gb_s(self) -> float:
        return statistics.median(self.read_gb_s)

    @property
    def gflop_s(self) -> float:
        return statistics.median(self.matmul_gflop_s)
