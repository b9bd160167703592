"""`MiniMaxMoE`: a drop-in for mlx-lm's `MiniMaxSparseMoeBlock` on the fused ops."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import sum_gradients

from fused_moe.ops.experts import down_combine, gate_up_swiglu
from fused_moe.ops.router import route
from fused_moe.packed import spec
from fused_moe.packed.experts import PackedExperts, empty_projection, pack_experts
from fused_moe.packed.spec import ProjectionSpec
from fused_moe.supported import width_unsupported


def _check_divisible(what: str, dims: int, bits: int, group_size: int) -> None:
    if reason := width_unsupported(dims, bits, group_size):
        raise ValueError(f"MiniMaxMoE: {what}={dims}: {reason}")


class MiniMaxMoE(nn.Module):
    """The MiniMax sparse MoE block with its experts in the fused_moe layout.

    Same call, output shape and dtype as mlx-lm's ``MiniMaxSparseMoeBlock``;
    the routed experts run through :func:`fused_moe.gate_up_swiglu` and
    :func:`fused_moe.down_combine`.

    Parameters: ``gate`` (the router, a ``Linear`` or ``QuantizedLinear`` as in
    stock), ``e_score_correction_bias``, and the :class:`PackedExperts` under
    ``spec.MODULE_NAME`` (docs/FORMAT.md). A layer built from ``args`` holds
    zero experts until weights are loaded; :meth:`from_block` converts a
    loaded stock block.

    Args:
        args: mlx-lm's MiniMax ``ModelArgs``.
        bits, group_size: affine quantization of the gate/up projections.
        down_bits, down_group_size: of the down projection (default: the same).
        specs: instead, each projection's stored form ({"gate_up": ...,
            "down": ...}, any mode), as a packed checkpoint records it.
    """

    def __init__(
        self,
        args,
        *,
        bits: int = 3,
        group_size: int = 64,
        down_bits: Optional[int] = None,
        down_group_size: Optional[int] = None,
        specs: Optional[dict[str, ProjectionSpec]] = None,
    ):
        super().__init__()
        if specs is None:
            down_bits = bits if down_bits is None else down_bits
            down_group_size = group_size if down_group_size is None else down_group_size
            specs = {spec.GATE_UP: ProjectionSpec("affine", bits, group_size),
                     spec.DOWN: ProjectionSpec("affine", down_bits, down_group_size)}
        D, H, E = args.hidden_size, args.intermediate_size, args.num_local_experts
        gate_up, down = specs[spec.GATE_UP], specs[spec.DOWN]
        _check_divisible("hidden_size", D, gate_up.bits, gate_up.group_size)
        _check_divisible("intermediate_size", H, down.bits, down.group_size)
        packed = PackedExperts(
            empty_projection(E, 2 * H, D, gate_up, mx.float32, rows_are_pairs=True),
            empty_projection(E, D, H, down, mx.float32),
        )
        self._init_parts(
            nn.Linear(D, E, bias=False),
            mx.zeros((E,)),
            packed,
            args.num_experts_per_tok,
            None,
        )

    def _init_parts(self, gate, bias, packed, k, sharding_group) -> None:
        self.num_experts_per_tok = k
        self.gate = gate
        self.e_score_correction_bias = bias
        setattr(self, spec.MODULE_NAME, packed)
        self.sharding_group = sharding_group

    @classmethod
    def from_block(cls, block: nn.Module) -> "MiniMaxMoE":
        """Builds the layer from a stock ``MiniMaxSparseMoeBlock`` whose
        ``switch_mlp`` is quantized, keeping its router, routing bias, k and
        sharding group. The expert arrays are repacked (lazily; evaluate the
        result to materialise them)."""
        packed = pack_experts(block.switch_mlp)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_parts(
            block.gate,
            block.e_score_correction_bias,
            packed,
            block.num_experts_per_tok,
            getattr(block, "sharding_group", None),
        )
        return layer

    @property
    def experts(self) -> PackedExperts:
        return self[spec.MODULE_NAME]

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Expert ids ``[..., k]`` (uint32) and their float32 weights: mlx-lm's
        MiniMax router (fp32 logits, sigmoid, top-k on the biased scores,
        renormalised weights) as one primitive, :func:`fused_moe.route`."""
        return route(x, self.gate, self.e_score_correction_bias, self.num_experts_per_tok)

    def __call__(self, x: mx.array) -> mx.array:
        if self.sharding_group is not None:
            x = sum_gradients(self.sharding_group)(x)

        inds, weights = self.route(x)
        experts = self.experts
        # The kernels take activations in the dtype of the affine scales (any
        # float dtype when there are none); the result has the dtype stock
        # would give (x promoted with the scales).
        dtype = experts.dtype or x.dtype
        out_dtype = mx.result_type(x.dtype, dtype)
        h = gate_up_swiglu(x.astype(dtype), experts, inds)
        y = down_combine(h, experts, inds, weights).astype(out_dtype)

        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y

    def _extra_repr(self) -> str:
        return f"k={self.num_experts_per_tok}"
