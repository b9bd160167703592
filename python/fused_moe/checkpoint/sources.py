"""Opening and checking a checkpoint before any tensor data is read.

Three kinds, one class each:

* `HFCheckpoint`: a Hugging Face MiniMax-M2.x checkpoint (model_type
  minimax_m2) with per-expert ``experts.E.w1|w2|w3`` weights, each stored as
  FP8 e4m3 with a 128x128 ``weight_scale_inv`` or as a plain float tensor;
* `QuantizedCheckpoint`: an mlx-lm quantized checkpoint with stacked
  ``switch_mlp`` experts;
* `PackedCheckpoint`: a checkpoint in the packed format (spec.CONFIG_KEY in
  config.json).

`open_checkpoint` tells them apart and checks every tensor the model needs
against config.json (names, shapes, dtypes), so a bad file is refused in one
line before anything is converted or loaded.
"""

from __future__ import annotations

import re
from math import ceil
from pathlib import Path
from typing import Optional

import mlx.core as mx

from fused_moe.checkpoint.files import TOKENIZER_FILES, has_tokenizer, read_checkpoint, read_config
from fused_moe.checkpoint.minimax import BLOCK_ATTR, EXPERTS, NORM, QUANTIZABLE, ROUTING_BIAS, MiniMaxShapes, Module, block_path
from fused_moe.checkpoint.safetensors import TensorInfo, printable, read_tensor
from fused_moe.checkpoint.storage import Quant, Stored, packed_tensors, quantized_shapes, unit_experts
from fused_moe.errors import CheckpointError
from fused_moe.packed import spec
from fused_moe.packed.experts import PackedExperts, QuantizedProjection, unpack_experts
from fused_moe.supported import AFFINE_BITS, AFFINE_GROUP_SIZES

FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_BLOCK = 128
# Hugging Face names of the expert projections.
HF_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class Checkpoint:
    """A checkpoint directory, opened and fully checked; reads no tensor
    data until asked. `kind` names the class in messages and summaries."""

    kind = ""

    def __init__(self, path: Path, config: dict, model: MiniMaxShapes, tensors: dict[str, TensorInfo]):
        self.path, self.config, self.model, self.tensors = path, config, model, tensors
        self.used: set[str] = set()  # tensor names the model reads

    @property
    def dropped(self) -> list[str]:
        """Tensors the model does not use (e.g. multi-token prediction)."""
        return sorted(set(self.tensors) - self.used)

    def describe(self) -> str:
        raise NotImplementedError

    def read(self, name: str, index: int | None = None) -> mx.array:
        """Tensor `name` as stored, or its slice `index` of the leading axis."""
        return read_tensor(self.tensors[name], index)

    # ---------------------------------------------------------------- checks

    def _info(self, name: str, shape: tuple, dtypes: tuple[str, ...], what: str = "") -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: missing tensor {name}{what}")
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                f"{list(shape)}{what}"
            )
        if info.dtype not in dtypes:
            raise CheckpointError(
                f"{info.file}: tensor {name} is {info.dtype}, expected one of {', '.join(dtypes)}"
            )
        self.used.add(name)
        return info

    def _shape_note(self, m: Module) -> str:
        c = self.model
        return (
            f" for {m.role} (config.json: D={c.hidden}, H={c.intermediate}, E={c.experts}, "
            f"V={c.vocab}, q={c.q_dim}, kv={c.kv_dim})"
        )


