"""`fused-moe convert` killed with SIGKILL at random moments and at the
exact moments that matter (mid-write, between the two renames of
--overwrite, after the rename), then run again.

After every kill: no DST, the old DST (with --overwrite), or the complete new
one; never a DST that looks complete but is not. An --overwrite run killed
between its renames leaves the old DST in its work directory, and the next
run puts it back. The next run removes what a killed run left, says so in a
line, and writes a DST bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.hf_checkpoints import SMALL_HF, write_hf_checkpoint

SEED = int(os.environ.get("FUSED_MOE_KILL_SEED", "16"))
CONVERT = [sys.executable, "-m", "fused_moe", "convert"]
RECIPE = ["--recipe", "seed-3.7bit"]

# `fused-moe convert ARGS` that prints "paused at POINT" and waits there, so
# the test can kill it at that exact moment. Points: "unit-N" (before unit N
# is written), "swap" (the old DST moved aside, the new one not yet in
# place), "renamed" (the new DST in place, the work directory not yet
# removed). Usage: python -c PAUSING POINT ARGS...
PAUSING = """
import sys, time
from fused_moe.cli import main
from fused_moe.conversion import pipeline, workspace

point = sys.argv[1]


def pause(at):
    if at == point:
        print(f"fused-moe convert: paused at {at}", flush=True)
        time.sleep(3600)


def after(method, at):
    def run(self, *args):
        method(self, *args)
        pause(at)
    return run


units = []
unit = pipeline._Writing.unit


def counted(self, stored):
    pause(f"unit-{len(units)}")
    units.append(stored)
    unit(self, stored)


