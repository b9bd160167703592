"""What converting each kind of source means: one class per kind of
checkpoint (fused_moe.checkpoint.sources), chosen by `for_checkpoint`, so the
pipeline never asks which kind it holds.

* `FromHuggingFace`: float or FP8 weights, quantized under a recipe (or by
  the calibrated triples in `override`);
* `FromQuantized`: an mlx-lm quantized checkpoint, copied, or its experts
  repacked losslessly;
* `FromPacked`: a packed checkpoint, copied, or its experts unpacked.
"""

from __future__ import annotations

import json
from typing import Optional

import mlx.core as mx

from fused_moe.checkpoint.safetensors import CheckpointWriter
from fused_moe.checkpoint.sources import Checkpoint, HFCheckpoint, PackedCheckpoint, QuantizedCheckpoint
from fused_moe.checkpoint.storage import Stored, first_and_down, packed_tensors, stack_of, stored_tensors
from fused_moe.conversion import recipes
from fused_moe.conversion.plan import from_recipe, fused_config, quantization_config
from fused_moe.conversion.recipes import Recipe
from fused_moe.errors import ConversionError
from fused_moe.packed import spec
from fused_moe.packed.experts import QuantizedProjection, pack_experts

Expert = tuple[QuantizedProjection, ...]


class SourceConverter:
    """The conversion of one source checkpoint, whatever its kind."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        # Quantized (weight, scales, biases) by module path that replace round
        # to nearest (--calibrate); stacked [E, ...] for experts.
        self.override: dict[str, tuple] = {}

    def target(self, recipe: Optional[str], bits: Optional[int], group_size: Optional[int],
               mode: Optional[str] = None):
        """The recipe (None for a copy) and, per unit, how each module is stored."""
        raise NotImplementedError

    def require_original_weights(self, what: str) -> None:
        """Raises unless the source holds the original weights `what` needs."""
        raise ConversionError(
            f"{self.checkpoint.path}: {self.checkpoint.describe()}, which holds no original weights to "
            f"{what}; that needs the Hugging Face (FP8 or BF16) checkpoint")

    def write_module(self, s: Stored, writer: CheckpointWriter, recipe: Optional[Recipe]):
        """Writes one module that is not an expert projection; returns what
        was written for a quantized-from-float module (its float weight, or
        its quantized arrays), else None."""
        raise NotImplementedError

    def expert(self, experts: dict[str, Stored], e: int, recipe: Optional[Recipe]) -> Expert:
        """Expert e of a stack (its projections by name) as its projections in
        stock order, each [1, out, ...], as the conversion stores it."""
        raise NotImplementedError

    def packed_path(self, experts: dict[str, Stored]) -> str:
        """Where a stack's packed experts are written."""
        return self.checkpoint.model.packed_path(stack_of(experts))

    def write_experts(self, experts: dict[str, Stored], to: str, writer: CheckpointWriter,
                      recipe: Optional[Recipe]) -> None:
        """Writes a stack of experts, one expert at a time, each into its
        slice of the stacked tensors."""
        E = next(iter(experts.values())).module.shape[0]
        for e in range(E):
            projections = self.expert(experts, e, recipe)
            if to == "packed":
                packed = pack_experts(*projections)
                named = {f"{self.packed_path(experts)}.{n}.{a}": x for n in packed.projection_names
                         for a, x in packed.projection(n).arrays().items()}
            else:
                named = {f"{s.module.path}.{a}": x for s, p in zip(experts.values(), projections)
                         for a, x in p.arrays().items()}
            for name, a in named.items():
                writer.write(name, a[0], index=e)

    def _quantization(self, config: dict, recipe: Optional[Recipe]) -> tuple[Optional[dict], Optional[object]]:
        """(the source's "quantization" entries to keep, the default for new ones)."""
        raise NotImplementedError

    def output_config(self, recipe: Optional[Recipe], units: list[list[Stored]], to: str) -> dict:
        """The config.json of the output."""
        config = json.loads(json.dumps(self.checkpoint.config))
        config.pop("_name_or_path", None)
        base, default = self._quantization(config, recipe)
        recipe_name = recipe.name if recipe else (config.get(spec.CONFIG_KEY) or {}).get(spec.CONFIG_RECIPE)
        config.pop(spec.CONFIG_KEY, None)
        config["quantization"] = quantization_config(units, default, to, base)
        # mlx-lm writes both keys (mlx_lm.utils.save_config).
        config["quantization_config"] = config["quantization"]
        if to == "packed":
            config[spec.CONFIG_KEY] = fused_config(units, recipe_name, self.checkpoint.model.packed_path)
        return dict(sorted(config.items()))


