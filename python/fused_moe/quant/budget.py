"""Bits where they matter: each layer's experts' output error at each width,
and the allocation of widths that fits a size budget (--bits-budget).

Sensitivity. For one MoE layer, from its float experts and the routed
calibration tokens (each with its routing weight s, the renormalised score
that scales the expert's output), the squared error that round to nearest at
`bits` adds to the layer's output, summed over the tokens, in the units of
the residual stream, under diagonal statistics (input channels taken as
independent, as the weighted search does):

- down [D, H]: sum_{o,i} dW_oi^2 q_i with q_i = sum_t s_t^2 h_ti^2, the
  weighted search's objective on E[h^2];
- gate and up [H, D] (one width for both): their error reaches the output
  through h = silu(g) * u and then down, so row i's error is carried to the
  output by dh_i/dg_i = silu'(g_i) u_i (gate) or silu(g_i) (up) per token and
  by down's column norm |W_down[:, i]|^2: sum_{i,j} |W_down[:, i]|^2 dW_ij^2
  M_ij, M = (s^2 (dh/dg)^2)^T (x^2) (a first-order, diagonal estimate).

So both groups' errors are in the same units (the output's squared error),
and so are all layers' (the residual stream they all add to reaches the head
the same way, to first order): absolute errors are comparable, relative ones
are not. Round to nearest under these statistics is cheap (one pass of the
float layer), but the conversion quantizes with GPTQ, which lowers gate/up's
error far more than down's; so each layer's estimates are multiplied by the
calibrated quantizer's error over round to nearest's, per group and width,
measured on one expert (`quantizer_gain`).

Allocation. Widths are chosen per (layer, group) to minimise the summed
error within a byte budget, a multiple-choice knapsack, solved exactly by
dynamic programming over the bytes (`allocate`); ties go to the narrower
width, so the choice is reproducible.
"""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx
import numpy as np

from fused_moe.quant.quantizer import quantize_weight

# The widths --bits-budget chooses among (those the kernels hold, read from
# the grid where it is used).
CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)
# The two groups of an expert's projections that get one width each.
GATE_UP, DOWN = "gate_up", "down"
GROUPS = (GATE_UP, DOWN)
# Tokens per product while an expert's statistics are built.
CHUNK = 4096
# Tokens at most that the quantizer's gain is measured on (bounds its
# float64 copies: 4096 x 3072 x 8 bytes = 100 MB at REAP's shapes).
GAIN_TOKENS = 4096
# The allocation's table (items x budget units) at most.
MAX_TABLE = 1 << 26


def _rtn_squared_error(w: mx.array, bits: int, group_size: int, dtype: mx.Dtype) -> mx.array:
    """(w - RTN(w))^2 [out, in] float32, w rounded to `dtype` first, as the
    converter quantizes it."""
    w = w.astype(dtype)
    q = mx.quantize(w, group_size=group_size, bits=bits)
    d = w.astype(mx.float32) - mx.dequantize(q[0], q[1].astype(mx.float32), q[2].astype(mx.float32),
                                               group_size=group_size, bits=bits)
    return d * d


def expert_errors(x: np.ndarray, routed: np.ndarray, weights: np.ndarray, gate: mx.array, up: mx.array,
                  down: mx.array, bits: Sequence[int], group_size: int,
                  dtype: mx.Dtype = mx.bfloat16) -> dict[str, np.ndarray]:
    """One layer's estimated output error (module docstring) at each of
    `bits`, summed over its experts: {GATE_UP: [len(bits)], DOWN: [...]}
    float64. `x` [T, D] float32 are the MoE block's inputs, `routed` [T, k]
    the experts each token went to and `weights` [T, k] their routing
    weights; `gate`/`up` [E, H, D] and `down` [E, D, H] the float experts.
    One expert's statistics exist at a time."""
    E = gate.shape[0]
    flat = routed.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(E + 1))
    tokens = order // routed.shape[1]
    w2 = (weights.reshape(-1) ** 2).astype(np.float32)
    out = {g: np.zeros(len(bits), np.float64) for g in GROUPS}
    for e in range(E):
        sel = order[bounds[e]:bounds[e + 1]]
        if sel.size == 0:
            continue  # no token reaches it: no error on this text
        G, U, Dn = (a[e].astype(dtype).astype(mx.float32) for a in (gate, up, down))
        # The statistics in numpy float32 (its BLAS is the faster matmul here).
        g_np, u_np, d_np = (np.array(a) for a in (G, U, Dn))
        H, Din = g_np.shape
        m_gate = np.zeros((H, Din), np.float32)
        m_up = np.zeros((H, Din), np.float32)
        q = np.zeros(H, np.float64)
        for i in range(0, sel.size, CHUNK):
            xs = x[tokens[sel[i:i + CHUNK]]]
            s2 = w2[sel[i:i + CHUNK]][:, None]
            g, u = xs @ g_np.T, xs @ u_np.T
            with np.errstate(over="ignore"):
                sig = 1 / (1 + np.exp(-g))
            silu = g * sig
            dgate = sig * (1 + g * (1 - sig)) * u  # dh/dg
            x2 = xs * xs
            m_gate += (s2 * dgate * dgate).T @ x2
            m_up += (s2 * silu * silu).T @ x2
            h = silu * u
            q += (s2 * h * h).sum(0, dtype=np.float64)
        col = (d_np * d_np).sum(0)[:, None]  # |W_down[:, i]|^2
        m_gate, m_up, q = mx.array(col * m_gate), mx.array(col * m_up), mx.array(q.astype(np.float32))
        for k, b in enumerate(bits):
            gu = mx.sum(_rtn_squared_error(G, b, group_size, dtype) * m_gate, axis=1) + \
                mx.sum(_rtn_squared_error(U, b, group_size, dtype) * m_up, axis=1)
            dn = mx.sum(_rtn_squared_error(Dn, b, group_size, dtype) * q, axis=1)
            out[GATE_UP][k] += np.array(gu, np.float64).sum()
            out[DOWN][k] += np.array(dn, np.float64).sum()
    return out


