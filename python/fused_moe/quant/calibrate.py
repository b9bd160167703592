"""The layer-by-layer calibration driver for MiniMax decoder layers.

Calibration hidden states go through the model one layer at a time, with
mlx-lm's own layer code (``mlx_lm.models.minimax``), so only one layer's
weights and the hidden states are ever in memory. For each layer:

1. the float layer runs over the calibration states while the inputs of each
   matrix to quantize are recorded: the full ``E[x x^T]`` for the attention
   projections (q/k/v share the attention norm's output; o_proj its own
   input) and lm_head; for the experts, the MoE block's inputs and routing;
2. every matrix is quantized with its statistics, by ``quantize_weight``'s
   "auto" (GPTQ where the statistics are full, the weighted search where
   they are diagonal; and by round to nearest, for the report). The experts
   go one at a time: each one's two hessians (gate/up: E[x x^T] of the
   tokens routed to it; down: E[h h^T] of its own h on them) are built
   from the recorded inputs only while it is quantized (EXPERT_STATISTICS;
   "diagonal" keeps E[x^2] per input);
3. the quantized layer produces the next layer's inputs (sequential, as
   GPTQ does), and the held-out states measure each layer's relative output
   error for both quantizations.

Experts that few tokens reach: an expert's statistics are blended with a
prior, ``(n_e m_e + lambda m_prior) / (n_e + lambda)`` (lambda =
SHRINKAGE_TOKENS), so one with no tokens gets the prior itself, never an
ill-posed estimate. With full statistics the prior of gate/up is the
layer's pooled E[x x^T] (PRIOR_TOKENS tokens evenly spread over the
calibration states) and that of down the expert's own E[h h^T] on those
tokens (pooling h over experts would average unrelated neurons); with
diagonal ones it is the layer's pooled E[x^2] over every expert's tokens,
as before. With MIN_EXPERT_TOKENS > 0, an expert routed fewer tokens also
gets, for its statistics only, the tokens that ranked it just below their
top k (within NEAR_MISS_RANKS, best rank and score first) up to that count;
the forward pass always uses the router's own choice.

This module knows nothing of checkpoint files; the converter hands it
mlx-lm modules with their float weights and writes what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fused_moe.checkpoint.minimax import BLOCK_ATTR
from fused_moe.packed.spec import STOCK_PROJECTIONS
from fused_moe.quant.quantizer import quantize_weight
from fused_moe.quant.stats import InputStats, shrink

# Full E[x x^T] (with which quantize_weight's "auto" is GPTQ) for the
# attention projections and lm_head, where it is small (D^2 and
# (heads * head_dim)^2 numbers).
FULL_HESSIAN_ATTENTION_AND_HEAD = True
# Sequences run through a layer at once.
BATCH_SEQUENCES = 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# The experts' module within the layer, as checkpoints name it.
SWITCH = f"{BLOCK_ATTR}.switch_mlp"

# The experts' statistics: "full", E[x x^T] per expert (gate/up: the routed
# tokens; down: the expert's own h), so that quantize_weight's "auto" is
# GPTQ; or "diagonal", E[x^2] per input, so the weighted search. Chosen by
# end-to-end measurement (docs/calibration_experts.md): on three synthetic
# MiniMax models full gave 0.34 / 0.43 / 0.40 of RTN's KL, diagonal 0.66 /
# 0.62 / 0.72, with a lower held-out error in every layer.
EXPERT_STATISTICS = "full"
STATISTICS = ("full", "diagonal")
# Tokens at which an expert's own statistics weigh as much as the prior's.
# Measured where many experts starve (64 experts, 1,792 tokens): none (0)
# 0.53 of RTN's KL, 64 tokens 0.45, 256 tokens 0.43; 16 to 1024 alike where
# few do.
SHRINKAGE_TOKENS = 256
# Experts that fewer calibration tokens reach get samples, for their
# statistics only, from the tokens that ranked them next after the top k
# (0: none). Off: with shrinkage on, near-miss samples measured no better on
# the synthetic models (0.34 -> 0.34, 0.43 -> 0.42, 0.40 -> 0.40 of RTN's
# KL); without shrinkage they helped (0.53 -> 0.47).
MIN_EXPERT_TOKENS = 0
# How far below the top k a near miss may rank: the next this-many experts
# by the router's selection score.
NEAR_MISS_RANKS = 4
# Full statistics: tokens (evenly spaced over the calibration states) whose
# E[x x^T], and each expert's E[h h^T] on them through its own weights, are
# the prior an expert's own statistics are shrunk toward.
PRIOR_TOKENS = 1024
# Tokens whose products are taken at once while an expert's statistics are
# built (bounds the float64 copies: 4096 x 3072 x 8 bytes = 100 MB at REAP).
STATS_CHUNK = 4096

Triple = tuple  # (weight uint32, scales, biases), as mx.quantize returns


@dataclass(frozen=True)
class ExpertCalibration:
    """How the experts are calibrated: `statistics` (STATISTICS), the
    shrinkage strength in tokens, and the near-miss top-up target in tokens
    (see the module docstring)."""

    statistics: str = EXPERT_STATISTICS
    shrinkage: float = SHRINKAGE_TOKENS
    min_tokens: int = MIN_EXPERT_TOKENS

    def __post_init__(self):
        if self.statistics not in STATISTICS:
            raise ValueError(f"expert statistics {self.statistics!r}: expected one of {', '.join(STATISTICS)}")
        if not isinstance(self.shrinkage, (int, float)) or not math.isfinite(self.shrinkage) or self.shrinkage < 0:
            raise ValueError(f"expert shrinkage {self.shrinkage!r}: expected a finite number of tokens >= 0")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"expert min_tokens {self.min_tokens!r}: expected a whole number of tokens >= 0")


class _Recorded(nn.Module):
    """A linear whose inputs are added to `stats` on the way through."""

    def __init__(self, inner: nn.Module, stats: Optional[InputStats]):
        super().__init__()
        self.inner, self.stats = inner, stats

    def __call__(self, x):
        if self.stats is not None:
            self.stats.update(x)
        return self.inner(x)


class _RecordedExperts(nn.Module):
    """mlx-lm's SwitchGLU as the MoE block calls it, keeping what the
    experts' statistics are built from after the pass: the block's inputs x
    [T, D] (float32; one more buffer of the calibration states' size), the
    experts each token is routed to [T, k], and, with `near` > 0, its near
    misses: the next `near` experts by the router's selection score (sigmoid
    of the gate's logits plus the routing bias, the score the block ranks
    by) [T, near], with those scores. Near misses only feed statistics; the
    block's output is the inner SwitchGLU's, unchanged."""

    def __init__(self, inner: nn.Module, moe: nn.Module, near: int):
        super().__init__()
        self.inner, self.near = inner, near
        self._gate, self._bias = moe.gate.weight, moe.e_score_correction_bias
        self.x, self.routed, self.near_experts, self.near_scores = [], [], [], []

    def __call__(self, x, indices):
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        idx = np.array(indices.reshape(xf.shape[0], -1)).astype(np.int32)
        self.x.append(np.array(xf))
        self.routed.append(idx)
        if self.near:
            k = idx.shape[1]
            scores = np.array(mx.sigmoid(xf @ self._gate.T) + self._bias)
            order = np.argsort(-scores, axis=-1, kind="stable")[:, :k + self.near].astype(np.int32)
            routed = (order[:, :, None] == idx[:, None, :]).any(-1)
            # The first `near` experts of each token's order that it is not routed to.
            pick = np.argsort(routed, axis=-1, kind="stable")[:, :self.near]
            near = np.take_along_axis(order, pick, -1)
            self.near_experts.append(near)
            self.near_scores.append(np.take_along_axis(scores, near, -1).astype(np.float32))
        return self.inner(x, indices)

    def finish(self):
        """The recorded arrays, concatenated (and the lists freed)."""
        cat = (lambda parts: np.concatenate(parts) if parts else None)
        out = tuple(cat(p) for p in (self.x, self.routed, self.near_experts, self.near_scores))
        self.x, self.routed, self.near_experts, self.near_scores = [], [], [], []
        return out


def _group_by_expert(experts: np.ndarray, n_experts: int, keys: tuple = ()) -> list[np.ndarray]:
    """The token ids of each expert among entries [T, m] of expert ids,
    ordered by `keys` (np.lexsort keys of the same shape, the most
    significant last), then by token."""
    tokens = np.repeat(np.arange(experts.shape[0], dtype=np.int64), experts.shape[1])
    flat = experts.reshape(-1)
    order = np.lexsort((tokens, *(k.reshape(-1) for k in keys), flat))
    bounds = np.searchsorted(flat[order], np.arange(n_experts + 1))
    return [tokens[order[bounds[e]:bounds[e + 1]]] for e in range(n_experts)]


def _swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """An expert's h = silu(x G^T) * (x U^T), float32 numpy."""
    g = x @ gate.T
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g)) * (x @ up.T)


