"""The checkpoint converter: fused_moe.convert and `fused-moe convert`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

import fused_moe as fm
from fused_moe.packed import spec
from fused_moe.cli import main as cli_main
from fused_moe.conversion import ConversionError, bits_per_weight_of, pipeline, recipes, sources
from support.hf_checkpoints import SMALL_HF, write_hf_checkpoint
from support.minimax_models import SMALL, build_model, make_checkpoint, save_checkpoint, seed_recipe

SEED = "seed-3.7bit"


# ---------------------------------------------------------------- helpers


def load_tensors(path: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(Path(path).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def bits(a: mx.array) -> np.ndarray:
    """The raw bytes of an array, for bit-for-bit comparisons."""
    return np.array(a.view(mx.uint8) if a.dtype != mx.uint8 else a)


def assert_same(a: mx.array, b: mx.array, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(bits(a), bits(b)), name


AFFINE = {spec.GATE_UP: spec.ProjectionSpec("affine", 3, 64), spec.DOWN: spec.ProjectionSpec("affine", 3, 64)}


def packed_names(block: str) -> list[str]:
    """The packed tensors of a MiniMax block's affine experts."""
    return spec.tensor_names(f"{block}.{spec.MODULE_NAME}", AFFINE)


def unpacked_experts(tensors: dict, block: str):
    arrays = [tensors[n] for n in packed_names(block)]
    gu_bits = 32 * arrays[0].shape[-1] // (arrays[3].shape[1])
    gu_gs = arrays[3].shape[1] // arrays[1].shape[-1]
    d_bits = 32 * arrays[3].shape[-1] // (arrays[0].shape[1] // 2)
    d_gs = (arrays[0].shape[1] // 2) // arrays[4].shape[-1]
    packed = fm.PackedExperts(
        fm.QuantizedProjection(*arrays[:3], gu_bits, gu_gs), fm.QuantizedProjection(*arrays[3:], d_bits, d_gs)
    )
    return fm.unpack_experts(packed)


def mlx_lm_reference(src: Path, num_layers: int) -> dict[str, mx.array]:
    """What mlx-lm makes of a Hugging Face source under the seed recipe: its
    own sanitize (FP8 dequantization), the bf16 cast of mlx_lm.convert, then
    its own quantize_model with the seed predicate."""
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(src, lazy=True, strict=False)
    model.update(tree_map_with_path(
        lambda p, a: a.astype(mx.bfloat16) if model.cast_predicate(p) else a, model.parameters()))
    config["quantization"] = {"group_size": 64, "bits": 8, "mode": "affine"}
    model, _ = quantize_model(model, config, 64, 8, quant_predicate=seed_recipe(num_layers))
    return dict(tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def hf_fp8(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "fp8", fp8=True)


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "bf16", fp8=False)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A stock mlx-lm checkpoint quantized by mlx-lm, 4-bit experts in layers
    0 and 2 and 3-bit in layer 1."""
    return make_checkpoint(tmp_path_factory.mktemp("mlx") / "stock", SMALL)


def run_cli(args, capsys):
    code = cli_main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- recipes


def test_reap_bits_per_weight_under_the_seed_recipe():
    reap = dict(
        model_type="minimax_m2", hidden_size=3072, intermediate_size=1536, num_local_experts=154,
        num_experts_per_tok=8, num_hidden_layers=62, vocab_size=200064, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, shared_intermediate_size=0,
    )
    assert round(bits_per_weight_of(reap, SEED), 3) == 3.676


def test_seed_recipe_table():
    r = recipes.RECIPES[SEED]
    assert r.quant("experts", 0, 62) == (4, 64, "affine") and r.quant("experts", 61, 62) == (4, 64, "affine")
    assert all(r.quant("experts", i, 62) == (3, 64, "affine") for i in range(1, 61))
    for role in ("embed", "lm_head", "attention"):
        assert r.quant(role, 5, 62) == (8, 64, "affine")
    for role in ("router", "norm", "routing_bias"):
        assert r.quant(role, 5, 62) is None


# ---------------------------------------------------------------- Hugging Face sources


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_hf_source_matches_mlx_lm_bit_for_bit(fp8, hf_fp8, hf_bf16, tmp_path):
    src = hf_fp8 if fp8 else hf_bf16
    summary = fm.convert(src, tmp_path / "out", recipe=SEED, verify=True)
    got = load_tensors(tmp_path / "out")
    want = mlx_lm_reference(src, SMALL_HF["num_hidden_layers"])
    expert_names = {k for k in want if ".switch_mlp." in k}
    # Every stock name but the experts, which became the packed tensors.
    packed = {n for i in range(3) for n in packed_names(f"model.layers.{i}.block_sparse_moe")}
    assert set(got) == (set(want) - expert_names) | packed
    for name in set(want) - expert_names:
        assert_same(got[name], want[name], name)
    for i in range(3):
        block = f"model.layers.{i}.block_sparse_moe"
        for proj, p in zip(("gate_proj", "up_proj", "down_proj"), unpacked_experts(got, block)):
            assert p.bits == (4 if i in (0, 2) else 3)
            for a in spec.ARRAYS:
                assert_same(getattr(p, a), want[f"{block}.switch_mlp.{proj}.{a}"], f"{block} {proj}.{a}")
    assert got["model.layers.0.block_sparse_moe.e_score_correction_bias"].dtype == mx.float32
    assert got["model.layers.0.block_sparse_moe.gate.weight"].dtype == mx.bfloat16
    assert summary.verified_experts > 0
    # The multi-token-prediction module is dropped, and listed.
    assert summary.dropped and all(n.startswith("model.layers.3.") for n in summary.dropped)
    assert ("model.layers.3.eh_proj.weight_scale_inv" in summary.dropped) == fp8


def test_hf_output_config(hf_fp8, tmp_path):
    fm.convert(hf_fp8, tmp_path / "out", recipe=SEED)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "minimax_m2"
    assert config["quantization_config"] == config["quantization"]
    q = config["quantization"]
    assert q["model.layers.1.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["model.layers.1.block_sparse_moe.gate"] is False
    assert not any(".switch_mlp." in k for k in q)
    fused = config[spec.CONFIG_KEY]
    assert fused[spec.CONFIG_FORMAT_VERSION] == spec.FORMAT_VERSION
    assert fused[spec.CONFIG_RECIPE] == SEED
    assert fused[spec.CONFIG_EXPERTS]["model.layers.1.block_sparse_moe.fused_experts"] == {
        "gate_up": {"mode": "affine", "bits": 3, "group_size": 64},
        "down": {"mode": "affine", "bits": 3, "group_size": 64}}
    assert fused[spec.CONFIG_EXPERTS]["model.layers.2.block_sparse_moe.fused_experts"]["down"]["bits"] == 4
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (hf_fp8 / f).read_bytes()


def test_hf_bits_and_stock_output_loads_in_mlx_lm(hf_bf16, tmp_path, capsys):
    from mlx_lm import load

    summary = fm.convert(hf_bf16, tmp_path / "stock", bits=4, group_size=32, to="stock")
    model, _ = load(str(tmp_path / "stock"))
    sw = model.model.layers[1].block_sparse_moe.switch_mlp
    assert (sw.gate_proj.bits, sw.gate_proj.group_size) == (4, 32)
    assert summary.recipe is None
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, SMALL_HF["vocab_size"]) and not mx.isnan(logits).any().item()
    out = capsys.readouterr().out
    assert f"bits per weight: {summary.bits_per_weight:.3f}" in out


def test_source_shard_names_come_from_the_index(tmp_path):
    src = write_hf_checkpoint(tmp_path / "src", fp8=True, mtp=False, shard_names=lambda i, n: f"part{n - i}.safetensors")
    summary = fm.convert(src, tmp_path / "out", recipe=SEED)
    assert summary.dropped == []


# ---------------------------------------------------------------- mlx-lm sources


def test_round_trip_stock_packed_stock_is_bit_identical(stock, tmp_path):
    fm.convert(stock, tmp_path / "packed", verify=True)
    fm.convert(tmp_path / "packed", tmp_path / "stock", to="stock", verify=True)
    a, b = load_tensors(stock), load_tensors(tmp_path / "stock")
    assert set(a) == set(b)
    for name in a:
        assert_same(b[name], a[name], name)
    packed = load_tensors(tmp_path / "packed")
    assert not any(".switch_mlp." in n for n in packed)
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    experts = config[spec.CONFIG_KEY][spec.CONFIG_EXPERTS]
    assert [experts[f"model.layers.{i}.block_sparse_moe.fused_experts"]["gate_up"]["bits"] for i in range(3)] == [4, 3, 4]
    assert config[spec.CONFIG_KEY][spec.CONFIG_RECIPE] is None
    # Packing the experts is lossless for the source too.
    src = load_tensors(stock)
    for proj, p in zip(("gate_proj", "up_proj", "down_proj"), unpacked_experts(packed, "model.layers.1.block_sparse_moe")):
        for arr in spec.ARRAYS:
            assert_same(getattr(p, arr), src[f"model.layers.1.block_sparse_moe.switch_mlp.{proj}.{arr}"], proj)


def test_stock_output_of_a_packed_checkpoint_loads_in_mlx_lm(stock, tmp_path):
    from mlx_lm import load

    fm.convert(stock, tmp_path / "packed")
    fm.convert(tmp_path / "packed", tmp_path / "stock", to="stock")
    model, _ = load(str(tmp_path / "stock"))
    ref, _ = load(str(stock))
    x = mx.array([[3, 1, 4, 1, 5]])
    assert mx.array_equal(model(x), ref(x)).item()


def test_output_is_sharded_with_an_index(stock, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_FILE_BYTES", 200_000)
    fm.convert(stock, tmp_path / "packed")
    out = tmp_path / "packed"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        tensors, metadata = mx.load(str(out / shard), return_metadata=True)
        assert metadata == {"format": "mlx"}
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        total += sum(a.nbytes for a in tensors.values())
    assert index["metadata"]["total_size"] == total
    # Resharded, the content is the same.
    fm.convert(out, tmp_path / "stock", to="stock")
    a, b = load_tensors(stock), load_tensors(tmp_path / "stock")
    for name in a:
        assert_same(b[name], a[name], name)


def test_recipe_is_refused_for_an_mlx_lm_source(stock, tmp_path):
    with pytest.raises(ConversionError, match="repacked losslessly, so --recipe does not apply"):
        fm.convert(stock, tmp_path / "out", recipe=SEED)


# ---------------------------------------------------------------- atomicity


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_failure_leaves_no_destination(hf_fp8, tmp_path, monkeypatch):
    calls = []

    def failing_unit(self, stored):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(self, stored)

    original = pipeline._Writing.unit
    monkeypatch.setattr(pipeline._Writing, "unit", failing_unit)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fm.convert(hf_fp8, tmp_path / "out", recipe=SEED)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interruption_leaves_no_destination(stock, tmp_path, monkeypatch, capsys):
    def interrupted(self, stored):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Writing, "unit", interrupted)
    code, out, err = run_cli([stock, tmp_path / "out"], capsys)
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_verify_leaves_no_destination(stock, tmp_path, monkeypatch):
    def corrupting_pack(*projections):
        packed = fm.pack_experts(*projections)
        w = packed.gate_up["weight"]
        packed.gate_up["weight"] = w ^ mx.array(1, dtype=mx.uint32)
        return packed

    monkeypatch.setattr(sources, "pack_experts", corrupting_pack)
    with pytest.raises(ConversionError, match=r"--verify: expert 0 of model.layers.0.block_sparse_moe.switch_mlp gate_proj.weight differs"):
        fm.convert(stock, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_destination_needs_overwrite(stock, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    code, out, err = run_cli([stock, dst], capsys)
    assert code != 0 and "already exists; pass --overwrite" in err
    assert (dst / "keep").read_text() == "mine"
    code, out, err = run_cli([stock, dst, "--overwrite"], capsys)
    assert code == 0, err
    assert not (dst / "keep").exists() and (dst / "config.json").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad input


def _truncate(src: Path) -> str:
    shard = src / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return "model-00002-of-00004.safetensors: truncated safetensors file"


def _corrupt_header(src: Path) -> str:
    shard = src / "model-00003-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"#!?x"
    shard.write_bytes(bytes(data))
    return "model-00003-of-00004.safetensors: corrupt safetensors header"


def _edit_config(**changes):
    def edit(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))
    return edit


def _unknown_model_type(src):
    _edit_config(model_type="llama")(src)
    return "unknown model_type 'llama'"


def _no_tokenizer(src):
    for f in src.glob("tokenizer*"):
        f.unlink()
    return "no tokenizer"


def _wrong_experts(src):
    # E in config.json no longer matches the gate.
    _edit_config(num_local_experts=5)(src)
    return (r"model-00002-of-00004.safetensors: tensor model.layers.0.block_sparse_moe.gate.weight "
            r"has shape \[6, 256\], expected \[5, 256\]")


def _rewrite_shard(src: Path, change) -> None:
    """Rewrites shard 2 (layer 0) after `change` edits its {name: Tensor}."""
    from support.hf_checkpoints import Tensor, write_safetensors

    shard = src / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, start = json.loads(data[8:8 + n]), 8 + n
    tensors = {
        k: Tensor(e["dtype"], e["shape"], data[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
        for k, e in header.items() if k != "__metadata__"
    }
    change(tensors)
    write_safetensors(shard, tensors)


def _bias_shape(src):
    from support.hf_checkpoints import Tensor

    name = "model.layers.0.block_sparse_moe.e_score_correction_bias"
    _rewrite_shard(src, lambda t: t.__setitem__(name, Tensor("F32", (7,), b"\0" * 28)))
    return rf"tensor {name} has shape \[7\], expected \[6\]"


def _missing_expert(src):
    name = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    scale = name.replace(".weight", ".weight_scale_inv")

    def drop(t):
        del t[name], t[scale]
    _rewrite_shard(src, drop)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][name], index["weight_map"][scale]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"missing tensor {name}"


def _index_lists_absent_tensor(src):
    name = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    _rewrite_shard(src, lambda t: t.pop(name))
    return f"model.safetensors.index.json: lists tensor {name} in model-00002-of-00004.safetensors, which does not hold it"


def _index_disagrees(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00004-of-00004.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return ("model-00001-of-00004.safetensors: holds tensor model.norm.weight, which the index "
            "places in model-00004-of-00004.safetensors")


BAD_SOURCES = {
    "truncated-shard": _truncate,
    "corrupt-header": _corrupt_header,
    "unknown-model-type": _unknown_model_type,
    "missing-tokenizer": _no_tokenizer,
    "gate-shape": _wrong_experts,
    "bias-shape": _bias_shape,
    "missing-expert": _missing_expert,
    "index-lists-absent-tensor": _index_lists_absent_tensor,
    "index-disagrees": _index_disagrees,
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_is_one_line_without_traceback(case, hf_fp8, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_fp8, src)
    expected = BAD_SOURCES[case](src)
    code, out, err = run_cli([src, tmp_path / "out", "--recipe", SEED], capsys)
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fused-moe convert: error: "), err
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # --debug shows where it came from.
    code, out, err = run_cli([src, tmp_path / "out", "--recipe", SEED, "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "CheckpointError" in err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--mode", "mxfp4", "--group-size", "64"], "--group-size 64 does not fit --mode mxfp4, which is 4-bit with group size 32"),
        (["--mode", "mxfp4", "--recipe", "seed-3.7bit"], "give either --recipe or --bits/--mode, not both"),
        (["--bits", "7"], "--bits 7 is not supported; supported bits: (2, 3, 4, 5, 6, 8)"),
        (["--bits", "3", "--group-size", "48"], "--group-size 48 is not supported"),
        ([], "choose --recipe"),
        (["--group-size", "64"], "--group-size needs --bits"),
    ],
)
def test_bad_options(args, expected, hf_bf16, tmp_path, capsys):
    code, out, err = run_cli([hf_bf16, tmp_path / "out", *args], capsys)
    assert code == 1 and "Traceback" not in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_config_that_disagrees_with_an_mlx_lm_source(stock, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(stock, src)
    c = json.loads((src / "config.json").read_text())
    sw = "model.layers.0.block_sparse_moe.switch_mlp.down_proj"
    c["quantization"][sw] = {"group_size": 64, "bits": 8, "mode": "affine"}
    (src / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConversionError, match=rf"{sw}.weight has shape \[8, 128, 16\], expected \[8, 128, 32\] for 8-bit"):
        fm.convert(src, tmp_path / "out")


def test_mixed_expert_widths_of_an_mlx_lm_source(tmp_path):
    # gate/up at 4 bits, down at 6 (a mixed recipe): packed with each
    # projection's own width, verified, and back to stock bit for bit.
    model, config = build_model(dict(SMALL, num_hidden_layers=1))
    src = save_checkpoint(model, config, tmp_path / "src")
    c = json.loads((src / "config.json").read_text())
    sw = "model.layers.0.block_sparse_moe.switch_mlp.down_proj"
    down = model.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    w = mx.dequantize(down.weight, down.scales, down.biases, 64, 4)
    q, scales, biases = mx.quantize(w, 64, 6)
    tensors = load_tensors(src)
    tensors.update({f"{sw}.weight": q, f"{sw}.scales": scales, f"{sw}.biases": biases})
    for f in src.glob("model*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    mx.save_safetensors(str(src / "model.safetensors"), tensors, metadata={"format": "mlx"})
    c["quantization"][sw] = {"group_size": 64, "bits": 6, "mode": "affine"}
    (src / "config.json").write_text(json.dumps(c))
    fm.convert(src, tmp_path / "packed", verify=True)
    experts = json.loads((tmp_path / "packed" / "config.json").read_text())[spec.CONFIG_KEY][spec.CONFIG_EXPERTS]
    entry = experts["model.layers.0.block_sparse_moe.fused_experts"]
    assert (entry["gate_up"]["bits"], entry["down"]["bits"]) == (4, 6)
    fm.convert(tmp_path / "packed", tmp_path / "stock", to="stock", verify=True)
    back = load_tensors(tmp_path / "stock")
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        assert_same(back[name], a, name)


# ---------------------------------------------------------------- command line


def test_python_dash_m_and_entry_point(hf_bf16, tmp_path):
    for i, cmd in enumerate([[sys.executable, "-m", "fused_moe"], [str(Path(sys.executable).parent / "fused-moe")]]):
        dst = tmp_path / f"out{i}"
        r = subprocess.run([*cmd, "convert", str(hf_bf16), str(dst), "--recipe", SEED, "--verify"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "bits per weight:" in r.stdout and "verified: " in r.stdout and "dropped 3 source tensors" in r.stdout
        assert "converting" in r.stderr  # the progress bar


# ---------------------------------------------------------------- memory


# Runs `python -m MODULE ARGS...` and prints its own peak RSS at exit. The
# high-water mark of this process's memory map (VmHWM) counts only what it
# touched after exec; rusage's ru_maxrss would also count the RSS of the
# process it was spawned from (Linux folds the old map's peak in at exec).
_PEAK_OF_MODULE = """
import atexit, runpy, sys

def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak_kb", line.split()[1], flush=True)

atexit.register(report)
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _peak_rss_mb(module: str, *args) -> tuple[float, str]:
    """Peak RSS of `python -m module args...` in a child process."""
    r = subprocess.run([sys.executable, "-c", _PEAK_OF_MODULE, module, *map(str, args)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    return int(r.stdout.rsplit("peak_kb", 1)[1]) / 1024, r.stdout


def test_peak_memory_is_at_most_half_of_mlx_lm_convert(tmp_path):
    config = dict(
        SMALL_HF, hidden_size=1024, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, rotary_dim=64, num_local_experts=64, num_hidden_layers=10,
    )
    # No MTP module: mlx-lm would refuse the extra tensors.
    src = write_hf_checkpoint(tmp_path / "src", config, fp8=True, mtp=False)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size >= 1e9
    ours, out = _peak_rss_mb("fused_moe", "convert", src, tmp_path / "ours", "--recipe", SEED)
    theirs, _ = _peak_rss_mb("mlx_lm", "convert", "--hf-path", src, "--mlx-path", tmp_path / "mlx", "-q",
                             "--q-bits", "3", "--q-group-size", "64")
    print(f"\nsource {size / 1e9:.2f} GB FP8, 10 layers: peak RSS fused-moe convert {ours:.0f} MB, "
          f"mlx_lm.convert {theirs:.0f} MB")
    assert ours <= theirs / 2
