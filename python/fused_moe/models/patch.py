"""`patch`: swap every MoE block of a loaded mlx-lm MiniMax model for `MiniMaxMoE`,
and, on the CPU, every quantized linear and embedding for fused_moe's own."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.models import minimax

from fused_moe.checkpoint.minimax import BLOCK_ATTR, MODEL_TYPES, block_path
from fused_moe.models.linear import swap_quantized_layers
from fused_moe.models.minimax_attention import swap_attention
from fused_moe.models.minimax_moe import MiniMaxMoE
from fused_moe.ops.router import gate_arrays
from fused_moe.packed.spec import STOCK_PROJECTIONS
from fused_moe.supported import SUPPORTED_BITS, quantization_unsupported


def check_minimax(model: nn.Module, what: str) -> None:
    """Raises unless `model` is an mlx-lm MiniMax model."""
    if not isinstance(model, minimax.Model):
        model_type = getattr(model, "model_type", None)
        raise TypeError(
            f"{what}: expected an mlx-lm MiniMax model (mlx_lm.models.minimax.Model, "
            f"model_type one of {MODEL_TYPES}), got {type(model).__module__}."
            f"{type(model).__name__} (model_type {model_type!r})"
        )


def _unsupported_reason(block: nn.Module) -> str | None:
    """Why the fused layer cannot take this stock block, or None if it can."""
    try:
        gate_arrays(block.gate)
    except (TypeError, ValueError) as e:
        return f"router: {e}"
    for name in STOCK_PROJECTIONS:
        if reason := quantization_unsupported(block.switch_mlp[name], SUPPORTED_BITS, additive_bias=False):
            return f"switch_mlp.{name}: {reason}"
    return None


def patch(model: nn.Module, *, strict: bool = True, experts_only: bool = False) -> int:
    """Replaces every ``block_sparse_moe`` of a loaded mlx-lm MiniMax model,
    in place, with a :class:`MiniMaxMoE`; returns how many were replaced.

    Each layer keeps its own bits and group size. Layers are repacked one at
    a time and the stock expert arrays are released as soon as their packed
    copy exists, so peak memory stays within the model plus one layer.

    Raises ``TypeError`` if ``model`` is not MiniMax. A block whose experts are
    not quantized within the supported grid raises ``ValueError`` naming its
    path; with ``strict=False`` it stays stock and a warning names it. All
    blocks are checked before any is changed. Blocks already patched are left
    alone and not counted.

    On the CPU (MLX's default device), every ``nn.QuantizedLinear`` (the
    attention projections, ``lm_head``) and ``nn.QuantizedEmbedding`` whose
    quantization the fused ops support also becomes a
    :class:`fused_moe.QuantizedLinear` / :class:`fused_moe.QuantizedEmbedding`,
    with the same parameters, and every mlx-lm ``MiniMaxAttention`` becomes a
    :class:`fused_moe.MiniMaxAttention` (the fused attention kernel over the
    KV cache); ``experts_only=True`` leaves them stock. On a GPU only the MoE
    blocks are replaced (MLX's own kernels are fast there).
    """
    check_minimax(model, "fused_moe.patch")
    todo = []
    for i, layer in enumerate(model.layers):
        block = getattr(layer, BLOCK_ATTR)
        if isinstance(block, MiniMaxMoE):
            continue
        if not isinstance(block, minimax.MiniMaxSparseMoeBlock):
            raise TypeError(
                f"fused_moe.patch: {block_path(i)} is a {type(block).__name__}, "
                f"not mlx-lm's MiniMaxSparseMoeBlock"
            )
        reason = _unsupported_reason(block)
        if reason is None:
            todo.append((i, layer, block))
        elif strict:
            raise ValueError(
                f"fused_moe.patch: {block_path(i)}: {reason}. Quantize the experts "
                f"first (e.g. mlx_lm.convert -q), or pass strict=False to keep such "
                f"blocks stock"
            )
        else:
            warnings.warn(f"fused_moe.patch: {block_path(i)} stays stock: {reason}", stacklevel=2)

    for i, layer, block in todo:
        fused = MiniMaxMoE.from_block(block)
        mx.eval(fused.experts.parameters())
        layer.update_modules({BLOCK_ATTR: fused})
        # The caller may still hold the old block; drop its experts anyway so
        # their memory goes now (down is shared with the packed layer).
        del block["switch_mlp"]
    if not experts_only:
        swap_dense_layers(model)
    return len(todo)


def swap_dense_layers(model: nn.Module) -> int:
    """`patch`'s second part: on the CPU, the quantized linears and
    embeddings onto the fused ops and the attention onto the fused attention
    kernel; on a GPU nothing. Returns the count of modules swapped."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return 0
    return swap_quantized_layers(model) + swap_attention(model)
