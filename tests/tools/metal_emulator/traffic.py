"""The Metal kernels' device-memory traffic, measured in the emulator.

    python -m tests.tools.metal_emulator.traffic [--json PATH] [--tokens 1 8 512]
        [--quants b2 b3 b4 b5 b6 b8 mxfp4 mxfp8 nvfp4] [--markdown]

runs the gate/up kernels (swiglu) and the down kernels (with the combine) at
the MiniMax shapes for each quantization (affine at group size 64, the fp
modes at theirs) in the traffic build of the emulator (``Tracer``: every
device load and store of the kernels is traced, trace_hooks.cpp) and prints,
per kernel and buffer, the sector efficiency, the re-read factor, the
prefill tile reuse and a roofline estimate. ASSUMPTIONS below is printed as
the report's header; metal/README.md carries the table and what it cannot
tell.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from fused_moe import _ext

from . import PROBE_SOURCE, ROOT, TRACE_CXX, Emulator, build_kernels, compiler_available

SECTOR = 32
# The MiniMax-M2.5-REAP expert shapes (issue 17).
D, H, K, E, GROUP = 3072, 1536, 8, 154, 64
DTYPE = mx.bfloat16
# Bandwidth in GB/s: (spec, achievable); ALU issue rate in 10^12 fp32 ops/s
# (one op per lane per clock, an FMA counting once).
MACHINES = {
    "M2 Max": dict(spec=400.0, achievable=340.0, tops=38 * 128 * 1.398e9 / 1e12),
    "M3 Ultra": dict(spec=819.0, achievable=692.0, tops=80 * 128 * 1.4e9 / 1e12),
}
# Rows of one expert in flight per SIMD group, for the ALU estimate: the
# activation preparation (3 ops per input) is shared by these rows.
ROWS_IN_FLIGHT = {
    ("gate_up", "decode"): "kGateUpDecodeRows",
    ("gate_up", "prefill"): "kGateUpPrefillRows",
    ("down", "decode"): "kDownDecodeRows",
    ("down", "prefill"): "kDownPrefillRows",
}
# Output rows per threadgroup (the grid's x is out_rows / this), for sampling
# (gate/up with swiglu: two packed rows per row of h).
ROWS_PER_THREADGROUP = {
    ("gate_up", "decode"): "kGateUpDecodeRows // 2 * kGateUpDecodeSimdgroups",
    ("gate_up", "prefill"): "kGateUpPrefillRows // 2 * kGateUpPrefillSimdgroups",
    ("down", "decode"): "kDownDecodeRows * kDownDecodeSimdgroups",
    ("down", "prefill"): "kDownPrefillRows * kDownPrefillSimdgroups",
}
# The quantizations of the report: name -> (mode, bits, group size).
QUANTS = {
    **{f"b{b}": ("affine", b, GROUP) for b in (2, 3, 4, 5, 6, 8)},
    "mxfp4": ("mxfp4", 4, 32), "mxfp8": ("mxfp8", 8, 32), "nvfp4": ("nvfp4", 4, 16),
}
# Buffers whose every byte is read by every row block: under sampling their
# distinct bytes are measured, not scaled (see ASSUMPTIONS).
SHARED_ACROSS_ROW_BLOCKS = {"x", "h", "indices", "order", "weights", "args"}

ASSUMPTIONS = f"""\
Traffic of the fused MoE Metal kernels, traced in the Linux emulator
(tests/tools/metal_emulator/traffic.py). Assumptions:
- Shapes: D={D}, H={H}, k={K}, E={E}, bfloat16; affine 2, 3, 4, 5, 6 and 8 bits at
  group size {GROUP}, mxfp4 and mxfp8 (group size 32, uint8 scales), nvfp4 (16).
  gate/up with swiglu, down with the combine: the activation, the expert bias
  and the per-slot down change no weight access.
  Routing: distinct experts per token from a seeded permutation; the number of
  distinct experts touched is printed per case (8 at T=1, ~53 at T=8, 154 at T=512).
  Weight values are zeros: no address depends on them.
