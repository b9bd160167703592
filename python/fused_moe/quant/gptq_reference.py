"""The numpy GPTQ that `quantize_weight` used before the native column pass
(csrc/quant/gptq.h): the upper Cholesky factor of H^-1, columns rounded one
by one in numpy, the group search called from Python. Kept as the reference
the native pass is tested against (tests/test_gptq.py) and timed against
(benchmarks/quant_quality.py --case speed); the converter does not use it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import _ext
from .quantizer import CHUNK_WEIGHTS, GPTQ_BLOCK, GPTQ_DAMPING, _check, _search, _triple

# Below this size the triangular inverse is numpy's general inverse.
TRI_INV_LEAF = 256


def quantize_gptq_reference(w: mx.array, bits: int, group_size: int, hessian):
    """GPTQ of ``w`` ``[out, in]`` (or ``[E, out, in]``) with the full
    ``hessian``, as ``quantize_weight(..., method="gptq")`` computed it before
    the native pass: returns ``(wq, scales, biases)``."""
    diag, full = _check(w, bits, group_size, hessian, "gptq")
    shape = w.shape
    experts = shape[0] if w.ndim == 3 else 1
    rows = int(np.prod(shape[:-1])) // experts
    w32 = np.array(w.astype(mx.float32)).reshape(experts, rows, shape[-1])
    with ThreadPoolExecutor(max_workers=_ext.get_num_threads()) as pool:
        out = [_gptq(w32[e], _inverse_hessian_factor(full[e], e if w.ndim == 3 else None), diag[e],
                     bits, group_size, w.dtype, pool) for e in range(experts)]
    codes, scales, biases = (np.stack([o[i] for o in out]) for i in range(3))
    return _triple(codes, scales, biases, shape, bits, w.dtype)


def _inverse_hessian_factor(h: np.ndarray, expert: Optional[int]) -> np.ndarray:
    """The upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U), float64.

    A dead input (H_jj == 0: always zero in calibration) gets H_jj = the mean
    of the nonzero diagonal (GPTQ uses 1), so H is invertible and no error flows into or out
    of that column; unlike GPTQ its weights are kept, not zeroed, so they stay
    right for inputs that calibration never saw. Damping starts at
    GPTQ_DAMPING[0] of the mean diagonal and grows through GPTQ_DAMPING while
    the factorization fails; then the hessian is refused."""
    what = "hessian" if expert is None else f"hessian[{expert}]"
    n = h.shape[0]
    h = h.astype(np.float64)
    d = np.diagonal(h)
    dead = np.flatnonzero(d == 0)
    live = d[d > 0]
    mean = float(live.mean()) if live.size else 1.0
    h[dead, dead] = mean
    # U = P L^-1 P with P the reversal and P H P = L L^T: one Cholesky and
    # one triangular inverse, no general inverse.
    reversed_h = np.ascontiguousarray(h[::-1, ::-1])
    del h
    on_diagonal = np.diag_indices(n)
    for damping in GPTQ_DAMPING:
        damped = reversed_h.copy()
        damped[on_diagonal] += damping * mean
        try:
            lower = np.linalg.cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])
    raise ValueError(
        f"{what} {(n, n)} is not positive semidefinite: its Cholesky factorization failed even with "
        f"damping {GPTQ_DAMPING[-1]} x its mean diagonal ({mean:.3g}); E[x x^T] of real inputs is PSD")


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves (a third of a
    general inverse's work)."""
    n = lower.shape[0]
    if n <= TRI_INV_LEAF:
        return np.tril(np.linalg.inv(lower))
    k = n // 2
    top, bottom = _lower_inverse(lower[:k, :k]), _lower_inverse(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k], out[k:, k:] = top, bottom
    out[k:, :k] = -(bottom @ lower[k:, :k]) @ top
    return out


def _gptq(w: np.ndarray, u: np.ndarray, d: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype,
          pool: ThreadPoolExecutor):
    """GPTQ (Frantar et al. 2022, lazy batches) of one matrix w [rows, in]
    float32 with U, the upper Cholesky factor of H^-1: columns in order, each
    rounded with its group's pair and its error spread over the columns after
    it (U's row), so later columns absorb what earlier ones lost. At a group's
    first column the weighted search (column weights d = diag H) picks the
    group's (scale, bias) on the weights as updated so far. Returns codes
    [rows, in] uint8 and the pairs [rows, groups] float32 (rounded to dtype)."""
    rows, inputs = w.shape
    top = float((1 << bits) - 1)
    # Transposed, so that a column of w is a contiguous row here.
    wt = np.ascontiguousarray(w.T, dtype=np.float32)
    u = u.astype(np.float32)
    codes = np.empty((inputs, rows), np.uint8)
    groups = inputs // group_size
    scales = np.empty((groups, rows), np.float32)
    biases = np.empty((groups, rows), np.float32)
    step = max(1, CHUNK_WEIGHTS // group_size)
    chunks = [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    for b0 in range(0, inputs, GPTQ_BLOCK):
        b1 = min(inputs, b0 + GPTQ_BLOCK)
        block = wt[b0:b1]  # a view: updated in place
        ub = u[b0:b1, b0:b1]
        err = np.empty((b1 - b0, rows), np.float32)
        for i in range(b1 - b0):
            j = b0 + i
            if j % group_size == 0:
                g = j // group_size
                current = np.ascontiguousarray(block[i:i + group_size].T, dtype=np.float32)
                _, rs, rb = mx.quantize(mx.array(current).astype(dtype), group_size=group_size, bits=bits)
                rs, rb = np.array(rs.astype(mx.float32)), np.array(rb.astype(mx.float32))

                def search(sl, g=g, j=j, current=current, rs=rs, rb=rb):
                    _, s, b = _search(current[sl, None, :], d[None, j:j + group_size], rs[sl], rb[sl], bits, dtype)
                    scales[g, sl], biases[g, sl] = s[:, 0], b[:, 0]

                # Rows are independent: the result does not depend on the chunks.
                list(pool.map(search, chunks))
                s, b = scales[g].astype(np.float32), biases[g].astype(np.float32)
            column = block[i]
            q = np.clip(np.rint((column - b) / s), 0, top)
            codes[j] = q
            e = (column - (q * s + b)) / ub[i, i]
            err[i] = e
            if i + 1 < b1 - b0:
                block[i + 1:] -= ub[i, i + 1:, None] * e[None, :]
        if b1 < inputs:
            wt[b1:] -= u[b0:b1, b1:].T @ err
    return codes.T, scales.T, biases.T

