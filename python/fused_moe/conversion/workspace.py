"""The crash-safe workspace of a conversion.

A conversion works in a directory beside DST, ".<DST name>.partial-XXXX",
holding LOCK (flocked while the run lives), OUT (the output being written,
renamed to DST when complete) and, with --overwrite, OLD (the previous DST,
moved aside for the moment between the two renames). Whatever moment a run is
killed at, DST is absent, the old DST or the complete new one, never a DST
that looks complete but is not; the next run into DST cleans up (`recover`).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
from pathlib import Path

from fused_moe.errors import ConversionError

_WORK_PREFIX, _LOCK, _OUT, _OLD = ".{}.partial-", "lock", "out", "old"


def prepare_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Checks DST before anything is read or written, after cleaning up what
    killed conversions into it left."""
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConversionError(f"{dst}: the destination must not be the source or lie inside it")
    if not dst.parent.is_dir():
        raise ConversionError(f"{dst.parent}: no such directory")
    recover(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")


def _work_dirs(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(glob.escape(_WORK_PREFIX.format(dst.name)) + "*"))


def _abandoned(work: Path) -> bool:
    """Whether the run that made `work` is gone: its lock is free (a lock
    dies with its process), or it was killed before it took the lock."""
    try:
        fd = os.open(work / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def recover(dst: Path) -> None:
    """Cleans up after conversions into `dst` that were killed: restores a
    DST an --overwrite run had moved aside, and removes the work directory."""
    for work in _work_dirs(dst):
        if not _abandoned(work):
            continue
        old = work / _OLD
        if old.is_dir() and not dst.exists():
            os.replace(old, dst)
            print(f"fused-moe convert: restored {dst}, which an interrupted --overwrite run had moved to {old}", flush=True)
        shutil.rmtree(work)
        print(f"fused-moe convert: removed {work}, left by an interrupted conversion", flush=True)


class Workspace:
    """The work directory of one run, locked for as long as the run lives;
    the output is written to `out`."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.dir = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX.format(dst.name), dir=dst.parent))
        self._lock = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.out = self.dir / _OUT
        self.out.mkdir()

    def commit(self) -> None:
        """Puts the finished output at DST, replacing an existing DST."""
        if self.dst.exists():
            self.move_old_aside()
        self.put_in_place()

    def move_old_aside(self) -> None:
        os.replace(self.dst, self.dir / _OLD)

    def put_in_place(self) -> None:
        os.replace(self.out, self.dst)

    def close(self) -> None:
        """Removes the work directory; after a failure between the two renames
        of `commit`, first puts the old DST back."""
        old = self.dir / _OLD
        if old.is_dir() and not self.dst.exists():
            os.replace(old, self.dst)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock)
