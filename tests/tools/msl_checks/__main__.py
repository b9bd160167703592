"""python -m tests.tools.msl_checks [--cache DIR]: runs checks a, b and c on the
installed extension's embedded source and the checkout's host code, and
prints what each checked; exits 1 on the first failure."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import CheckFailed, check_host_code, check_shipped, macos_wheel


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tools.msl_checks", description=__doc__)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fused_moe" / "msl_checks",
                   help="where the macOS mlx-metal wheel is kept (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        try:
            t = time.perf_counter()
            names = check_shipped(work / "ab")
            print(f"a. address-space-strict compile: all {len(names)} kernels of the allow-list "
                  f"instantiated, no error\n"
                  "b. MSL lint of their ASTs: no lambda, goto, new/delete, throw/try, double, virtual, "
                  f"thread_local, recursion or member function without `thread` ({time.perf_counter() - t:.1f} s)")
            t = time.perf_counter()
            symbols = check_host_code(macos_wheel(args.cache), work / "c")
            print(f"c. Metal host code against MLX's macOS headers: type-checks; all {len(symbols)} "
                  f"mlx:: symbols it references are exported by libmlx.dylib "
                  f"({time.perf_counter() - t:.1f} s)")
        except CheckFailed as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