pipeline._Writing.unit = counted
workspace.Workspace.move_old_aside = after(workspace.Workspace.move_old_aside, "swap")
workspace.Workspace.put_in_place = after(workspace.Workspace.put_in_place, "renamed")
sys.exit(main(["convert", *sys.argv[2:]]))
"""


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path`, by relative name, with its bytes."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def work_dirs(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.partial-*"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    # About 1.5 s of converting after 1 s of start-up, so that random kills
    # land in the imports, in the writing and near the end.
    src = write_hf_checkpoint(root / "src", dict(SMALL_HF, num_hidden_layers=3, num_local_experts=32), fp8=True)
    new, old = root / "new", root / "old"
    run = Run(src, new, False)
    run.wait_for_start()
    started = time.perf_counter()
    assert run.proc.wait(timeout=120) == 0
    seconds = time.perf_counter() - started  # from the first line to the end
    subprocess.run([*CONVERT, str(src), str(old), "--bits", "4"], check=True, capture_output=True)
    print(f"\nan uninterrupted run writes for {seconds:.2f} s")
    return src, tree(new), tree(old), seconds


class Run:
    """One conversion in a subprocess, killed at a pause point or a time."""

    def __init__(self, src: Path, dst: Path, overwrite: bool, pause: str | None = None):
        args = [str(src), str(dst), *RECIPE] + (["--overwrite"] if overwrite else [])
        command = [sys.executable, "-c", PAUSING, pause, *args] if pause else [*CONVERT, *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.pause = pause

    def kill_when_paused(self, timeout: float = 60) -> str:
        """Reads stdout up to the pause line, then kills."""
        lines = []
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            lines.append(line)
            if f"paused at {self.pause}" in line or time.monotonic() > deadline:
                break
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        out = "".join(lines)
        assert f"paused at {self.pause}" in out, out
        return out

    def wait_for_start(self) -> None:
        """Until the line that says the checks passed and writing begins."""
        for line in self.proc.stdout:
            if line.startswith("fused-moe convert: ") and " -> " in line:
                return
        raise AssertionError("the conversion ended before it started writing")

    def kill_after(self, seconds: float, from_start: bool = False) -> str:
        if from_start:
            self.wait_for_start()
        try:
            out, _ = self.proc.communicate(timeout=seconds)
            return out  # finished first
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            out, _ = self.proc.communicate(timeout=30)
            return out


def check_after_kill(dst: Path, allowed: dict[str, dict], what: str) -> str:
    """DST is absent, or bit-identical to one of `allowed`; an old DST moved
    aside is whole in its work directory. Returns which state it is in."""
    if dst.exists():
        got = tree(dst)
        for name, want in allowed.items():
            if got == want:
                return name
        raise AssertionError(f"{what}: {dst} exists but matches none of {list(allowed)}: {sorted(got)}")
    aside = [w / "old" for w in work_dirs(dst) if (w / "old").is_dir()]
    if aside:
        assert len(aside) == 1 and tree(aside[0]) in allowed.values(), f"{what}: old DST aside is not whole"
        return "aside"
    return "absent"


def rerun(src: Path, dst: Path, overwrite: bool, leftovers: list[Path], new: dict) -> str:
    args = [*CONVERT, str(src), str(dst), *RECIPE] + (["--overwrite"] if overwrite else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for w in leftovers:
        assert f"removed {w}, left by an interrupted conversion" in r.stdout, r.stdout
    assert tree(dst) == new, "the rerun differs from an uninterrupted run"
    assert work_dirs(dst) == []
    return r.stdout


def test_killed_conversions_lose_nothing(setup, tmp_path):
    src, new, old, seconds = setup
    rng = random.Random(SEED)
    kills = []

    def record(how, state):
        kills.append((how, state))
        print(f"kill {len(kills)}: {how} -> {state}")

    # Into a fresh DST: killed mid-write, then at random moments.
    dst = tmp_path / "fresh"
    Run(src, dst, False, "unit-2").kill_when_paused()
    record("fresh, paused before unit 2", check_after_kill(dst, {}, "unit-2"))
    assert len(work_dirs(dst)) == 1
    for i in range(4):
        # Timed from the launch (start-up and checks) or from the first line (writing).
        from_start = i % 2 == 1
        at = rng.uniform(0, seconds)
        Run(src, dst, False).kill_after(at, from_start)
        how = f"{at:.2f} s after {'writing began' if from_start else 'launch'}"
        state = check_after_kill(dst, {"new": new}, f"fresh, {how} (seed {SEED})")
        record(f"fresh, {how}", state)
        if state == "new":  # it finished before the kill
            shutil.rmtree(dst)
    rerun(src, dst, False, work_dirs(dst), new)

    # --overwrite of an existing DST: at the two renames, then at random.
    dst = tmp_path / "existing"
    write_tree(dst, old)
    out = Run(src, dst, True, "swap").kill_when_paused()
    assert check_after_kill(dst, {"old": old}, "swap") == "aside"
    record("overwrite, between the renames", "aside")
    # The next run puts the old DST back (and, without --overwrite, keeps it).
    r = subprocess.run([*CONVERT, str(src), str(dst), *RECIPE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "already exists; pass --overwrite" in r.stderr, r.stderr
    assert f"restored {dst}, which an interrupted --overwrite run had moved to" in r.stdout, r.stdout
    assert tree(dst) == old and work_dirs(dst) == []

    Run(src, dst, True, "renamed").kill_when_paused()
    record("overwrite, after the rename", check_after_kill(dst, {"new": new}, "renamed"))
    write_tree(dst, old)
    for point in ("unit-0", "swap"):
        Run(src, dst, True, point).kill_when_paused()
        record(f"overwrite, paused at {point}", check_after_kill(dst, {"old": old}, point))
    for i in range(4):
        from_start = i % 2 == 0
        at = rng.uniform(0, seconds * 1.1)
        Run(src, dst, True).kill_after(at, from_start)
        how = f"{at:.2f} s after {'writing began' if from_start else 'launch'}"
        state = check_after_kill(dst, {"old": old, "new": new}, f"overwrite, {how} (seed {SEED})")
        record(f"overwrite, {how}", state)
    rerun(src, dst, True, [w for w in work_dirs(dst)], new)

    assert len(kills) >= 10
    states = sorted({s for _, s in kills})
    print(f"{len(kills)} kills survived with nothing lost (seed {SEED}); states seen: {states}")


def write_tree(dst: Path, files: dict[str, bytes]) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    for name, data in files.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
