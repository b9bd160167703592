"""The conversion: check everything, stream unit by unit into a temporary
directory beside the destination, optionally verify, then rename into place."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from fused_moe import format as fmt
from fused_moe.convert import calibration as calibration_mod
from fused_moe.convert import recipes as recipes_mod
from fused_moe.convert.errors import ConversionError
from fused_moe.convert.layout import (
    Stored,
    bits_per_weight,
    fused_config,
    from_recipe,
    plan_unit,
    quantization_config,
)
from fused_moe.convert.model import EMBED, EXPERT_PROJECTIONS, EXPERTS, MiniMax, block_path
from fused_moe.convert.recipes import Recipe
from fused_moe.convert.safetensors_io import ShardedWriter, read_tensor
from fused_moe.convert.sources import COPIED_FILES, HF, MLX, PACKED, Source, open_source
from fused_moe.packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, PackedExperts, QuantizedProjection, pack_experts, unpack_experts

# mlx-lm's shard limit; a tensor larger than this gets a shard of its own.
MAX_SHARD_BYTES = 5 << 30
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
    shards: int
    bits_per_weight: float
    seconds: float
    dropped: list
    verified_experts: int
    calibration: Optional[calibration_mod.CalibrationSummary] = None

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.shards} "
            f"shard{'s' if self.shards != 1 else ''} to {self.dst}",
            f"bits per weight: {self.bits_per_weight:.3f}",
            f"time: {self.seconds:.1f} s",
        ]
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
    model = MiniMax.from_config(config)
    return bits_per_weight([t for unit in from_recipe(model, recipe) for t in plan_unit(unit, "packed")])


def _target(source: Source, recipe: Optional[str], bits: Optional[int], group_size: Optional[int], to: str):
    """The recipe (None for a lossless repack) and how each module is stored."""
    if to not in TARGETS:
        raise ConversionError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if group_size is not None and bits is None:
        raise ConversionError("--group-size needs --bits")
    if recipe is not None and bits is not None:
        raise ConversionError("give either --recipe or --bits, not both")
    if source.kind != HF:
        if recipe is not None or bits is not None:
            flag = "--recipe" if recipe is not None else "--bits"
            raise ConversionError(
                f"{source.path} is an mlx-lm quantized checkpoint: its experts are repacked "
                f"losslessly, so {flag} does not apply"
            )
        return None, source.stored
    if recipe is None and bits is None:
        raise ConversionError(
            f"{source.path} is a Hugging Face checkpoint: choose --recipe "
            f"({', '.join(recipes_mod.RECIPES)}) or --bits"
        )
    r = recipes_mod.get(recipe) if recipe is not None else recipes_mod.uniform(bits, group_size or 64)
    return r, from_recipe(source.model, r)


def _check_target(units: list[list[Stored]], to: str) -> None:
    for stored in units:
        for s in stored:
            m = s.module
            if s.quant is None:
                continue
            if m.shape[-1] % s.quant.group_size or (m.shape[-1] * s.quant.bits) % 32:
                raise ConversionError(
                    f"{m.path}: {m.shape[-1]} inputs are not a whole number of groups of "
                    f"{s.quant.group_size} at {s.quant.bits} bits"
                )
            if m.role == EXPERTS and to == "packed":
                if s.quant.bits not in SUPPORTED_BITS or s.quant.group_size not in SUPPORTED_GROUP_SIZES:
                    raise ConversionError(
                        f"{m.path}: {s.quant.bits}-bit experts with group size {s.quant.group_size} "
                        f"are not supported by the fused kernels; supported bits "
                        f"{SUPPORTED_BITS}, group sizes {SUPPORTED_GROUP_SIZES} (or use --to stock)"
                    )
        experts = {s.module.path.rsplit(".", 1)[1]: s.quant for s in stored if s.module.role == EXPERTS}
        if experts and experts["gate_proj"] != experts["up_proj"] and to == "packed":
            raise ConversionError(
                f"{block_path(stored[0].module.layer)}: gate_proj {experts['gate_proj']} and up_proj "
                f"{experts['up_proj']} must share bits and group size to be packed"
            )


def _prepare_dst(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConversionError(f"{dst}: the destination must not be the source or lie inside it")
    if not dst.parent.is_dir():
        raise ConversionError(f"{dst.parent}: no such directory")
    _recover(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")


# A conversion works in a directory beside DST, ".<DST name>.partial-XXXX",
# holding LOCK (flocked while the run lives), OUT (the output being written,
# renamed to DST when complete) and, with --overwrite, OLD (the previous DST,
# moved aside for the moment between the two renames).
_WORK_PREFIX, _LOCK, _OUT, _OLD = ".{}.partial-", "lock", "out", "old"

# Test-only: FUSED_MOE_CONVERT_PAUSE_AT=<point> makes a conversion print
# "fused-moe convert: paused at <point>" and wait there, so that a test can
# kill it at that exact moment. Points: "unit-N" (before unit N is written),
# "swap" (the old DST moved aside, the new one not yet in place), "renamed"
# (the new DST in place, the work directory not yet removed).
PAUSE_ENV = "FUSED_MOE_CONVERT_PAUSE_AT"


def _pause(point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        print(f"fused-moe convert: paused at {point}", flush=True)
        time.sleep(3600)


def _work_dirs(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(glob.escape(_WORK_PREFIX.format(dst.name)) + "*"))


def _abandoned(work: Path) -> bool:
    """Whether the run that made `work` is gone: its lock is free (a lock
    dies with its process), or it was killed before it took the lock."""
    try:
        fd = os.open(work / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _recover(dst: Path) -> None:
    """Cleans up after conversions into `dst` that were killed: restores a
    DST an --overwrite run had moved aside, and removes the work directory."""
    for work in _work_dirs(dst):
        if not _abandoned(work):
            continue
        old = work / _OLD
        if old.is_dir() and not dst.exists():
            os.replace(old, dst)
            print(f"fused-moe convert: restored {dst}, which an interrupted --overwrite run had moved to {old}", flush=True)
        shutil.rmtree(work)
        print(f"fused-moe convert: removed {work}, left by an interrupted conversion", flush=True)


class _Workspace:
    """The work directory of one run, locked for as long as the run lives."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.dir = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX.format(dst.name), dir=dst.parent))
        self._lock = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.out = self.dir / _OUT
        self.out.mkdir()

    def commit(self) -> None:
        """Puts the finished output at DST, replacing an existing DST."""
        if self.dst.exists():
            os.replace(self.dst, self.dir / _OLD)
            _pause("swap")
        os.replace(self.out, self.dst)
        _pause("renamed")

    def close(self) -> None:
        """Removes the work directory; after a failure between the two renames
        of `commit`, first puts the old DST back."""
        old = self.dir / _OLD
        if old.is_dir() and not self.dst.exists():
            os.replace(old, self.dst)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock)