- Instructions: the kernels are compiled by clang 19 at -O2 without
  vectorization, so each load or store in the source is one access of its own
  width; Apple's compiler may merge or split them differently. The k-th device
  access of every lane of a SIMD group since the group last met (simd_sum,
  barrier, end) is one instruction; lanes with fewer accesses are masked off.
  Where lanes disagree on the site, buffer or direction, those accesses are
  counted as divergent and left out of the efficiencies ("div" column); their
  bytes count lane by lane in the re-read factor (an upper bound). Masked-off
  lanes are recognised only at the end of a segment: lanes that skip an access
  in its middle (kernel A prefill's h store by lanes 0-1, then the next
  segment's index loads) show as divergent until the next sync.
- Sectors: 32-byte sectors counted from each buffer's start (a Metal buffer
  is page-aligned). Sector efficiency = bytes used (union of the lanes' bytes)
  / (32 x distinct sectors), summed over a buffer's instructions.
- Re-read = bytes read (each instruction counting a byte once) / distinct
  bytes read. Tile reuse (prefill) = (pair, weight-byte) products the call
  needs / weight bytes read: 1 when every pair reads its expert's rows itself.
- Roofline: time = max(device bytes / bandwidth, ALU ops / issue rate), with
  device bytes counted three ways: "streamed" (the headline: weights, scales
  and biases at 32 x their sectors, every other buffer's distinct bytes once,
  as they are small and stay in cache), "sector" (every instruction's sectors,
  no reuse between instructions at all) and "distinct" (each byte once). Bandwidth: M2 Max 400 GB/s spec,
  340 achievable; M3 Ultra 819 spec, 692 achievable. Issue rate: M2 Max 38 cores,
  M3 Ultra 80 cores, 128 fp32 lanes each at ~1.4 GHz, one op per lane per clock.
- ALU ops: a per-lane estimate, not a count: per code, row and pair 3 ops (mask,
  convert, FMA) for affine codes, 2 for fp codes (convert, FMA), and 9 per fp
  code loaded (extract, decode by integer operations, sign, scale, convert to
  half: once per row and pass, whatever the pairs); per 16 codes 5 (scale,
  bias, convert x2, add); per input and pair 3 (convert, scale, sum) shared
  by the rows in flight per SIMD group.
  Address arithmetic, loop control and the epilogue are not counted.
- Sampling: where a run traces every S-th row block only (column "S"), bytes are
  scaled by S; distinct bytes are scaled by S for buffers partitioned by row
  block (weights, scales, biases, outputs) and taken as measured for buffers
  every row block reads (x, h, indices, order, weights, args).
- Not modelled: caches beyond one instruction, occupancy, latency hiding, the
  GPU's real scheduler, DRAM pages, compression.
"""

STATS_FIELDS = (
    "instructions", "lane_accesses", "bytes_requested", "bytes_used", "sectors",
    "divergent_accesses", "divergent_bytes",
)


@dataclass
class Accesses:
    """One buffer's loads or stores (or one site's), summed over a launch."""

    instructions: int = 0
    lane_accesses: int = 0
    bytes_requested: int = 0
    bytes_used: int = 0
    sectors: int = 0
    divergent_accesses: int = 0
    divergent_bytes: int = 0

    @property
    def efficiency(self) -> float | None:
        return self.bytes_used / (SECTOR * self.sectors) if self.sectors else None

    def scaled(self, s: int) -> "Accesses":
        return Accesses(*(getattr(self, f) * s for f in STATS_FIELDS))


@dataclass
class BufferTraffic:
    name: str
    size: int  # bytes of the buffer
    distinct_read: int
    load: Accesses
    store: Accesses
    histogram: list = field(default_factory=list)  # bytes by instructions reading them

    @property
    def bytes_read(self) -> int:
        return self.load.bytes_used + self.load.divergent_bytes

    @property
    def reread(self) -> float | None:
        return self.bytes_read / self.distinct_read if self.distinct_read else None

    @property
    def sector_bytes(self) -> int:
        return SECTOR * (self.load.sectors + self.store.sectors) + self.load.divergent_bytes + self.store.divergent_bytes

    @property
    def distinct_bytes(self) -> int:
        """Each byte read once, plus the bytes written."""
        return self.distinct_read + self.store.bytes_used + self.store.divergent_bytes

    @property
    def efficiency(self) -> float | None:
        used = self.load.bytes_used + self.store.bytes_used
        sectors = self.load.sectors + self.store.sectors
        return used / (SECTOR * sectors) if sectors else None


@dataclass
class Site:
    """One load or store in the kernel's code (after inlining)."""

    pc: int
    buffer: str
    store: bool
    accesses: Accesses
    where: str = ""


