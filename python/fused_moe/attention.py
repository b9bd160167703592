"""Attention on fused_moe's own CPU kernel.

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
:func:`norm_rope` does the q/k RMSNorm and the rotary embedding in one op
per projection, where MLX runs three, each with its own overhead.

:class:`MiniMaxAttention` is mlx-lm's attention of the same name on these
ops; same parameters. The cases it does not take go to MLX's own attention,
as stock does them: an array mask (batches with padding), and a quantized
KV cache of bits or group size outside ``SUPPORTED_KV_CACHE_BITS`` and
``SUPPORTED_GROUP_SIZES``.

On a GPU stream the ops are MLX's own: its fused attention, and for a
quantized cache its quantized matmuls as mlx-lm composes them.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.minimax import MiniMaxAttention as StockMiniMaxAttention

from fused_moe import _ext
from fused_moe.ops import StreamLike

# Head sizes the CPU kernel takes (csrc/ops/attention.h): multiples of
# HEAD_DIM_MULTIPLE up to MAX_HEAD_DIM.
HEAD_DIM_MULTIPLE = _ext.ATTENTION_HEAD_DIM_MULTIPLE
MAX_HEAD_DIM = _ext.MAX_ATTENTION_HEAD_DIM
# A quantized KV cache the kernel reads: these bits (mlx-lm's kv_bits), at
# any of the group sizes of _ext.SUPPORTED_GROUP_SIZES.
SUPPORTED_KV_CACHE_BITS = _ext.SUPPORTED_KV_CACHE_BITS


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

    ``Dh`` is a multiple of ``HEAD_DIM_MULTIPLE`` (16) up to ``MAX_HEAD_DIM``
    (512). Returns
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
    return cache.bits in SUPPORTED_KV_CACHE_BITS and cache.group_size in _ext.SUPPORTED_GROUP_SIZES


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


def unsupported_reason(attn: nn.Module) -> str | None:
    """Why :class:`MiniMaxAttention` cannot take this attention, or None."""
    head_dim = attn.head_dim
    if head_dim % HEAD_DIM_MULTIPLE or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim}; supported: a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}"
    return None


class MiniMaxAttention(StockMiniMaxAttention):
    """mlx-lm's ``MiniMaxAttention`` with q and k normed and rotated by
    :func:`norm_rope` and the attention computed by
    :func:`scaled_dot_product_attention`. Same parameters and settings; the
    projections are whatever modules the layer holds (``patch`` makes them
    :class:`fused_moe.QuantizedLinear`)."""

    @classmethod
    def from_attention(cls, attn: StockMiniMaxAttention) -> "MiniMaxAttention":
        if reason := unsupported_reason(attn):
            raise ValueError(f"fused_moe.MiniMaxAttention: {reason}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(vars(attn))  # settings: heads, scale, use_qk_norm, ...
        for name, value in attn.items():  # the submodules, the very objects
            new[name] = value
        return new

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        offset = 0 if cache is None else cache.offset
        if isinstance(mask, mx.array) or not isinstance(offset, int) or not kv_cache_supported(cache):
            # Padded batches (array masks, per-sequence offsets) and quantized
            # caches of other bits: MLX's own attention, as stock runs them.
            return super().__call__(x, mask=mask, cache=cache)
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = self.split_heads(queries, self.q_norm if self.use_qk_norm else None, self.num_attention_heads, offset)
        keys = self.split_heads(keys, self.k_norm if self.use_qk_norm else None, self.num_key_value_heads, offset)
        values = values.reshape(B, L, self.num_key_value_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if hasattr(cache, "bits"):
            out = quantized_scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask,
                                                         bits=cache.bits, group_size=cache.group_size)
        else:
            out = scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def split_heads(self, y: mx.array, norm: Optional[nn.Module], heads: int, offset: int) -> mx.array:
        """[B, L, heads * Dh] -> normed, [B, heads, L, Dh], rotated."""
        rope = self.rope
        if type(rope) is nn.RoPE and (norm is None or type(norm) is nn.RMSNorm):
            return norm_rope(y, None if norm is None else norm["weight"], heads=heads,
                             eps=0.0 if norm is None else norm.eps, rotary_dim=rope.dims, base=rope.base,
                             traditional=rope.traditional, scale=rope.scale, offset=offset)
        # Other modules (mlx-lm's sharded norm after Model.shard, a scaled
        # RoPE): run as they are.
        if norm is not None:
            y = norm(y)
        B, L, _ = y.shape
        return rope(y.reshape(B, L, heads, -1).transpose(0, 2, 1, 3), offset=offset)


def swap_attention(model: nn.Module) -> int:
    """Replaces, in place, every mlx-lm ``MiniMaxAttention`` of ``model``'s
    layers (exactly that class) that the kernel supports with
    :class:`MiniMaxAttention`; returns how many."""
    count = 0
    for layer in model.layers:
        attn = layer.self_attn
        if type(attn) is StockMiniMaxAttention and unsupported_reason(attn) is None:
            layer.self_attn = MiniMaxAttention.from_attention(attn)
            count += 1
    return count
