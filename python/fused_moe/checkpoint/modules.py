"""The modules a checkpoint stores, each with the role that decides how it is
stored: the vocabulary every checkpoint layout (MiniMax's, or one discovered
from any mlx-lm checkpoint's tensor names) describes itself in."""

from __future__ import annotations

from dataclasses import dataclass

# Roles decide how a recipe stores a module. TENSOR: any other tensor of a
# checkpoint, copied as it is.
EMBED, LM_HEAD, ATTENTION, ROUTER, ROUTING_BIAS, NORM, EXPERTS, TENSOR = (
    "embed", "lm_head", "attention", "router", "routing_bias", "norm", "experts", "tensor",
)
# Roles whose weight is a matrix that mx.quantize can store.
QUANTIZABLE = (EMBED, LM_HEAD, ATTENTION, ROUTER, EXPERTS)


@dataclass(frozen=True)
class Module:
    """One parameter-holding module: `shape` is its full-precision weight's
    shape ((out, in), (E, out, in) for stacked experts, (n,) for a vector).
    `layer` numbers the unit it is converted in (None outside the layers)."""

    path: str
    role: str
    layer: int | None
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """The last part of the path, e.g. "gate_proj"."""
        return self.path.rpartition(".")[2]

    @property
    def parent(self) -> str:
        """The path of the module that holds it, e.g. "...switch_mlp"."""
        return self.path.rpartition(".")[0]

    @property
    def tensor(self) -> str:
        """The name of its full-precision weight in an mlx-lm checkpoint."""
        return self.path if self.role in (ROUTING_BIAS, TENSOR) else f"{self.path}.weight"
