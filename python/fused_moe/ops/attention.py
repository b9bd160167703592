"""Attention on fused_moe's own CPU kernels.

:func:`scaled_dot_product_attention` is an MLX primitive from the native
extension: ``softmax(q·kᵀ·scale)·v`` with grouped-query heads, reading a KV
cache's slice in place, every head of a group (and at prefill every query
row of a tile) sharing each key and value row as it is read; at decode the
keys are split in chunks across the threads and the partial softmaxes
merged in a fixed order, so any thread count gives the same bits.
:func:`quantized_scaled_dot_product_attention` is the same over mlx-lm's
quantized KV cache (``QuantizedKVCache``, ``kv_bits`` 4 or 8), its codes
dequantized in registers as they are read.
MLX's own CPU attention takes about 17 ms per MiniMax layer at 1k context
here, and its quantized one about 20 times the fused kernel at 4k.
:func:`norm_rope` does the q/k RMSNorm and the rotary embedding in one
op per projection, where MLX runs three, each with its own overhead.

On a GPU stream the ops are MLX's own fused attention, RMSNorm and RoPE,
already fast there, and for a quantized cache its quantized matmuls as
mlx-lm composes them.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from fused_moe import _ext
from fused_moe.ops.common import StreamLike
from fused_moe.supported import (
    ATTENTION_HEAD_DIM_MULTIPLE,
    MAX_ATTENTION_HEAD_DIM,
    SUPPORTED_GROUP_SIZES,
    SUPPORTED_KV_CACHE_BITS,
)


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: Optional[str] = None,
    stream: StreamLike = None,
) -> mx.array:
    """``softmax(q·kᵀ·scale)·v``, what ``mx.fast.scaled_dot_product_attention``
    computes for ``mask`` None or ``"causal"``.

    Args:
        q: ``[B, Hq, L, Dh]``, float16, bfloat16 or float32.
        k, v: ``[B, Hkv, S, Dh]`` in the dtype of ``q``, ``Hq`` a multiple of
            ``Hkv`` (grouped-query attention); any strides, so a KV cache's
            slice is read where it lies.
        scale: multiplies ``q·kᵀ``.
        mask: ``None`` (every query sees every key) or ``"causal"`` (query row
            ``l`` sees keys ``0 .. S - L + l``: the queries are the last ``L``
            positions).

    ``Dh`` is a multiple of ``ATTENTION_HEAD_DIM_MULTIPLE`` (16) up to
    ``MAX_ATTENTION_HEAD_DIM`` (512). Returns
    ``[B, Hq, L, Dh]`` in the dtype of ``q``; the arithmetic is fp32.
    """
    return _ext.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)


def quantized_scaled_dot_product_attention(
    q: mx.array,
    k: tuple[mx.array, mx.array, mx.array],
    v: tuple[mx.array, mx.array, mx.array],
    *,
    scale: float,
    mask: Optional[str] = None,
    bits: int,
    group_size: int,
    stream: StreamLike = None,
) -> mx.array:
    """:func:`scaled_dot_product_attention` over a quantized KV cache, what
    mlx-lm's ``quantized_scaled_dot_product_attention`` computes (in fp32
    here, where mlx-lm's scores are in the dtype of ``q``).

    Args:
        q: ``[B, Hq, L, Dh]``, float16, bfloat16 or float32.
        k, v: ``(codes, scales, biases)`` as ``QuantizedKVCache`` holds them
            (``mx.quantize`` along ``Dh``): codes ``[B, Hkv, S, Dh*bits/32]``
            uint32, scales and biases ``[B, Hkv, S, Dh/group_size]`` in the
            dtype of ``q``; any strides, so the cache's slices are read where
            they lie.
        scale, mask: as :func:`scaled_dot_product_attention`.
        bits: 4 or 8 (``SUPPORTED_KV_CACHE_BITS``).
        group_size: 32, 64 or 128, dividing ``Dh``.

    Returns ``[B, Hq, L, Dh]`` in the dtype of ``q``.
    """
    return _ext.quantized_scaled_dot_product_attention(
        q, *k, *v, scale=scale, mask=mask, bits=bits, group_size=group_size, stream=stream)


def kv_cache_supported(cache: Any) -> bool:
    """Whether the fused kernel reads this KV cache: a float one, or a
    quantized one at SUPPORTED_KV_CACHE_BITS and a supported group size."""
    if not hasattr(cache, "bits"):
        return True
    return cache.bits in SUPPORTED_KV_CACHE_BITS and cache.group_size in SUPPORTED_GROUP_SIZES


def norm_rope(
    x: mx.array,
    weight: Optional[mx.array],
    *,
    heads: int,
    eps: float,
    rotary_dim: int,
    base: float,
    traditional: bool = False,
    scale: float = 1.0,
    offset: int = 0,
    stream: StreamLike = None,
) -> mx.array:
    """An attention projection's RMSNorm and rotary embedding in one op, with
    the heads split out: what ``mx.fast.rms_norm``, the reshape to
    ``[B, heads, L, Dh]`` and ``mx.fast.rope`` compute in turn.

    Args:
        x: ``[B, L, heads * Dh]``, float16, bfloat16 or float32.
        weight: ``[heads * Dh]``, the norm's weight over the whole row (as
            MiniMax's ``q_norm``/``k_norm`` span all heads); ``None``: no norm.
        rotary_dim, base, traditional, scale: as ``nn.RoPE``; the rotation
            covers the first ``rotary_dim`` (even) values of each head.
        offset: the position of the first of the ``L`` tokens.

    Returns ``[B, heads, L, Dh]`` in the dtype ``mx.fast.rms_norm`` gives;
    fp32 arithmetic, angles in fp64.
    """
    return _ext.norm_rope(x, weight, heads=heads, eps=eps, rotary_dim=rotary_dim, traditional=traditional,
                          base=base, scale=scale, offset=offset, stream=stream)


def head_dim_unsupported(head_dim: int) -> Optional[str]:
    """Why the attention kernel cannot take heads of this size, or None."""
    if head_dim % ATTENTION_HEAD_DIM_MULTIPLE or head_dim > MAX_ATTENTION_HEAD_DIM:
        return (f"head_dim {head_dim}; supported: a multiple of {ATTENTION_HEAD_DIM_MULTIPLE} up to "
                f"{MAX_ATTENTION_HEAD_DIM}")
    return None
