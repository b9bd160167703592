"""One matrix to MLX's affine format (per group: w ~ scale*q + bias), by
round-to-nearest, by a search weighted with calibration statistics, or by
GPTQ error compensation built on that search.

The weighted search minimises each group's share of the output error
E||x (w - w_hat)^T||^2 under a diagonal Hessian, i.e. sum_j H_jj (w_j - w_hat_j)^2:
columns whose inputs are large count more. Per group it scores a few clipped
min/max ranges and mx.quantize's own (scale, bias), refines the best by
weighted least squares, and keeps whichever scores lowest. Scales and biases
are rounded to their stored dtype before the codes are chosen, so the score is
that of the weights as stored; since the objective is separable in the codes,
nearest-code rounding is optimal for a given (scale, bias), and RTN's own pair
among the candidates makes the result never worse than RTN under it.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022) reads the full Hessian: it rounds
the columns in order and spreads each column's error over the columns still
to come, so that correlated inputs make up for each other. Each group's
(scale, bias) is chosen by the weighted search on the weights as updated when
the group's first column is reached. The update is GPTQ's, written with the
Cholesky factor of H rather than that of H^-1 (the same codes in exact
arithmetic; one factorization, no inverse), and the column pass is native
code (csrc/quant/gptq.h) that repeats the search's float32 arithmetic
exactly; numpy's BLAS carries each block's errors to the later columns.

"auto" picks by what was measured end to end (KL to the reference model on
held-out text, SmolLM2-135M-Instruct at 3 bits, group 64;
docs/calibration.md): GPTQ with a full Hessian (KL 21% of RTN's, the
weighted search 35%), the weighted search with a diagonal, RTN without.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mlx.core as mx
import numpy as np

from fused_moe import _ext
from fused_moe.supported import AFFINE_BITS, AFFINE_GROUP_SIZES
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
METHODS = ("auto", "rtn", "weighted", "gptq")

# Clipped ranges scored per group: (low, high) ratios of the distances from the
# group's midpoint to its min and to its max ((1, 1) is plain min/max).
CLIP_RATIOS = tuple((r, r) for r in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7))
# Weighted least-squares refinements of the best candidate.
LS_STEPS = 5
# Rows quantized at once: keeps the float32 temporaries in cache-sized pieces.
CHUNK_WEIGHTS = 1 << 16
# mx.quantize's floor on a group's scale.
MIN_SCALE = 1e-7
# GPTQ: damping added to the hessian's diagonal, as a fraction of the mean of
# its nonzero diagonal entries; if the Cholesky factorization fails, the next (larger) value is
# tried, and past the last one the hessian is refused.
GPTQ_DAMPING = (0.01, 0.1, 1.0)
# GPTQ: columns quantized one by one (by the native pass, in float32: float64
# updates measured no better end to end; docs/calibration.md) before their error
# reaches the later columns in one matmul. The native pass's largest block, a
# multiple of every group size.
GPTQ_BLOCK = _ext.GPTQ_MAX_BLOCK
# GPTQ: columns whose errors reach the columns after them together (a
# multiple of GPTQ_BLOCK): fewer, larger matmuls over the later columns.
GPTQ_SPAN = 4 * GPTQ_BLOCK
# GPTQ: columns per block of the hessian's Cholesky factorization.
CHOLESKY_BLOCK = 256
# "auto"'s method when given the full hessian (measured end to end;
# docs/calibration.md).
AUTO_WITH_FULL_HESSIAN = "gptq"
# The stored dtypes by the name the native pass takes.
_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def _np_dtype_round(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """x (float32) rounded to `dtype` and back, as the stored scales are."""
    if dtype == mx.float32:
        return x
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float32)
    # bfloat16: round to nearest even on the float32 bits (finite inputs).
    u = x.view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def _check(w: mx.array, bits: int, group_size: int, hessian, method: str):
    """Validates the arguments; returns the per-column weights [E, in] and the
    full hessian [E, in, in] as given (None where it is not full), or (None, None)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if bits not in AFFINE_BITS:
        raise ValueError(f"bits={bits} is not supported; supported bits: {AFFINE_BITS}")
    if group_size not in AFFINE_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; supported group sizes: {AFFINE_GROUP_SIZES}")
    if not isinstance(w, mx.array) or w.dtype not in FLOAT_DTYPES or w.ndim not in (2, 3):
        what = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, mx.array) else type(w).__name__
        raise ValueError(f"w must be a float16/bfloat16/float32 mx.array [out, in] or [E, out, in], got {what}")
    inputs = w.shape[-1]
    if inputs % group_size or (inputs * bits) % 32:
        raise ValueError(
            f"w {tuple(w.shape)}: {inputs} inputs are not a whole number of groups of {group_size} at {bits} bits")
    if hessian is None:
        if method in ("weighted", "gptq"):
            raise ValueError(f"method={method!r} needs a hessian")
        return None, None
    experts = w.shape[0] if w.ndim == 3 else None
    if isinstance(hessian, mx.array):
        if hessian.dtype != mx.float32:
            raise ValueError(f"hessian must be float32, got {hessian.dtype} {tuple(hessian.shape)}")
        hessian = np.array(hessian)
    h = np.asarray(hessian)
    if h.dtype != np.float32:
        raise ValueError(f"hessian must be float32, got {h.dtype} {tuple(h.shape)}")
    allowed = _hessian_shapes(inputs, experts)
    if tuple(h.shape) not in allowed:
        raise ValueError(
            f"hessian has shape {tuple(h.shape)}; for w {tuple(w.shape)} expected one of "
            + ", ".join(str(s) for s in allowed))
    if not np.isfinite(h).all():
        raise ValueError(f"hessian {tuple(h.shape)} has NaN or infinite entries")
    full = h.ndim == w.ndim
    if method == "gptq" and not full:
        raise ValueError(
            f"method='gptq' needs the full hessian E[x x^T] {allowed[0]}, got its diagonal {tuple(h.shape)}")
    diag = np.diagonal(h, axis1=-2, axis2=-1) if full else h
    if (diag < 0).any():
        raise ValueError(f"hessian {tuple(h.shape)} has negative diagonal entries; E[x x^T] has none")
    diag = np.ascontiguousarray(diag, dtype=np.float32).reshape(experts or 1, inputs)
    return diag, (h.reshape(experts or 1, inputs, inputs) if full else None)


