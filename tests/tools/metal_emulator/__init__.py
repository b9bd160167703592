"""The Metal emulator: runs the Metal kernels on Linux, compiled as C++.

``build()`` compiles the kernel source exactly as it ships, the string
``fused_moe._ext.metal_source()`` embedded in the extension at build time
(not the files on disk), with the MSL-subset header in ``include/`` plus
``emulator_runtime.cpp`` and the host launch plan
(``csrc/metal/launch_plan.cpp``) into a shared library, cached by a hash of
every source. ``gate_up_swiglu``, ``down_combine`` and ``route`` mirror the
ops in ``fused_moe``: they take the Primitive inputs a GPU stream would get
(from ``fused_moe._ext.*_metal_inputs``, the op's own host code), and run the
launch plan over guarded buffers. See README.md for what this proves and
what it cannot.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from fused_moe import _ext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
RUNTIME_SOURCES = [HERE / "emulator_runtime.cpp", ROOT / "csrc" / "metal" / "launch_plan.cpp"]
CXX = os.environ.get("CXX", "g++")
# -O2: the kernels are plain scalar loops here; -Wno-attributes: Metal's
# [[buffer(n)]] and friends mean nothing to g++; _FORTIFY_SOURCE's longjmp
# check rejects the fiber switches.
CXXFLAGS = [
    "-std=c++20", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-attributes",
    "-Wno-unused-parameter", "-Wno-unused-variable", "-U_FORTIFY_SOURCE",
    "-fno-fast-math",
]
# The traffic build (traffic.py): clang's load/store tracing on the kernel
# translation units only (the ignorelist names the others), hooks in
# trace_hooks.cpp, the probe kernels of trace_probes.metal. No vectorizing,
# so each load in the source stays one traced load of its own width.
TRACE_CXX = os.environ.get("FUSED_MOE_TRACE_CXX", "clang++-19")
TRACE_CXXFLAGS = [
    "-fsanitize-coverage=inline-8bit-counters,trace-loads,trace-stores",
    f"-fsanitize-coverage-ignorelist={HERE / 'trace_ignorelist.txt'}",
    "-fno-vectorize", "-fno-slp-vectorize", "-gline-tables-only",
]
TRACE_KERNEL_SOURCES = [HERE / "trace_probes.metal"]
TRACE_RUNTIME_SOURCES = [HERE / "trace_hooks.cpp"]
# Worker processes per kernel run (threadgroups are dealt round robin).
WORKERS = int(os.environ.get("FUSED_MOE_EMULATOR_WORKERS", str(min(4, os.cpu_count() or 1))))


def kernel_source() -> str:
    """The kernels' translation unit as the extension ships it."""
    return _ext.metal_source()


def sources() -> list[Path]:
    """The files the library is built from besides kernel_source(): the
    emulator and the host launch plan, with the metal/ headers the launch
    plan shares with the kernels."""
    files = sorted((ROOT / "metal").glob("*.h"))
    files += sorted((HERE / "include").iterdir()) + RUNTIME_SOURCES
    files += [ROOT / "csrc" / "metal" / "launch_plan.h"]
    return files


def compiler_available(trace: bool = False) -> bool:
    return shutil.which(TRACE_CXX if trace else CXX) is not None