class Tracer(Emulator):
    """The emulator's traffic build: every run leaves its trace behind."""

    def __init__(self, cache_dir: Path):
        super().__init__(cache_dir, trace=True)
        lib = self.lib
        lib.fm_trace_buffer_name.restype = ctypes.c_char_p
        lib.fm_trace_buffer_name.argtypes = [ctypes.c_int]
        lib.fm_trace_buffer_stats.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
        lib.fm_trace_read_histogram.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
        lib.fm_trace_site.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
        lib.fm_trace_overflowed_lanes.restype = ctypes.c_uint64
        lib.fm_trace_lost_sites.restype = ctypes.c_uint64
        lib.fm_trace_set_sample_stride.argtypes = [ctypes.c_uint32]
        self.probes = build_kernels(self.cache_dir, PROBE_SOURCE.read_text(), self.runtime, trace=True)
        self._load(self.probes)
        self.last_library = self.probes  # the library of the last run's kernel

    def _after_run(self, kernel: str) -> None:
        self.last_library = self.library_of.get(kernel, self.last_library)

    def set_sample_stride(self, stride: int) -> None:
        """Runs (and traces) only row blocks x with x % stride == 0."""
        self.lib.fm_trace_set_sample_stride(stride)

    def trace(self) -> list[BufferTraffic]:
        """The last run's traffic, buffer by buffer in slot order."""
        lib = self.lib
        if lib.fm_trace_overflowed_lanes() or lib.fm_trace_lost_sites():
            raise RuntimeError(
                f"incomplete trace: {lib.fm_trace_overflowed_lanes()} lanes passed the tracer's "
                f"capacity between two syncs, {lib.fm_trace_lost_sites()} sites did not fit "
                "(kLaneCapacity / kSiteSlots in trace_hooks.cpp)"
            )
        out = []
        for b in range(lib.fm_trace_buffer_count()):
            raw = (ctypes.c_uint64 * 16)()
            lib.fm_trace_buffer_stats(b, raw)
            hist = (ctypes.c_uint64 * 256)()
            lib.fm_trace_read_histogram(b, hist)
            out.append(BufferTraffic(
                lib.fm_trace_buffer_name(b).decode(), raw[0], raw[1],
                Accesses(*raw[2:9]), Accesses(*raw[9:16]), list(hist),
            ))
        if not out:
            raise RuntimeError("the last run left no trace (too many buffers or threads?)")
        return out

    def sites(self) -> list[Site]:
        names = [b.name for b in self.trace()]
        sites = []
        for i in range(self.lib.fm_trace_site_count()):
            raw = (ctypes.c_uint64 * 10)()
            self.lib.fm_trace_site(i, raw)
            sites.append(Site(raw[0], names[raw[1]], bool(raw[2]), Accesses(*raw[3:10])))
        self._symbolize(sites)
        return sites

    def _symbolize(self, sites: list[Site]) -> None:
        """file:line of each site, innermost frame <- the kernel's line."""
        tool = shutil.which(TRACE_CXX.replace("clang++", "llvm-symbolizer")) or shutil.which("llvm-symbolizer")
        if not tool or not sites:
            return
        # The return address is the instruction after the hook's call.
        query = "\n".join(hex(s.pc - 1) for s in sites) + "\n"
        proc = subprocess.run([tool, f"--obj={self.last_library}", "--relative-address"],
                              input=query, capture_output=True, text=True)
        blocks = proc.stdout.strip().split("\n\n")
        for s, block in zip(sites, blocks):
            lines = block.splitlines()
            # Pairs of lines: function, then path:line:column.
            frames = []
            for loc in lines[1::2]:
                path, line = (loc.rsplit(":", 2) + ["?", "?"])[:2]
                frames.append(f"{Path(path).name}:{line}")
            s.where = frames[0] if len(frames) == 1 else f"{frames[0]} <- {frames[-1]}" if frames else "?"

    def run_probe(self, stride: int, groups: int = 4) -> list[BufferTraffic]:
        """trace_probe_strided_copy: lane l of threadgroup g reads uint32
        (32 g + l) * stride and writes it to 32 g + l."""
        lib = self.lib
        sizes = [4 * 32 * groups * stride, 4 * 32 * groups, 4]
        ptrs = [lib.fm_emu_buffer_alloc(n) for n in sizes]
        try:
            ctypes.memmove(ptrs[2], np.array([stride], np.uint32).ctypes.data, 4)
            grid = (ctypes.c_uint32 * 3)(groups, 1, 1)
            names = (ctypes.c_char_p * 3)(b"src", b"dst", b"stride")
            err = ctypes.create_string_buffer(4096)
            rc = lib.fm_emu_run_kernel(b"trace_probe_strided_copy", grid, 32,
                                       (ctypes.c_void_p * 3)(*ptrs), names, 3, 2, err, 4096)
            self.last_library = self.probes
            if rc:
                raise RuntimeError(err.value.decode())
            return self.trace()
        finally:
            for p in ptrs:
                lib.fm_emu_buffer_free(p)


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


