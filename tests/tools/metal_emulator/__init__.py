"""The Metal emulator: runs the Metal kernels on Linux, compiled as C++.

The allow-list holds over a thousand kernels (metal/allow_list.h), and a GPU
stream compiles one of them on its first use. The emulator does likewise: an
``Emulator`` loads one runtime library (``emulator_runtime.cpp`` and the host
launch plan ``csrc/metal/launch_plan.cpp``) and, the first time it is asked
to run a kernel, builds that kernel's family (the same op, activation and
quantization at both variants and every dtype: six kernels) into a library
of its own linked against the runtime, cached by a hash of every input. The
family's source is the embedded one with each kernel's own instantiation
line (``fused_moe._ext.metal_kernel_source``, the very string a Mac compiles
for that kernel; ``tools.metal_kernels.source_of``): one compile parses the
headers once for six kernels. ``gate_up``,
``down_combine``, ``down_slots`` and ``route`` mirror the ops of
``fused_moe._ext``: they take the Primitive inputs a GPU stream would get
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from fused_moe import _ext

from ..metal_kernels import family, source_of

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
# libraries only (the ignorelist names the runtime's sources), hooks in
# trace_hooks.cpp, the probe kernels of trace_probes.metal. No vectorizing,
# so each load in the source stays one traced load of its own width.
TRACE_CXX = os.environ.get("FUSED_MOE_TRACE_CXX", "clang++-19")
TRACE_CXXFLAGS = [
    "-fsanitize-coverage=inline-8bit-counters,trace-loads,trace-stores",
    f"-fsanitize-coverage-ignorelist={HERE / 'trace_ignorelist.txt'}",
    "-fno-vectorize", "-fno-slp-vectorize", "-gline-tables-only",
]
TRACE_RUNTIME_SOURCES = [HERE / "trace_hooks.cpp"]
PROBE_SOURCE = HERE / "trace_probes.metal"
# Worker processes per kernel run (threadgroups are dealt round robin).
WORKERS = int(os.environ.get("FUSED_MOE_EMULATOR_WORKERS", str(min(4, os.cpu_count() or 1))))
# Kernel libraries built at once by prebuild().
BUILD_JOBS = int(os.environ.get("FUSED_MOE_EMULATOR_BUILD_JOBS", str(os.cpu_count() or 1)))


def kernel_source(kernel: str | None = None) -> str:
    """The kernels' translation unit as the extension ships it: the whole
    allow-list, or one kernel's source as a GPU stream compiles it."""
    return _ext.metal_source() if kernel is None else _ext.metal_kernel_source(kernel)


def header_sources() -> list[Path]:
    """The files every build reads besides the kernel source: the metal/
    headers the launch plan shares with the kernels, the emulator's MSL
    header and the supported grid."""
    files = sorted((ROOT / "metal").glob("*.h"))
    files += sorted((HERE / "include").iterdir())
    files += [ROOT / "csrc" / "metal" / "launch_plan.h", ROOT / "csrc" / "supported.h"]
    return files


def compiler_available(trace: bool = False) -> bool:
    return shutil.which(TRACE_CXX if trace else CXX) is not None


def _toolchain(trace: bool) -> tuple[str, list[str]]:
    return (TRACE_CXX, CXXFLAGS + TRACE_CXXFLAGS) if trace else (CXX, CXXFLAGS)