def build(cache_dir: Path, source: str | None = None, trace: bool = False) -> Path:
    """Compiles the emulator library unless a build of these sources exists.
    `source` replaces kernel_source(), e.g. with one kernel's source
    (``_ext.metal_kernel_source``), as a GPU stream compiles it; `trace`
    makes the traffic build (a library of its own)."""
    source = kernel_source() if source is None else source
    cxx, flags = (TRACE_CXX, CXXFLAGS + TRACE_CXXFLAGS) if trace else (CXX, CXXFLAGS)
    extra_kernels, extra_runtime = (TRACE_KERNEL_SOURCES, TRACE_RUNTIME_SOURCES) if trace else ([], [])
    digest = hashlib.sha256(" ".join([cxx, *flags]).encode())
    digest.update(source.encode())
    for f in sources() + extra_kernels + extra_runtime + ([HERE / "trace_ignorelist.txt"] if trace else []):
        digest.update(f.name.encode() + f.read_bytes())
    kind = "traffic" if trace else "emulator"
    out = Path(cache_dir) / f"libfused_moe_metal_{kind}-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    # The string goes to a file only because the compiler reads files.
    kernels = out.with_suffix(f".{os.getpid()}.metal")
    kernels.write_text(source)
    cmd = [
        cxx, *flags, f"-I{HERE / 'include'}", f"-I{ROOT}", f"-I{ROOT / 'csrc'}",
        "-x", "c++", str(kernels), *map(str, extra_kernels),
        "-x", "none", *map(str, RUNTIME_SOURCES + extra_runtime), "-o", str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    kernels.unlink()
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the Metal emulator failed ({' '.join(cmd)}):\n{proc.stderr[-8000:]}"
        )
    tmp.replace(out)
    return out


def dtype_name(dtype: mx.Dtype) -> str:
    """MLX's own spelling, which is also the kernels' ("bfloat16")."""
    return str(dtype).rsplit(".", 1)[-1]


class EmulatorError(RuntimeError):
    """A kernel failed in the emulator: out-of-bounds access, divergence, ..."""


@dataclass
class Result:
    out: mx.array
    kernel: str


def _raw(a: mx.array) -> np.ndarray:
    """The bytes of a row-contiguous array, as numpy (bfloat16 via uint16)."""
    a = mx.contiguous(a)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=False)).reshape(-1)


