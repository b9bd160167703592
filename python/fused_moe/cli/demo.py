"""fused-moe demo: convert, generate and serve a tiny synthetic model, to see
the whole flow in about a minute without downloading one."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fused_moe import demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", metavar="DIR", help="keep the checkpoints in DIR (default: a temporary directory)")
    parser.add_argument("--no-server", action="store_true", help="skip the server step")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.dir:
        demo.run(Path(args.dir), serve=not args.no_server)
        return 0
    with tempfile.TemporaryDirectory(prefix="fused-moe-demo-") as tmp:
        demo.run(Path(tmp), serve=not args.no_server)
    return 0
