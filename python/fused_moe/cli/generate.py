"""fused-moe generate: load and patch an mlx-lm MoE model, then run mlx-lm's
generation, which prints the text and mlx-lm's usual speed summary.

Under mlx.launch (more than one rank) the model is sharded over the ranks
with tensor parallelism, and only rank 0 prints."""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from mlx_lm import generate
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
    )
    return 0
