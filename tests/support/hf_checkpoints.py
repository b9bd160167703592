"""Synthetic Hugging Face MiniMax-M2 (model_type minimax_m2) checkpoints.

They use the real tensor names: per-expert ``experts.E.w1|w2|w3.weight``,
an FP32 router gate and routing bias, ``weight_scale_inv`` beside every FP8
weight (one float32 scale per 128x128 block), the ``quantization_config`` and
``modules_to_not_convert`` of the published FP8 checkpoints, an extra
multi-token-prediction layer (which no MiniMax model uses), a tokenizer and a
generation config. Weights are stored either as FP8 e4m3 or as BF16.

Safetensors files are written here byte by byte, since neither numpy nor
MLX can write F8_E4M3 tensors.
"""

from __future__ import annotations

import json
import struct
from math import ceil
from pathlib import Path

import numpy as np

from support.minimax_models import SMALL, build_tokenizer

# Not multiples of 128 on purpose (H=192, q=6*32=192): the FP8 blocks at the
# edges are partial. D and H are multiples of every group size used (64).
SMALL_HF = dict(
    SMALL,
    architectures=["MiniMaxM2ForCausalLM"],
    model_type="minimax_m2",
    hidden_size=256,
    intermediate_size=192,
    num_attention_heads=6,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    num_local_experts=6,
    rope_theta=5000000.0,
    # Keys of the published config.json that mlx-lm does not read.
    qk_norm_type="per_layer",
    scoring_func="sigmoid",
    use_routing_bias=True,
    use_mtp=True,
    num_mtp_modules=1,
    mtp_transformer_layers=1,
    torch_dtype="bfloat16",
    bos_token_id=0,
    eos_token_id=1,
)

FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "float8_e4m3fn",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
}

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8"}


class Tensor:
    """A tensor to write: raw bytes with a safetensors dtype name."""

    def __init__(self, dtype: str, shape, data: bytes):
        self.dtype, self.shape, self.data = dtype, tuple(shape), data


def bf16(a: np.ndarray) -> Tensor:
    """float32 -> bfloat16 with round to nearest even, as bytes."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return Tensor("BF16", a.shape, rounded.tobytes())


def raw(a: np.ndarray, dtype: str | None = None) -> Tensor:
    return Tensor(dtype or _ST_DTYPES[a.dtype], a.shape, np.ascontiguousarray(a).tobytes())


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict | None = None) -> None:
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + len(t.data)]}
        pos += len(t.data)
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for t in tensors.values():
            f.write(t.data)


def fp8_codes(rng: np.random.Generator, shape) -> np.ndarray:
    """Random e4m3 codes with magnitudes below 2: clearing the exponent's top
    bit rules out NaN (exponent and mantissa all ones)."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8) & np.uint8(0xBF)


def _matrix(rng, name: str, shape, fp8: bool, out: dict, scale: float = 1.0) -> None:
    if fp8:
        out[name] = raw(fp8_codes(rng, shape), "F8_E4M3")
        blocks = (ceil(shape[0] / 128), ceil(shape[1] / 128))
        block_scale = scale * rng.uniform(0.005, 0.02, size=blocks).astype(np.float32)
        out[name.replace(".weight", ".weight_scale_inv")] = raw(block_scale.astype(np.float32))
    else:
        out[name] = bf16(scale * rng.normal(0, 0.02, size=shape).astype(np.float32))


def layer_tensors(config: dict, layer: int, rng: np.random.Generator, fp8: bool,
                  down_scale: float = 1.0) -> dict[str, Tensor]:
    D, H, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    p = f"model.layers.{layer}"
    t: dict[str, Tensor] = {}
    t[f"{p}.input_layernorm.weight"] = bf16(1 + 0.1 * rng.normal(size=D))
    t[f"{p}.post_attention_layernorm.weight"] = bf16(1 + 0.1 * rng.normal(size=D))
    for proj, shape in (("q_proj", (q, D)), ("k_proj", (kv, D)), ("v_proj", (kv, D)), ("o_proj", (D, q))):
        _matrix(rng, f"{p}.self_attn.{proj}.weight", shape, fp8, t)
    t[f"{p}.self_attn.q_norm.weight"] = bf16(1 + 0.1 * rng.normal(size=q))
    t[f"{p}.self_attn.k_norm.weight"] = bf16(1 + 0.1 * rng.normal(size=kv))
    moe = f"{p}.block_sparse_moe"
    t[f"{moe}.gate.weight"] = raw(rng.normal(0, 0.05, size=(E, D)).astype(np.float32))
    t[f"{moe}.e_score_correction_bias"] = raw(rng.normal(0, 0.05, size=E).astype(np.float32))
    for e in range(E):
        for w, shape in (("w1", (H, D)), ("w2", (D, H)), ("w3", (H, D))):
            _matrix(rng, f"{moe}.experts.{e}.{w}.weight", shape, fp8, t, down_scale if w == "w2" else 1.0)
    return t


def mtp_tensors(config: dict, rng, fp8: bool) -> dict[str, Tensor]:
    """A multi-token-prediction module after the last layer, as DeepSeek-style
    checkpoints store it; mlx-lm's MiniMax has no use for it."""
    D, L = config["hidden_size"], config["num_hidden_layers"]
    p = f"model.layers.{L}"
    t = {f"{p}.enorm.weight": bf16(np.ones(D)), f"{p}.hnorm.weight": bf16(np.ones(D))}
    _matrix(rng, f"{p}.eh_proj.weight", (D, 2 * D), fp8, t)
    return t


def write_hf_checkpoint(
    path: Path,
    config: dict = SMALL_HF,
    *,
    fp8: bool = True,
    mtp: bool = True,
    seed: int = 0,
    shard_names=None,
    tokenizer: bool = True,
    down_scale: dict | None = None,
) -> Path:
    """Writes a checkpoint with one shard per layer (plus one for the
    embedding, norm and head), listed in model.safetensors.index.json.
    `shard_names(i, n)` names shard i of n (default: Hugging Face's names).
    `down_scale` {layer: factor} scales those layers' expert down
    projections (a layer whose experts matter more)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = dict(config)
    if fp8:
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    D, V = config["hidden_size"], config["vocab_size"]
    groups = [{
        "model.embed_tokens.weight": bf16(rng.normal(0, 0.02, size=(V, D))),
        "model.norm.weight": bf16(1 + 0.1 * rng.normal(size=D)),
        "lm_head.weight": bf16(rng.normal(0, 0.02, size=(V, D))),
    }]
    n = config["num_hidden_layers"] + 1
    name_of = shard_names or (lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors")
    weight_map = {}
    for i in range(n):
        tensors = groups[0] if i == 0 else {}
        if i > 0:
            tensors = layer_tensors(config, i - 1, rng, fp8, (down_scale or {}).get(i - 1, 1.0))
            if i == n - 1 and mtp:
                tensors.update(mtp_tensors(config, rng, fp8))
        write_safetensors(path / name_of(i, n), tensors, {"format": "pt"})
        weight_map.update({k: name_of(i, n) for k in tensors})
        del tensors
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
    if tokenizer:
        build_tokenizer(V).save_pretrained(path)
    return path
