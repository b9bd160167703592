"""python -m tests.tools.fuzz [--minutes M | --seconds S] [--seed S] [--case SEED]
[--backends cpu,metal,metal_emulator] [--all-isas]

Runs the differential fuzzer (tests/tools/fuzz/__init__.py) for a time budget and
prints, per backend, the number of cases run; any failure prints its case and
the command that reproduces it, and the exit status is 1. --all-isas runs the
CPU cases again under every other CPU level of this build, one subprocess per
level (FUSED_MOE_ISA is read once per process), sharing the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from pathlib import Path

from . import backends, run, run_case

ROOT = Path(__file__).resolve().parents[3]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tools.fuzz")
    p.add_argument("--minutes", type=float)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", type=int, help="run only the case of this seed")
    p.add_argument("--backends", default="cpu,metal,metal_emulator")
    p.add_argument("--all-isas", action="store_true")
    p.add_argument("--json", help="write the counts to this file")
    args = p.parse_args(argv)
    chosen = backends(args.backends.split(","))
    if args.case is not None:
        failures = run_case(args.case, chosen)
        print("\n".join(failures) or f"case {args.case}: ok on {[b.name for b in chosen]}")
        return 1 if failures else 0
    seconds = args.minutes * 60 if args.minutes is not None else args.seconds
    results = []
    others = []
    if args.all_isas:
        from fused_moe import _ext

        import fused_moe

        others = [i for i in _ext.available_cpu_isas() if i != fused_moe.cpu_isa()]
    share = seconds / (1 + len(others))
    results.append(run(args.seed, share, chosen))
    for isa in others:
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fuzz-{os.getpid()}-{isa}.json")
        cmd = [sys.executable, "-m", "tests.tools.fuzz", "--seconds", str(share), "--seed", str(args.seed),
               "--backends", "cpu", "--json", out]
        r = subprocess.run(cmd, env=dict(os.environ, FUSED_MOE_ISA=isa), cwd=ROOT,
                           timeout=share * 3 + 120, stdout=subprocess.PIPE, text=True)
        # Its failures, not its summary line: that is printed below with the others.
        print("".join(line for line in r.stdout.splitlines(True) if not line.startswith("fuzz: CPU level")), end="")
        with open(out) as f:
            results.append(json.load(f))
        os.unlink(out)
        if r.returncode not in (0, 1):
            results[-1]["failures"].append(f"FUSED_MOE_ISA={isa} subprocess exited {r.returncode}")
    failures = [f for r in results for f in r["failures"]]
    for r in results:
        counts = ", ".join(f"{name} {n}" for name, n in r["per_backend"].items())
        print(f"fuzz: CPU level {r['isa']}: {r['cases']} cases in {r['seconds']:.0f} s ({counts}), "
              f"{len(r['failures'])} failed (seed {args.seed})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