def routing(T: int, seed: int = 17) -> tuple[mx.array, mx.array]:
    """indices [T, k] (k distinct experts per token) and weights [T, k]."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.uint32)
    w = rng.random((T, K)).astype(np.float32) + 0.1
    return mx.array(idx), mx.array(w / w.sum(axis=1, keepdims=True))


def projection(rows: int, inputs: int, mode: str, bits: int, group: int, experts: int = E):
    """Zero codes, scales and (affine) biases of one stacked projection
    [E, rows, inputs]."""
    w = mx.zeros((experts, rows, inputs * bits // 32), dtype=mx.uint32)
    s = mx.zeros((experts, rows, inputs // group), dtype=DTYPE if mode == "affine" else mx.uint8)
    return w, s, (mx.zeros_like(s) if mode == "affine" else None)


@dataclass
class Case:
    op: str  # gate_up (swiglu) or down (with the combine)
    T: int
    bits: int
    d: int = D
    h: int = H
    k: int = K
    experts: int = E
    group: int = GROUP
    mode: str = "affine"

    @property
    def quant(self) -> str:
        return f"b{self.bits}" if self.mode == "affine" else self.mode

    def routing(self) -> tuple[mx.array, mx.array]:
        if self.experts == E and self.k == K:
            return routing(self.T)
        rng = np.random.default_rng(self.T)
        idx = np.argsort(rng.random((self.T, self.experts)), axis=1)[:, : self.k].astype(np.uint32)
        return mx.array(idx), mx.full((self.T, self.k), 1.0 / self.k)

    def problem(self) -> dict:
        return dict(bits=self.bits, group_size=self.group, tokens=self.T, top_k=self.k, hidden=self.d,
                    intermediate=self.h, experts=self.experts, mode=self.mode)

    def inputs(self):
        indices, weights = self.routing()
        if self.op == "gate_up":
            w, s, b = projection(2 * self.h, self.d, self.mode, self.bits, self.group, self.experts)
            x = mx.zeros((self.T, self.d), dtype=DTYPE)
            inputs = _ext.gate_up_metal_inputs(x, w, s, b, indices, self.bits, self.group, mode=self.mode,
                                               stream=mx.cpu)
            out_shape = (self.T, self.k, self.h)
        else:
            w, s, b = projection(self.d, self.h, self.mode, self.bits, self.group, self.experts)
            hh = mx.zeros((self.T, self.k, self.h), dtype=DTYPE)
            inputs = _ext.down_metal_inputs(hh, w, s, b, indices, weights, self.bits, self.group,
                                            mode=self.mode, stream=mx.cpu)
            out_shape = (self.T, self.d)
        mx.eval(inputs)
        return self.problem(), list(inputs), out_shape, len(np.unique(np.array(indices)))

    def weight_bytes_per_expert(self, buffer: str) -> int:
        rows, inputs = (2 * self.h, self.d) if self.op == "gate_up" else (self.d, self.h)
        if buffer.endswith("_weight"):
            return rows * inputs * self.bits // 8
        return rows * inputs // self.group * (DTYPE.size if self.mode == "affine" else 1)

    def alu_ops(self, rows_in_flight: int, codes_loaded: float) -> float:
        """Per (code, row, pair): affine 3 (mask, convert, FMA), fp 2
        (convert, FMA); fp codes decoded once per load (9 each)."""
        rows, inputs = (2 * self.h, self.d) if self.op == "gate_up" else (self.d, self.h)
        affine = self.mode == "affine"
        per_code = (3 if affine else 2) + 5 / 16 + 3 / rows_in_flight
        return self.T * self.k * rows * inputs * per_code + (0 if affine else 9 * codes_loaded)


def tile_constant(expr: str) -> int:
    """Evaluates `2 * kGateUpDecodeRowPairs`-like expressions from tile_shapes.h."""
    import re

    text = (ROOT / "metal" / "tile_shapes.h").read_text()
    values = {m[0]: int(m[1]) for m in re.findall(r"FM_TILE_CONSTANT int (k\w+) = (\d+);", text)}
    return int(eval(expr, {}, values))  # noqa: S307 (our own header's integers)


@dataclass
class CaseResult:
    kernel: str
    variant: str
    T: int
    bits: int
    quant: str
    experts_touched: int
    sample_stride: int
    seconds: float
    buffers: list
    alu_ops: float
    sites: list

    def total(self, attr: str) -> int:
        return sum(getattr(b, attr) for b in self.buffers)


def run_case(tracer: Tracer, case: Case, sample_stride: int = 1, with_sites: bool = True) -> CaseResult:
    if sample_stride > 1:
        variant = "prefill" if case.T * case.k >= tile_constant("kPrefillMinPairs") else "decode"
        out_rows = case.h if case.op == "gate_up" else case.d
        blocks = out_rows // tile_constant(ROWS_PER_THREADGROUP[(case.op, variant)])
        if blocks % sample_stride:
            raise ValueError(f"{case.op}: {blocks} row blocks are not a multiple of the sample stride "
                             f"{sample_stride}, so the counts would not scale exactly")
    problem, inputs, out_shape, touched = case.inputs()
    tracer.set_sample_stride(sample_stride)
    start = time.perf_counter()
    try:
        r = tracer.run(case.op, problem, inputs, out_shape, DTYPE)
    finally:
        tracer.set_sample_stride(1)
    seconds = time.perf_counter() - start
    buffers = tracer.trace()
    sites = tracer.sites() if with_sites else []
    variant = "decode" if "_decode_" in r.kernel else "prefill"
    if sample_stride > 1:
        for b in buffers:
            b.load, b.store = b.load.scaled(sample_stride), b.store.scaled(sample_stride)
            if b.name not in SHARED_ACROSS_ROW_BLOCKS:
                b.distinct_read *= sample_stride
    rows = tile_constant(ROWS_IN_FLIGHT[(case.op, variant)])
    weight = next(b for b in buffers if b.name.endswith("_weight"))
    codes_loaded = weight.bytes_read * 8 / case.bits
    return CaseResult(r.kernel, variant, case.T, case.bits, case.quant, touched, sample_stride, seconds,
                      buffers, case.alu_ops(rows, codes_loaded), sites)


def tile_reuse(case: Case, result: CaseResult, b: BufferTraffic) -> float | None:
    if not any(b.name.endswith(s) for s in ("_weight", "_scales", "_biases")) or not b.bytes_read:
        return None
    needed = case.T * case.k * case.weight_bytes_per_expert(b.name)
    return needed / b.bytes_read


def records(case: Case, result: CaseResult) -> list[dict]:
    """The JSON records: one per buffer."""
    out = []
    for b in result.buffers:
        out.append(dict(
            kernel=result.kernel, variant=result.variant, T=result.T, bits=result.bits, quant=result.quant,
            buffer=b.name, sector_efficiency=b.efficiency, reread=b.reread,
            bytes=b.sector_bytes, bytes_used=b.load.bytes_used + b.store.bytes_used,
            distinct_bytes=b.distinct_bytes, bytes_read=b.bytes_read, distinct_read=b.distinct_read,
            bytes_written=b.store.bytes_used + b.store.divergent_bytes,
            load_efficiency=b.load.efficiency, store_efficiency=b.store.efficiency,
            instructions=b.load.instructions + b.store.instructions,
            divergent_accesses=b.load.divergent_accesses + b.store.divergent_accesses,
            tile_reuse=tile_reuse(case, result, b) if result.variant == "prefill" else None,
            experts_touched=result.experts_touched, sample_stride=result.sample_stride,
        ))
    return out


def is_weight(name: str) -> bool:
    return name.endswith(("_weight", "_scales", "_biases"))


def roofline(result: CaseResult) -> dict:
    """Device bytes three ways: every instruction's sectors (no reuse between
    instructions), streamed (weights at their sectors, the small buffers once
    each: they stay in cache), each distinct byte once (the floor)."""
    sector_bytes, distinct = result.total("sector_bytes"), result.total("distinct_bytes")
    streamed = sum(b.sector_bytes if is_weight(b.name) else b.distinct_bytes for b in result.buffers)
    out = dict(sector_bytes=sector_bytes, streamed_bytes=streamed, distinct_bytes=distinct,
               alu_ops=result.alu_ops, ops_per_byte=result.alu_ops / streamed)
    for name, m in MACHINES.items():
        alu_us = result.alu_ops / (m["tops"] * 1e12) * 1e6
        for kind in ("spec", "achievable"):
            bw = m[kind] * 1e9
            for what, nbytes in (("sector", sector_bytes), ("streamed", streamed), ("distinct", distinct)):
                out[f"{name} {kind} us ({what})"] = max(nbytes / bw * 1e6, alu_us)
        out[f"{name} ops/byte balance"] = m["tops"] * 1e12 / (m["achievable"] * 1e9)
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_case(case: Case, result: CaseResult, file=sys.stdout, sites: int = 0) -> None:
    rf = roofline(result)
    print(f"\n## {result.kernel}  T={result.T}  experts touched={result.experts_touched}  "
          f"S={result.sample_stride}  ({result.seconds:.1f} s emulated)", file=file)
    print(f"{'buffer':<16}{'size MB':>9}{'sector MB':>10}{'distinct MB':>12}{'eff':>7}"
          f"{'load eff':>9}{'reread':>11}{'reuse':>7}{'div':>11}", file=file)
    for b in result.buffers:
        reuse = tile_reuse(case, result, b) if result.variant == "prefill" else None
        print(f"{b.name:<16}{b.size / 1e6:>9.3f}{b.sector_bytes / 1e6:>10.3f}{b.distinct_bytes / 1e6:>12.3f}"
              f"{fmt(b.efficiency):>7}{fmt(b.load.efficiency):>9}{fmt(b.reread, '.2f'):>11}{fmt(reuse, '.2f'):>7}"
              f"{b.load.divergent_accesses + b.store.divergent_accesses:>11}", file=file)
    print(f"total: {rf['sector_bytes'] / 1e6:.2f} MB at sector granularity, {rf['streamed_bytes'] / 1e6:.2f} MB "
          f"streamed, {rf['distinct_bytes'] / 1e6:.2f} MB distinct; ALU ~{rf['alu_ops'] / 1e9:.3f} G ops "
          f"({rf['ops_per_byte']:.2f} ops per streamed byte; balance M2 Max {rf['M2 Max ops/byte balance']:.1f}, "
          f"M3 Ultra {rf['M3 Ultra ops/byte balance']:.1f})", file=file)
    for name in MACHINES:
        print(f"roofline {name} (streamed / sector / distinct bytes): "
              f"{rf[f'{name} spec us (streamed)']:.1f} us at spec, "
              f"{rf[f'{name} achievable us (streamed)']:.1f} / {rf[f'{name} achievable us (sector)']:.1f} / "
              f"{rf[f'{name} achievable us (distinct)']:.1f} us achievable", file=file)
    if sites:
        print("  sites (top by sector bytes): where, buffer, load/store, instructions, efficiency", file=file)
        top = sorted(result.sites, key=lambda s: -s.accesses.sectors)[:sites]
        for s in top:
            print(f"    {s.where:<48} {s.buffer:<15} {'st' if s.store else 'ld'} "
                  f"{s.accesses.instructions:>9} {fmt(s.accesses.efficiency)}", file=file)


def markdown(results: list[tuple[Case, CaseResult]]) -> str:
    """The summary table of metal/README.md: weights, activations, reuse and
    the streamed roofline per case."""
    head = ("| kernel | T | quant | experts | codes eff / reread | scales eff / reread | biases eff / reread "
            "| x or h eff / reread | tile reuse | streamed MB | M2 Max us | M3 Ultra us | S |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case, r in results:
        b = {x.name.split("_")[-1]: x for x in r.buffers if is_weight(x.name)}
        b.update({x.name: x for x in r.buffers if not is_weight(x.name)})
        act = b["x" if case.op == "gate_up" else "h"]
        rf = roofline(r)
        cells = [f"{fmt(b[n].load.efficiency, '.2f')} / {fmt(b[n].reread, '.2f')}" if n in b else "- (none)"
                 for n in ("weight", "scales", "biases")]
        reuse = tile_reuse(case, r, b["weight"]) if r.variant == "prefill" else None
        lines.append(
            f"| {r.kernel} | {r.T} | {r.quant} | {r.experts_touched} | " + " | ".join(cells)
            + f" | {fmt(act.load.efficiency, '.3f')} / {fmt(act.reread, '.0f')} | {fmt(reuse, '.2f')} "
            f"| {rf['streamed_bytes'] / 1e6:.1f} | {rf['M2 Max achievable us (streamed)']:.0f} "
            f"| {rf['M3 Ultra achievable us (streamed)']:.0f} | {r.sample_stride} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the per-buffer records here")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--quants", nargs="+", default=list(QUANTS), choices=list(QUANTS),
                    help="affine b<bits> at group size 64, or an fp mode (default: all)")
    ap.add_argument("--ops", nargs="+", default=["gate_up", "down"], choices=["gate_up", "down"])
    ap.add_argument("--sample-512", type=int, default=64,
                    help="at T >= 512 trace every S-th row block only (default 64)")
    ap.add_argument("--sites", type=int, default=0, help="list the top N load/store sites per case")
    ap.add_argument("--markdown", action="store_true", help="end with the summary table of metal/README.md")
    ap.add_argument("--cache", type=Path, default=ROOT / ".pytest_cache" / "metal_traffic")
    args = ap.parse_args(argv)
    if not compiler_available(trace=True):
        print(f"traffic: {TRACE_CXX} not found (the traffic build needs clang 19)", file=sys.stderr)
        return 2
    tracer = Tracer(args.cache)
    print(ASSUMPTIONS)
    all_records, results = [], []
    for T in args.tokens:
        for quant in args.quants:
            mode, bits, group = QUANTS[quant]
            for op in args.ops:
                case = Case(op, T, bits, group=group, mode=mode)
                result = run_case(tracer, case, args.sample_512 if T >= 512 else 1)
                print_case(case, result, sites=args.sites)
                results.append((case, result))
                sys.stdout.flush()
                recs = records(case, result)
                rf = roofline(result)
                for r in recs:
                    r["roofline"] = rf
                all_records += recs
    if args.markdown:
        print("\n" + markdown(results))
    if args.json:
        args.json.write_text(json.dumps(all_records, indent=1))
        print(f"\nwrote {len(all_records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
