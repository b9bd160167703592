"""The fused-moe command line (also python -m fused_moe).

Each subcommand lives in its own module of this package, which provides
add_arguments(parser) and run(args, extra) -> int. A subcommand's module is
imported only when that subcommand runs, so fused-moe --help stays fast.
Errors in the user's input (fused_moe.errors.EXPECTED_ERRORS) are one line
on stderr and exit status 1; --debug shows their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from fused_moe._version import __version__
from fused_moe.errors import EXPECTED_ERRORS

# name -> (module, one-line help). `extra` is the list of arguments the
# subcommand did not declare; only subcommands listed in PASS_THROUGH get any.
SUBCOMMANDS = {
    "convert": ("fused_moe.cli.convert", "convert a MoE checkpoint to the packed format (or back)"),
    "generate": ("fused_moe.cli.generate", "generate text with a patched mlx-lm MoE model"),
    "server": ("fused_moe.cli.server", "serve a patched mlx-lm MoE model with mlx_lm.server"),
    "doctor": ("fused_moe.cli.doctor", "check this machine's kernels and speed, for a bug report"),
    "demo": ("fused_moe.cli.demo", "convert, generate and serve a tiny synthetic model"),
}
PASS_THROUGH = {"server"}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-moe", description="Fused low-bit Mixture-of-Experts kernels for MLX: the command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported to declare options.
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
            sub_parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        command = None
    parser = _parser(command)
    if command in PASS_THROUGH:
        args, extra = parser.parse_known_args(argv)
    else:
        args, extra = parser.parse_args(argv), []
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args, extra) or 0)
    except EXPECTED_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"fused-moe {args.command}: error: {e}", file=sys.stderr)
        return 1
