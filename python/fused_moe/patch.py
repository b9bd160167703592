"""`patch`: swap every MoE block of a loaded mlx-lm MiniMax model for `MiniMaxMoE`,
and, on the CPU, every quantized linear and embedding for fused_moe's own."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn

from fused_moe.format import block_path
from fused_moe.attention import swap_attention
from fused_moe.layer import MiniMaxMoE
from fused_moe.linear import swap_quantized_layers
from fused_moe.packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from fused_moe.router import gate_arrays

MINIMAX_MODEL_TYPES = ("minimax", "minimax_m2")
BLOCK_ATTR = "block_sparse_moe"


def check_minimax(model: nn.Module, what: str) -> None:
    """Raises unless `model` is an mlx-lm MiniMax model."""
    from mlx_lm.models import minimax

    if not isinstance(model, minimax.Model):
        model_type = getattr(model, "model_type", None)
        raise TypeError(
            f"{what}: expected an mlx-lm MiniMax model (mlx_lm.models.minimax.Model, "
            f"model_type one of {MINIMAX_MODEL_TYPES}), got {type(model).__module__}."
            f"{type(model).__name__} (model_type {model_type!r})"
        )


def _unsupported_reason(block: nn.Module) -> str | None:
    """Why the fused layer cannot take this stock block, or None if it can."""
    try:
        gate_arrays(block.gate)
    except (TypeError, ValueError) as e:
        return f"router: {e}"
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = block.switch_mlp[name]
        bits = getattr(proj, "bits", None)
        if bits is None or "scales" not in proj:
            return f"switch_mlp.{name} is not quantized ({type(proj).__name__})"
        mode = getattr(proj, "mode", "affine")
        if mode != "affine":
            return f"switch_mlp.{name} uses quantization mode {mode!r}; only 'affine' is supported"
        if bits not in SUPPORTED_BITS or proj.group_size not in SUPPORTED_GROUP_SIZES:
            return (
                f"switch_mlp.{name} is {bits}-bit with group size {proj.group_size}; "
                f"supported: bits {SUPPORTED_BITS}, group sizes {SUPPORTED_GROUP_SIZES}"
            )
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
    from mlx_lm.models.minimax import MiniMaxSparseMoeBlock

    check_minimax(model, "fused_moe.patch")
    todo = []
    for i, layer in enumerate(model.layers):
        block = getattr(layer, BLOCK_ATTR)
        if isinstance(block, MiniMaxMoE):
            continue
        if not isinstance(block, MiniMaxSparseMoeBlock):
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
        setattr(layer, BLOCK_ATTR, fused)
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