class _Converter:
    def __init__(self, source: Source, recipe: Optional[Recipe], units, to: str, writer: ShardedWriter):
        self.source, self.recipe, self.units, self.to, self.writer = source, recipe, units, to, writer
        # Quantized (weight, scales, biases) by module path that replace round
        # to nearest (--calibrate); stacked [E, ...] for experts.
        self.override: dict[str, tuple] = {}

    def unit(self, stored: list[Stored]) -> None:
        experts = {s.module.path.rsplit(".", 1)[1]: s for s in stored if s.module.role == EXPERTS}
        for s in stored:
            if s.module.role != EXPERTS:
                self.module(s)
        if experts:
            self.experts(stored[0].module.layer, experts)

    def module(self, s: Stored):
        """Writes one module; returns (for a Hugging Face source) its float
        weight, or its (weight, scales, biases) as written."""
        m, src, w = s.module, self.source, self.writer
        if src.kind != HF:
            for name in ([m.tensor] if s.quant is None else [f"{m.path}.{a}" for a in fmt.ARRAYS]):
                w.copy(name, src.tensors[name])
            return None
        if m.path in self.override:
            q, scales, biases = self.override[m.path]
        else:
            weight = src.read_float(m.tensor)
            dtype = mx.float32 if s.dtype == "F32" else self.recipe.dtype
            weight = weight.astype(dtype)
            if s.quant is None:
                w.write(m.tensor, weight)
                return weight
            q, scales, biases = mx.quantize(weight, group_size=s.quant.group_size, bits=s.quant.bits)
        w.write(f"{m.path}.weight", q)
        w.write(f"{m.path}.scales", scales)
        w.write(f"{m.path}.biases", biases)
        return q, scales, biases

    def experts(self, layer: int, experts: dict[str, Stored]) -> None:
        src, w = self.source, self.writer
        same_layout = (src.kind, self.to) in ((MLX, "stock"), (PACKED, "packed"))
        if same_layout:
            if src.kind == MLX:
                names = [f"{s.module.path}.{a}" for s in experts.values() for a in fmt.ARRAYS]
            else:
                names = fmt.tensor_names(block_path(layer))
            for name in names:
                w.copy(name, src.tensors[name])
            return
        # One expert at a time: each is written into its slice of the stacked tensors.
        for e in range(src.model.experts):
            if experts["gate_proj"].module.path in self.override:
                gate, up, down = (
                    QuantizedProjection(*(a[e:e + 1] for a in self.override[experts[p].module.path]),
                                        experts[p].quant.bits, experts[p].quant.group_size)
                    for p in EXPERT_PROJECTIONS)
            else:
                gate, up, down = expert_from_source(src, self.recipe, layer, experts, e)
            if self.to == "packed":
                packed = pack_experts(gate, up, down)
                arrays = [a for proj in fmt.PROJECTIONS for a in packed.projection(proj)[:3]]
                names = fmt.tensor_names(block_path(layer))
            else:
                arrays = [a for p in (gate, up, down) for a in p[:3]]
                names = [f"{experts[p].module.path}.{a}" for p in EXPERT_PROJECTIONS for a in fmt.ARRAYS]
            for name, a in zip(names, arrays):
                w.write(name, a[0], index=e)


