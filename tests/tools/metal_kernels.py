"""The Metal kernels' names (metal/allow_list.h), read back into their
pieces; their families; the embedded source instantiating any set of them;
and a covering subset of the allow-list for the checks that cannot afford
all of it on every run (the lint's AST).

    gate_up_<activation>_<variant>_<dtype>_<quant>
    down_<variant>_<dtype>_<quant>
    route_<dtype>_gate_<form>

with <quant> "b<bits>_gs<group_size>" (affine) or an fp mode's name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fused_moe import _ext

DTYPES = ("float16", "bfloat16", "float32")
VARIANTS = ("decode", "prefill")


@dataclass(frozen=True)
class KernelName:
    name: str
    op: str  # gate_up, down or route
    variant: str | None = None
    dtype: str = ""
    activation: str | None = None  # gate_up
    quant: str | None = None  # the expert ops
    mode: str | None = None
    bits: int | None = None
    group_size: int | None = None
    gate: str | None = None  # route: the gate form


def quant_of(quant: str) -> tuple[str, int, int]:
    """'b3_gs64' -> ('affine', 3, 64); 'mxfp4' -> ('mxfp4', 4, 32)."""
    if quant in _ext.FP_MODES:
        m = _ext.FP_MODES[quant]
        return quant, m["bits"], m["group_size"]
    bits, gs = quant.split("_gs")
    return "affine", int(bits[1:]), int(gs)


def quant_name(mode: str, bits: int, group_size: int) -> str:
    return f"b{bits}_gs{group_size}" if mode == "affine" else mode


def parse(name: str) -> KernelName:
    if name.startswith("route_"):
        _, dtype, _, gate = name.split("_", 3)
        return KernelName(name, "route", None, dtype, gate=gate)
    for variant in VARIANTS:
        head, sep, tail = name.partition(f"_{variant}_")
        if sep:
            break
    else:
        raise ValueError(f"not a kernel name of metal/allow_list.h: {name!r}")
    dtype, quant = tail.split("_", 1)
    mode, bits, gs = quant_of(quant)
    if head == "down":
        return KernelName(name, "down", variant, dtype, None, quant, mode, bits, gs)
    if not head.startswith("gate_up_"):
        raise ValueError(f"not a kernel name of metal/allow_list.h: {name!r}")
    return KernelName(name, "gate_up", variant, dtype, head[len("gate_up_"):], quant, mode, bits, gs)


def all_quants() -> list[str]:
    return [quant_name(*q) for q in _ext.supported_quantizations()]


def expert_name(op: str, variant: str, dtype: str, quant: str, activation: str | None = None) -> str:
    if op == "gate_up":
        return f"gate_up_{activation}_{variant}_{dtype}_{quant}"
    return f"down_{variant}_{dtype}_{quant}"


def covering_kernels() -> list[str]:
    """A subset of the allow-list (in its order) in which every expert-op
    family (gate_up with each activation, down) appears with both variants,
    and every dtype and every quantization appears, at least once; plus
    every router kernel. 60 of the 1152."""
    families = [("gate_up", a) for a in _ext.SUPPORTED_ACTIVATIONS] + [("down", None)]
    fv = list(itertools.product(families, VARIANTS))
    quants = all_quants()
    n = max(len(fv), len(quants)) * 2
    chosen = set()
    for i in range(n):
        (op, act), variant = fv[i % len(fv)]
        chosen.add(expert_name(op, variant, DTYPES[i % len(DTYPES)], quants[i % len(quants)], act))
    chosen |= {k for k in _ext.metal_kernel_names() if k.startswith("route_")}
    return [k for k in _ext.metal_kernel_names() if k in chosen]


BEGIN = "// fused_moe:instantiations-begin\n"
END = "// fused_moe:instantiations-end"


def split_source(source: str) -> tuple[str, str, str]:
    """(head, instantiation block, tail) of an embedded source."""
    b = source.index(BEGIN) + len(BEGIN)
    e = source.index(END)
    return source[:b], source[b:e], source[e:]


def source_of(kernels) -> str:
    """The embedded source instantiating exactly `kernels`: the head and
    tail of _ext.metal_source() around each kernel's own instantiation line
    (the line of _ext.metal_kernel_source, which a GPU stream compiles
    alone)."""
    head, _, tail = split_source(_ext.metal_source())
    return head + "".join(split_source(_ext.metal_kernel_source(k))[1] for k in kernels) + tail


def family(kernel: str) -> list[str]:
    """The kernels built together with `kernel` by the emulator: the same op,
    activation and quantization at both variants and every dtype (six), or
    every router kernel; in allow-list order."""
    k = parse(kernel)
    if k.op == "route":
        return [n for n in _ext.metal_kernel_names() if n.startswith("route_")]
    names = {expert_name(k.op, v, t, k.quant, k.activation) for v in VARIANTS for t in DTYPES}
    return [n for n in _ext.metal_kernel_names() if n in names]
