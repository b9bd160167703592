"""The backends every kernel case runs on: CPU, the Metal emulator, and real
Metal where MLX has it. Each offers the ops with the signature of
``fused_moe.gate_up_swiglu`` / ``down_combine`` / ``route`` minus ``stream``,
and the raw expert ops of every setting with the signature of
``fused_moe._ext.gate_up`` / ``down_combine`` / ``down_slots`` minus
``stream`` (``ext_gate_up``, ``ext_down_combine``, ``ext_down_slots``).

GPU semantics differ from the CPU in one place: an expert id outside [0, E)
raises from ``mx.eval`` on the CPU, while the Metal kernels cannot raise and
make the affected rows NaN instead (docs/reliability.md, "Bad expert ids").
"""

from __future__ import annotations

import mlx.core as mx

import fused_moe as fm
from fused_moe import _ext
from fused_moe.ops.router import gate_arrays


class StreamBackend:
    """The ops on an MLX stream (CPU, or the real Metal GPU)."""

    compiles = True  # works under mx.compile

    def __init__(self, name: str, stream):
        self.name = name
        self.stream = stream

    def gate_up_swiglu(self, x, packed, indices):
        return fm.gate_up_swiglu(x, packed, indices, stream=self.stream)

    def down_combine(self, h, packed, indices, weights):
        return fm.down_combine(h, packed, indices, weights, stream=self.stream)

    def route(self, x, gate, bias, k):
        return fm.route(x, gate, bias, k, stream=self.stream)

    def ext_gate_up(self, *args, **kw):
        return _ext.gate_up(*args, stream=self.stream, **kw)

    def ext_down_combine(self, *args, **kw):
        return _ext.down_combine(*args, stream=self.stream, **kw)

    def ext_down_slots(self, *args, **kw):
        return _ext.down_slots(*args, stream=self.stream, **kw)

    def attention(self, q, k, v, scale, mask):
        return fm.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=self.stream)

    def norm_rope(self, x, weight, **kw):
        return fm.norm_rope(x, weight, stream=self.stream, **kw)


class EmulatorBackend:
    """The Metal kernels in the Linux emulator. Eager (numpy buffers), so it
    cannot run inside mx.compile; compiled cases run uncompiled here."""

    name = "metal_emulator"
    compiles = False

    def __init__(self, emulator):
        self.emulator = emulator

    def gate_up_swiglu(self, x, packed, indices):
        return self.emulator.gate_up_swiglu(x, packed, indices).out

    def down_combine(self, h, packed, indices, weights):
        return self.emulator.down_combine_packed(h, packed, indices, weights).out

    def route(self, x, gate, bias, k):
        w, scales, biases, bits, group_size = gate_arrays(gate)
        return self.emulator.route(x, w, scales, biases, bias, k, bits, group_size).out

    def ext_gate_up(self, *args, **kw):
        return self.emulator.gate_up(*args, **kw).out

    def ext_down_combine(self, *args, **kw):
        return self.emulator.down_combine(*args, **kw).out

    def ext_down_slots(self, *args, **kw):
        return self.emulator.down_slots(*args, **kw).out


def metal_available() -> bool:
    return mx.metal.is_available()


METAL_MISSING = (
    "Metal backend not available: MLX reports no Metal GPU here "
    "(mx.metal.is_available() is False); the metal_emulator backend covers the kernels"
)
