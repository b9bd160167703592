"""fused_moe: fused low-bit Mixture-of-Experts kernels for MLX.

The package is laid out by role, each layer importing only from those below
it:

* ``_ext`` (the native extension), ``supported`` (what the ops accept),
  ``errors``;
* ``packed``: the packed expert format and packing;
* ``ops``: the op wrappers over the extension;
* ``checkpoint``: reading, checking and writing safetensors checkpoints;
* ``quant``: calibrated quantization of one matrix and one layer;
* ``models``: the modules inside mlx-lm models, ``patch``, ``load``, tensor
  parallelism;
* ``convert``: the checkpoint converter;
* ``cli``: the ``fused-moe`` command.

The names below are imported on first use, so ``import fused_moe`` loads
neither the native extension nor mlx-lm nor the converter until a name that
needs them is touched.
"""

from __future__ import annotations

import importlib

from fused_moe._version import __version__

# Public name -> the module that defines it.
_PUBLIC = {
    "FORMAT_VERSION": "fused_moe.packed.spec",
    "ConversionError": "fused_moe.errors",
    "CheckpointError": "fused_moe.errors",
    "SUPPORTED_BITS": "fused_moe.supported",
    "SUPPORTED_DTYPES": "fused_moe.supported",
    "SUPPORTED_GROUP_SIZES": "fused_moe.supported",
    "SUPPORTED_LINEAR_BITS": "fused_moe.supported",
    "SUPPORTED_ROUTER_BITS": "fused_moe.supported",
    "SUPPORTED_KV_CACHE_BITS": "fused_moe.supported",
    "SUPPORTED_MODES": "fused_moe.supported",
    "SUPPORTED_ACTIVATIONS": "fused_moe.supported",
    "MIN_TOP_K": "fused_moe.supported",
    "MAX_TOP_K": "fused_moe.supported",
    "PackedExperts": "fused_moe.packed.experts",
    "QuantizedProjection": "fused_moe.packed.experts",
    "pack_experts": "fused_moe.packed.experts",
    "unpack_experts": "fused_moe.packed.experts",
    "Activation": "fused_moe.ops.experts",
    "gate_up": "fused_moe.ops.experts",
    "gate_up_swiglu": "fused_moe.ops.experts",
    "down_combine": "fused_moe.ops.experts",
    "down_slots": "fused_moe.ops.experts",
    "route": "fused_moe.ops.router",
    "quantized_matmul": "fused_moe.ops.linear",
    "quantized_embedding": "fused_moe.ops.linear",
    "scaled_dot_product_attention": "fused_moe.ops.attention",
    "norm_rope": "fused_moe.ops.attention",
    "quantized_scaled_dot_product_attention": "fused_moe.ops.attention",
    "QuantizedLinear": "fused_moe.models.linear",
    "QuantizedEmbedding": "fused_moe.models.linear",
    "FusedExperts": "fused_moe.models.experts",
    "MiniMaxMoE": "fused_moe.models.minimax_moe",
    "MiniMaxAttention": "fused_moe.models.minimax_attention",
    "patch": "fused_moe.models.patch",
    "load": "fused_moe.models.load",
    "shard": "fused_moe.models.tensor_parallel",
    "convert": "fused_moe.conversion.pipeline",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fused_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def set_num_threads(n: int) -> None:
    """Sets the threads used by the CPU kernels (default: ``FUSED_MOE_NUM_THREADS``
    or all hardware threads). Results are bit-identical for any count."""
    from fused_moe import _ext

    _ext.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    from fused_moe import _ext

    return _ext.get_num_threads()


def cpu_isa() -> str:
    """The CPU kernel build in use: ``"avx512"``, ``"avx2"`` or ``"generic"``.
    ``FUSED_MOE_ISA`` forces a lower level."""
    from fused_moe import _ext

    return _ext.cpu_isa()


__all__ = ["__version__", "cpu_isa", "get_num_threads", "set_num_threads", *sorted(_PUBLIC)]
