"""The layout of an mlx-lm checkpoint of any MoE family, read from its tensor
names: every stack of routed experts (mlx-lm's SwitchGLU, ``gate_proj``/
``up_proj``/``down_proj``, or SwitchMLP, ``fc1``/``fc2``, each a 3-D weight)
and every other tensor, which a conversion copies as it is.

MiniMax keeps its own layout (checkpoint.minimax), derived from config.json
with every shape checked; this one serves the ~50 other families, whose
experts are found wherever they live."""

from __future__ import annotations

from fused_moe.checkpoint.modules import EXPERTS, TENSOR, Module
from fused_moe.checkpoint.safetensors import TensorInfo
from fused_moe.packed import spec

# The projections of a stack, in stock order, by kind.
STACKS = {"glu": spec.STOCK_PROJECTIONS, "mlp": spec.STOCK_MLP_PROJECTIONS}
# The tensors one stacked projection may have besides its weight.
PROJECTION_ARRAYS = ("scales", "biases", "bias", "global_scale")


def expert_stacks(tensors: dict[str, TensorInfo], suffix: str = "weight") -> dict[str, tuple[str, ...]]:
    """{stack path: its projection names} for every group of projections
    whose `suffix` tensors are 3-D (stacked over experts)."""
    stacks = {}
    for name, info in tensors.items():
        for projections in STACKS.values():
            first = f".{projections[0]}.{suffix}"
            if name.endswith(first) and len(info.shape) == 3:
                stack = name[: -len(first)]
                found = [tensors.get(f"{stack}.{p}.{suffix}") for p in projections]
                if all(t is not None and len(t.shape) == 3 for t in found):
                    stacks[stack] = projections
    return stacks


class DiscoveredLayout:
    """Units of one checkpoint: the other tensors first, then each stack of
    experts (numbered in path order). Expert Modules have the full-precision
    shape [E, out, in], `inputs_of` telling each projection's input width
    (a quantized weight's shape does not give it without its bits)."""

    def __init__(self, tensors: dict[str, TensorInfo], stacks: dict[str, tuple[str, ...]], expert_shapes,
                 owned: set[str] | None = None):
        self.stacks = dict(sorted(stacks.items()))
        # {stack: {projection: (E, out, in)}}
        self._shapes = expert_shapes
        # The tensors the experts are stored in (by default the stock ones).
        if owned is None:
            owned = {f"{stack}.{p}.{a}" for stack, projections in self.stacks.items() for p in projections
                     for a in ("weight", *PROJECTION_ARRAYS)}
        self._others = sorted(n for n in tensors if n not in owned)
        self._tensors = tensors

    @staticmethod
    def packed_path(stack_path: str) -> str:
        """Other families' fused module replaces the stack in place."""
        return stack_path

    @staticmethod
    def stack_path(packed_path: str) -> str:
        return packed_path

    def units(self) -> list[tuple[str, list[Module]]]:
        units = [("tensors", [Module(n, TENSOR, None, self._tensors[n].shape) for n in self._others])]
        for i, (stack, projections) in enumerate(self.stacks.items()):
            units.append((stack, [Module(f"{stack}.{p}", EXPERTS, i, self._shapes[stack][p]) for p in projections]))
        return units

    def modules(self) -> list[Module]:
        return [m for _, mods in self.units() for m in mods]
