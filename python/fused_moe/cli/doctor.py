"""fused-moe doctor: check this machine's kernels and speed, for a bug report.

Prints a short table and, with --json PATH, writes the full record; exits
with status 1 if any kernel gives a wrong result.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx

from fused_moe import doctor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--device", choices=("cpu", "gpu"),
                        help="the device to check (default: MLX's default device)")
    parser.add_argument("--quick", action="store_true", help="time one token only")
    parser.add_argument("--no-speed", action="store_true", help="check correctness only")
    parser.epilog = ("On a Mac, run `fused-moe doctor --json report.json` and attach report.json to an "
                     "issue: it is the first run of the Metal kernels on your GPU.")


def _print(record: dict) -> None:
    h = record["header"]
    print(f"fused_moe {h['fused_moe']}, mlx {h['mlx']}, Python {h['python']}, {h['os']} {h['machine']}")
    cpu = f"{h['processor'] or 'CPU'}, {h['cpu_count']} cores, {h['memory_gb']} GB"
    print(f"device {h['device']}; CPU kernels {h['cpu_level']} (of {', '.join(h['cpu_levels_available'])}), "
          f"{h['threads']} threads; {cpu}")
    if "gpu" in h:
        print(f"GPU: {h['gpu']}")
    print()
    print(f"{'kernel family':<26} {'kernels':>7}  {'result':<6}  {'error / bound':>13}  {'first call':>10}")
    for f in record["families"]:
        ok = not f["failed"]
        ratio = f"{f['worst_error_over_bound']:.3f}" if f["worst_error_over_bound"] is not None else "-"
        print(f"{f['family']:<26} {f['kernels']:>7}  {'pass' if ok else 'FAIL':<6}  {ratio:>13}  "
              f"{f['first_call_seconds'] * 1e3:>8.1f} ms")
        for kernel in f["failed"]:
            row = next(r for r in record["correctness"] if r["kernel"] == kernel)
            why = row["message"] or f"error {row['error']:.3g} > bound {row['bound']:.3g}"
            print(f"  FAIL {kernel}: {why}")
    print("error / bound: the worst kernel's error against the float64 reference over 2x stock's error "
          "plus slack (pass: <= 1)")
    if "speed" in record:
        s = record["speed"]
        probe = sorted(s["read_probe_gb_s"])[len(s["read_probe_gb_s"]) // 2]
        shape = s["shape"]
        print()
        print(f"one MoE layer, D={shape['D']} H={shape['H']} E={shape['E']} k={shape['k']}, {shape['bits']}-bit "
              f"g{shape['group_size']} {shape['dtype']}; read probe {probe:.1f} GB/s")
        print(f"{'tokens':>6}  {'fused ms':>9}  {'stock ms':>10}  {'speedup':>8}  {'weights GB/s':>12}  {'of probe':>8}")
        for r in s["rows"]:
            star = "*" if r["stock_extrapolated"] else " "
            print(f"{r['tokens']:>6}  {r['fused_ms']:>9.2f}  {r['stock_ms']:>9.1f}{star}  {r['speedup']:>7.1f}x  "
                  f"{r['weight_gb_s']:>12.2f}  {100 * r['share_of_probe']:>7.1f}%")
        if any(r["stock_extrapolated"] for r in s["rows"]):
            print("* stock on the CPU timed at one token and scaled per token")
    print()
    print("result: " + ("every kernel passed" if record["passed"] else "some kernels FAILED (see above)"))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    device = mx.Device(mx.DeviceType.gpu if args.device == "gpu" else mx.DeviceType.cpu) if args.device \
        else mx.default_device()
    record = doctor.run(device, quick=args.quick, speed=not args.no_speed,
                        progress=lambda part: print(f"fused-moe doctor: {part}...", file=sys.stderr, flush=True))
    _print(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if record["passed"] else 1