def _digest(trace: bool, files: list[Path], *texts: str) -> str:
    cxx, flags = _toolchain(trace)
    digest = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for t in texts:
        digest.update(t.encode() + b"\0")
    for f in files + header_sources():
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def _compile(out: Path, args: list[str], what: str) -> Path:
    """Runs the compiler into a temporary file, then renames it into place
    (several processes may build the same library at once)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.{id(args)}.tmp")
    proc = subprocess.run([*args, "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {what} failed ({' '.join(args)}):\n{proc.stderr[-8000:]}")
    tmp.replace(out)
    return out


def build_runtime(cache_dir: Path, trace: bool = False) -> Path:
    """The runtime library (fibers, guard pages, the launch plan; in the
    traffic build also the tracer), built once per set of sources."""
    cxx, flags = _toolchain(trace)
    sources = RUNTIME_SOURCES + (TRACE_RUNTIME_SOURCES if trace else [])
    kind = "traffic" if trace else "emulator"
    # The directory is part of the name, which is also the library's soname:
    # kernel libraries find their runtime by soname, and two runtimes of one
    # process (two cache directories) must not be mistaken for each other.
    cache_dir = Path(cache_dir).resolve()
    digest = _digest(trace, sources + [HERE / "trace_ignorelist.txt"], str(cache_dir))
    name = f"libfm_{kind}_runtime-{digest}.so"
    out = cache_dir / name
    return _compile(out, [cxx, *flags, f"-Wl,-soname,{name}", f"-I{HERE / 'include'}", f"-I{ROOT}",
                          f"-I{ROOT / 'csrc'}", *map(str, sources)], f"the {kind} runtime")


def build_kernels(cache_dir: Path, source: str, runtime: Path, trace: bool = False) -> Path:
    """A library of the kernels `source` instantiates (one kernel's source, as
    a rule), linked against `runtime`, whose registry they join when the
    library is loaded."""
    cxx, flags = _toolchain(trace)
    out = Path(cache_dir).resolve() / f"libfm_kernels-{_digest(trace, [], source, runtime.name)}.so"
    if out.exists():
        return out
    # The string goes to a file only because the compiler reads files.
    src = out.with_suffix(f".{os.getpid()}.{abs(hash(source))}.metal")
    out.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(source)
    try:
        return _compile(out, [cxx, *flags, f"-I{HERE / 'include'}", f"-I{ROOT}", f"-I{ROOT / 'csrc'}",
                              "-x", "c++", str(src), "-x", "none", str(runtime),
                              f"-Wl,-rpath,{runtime.parent}"], "Metal kernels for the emulator")
    finally:
        src.unlink(missing_ok=True)


def dtype_name(dtype: mx.Dtype) -> str:
    """MLX's own spelling, which is also the kernels' ("bfloat16")."""
    return str(dtype).rsplit(".", 1)[-1]


class EmulatorError(RuntimeError):
    """A kernel failed in the emulator: out-of-bounds access, divergence, ..."""


@dataclass
class Result:
    out: mx.array
    kernel: str


class _Problem(ctypes.Structure):
    """FmEmuProblem of emulator_runtime.cpp: launch_plan.h's Problem."""

    _fields_ = [(n, ctypes.c_char_p) for n in ("op", "dtype", "mode", "activation", "gate_dtype")] + [
        (n, ctypes.c_int) for n in ("bits", "group_size", "tokens", "top_k", "hidden", "intermediate",
                                    "experts", "bias", "global_scale", "x_per_slot", "combine")
    ] + [(n, ctypes.c_float) for n in ("limit", "alpha", "beta", "linear_beta")]


# A problem's fields and their defaults (launch_plan.h).
PROBLEM_DEFAULTS = dict(mode="affine", activation="swiglu", gate_dtype="float32", bias=False,
                        global_scale=False, x_per_slot=False, combine=True, limit=0.0, alpha=0.0,
                        beta=0.0, linear_beta=0.0)


def _raw(a: mx.array) -> np.ndarray:
    """The bytes of a row-contiguous array, as numpy (bfloat16 via uint16)."""
    a = mx.contiguous(a)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=False)).reshape(-1)


def plan_of(op: str, dtype: mx.Dtype, problem: dict) -> dict:
    """The launch plan the host makes for `problem` (the same C++ the
    emulator's runtime runs)."""
    p = {**PROBLEM_DEFAULTS, **problem}
    return _ext.metal_launch_plan(
        op, dtype_name(dtype), p["bits"], p["group_size"], p["tokens"], p["top_k"], p["hidden"],
        p["intermediate"], p["experts"], p["gate_dtype"], mode=p["mode"], activation=p["activation"],
        bias=p["bias"], global_scale=p["global_scale"], x_per_slot=p["x_per_slot"], combine=p["combine"],
        limit=p["limit"], alpha=p["alpha"], beta=p["beta"], linear_beta=p["linear_beta"],
    )