def _outer(a: np.ndarray) -> np.ndarray:
    """sum over rows of a a^T, float64 (products too), STATS_CHUNK rows at a
    time so that the float64 copy stays small whatever the rows."""
    out = np.zeros((a.shape[1], a.shape[1]), np.float64)
    for i in range(0, a.shape[0], STATS_CHUNK):
        c = a[i:i + STATS_CHUNK].astype(np.float64)
        out += c.T @ c
    return out


def _blend(own: np.ndarray, count: int, prior: np.ndarray, strength: float) -> np.ndarray:
    """(own sum + strength * prior) / (count + strength), float32; the prior
    itself where there is nothing to blend."""
    if count + strength == 0:
        return prior.astype(np.float32)
    return ((own + strength * prior) / (count + strength)).astype(np.float32)


class _ExpertStatistics:
    """Each expert's statistics from a recorded pass (`_RecordedExperts`),
    one expert at a time: `hessians(e)` returns (gate/up's, down's), full
    [D, D] and [H, H] or diagonals [D] and [H] (float32), built from the
    expert's routed tokens, topped up from near misses to `min_tokens`, and
    blended with a prior by `shrinkage` tokens."""

    def __init__(self, recorder: _RecordedExperts, switch: nn.Module, options: ExpertCalibration):
        self.options = options
        self.x, routed, near, near_scores = recorder.finish()
        E = switch.gate_proj.weight.shape[0]
        # The layer's own (mx) weights, one expert's read into numpy at a time.
        self.gate, self.up = switch.gate_proj.weight, switch.up_proj.weight
        self.routed = _group_by_expert(routed, E)
        self.counts = np.array([r.size for r in self.routed], np.int64)
        self.topped_up = np.zeros(E, np.int64)
        self.tokens = list(self.routed)
        if options.min_tokens and near is not None:
            # Per expert: its near misses by rank below the top k, then score.
            ranks = np.broadcast_to(np.arange(near.shape[1]), near.shape)
            candidates = _group_by_expert(near, E, (-near_scores, ranks))
            for e in range(E):
                need = options.min_tokens - self.counts[e]
                if need > 0 and candidates[e].size:
                    extra = candidates[e][:need]
                    self.topped_up[e] = extra.size
                    self.tokens[e] = np.concatenate([self.routed[e], extra])
        if options.statistics == "full":
            n = self.x.shape[0]
            sample = np.unique(np.linspace(0, n - 1, min(n, PRIOR_TOKENS)).round().astype(np.int64))
            self.prior_x = self.x[sample]
            self.prior_gate_up = _outer(self.prior_x) / sample.size
        else:
            # The layer's pooled E[x^2] over every expert's tokens (gate/up)
            # and every expert's own h (down).
            sums = [self._sums(e) for e in range(E)]
            total = max(int(sum(t.size for t in self.tokens)), 1)
            self.pooled = tuple(sum(s[i] for s in sums) / total for i in range(2))
            self._diagonals = sums

    def _h(self, e: int, x: np.ndarray) -> np.ndarray:
        return _swiglu(x, np.array(self.gate[e]), np.array(self.up[e]))

    def _full(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Sums over the expert's tokens of x x^T and of its h h^T (float64),
        STATS_CHUNK tokens at a time (no copy of all its tokens' inputs)."""
        gate, up = np.array(self.gate[e]), np.array(self.up[e])
        sums = [np.zeros((self.x.shape[1],) * 2), np.zeros((gate.shape[0],) * 2)]
        tokens = self.tokens[e]
        for i in range(0, tokens.size, STATS_CHUNK):
            c = self.x[tokens[i:i + STATS_CHUNK]]
            sums[0] += _outer(c)
            sums[1] += _outer(_swiglu(c, gate, up))
        return sums[0], sums[1]

    def _sums(self, e: int):
        """Sums over the expert's tokens of x^2 and of its h^2 (float64)."""
        gate, up = np.array(self.gate[e]), np.array(self.up[e])
        sums = [np.zeros(self.x.shape[1]), np.zeros(gate.shape[0])]
        tokens = self.tokens[e]
        for i in range(0, tokens.size, STATS_CHUNK):
            c = self.x[tokens[i:i + STATS_CHUNK]]
            for j, a in enumerate((c, _swiglu(c, gate, up))):
                a = a.astype(np.float64)
                sums[j] += np.einsum("ij,ij->j", a, a)
        return sums[0], sums[1]

    def hessians(self, e: int):
        n, strength = int(self.tokens[e].size), self.options.shrinkage
        if self.options.statistics == "diagonal":
            own = self._diagonals[e]
            return tuple(shrink(own[i], n, self.pooled[i], strength) if n + strength else
                         self.pooled[i].astype(np.float32) for i in range(2))
        prior_down = _outer(self._h(e, self.prior_x)) / self.prior_x.shape[0]
        own_gate_up, own_down = self._full(e)
        return (_blend(own_gate_up, n, self.prior_gate_up, strength), _blend(own_down, n, prior_down, strength))


@dataclass
class LayerReport:
    """One layer's calibration: relative output error on the held-out
    states, ||y_q - y|| / ||y - x|| (of the layer's update to the residual
    stream), for round to nearest and calibrated; the fewest calibration
    tokens routed to an expert, how many experts had fewer than the
    shrinkage strength, and how many got near-miss samples."""

    rtn_error: float
    calibrated_error: float
    min_expert_tokens: Optional[int] = None
    fallback_experts: int = 0
    topped_up_experts: int = 0


@dataclass
class Calibrator:
    """Hidden states of the calibration and held-out sequences, advanced
    layer by layer through the quantized model."""

    calibration: mx.array  # [n, L, D]
    held_out: mx.array  # [m, L, D]
    experts: ExpertCalibration = field(default_factory=ExpertCalibration)
    reports: list = field(default_factory=list)

    @classmethod
    def from_embedding(cls, table: mx.array, calibration: np.ndarray, held_out: np.ndarray, **kw) -> "Calibrator":
        """Starts from the (quantized, dequantized) embedding table [V, D]."""
        return cls(table[mx.array(calibration)], table[mx.array(held_out)], **kw)

    def _run(self, layer: nn.Module, states: mx.array) -> mx.array:
        out = []
        for i in range(0, states.shape[0], BATCH_SEQUENCES):
            y = layer(states[i:i + BATCH_SEQUENCES], mask="causal")
            mx.eval(y)
            out.append(y)
        return mx.concatenate(out) if out else states

    def layer(self, layer: nn.Module, quants: dict[str, tuple[int, int]],
              dtype: mx.Dtype = mx.bfloat16) -> tuple[dict[str, Triple], LayerReport]:
        """Calibrates and quantizes one mlx-lm MiniMaxDecoderLayer holding
        float32 weights (MLX's CPU gather_mm computes only in float32) whose
        values are those of `dtype`, the dtype the matrices are quantized
        from and their scales stored in. `quants` maps module paths relative
        to the layer ("self_attn.q_proj", "block_sparse_moe.switch_mlp.gate_proj",
        ...) to (bits, group_size). Returns the quantized triples by the same
        paths and the layer's report; advances the hidden states."""
        attn, moe = layer.self_attn, layer[BLOCK_ATTR]
        sw = moe.switch_mlp
        qkv = InputStats(attn.q_proj.weight.shape[1], full=FULL_HESSIAN_ATTENTION_AND_HEAD)
        o = InputStats(attn.o_proj.weight.shape[1], full=FULL_HESSIAN_ATTENTION_AND_HEAD)
        originals = {n: getattr(attn, n) for n in ATTENTION}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, n, _Recorded(originals[n], o if n == "o_proj" else qkv if n == "q_proj" else None))
        # The experts' inputs are recorded only where the recipe quantizes them.
        recorder = (_RecordedExperts(sw, moe, NEAR_MISS_RANKS if self.experts.min_tokens else 0)
                    if any(f"{SWITCH}.{p}" in quants for p in STOCK_PROJECTIONS) else sw)
        moe.switch_mlp = recorder
        try:
            self._run(layer, self.calibration)
        finally:
            for n, m in originals.items():
                setattr(attn, n, m)
            moe.switch_mlp = sw
        weights = {f"self_attn.{n}": getattr(attn, n).weight for n in ATTENTION}
        weights.update({f"{SWITCH}.{p}": getattr(sw, p).weight for p in STOCK_PROJECTIONS})
        hessians = {f"self_attn.{n}": _hessian(o if n == "o_proj" else qkv) for n in ATTENTION}
        del qkv, o

        calibrated, rtn = {}, {}
        # q/k/v read the same input, so they share one hessian: quantized as
        # one stack of rows, they need GPTQ's factorization of it once, not
        # three times (rows are quantized independently given the hessian).
        shared = [p for p in (f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")) if p in quants]
        if len(shared) > 1 and len({quants[p] for p in shared}) == 1:
            bits, gs = quants[shared[0]]
            stacked = quantize_weight(mx.concatenate([weights[p].astype(dtype) for p in shared]), bits, gs,
                                      hessian=hessians[shared[0]])
            bounds = np.cumsum([0] + [weights[p].shape[0] for p in shared])
            for p, r0, r1 in zip(shared, bounds[:-1], bounds[1:]):
                calibrated[p] = tuple(a[int(r0):int(r1)] for a in stacked)
        counts, topped_up = None, 0
        if recorder is not sw:
            stats = _ExpertStatistics(recorder, sw, self.experts)
            calibrated.update(self._experts(stats, sw, quants, dtype))
            counts, topped_up = stats.counts, int((stats.topped_up > 0).sum())
            del stats
        for path, (bits, gs) in quants.items():
            w = weights[path].astype(dtype)
            if path not in calibrated:
                calibrated[path] = quantize_weight(w, bits, gs, hessian=hessians[path])
            rtn[path] = quantize_weight(w, bits, gs, method="rtn")

        reference = self._run(layer, self.held_out)
        errors = {}
        for name, triples in (("rtn", rtn), ("calibrated", calibrated)):
            _load(layer, quants, triples, weights)
            y = self._run(layer, self.held_out)
            errors[name] = _relative_error(y, reference, self.held_out)
            if name == "calibrated":
                self.held_out = y
                self.calibration = self._run(layer, self.calibration)
        _restore(layer, weights)
        report = LayerReport(errors["rtn"], errors["calibrated"], None if counts is None else int(counts.min()),
                             0 if counts is None else int((counts < self.experts.shrinkage).sum()), topped_up)
        self.reports.append(report)
        return calibrated, report

    def _experts(self, stats: _ExpertStatistics, sw: nn.Module, quants: dict, dtype: mx.Dtype) -> dict:
        """The expert matrices in `quants`, quantized one expert at a time
        with that expert's statistics (only one expert's hessians exist at
        once); stacked [E, ...] triples by path."""
        paths = {p: f"{SWITCH}.{p}" for p in STOCK_PROJECTIONS if f"{SWITCH}.{p}" in quants}
        if not paths:
            return {}
        w = {p: getattr(sw, p).weight for p in paths}
        # gate and up read the same x: with the same bits and group size they
        # are quantized as one stack of rows, one factorization of its hessian.
        together = ("gate_proj" in paths and "up_proj" in paths
                    and quants[paths["gate_proj"]] == quants[paths["up_proj"]])
        out = {p: [] for p in paths}
        for e in range(w[next(iter(paths))].shape[0]):
            gate_up, down = stats.hessians(e)
            if together:
                bits, gs = quants[paths["gate_proj"]]
                rows = w["gate_proj"].shape[1]
                t = quantize_weight(mx.concatenate([w["gate_proj"][e], w["up_proj"][e]]).astype(dtype), bits, gs,
                                    hessian=gate_up)
                out["gate_proj"].append(tuple(a[:rows] for a in t))
                out["up_proj"].append(tuple(a[rows:] for a in t))
            for p in paths:
                if together and p != "down_proj":
                    continue
                bits, gs = quants[paths[p]]
                out[p].append(quantize_weight(w[p][e].astype(dtype), bits, gs,
                                              hessian=down if p == "down_proj" else gate_up))
            mx.eval(*(t for p in paths for t in out[p][-1]))
        return {paths[p]: tuple(mx.stack([t[i] for t in triples]) for i in range(3)) for p, triples in out.items()}

    def head(self, norm: nn.Module, weight: mx.array, bits: int, group_size: int) -> Triple:
        """lm_head [V, D] quantized with the statistics of the final norm's output."""
        stats = InputStats(weight.shape[1], full=FULL_HESSIAN_ATTENTION_AND_HEAD)
        for i in range(0, self.calibration.shape[0], BATCH_SEQUENCES):
            stats.update(norm(self.calibration[i:i + BATCH_SEQUENCES]))
        return quantize_weight(weight, bits, group_size, hessian=_hessian(stats))


def _hessian(stats: InputStats) -> np.ndarray:
    """What the statistics hold: the full E[x x^T], or its diagonal."""
    return stats.hessian() if stats.full else stats.diagonal()


def _relative_error(y: mx.array, reference: mx.array, x: mx.array) -> float:
    num = mx.sum(mx.square((y - reference).astype(mx.float32)))
    den = mx.sum(mx.square((reference - x).astype(mx.float32)))
    return float(mx.sqrt(num / mx.maximum(den, 1e-30)).item())


def _load(layer: nn.Module, quants: dict, triples: dict, weights: dict) -> None:
    """The layer's quantized matrices replaced by their dequantized weights."""
    from mlx.utils import tree_unflatten

    updates = []
    for path, (bits, gs) in quants.items():
        q, s, b = triples[path]
        w = mx.dequantize(q, s, b, group_size=gs, bits=bits).astype(weights[path].dtype)
        updates.append((f"{path}.weight", w))
    layer.update(tree_unflatten(updates))


def _restore(layer: nn.Module, weights: dict) -> None:
    from mlx.utils import tree_unflatten

    layer.update(tree_unflatten([(f"{p}.weight", w) for p, w in weights.items()]))
