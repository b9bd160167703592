"""The conversion: check everything, stream unit by unit into a workspace
beside the destination, optionally verify, then rename into place."""

from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import json

import mlx.core as mx

from fused_moe.checkpoint.files import COPIED_FILES
from fused_moe.checkpoint.minimax import MiniMaxShapes
from fused_moe.checkpoint.modules import EMBED, EXPERTS
from fused_moe.checkpoint.safetensors import CheckpointWriter
from fused_moe.checkpoint.sources import open_checkpoint
from fused_moe.checkpoint.storage import Stored, bits_per_weight, stack_of, unit_experts, unit_tensors
from fused_moe.conversion import budget as budget_mod
from fused_moe.conversion import calibration as calibration_mod
from fused_moe.conversion import recipes as recipes_mod
from fused_moe.conversion.plan import from_recipe
from fused_moe.conversion.recipes import Recipe
from fused_moe.conversion.sources import SourceConverter, for_checkpoint
from fused_moe.conversion.workspace import Workspace, prepare_destination
from fused_moe.errors import ConversionError
from fused_moe.packed import spec
from fused_moe.supported import expert_quantization_unsupported, width_unsupported

# mlx-lm's file size limit; a tensor larger than this gets a file of its own.
MAX_FILE_BYTES = 5 << 30
# Experts per layer that --verify checks: the first, the last and random others.
VERIFY_EXPERTS = 3
TARGETS = ("packed", "stock")


@dataclass
class Summary:
    """What a conversion did."""

    dst: Path
    source_kind: str
    to: str
    recipe: Optional[str]
    tensors: int
    bytes: int
    files: int
    bits_per_weight: float
    seconds: float
    dropped: list
    verified_experts: int
    calibration: Optional[calibration_mod.CalibrationSummary] = None
    budget: Optional[budget_mod.BudgetReport] = None

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.files} "
            f"file{'s' if self.files != 1 else ''} to {self.dst}",
            f"bits per weight: {self.bits_per_weight:.3f}",
            f"time: {self.seconds:.1f} s",
        ]
        if self.budget:
            out += self.budget.lines()
        if self.verified_experts:
            out.append(f"verified: {self.verified_experts} experts bit for bit")
        if self.calibration:
            out += self.calibration.lines()
        if self.dropped:
            out.append(f"dropped {len(self.dropped)} source tensors the model does not use: " + _abbreviate(self.dropped))
        return out


def _abbreviate(names: list[str], limit: int = 20) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    groups: dict[str, int] = {}
    for n in names:
        prefix = ".".join(n.split(".")[:3])
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{p}.* ({c})" for p, c in groups.items())


def bits_per_weight_of(config: dict, recipe: str | Recipe = "seed-3.7bit") -> float:
    """Bits per weight of the packed checkpoint `recipe` makes of a model with
    this config.json, computed from the shapes alone."""
    recipe = recipes_mod.get(recipe) if isinstance(recipe, str) else recipe
    model = MiniMaxShapes.from_config(config)
    return bits_per_weight([t for unit in from_recipe(model, recipe) for t in unit_tensors(unit, "packed", model.packed_path)])


def _check_options(recipe: Optional[str], bits: Optional[int], group_size: Optional[int], mode: Optional[str],
                   to: str) -> None:
    if to not in TARGETS:
        raise ConversionError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if group_size is not None and bits is None and mode is None:
        raise ConversionError("--group-size needs --bits or --mode")
    if recipe is not None and (bits is not None or mode is not None):
        raise ConversionError("give either --recipe or --bits/--mode, not both")


def _bits_budget(bits_budget, recipe: Optional[str], bits: Optional[int], mode: Optional[str], calibrate,
                 source: SourceConverter) -> tuple[Optional[float], Optional[str]]:
    """(--bits-budget's value, or None, and the recipe it implies), checked
    before anything is read or written."""
    if bits_budget is None:
        return None, recipe
    bpw = budget_mod.parse(bits_budget)
    if calibrate is None:
        raise ConversionError("--bits-budget chooses the experts' widths on the calibration text: it needs --calibrate")
    if bits is not None or mode is not None or recipe not in (None, budget_mod.BASE_RECIPE):
        raise ConversionError(f"--bits-budget keeps the {budget_mod.BASE_RECIPE} recipe outside the experts; it "
                              f"does not combine with --bits, --mode or another --recipe")
    source.require_original_weights("measure the experts' widths for --bits-budget on")
    return bpw, budget_mod.BASE_RECIPE