def _calibrated_unit(converter: _Converter, calibrated, stored: list[Stored]) -> None:
    """One unit of a --calibrate conversion: the embedding starts the hidden
    states, a layer is calibrated before it is written, the head last."""
    roles = {s.module.role for s in stored}
    if EMBED in roles:
        written = converter.module(stored[0])
        s = stored[0]
        table = written if s.quant is None else mx.dequantize(
            *written, group_size=s.quant.group_size, bits=s.quant.bits)
        calibrated.embedding(table)
        return
    converter.override = calibrated.layer(stored) if EXPERTS in roles else calibrated.head(stored)
    try:
        converter.unit(stored)
    finally:
        converter.override = {}


def expert_from_source(source: Source, recipe: Optional[Recipe], layer: int, experts: dict[str, Stored], e: int):
    """Expert e of a layer as (gate, up, down) QuantizedProjections of shape
    [1, out, ...]: quantized from a Hugging Face source under `recipe` (one
    expert at a time: groups lie within a row, so this equals quantizing the
    stacked [E, out, in] tensor), or read from an mlx-lm or packed source."""
    if source.kind == HF:
        out = []
        for proj in EXPERT_PROJECTIONS:
            s = experts[proj]
            weight = source.read_float(source.hf_expert_name(layer, proj, e)).astype(recipe.dtype)
            q, scales, biases = mx.quantize(weight[None], group_size=s.quant.group_size, bits=s.quant.bits)
            out.append(QuantizedProjection(q, scales, biases, s.quant.bits, s.quant.group_size))
        return tuple(out)
    if source.kind == MLX:
        return tuple(
            QuantizedProjection(
                *(read_tensor(source.tensors[f"{experts[p].module.path}.{a}"], e)[None] for a in fmt.ARRAYS),
                experts[p].quant.bits,
                experts[p].quant.group_size,
            )
            for p in EXPERT_PROJECTIONS
        )
    names = iter(fmt.tensor_names(block_path(layer)))
    arrays = {proj: [read_tensor(source.tensors[next(names)], e)[None] for _ in fmt.ARRAYS] for proj in fmt.PROJECTIONS}
    gu, d = experts["gate_proj"].quant, experts["down_proj"].quant
    packed = PackedExperts(
        QuantizedProjection(*arrays["gate_up"], gu.bits, gu.group_size),
        QuantizedProjection(*arrays["down"], d.bits, d.group_size),
    )
    return unpack_experts(packed)


def _verify(source: Source, recipe: Optional[Recipe], units, to: str, tmp: Path) -> int:
    """Re-derives a sample of experts from the source and compares them, bit
    for bit, with what was written (read back from disk, unpacked)."""
    written = open_source(tmp)
    rng = random.Random(0)
    count = 0
    E = source.model.experts
    for stored, out_stored in zip(units, written.stored):
        experts = {s.module.path.rsplit(".", 1)[1]: s for s in stored if s.module.role == EXPERTS}
        if not experts:
            continue
        out_experts = {s.module.path.rsplit(".", 1)[1]: s for s in out_stored if s.module.role == EXPERTS}
        layer = stored[0].module.layer
        sample = sorted({0, E - 1, *rng.sample(range(E), min(E, VERIFY_EXPERTS) - min(E, 2))})
        for e in sample:
            want = expert_from_source(source, recipe, layer, experts, e)
            got = expert_from_source(written, None, layer, out_experts, e)
            for proj, a, b in zip(EXPERT_PROJECTIONS, want, got):
                for name, x, y in zip(fmt.ARRAYS, a[:3], b[:3]):
                    if x.dtype != y.dtype or x.shape != y.shape or not mx.array_equal(x, y).item():
                        raise ConversionError(
                            f"--verify: expert {e} of {block_path(layer)} {proj}.{name} differs from the source"
                        )
                if a[3:] != b[3:]:
                    raise ConversionError(f"--verify: expert {e} of {block_path(layer)} {proj}: bits/group size differ")
            count += 1
    return count


