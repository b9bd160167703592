"""`MiniMaxAttention`: mlx-lm's MiniMax attention on fused_moe's attention
ops (:func:`fused_moe.norm_rope`, :func:`fused_moe.scaled_dot_product_attention`,
and :func:`fused_moe.quantized_scaled_dot_product_attention` over mlx-lm's
4- or 8-bit ``QuantizedKVCache``).

The cases it does not take go to MLX's own attention, as stock does them:
an array mask (batches with padding), and a quantized KV cache of bits or
group size outside ``SUPPORTED_KV_CACHE_BITS`` and ``SUPPORTED_GROUP_SIZES``.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.minimax import MiniMaxAttention as StockMiniMaxAttention

from fused_moe.ops.attention import (
    head_dim_unsupported,
    kv_cache_supported,
    norm_rope,
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)


class MiniMaxAttention(StockMiniMaxAttention):
    """mlx-lm's ``MiniMaxAttention`` with q and k normed and rotated by
    :func:`norm_rope` and the attention computed by
    :func:`scaled_dot_product_attention`. Same parameters and settings; the
    projections are whatever modules the layer holds (``patch`` makes them
    :class:`fused_moe.QuantizedLinear`)."""

    @classmethod
    def from_attention(cls, attn: StockMiniMaxAttention) -> "MiniMaxAttention":
        if reason := head_dim_unsupported(attn.head_dim):
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
    """Replaces, in place, every mlx-lm ``MiniMaxAttention`` of ``model``
    (exactly that class) that the kernel supports with
    :class:`MiniMaxAttention`; returns how many."""
    swaps = [
        (path, MiniMaxAttention.from_attention(attn))
        for path, attn in model.named_modules()
        if type(attn) is StockMiniMaxAttention and head_dim_unsupported(attn.head_dim) is None
    ]
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)
