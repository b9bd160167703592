"""Calibration text: read from .txt / .jsonl files or a folder of them,
tokenized, cut into sequences, and split into calibration and held-out parts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl")
# The share of the sequences held out for the quality report.
HELD_OUT_FRACTION = 0.1


class CalibrationTextError(ValueError):
    """Calibration text that cannot be used; the message names the file."""


def _read_jsonl(path: Path, data: str) -> list[str]:
    texts = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise CalibrationTextError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationTextError(f"{path}:{n}: expected an object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def read_texts(path) -> list[str]:
    """The documents of a .txt file (one document), a .jsonl file (its "text"
    fields) or a folder (every .txt and .jsonl file under it, sorted by path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationTextError(f"{path}: no {' or '.join(TEXT_SUFFIXES)} files in this folder")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CalibrationTextError(f"{path}: calibration text must be {' or '.join(TEXT_SUFFIXES)}, or a folder")
        files = [path]
    else:
        raise CalibrationTextError(f"{path}: no such calibration text file or folder")
    texts = []
    for f in files:
        try:
            data = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationTextError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        texts += _read_jsonl(f, data) if f.suffix == ".jsonl" else [data]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationTextError(f"{path}: the calibration text is empty")
    return texts


@dataclass
class CalibrationTokens:
    """Token sequences [n, seq_len] (int32): `calibration` drives the
    statistics, `held_out` only the quality report."""

    calibration: np.ndarray
    held_out: np.ndarray

    @property
    def seq_len(self) -> int:
        return self.calibration.shape[1]


def tokenize(texts: list[str], encode: Callable[[str], list[int]], *, seq_len: int, max_tokens: Optional[int],
             separator: Optional[int] = None, where: str = "calibration text") -> CalibrationTokens:
    """Concatenates the encoded documents (with `separator` between them),
    keeps at most `max_tokens`, cuts whole sequences of `seq_len`, and holds
    out the last HELD_OUT_FRACTION of them (at least one when there are two)."""
    if seq_len < 2:
        raise CalibrationTextError(f"--calib-seq-len {seq_len}: must be at least 2")
    if max_tokens is not None and max_tokens < seq_len:
        raise CalibrationTextError(f"--calib-tokens {max_tokens} is fewer than one sequence of {seq_len}")
    ids: list[int] = []
    for t in texts:
        if ids and separator is not None:
            ids.append(separator)
        ids += encode(t)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n < 1:
        raise CalibrationTextError(
            f"{where}: {len(ids)} tokens are fewer than one sequence of {seq_len} (--calib-seq-len)")
    seqs = np.array(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    held = max(1, round(n * HELD_OUT_FRACTION)) if n >= 2 else 0
    return CalibrationTokens(seqs[: n - held], seqs[n - held:])