def _hessian_shapes(inputs: int, experts: Optional[int]) -> list[tuple]:
    """Accepted hessian shapes: the full E[x x^T], or its diagonal E[x^2]."""
    if experts is None:
        return [(inputs, inputs), (inputs,)]
    return [(experts, inputs, inputs), (experts, inputs)]


def quantize_weight(w: mx.array, bits: int = 3, group_size: int = 64, hessian=None, method: str = "auto"):
    """Quantizes ``w`` ``[out, in]`` (or ``[E, out, in]``) to MLX's affine
    format: returns ``(wq, scales, biases)`` exactly as ``mx.quantize`` does,
    scales and biases in ``w``'s dtype.

    ``hessian`` is ``E[x x^T]`` of the calibration inputs, float32 ``[in, in]``
    (``[E, in, in]`` per expert for stacked ``w``), or just its diagonal
    ``E[x^2]`` ``[in]`` (``[E, in]``), which is all the weighted search reads.

    ``method``: ``"rtn"`` is ``mx.quantize`` itself (min/max round to nearest);
    ``"weighted"`` is the importance-weighted search (needs ``hessian``);
    ``"gptq"`` is error compensation across columns with the weighted search
    choosing each group's pair (needs the full ``hessian``); ``"auto"`` is
    ``AUTO_WITH_FULL_HESSIAN`` with a full hessian, ``"weighted"`` with a
    diagonal and ``"rtn"`` without.
    """
    diag, full = _check(w, bits, group_size, hessian, method)
    if method == "auto":
        method = "rtn" if diag is None else AUTO_WITH_FULL_HESSIAN if full is not None else "weighted"
    if method == "rtn":
        return mx.quantize(w, group_size=group_size, bits=bits)
    shape = w.shape
    experts = shape[0] if w.ndim == 3 else 1
    rows = int(np.prod(shape[:-1])) // experts
    inputs = shape[-1]
    groups = inputs // group_size
    if method == "gptq":
        w32 = np.array(w.astype(mx.float32)).reshape(experts, rows, inputs)
        out = [_gptq(w32[e], _gptq_coefficients(full[e], e if w.ndim == 3 else None), diag[e], bits, group_size,
                     w.dtype) for e in range(experts)]
        packed, scales, biases = (np.stack([o[i] for o in out]).reshape(*shape[:-1], -1) for i in range(3))
        return mx.array(packed), mx.array(scales).astype(w.dtype), mx.array(biases).astype(w.dtype)
    rtn = mx.quantize(w, group_size=group_size, bits=bits)
    mx.eval(rtn)
    w32 = np.array(w.astype(mx.float32)).reshape(experts, rows, groups, group_size)
    rtn_scales = np.array(rtn[1].astype(mx.float32)).reshape(experts, rows, groups)
    rtn_biases = np.array(rtn[2].astype(mx.float32)).reshape(experts, rows, groups)
    codes = np.empty((experts, rows, groups, group_size), np.uint8)
    scales = np.empty((experts, rows, groups), np.float32)
    biases = np.empty((experts, rows, groups), np.float32)
    step = max(1, CHUNK_WEIGHTS // inputs)
    chunks = [(e, slice(r0, min(rows, r0 + step))) for e in range(experts) for r0 in range(0, rows, step)]

    def search(chunk):
        e, sl = chunk
        d = diag[e].reshape(groups, group_size)
        codes[e, sl], scales[e, sl], biases[e, sl] = _search(
            w32[e, sl], d, rtn_scales[e, sl], rtn_biases[e, sl], bits, w.dtype)

    # Chunks are independent (the result does not depend on the thread count);
    # numpy releases the GIL inside each operation.
    # As many threads as the CPU kernels use (fm.set_num_threads /
    # FUSED_MOE_NUM_THREADS, validated there).
    with ThreadPoolExecutor(max_workers=min(_ext.get_num_threads(), len(chunks))) as pool:
        list(pool.map(search, chunks))
    return _triple(codes, scales, biases, shape, bits, w.dtype)


def _triple(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, shape: tuple, bits: int, dtype: mx.Dtype):
    """Codes and float32 pairs (already rounded to `dtype`) as mx.quantize's triple."""
    groups = scales.size // int(np.prod(shape[:-1]))
    wq = mx.array(pack_codes(codes.reshape(*shape[:-1], shape[-1]), bits))
    return (wq, mx.array(scales.reshape(*shape[:-1], groups)).astype(dtype),
            mx.array(biases.reshape(*shape[:-1], groups)).astype(dtype))


def _gptq_coefficients(h: np.ndarray, expert: Optional[int]) -> np.ndarray:
    """GPTQ's update coefficients from the damped hessian H = Ũ Ũ^T (Ũ upper
    triangular: the Cholesky factor of H with the column order reversed),
    float32 [in, in]: coef[k, l] = Ũ_kl / Ũ_ll, read for k < l (the rest is
    not meaningful). Column l is rounded at w_l + sum_{k<l} (w_k - ŵ_k) coef[k, l],
    GPTQ's update through the Cholesky factor U of H^-1 (U = Ũ^-1) written
    without the inverse.

    A dead input (H_jj == 0: always zero in calibration) gets H_jj = the mean
    of the nonzero diagonal (GPTQ uses 1), so H is invertible and no error flows into or out
    of that column; unlike GPTQ its weights are kept, not zeroed, so they stay
    right for inputs that calibration never saw. Damping starts at
    GPTQ_DAMPING[0] of the mean diagonal and grows through GPTQ_DAMPING while
    the factorization fails; then the hessian is refused. The factorization
    is float64."""
    what = "hessian" if expert is None else f"hessian[{expert}]"
    n = h.shape[0]
    d = np.diagonal(h).astype(np.float64)
    live = d[d > 0]
    mean = float(live.mean()) if live.size else 1.0
    undamped = np.where(d == 0, mean, d)
    on_diagonal = np.diag_indices(n)
    for damping in GPTQ_DAMPING:
        damped = h.astype(np.float64)
        damped[on_diagonal] = undamped + damping * mean
        try:
            upper = _upper_factor(damped)
        except np.linalg.LinAlgError:
            continue
        coef = np.empty((n, n), np.float32)
        np.divide(upper, np.diagonal(upper)[None, :], out=coef, casting="same_kind")
        return coef
    raise ValueError(
        f"{what} {(n, n)} is not positive semidefinite: its Cholesky factorization failed even with "
        f"damping {GPTQ_DAMPING[-1]} x its mean diagonal ({mean:.3g}); E[x x^T] of real inputs is PSD")


def _upper_factor(a: np.ndarray) -> np.ndarray:
    """Upper triangular Ũ with Ũ Ũ^T = a (symmetric positive definite,
    float64), computed in place (the strict lower triangle is left as it
    was): blocks of CHOLESKY_BLOCK columns from the last, each diagonal block
    by numpy's Cholesky (which raises LinAlgError where `a` is not positive
    definite), the rest by matmuls, which numpy's BLAS runs faster than its
    whole-matrix factorization. With a = [[A, B], [B^T, C]] and C = Ũ_C Ũ_C^T:
    Ũ_B = B Ũ_C^-T, and A - Ũ_B Ũ_B^T is factored next."""
    n = a.shape[0]
    nb = CHOLESKY_BLOCK
    for k1 in range(n, 0, -nb):
        k0 = max(0, k1 - nb)
        # The reversal of the block's lower Cholesky factor is its upper one.
        upper = np.linalg.cholesky(a[k0:k1, k0:k1][::-1, ::-1])[::-1, ::-1]
        a[k0:k1, k0:k1] = upper
        if k0 > 0:
            panel = a[:k0, k0:k1] @ np.linalg.inv(upper).T
            a[:k0, k0:k1] = panel
            # The leading upper triangle, one block column at a time.
            for j1 in range(k0, 0, -nb):
                j0 = max(0, j1 - nb)
                a[:j1, j0:j1] -= panel[:j1] @ panel[j0:j1].T
    return a


def _gptq(w: np.ndarray, coef: np.ndarray, d: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype):
    """GPTQ (Frantar et al. 2022, lazy batches) of one matrix w [rows, in]
    float32 with `_gptq_coefficients`' coef: columns in order, each rounded
    with its group's pair and its error carried to the columns after it, so
    later columns absorb what earlier ones lost. Within a block of
    GPTQ_BLOCK columns the native pass (_ext.gptq_block) rounds column by
    column and, at a group's first column, runs the weighted search (column
    weights d = diag H) on the weights as GPTQ has updated them; the block's
    errors then reach the rest of its span of GPTQ_SPAN columns in one numpy
    matmul, and a span's errors the columns after the span in another (fewer
    passes over the later columns, the same sums). Returns the packed codes
    [rows, in * bits / 32] uint32 and the pairs [rows, groups] float32
    (rounded to dtype)."""
    rows, inputs = w.shape
    # Transposed, so that a column of w is a contiguous row here.
    orig = np.ascontiguousarray(w.T, dtype=np.float32)
    cur = orig.copy()
    packed = np.empty((rows, inputs * bits // 32), np.uint32)
    groups = inputs // group_size
    scales = np.empty((groups, rows), np.float32)
    biases = np.empty((groups, rows), np.float32)
    delta = np.empty((min(GPTQ_SPAN, inputs), rows), np.float32)
    for s0 in range(0, inputs, GPTQ_SPAN):
        s1 = min(inputs, s0 + GPTQ_SPAN)
        for b0 in range(s0, s1, GPTQ_BLOCK):
            b1 = min(s1, b0 + GPTQ_BLOCK)
            g0, g1 = b0 // group_size, b1 // group_size
            err = delta[b0 - s0:b1 - s0]
            _ext.gptq_block(cur[b0:b1], orig[b0:b1], np.ascontiguousarray(coef[b0:b1, b0:b1]),
                            np.ascontiguousarray(d[b0:b1]), packed, b0, err, scales[g0:g1], biases[g0:g1],
                            bits, group_size, _DTYPE_NAMES[dtype])
            if b1 < s1:
                cur[b1:s1] += coef[b0:b1, b1:s1].T @ err
        if s1 < inputs:
            cur[s1:] += coef[s0:s1, s1:].T @ delta[:s1 - s0]
    return packed, scales.T, biases.T


class _Scorer:
    """Nearest codes and weighted error of one chunk of groups [r, g, gs] for
    candidate (scale, bias) pairs [r, g], with scratch space reused."""

    def __init__(self, w: np.ndarray, d: np.ndarray, bits: int, dtype: mx.Dtype):
        self.w, self.d, self.top, self.dtype = w, d, float((1 << bits) - 1), dtype
        self.q = np.empty_like(w)
        self.t = np.empty_like(w)

    def rounded(self, scale: np.ndarray, bias: np.ndarray):
        """The pair as stored (rounded to the dtype), scale kept off zero."""
        scale = np.where(np.abs(scale) < MIN_SCALE, np.where(scale < 0, -MIN_SCALE, MIN_SCALE), scale)
        return _np_dtype_round(scale.astype(np.float32), self.dtype), _np_dtype_round(bias.astype(np.float32), self.dtype)

    def score(self, scale: np.ndarray, bias: np.ndarray):
        """Codes (into self.q) and error sum_j d_j (w_j - scale*q_j - bias)^2 per group."""
        q, t = self.q, self.t
        s, b = scale[..., None], bias[..., None]
        np.subtract(self.w, b, out=q)
        np.divide(q, s, out=q)
        np.rint(q, out=q)
        np.clip(q, 0.0, self.top, out=q)
        np.multiply(q, s, out=t)
        np.add(t, b, out=t)
        np.subtract(self.w, t, out=t)
        np.multiply(t, t, out=t)
        np.multiply(t, self.d, out=t)
        return t.sum(axis=-1)


def _search(w, d, rtn_scale, rtn_bias, bits, dtype):
    """The best (codes, scale, bias) of each group of w [r, g, gs] under the
    column weights d [g, gs]."""
    sc = _Scorer(w, d, bits, dtype)
    top = sc.top
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    mid = 0.5 * (lo + hi)
    best_s, best_b = sc.rounded(rtn_scale, rtn_bias)
    best_err = sc.score(best_s, best_b)
    best_q = sc.q.copy()

    def consider(scale, bias):
        nonlocal best_err, best_s, best_b
        s, b = sc.rounded(scale, bias)
        err = sc.score(s, b)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
        np.copyto(best_q, sc.q, where=better[..., None])

    for r_lo, r_hi in CLIP_RATIOS:
        a, b = mid - r_lo * (mid - lo), mid + r_hi * (hi - mid)
        consider((b - a) / top, a)
    # Weighted least squares for (scale, bias) with the best codes fixed:
    # the 2x2 normal equations of sum_j d_j (w_j - s q_j - b)^2, per group.
    dw = w * d
    sd = np.broadcast_to(d.sum(axis=-1), best_err.shape)
    sw = dw.sum(axis=-1)
    for _ in range(LS_STEPS):
        q = best_q
        qd = q * d
        sq, sqq, sqw = qd.sum(axis=-1), (qd * q).sum(axis=-1), (qd * w).sum(axis=-1)
        det = sqq * sd - sq * sq
        ok = det > 1e-12 * np.maximum(sqq * sd, 1e-30)
        safe = np.where(ok, det, 1.0)
        s = np.where(ok, (sqw * sd - sq * sw) / safe, best_s)
        b = np.where(ok, (sqq * sw - sq * sqw) / safe, best_b)
        consider(s, b)
    return best_q.astype(np.uint8), best_s, best_b


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., in] (uint8, < 2**bits) in MLX's packing: one little-endian
    bit stream per row, code i at bit i*bits, read as uint32 words."""
    *lead, inputs = codes.shape
    c = codes.reshape(-1, inputs // 8, 8).astype(np.uint64)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    word = (c << shifts).sum(axis=-1, dtype=np.uint64)  # 8 codes = `bits` bytes
    stream = word[..., None].view(np.uint8)[..., :bits]
    return np.ascontiguousarray(stream).reshape(*lead, inputs * bits // 8).view(np.uint32)


def unpack_codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_codes`: uint32 [..., in*bits/32] -> uint8 codes [..., in]."""
    *lead, words = wq.shape
    inputs = words * 32 // bits
    stream = np.ascontiguousarray(wq).view(np.uint8).reshape(-1, inputs // 8, bits)
    padded = np.zeros((stream.shape[0], inputs // 8, 8), np.uint8)
    padded[..., :bits] = stream
    word = padded.view(np.uint64)[..., 0]
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    c = (word[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return c.astype(np.uint8).reshape(*lead, inputs)


def weighted_error(w: mx.array, wq: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
                   diag) -> float:
    """sum_j d_j (w_j - w_hat_j)^2 over every row: the objective the search minimises."""
    # Dequantized in float32: the error of the stored pairs, not of a bf16 rounding after.
    w_hat = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    diff = np.array(w.astype(mx.float32) - w_hat, dtype=np.float64)
    d = np.asarray(diag, np.float64)
    if diff.ndim == 3 and d.ndim == 2:
        d = d[:, None, :]
    return float((diff * diff * d).sum())
