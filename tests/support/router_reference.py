"""Test data, stock router and fp64 reference for fused_moe.route.

The stock router is mlx-lm's MiniMaxSparseMoeBlock routing, op for op; the
fp64 reference reads the very weights the kernel reads (dequantized where the
gate is quantized).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import fused_moe as fm
from support.moe_reference import dequantized
from support.tolerance import assert_within_tolerance

# Gate forms: an unquantized nn.Linear in a float dtype, or mlx-lm's default
# 8-bit affine QuantizedLinear.
GATE_FORMS = ("float32", "bfloat16", "float16", "q8")
_FLOAT = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Smallest gap between the k-th and (k+1)-th biased scores for which the
# chosen set must equal stock's: the logits of stock and fused differ by a
# few fp32 ulps (another summation order), far below this.
MIN_SELECTION_GAP = 1e-5


def make_gate(E: int, D: int, form: str, seed: int = 0, group_size: int = 64):
    w = mx.random.normal((E, D), key=mx.random.key(seed)) * D**-0.5
    linear = nn.Linear(D, E, bias=False)
    linear.weight = w
    if form == "q8":
        gate = nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=8)
    else:
        linear.set_dtype(_FLOAT[form])
        gate = linear
    mx.eval(gate.parameters())
    return gate


def gate_weight64(gate) -> np.ndarray:
    """[E, D] fp64: the weights the kernel reads."""
    if isinstance(gate, nn.QuantizedLinear):
        return dequantized(gate)
    return np.array(gate.weight.astype(mx.float32), dtype=np.float64)


def stock_route(x, gate, bias, k):
    """mlx-lm's MiniMax router: its ops in its order (without the final cast
    of the weights to x's dtype, which fused_moe leaves to the caller)."""
    gates = gate(x.astype(mx.float32))
    scores = mx.sigmoid(gates)
    orig_scores = scores
    scores = scores + bias
    inds = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(orig_scores, inds, axis=-1)
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return inds, scores


def biased_scores64(x, gate, bias) -> np.ndarray:
    """[..., E] fp64 sigmoid(x·Wᵀ) + bias, and the unbiased scores."""
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    logits = x64 @ gate_weight64(gate).T
    scores = 1.0 / (1.0 + np.exp(-logits))
    return scores + np.array(bias.astype(mx.float32), dtype=np.float64), scores


def selection_gaps(biased: np.ndarray, k: int) -> np.ndarray:
    """Per row: the k-th minus the (k+1)-th biased score (inf when k = E)."""
    rows = biased.reshape(-1, biased.shape[-1])
    if k == rows.shape[1]:
        return np.full(rows.shape[0], np.inf)
    top = -np.sort(-rows, axis=1)
    return top[:, k - 1] - top[:, k]


def clear_inputs(shape, gate, bias, k, seed=0, dtype=mx.float32):
    """Random x of `shape` [..., D] whose rows all choose their k experts with
    a gap above MIN_SELECTION_GAP: rows with a near-tie are drawn again."""
    x = np.array(mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype).astype(mx.float32))
    rows = x.reshape(-1, shape[-1])
    for attempt in range(1, 50):
        biased, _ = biased_scores64(mx.array(rows).astype(dtype), gate, bias)
        near = selection_gaps(biased, k) <= MIN_SELECTION_GAP
        if not near.any():
            return mx.array(rows.reshape(shape)).astype(dtype)
        fresh = mx.random.normal((int(near.sum()), shape[-1]), key=mx.random.key(seed + 1000 * attempt))
        rows[near] = np.array(fresh.astype(dtype).astype(mx.float32))
    raise AssertionError("could not draw inputs without near-ties")


def by_index(indices, weights):
    """Each row's indices sorted, and the weights in that same order."""
    idx = np.array(indices).reshape(-1, indices.shape[-1]).astype(np.int64)
    w = np.array(weights.astype(mx.float32)).reshape(idx.shape)
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(w, order, 1)


def check_against_stock(x, gate, bias, k, route=fm.route) -> None:
    """fused_moe.route (or a backend's route, tests/backends.py) against
    stock: the same sets, and weights within the tolerance rule of
    tolerance.py against the fp64 reference."""
    indices, weights = route(x, gate, bias, k)
    assert indices.dtype == mx.uint32 and weights.dtype == mx.float32
    assert indices.shape == weights.shape == (*x.shape[:-1], k)
    stock_i, stock_w = stock_route(x, gate, bias, k)

    biased, scores = biased_scores64(x, gate, bias)
    gaps = selection_gaps(biased, k)
    assert gaps.min() > MIN_SELECTION_GAP, (
        f"test data has a near-tie (gap {gaps.min():.2g}); the comparison of "
        f"sets would be meaningless"
    )
    idx, w = by_index(indices, weights)
    stock_idx, stock_w = by_index(stock_i, stock_w)
    np.testing.assert_array_equal(idx, stock_idx, err_msg="selected experts differ from stock")

    chosen = np.take_along_axis(scores.reshape(idx.shape[0], -1), idx, 1)
    ref_w = chosen / (chosen.sum(axis=1, keepdims=True) + 1e-20)
    assert_within_tolerance(w, stock_w, ref_w, mx.float32, "route weights")
