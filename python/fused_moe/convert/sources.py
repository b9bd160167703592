"""Opening and checking a source checkpoint before anything is written.

Three kinds of source:

* ``hf``: a Hugging Face MiniMax-M2.x checkpoint (model_type minimax_m2) with
  per-expert ``experts.E.w1|w2|w3`` weights, each stored as FP8 e4m3 with a
  128x128 ``weight_scale_inv`` or as a plain float tensor;
* ``mlx``: an mlx-lm quantized checkpoint with stacked ``switch_mlp`` experts;
* ``packed``: a checkpoint this converter wrote (format.CONFIG_KEY in config.json).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path
from typing import Optional

import mlx.core as mx

from fused_moe import format as fmt
from fused_moe.convert.errors import ConversionError
from fused_moe.convert.layout import Stored, packed_tensors, quantized_shapes
from fused_moe.convert.model import EXPERTS, NORM, QUANTIZABLE, ROUTING_BIAS, MiniMax, Module, block_path
from fused_moe.convert.recipes import AFFINE_BITS, AFFINE_GROUP_SIZES, Quant
from fused_moe.convert.safetensors_io import INDEX_NAME, TensorInfo, load_json, printable, read_header, read_tensor

HF, MLX, PACKED = "hf", "mlx", "packed"
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_BLOCK = 128
# Hugging Face names of the expert projections.
HF_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

# Files copied unchanged next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken", "tiktoken.model")
COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "*.tiktoken", "tiktoken.model", "chat_template*", "generation_config.json",
)


def read_checkpoint(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, after checking that the index
    and the shards agree. Without an index, every *.safetensors file counts."""
    index_file = path / INDEX_NAME
    if index_file.exists():
        index = load_json(_read_bytes(index_file), index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_file}: corrupt index (no \"weight_map\" object)")
        for tensor, name in weight_map.items():
            # A shard is a file of this directory: no paths, so an index
            # cannot make us read /etc/passwd or ../other-model.
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise ConversionError(
                    f"{index_file}: tensor {printable(tensor)} is placed in {printable(repr(name))}, "
                    f"which is not a file name in {path}"
                )
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{path}: no {INDEX_NAME} and no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        shard = path / name
        if not shard.exists():
            raise ConversionError(f"{index_file}: lists shard {name}, which does not exist in {path}")
        for tensor, info in read_header(shard).items():
            if tensor in tensors:
                raise ConversionError(f"{shard}: tensor {tensor} is also in {tensors[tensor].file.name}")
            if weight_map is not None and weight_map.get(tensor) != name:
                where = weight_map.get(tensor)
                raise ConversionError(
                    f"{shard}: holds tensor {tensor}, which the index "
                    + (f"places in {where}" if where else "does not list")
                )
            tensors[tensor] = info
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in tensors:
                raise ConversionError(f"{index_file}: lists tensor {tensor} in {name}, which does not hold it")
    return tensors


