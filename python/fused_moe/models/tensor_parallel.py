"""Tensor parallelism of patched MiniMax models over the expert width H.

Each rank keeps gate/up rows ``H/N`` and the matching down columns of every
expert (docs/FORMAT.md, "Slicing along H"), runs the fused kernels on that
slice and sums ``y`` across ranks once per layer: the split mlx-lm's own
``Model.shard`` makes of the stock experts. Attention is sharded by mlx-lm's
``Model.shard`` itself. The router and the routing bias are replicated, so
every rank selects the same experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from fused_moe.checkpoint.minimax import BLOCK_ATTR, block_path
from fused_moe.checkpoint.safetensors import read_header, read_slice, read_tensor
from fused_moe.models.minimax_moe import MiniMaxMoE
from fused_moe.models.patch import check_minimax
from fused_moe.packed import spec
from fused_moe.packed.experts import PackedExperts


def check_split(H: int, ranks: int, group_size: int, where: str) -> None:
    """Raises unless H splits into `ranks` slices of whole down-projection
    quantization groups."""
    if H % ranks or (H // ranks) % group_size:
        raise ValueError(
            f"{where}: cannot split the expert width H={H} over N={ranks} ranks: "
            f"H/N must be a whole number of down-projection groups (group size "
            f"{group_size}), so that every rank keeps whole quantization groups"
        )


def own_slice(proj: str, H: int, ranks: int, rank: int, bits: int, group_size: int,
              arrays: tuple[str, ...] = spec.ARRAYS) -> dict:
    """{array: (axis, start, stop) or None for whole}: rank `rank`'s part of
    one projection of expert width H, packed ("gate_up", "down") or stock
    ("gate_proj", "up_proj", "down_proj"): rows of gate/up (gate_up rows come
    in pairs), whole groups of the columns of down; a per-expert tensor
    scale is every rank's."""
    h = H // ranks
    a, b = rank * h, (rank + 1) * h
    if proj == spec.DOWN or proj == "down_proj":
        cols = {"weight": (2, a * bits // 32, b * bits // 32),
                "scales": (2, a // group_size, b // group_size),
                "biases": (2, a // group_size, b // group_size)}
    else:
        pair = 2 if proj == spec.GATE_UP else 1
        cols = {arr: (1, pair * a, pair * b) for arr in ("weight", "scales", "biases", "bias")}
    cols["global_scale"] = None
    return {arr: cols[arr] for arr in arrays}


def slice_experts(experts: PackedExperts, rank: int, ranks: int) -> PackedExperts:
    """Rank `rank`'s slice ``H[r·H/N : (r+1)·H/N]`` of the packed experts."""
    H = experts.intermediate_dims
    projections = []
    for proj in experts.projection_names:
        q = experts.projection(proj)
        parts = own_slice(proj, H, ranks, rank, q.bits, q.group_size, q.spec.arrays())

        def take(name, a):
            if parts[name] is None:
                return a
            axis, start, stop = parts[name]
            index = (slice(None),) * axis + (slice(start, stop),)
            # contiguous: the slice must not keep the whole array alive.
            return mx.contiguous(a[index])

        projections.append(q.map_arrays(take))
    return PackedExperts(*projections, gated=experts.gated)


def _checkpoint_index(model_path: Path) -> dict:
    """Tensor name -> TensorInfo over every safetensors file of a checkpoint."""
    index = {}
    for file in sorted(Path(model_path).glob("model*.safetensors")):
        index.update(read_header(file))
    return index


def read_own_experts(model: nn.Module, model_path: Path, group, H: int) -> None:
    """Replaces the (lazy) expert arrays of a model sharded by :func:`shard`
    or mlx-lm's ``Model.shard`` with this rank's slices of the experts of
    width H, read straight from the checkpoint, so a rank never holds another
    rank's experts; then evaluates the model one layer at a time."""
    index = _checkpoint_index(model_path)
    ranks, rank = group.size(), group.rank()

    def read(name: str, part) -> mx.array:
        if name not in index:
            raise ValueError(f"{model_path}: the checkpoint has no tensor {name}")
        return read_tensor(index[name]) if part is None else read_slice(index[name], *part)

    for i, layer in enumerate(model.layers):
        block, path = getattr(layer, BLOCK_ATTR), block_path(i)
        if isinstance(block, MiniMaxMoE):
            projections = []
            for proj in spec.PROJECTIONS:
                q = block.experts.projection(proj)
                parts = own_slice(proj, H, ranks, rank, q.bits, q.group_size, q.spec.arrays())
                projections.append(q.map_arrays(
                    lambda arr, _: read(f"{path}.{spec.MODULE_NAME}.{proj}.{arr}", parts[arr])))
            setattr(block, spec.MODULE_NAME, PackedExperts(*projections))
        else:
            glu = block.switch_mlp
            for proj in spec.STOCK_PROJECTIONS:
                module = glu[proj]
                if not hasattr(module, "bits"):
                    raise ValueError(
                        f"{model_path}: {path}: the experts are not quantized; "
                        f"fused_moe shards quantized experts only"
                    )
                arrays = tuple(a for a in (*spec.ARRAYS, *spec.OPTIONAL_ARRAYS) if a in module)
                parts = own_slice(proj, H, ranks, rank, module.bits, module.group_size, arrays)
                module.update({arr: read(f"{path}.switch_mlp.{proj}.{arr}", parts[arr]) for arr in arrays})
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


class _ShardStandIn(nn.Module):
    """Takes a fused block's place while mlx-lm's ``Model.shard`` runs: it
    has the ``switch_mlp`` projections that code shards, with no parameters,
    so only attention is touched."""

    def __init__(self):
        super().__init__()
        self.switch_mlp = nn.Module()
        for name in spec.STOCK_PROJECTIONS:
            setattr(self.switch_mlp, name, nn.Module())
        self.sharding_group = None


def shard(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Shards a patched MiniMax model in place over `group` (default: the
    global group) and returns it.

    Attention is sharded by mlx-lm's own ``Model.shard``; the fused experts
    are sliced along H, which raises ``ValueError`` naming H, N and the group
    size if a slice would break quantization groups. Every block is checked
    before anything changes.
    """
    check_minimax(model, "fused_moe.shard")
    group = group or mx.distributed.init()
    ranks, rank = group.size(), group.rank()
    fused = [
        (i, layer, getattr(layer, BLOCK_ATTR))
        for i, layer in enumerate(model.layers)
        if isinstance(getattr(layer, BLOCK_ATTR), MiniMaxMoE)
    ]
    for i, _, block in fused:
        down = block.experts.projection(spec.DOWN)
        if down.bias is not None:
            raise ValueError(f"fused_moe.shard: {block_path(i)}: the experts' down projection adds a bias, "
                             f"which the ranks' sum would count N times")
        check_split(block.experts.intermediate_dims, ranks, down.group_size, f"fused_moe.shard: {block_path(i)}")
    args = model.args
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(args, name) % ranks:
            raise ValueError(
                f"fused_moe.shard: {name}={getattr(args, name)} does not split over N={ranks} ranks"
            )

    for _, layer, _ in fused:
        setattr(layer, BLOCK_ATTR, _ShardStandIn())
    try:
        model.shard(group)
    finally:
        for _, layer, block in fused:
            setattr(layer, BLOCK_ATTR, block)
    for _, _, block in fused:
        setattr(block, spec.MODULE_NAME, slice_experts(block.experts, rank, ranks))
        block.sharding_group = group
    return model
