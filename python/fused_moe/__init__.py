"""fused_moe: fused low-bit Mixture-of-Experts kernels for MLX."""

from fused_moe._version import __version__
from fused_moe import _ext
from fused_moe.format import FORMAT_VERSION
from fused_moe.attention import (
    SUPPORTED_KV_CACHE_BITS,
    MiniMaxAttention,
    norm_rope,
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)
from fused_moe.convert import ConversionError, convert
from fused_moe.layer import MiniMaxMoE
from fused_moe.linear import (
    SUPPORTED_LINEAR_BITS,
    QuantizedEmbedding,
    QuantizedLinear,
    quantized_embedding,
    quantized_matmul,
)
from fused_moe.loading import load
from fused_moe.ops import down_combine, gate_up_swiglu
from fused_moe.packing import (
    SUPPORTED_BITS,
    SUPPORTED_DTYPES,
    SUPPORTED_GROUP_SIZES,
    PackedExperts,
    QuantizedProjection,
    pack_experts,
    unpack_experts,
)
from fused_moe.patch import patch
from fused_moe.router import SUPPORTED_ROUTER_BITS, route
from fused_moe.sharding import shard

MIN_TOP_K = _ext.MIN_TOP_K
MAX_TOP_K = _ext.MAX_TOP_K


def set_num_threads(n: int) -> None:
    """Sets the threads used by the CPU kernels (default: ``FUSED_MOE_NUM_THREADS``
    or all hardware threads). Results are bit-identical for any count."""
    _ext.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    return _ext.get_num_threads()


def cpu_isa() -> str:
    """The CPU kernel build in use: ``"avx512"``, ``"avx2"`` or ``"generic"``.
    ``FUSED_MOE_ISA`` forces a lower level."""
    return _ext.cpu_isa()


__all__ = [
    "__version__",
    "ConversionError",
    "FORMAT_VERSION",
    "MAX_TOP_K",
    "MIN_TOP_K",
    "MiniMaxAttention",
    "MiniMaxMoE",
    "PackedExperts",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedProjection",
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_GROUP_SIZES",
    "SUPPORTED_KV_CACHE_BITS",
    "SUPPORTED_LINEAR_BITS",
    "SUPPORTED_ROUTER_BITS",
    "convert",
    "cpu_isa",
    "down_combine",
    "gate_up_swiglu",
    "get_num_threads",
    "load",
    "norm_rope",
    "pack_experts",
    "patch",
    "quantized_embedding",
    "quantized_matmul",
    "quantized_scaled_dot_product_attention",
    "route",
    "scaled_dot_product_attention",
    "set_num_threads",
    "shard",
    "unpack_experts",
]