@dataclass
class Source:
    path: Path
    config: dict
    kind: str
    model: MiniMax
    tensors: dict[str, TensorInfo]
    # Per unit, how the source stores each module (mlx and packed sources).
    stored: Optional[list[list[Stored]]] = None
    fp8: bool = False
    used: set = field(default_factory=set)

    @property
    def dropped(self) -> list[str]:
        """Source tensors the model does not use (e.g. multi-token prediction)."""
        return sorted(set(self.tensors) - self.used)

    def describe(self) -> str:
        if self.kind == HF:
            storage = "FP8 e4m3 with 128x128 weight_scale_inv" if self.fp8 else "floating point"
            return f"Hugging Face {self.config['model_type']} checkpoint, {storage}"
        if self.kind == MLX:
            return "mlx-lm quantized checkpoint"
        return f"packed fused_moe checkpoint, format version {fmt.FORMAT_VERSION}"

    # ---------------------------------------------------------------- checks

    def _info(self, name: str, shape: tuple, dtypes: tuple[str, ...], what: str = "") -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ConversionError(f"{self.path}: missing tensor {name}{what}")
        if info.shape != tuple(shape):
            raise ConversionError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                f"{list(shape)}{what}"
            )
        if info.dtype not in dtypes:
            raise ConversionError(
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

    def _check_hf_weight(self, m: Module, name: str, shape: tuple) -> None:
        matrix = len(shape) == 2
        allowed = FLOAT_DTYPES + (("F8_E4M3",) if matrix else ())
        info = self._info(name, shape, allowed, self._shape_note(m))
        scale = name.replace(".weight", ".weight_scale_inv")
        if info.dtype == "F8_E4M3":
            blocks = (ceil(shape[0] / FP8_BLOCK), ceil(shape[1] / FP8_BLOCK))
            self._info(scale, blocks, FLOAT_DTYPES, f" (one scale per {FP8_BLOCK}x{FP8_BLOCK} block of {name})")
            self.fp8 = True
        elif matrix and scale in self.tensors:
            raise ConversionError(f"{self.tensors[scale].file}: {scale} belongs to {name}, which is {info.dtype}, not F8_E4M3")

    def _check_hf(self) -> None:
        for m in self.model.modules():
            if m.role == EXPERTS:
                layer, proj = m.layer, m.path.rsplit(".", 1)[1]
                for e in range(self.model.experts):
                    self._check_hf_weight(m, self.hf_expert_name(layer, proj, e), m.shape[1:])
            else:
                self._check_hf_weight(m, m.tensor, m.shape)
        qc = self.config.get("quantization_config") or {}
        says_fp8 = qc.get("quant_method") == "fp8"
        if says_fp8 != self.fp8:
            raise ConversionError(
                f"{self.path / 'config.json'}: quantization_config says "
                f"quant_method={qc.get('quant_method')!r}, but the weights are "
                + ("F8_E4M3" if self.fp8 else "not F8_E4M3")
            )
        if self.fp8 and list(qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
            raise ConversionError(
                f"{self.path / 'config.json'}: weight_block_size {qc['weight_block_size']} is not supported; "
                f"only {FP8_BLOCK}x{FP8_BLOCK} blocks"
            )

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
        """How an mlx-lm checkpoint stores module m: its per-path entry wins,
        else stored scales mean quantized with the settings their shapes imply."""
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
            raise ConversionError(
                f"{weight.file}: {m.path}.weight {list(weight.shape)} and scales "
                f"{list(scales.shape)} are not a quantization of {list(m.shape)}"
            )
        self._quant_entry(quantization, "quantization")  # the mode must be affine
        return Quant(implied["bits"], implied["group_size"])

    def _quant_entry(self, entry: dict, where: str) -> Quant:
        config_file = self.path / "config.json"
        if not isinstance(entry, dict):
            raise ConversionError(f"{config_file}: {where} must be an object, got {entry!r}")
        mode = entry.get("mode", "affine")
        if mode != "affine":
            raise ConversionError(f"{config_file}: {where} uses mode {mode!r}; only 'affine' is supported")
        if error := _quant_error(entry):
            raise ConversionError(f"{config_file}: {where} {error}")
        return Quant(entry["bits"], entry["group_size"])

    def _check_mlx(self, packed: bool) -> None:
        quantization = self.config.get("quantization")
        if not isinstance(quantization, dict):
            raise ConversionError(f"{self.path / 'config.json'}: \"quantization\" must be an object")
        layers = {}
        if packed:
            fused = self.config[fmt.CONFIG_KEY]
            version = fused.get(fmt.CONFIG_FORMAT_VERSION) if isinstance(fused, dict) else None
            if type(version) is not int or version != fmt.FORMAT_VERSION:
                raise ConversionError(
                    f"{self.path / 'config.json'}: {fmt.CONFIG_KEY}.{fmt.CONFIG_FORMAT_VERSION} is "
                    f"{version!r}; this fused_moe reads version {fmt.FORMAT_VERSION}"
                )
            layers = fused.get(fmt.CONFIG_LAYERS)
            blocks = {block_path(i) for i in range(self.model.layers)}
            if not isinstance(layers, dict) or set(layers) != blocks:
                claimed = sorted(layers) if isinstance(layers, dict) else layers
                raise ConversionError(
                    f"{self.path / 'config.json'}: {fmt.CONFIG_KEY}.{fmt.CONFIG_LAYERS} must name exactly the "
                    f"{self.model.layers} MoE blocks of num_hidden_layers={self.model.layers}, got {_short_list(claimed)}"
                )
        self.stored = []
        for _, modules in self.model.units():
            stored = []
            for m in modules:
                if m.role in (NORM, ROUTING_BIAS):
                    info = self._info(m.tensor, m.shape, FLOAT_DTYPES, self._shape_note(m))
                    stored.append(Stored(m, None, info.dtype))
                    continue
                if packed and m.role == EXPERTS:
                    stored.append(self._packed_expert(m, layers))
                    continue
                q = self._mlx_quant(m, quantization)
                if m.role == EXPERTS and q is None:
                    raise ConversionError(
                        f"{self.path}: {m.path} is not quantized; convert the original "
                        f"Hugging Face checkpoint instead"
                    )
                dtype_of = self.tensors.get(f"{m.path}.scales" if q else m.tensor)
                s = Stored(m, q, dtype_of.dtype if dtype_of else "BF16")
                self._check_stored(s)
                stored.append(s)
            if packed and any(s.module.role == EXPERTS for s in stored):
                gate = next(s for s in stored if s.module.path.endswith("gate_proj"))
                down = next(s for s in stored if s.module.path.endswith("down_proj"))
                for t in packed_tensors(gate.module.layer, gate, down):
                    self._info(t.name, t.shape, ("U32",) if t.params else (gate.dtype,),
                               f" ({fmt.CONFIG_KEY} layer settings in config.json)")
            self.stored.append(stored)

    def _packed_expert(self, m: Module, layers: dict) -> Stored:
        block = block_path(m.layer)
        entry = layers.get(block)
        if not isinstance(entry, dict):
            raise ConversionError(f"{self.path / 'config.json'}: {fmt.CONFIG_KEY} has no settings for {block}")
        proj = "down" if m.path.endswith("down_proj") else "gate_up"
        q = self._quant_entry(entry.get(proj, {}), f"{fmt.CONFIG_KEY}.layers[{block!r}].{proj}")
        scales = self.tensors.get(f"{block}.{fmt.MODULE_NAME}.{proj}.scales")
        if scales is None:
            raise ConversionError(f"{self.path}: missing tensor {block}.{fmt.MODULE_NAME}.{proj}.scales")
        return Stored(m, q, scales.dtype)

    # ---------------------------------------------------------------- reads

    @staticmethod
    def hf_expert_name(layer: int, projection: str, expert: int) -> str:
        return f"{block_path(layer)}.experts.{expert}.{HF_EXPERT_NAMES[projection]}.weight"

    def read_float(self, name: str) -> mx.array:
        """A Hugging Face weight in floating point, dequantized from FP8 exactly
        as mlx-lm's MiniMax `sanitize` does when it is stored in FP8."""
        info = self.tensors[name]
        w = read_tensor(info)
        if info.dtype != "F8_E4M3":
            return w
        scale_inv = read_tensor(self.tensors[name.replace(".weight", ".weight_scale_inv")])
        return dequantize_fp8(w, scale_inv)


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


# config.json and the index are a few MB at most.
_MAX_JSON_BYTES = 100 << 20


def _read_bytes(path: Path) -> bytes:
    """A small JSON file's bytes, refusing (before reading) one too large."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConversionError(f"{path}: not a regular file")
        size = st.st_size
        if size > _MAX_JSON_BYTES:
            raise ConversionError(f"{path}: {size} bytes; at most {_MAX_JSON_BYTES} accepted")
        return path.read_bytes()
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from e


def read_config(path: Path) -> dict:
    """A checkpoint directory's config.json, parsed as untrusted input."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise ConversionError(f"{path}: no config.json")
    config = load_json(_read_bytes(config_file), config_file)
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file}: not a JSON object")
    return config


def has_tokenizer(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES)


def open_source(path: Path) -> Source:
    """Opens and fully checks a source checkpoint; reads no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    config_file = path / "config.json"
    model = MiniMax.from_config(config, str(config_file))
    if not has_tokenizer(path):
        raise ConversionError(f"{path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    tensors = read_checkpoint(path)
    if fmt.CONFIG_KEY in config:
        kind = PACKED
    elif "quantization" in config:
        kind = MLX
    elif any(re.search(r"\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$", t) for t in tensors):
        kind = HF
    else:
        raise ConversionError(
            f"{path}: neither a Hugging Face MiniMax checkpoint (per-expert w1/w2/w3 "
            f"weights) nor an mlx-lm quantized one (\"quantization\" in config.json)"
        )
    source = Source(path, config, kind, model, tensors)
    if kind == HF:
        source._check_hf()
    else:
        source._check_mlx(packed=kind == PACKED)
    return source
