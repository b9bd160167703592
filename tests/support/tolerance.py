"""The tolerance rule for fused results, in one place.

err(a, ref) = max|a - ref| / max|ref|, with ref computed in fp64 from the
same dequantized weights the kernels read. A fused result passes when

    err(fused, ref) <= 2 * err(stock, ref) + slack

where stock is mlx-lm's path (SwitchGLU pieces plus the weighted sum) run in
the same dtype, and slack is 1e-5 for float32 inputs and 1e-3 for float16 and
bfloat16 inputs.
"""

import mlx.core as mx
import numpy as np


def to_numpy(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32), dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


def rel_err(a, ref) -> float:
    a, ref = to_numpy(a), to_numpy(ref)
    scale = np.max(np.abs(ref))
    assert scale > 0, "reference is all zeros; the test data is degenerate"
    return float(np.max(np.abs(a - ref)) / scale)


def slack(dtype: mx.Dtype) -> float:
    return 1e-5 if dtype == mx.float32 else 1e-3


def assert_within_tolerance(fused, stock, ref, dtype: mx.Dtype, what: str = "") -> None:
    err_fused = rel_err(fused, ref)
    err_stock = rel_err(stock, ref)
    bound = 2 * err_stock + slack(dtype)
    assert np.all(np.isfinite(to_numpy(fused))), f"{what}: fused result has NaN/Inf"
    assert err_fused <= bound, (
        f"{what}: err(fused)={err_fused:.3g} > 2*err(stock)={2 * err_stock:.3g} + "
        f"{slack(dtype):g} ({dtype})"
    )
