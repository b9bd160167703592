"""fused-moe convert SRC DST: the command-line face of fused_moe.convert."""

from __future__ import annotations

import argparse
import sys

from fused_moe.conversion.calibration import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS
from fused_moe.conversion.pipeline import convert
from fused_moe.conversion.recipes import RECIPES
from fused_moe.errors import ConversionError
from fused_moe.quant import calibrate as cal
from fused_moe.supported import AFFINE_GROUP_SIZES, FP_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source checkpoint directory (Hugging Face MiniMax, or mlx-lm "
                        "quantized or packed of any MoE family)")
    parser.add_argument("dst", metavar="DST", help="destination directory (must not exist, unless --overwrite)")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="quantization recipe for a Hugging Face source: "
        + "; ".join(f"{n}: {r.description}" for n, r in RECIPES.items()),
    )
    parser.add_argument("--bits", type=int, help="quantize every weight but the router at B bits (Hugging Face source)")
    parser.add_argument(
        "--group-size", type=int, help=f"group size with --bits (default 64; one of {AFFINE_GROUP_SIZES})"
    )
    parser.add_argument(
        "--mode", choices=("affine", *FP_MODES),
        help="quantize every weight but the router in this MLX mode (Hugging Face source), like mlx-lm's "
        "--q-mode; the fp modes have their own bits and group size",
    )
    parser.add_argument(
        "--to", choices=("packed", "stock"), default="packed",
        help="packed fused_moe checkpoint (default), or a plain mlx-lm one",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true", help="check a sample of experts against the source before finishing")
    parser.add_argument(
        "--calibrate", metavar="TEXT",
        help="quantize with statistics of the layers' inputs on this text (.txt, .jsonl with a \"text\" field, "
        "or a folder of them), layer by layer; Hugging Face sources only (docs/calibration.md)",
    )
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, metavar="N",
                        help=f"at most N calibration tokens, 10%% held out (default {DEFAULT_CALIB_TOKENS})")
    parser.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN, metavar="L",
                        help=f"tokens per calibration sequence (default {DEFAULT_CALIB_SEQ_LEN})")
    parser.add_argument(
        "--calib-expert-stats", choices=cal.STATISTICS, metavar="KIND",
        help=f"with --calibrate: the experts' statistics, {' or '.join(cal.STATISTICS)} (full: per-expert hessians, "
        f"GPTQ; diagonal: E[x^2], the weighted search; default {cal.EXPERT_STATISTICS})")
    parser.add_argument(
        "--calib-shrinkage", type=float, metavar="TOKENS",
        help=f"with --calibrate: tokens at which an expert's own statistics weigh as much as its prior "
        f"(default {cal.SHRINKAGE_TOKENS:g})")
    parser.add_argument(
        "--calib-min-expert-tokens", type=int, metavar="N",
        help=f"with --calibrate: experts routed fewer tokens get samples from near misses (tokens that ranked "
        f"them just below their top k) up to N, for their statistics only (default {cal.MIN_EXPERT_TOKENS})")
    parser.add_argument(
        "--bits-budget", metavar="BPW",
        help="with --calibrate (the seed-3.7bit recipe outside the experts): choose each layer's expert widths, "
        "gate/up and down, among 2, 3, 4, 5, 6 and 8 bits by their error on the calibration text, so that the "
        "checkpoint's bits per weight is at most BPW and as close as the widths allow (seed-3.7bit itself is "
        "3.676 on MiniMax-M2.5-REAP; docs/calibration.md)")


def _expert_calibration(args: argparse.Namespace):
    """The --calib-expert-* options (None where none is given)."""
    given = {k: v for k, v in (("statistics", args.calib_expert_stats), ("shrinkage", args.calib_shrinkage),
                               ("min_tokens", args.calib_min_expert_tokens)) if v is not None}
    if not given:
        return None
    try:
        return cal.ExpertCalibration(**given)
    except ValueError as e:
        raise ConversionError(f"--calib-expert-stats/--calib-shrinkage/--calib-min-expert-tokens: {e}") from None


def run(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        convert(
            args.src, args.dst, recipe=args.recipe, bits=args.bits, group_size=args.group_size, mode=args.mode,
            to=args.to, overwrite=args.overwrite, verify=args.verify, calibrate=args.calibrate,
            calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
            calib_experts=_expert_calibration(args), bits_budget=args.bits_budget,
        )
    except KeyboardInterrupt:
        print(f"fused-moe convert: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    return 0