class FromHuggingFace(SourceConverter):
    checkpoint: HFCheckpoint

    def target(self, recipe, bits, group_size, mode=None):
        if recipe is None and bits is None and mode is None:
            raise ConversionError(
                f"{self.checkpoint.path} is a Hugging Face checkpoint: choose --recipe "
                f"({', '.join(recipes.RECIPES)}), --bits or --mode"
            )
        r = recipes.get(recipe) if recipe is not None else recipes.uniform(bits, group_size, mode or "affine")
        return r, from_recipe(self.checkpoint.model, r)

    def require_original_weights(self, what: str) -> None:
        return None

    def float_weight(self, s: Stored, recipe: Recipe) -> mx.array:
        """A module's weight in the dtype the recipe stores it in (the
        routing bias stays float32)."""
        dtype = mx.float32 if s.dtype == "F32" else recipe.dtype
        return self.checkpoint.read_float(s.module.tensor).astype(dtype)

    def expert_float(self, layer: int, projection: str, e: int, recipe: Recipe) -> mx.array:
        """One expert's projection [out, in] in the recipe's dtype."""
        return self.checkpoint.read_float(self.checkpoint.expert_weight(layer, projection, e)).astype(recipe.dtype)

    def write_module(self, s, writer, recipe):
        m = s.module
        if m.path in self.override:
            arrays = self.override[m.path]
        else:
            weight = self.float_weight(s, recipe)
            if s.quant is None:
                writer.write(m.tensor, weight)
                return weight
            q = s.quant
            arrays = mx.quantize(weight, group_size=q.group_size, bits=q.bits, mode=q.mode)
        for a, array in zip(s.quant.arrays, arrays):
            writer.write(f"{m.path}.{a}", array)
        return arrays

    def expert(self, experts, e, recipe):
        # One expert at a time: groups lie within a row, so this equals
        # quantizing the stacked [E, out, in] tensor.
        out = []
        for proj, s in experts.items():
            q = s.quant
            if s.module.path in self.override:
                arrays = [a[e:e + 1] for a in self.override[s.module.path]]
            else:
                weight = self.expert_float(s.module.layer, proj, e, recipe)
                arrays = mx.quantize(weight[None], group_size=q.group_size, bits=q.bits, mode=q.mode)
            biases = arrays[2] if q.mode == "affine" else None
            out.append(QuantizedProjection(arrays[0], arrays[1], biases, q.bits, q.group_size, q.mode))
        return tuple(out)

    def _quantization(self, config, recipe):
        config.pop("quantization_config", None)  # the source's FP8 settings
        return None, recipe.default


class FromQuantized(SourceConverter):
    checkpoint: QuantizedCheckpoint
    # The layout its experts are stored in: copied as they are into it.
    native = "stock"

    def target(self, recipe, bits, group_size, mode=None):
        if recipe is not None or bits is not None or mode is not None:
            flag = "--recipe" if recipe is not None else "--bits" if bits is not None else "--mode"
            raise ConversionError(
                f"{self.checkpoint.path} is an mlx-lm quantized checkpoint: its experts are repacked "
                f"losslessly, so {flag} does not apply"
            )
        return None, self.checkpoint.stored

    def write_module(self, s, writer, recipe):
        for t in stored_tensors(s):
            writer.copy(t.name, self.checkpoint.tensors[t.name])
        return None

    def expert(self, experts, e, recipe):
        return self.checkpoint.read_expert(stack_of(experts), e)

    def native_expert_tensors(self, experts: dict[str, Stored]) -> list[str]:
        return [t.name for s in experts.values() for t in stored_tensors(s)]

    def write_experts(self, experts, to, writer, recipe):
        if to != self.native:
            return super().write_experts(experts, to, writer, recipe)
        for name in self.native_expert_tensors(experts):
            writer.copy(name, self.checkpoint.tensors[name])

    def _quantization(self, config, recipe):
        return config["quantization"], None


class FromPacked(FromQuantized):
    checkpoint: PackedCheckpoint
    native = "packed"

    def native_expert_tensors(self, experts):
        return [t.name for t in packed_tensors(self.packed_path(experts), *first_and_down(experts))]


CONVERTERS = {HFCheckpoint: FromHuggingFace, QuantizedCheckpoint: FromQuantized, PackedCheckpoint: FromPacked}


def for_checkpoint(checkpoint: Checkpoint) -> SourceConverter:
    """The converter of this kind of checkpoint."""
    return CONVERTERS[type(checkpoint)](checkpoint)