def quantizer_gain(x: np.ndarray, gate: mx.array, up: mx.array, down: mx.array, bits: Sequence[int],
                   group_size: int, dtype: mx.Dtype = mx.bfloat16, full: bool = True) -> dict[str, np.ndarray]:
    """The calibrated quantizer's error over round to nearest's, per group
    and width ({GATE_UP: [len(bits)], DOWN: [...]}), on one expert (`gate`,
    `up` [H, D], `down` [D, H], float) and the inputs `x` [T, D] routed to
    it: each measured as tr(dW S dW^T) under the expert's own statistics S
    (gate/up: E[x x^T]; down: E[h h^T]), the full ones (`full`: GPTQ, as
    the conversion's default) or their diagonals (the weighted search)."""
    xs = x.astype(np.float64)
    g = xs @ np.array(gate, np.float64).T
    with np.errstate(over="ignore"):
        h = g / (1 + np.exp(-g)) * (xs @ np.array(up, np.float64).T)
    stats = {GATE_UP: xs.T @ xs / len(xs), DOWN: h.T @ h / len(xs)}
    if not full:
        stats = {k: np.diag(v).copy() for k, v in stats.items()}
    weights = {GATE_UP: mx.concatenate([gate, up]).astype(dtype), DOWN: down.astype(dtype)}
    out = {k: np.ones(len(bits), np.float64) for k in GROUPS}
    for k, b in enumerate(bits):
        for grp in GROUPS:
            w, s = weights[grp], stats[grp]
            errors = []
            for method in ("rtn", "auto"):
                q = quantize_weight(w, b, group_size, hessian=s.astype(np.float32), method=method)
                d = np.array(w.astype(mx.float32) - mx.dequantize(q[0], q[1].astype(mx.float32),
                                                                   q[2].astype(mx.float32), group_size=group_size,
                                                                   bits=b), np.float64)
                errors.append(float(((d @ s) * d).sum()) if s.ndim == 2 else float((d * d * s).sum()))
            if errors[0] > 0:
                out[grp][k] = errors[1] / errors[0]
    return out


def allocate(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int) -> list[int]:
    """For each item i (a (layer, group)), the index into its options (in
    the order of `errors[i]` and `costs[i]`, bytes) that minimises the summed
    error with the summed cost at most `budget`: exact, by dynamic
    programming over the bytes above each item's first option, counted in
    their greatest common divisor (at a model's shapes, the bytes of one bit
    of a down projection's stack, so a few units per item). Ties go to the
    earlier option. Raises ValueError if even the first options exceed the
    budget."""
    base = sum(int(c[0]) for c in costs)
    if base > budget:
        raise ValueError(f"the cheapest widths need {base} bytes, over the budget of {budget}")
    extra = [[int(c) - int(cs[0]) for c in cs] for cs in costs]
    if any(c < 0 for cs in extra for c in cs):
        raise ValueError("an option costs less than the item's first")
    unit = math.gcd(*(c for cs in extra for c in cs)) or 1
    room = min((budget - base) // unit, sum(max(cs) for cs in extra) // unit)
    if (room + 1) * len(errors) > MAX_TABLE:
        raise ValueError(f"the widths' sizes share too small a unit ({unit} bytes) for an exact allocation")
    # best[c]: the least error of the items so far within c units.
    best = np.zeros(room + 1, np.float64)
    picks = np.zeros((len(errors), room + 1), np.int8)
    for i, (err, cs) in enumerate(zip(errors, extra)):
        new = np.full(room + 1, np.inf)
        for k, (e, c) in enumerate(zip(err, cs)):
            c //= unit
            if c > room:
                continue
            cand = np.full(room + 1, np.inf)
            cand[c:] = best[:room + 1 - c] + float(e)
            better = cand < new
            new[better], picks[i][better] = cand[better], k
        best = new
    choice, c = [0] * len(errors), int(np.argmin(best))
    for i in range(len(errors) - 1, -1, -1):
        choice[i] = int(picks[i][c])
        c -= extra[i][choice[i]] // unit
    return choice
