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
from fused_moe.checkpoint.storage import Stored
from fused_moe.checkpoint.minimax import block_path
from fused_moe.conversion import recipes
from fused_moe.conversion.plan import from_recipe, fused_config, quantization_config
from fused_moe.conversion.recipes import Recipe
from fused_moe.errors import ConversionError
from fused_moe.packed import spec
from fused_moe.packed.experts import QuantizedProjection, pack_experts

Expert = tuple[QuantizedProjection, QuantizedProjection, QuantizedProjection]


class SourceConverter:
    """The conversion of one source checkpoint, whatever its kind."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        # Quantized (weight, scales, biases) by module path that replace round
        # to nearest (--calibrate); stacked [E, ...] for experts.
        self.override: dict[str, tuple] = {}

    def target(self, recipe: Optional[str], bits: Optional[int], group_size: Optional[int]):
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
        its (weight, scales, biases)), else None."""
        raise NotImplementedError

    def expert(self, layer: int, experts: dict[str, Stored], e: int, recipe: Optional[Recipe]) -> Expert:
        """Expert e of a layer as (gate, up, down), each [1, out, ...], as the
        conversion stores it."""
        raise NotImplementedError

    def write_experts(self, layer: int, experts: dict[str, Stored], to: str, writer: CheckpointWriter,
                      recipe: Optional[Recipe]) -> None:
        """Writes a layer's experts, one at a time, each into its slice of the
        stacked tensors."""
        for e in range(self.checkpoint.model.experts):
            gate, up, down = self.expert(layer, experts, e, recipe)
            if to == "packed":
                packed = pack_experts(gate, up, down)
                arrays = [a for proj in spec.PROJECTIONS for a in packed.projection(proj)[:3]]
                names = spec.tensor_names(block_path(layer))
            else:
                arrays = [a for p in (gate, up, down) for a in p[:3]]
                names = [f"{experts[p].module.path}.{a}" for p in spec.STOCK_PROJECTIONS for a in spec.ARRAYS]
            for name, a in zip(names, arrays):
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
            config[spec.CONFIG_KEY] = fused_config(units, recipe_name)
        return dict(sorted(config.items()))


class FromHuggingFace(SourceConverter):
    checkpoint: HFCheckpoint

    def target(self, recipe, bits, group_size):
        if recipe is None and bits is None:
            raise ConversionError(
                f"{self.checkpoint.path} is a Hugging Face checkpoint: choose --recipe "
                f"({', '.join(recipes.RECIPES)}) or --bits"
            )
        r = recipes.get(recipe) if recipe is not None else recipes.uniform(bits, group_size or 64)
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
            q, scales, biases = self.override[m.path]
        else:
            weight = self.float_weight(s, recipe)
            if s.quant is None:
                writer.write(m.tensor, weight)
                return weight
            q, scales, biases = mx.quantize(weight, group_size=s.quant.group_size, bits=s.quant.bits)
        for a, array in zip(spec.ARRAYS, (q, scales, biases)):
            writer.write(f"{m.path}.{a}", array)
        return q, scales, biases

    def expert(self, layer, experts, e, recipe):
        # One expert at a time: groups lie within a row, so this equals
        # quantizing the stacked [E, out, in] tensor.
        out = []
        for proj in spec.STOCK_PROJECTIONS:
            s = experts[proj]
            if s.module.path in self.override:
                arrays = (a[e:e + 1] for a in self.override[s.module.path])
            else:
                weight = self.expert_float(layer, proj, e, recipe)
                arrays = mx.quantize(weight[None], group_size=s.quant.group_size, bits=s.quant.bits)
            out.append(QuantizedProjection(*arrays, s.quant.bits, s.quant.group_size))
        return tuple(out)

    def _quantization(self, config, recipe):
        config.pop("quantization_config", None)  # the source's FP8 settings
        return None, recipe.default


class FromQuantized(SourceConverter):
    checkpoint: QuantizedCheckpoint
    # The layout its experts are stored in: copied as they are into it.
    native = "stock"

    def target(self, recipe, bits, group_size):
        if recipe is not None or bits is not None:
            flag = "--recipe" if recipe is not None else "--bits"
            raise ConversionError(
                f"{self.checkpoint.path} is an mlx-lm quantized checkpoint: its experts are repacked "
                f"losslessly, so {flag} does not apply"
            )
        return None, self.checkpoint.stored

    def write_module(self, s, writer, recipe):
        m = s.module
        for name in ([m.tensor] if s.quant is None else [f"{m.path}.{a}" for a in spec.ARRAYS]):
            writer.copy(name, self.checkpoint.tensors[name])
        return None

    def expert(self, layer, experts, e, recipe):
        return self.checkpoint.read_expert(layer, e)

    def native_expert_tensors(self, layer: int, experts: dict[str, Stored]) -> list[str]:
        return [f"{s.module.path}.{a}" for s in experts.values() for a in spec.ARRAYS]

    def write_experts(self, layer, experts, to, writer, recipe):
        if to != self.native:
            return super().write_experts(layer, experts, to, writer, recipe)
        for name in self.native_expert_tensors(layer, experts):
            writer.copy(name, self.checkpoint.tensors[name])

    def _quantization(self, config, recipe):
        return config["quantization"], None


class FromPacked(FromQuantized):
    checkpoint: PackedCheckpoint
    native = "packed"

    def native_expert_tensors(self, layer, experts):
        return spec.tensor_names(block_path(layer))


CONVERTERS = {HFCheckpoint: FromHuggingFace, QuantizedCheckpoint: FromQuantized, PackedCheckpoint: FromPacked}


def for_checkpoint(checkpoint: Checkpoint) -> SourceConverter:
    """The converter of this kind of checkpoint."""
    return CONVERTERS[type(checkpoint)](checkpoint)
