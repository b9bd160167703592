"""--calibrate: the converter's side of calibrated quantization.

It checks the options, tokenizes the text with the checkpoint's own
tokenizer, builds each source layer as an mlx-lm MiniMaxDecoderLayer with the
float weights the converter would quantize, and hands it to
`fused_moe.quant.calibrate.Calibrator`, which returns the quantized triples
the converter then writes in place of round to nearest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from fused_moe.checkpoint.minimax import EXPERTS, LM_HEAD, NORM
from fused_moe.checkpoint.sources import Checkpoint
from fused_moe.checkpoint.storage import Stored
from fused_moe.conversion.recipes import Recipe
from fused_moe.conversion.sources import FromHuggingFace
from fused_moe.errors import ConversionError
from fused_moe.quant.calibrate import Calibrator, ExpertCalibration, LayerReport
from fused_moe.quant.text import CalibrationTextError, CalibrationTokens, read_texts, tokenize

DEFAULT_CALIB_TOKENS = 131072
DEFAULT_CALIB_SEQ_LEN = 512


def prepare(source: Checkpoint, text: Path, tokens: int, seq_len: int, verify: bool) -> CalibrationTokens:
    """Checks --calibrate's options and tokenizes the text with the source's
    tokenizer; raises ConversionError before anything is written."""
    if verify:
        raise ConversionError("--verify re-derives experts by round to nearest; it does not apply with --calibrate")
    if tokens is None or tokens < 1 or seq_len is None or seq_len < 2:
        raise ConversionError(f"--calib-tokens {tokens} / --calib-seq-len {seq_len}: must be positive (seq-len at least 2)")
    try:
        texts = read_texts(text)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        data = tokenize(texts, lambda t: tokenizer.encode(t, add_special_tokens=False), seq_len=seq_len,
                        max_tokens=tokens, separator=tokenizer.eos_token_id, where=str(text))
    except CalibrationTextError as e:
        raise ConversionError(str(e)) from None
    if data.held_out.shape[0] == 0:
        raise ConversionError(
            f"{text}: {data.calibration.size} tokens make one sequence of {seq_len}; at least two are needed "
            f"(one is held out for the quality report)")
    return data


@dataclass
class CalibrationSummary:
    text: Path
    calibration_tokens: int
    held_out_tokens: int
    seq_len: int
    layers: list  # LayerReport per decoder layer
    experts: ExpertCalibration = ExpertCalibration()

    def lines(self) -> list[str]:
        out = [f"calibration: {self.calibration_tokens} tokens from {self.text} in sequences of {self.seq_len}, "
               f"{self.held_out_tokens} held out"]
        with_experts = [i for i, r in enumerate(self.layers) if r.min_expert_tokens is not None]
        if with_experts:
            fewest = min(with_experts, key=lambda i: self.layers[i].min_expert_tokens)
            fallback = sum(r.fallback_experts for r in self.layers)
            topped_up = sum(r.topped_up_experts for r in self.layers)
            x = self.experts
            out.append(
                f"experts ({x.statistics} statistics): fewest calibration tokens "
                f"{self.layers[fewest].min_expert_tokens} (layer {fewest}); {fallback} experts had fewer than "
                f"{x.shrinkage:g} and lean on their prior statistics"
                + (f"; {topped_up} got near-miss samples up to {x.min_tokens}" if x.min_tokens else ""))
        if self.layers:
            out.append("held-out relative output error per layer (RTN -> calibrated):")
            out += [f"  layer {i}: {r.rtn_error:.4f} -> {r.calibrated_error:.4f}" for i, r in enumerate(self.layers)]
        return out


class CalibratedLayers:
    """Per unit of the conversion, the calibrated triples by module path."""

    def __init__(self, source: FromHuggingFace, recipe: Recipe, data: CalibrationTokens, text: Path,
                 experts: Optional[ExpertCalibration] = None):
        from mlx_lm.models import minimax

        self.source, self.recipe, self.data, self.text = source, recipe, data, text
        self.experts = experts or ExpertCalibration()
        self.args = minimax.ModelArgs.from_dict(source.checkpoint.config)
        self.calibrator: Optional[Calibrator] = None

    def _float(self, s: Stored) -> mx.array:
        return self.source.float_weight(s, self.recipe)

    def embedding(self, table: mx.array) -> None:
        """Starts the hidden states from the embedding as written (dequantized)."""
        self.calibrator = Calibrator.from_embedding(table.astype(mx.float32), self.data.calibration,
                                                    self.data.held_out, experts=self.experts)

    def float_layer(self, stored: list[Stored]):
        """(mlx-lm's MiniMaxDecoderLayer holding this unit's source weights
        in float32, (bits, group size) by module path relative to the layer,
        the layer's path prefix)."""
        from mlx_lm.models import minimax

        layer_index = stored[0].module.layer
        prefix = f"model.layers.{layer_index}."
        params, quants = [], {}
        for s in stored:
            rel = s.module.path[len(prefix):]
            if s.module.role == EXPERTS:
                w = mx.stack([self.source.expert_float(layer_index, s.module.name, e, self.recipe)
                              for e in range(self.source.checkpoint.model.experts)])
            else:
                w = self._float(s)
            params.append((rel if s.module.tensor == s.module.path else f"{rel}.weight", w))
            if s.quant is not None:
                quants[rel] = (s.quant.bits, s.quant.group_size)
        layer = minimax.MiniMaxDecoderLayer(self.args)
        expected = {k for k, _ in tree_flatten(layer.parameters())}
        if expected != {k for k, _ in params}:
            raise ConversionError(f"{prefix[:-1]}: the source layer does not match mlx-lm's MiniMax layer "
                                  f"(missing {sorted(expected - {k for k, _ in params})})")
        # Computed in float32 (MLX's CPU gather_mm has no bf16) on the source values.
        layer.update(tree_unflatten([(k, w.astype(mx.float32)) for k, w in params]))
        mx.eval(layer.parameters())
        return layer, quants, prefix

    def layer(self, stored: list[Stored]) -> dict[str, tuple]:
        layer, quants, prefix = self.float_layer(stored)
        triples, _ = self.calibrator.layer(layer, quants, self.recipe.dtype)
        return {prefix + rel: t for rel, t in triples.items()}

    def head(self, stored: list[Stored]) -> dict[str, tuple]:
        norm_s = next(s for s in stored if s.module.role == NORM)
        head_s = next((s for s in stored if s.module.role == LM_HEAD), None)
        if head_s is None or head_s.quant is None:
            return {}
        norm = nn.RMSNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)
        norm.weight = self._float(norm_s).astype(mx.float32)
        triple = self.calibrator.head(norm, self._float(head_s), head_s.quant.bits, head_s.quant.group_size)
        return {head_s.module.path: triple}

    def summary(self) -> CalibrationSummary:
        return CalibrationSummary(self.text, self.data.calibration.size, self.data.held_out.size, self.data.seq_len,
                                  list(self.calibrator.reports) if self.calibrator else [], self.experts)
