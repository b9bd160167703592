"""Opening and checking a checkpoint before any tensor data is read.

Three kinds, one class each:

* `HFCheckpoint`: a Hugging Face MiniMax-M2.x checkpoint (model_type
  minimax_m2) with per-expert ``experts.E.w1|w2|w3`` weights, each stored as
  FP8 e4m3 with a 128x128 ``weight_scale_inv`` or as a plain float tensor;
* `QuantizedCheckpoint`: an mlx-lm quantized checkpoint of any MoE family,
  its experts stacked (``switch_mlp`` and the like);
* `PackedCheckpoint`: a checkpoint in the packed format (spec.CONFIG_KEY in
  config.json), of any family.

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
from fused_moe.checkpoint.discovered import DiscoveredLayout, expert_stacks
from fused_moe.checkpoint.minimax import BLOCK_ATTR, MODEL_TYPES, MiniMaxShapes, block_path, expert_path
from fused_moe.checkpoint.modules import EXPERTS, NORM, QUANTIZABLE, ROUTING_BIAS, TENSOR, Module
from fused_moe.checkpoint.safetensors import TensorInfo, printable, read_tensor
from fused_moe.checkpoint.storage import (
    Quant,
    Stored,
    first_and_down,
    packed_tensors,
    quantized_shapes,
    stack_of,
    unit_experts,
)
from fused_moe.errors import CheckpointError
from fused_moe.packed import spec
from fused_moe.packed.experts import PackedExperts, QuantizedProjection, unpack_experts
from fused_moe.supported import AFFINE_BITS, AFFINE_GROUP_SIZES, FP_MODES

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
        if not isinstance(c, MiniMaxShapes):
            return f" for {m.role}"
        return (
            f" for {m.role} (config.json: D={c.hidden}, H={c.intermediate}, E={c.experts}, "
            f"V={c.vocab}, q={c.q_dim}, kv={c.kv_dim})"
        )


class HFCheckpoint(Checkpoint):
    """Hugging Face MiniMax weights in floating point or FP8, one tensor per expert."""

    kind = "hf"

    @classmethod
    def layout_of(cls, path: Path, config: dict, tensors: dict[str, TensorInfo]) -> MiniMaxShapes:
        return MiniMaxShapes.from_config(config, str(path / "config.json"))

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
    """An mlx-lm quantized checkpoint of any MoE family: `stored` says, per
    unit, how each module is stored (config.json's "quantization": a module's
    own entry, else the default its scales' shapes agree with), and
    `experts` holds each stack of experts' projections by stack path. A
    MiniMax checkpoint has every module's shape checked against config.json;
    any other family's experts are found by their tensor names."""

    kind = "mlx"

    def __init__(self, path: Path, config: dict, model, tensors: dict[str, TensorInfo]):
        super().__init__(path, config, model, tensors)
        quantization = self.config.get("quantization")
        if not isinstance(quantization, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: \"quantization\" must be an object")
        self.quantization = quantization
        self.stored: list[list[Stored]] = []
        for _, modules in self.model.units():
            stored = []
            for m in modules:
                if m.role in (NORM, ROUTING_BIAS):
                    info = self._info(m.tensor, m.shape, FLOAT_DTYPES, self._shape_note(m))
                    stored.append(Stored(m, None, info.dtype))
                elif m.role == TENSOR:
                    stored.append(Stored(m, None, self._info(m.tensor, m.shape, (self.tensors[m.tensor].dtype,)).dtype))
                elif m.role == EXPERTS:
                    stored.append(self._stored_experts(m))
                else:
                    stored.append(self._stored_module(m))
            self._check_unit_experts(stored)
            self.stored.append(stored)
        # Per stack of experts (its module path), its projections by name.
        self.experts = {stack_of(e): e for e in map(unit_experts, self.stored) if e}

    @classmethod
    def layout_of(cls, path: Path, config: dict, tensors: dict[str, TensorInfo]):
        """MiniMax's layout from config.json, or one read off the tensor names."""
        if config.get("model_type") in MODEL_TYPES:
            return MiniMaxShapes.from_config(config, str(path / "config.json"))
        quantization = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
        stacks = expert_stacks(tensors)
        if not stacks:
            raise CheckpointError(
                f"{path}: model_type {config.get('model_type')!r} has no stacked experts (no 3-D "
                f"*.gate_proj/up_proj/down_proj or *.fc1/fc2 weights): not an mlx-lm MoE checkpoint")
        shapes = {}
        for stack, projections in stacks.items():
            shapes[stack] = {}
            for p in projections:
                name = f"{stack}.{p}"
                weight = tensors[f"{name}.weight"]
                q = _quant_of(path, quantization, name)
                if q is None:
                    shapes[stack][p] = weight.shape  # a float stack: refused below, by name
                    continue
                E, out, words = weight.shape
                shapes[stack][p] = (E, out, words * 32 // q.bits)
        return DiscoveredLayout(tensors, stacks, shapes)

    def describe(self) -> str:
        return "mlx-lm quantized checkpoint"

    def _stored_module(self, m: Module) -> Stored:
        q = self._mlx_quant(m)
        dtype_of = self.tensors.get(f"{m.path}.scales" if q and q.mode == "affine" else m.tensor)
        s = Stored(m, q, dtype_of.dtype if dtype_of else "BF16")
        self._check_stored(s)
        return s

    def _stored_experts(self, m: Module) -> Stored:
        s = self._stored_module(m)
        if s.quant is None:
            raise CheckpointError(
                f"{self.path}: {m.path} is not quantized; convert the original "
                f"Hugging Face checkpoint instead"
            )
        bias = self.tensors.get(f"{m.path}.bias")
        if bias is not None:
            self._info(f"{m.path}.bias", m.shape[:-1], FLOAT_DTYPES, " (the experts' additive bias [E, out])")
        scale = self.tensors.get(f"{m.path}.global_scale")
        if scale is not None:
            self._info(f"{m.path}.global_scale", m.shape[:1], ("F32",), " (nvfp4's tensor scale per expert)")
        return Stored(m, s.quant, s.dtype, bias.dtype if bias else None, scale is not None)

    def _check_unit_experts(self, stored: list[Stored]) -> None:
        """Checks of a unit's experts as a whole (none for stock experts)."""

    def _check_stored(self, s: Stored) -> None:
        m = s.module
        if s.quant is None:
            self._info(m.tensor, m.shape, FLOAT_DTYPES, self._shape_note(m))
            return
        w, g = quantized_shapes(m.shape, s.quant)
        q = s.quant
        note = (f" for {q.bits}-bit" if q.mode == "affine" else f" for {q.mode}") + \
            f", group size {q.group_size}{self._shape_note(m)}"
        self._info(f"{m.path}.weight", w, ("U32",), note)
        if q.mode != "affine":
            self._info(f"{m.path}.scales", g, ("U8",), note)
            return
        scales = self._info(f"{m.path}.scales", g, FLOAT_DTYPES, note)
        self._info(f"{m.path}.biases", g, (scales.dtype,), note + " (the dtype of the scales)")

    def _mlx_quant(self, m: Module) -> Optional[Quant]:
        if m.role not in QUANTIZABLE:
            return None
        return _quant_of(self.path, self.quantization, m.path, self.tensors, m.shape[-1])

    def read_expert(self, stack: str, e: int) -> tuple[QuantizedProjection, ...]:
        """Expert e of a stack as its projections in stock order (gate, up,
        down or fc1, fc2), each [1, out, ...], as stored."""
        out = []
        for s in self.experts[stack].values():
            q = s.quant
            arrays = {a: self.read(f"{s.module.path}.{a}", e)[None] for a in q.arrays}
            extra = {"bias": self.read(f"{s.module.path}.bias", e)[None] if s.bias else None,
                     "global_scale": self.read(f"{s.module.path}.global_scale")[e:e + 1] if s.global_scale else None}
            out.append(QuantizedProjection(arrays["weight"], arrays["scales"], arrays.get("biases"), q.bits,
                                           q.group_size, q.mode, **extra))
        return tuple(out)


class PackedCheckpoint(QuantizedCheckpoint):
    """A packed checkpoint: each stack of experts in the packed format at its
    packed path, the settings under spec.CONFIG_KEY; everything else as
    mlx-lm stores it."""

    kind = "packed"

    def __init__(self, path: Path, config: dict, model, tensors: dict[str, TensorInfo]):
        self.packed = spec.packed_experts(config, str(path / "config.json"))
        self.version = config[spec.CONFIG_KEY][spec.CONFIG_FORMAT_VERSION]
        if isinstance(model, MiniMaxShapes):
            want = {model.packed_path(expert_path(i, "gate_proj").rpartition(".")[0]) for i in range(model.layers)}
            if set(self.packed) != want:
                raise CheckpointError(
                    f"{path / 'config.json'}: {spec.CONFIG_KEY} must describe exactly the {model.layers} MoE "
                    f"blocks of num_hidden_layers={model.layers}, got {_short_list(sorted(self.packed))}"
                )
        super().__init__(path, config, model, tensors)

    @classmethod
    def layout_of(cls, path: Path, config: dict, tensors: dict[str, TensorInfo]):
        if config.get("model_type") in MODEL_TYPES:
            return MiniMaxShapes.from_config(config, str(path / "config.json"))
        packed = spec.packed_experts(config, str(path / "config.json"))
        stacks, shapes = {}, {}
        for packed_path, specs in packed.items():
            first = next(iter(specs))
            names = spec.STOCK_PROJECTIONS if first == spec.GATE_UP else spec.STOCK_MLP_PROJECTIONS
            down = tensors.get(f"{packed_path}.{spec.DOWN}.weight")
            if down is None or len(down.shape) != 3:
                raise CheckpointError(f"{path}: missing tensor {packed_path}.{spec.DOWN}.weight (a 3-D [E, D, "
                                      f"H*bits/32]) for the packed experts config.json describes")
            E, D, words = down.shape
            H = words * 32 // specs[spec.DOWN].bits
            stack = DiscoveredLayout.stack_path(packed_path)
            stacks[stack] = names
            shapes[stack] = {n: (E, D, H) if n in ("down_proj", "fc2") else (E, H, D) for n in names}
        owned = {name for path, specs in packed.items() for proj in specs for name in tensors
                 if name.startswith(f"{path}.{proj}.")}
        return DiscoveredLayout(tensors, stacks, shapes, owned)

    def describe(self) -> str:
        return f"packed fused_moe checkpoint, format version {self.version}"

    def _stored_experts(self, m: Module) -> Stored:
        packed_path = self.model.packed_path(m.parent)
        specs = self.packed.get(packed_path)
        if specs is None:
            raise CheckpointError(f"{self.path / 'config.json'}: {spec.CONFIG_KEY} has no settings for {packed_path}")
        name = spec.DOWN if m.name in ("down_proj", "fc2") else next(iter(specs))
        p = specs[name]
        q = Quant(p.bits, p.group_size, p.mode)
        if error := _quant_error(q._asdict()):
            raise CheckpointError(f"{self.path / 'config.json'}: {spec.CONFIG_KEY} for {packed_path}.{name} {error}")
        scales = self.tensors.get(f"{packed_path}.{name}.scales")
        if scales is None:
            raise CheckpointError(f"{self.path}: missing tensor {packed_path}.{name}.scales")
        bias = self.tensors.get(f"{packed_path}.{name}.bias")
        return Stored(m, q, scales.dtype, (bias.dtype if bias else "BF16") if p.bias else None, p.global_scale)

    def _check_unit_experts(self, stored: list[Stored]) -> None:
        experts = unit_experts(stored)
        if experts:
            for t in packed_tensors(self.model.packed_path(stack_of(experts)), *first_and_down(experts)):
                dtypes = ("U32",) if t.params else ((t.dtype,) if t.dtype in ("U8", "F32") else FLOAT_DTYPES)
                self._info(t.name, t.shape, dtypes, f" ({spec.CONFIG_KEY} settings in config.json)")

    def read_expert(self, stack: str, e: int) -> tuple[QuantizedProjection, ...]:
        packed_path = self.model.packed_path(stack)
        projections = []
        for name, p in self.packed[packed_path].items():
            arrays = {a: self.read(f"{packed_path}.{name}.{a}", e)[None] for a in p.arrays() if a != "global_scale"}
            if p.global_scale:
                arrays["global_scale"] = self.read(f"{packed_path}.{name}.global_scale")[e:e + 1]
            projections.append(QuantizedProjection(
                arrays["weight"], arrays["scales"], arrays.get("biases"), p.bits, p.group_size, p.mode,
                arrays.get("bias"), arrays.get("global_scale")))
        packed = PackedExperts(*projections, gated=spec.GATE_UP in self.packed[packed_path])
        return tuple(unpack_experts(packed))


def _short_list(value, limit: int = 4) -> str:
    if isinstance(value, list) and len(value) > limit:
        return f"{value[:limit]!r} and {len(value) - limit} more"
    return printable(repr(value))


def _quant_error(entry: dict) -> Optional[str]:
    """Why `entry` is not a setting MLX can store, or None."""

    def exact(value, allowed) -> bool:
        return type(value) is int and value in allowed

    mode = entry.get("mode", "affine")
    if mode == "affine":
        if exact(entry.get("bits"), AFFINE_BITS) and exact(entry.get("group_size"), AFFINE_GROUP_SIZES):
            return None
        return f"needs bits in {AFFINE_BITS} and group_size in {AFFINE_GROUP_SIZES}, got {entry!r}"
    if mode not in FP_MODES:
        return f"uses mode {mode!r}; MLX's modes are {('affine', *FP_MODES)}"
    want = FP_MODES[mode]
    if entry.get("bits", want["bits"]) == want["bits"] and entry.get("group_size") == want["group_size"]:
        return None
    return f"mode {mode} needs bits {want['bits']} and group_size {want['group_size']}, got {entry!r}"


def _quant_of(path: Path, quantization: dict, module: str, tensors: Optional[dict] = None,
              inputs: Optional[int] = None) -> Optional[Quant]:
    """How `module` is stored per config.json's "quantization": its own
    entry (an object, or false for floating point) wins; else, where its
    scales are stored, the default, checked against their shapes when the
    input width is known."""
    config_file = path / "config.json"

    def parse(entry, where: str) -> Quant:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{config_file}: {where} must be an object, got {entry!r}")
        if error := _quant_error(entry):
            raise CheckpointError(f"{config_file}: {where} {error}")
        mode = entry.get("mode", "affine")
        return Quant(entry.get("bits", FP_MODES.get(mode, {}).get("bits")), entry["group_size"], mode)

    entry = quantization.get(module)
    if entry is False:
        return None
    if isinstance(entry, dict):
        return parse(entry, f"quantization[{module!r}]")
    if tensors is None:
        return parse(quantization, "quantization")
    scales, weight = tensors.get(f"{module}.scales"), tensors.get(f"{module}.weight")
    if scales is None or weight is None or not scales.shape or not weight.shape:
        return None
    default = parse(quantization, "quantization")
    groups, words = scales.shape[-1], weight.shape[-1]
    implied = {"mode": default.mode, "bits": words * 32 // inputs if inputs else 0,
               "group_size": inputs // groups if groups and inputs else 0}
    if not groups or inputs % groups or (words * 32) % inputs or _quant_error(implied):
        raise CheckpointError(
            f"{weight.file}: {module}.weight {list(weight.shape)} and scales "
            f"{list(scales.shape)} are not a quantization of {inputs} inputs in mode {default.mode}"
        )
    return Quant(implied["bits"], implied["group_size"], default.mode)


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
    if config.get("model_type") in MODEL_TYPES or not ({"quantization", spec.CONFIG_KEY} & set(config)):
        # A MiniMax config (or a float source, which must be MiniMax) is
        # checked before any file is opened.
        MiniMaxShapes.from_config(config, str(path / "config.json"))
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
    return kind(path, config, kind.layout_of(path, config, tensors), tensors)
