"""Synthetic mlx-lm MiniMax models and checkpoints for the tests.

Real mlx-lm `Model`s with random weights, quantized with mlx-lm's own
`quantize_model` under the seed recipe, saved as checkpoints with a small
byte-level BPE tokenizer trained here, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.models import minimax
from mlx_lm.utils import quantize_model, save_config, save_model

# Small enough for every test; both bit widths still run (3 layers).
SMALL = dict(
    model_type="minimax",
    hidden_size=128,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    num_experts_per_tok=4,
    num_local_experts=8,
    shared_intermediate_size=0,
    num_hidden_layers=3,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rotary_dim=16,
    vocab_size=320,
    tie_word_embeddings=False,
    use_qk_norm=True,
)

# The REAP expert shapes (D=3072, H=1536) with few experts and layers, so the
# 4-bit (first/last) and 3-bit (middle) kernels both run at full width.
FULL_WIDTH = dict(
    SMALL,
    hidden_size=3072,
    intermediate_size=1536,
    num_attention_heads=24,
    num_key_value_heads=4,
    head_dim=128,
    rotary_dim=64,
    num_experts_per_tok=8,
    num_local_experts=24,
)

SEED_GROUP_SIZE = 64

# The token ids every model test feeds (all below SMALL's vocabulary).
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]


def seed_recipe(num_layers: int):
    """mlx-lm quant_predicate of the seed recipe: 4-bit experts in the first
    and the last layer, 3-bit elsewhere, 8-bit attention, embed and lm_head,
    an unquantized router, group size 64."""

    def predicate(path: str, module: nn.Module):
        if path.endswith("block_sparse_moe.gate"):
            return False
        if ".switch_mlp." in path:
            layer = int(path.split(".")[2])
            bits = 4 if layer in (0, num_layers - 1) else 3
            return {"group_size": SEED_GROUP_SIZE, "bits": bits, "mode": "affine"}
        return {"group_size": SEED_GROUP_SIZE, "bits": 8, "mode": "affine"}

    return predicate


def build_model(config: dict, *, seed: int = 0, dtype=mx.bfloat16) -> tuple[nn.Module, dict]:
    """A random MiniMax `Model` quantized under the seed recipe, and its
    mlx-lm config (with the per-path "quantization" entries)."""
    mx.random.seed(seed)
    config = copy.deepcopy(config)
    model = minimax.Model(minimax.ModelArgs.from_dict(config))
    # A routing bias that matters: without it the biased top-k is untested.
    for layer in model.layers:
        moe = layer.block_sparse_moe
        moe.e_score_correction_bias = 0.05 * mx.random.normal(moe.e_score_correction_bias.shape)
    # As mlx_lm.convert casts: everything but the routing bias (kept fp32).
    model.update(
        tree_map_with_path(
            lambda path, a: a.astype(dtype) if model.cast_predicate(path) else a,
            model.parameters(),
        )
    )
    # mlx-lm writes per-path entries only for an already partially quantized
    # config; start from an explicit default so every path is recorded.
    config["quantization"] = {"group_size": SEED_GROUP_SIZE, "bits": 8, "mode": "affine"}
    model, config = quantize_model(
        model,
        config,
        SEED_GROUP_SIZE,
        8,
        quant_predicate=seed_recipe(config["num_hidden_layers"]),
    )
    mx.eval(model.parameters())
    return model, config


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` entries, trained on
    a fixed text, wrapped the way Hugging Face saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "The quick brown fox jumps over the lazy dog. " * 4,
        "Mixture of experts models route every token to a few experts. " * 4,
        "Hello world, this is a tiny tokenizer for tests. " * 4,
    ]
    tok.train_from_iterator(text, trainer)
    # Pad the vocabulary to the model's size, so every logit has a token.
    while tok.get_vocab_size() < vocab_size:
        tok.add_tokens([f"<extra_{tok.get_vocab_size()}>"])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_checkpoint(model: nn.Module, config: dict, path: Path) -> Path:
    """Writes a stock mlx-lm checkpoint: weights, config.json, tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(copy.deepcopy(config), path / "config.json")
    build_tokenizer(config["vocab_size"]).save_pretrained(path)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": 1}, f)
    return path


def make_checkpoint(path: Path, config: dict = SMALL, *, seed: int = 0) -> Path:
    """`build_model` then `save_checkpoint`."""
    model, config = build_model(config, seed=seed)
    return save_checkpoint(model, config, path)


def tiny_llama() -> nn.Module:
    """A model that is not MiniMax, for the errors that must say so."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=32, num_key_value_heads=2,
    )
    return llama.Model(args)