def _check_target(units: list[list[Stored]], to: str) -> None:
    for stored in units:
        for s in stored:
            m = s.module
            if s.quant is None:
                continue
            if reason := width_unsupported(m.shape[-1], s.quant.bits, s.quant.group_size):
                raise ConversionError(f"{m.path}: {reason}")
            if m.role == EXPERTS and to == "packed":
                if reason := expert_quantization_unsupported(s.quant.mode, s.quant.bits, s.quant.group_size):
                    raise ConversionError(f"{m.path}: the fused kernels do not take these experts: {reason} "
                                          f"(or use --to stock)")
        experts = unit_experts(stored)
        if "gate_proj" in experts and to == "packed":
            gate, up = experts["gate_proj"], experts["up_proj"]
            if (gate.quant, gate.bias is None, gate.global_scale) != (up.quant, up.bias is None, up.global_scale):
                raise ConversionError(
                    f"{stack_of(experts)}: gate_proj {gate.quant} and up_proj {up.quant} must share their "
                    f"quantization to be packed"
                )


class _Writing:
    """Writes the units of one conversion in order."""

    def __init__(self, source: SourceConverter, recipe: Optional[Recipe], to: str, writer: CheckpointWriter):
        self.source, self.recipe, self.to, self.writer = source, recipe, to, writer

    def unit(self, stored: list[Stored]) -> None:
        for s in stored:
            if s.module.role != EXPERTS:
                self.source.write_module(s, self.writer, self.recipe)
        if experts := unit_experts(stored):
            self.source.write_experts(experts, self.to, self.writer, self.recipe)

    def calibrated_unit(self, calibrated, stored: list[Stored]) -> None:
        """One unit of a --calibrate conversion: the embedding starts the
        hidden states, a layer is calibrated before it is written, the head
        last."""
        if stored[0].module.role == EMBED:
            written = self.source.write_module(stored[0], self.writer, self.recipe)
            q = stored[0].quant
            table = written if q is None else mx.dequantize(
                *written, group_size=q.group_size, bits=q.bits, mode=q.mode)
            calibrated.embedding(table)
            return
        self.source.override = calibrated.layer(stored) if unit_experts(stored) else calibrated.head(stored)
        try:
            self.unit(stored)
        finally:
            self.source.override = {}


def _verify(source: SourceConverter, recipe: Optional[Recipe], units, out: Path) -> int:
    """Re-derives a sample of experts from the source and compares them, bit
    for bit, with what was written (read back from disk, unpacked)."""
    written = open_checkpoint(out)
    rng = random.Random(0)
    count = 0
    for stored in units:
        experts = unit_experts(stored)
        if not experts:
            continue
        stack = stack_of(experts)
        E = next(iter(experts.values())).module.shape[0]
        sample = sorted({0, E - 1, *rng.sample(range(E), min(E, VERIFY_EXPERTS) - min(E, 2))})
        for e in sample:
            want = source.expert(experts, e, recipe)
            got = written.read_expert(stack, e)
            for proj, a, b in zip(experts, want, got):
                if a.spec != b.spec:
                    raise ConversionError(f"--verify: expert {e} of {stack} {proj}: its quantization differs")
                for name, x in a.arrays().items():
                    y = b.arrays()[name]
                    if x.dtype != y.dtype or x.shape != y.shape or not mx.array_equal(x, y).item():
                        raise ConversionError(f"--verify: expert {e} of {stack} {proj}.{name} differs from the source")
            count += 1
    return count


def _copy_files(src: Path, dst: Path) -> None:
    for pattern in COPIED_FILES:
        for f in src.glob(pattern):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)


