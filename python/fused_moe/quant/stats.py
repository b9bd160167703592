"""Calibration statistics of a matrix's inputs, accumulated batch by batch."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np


class InputStats:
    """Running ``E[x x^T]`` (the Hessian of the output error) of the inputs
    ``x`` ``[..., dim]`` of one matrix, and the number of rows seen. The
    activations themselves are not kept.

    With ``full=False`` only the diagonal ``E[x^2]`` is kept (``dim`` numbers,
    not ``dim^2``): all the weighted search reads, and what the calibration
    driver accumulates. Sums are float64, so the order of long runs of small
    batches does not matter.
    """

    def __init__(self, dim: int, full: bool = True):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"InputStats: dim must be a positive integer, got {dim!r}")
        self.dim, self.full = dim, full
        self.count = 0
        self._sum_sq = np.zeros(dim, np.float64)
        self._sum_outer = np.zeros((dim, dim), np.float64) if full else None

    def update(self, x) -> None:
        """Adds the rows of ``x`` (``[..., dim]``, mx or numpy, any float dtype)."""
        a = np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else np.asarray(x, np.float32)
        if a.ndim == 0 or a.shape[-1] != self.dim:
            raise ValueError(f"InputStats({self.dim}): got inputs of shape {tuple(a.shape)}")
        a = a.reshape(-1, self.dim).astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"InputStats({self.dim}): inputs {tuple(a.shape)} have NaN or infinite entries")
        self.count += a.shape[0]
        self._sum_sq += np.einsum("ij,ij->j", a, a)
        if self.full:
            self._sum_outer += a.T @ a

    def diagonal(self) -> np.ndarray:
        """``E[x^2]`` per input, float32 ``[dim]`` (zeros before any update)."""
        return (self._sum_sq / max(self.count, 1)).astype(np.float32)

    def hessian(self) -> np.ndarray:
        """``E[x x^T]``, float32 ``[dim, dim]``."""
        if not self.full:
            raise ValueError(f"InputStats({self.dim}, full=False) keeps only the diagonal; use .diagonal()")
        return (self._sum_outer / max(self.count, 1)).astype(np.float32)

    @property
    def sums(self) -> np.ndarray:
        """The raw sum of x^2 per input (float64), for pooling statistics."""
        return self._sum_sq


def shrink(own_sum: np.ndarray, own_count: int, pooled: np.ndarray, strength: float) -> np.ndarray:
    """An expert's E[x^2] blended with its layer's pooled E[x^2]:
    (sum_e + strength * pooled) / (n_e + strength). An expert with few tokens
    leans on the pool; one with none gets the pool itself."""
    return ((own_sum + strength * pooled) / (own_count + strength)).astype(np.float32)
