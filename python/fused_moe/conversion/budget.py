"""--bits-budget BPW: the experts' widths per layer and projection group
(gate/up, down), chosen by their sensitivity on the calibration text so
that the whole checkpoint's bits per weight is at most BPW.

The output's tensor shapes depend on the widths, and the writer needs every
shape up front, so the widths are decided before anything is written: a
first pass runs the float source layers over the calibration tokens one at a
time (hidden states advanced by the float layer), estimates each layer's
output error at every candidate width under the calibrated quantizer
(`fused_moe.quant.budget`), and allocates the widths; the calibrated conversion then runs under the seed
recipe with those widths for the experts (everything else as the seed has
it)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from fused_moe.checkpoint.minimax import BLOCK_ATTR, MiniMaxShapes
from fused_moe.checkpoint.modules import EMBED
from fused_moe.checkpoint.storage import Stored, bits_per_weight, unit_experts, unit_tensors
from fused_moe.conversion.plan import from_recipe
from fused_moe.conversion.recipes import EXPERT_GROUP_SIZE, Recipe
from fused_moe.errors import ConversionError
from fused_moe.quant.budget import (CANDIDATE_BITS, GAIN_TOKENS, GATE_UP, GROUPS, allocate, expert_errors,
                                    quantizer_gain)
from fused_moe.quant.calibrate import BATCH_SEQUENCES, _RecordedExperts
from fused_moe.supported import SUPPORTED_BITS, width_unsupported

# The recipe --bits-budget keeps outside the experts.
BASE_RECIPE = "seed-3.7bit"


def parse(value) -> float:
    """--bits-budget's value as a finite positive number."""
    try:
        bpw = float(value)
    except (TypeError, ValueError):
        bpw = math.nan
    if isinstance(value, bool) or not math.isfinite(bpw) or bpw <= 0:
        raise ConversionError(f"--bits-budget {value!r}: expected a number of bits per weight, such as 3.676")
    return bpw


def candidate_bits(model: MiniMaxShapes) -> tuple[int, ...]:
    """The widths the budget chooses among: those the kernels hold, that
    the experts' rows can be packed at."""
    return tuple(b for b in CANDIDATE_BITS if b in SUPPORTED_BITS and not any(
        width_unsupported(n, b, EXPERT_GROUP_SIZE) for n in (model.hidden, model.intermediate)))


@dataclass
class BudgetReport:
    """What --bits-budget chose: per decoder layer (gate/up bits, down
    bits), the bits per weight reached, the range the widths allow, and per
    layer the calibrated quantizer's error over round to nearest's at the
    chosen widths (gate/up, down), as measured for the choice."""

    budget: float
    expert_bits: tuple
    bits_per_weight: float
    smallest: float
    largest: float
    seconds: float
    gains: tuple = ()

    def lines(self) -> list[str]:
        out = [f"bits budget {self.budget:g}: {self.bits_per_weight:.4f} bits per weight (the widths allow "
               f"{self.smallest:.3f} to {self.largest:.3f}); expert widths chosen on the calibration text in "
               f"{self.seconds:.1f} s, per layer (gate/up, down):"]
        out += [f"  layer {i}: {gu}, {d}" + (f" (calibrated / RTN error {self.gains[i][0]:.3f}, {self.gains[i][1]:.3f})"
                                             if self.gains else "") for i, (gu, d) in enumerate(self.expert_bits)]
        return out


class Budget:
    """The widths' sizes for one model, conversion target and base recipe."""

    def __init__(self, model: MiniMaxShapes, recipe: Recipe, to: str, bpw: float):
        self.model, self.recipe, self.to, self.bpw = model, recipe, to, bpw
        self.bits = candidate_bits(model)
        if not self.bits:
            raise ConversionError("--bits-budget: the experts' shapes fit none of the widths "
                                  f"{CANDIDATE_BITS} at group size {EXPERT_GROUP_SIZE}")
        lo, hi = self.bits[0], self.bits[-1]
        self.smallest = self.bits_per_weight([(lo, lo)] * model.layers)
        self.largest = self.bits_per_weight([(hi, hi)] * model.layers)
        if bpw < self.smallest:
            raise ConversionError(f"--bits-budget {bpw:g}: below the {self.smallest:.4f} bits per weight of "
                                  f"{lo}-bit experts, the smallest width")
        if bpw > self.largest:
            raise ConversionError(f"--bits-budget {bpw:g}: above the {self.largest:.4f} bits per weight of "
                                  f"{hi}-bit experts, the largest width")

    def units(self, expert_bits) -> list[list[Stored]]:
        return from_recipe(self.model, self.recipe.with_expert_bits(expert_bits))

    def _bytes(self, units) -> list[int]:
        return [sum(t.nbytes for t in unit_tensors(u, self.to, self.model.packed_path)) for u in units]

    def bits_per_weight(self, expert_bits) -> float:
        """The converter's own bits per weight over every tensor."""
        return bits_per_weight([t for u in self.units(expert_bits) for t in
                                unit_tensors(u, self.to, self.model.packed_path)])

    def choose(self, errors: list[dict]) -> tuple:
        """Per layer (gate/up bits, down bits) within the budget, from each
        layer's errors ({group: [error per width in self.bits]})."""
        lo, L = self.bits[0], self.model.layers
        base_units = self.units([(lo, lo)] * L)
        base = self._bytes(base_units)
        params = sum(t.params for u in base_units for t in unit_tensors(u, self.to, self.model.packed_path))
        # Each (layer, group)'s bytes at each width, over the all-smallest plan.
        extra = {g: [self._bytes(self.units([(b, lo) if g == GATE_UP else (lo, b)] * L)) for b in self.bits]
                 for g in GROUPS}
        unit = {stored[0].module.layer: i for i, stored in enumerate(base_units) if unit_experts(stored)}
        items = [(layer, g) for layer in range(L) for g in GROUPS]
        costs = [[extra[g][k][unit[layer]] - base[unit[layer]] for k in range(len(self.bits))] for layer, g in items]
        budget_bytes = math.floor(self.bpw * params / 8) - sum(base)
        picked = allocate([list(errors[layer][g]) for layer, g in items], costs, budget_bytes)
        chosen = [[lo, lo] for _ in range(L)]
        for (layer, g), k in zip(items, picked):
            chosen[layer][GROUPS.index(g)] = self.bits[k]
        chosen = tuple(map(tuple, chosen))
        if self.bits_per_weight(chosen) > self.bpw:  # the byte arithmetic above makes this impossible
            raise AssertionError(f"--bits-budget {self.bpw}: the chosen widths exceed it")
        return chosen