def _output_config(source: Source, recipe: Optional[Recipe], units, to: str) -> dict:
    config = json.loads(json.dumps(source.config))
    config.pop("_name_or_path", None)
    if source.kind == HF:
        config.pop("quantization_config", None)  # the source's FP8 settings
        base, default = None, recipe.default
    else:
        base, default = config["quantization"], None
    recipe_name = recipe.name if recipe else (config.get(fmt.CONFIG_KEY) or {}).get(fmt.CONFIG_RECIPE)
    config.pop(fmt.CONFIG_KEY, None)
    config["quantization"] = quantization_config(units, default, to, base)
    # mlx-lm writes both keys (mlx_lm.utils.save_config).
    config["quantization_config"] = config["quantization"]
    if to == "packed":
        config[fmt.CONFIG_KEY] = fused_config(units, recipe_name)
    return dict(sorted(config.items()))


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
    to: str = "packed",
    overwrite: bool = False,
    verify: bool = False,
    calibrate=None,
    calib_tokens: int = calibration_mod.DEFAULT_CALIB_TOKENS,
    calib_seq_len: int = calibration_mod.DEFAULT_CALIB_SEQ_LEN,
    calib_experts: Optional[calibration_mod.ExpertCalibration] = None,
) -> Summary:
    """Converts a MiniMax checkpoint to a packed fused_moe checkpoint (or,
    with ``to="stock"``, to a plain mlx-lm one).

    ``src`` is an mlx-lm quantized checkpoint (repacked losslessly; no recipe),
    a packed checkpoint, or a Hugging Face ``minimax_m2`` checkpoint in FP8 or
    bf16 (quantized under ``recipe`` or uniformly at ``bits``/``group_size``).
    The output is written to a temporary directory beside ``dst`` and renamed
    into place only once it is complete (and verified, with ``verify``).

    ``calibrate`` (a .txt or .jsonl file, or a folder of them; Hugging Face
    sources only) quantizes each layer with statistics of its inputs on that
    text, layer by layer (``fused_moe.quant``): at most ``calib_tokens``
    tokens in sequences of ``calib_seq_len``, 10% of them held out for the
    per-layer error report. Same bits per weight as without.
    ``calib_experts`` (a ``fused_moe.quant.calibrate.ExpertCalibration``)
    overrides how the experts are calibrated.
    Raises :class:`ConversionError` for bad input.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _prepare_dst(src, dst, overwrite)
    source = open_source(src)
    recipe_obj, units = _target(source, recipe, bits, group_size, to)
    _check_target(units, to)
    data = None
    if calib_experts is not None and calibrate is None:
        raise ConversionError("calib_experts (--calib-expert-*) applies only with calibrate (--calibrate)")
    if calibrate is not None:
        data = calibration_mod.prepare(source, Path(calibrate), calib_tokens, calib_seq_len, verify)
    plans = [plan_unit(stored, to) for stored in units]
    tensors = [t for plan in plans for t in plan]
    bpw = bits_per_weight(tensors)
    target = f"{to}" + (f", format version {fmt.FORMAT_VERSION}" if to == "packed" else "")
    how = f"recipe {recipe_obj.name}" if recipe_obj and recipe_obj.name else (
        recipe_obj.description if recipe_obj else "lossless repack")
    print(f"fused-moe convert: {src} ({source.describe()}) -> {dst} ({target}; {how})", flush=True)

    work = _Workspace(dst)
    tmp = work.out
    try:
        writer = ShardedWriter(tmp, [(t.name, t.dtype, t.shape) for t in tensors], MAX_SHARD_BYTES, {"format": "mlx"})
        try:
            converter = _Converter(source, recipe_obj, units, to, writer)
            calibrated = None if data is None else calibration_mod.CalibratedLayers(
                source, recipe_obj, data, Path(calibrate), calib_experts)
            labels = [label for label, _ in source.model.units()]
            bar = tqdm(list(zip(labels, units)), desc="calibrating" if calibrated else "converting", unit="unit",
                       file=sys.stderr)
            for i, (label, stored) in enumerate(bar):
                bar.set_postfix_str(label)
                _pause(f"unit-{i}")
                if calibrated is None:
                    converter.unit(stored)
                else:
                    _calibrated_unit(converter, calibrated, stored)
            bar.close()
            writer.finish()
        finally:
            writer.close()
        with open(tmp / "config.json", "w") as f:
            json.dump(_output_config(source, recipe_obj, units, to), f, indent=4)
        _copy_files(src, tmp)
        verified = _verify(source, recipe_obj, units, to, tmp) if verify else 0
        work.commit()
    finally:
        work.close()
    summary = Summary(
        dst, source.kind, to, recipe_obj.name if recipe_obj else None, len(tensors), writer.total_bytes,
        len(writer.files), bpw, time.perf_counter() - start, source.dropped, verified,
        calibrated.summary() if calibrated else None,
    )
    for line in summary.lines():
        print(line, flush=True)
    return summary
