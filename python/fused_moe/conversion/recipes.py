"""Quantization recipes: which precision each module of a MiniMax model gets.

A recipe is a rule from a module's role (and layer) to a `Quant`, or to None
for a module kept in floating point. Bits per weight follow from the shapes
alone (see `plan.from_recipe` and `storage.bits_per_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import mlx.core as mx

from fused_moe.checkpoint.modules import EXPERTS, QUANTIZABLE, ROUTER
from fused_moe.checkpoint.storage import Quant
from fused_moe.errors import ConversionError
from fused_moe.supported import AFFINE_BITS, AFFINE_GROUP_SIZES, FP_MODES

# The experts' group size under --bits-budget (the seed recipe's), and the
# suffix its recipe's name gets in the output's config.
EXPERT_GROUP_SIZE = 64
BUDGET_SUFFIX = "+bits-budget"
# Expert projections that read the expert's hidden activation (the rest
# read the layer's input).
DOWN_PROJECTIONS = ("down_proj", "fc2")


@dataclass(frozen=True)
class Recipe:
    name: Optional[str]  # None for a --bits conversion
    description: str
    # (role, layer, number of layers) -> Quant, or None to keep the weight in `dtype`.
    rule: Callable[[str, Optional[int], int], Optional[Quant]]
    # The top-level "quantization" default written to config.json.
    default: Quant
    # Floating-point tensors (norms, unquantized weights, scales and biases) are
    # stored in this dtype; the routing bias stays float32, as in mlx-lm.
    dtype: mx.Dtype = mx.bfloat16
    # Per decoder layer, (gate/up bits, down bits) of its experts at
    # EXPERT_GROUP_SIZE, replacing the rule's (--bits-budget); None: the rule.
    expert_bits: Optional[tuple[tuple[int, int], ...]] = None

    def quant(self, role: str, layer: Optional[int], num_layers: int, name: Optional[str] = None) -> Optional[Quant]:
        """How a module of this role (and layer; `name` is an expert
        projection's, "gate_proj", "down_proj", ...) is stored."""
        if role not in QUANTIZABLE:
            return None
        if role == EXPERTS and self.expert_bits is not None:
            gate_up, down = self.expert_bits[layer]
            return Quant(down if name in DOWN_PROJECTIONS else gate_up, EXPERT_GROUP_SIZE)
        return self.rule(role, layer, num_layers)

    def with_expert_bits(self, expert_bits) -> "Recipe":
        """This recipe with per-layer (gate/up bits, down bits) experts."""
        return replace(self, name=f"{self.name}{BUDGET_SUFFIX}", expert_bits=tuple(map(tuple, expert_bits)))


def _seed_3_7bit(role: str, layer: Optional[int], num_layers: int) -> Optional[Quant]:
    if role == ROUTER:
        return None
    if role == EXPERTS:
        return Quant(4 if layer in (0, num_layers - 1) else 3, 64)
    return Quant(8, 64)  # embed, lm_head, attention


RECIPES = {
    "seed-3.7bit": Recipe(
        "seed-3.7bit",
        "experts 3-bit (4-bit in the first and last layer); embed, lm_head and "
        "attention 8-bit; router gate and norms bf16, routing bias fp32; group size 64",
        _seed_3_7bit,
        Quant(8, 64),
    ),
}


def uniform(bits: Optional[int], group_size: Optional[int], mode: str = "affine") -> Recipe:
    """The --bits/--mode recipe: every quantizable module but the router at
    `bits` in `mode` (an fp mode at MLX's own bits and group size, which
    `bits` and `group_size` may restate)."""
    if mode == "affine":
        bits, group_size = bits, 64 if group_size is None else group_size
        if bits not in AFFINE_BITS:
            raise ConversionError(f"--bits {bits} is not supported; supported bits: {AFFINE_BITS}")
        if group_size not in AFFINE_GROUP_SIZES:
            raise ConversionError(
                f"--group-size {group_size} is not supported; supported group sizes: {AFFINE_GROUP_SIZES}"
            )
        what = f"{bits}-bit"
    else:
        if mode not in FP_MODES:
            raise ConversionError(f"--mode {mode!r} is not supported; modes: {('affine', *FP_MODES)}")
        want = FP_MODES[mode]
        for flag, given, need in (("--bits", bits, want["bits"]), ("--group-size", group_size, want["group_size"])):
            if given is not None and given != need:
                raise ConversionError(f"{flag} {given} does not fit --mode {mode}, which is {want['bits']}-bit "
                                      f"with group size {want['group_size']}")
        bits, group_size, what = want["bits"], want["group_size"], mode
    q = Quant(bits, group_size, mode)
    return Recipe(
        None,
        f"all weights {what}, router gate and norms bf16, routing bias fp32; group size {group_size}",
        lambda role, layer, n: None if role == ROUTER else q,
        q,
    )


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConversionError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}") from None