class Emulator:
    """The emulator runtime and the kernel libraries loaded into it.

    `cache_dir` holds the built libraries. `source` (default: none) is a
    translation unit whose kernels are all loaded at once (a planted source,
    the whole allow-list); otherwise each kernel is built on its first run
    from its own source, as a GPU stream compiles it."""

    def __init__(self, cache_dir: Path, source: str | None = None, trace: bool = False):
        self.cache_dir = Path(cache_dir)
        self.trace_build = trace
        self.runtime = build_runtime(self.cache_dir, trace)
        lib = ctypes.CDLL(str(self.runtime))
        lib.fm_emu_buffer_alloc.restype = ctypes.c_void_p
        lib.fm_emu_buffer_alloc.argtypes = [ctypes.c_size_t]
        lib.fm_emu_buffer_free.argtypes = [ctypes.c_void_p]
        lib.fm_emu_kernel_name.restype = ctypes.c_char_p
        lib.fm_emu_kernel_name.argtypes = [ctypes.c_int]
        lib.fm_emu_has_kernel.argtypes = [ctypes.c_char_p]
        lib.fm_emu_run.argtypes = [
            ctypes.POINTER(_Problem), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int,
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
        ]
        lib.fm_emu_run_kernel.argtypes = [
            ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
            ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
        ]
        self.lib = lib
        self._loaded: dict[str, ctypes.CDLL] = {}  # library path -> handle
        self.library_of: dict[str, Path] = {}  # kernel -> its library
        self.kernels_run: set[str] = set()
        if source is not None:
            self._load(build_kernels(self.cache_dir, source, self.runtime, trace))

    def _load(self, library: Path) -> None:
        if str(library) in self._loaded:
            return
        before = set(self.kernel_names())
        self._loaded[str(library)] = ctypes.CDLL(str(library))
        for name in set(self.kernel_names()) - before:
            self.library_of[name] = library

    def kernel_names(self) -> list[str]:
        """The kernels loaded so far."""
        return [self.lib.fm_emu_kernel_name(i).decode() for i in range(self.lib.fm_emu_kernel_count())]

    def _build_family(self, kernel: str) -> Path:
        return build_kernels(self.cache_dir, source_of(family(kernel)), self.runtime, self.trace_build)

    def ensure(self, kernel: str) -> None:
        """Builds (or finds in the cache) and loads the library of `kernel`'s
        family."""
        if not self.lib.fm_emu_has_kernel(kernel.encode()):
            self._load(self._build_family(kernel))

    def prebuild(self, kernels, jobs: int = BUILD_JOBS) -> None:
        """Builds the libraries of `kernels`' families `jobs` at a time and
        loads them."""
        todo = {tuple(family(k)) for k in kernels if not self.lib.fm_emu_has_kernel(k.encode())}
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            libraries = list(pool.map(lambda f: self._build_family(f[0]), sorted(todo)))
        for library in libraries:
            self._load(library)

    def run(self, op: str, problem: dict, inputs: list, out_shape, out_dtype) -> Result:
        """Runs the launch plan of `problem` on `inputs` (mx or numpy arrays,
        bound as raw bytes in guarded buffers). The output buffer starts as
        0xFF bytes (NaN), so elements no thread writes show up."""
        outs, name = self.run_outputs(op, problem, inputs, [(out_shape, out_dtype)], out_dtype)
        return Result(outs[0], name)

    def run_outputs(self, op: str, problem: dict, inputs: list, outputs: list, dtype) -> tuple[list, str]:
        """`run` for any number of outputs, given as (shape, dtype) pairs;
        `dtype` and the keys of `problem` are the Problem's (launch_plan.h;
        PROBLEM_DEFAULTS for those left out). Every output starts as 0xFF
        bytes (NaN, or 2^32 - 1 for uint32)."""
        p = {**PROBLEM_DEFAULTS, **problem}
        if isinstance(p["gate_dtype"], mx.Dtype):
            p["gate_dtype"] = dtype_name(p["gate_dtype"])
        try:
            kernel = plan_of(op, dtype, p)["kernel"]
        except ValueError as e:
            raise EmulatorError(str(e)) from None
        self.ensure(kernel)
        c_problem = _Problem(
            op.encode(), dtype_name(dtype).encode(), p["mode"].encode(), p["activation"].encode(),
            p["gate_dtype"].encode(),
            *(int(p[n]) for n in ("bits", "group_size", "tokens", "top_k", "hidden", "intermediate", "experts",
                                  "bias", "global_scale", "x_per_slot", "combine")),
            *(float(p[n]) for n in ("limit", "alpha", "beta", "linear_beta")),
        )
        raws = [_raw(a) if isinstance(a, mx.array) else np.ascontiguousarray(a).reshape(-1) for a in inputs]
        out_bytes = [int(np.prod(shape)) * out_dtype.size for shape, out_dtype in outputs]
        ptrs = []
        try:
            for r in raws:
                ptr = self.lib.fm_emu_buffer_alloc(r.nbytes)
                if not ptr:
                    raise MemoryError(f"emulator buffer of {r.nbytes} bytes")
                ctypes.memmove(ptr, r.ctypes.data, r.nbytes)
                ptrs.append(ptr)
            out_ptrs = []
            for nbytes in out_bytes:
                ptr = self.lib.fm_emu_buffer_alloc(nbytes)
                if not ptr and nbytes:
                    raise MemoryError(f"emulator buffer of {nbytes} bytes")
                ptrs.append(ptr)
                out_ptrs.append(ptr)
                ctypes.memset(ptr, 0xFF, nbytes)
            arr = (ctypes.c_void_p * len(raws))(*ptrs[: len(raws)])
            out_arr = (ctypes.c_void_p * len(out_ptrs))(*out_ptrs)
            kernel_out = ctypes.create_string_buffer(256)
            err = ctypes.create_string_buffer(4096)
            rc = self.lib.fm_emu_run(ctypes.byref(c_problem), arr, len(raws), out_arr, len(out_ptrs),
                                     WORKERS, kernel_out, 256, err, 4096)
            name = kernel_out.value.decode()
            self._after_run(name)
            if rc != 0:
                raise EmulatorError(err.value.decode())
            self.kernels_run.add(name)
            results = []
            for ptr, nbytes, (shape, out_dtype) in zip(out_ptrs, out_bytes, outputs):
                host = np.frombuffer(ctypes.string_at(ptr, nbytes),
                                     dtype=np.uint16 if out_dtype == mx.bfloat16 else
                                     {mx.float16: np.float16, mx.float32: np.float32,
                                      mx.uint32: np.uint32}[out_dtype])
                out = mx.array(host.reshape(shape))
                if out_dtype == mx.bfloat16:
                    out = out.view(mx.bfloat16)
                results.append(out)
            return results, name
        finally:
            for ptr in ptrs:
                self.lib.fm_emu_buffer_free(ptr)

    def run_plan(self, plan: dict, inputs: list, outputs: list, args: bytes | None = None) -> list:
        """Runs a launch plan (a dict of _ext.metal_launch_plan) as given,
        binding inputs, outputs ((shape, dtype) pairs, 0xFF-filled) and
        `args` (default: the plan's) by its slots, absent inputs as buffers
        of no bytes; for tests that bend a plan. Returns the outputs."""
        self.ensure(plan["kernel"])
        args = plan["args"] if args is None else args
        ptrs, names = [], []
        try:
            for slot, name, source, index in plan["buffers"]:
                if source == "input":
                    raw = _raw(inputs[index]) if isinstance(inputs[index], mx.array) else np.asarray(inputs[index])
                    data = raw.tobytes()
                elif source == "output":
                    shape, dtype = outputs[index]
                    data = b"\xff" * (int(np.prod(shape)) * dtype.size)
                elif source == "args":
                    data = bytes(args)
                else:
                    data, name = b"", f"{name} (absent)"
                ptr = self.lib.fm_emu_buffer_alloc(len(data))
                ctypes.memmove(ptr, data, len(data))
                ptrs.append(ptr)
                names.append(name.encode())
            err = ctypes.create_string_buffer(4096)
            grid = (ctypes.c_uint32 * 3)(*plan["threadgroups"])
            rc = self.lib.fm_emu_run_kernel(
                plan["kernel"].encode(), grid, int(np.prod(plan["threads_per_threadgroup"])),
                (ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_char_p * len(names))(*names), len(ptrs),
                WORKERS, err, 4096)
            if rc != 0:
                raise EmulatorError(err.value.decode())
            out = []
            for (slot, name, source, index), ptr in zip(plan["buffers"], ptrs):
                if source == "output":
                    shape, dtype = outputs[index]
                    raw = ctypes.string_at(ptr, int(np.prod(shape)) * dtype.size)
                    host = np.frombuffer(raw, dtype={mx.float32: np.float32, mx.float16: np.float16,
                                                     mx.bfloat16: np.uint16, mx.uint32: np.uint32}[dtype])
                    a = mx.array(host.reshape(shape))
                    out.append(a.view(mx.bfloat16) if dtype == mx.bfloat16 else a)
            return out
        finally:
            for ptr in ptrs:
                self.lib.fm_emu_buffer_free(ptr)

    def _after_run(self, kernel: str) -> None:
        """Hook for the traffic build (traffic.Tracer)."""

    # The ops, with the arguments of fused_moe._ext's (minus stream).

    def gate_up(self, x, weight, scales, biases, indices, bits, group_size, *, mode="affine",
                activation="swiglu", limit=None, alpha=None, beta=None, linear_beta=None, bias=None,
                global_scale=None) -> Result:
        act = dict(limit=limit, alpha=alpha, beta=beta, linear_beta=linear_beta)
        inputs = _ext.gate_up_metal_inputs(x, weight, scales, biases, indices, bits, group_size, mode=mode,
                                           activation=activation, bias=bias, global_scale=global_scale,
                                           stream=mx.cpu, **act)
        mx.eval(inputs)
        resolved = _ext.metal_activation_args(activation, **act)
        x_per_slot = tuple(x.shape[:-1]) == tuple(indices.shape)
        T, k = inputs[4 if mode == "affine" else 3].shape
        rows = weight.shape[1]
        H = rows // 2 if resolved["activation"] in _ext.GATED_ACTIVATIONS else rows
        problem = dict(bits=bits, group_size=group_size, tokens=T, top_k=k, hidden=x.shape[-1],
                       intermediate=H, experts=weight.shape[0], mode=mode, bias=bias is not None,
                       global_scale=global_scale is not None, x_per_slot=x_per_slot, **resolved)
        r = self.run("gate_up", problem, inputs, (T, k, H), x.dtype)
        lead = x.shape[:-2] if x_per_slot else x.shape[:-1]
        r.out = r.out.reshape(*lead, k, H)
        return r

    def _down(self, h, weight, scales, biases, indices, weights, bits, group_size, mode, bias,
              global_scale) -> Result:
        inputs = _ext.down_metal_inputs(h, weight, scales, biases, indices, weights, bits, group_size,
                                        mode=mode, bias=bias, global_scale=global_scale, stream=mx.cpu)
        mx.eval(inputs)
        T, k, H = inputs[0].shape
        E, D = weight.shape[:2]
        combine = weights is not None
        problem = dict(bits=bits, group_size=group_size, tokens=T, top_k=k, hidden=D, intermediate=H,
                       experts=E, mode=mode, bias=bias is not None, global_scale=global_scale is not None,
                       combine=combine)
        r = self.run("down", problem, inputs, (T, D) if combine else (T, k, D), h.dtype)
        r.out = r.out.reshape(*h.shape[:-2], D) if combine else r.out.reshape(*h.shape[:-1], D)
        return r

    def down_combine(self, h, weight, scales, biases, indices, weights, bits, group_size, *,
                     mode="affine", bias=None, global_scale=None) -> Result:
        return self._down(h, weight, scales, biases, indices, weights, bits, group_size, mode, bias,
                          global_scale)

    def down_slots(self, h, weight, scales, biases, indices, bits, group_size, *, mode="affine",
                   bias=None, global_scale=None) -> Result:
        return self._down(h, weight, scales, biases, indices, None, bits, group_size, mode, bias,
                          global_scale)

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
                       intermediate=0, experts=E,
                       gate_dtype=mx.float32 if bits else gate_weight.dtype)
        lead = x.shape[:-1]
        outs, name = self.run_outputs(
            "route", problem, inputs, [((T, k), mx.uint32), ((T, k), mx.float32)], x.dtype,
        )
        return Result(tuple(o.reshape(*lead, k) for o in outs), name)

    # The ops on a PackedExperts (affine, swiglu), as fused_moe has them.

    def gate_up_swiglu(self, x, packed, indices) -> Result:
        p = packed.projection(packed.projection_names[0])
        return self.gate_up(x, p.weight, p.scales, p.biases, indices, p.bits, p.group_size, mode=p.mode,
                            bias=p.bias, global_scale=p.global_scale)

    def down_combine_packed(self, h, packed, indices, weights) -> Result:
        p = packed.projection("down")
        return self.down_combine(h, p.weight, p.scales, p.biases, indices, weights, p.bits, p.group_size,
                                 mode=p.mode, bias=p.bias, global_scale=p.global_scale)
