"""fused-moe generate: load and patch an mlx-lm MoE model, then run mlx-lm's
generation, which prints the text and mlx-lm's usual speed summary.

Under mlx.launch (more than one rank) the model is sharded over the ranks
with tensor parallelism, and only rank 0 prints."""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from mlx_lm import generate
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.sample_utils import make_sampler

from fused_moe.models.load import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (stock mlx-lm or packed)")
    parser.add_argument("--prompt", required=True, help="prompt text, or '-' to read it from stdin")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="use the prompt as is, even if the tokenizer has a chat template",
    )
    # mlx-lm's quantized KV cache; 4 and 8 bits run on the fused attention.
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="quantize the KV cache to this many bits (mlx-lm's QuantizedKVCache; 4 and 8 run on the "
        "fused kernel, other bits on MLX's own attention); default: no quantization",
    )
    parser.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV cache (default: 64)")
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=None,
        help="the cache is quantized once it holds this many positions (default: mlx-lm's, 5000)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # Under mlx.launch every rank holds a slice of the model (tensor
    # parallelism) and runs the same steps; only rank 0 prints.
    group = mx.distributed.init()
    if group.size() > 1:
        model, tokenizer = load(args.model, tensor_group=group)
    else:
        model, tokenizer = load(args.model)
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        tokens = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    else:
        tokens = tokenizer.encode(prompt)
    generate(
        model,
        tokenizer,
        tokens,
        verbose=group.rank() == 0,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START if args.quantized_kv_start is None else args.quantized_kv_start,
    )
    return 0