class Emulator:
    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        lib.fm_emu_buffer_alloc.restype = ctypes.c_void_p
        lib.fm_emu_buffer_alloc.argtypes = [ctypes.c_size_t]
        lib.fm_emu_buffer_free.argtypes = [ctypes.c_void_p]
        lib.fm_emu_kernel_name.restype = ctypes.c_char_p
        lib.fm_emu_kernel_name.argtypes = [ctypes.c_int]
        lib.fm_emu_run.argtypes = [ctypes.c_char_p] * 2 + [ctypes.c_int] * 7 + [
            ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int,
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
        ]
        self.lib = lib
        self.kernels_run: set[str] = set()

    def kernel_names(self) -> list[str]:
        return [self.lib.fm_emu_kernel_name(i).decode() for i in range(self.lib.fm_emu_kernel_count())]

    def run(self, op: str, problem: dict, inputs: list, out_shape, out_dtype) -> Result:
        """Runs the launch plan of `problem` on `inputs` (mx or numpy arrays,
        bound as raw bytes in guarded buffers). The output buffer starts as
        0xFF bytes (NaN), so elements no thread writes show up."""
        outs, name = self.run_outputs(op, problem, inputs, [(out_shape, out_dtype)], out_dtype)
        return Result(outs[0], name)

    def run_outputs(self, op: str, problem: dict, inputs: list, outputs: list, dtype,
                    gate_dtype=mx.float32) -> tuple[list, str]:
        """`run` for any number of outputs, given as (shape, dtype) pairs;
        `dtype` and `gate_dtype` are the Problem's (launch_plan.h). Every
        output starts as 0xFF bytes (NaN, or 2^32 - 1 for uint32)."""
        raws = [_raw(a) if isinstance(a, mx.array) else np.ascontiguousarray(a).reshape(-1) for a in inputs]
        out_bytes = [int(np.prod(shape)) * out_dtype.size for shape, out_dtype in outputs]
        ptrs = []
        try:
            for r in raws:
                p = self.lib.fm_emu_buffer_alloc(r.nbytes)
                if not p:
                    raise MemoryError(f"emulator buffer of {r.nbytes} bytes")
                ctypes.memmove(p, r.ctypes.data, r.nbytes)
                ptrs.append(p)
            out_ptrs = []
            for nbytes in out_bytes:
                p = self.lib.fm_emu_buffer_alloc(nbytes)
                if not p and nbytes:
                    raise MemoryError(f"emulator buffer of {nbytes} bytes")
                ptrs.append(p)
                out_ptrs.append(p)
                ctypes.memset(p, 0xFF, nbytes)
            arr = (ctypes.c_void_p * len(raws))(*ptrs[: len(raws)])
            out_arr = (ctypes.c_void_p * len(out_ptrs))(*out_ptrs)
            kernel = ctypes.create_string_buffer(256)
            err = ctypes.create_string_buffer(4096)
            rc = self.lib.fm_emu_run(
                op.encode(), dtype_name(dtype).encode(), problem["bits"], problem["group_size"],
                problem["tokens"], problem["top_k"], problem["hidden"],
                problem["intermediate"], problem["experts"], dtype_name(gate_dtype).encode(),
                arr, len(raws), out_arr, len(out_ptrs), WORKERS, kernel, 256, err, 4096,
            )
            name = kernel.value.decode()
            if rc != 0:
                raise EmulatorError(err.value.decode())
            self.kernels_run.add(name)
            results = []
            for p, nbytes, (shape, out_dtype) in zip(out_ptrs, out_bytes, outputs):
                host = np.frombuffer(ctypes.string_at(p, nbytes),
                                     dtype=np.uint16 if out_dtype == mx.bfloat16 else
                                     {mx.float16: np.float16, mx.float32: np.float32,
                                      mx.uint32: np.uint32}[out_dtype])
                out = mx.array(host.reshape(shape))
                if out_dtype == mx.bfloat16:
                    out = out.view(mx.bfloat16)
                results.append(out)
            return results, name
        finally:
            for p in ptrs:
                self.lib.fm_emu_buffer_free(p)

    # The ops, as fused_moe has them, on a PackedExperts.

    def gate_up_swiglu(self, x, packed, indices) -> Result:
        w, s, b, bits, gs = packed.projection("gate_up")[:5]
        inputs = _ext.gate_up_swiglu_metal_inputs(x, w, s, b, indices, bits, gs, stream=mx.cpu)
        mx.eval(inputs)
        T, D = inputs[0].shape
        k = inputs[4].shape[1]
        E, two_h, _ = w.shape
        problem = dict(bits=bits, group_size=gs, tokens=T, top_k=k, hidden=D,
                       intermediate=two_h // 2, experts=E)
        r = self.run("gate_up_swiglu", problem, inputs, (T, k, two_h // 2), x.dtype)
        r.out = r.out.reshape(*x.shape[:-1], k, two_h // 2)
        return r

    def down_combine(self, h, packed, indices, weights) -> Result:
        w, s, b, bits, gs = packed.projection("down")[:5]
        inputs = _ext.down_combine_metal_inputs(h, w, s, b, indices, weights, bits, gs, stream=mx.cpu)
        mx.eval(inputs)
        T, k, H = inputs[0].shape
        E, D, _ = w.shape
        problem = dict(bits=bits, group_size=gs, tokens=T, top_k=k, hidden=D,
                       intermediate=H, experts=E)
        r = self.run("down_combine", problem, inputs, (T, D), h.dtype)
        r.out = r.out.reshape(*h.shape[:-2], D)
        return r

    def route(self, x, gate_weight, gate_scales, gate_biases, bias, k, bits, group_size):
        """fused_moe._ext.route's arguments; (indices, weights) in a Result
        whose `out` is that pair."""
        inputs = _ext.route_metal_inputs(
            x, gate_weight, gate_scales, gate_biases, bias, k, bits, group_size, stream=mx.cpu
        )
        mx.eval(inputs)
        T, D = inputs[0].shape
        E = inputs[1].shape[0]
        problem = dict(bits=bits or 0, group_size=group_size or 0, tokens=T, top_k=k, hidden=D,
                       intermediate=0, experts=E)
        lead = x.shape[:-1]
        outs, name = self.run_outputs(
            "route", problem, inputs, [((T, k), mx.uint32), ((T, k), mx.float32)], x.dtype,
            gate_dtype=mx.float32 if bits else gate_weight.dtype,
        )
        return Result(tuple(o.reshape(*lead, k) for o in outs), name)
