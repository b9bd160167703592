"""The layer-by-layer calibration driver for MiniMax decoder layers.

Calibration hidden states go through the model one layer at a time, with
mlx-lm's own layer code (``mlx_lm.models.minimax``), so only one layer's
weights and the hidden states are ever in memory. For each layer:

1. the float layer runs over the calibration states while the inputs of each
   matrix to quantize are recorded (q/k/v share the attention norm's output;
   o_proj its own input; each expert's gate/up the tokens the router sends to
   it, its down that expert's own h): the full ``E[x x^T]`` for the attention
   projections (and lm_head), ``E[x^2]`` per input channel for the experts;
2. every matrix is quantized with its statistics, by ``quantize_weight``'s
   "auto": GPTQ where the statistics are full, the weighted search where they
   are diagonal (and by round to nearest, for the report);
3. the quantized layer produces the next layer's inputs (sequential, as
   GPTQ does), and the held-out states measure each layer's relative output
   error for both quantizations.

Experts that see few tokens use a shrinkage blend with the layer's pooled
statistics, ``(n_e m_e + lambda m_pool) / (n_e + lambda)`` (``stats.shrink``):
an expert with no tokens gets the pool itself, never an ill-posed estimate.

This module knows nothing of checkpoint files; the converter hands it
mlx-lm modules with their float weights and writes what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fused_moe.checkpoint.minimax import BLOCK_ATTR
from fused_moe.packed.spec import STOCK_PROJECTIONS
from fused_moe.quant.quantizer import quantize_weight
from fused_moe.quant.stats import InputStats, shrink

# Tokens at which an expert's own statistics weigh as much as the pool's.
SHRINKAGE_TOKENS = 256
# Full E[x x^T] (with which quantize_weight's "auto" is GPTQ) for the
# attention projections and lm_head, where it is small (D^2 and
# (heads * head_dim)^2 numbers); the experts keep E[x^2] per input (the
# weighted search): full ones per expert would be 7.3 GB a layer at REAP's shapes.
FULL_HESSIAN_ATTENTION_AND_HEAD = True
# Sequences run through a layer at once.
BATCH_SEQUENCES = 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

Triple = tuple  # (weight uint32, scales, biases), as mx.quantize returns


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
    """mlx-lm's SwitchGLU, recording per expert: the routed tokens (gate/up
    inputs) and the expert's own h = silu(x G^T) * (x U^T) (down inputs)."""

    def __init__(self, inner: nn.Module, experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.inner = inner
        self.gate_up_sums = np.zeros((experts, hidden), np.float64)
        self.down_sums = np.zeros((experts, intermediate), np.float64)
        self.counts = np.zeros(experts, np.int64)

    def __call__(self, x, indices):
        xf = x.reshape(-1, x.shape[-1])
        idx = np.array(indices.reshape(xf.shape[0], -1))
        x64 = np.array(xf.astype(mx.float32)).astype(np.float64)
        g, u = self.inner.gate_proj.weight, self.inner.up_proj.weight
        for e in np.unique(idx):
            rows = np.nonzero((idx == e).any(-1))[0]
            self.counts[e] += rows.size
            self.gate_up_sums[e] += np.einsum("ij,ij->j", x64[rows], x64[rows])
            xe = xf[mx.array(rows)]
            h = nn.silu(xe @ g[int(e)].T) * (xe @ u[int(e)].T)
            h64 = np.array(h.astype(mx.float32)).astype(np.float64)
            self.down_sums[e] += np.einsum("ij,ij->j", h64, h64)
        return self.inner(x, indices)


@dataclass
class LayerReport:
    """One layer's calibration: relative output error on the held-out
    states, ||y_q - y|| / ||y - x|| (of the layer's update to the residual
    stream), for round to nearest and calibrated; expert token counts."""

    rtn_error: float
    calibrated_error: float
    min_expert_tokens: Optional[int] = None
    fallback_experts: int = 0


@dataclass
class Calibrator:
    """Hidden states of the calibration and held-out sequences, advanced
    layer by layer through the quantized model."""

    calibration: mx.array  # [n, L, D]
    held_out: mx.array  # [m, L, D]
    strength: float = SHRINKAGE_TOKENS
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
        E, H, D = sw.gate_proj.weight.shape
        qkv = InputStats(D, full=FULL_HESSIAN_ATTENTION_AND_HEAD)
        o = InputStats(attn.o_proj.weight.shape[1], full=FULL_HESSIAN_ATTENTION_AND_HEAD)
        originals = {n: getattr(attn, n) for n in ATTENTION}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, n, _Recorded(originals[n], o if n == "o_proj" else qkv if n == "q_proj" else None))
        recorder = _RecordedExperts(sw, E, D, H)
        moe.switch_mlp = recorder
        try:
            self._run(layer, self.calibration)
        finally:
            for n, m in originals.items():
                setattr(attn, n, m)
            moe.switch_mlp = sw
        weights = {f"self_attn.{n}": getattr(attn, n).weight for n in ATTENTION}
        weights.update({f"{BLOCK_ATTR}.switch_mlp.{p}": getattr(sw, p).weight for p in STOCK_PROJECTIONS})
        diag = {f"self_attn.{n}": _hessian(o if n == "o_proj" else qkv) for n in ATTENTION}
        counts = recorder.counts
        for proj, sums in (("gate_proj", recorder.gate_up_sums), ("up_proj", recorder.gate_up_sums),
                           ("down_proj", recorder.down_sums)):
            pooled = sums.sum(0) / max(counts.sum(), 1)
            diag[f"{BLOCK_ATTR}.switch_mlp.{proj}"] = np.stack(
                [shrink(sums[e], int(counts[e]), pooled, self.strength) for e in range(E)])

        calibrated, rtn = {}, {}
        # q/k/v read the same input, so they share one hessian: quantized as
        # one stack of rows, they need GPTQ's factorization of it once, not
        # three times (rows are quantized independently given the hessian).
        shared = [p for p in (f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")) if p in quants]
        if len(shared) > 1 and len({quants[p] for p in shared}) == 1:
            bits, gs = quants[shared[0]]
            stacked = quantize_weight(mx.concatenate([weights[p].astype(dtype) for p in shared]), bits, gs,
                                      hessian=diag[shared[0]])
            bounds = np.cumsum([0] + [weights[p].shape[0] for p in shared])
            for p, r0, r1 in zip(shared, bounds[:-1], bounds[1:]):
                calibrated[p] = tuple(a[int(r0):int(r1)] for a in stacked)
        for path, (bits, gs) in quants.items():
            w = weights[path].astype(dtype)
            if path not in calibrated:
                calibrated[path] = quantize_weight(w, bits, gs, hessian=diag[path])
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
        report = LayerReport(errors["rtn"], errors["calibrated"], int(counts.min()),
                             int((counts < self.strength).sum()))
        self.reports.append(report)
        return calibrated, report

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