def convert(
    src,
    dst,
    *,
    recipe: Optional[str] = None,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mode: Optional[str] = None,
    to: str = "packed",
    overwrite: bool = False,
    verify: bool = False,
    calibrate=None,
    calib_tokens: int = calibration_mod.DEFAULT_CALIB_TOKENS,
    calib_seq_len: int = calibration_mod.DEFAULT_CALIB_SEQ_LEN,
    calib_experts: Optional[calibration_mod.ExpertCalibration] = None,
    bits_budget: Optional[float] = None,
) -> Summary:
    """Converts a MiniMax checkpoint to a packed fused_moe checkpoint (or,
    with ``to="stock"``, to a plain mlx-lm one).

    ``src`` is an mlx-lm quantized checkpoint (repacked losslessly; no recipe),
    a packed checkpoint, or a Hugging Face ``minimax_m2`` checkpoint in FP8 or
    bf16 (quantized under ``recipe``, or uniformly at ``bits``/``group_size``
    in ``mode``: "affine" or one of MLX's fp modes, "mxfp4", "mxfp8",
    "nvfp4", like mlx-lm's ``--q-mode``). mlx-lm quantized and packed
    sources may be of any MoE family mlx-lm runs.
    The output is written to a temporary directory beside ``dst`` and renamed
    into place only once it is complete (and verified, with ``verify``).

    ``calibrate`` (a .txt or .jsonl file, or a folder of them; Hugging Face
    sources only) quantizes each layer with statistics of its inputs on that
    text, layer by layer (``fused_moe.quant``): at most ``calib_tokens``
    tokens in sequences of ``calib_seq_len``, 10% of them held out for the
    per-layer error report. Same bits per weight as without.
    ``calib_experts`` (a ``fused_moe.quant.calibrate.ExpertCalibration``)
    overrides how the experts are calibrated.
    ``bits_budget`` (with ``calibrate``; the seed-3.7bit recipe) chooses the
    experts' widths per layer, gate/up and down, among 2, 3, 4, 5, 6 and 8
    bits by their error on the calibration text, so that the output's bits
    per weight is at most ``bits_budget`` and as close as the widths allow.
    Raises :class:`ConversionError` for bad input.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    prepare_destination(src, dst, overwrite)
    checkpoint = open_checkpoint(src)
    source = for_checkpoint(checkpoint)
    _check_options(recipe, bits, group_size, mode, to)
    budget_bpw, recipe = _bits_budget(bits_budget, recipe, bits, mode, calibrate, source)
    recipe_obj, units = source.target(recipe, bits, group_size, mode)
    budget = None if budget_bpw is None else budget_mod.Budget(checkpoint.model, recipe_obj, to, budget_bpw)
    _check_target(units, to)
    data = None
    if calib_experts is not None and calibrate is None:
        raise ConversionError("calib_experts (--calib-expert-*) applies only with calibrate (--calibrate)")
    if calibrate is not None:
        source.require_original_weights("calibrate")
        if recipe_obj.default.mode != "affine":
            raise ConversionError(f"--calibrate quantizes to the affine mode, not {recipe_obj.default.mode}")
        data = calibration_mod.prepare(checkpoint, Path(calibrate), calib_tokens, calib_seq_len, verify)
    budget_report = None
    if budget is not None:
        # The widths decide the tensors' shapes, which the writer needs up front.
        budget_report = budget_mod.choose_widths(
            budget, calibration_mod.CalibratedLayers(source, recipe_obj, data, Path(calibrate), calib_experts), units,
            data.calibration)
        recipe_obj = recipe_obj.with_expert_bits(budget_report.expert_bits)
        units = from_recipe(checkpoint.model, recipe_obj)
        _check_target(units, to)
    tensors = [t for stored in units for t in unit_tensors(stored, to, checkpoint.model.packed_path)]
    bpw = bits_per_weight(tensors)
    target = f"{to}" + (f", format version {spec.FORMAT_VERSION}" if to == "packed" else "")
    how = f"recipe {recipe_obj.name}" if recipe_obj and recipe_obj.name else (
        recipe_obj.description if recipe_obj else "lossless repack")
    print(f"fused-moe convert: {src} ({checkpoint.describe()}) -> {dst} ({target}; {how})", flush=True)

    work = Workspace(dst)
    try:
        writer = CheckpointWriter(work.out, [(t.name, t.dtype, t.shape) for t in tensors], MAX_FILE_BYTES,
                                  {"format": "mlx"})
        try:
            writing = _Writing(source, recipe_obj, to, writer)
            calibrated = None if data is None else calibration_mod.CalibratedLayers(
                source, recipe_obj, data, Path(calibrate), calib_experts)
            labels = [label for label, _ in checkpoint.model.units()]
            bar = tqdm(list(zip(labels, units)), desc="calibrating" if calibrated else "converting", unit="unit",
                       file=sys.stderr)
            for label, stored in bar:
                bar.set_postfix_str(label)
                if calibrated is None:
                    writing.unit(stored)
                else:
                    writing.calibrated_unit(calibrated, stored)
            bar.close()
            writer.finish()
        finally:
            writer.close()
        with open(work.out / "config.json", "w") as f:
            json.dump(source.output_config(recipe_obj, units, to), f, indent=4)
        _copy_files(src, work.out)
        verified = _verify(source, recipe_obj, units, work.out) if verify else 0
        work.commit()
    finally:
        work.close()
    summary = Summary(
        dst, checkpoint.kind, to, recipe_obj.name if recipe_obj else None, len(tensors), writer.total_bytes,
        len(writer.files), bpw, time.perf_counter() - start, checkpoint.dropped, verified,
        calibrated.summary() if calibrated else None, budget_report,
    )
    for line in summary.lines():
        print(line, flush=True)
    return summary