class HFCheckpoint(Checkpoint):
    """Hugging Face MiniMax weights in floating point or FP8, one tensor per expert."""

    kind = "hf"

    def __init__(self, *args):
        super().__init__(*args)
        self.fp8 = False
        for m in self.model.modules():
            if m.role == EXPERTS:
                for e in range(self.model.experts):
                    self._check_weight(m, self.expert_weight(m.layer, m.name, e), m.shape[1:])
            else:
                self._check_weight(m, m.tensor, m.shape)
        qc = self.config.get("quantization_config") or {}
        says_fp8 = qc.get("quant_method") == "fp8"
        if says_fp8 != self.fp8:
            raise CheckpointError(
                f"{self.path / 'config.json'}: quantization_config says "
                f"quant_method={qc.get('quant_method')!r}, but the weights are "
                + ("F8_E4M3" if self.fp8 else "not F8_E4M3")
            )
        if self.fp8 and list(qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
            raise CheckpointError(
                f"{self.path / 'config.json'}: weight_block_size {qc['weight_block_size']} is not supported; "
                f"only {FP8_BLOCK}x{FP8_BLOCK} blocks"
            )

    def describe(self) -> str:
        storage = "FP8 e4m3 with 128x128 weight_scale_inv" if self.fp8 else "floating point"
        return f"Hugging Face {self.config['model_type']} checkpoint, {storage}"

    def _check_weight(self, m: Module, name: str, shape: tuple) -> None:
        matrix = len(shape) == 2
        allowed = FLOAT_DTYPES + (("F8_E4M3",) if matrix else ())
        info = self._info(name, shape, allowed, self._shape_note(m))
        scale = name.replace(".weight", ".weight_scale_inv")
        if info.dtype == "F8_E4M3":
            blocks = (ceil(shape[0] / FP8_BLOCK), ceil(shape[1] / FP8_BLOCK))
            self._info(scale, blocks, FLOAT_DTYPES, f" (one scale per {FP8_BLOCK}x{FP8_BLOCK} block of {name})")
            self.fp8 = True
        elif matrix and scale in self.tensors:
            raise CheckpointError(f"{self.tensors[scale].file}: {scale} belongs to {name}, which is {info.dtype}, not F8_E4M3")

    @staticmethod
    def expert_weight(layer: int, projection: str, expert: int) -> str:
        """The tensor name of one expert's projection ("gate_proj", ...)."""
        return f"{block_path(layer)}.experts.{expert}.{HF_EXPERT_NAMES[projection]}.weight"

    def read_float(self, name: str) -> mx.array:
        """A weight in floating point, dequantized from FP8 exactly as
        mlx-lm's MiniMax `sanitize` does when it is stored in FP8."""
        info = self.tensors[name]
        w = read_tensor(info)
        if info.dtype != "F8_E4M3":
            return w
        return dequantize_fp8(w, self.read(name.replace(".weight", ".weight_scale_inv")))


class QuantizedCheckpoint(Checkpoint):
    """An mlx-lm quantized checkpoint: `stored` says, per unit, how each
    module is stored (the per-path "quantization" entries of config.json, or
    what the scales' shapes imply)."""

    kind = "mlx"

    def __init__(self, *args):
        super().__init__(*args)
        quantization = self.config.get("quantization")
        if not isinstance(quantization, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: \"quantization\" must be an object")
        self.stored: list[list[Stored]] = []
        for _, modules in self.model.units():
            stored = []
            for m in modules:
                if m.role in (NORM, ROUTING_BIAS):
                    info = self._info(m.tensor, m.shape, FLOAT_DTYPES, self._shape_note(m))
                    stored.append(Stored(m, None, info.dtype))
                elif m.role == EXPERTS:
                    stored.append(self._stored_experts(m, quantization))
                else:
                    stored.append(self._stored_module(m, quantization))
            self._check_unit_experts(stored)
            self.stored.append(stored)
        # Per layer, its stacked expert projections by name.
        self.experts = {s[0].module.layer: unit_experts(s) for s in self.stored if unit_experts(s)}

    def describe(self) -> str:
        return "mlx-lm quantized checkpoint"

    def _stored_module(self, m: Module, quantization: dict) -> Stored:
        q = self._mlx_quant(m, quantization)
        dtype_of = self.tensors.get(f"{m.path}.scales" if q else m.tensor)
        s = Stored(m, q, dtype_of.dtype if dtype_of else "BF16")
        self._check_stored(s)
        return s

    def _stored_experts(self, m: Module, quantization: dict) -> Stored:
        s = self._stored_module(m, quantization)
        if s.quant is None:
            raise CheckpointError(
                f"{self.path}: {m.path} is not quantized; convert the original "
                f"Hugging Face checkpoint instead"
            )
        return s

    def _check_unit_experts(self, stored: list[Stored]) -> None:
        """Checks of a unit's experts as a whole (none for stock experts)."""

    def _check_stored(self, s: Stored) -> None:
        m = s.module
        if s.quant is None:
            self._info(m.tensor, m.shape, FLOAT_DTYPES, self._shape_note(m))
            return
        w, g = quantized_shapes(m.shape, s.quant)
        note = f" for {s.quant.bits}-bit, group size {s.quant.group_size}{self._shape_note(m)}"
        self._info(f"{m.path}.weight", w, ("U32",), note)
        scales = self._info(f"{m.path}.scales", g, FLOAT_DTYPES, note)
        self._info(f"{m.path}.biases", g, (scales.dtype,), note + " (the dtype of the scales)")

    def _mlx_quant(self, m: Module, quantization: dict) -> Optional[Quant]:
        """How module m is stored: its per-path entry wins, else stored scales
        mean quantized with the settings their shapes imply."""
        entry = quantization.get(m.path)
        if entry is False or m.role not in QUANTIZABLE:
            return None
        if isinstance(entry, dict):
            return self._quant_entry(entry, f"quantization[{m.path!r}]")
        scales = self.tensors.get(f"{m.path}.scales")
        weight = self.tensors.get(f"{m.path}.weight")
        if scales is None or weight is None or not scales.shape or not weight.shape:
            return None
        inputs = m.shape[-1]
        groups, words = scales.shape[-1], weight.shape[-1]
        implied = {"bits": words * 32 // inputs, "group_size": inputs // groups if groups else 0}
        if not groups or inputs % groups or (words * 32) % inputs or _quant_error(implied):
            raise CheckpointError(
                f"{weight.file}: {m.path}.weight {list(weight.shape)} and scales "
                f"{list(scales.shape)} are not a quantization of {list(m.shape)}"
            )
        self._quant_entry(quantization, "quantization")  # the mode must be affine
        return Quant(implied["bits"], implied["group_size"])

    def _quant_entry(self, entry: dict, where: str) -> Quant:
        config_file = self.path / "config.json"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{config_file}: {where} must be an object, got {entry!r}")
        mode = entry.get("mode", "affine")
        if mode != "affine":
            raise CheckpointError(f"{config_file}: {where} uses mode {mode!r}; only 'affine' is supported")
        if error := _quant_error(entry):
            raise CheckpointError(f"{config_file}: {where} {error}")
        return Quant(entry["bits"], entry["group_size"])

    def read_expert(self, layer: int, e: int) -> tuple[QuantizedProjection, ...]:
        """Expert e of a layer as (gate, up, down), each [1, out, ...], as stored."""
        experts = self.experts[layer]
        return tuple(
            QuantizedProjection(
                *(self.read(f"{experts[p].module.path}.{a}", e)[None] for a in spec.ARRAYS),
                experts[p].quant.bits,
                experts[p].quant.group_size,
            )
            for p in spec.STOCK_PROJECTIONS
        )


class PackedCheckpoint(QuantizedCheckpoint):
    """A packed checkpoint: the experts of each layer in the packed format,
    their settings under spec.CONFIG_KEY; everything else as mlx-lm stores it."""

    kind = "packed"

    def __init__(self, path: Path, config: dict, model: MiniMaxShapes, tensors: dict[str, TensorInfo]):
        layers = spec.packed_layers(config, str(path / "config.json"))
        blocks = {block_path(i) for i in range(model.layers)}
        if not isinstance(layers, dict) or set(layers) != blocks:
            claimed = sorted(layers) if isinstance(layers, dict) else layers
            raise CheckpointError(
                f"{path / 'config.json'}: {spec.CONFIG_KEY}.{spec.CONFIG_LAYERS} must name exactly the "
                f"{model.layers} MoE blocks of num_hidden_layers={model.layers}, got {_short_list(claimed)}"
            )
        self.layers = layers
        super().__init__(path, config, model, tensors)

    def describe(self) -> str:
        return f"packed fused_moe checkpoint, format version {spec.FORMAT_VERSION}"

    def _stored_experts(self, m: Module, quantization: dict) -> Stored:
        block = block_path(m.layer)
        entry = self.layers.get(block)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: {spec.CONFIG_KEY} has no settings for {block}")
        proj = "down" if m.name == "down_proj" else "gate_up"
        q = self._quant_entry(entry.get(proj, {}), f"{spec.CONFIG_KEY}.layers[{block!r}].{proj}")
        scales = self.tensors.get(f"{block}.{spec.MODULE_NAME}.{proj}.scales")
        if scales is None:
            raise CheckpointError(f"{self.path}: missing tensor {block}.{spec.MODULE_NAME}.{proj}.scales")
        return Stored(m, q, scales.dtype)

    def _check_unit_experts(self, stored: list[Stored]) -> None:
        experts = unit_experts(stored)
        if experts:
            gate, down = experts["gate_proj"], experts["down_proj"]
            for t in packed_tensors(gate.module.layer, gate, down):
                self._info(t.name, t.shape, ("U32",) if t.params else (gate.dtype,),
                           f" ({spec.CONFIG_KEY} layer settings in config.json)")

    def read_expert(self, layer: int, e: int) -> tuple[QuantizedProjection, ...]:
        experts = self.experts[layer]
        names = iter(spec.tensor_names(block_path(layer)))
        arrays = {proj: [self.read(next(names), e)[None] for _ in spec.ARRAYS] for proj in spec.PROJECTIONS}
        gu, d = experts["gate_proj"].quant, experts["down_proj"].quant
        packed = PackedExperts(
            QuantizedProjection(*arrays["gate_up"], gu.bits, gu.group_size),
            QuantizedProjection(*arrays["down"], d.bits, d.group_size),
        )
        return unpack_experts(packed)


def _short_list(value, limit: int = 4) -> str:
    if isinstance(value, list) and len(value) > limit:
        return f"{value[:limit]!r} and {len(value) - limit} more"
    return printable(repr(value))


def _quant_error(entry: dict) -> Optional[str]:
    """Why `entry` is not an affine setting MLX can store, or None."""

    def exact(value, allowed) -> bool:
        return type(value) is int and value in allowed

    if exact(entry.get("bits"), AFFINE_BITS) and exact(entry.get("group_size"), AFFINE_GROUP_SIZES):
        return None
    return f"needs bits in {AFFINE_BITS} and group_size in {AFFINE_GROUP_SIZES}, got {entry!r}"


def dequantize_fp8(codes: mx.array, scale_inv: mx.array) -> mx.array:
    """e4m3 codes [m, n] times one scale per 128x128 block, rounded to bf16.

    As mlx-lm's sanitize: decode to bf16, multiply by the block's scale in the
    promoted dtype (float32 for float32 scales), then round once to bf16."""
    m, n = codes.shape
    w = mx.from_fp8(codes, dtype=mx.bfloat16)
    pad_m, pad_n = -m % FP8_BLOCK, -n % FP8_BLOCK
    if pad_m or pad_n:
        w = mx.pad(w, ((0, pad_m), (0, pad_n)))
    M, N = m + pad_m, n + pad_n
    w = w.reshape(M // FP8_BLOCK, FP8_BLOCK, N // FP8_BLOCK, FP8_BLOCK) * scale_inv[:, None, :, None]
    return w.reshape(M, N)[:m, :n].astype(mx.bfloat16)


def open_checkpoint(path) -> Checkpoint:
    """Opens and fully checks a checkpoint directory; reads no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    model = MiniMaxShapes.from_config(config, str(path / "config.json"))
    if not has_tokenizer(path):
        raise CheckpointError(f"{path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    tensors = read_checkpoint(path)
    if spec.CONFIG_KEY in config:
        kind = PackedCheckpoint
    elif "quantization" in config:
        kind = QuantizedCheckpoint
    elif any(re.search(rf"\.{BLOCK_ATTR}\.experts\.\d+\.w[123]\.weight$", t) for t in tensors):
        kind = HFCheckpoint
    else:
        raise CheckpointError(
            f"{path}: neither a Hugging Face MiniMax checkpoint (per-expert w1/w2/w3 "
            f"weights) nor an mlx-lm quantized one (\"quantization\" in config.json)"
        )
    return kind(path, config, model, tensors)
