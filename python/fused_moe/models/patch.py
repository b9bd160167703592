"""`patch`: put an mlx-lm model's routed experts on the fused ops, and, on
the CPU, its quantized linears, embedding and MiniMax attention too.

Every MoE model of mlx-lm sends its routed experts through a ``SwitchGLU``
or ``SwitchMLP`` module; `patch` walks the module tree for them, wherever
they live, and replaces each with a :class:`FusedExperts` of the same call
contract, so the model's own routing, scores, shared experts and sum stay
exactly as they are. A MiniMax block whose router ``fm.route`` takes is
replaced whole by :class:`MiniMaxMoE` (router, experts and combine fused).
"""

from __future__ import annotations

import warnings
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models import minimax
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from fused_moe.checkpoint.minimax import MODEL_TYPES
from fused_moe.errors import UnsupportedError
from fused_moe.models.experts import FusedExperts
from fused_moe.models.experts import unsupported_reason as experts_unsupported
from fused_moe.models.linear import swap_quantized_layers
from fused_moe.models.minimax_attention import swap_attention
from fused_moe.models.minimax_moe import MiniMaxMoE
from fused_moe.ops.router import gate_arrays

# The expert modules of mlx-lm, exactly these classes.
EXPERT_CLASSES = (SwitchGLU, SwitchMLP)


def check_minimax(model: nn.Module, what: str) -> None:
    """Raises unless `model` is an mlx-lm MiniMax model."""
    if not isinstance(model, minimax.Model):
        model_type = getattr(model, "model_type", None)
        raise TypeError(
            f"{what}: expected an mlx-lm MiniMax model (mlx_lm.models.minimax.Model, "
            f"model_type one of {MODEL_TYPES}), got {type(model).__module__}."
            f"{type(model).__name__} (model_type {model_type!r})"
        )


def _router_unsupported(block: nn.Module) -> Optional[str]:
    try:
        gate_arrays(block.gate)
    except (TypeError, ValueError) as e:
        return f"router: {e}"
    return None


class _Target:
    """One module `patch` replaces: its path, the stock module, and how."""

    def __init__(self, path: str, module: nn.Module, fuse_block: bool):
        self.path, self.module, self.fuse_block = path, module, fuse_block

    @property
    def experts(self) -> nn.Module:
        return self.module.switch_mlp if self.fuse_block else self.module

    def build(self) -> nn.Module:
        return MiniMaxMoE.from_block(self.module) if self.fuse_block else FusedExperts.from_switch(self.module)

    def release(self) -> None:
        # The caller may still hold the stock module; drop its expert arrays
        # anyway so their memory goes now.
        for name in list(self.experts.keys()):
            del self.experts[name]


def find_experts(model: nn.Module) -> list[_Target]:
    """Every stock expert module of `model`: MiniMax blocks (fused whole
    when their router is supported) and every SwitchGLU/SwitchMLP."""
    modules = dict(model.named_modules())
    blocks = {p for p, m in modules.items() if type(m) is minimax.MiniMaxSparseMoeBlock}
    targets = []
    for path, module in modules.items():
        if path in blocks:
            if _router_unsupported(module) is None and experts_unsupported(module.switch_mlp) is None:
                targets.append(_Target(path, module, True))
        elif type(module) in EXPERT_CLASSES:
            parent = path.rpartition(".")[0]
            if parent in blocks and any(t.path == parent for t in targets):
                continue  # fused with its block
            targets.append(_Target(path, module, False))
    return targets


def patch(model: nn.Module, *, strict: bool = True, experts_only: bool = False) -> int:
    """Puts the routed experts of a loaded mlx-lm model on the fused ops, in
    place; returns how many modules it replaced.

    Every mlx-lm ``SwitchGLU``/``SwitchMLP`` becomes a
    :class:`FusedExperts` (each keeps its own quantization, activation and
    biases; the model's routing stays its own), and every MiniMax MoE block
    whose router :func:`fused_moe.route` takes becomes a
    :class:`MiniMaxMoE`. Modules are repacked one at a time and the stock
    expert arrays released as soon as their packed copy exists, so peak
    memory stays within the model plus one layer's experts.

    An expert module the fused ops cannot take (unquantized, an activation
    or quantization outside the grid) raises :class:`fused_moe.errors.
    UnsupportedError` (a ``ValueError``) naming its path and the reason,
    before anything changes; with ``strict=False`` it stays stock and a
    warning names it. Modules already fused are left alone and not counted.

    On the CPU (MLX's default device), every ``nn.QuantizedLinear`` and
    ``nn.QuantizedEmbedding`` the fused ops support also becomes a
    :class:`fused_moe.QuantizedLinear` / :class:`fused_moe.QuantizedEmbedding`
    (same parameters), and every mlx-lm ``MiniMaxAttention`` a
    :class:`fused_moe.MiniMaxAttention`; ``experts_only=True`` leaves them
    stock. On a GPU only the experts are replaced (MLX's own kernels are fast
    there).
    """
    targets = find_experts(model)
    todo = []
    for t in targets:
        reason = experts_unsupported(t.experts)
        if reason is None:
            todo.append(t)
        elif strict:
            raise UnsupportedError(
                f"fused_moe.patch: {t.path}: {reason}. Quantize the experts with a supported setting "
                f"first (e.g. mlx_lm.convert -q), or pass strict=False to keep such modules stock"
            )
        else:
            warnings.warn(f"fused_moe.patch: {t.path} stays stock: {reason}", stacklevel=2)
    for path, block in model.named_modules():
        if type(block) is minimax.MiniMaxSparseMoeBlock and (reason := _router_unsupported(block)):
            warnings.warn(f"fused_moe.patch: {path}: {reason}; its experts run fused under the model's "
                          f"own router", stacklevel=2)
    if not targets and not any(isinstance(m, (FusedExperts, MiniMaxMoE)) for m in model.modules()):
        warnings.warn(f"fused_moe.patch: {type(model).__module__}.{type(model).__name__} has no mlx-lm "
                      f"SwitchGLU/SwitchMLP experts to fuse", stacklevel=2)

    for t in todo:
        fused = t.build()
        mx.eval(fused.parameters())
        model.update_modules(tree_unflatten([(t.path, fused)]))
        t.release()
    if not experts_only:
        swap_dense_layers(model)
    return len(todo)


def swap_dense_layers(model: nn.Module) -> int:
    """`patch`'s second part: on the CPU, the quantized linears and
    embeddings onto the fused ops and MiniMax's attention onto the fused
    attention kernel; on a GPU nothing. Returns the count of modules swapped."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return 0
    return swap_quantized_layers(model) + swap_attention(model)