def _run(layer, states: mx.array) -> mx.array:
    out = []
    for i in range(0, states.shape[0], BATCH_SEQUENCES):
        y = layer(states[i:i + BATCH_SEQUENCES], mask="causal")
        mx.eval(y)
        out.append(y)
    return mx.concatenate(out) if out else states


def layer_errors(layer, states: mx.array, bits, dtype, full: bool = True) -> tuple[dict, dict, mx.array]:
    """One float decoder layer's errors at each width on the calibration
    states (fused_moe.quant.budget: round to nearest's, times the calibrated
    quantizer's gain measured on the expert the most tokens reach; `full`:
    GPTQ on full statistics, else the weighted search), that gain, and its
    output states."""
    moe = layer[BLOCK_ATTR]
    sw = moe.switch_mlp
    recorder = _RecordedExperts(sw, moe, 0)
    moe.switch_mlp = recorder
    try:
        out = _run(layer, states)
    finally:
        moe.switch_mlp = sw
    x, routed, _, _ = recorder.finish()
    # The routing weights the block scales each expert's output by (mlx-lm's
    # MiniMax: sigmoid scores at the chosen experts, renormalised).
    scores = np.take_along_axis(np.array(mx.sigmoid(mx.array(x) @ moe.gate.weight.T)), routed, -1)
    weights = scores / (scores.sum(-1, keepdims=True) + 1e-20)
    errors = expert_errors(x, routed, weights, sw.gate_proj.weight, sw.up_proj.weight, sw.down_proj.weight, bits,
                           EXPERT_GROUP_SIZE, dtype)
    # GPTQ lowers gate/up's error far more than down's (their inputs are more
    # correlated): on the synthetic MiniMax to about 0.13 of round to
    # nearest's against 0.37, so round to nearest alone would misprice them.
    e = int(np.argmax(np.bincount(routed.reshape(-1), minlength=sw.gate_proj.weight.shape[0])))
    tokens = np.flatnonzero((routed == e).any(-1))[:GAIN_TOKENS]
    gain = quantizer_gain(x[tokens], *(p.weight[e].astype(dtype).astype(mx.float32) for p in
                                       (sw.gate_proj, sw.up_proj, sw.down_proj)), bits, EXPERT_GROUP_SIZE, dtype, full)
    return {g: errors[g] * gain[g] for g in GROUPS}, gain, out


def choose_widths(budget: Budget, layers, units: list[list[Stored]], calibration: np.ndarray) -> BudgetReport:
    """The first pass: each layer's errors on the calibration tokens, then
    the allocation. `layers` is the conversion's CalibratedLayers (it builds
    the float layers and knows how the experts are calibrated); `units` the
    base recipe's plan."""
    from tqdm import tqdm

    start = time.perf_counter()
    embed = next(s for stored in units for s in stored if s.module.role == EMBED)
    table = layers.source.float_weight(embed, layers.recipe)
    if (q := embed.quant) is not None:  # the embedding as the conversion writes it
        table = mx.dequantize(*mx.quantize(table, group_size=q.group_size, bits=q.bits, mode=q.mode),
                              group_size=q.group_size, bits=q.bits, mode=q.mode)
    states = table.astype(mx.float32)[mx.array(calibration)]
    del table
    errors, gains = [], []
    with_experts = [stored for stored in units if unit_experts(stored)]
    bar = tqdm(with_experts, desc="choosing widths", unit="layer", file=sys.stderr)
    for stored in bar:
        layer, _, prefix = layers.float_layer(stored)
        bar.set_postfix_str(prefix.rstrip("."))
        e, gain, states = layer_errors(layer, states, budget.bits, layers.recipe.dtype,
                                       layers.experts.statistics == "full")
        errors.append(e)
        gains.append(gain)
        del layer
    bar.close()
    del states
    chosen = budget.choose(errors)
    at_chosen = tuple(tuple(float(g[grp][budget.bits.index(b)]) for grp, b in zip(GROUPS, widths))
                      for g, widths in zip(gains, chosen))
    return BudgetReport(budget.bpw, chosen, budget.bits_per_weight(chosen), budget.smallest, budget.largest,
                        time.perf_counter() - start, at_chosen)
