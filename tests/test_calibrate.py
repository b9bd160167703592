"""fused-moe convert --calibrate: calibrated quantization, layer by layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe.conversion import ConversionError
from support.hf_checkpoints import SMALL_HF, write_hf_checkpoint
from support.minimax_models import SMALL, make_checkpoint
from test_convert import _peak_rss_mb, leftovers, load_tensors, run_cli

SEED = "seed-3.7bit"
# Small enough for the test budget; the summary still reports every layer.
TOKENS, SEQ_LEN = 1024, 64
WORDS = ("the expert router sends every token to a few experts while attention reads the context and "
         "quantization keeps three bits per weight for most matrices of the model").split()


def english_like(path: Path, words: int = 3000, seed: int = 0) -> Path:
    """Word salad from a fixed vocabulary (the tests must not need python3-doc)."""
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(WORDS, size=words)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "bf16", fp8=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return english_like(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def calibrated(hf_bf16, text, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "stock"
    summary = fm.convert(hf_bf16, dst, recipe=SEED, to="stock", calibrate=text, calib_tokens=TOKENS,
                         calib_seq_len=SEQ_LEN)
    return dst, summary


def test_calibrated_output_loads_with_the_recipes_bits(calibrated, hf_bf16, tmp_path):
    from mlx_lm import load

    dst, summary = calibrated
    plain = fm.convert(hf_bf16, tmp_path / "rtn", recipe=SEED, to="stock")
    assert summary.bits_per_weight == plain.bits_per_weight
    model, _ = load(str(dst))
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, SMALL_HF["vocab_size"]) and not mx.isnan(logits).any().item()
    got, rtn = load_tensors(dst), load_tensors(tmp_path / "rtn")
    assert set(got) == set(rtn)
    assert json.loads((dst / "config.json").read_text()) == json.loads((tmp_path / "rtn" / "config.json").read_text())
    changed = []
    for name in got:
        assert got[name].dtype == rtn[name].dtype and got[name].shape == rtn[name].shape, name
        same = mx.array_equal(got[name], rtn[name]).item()
        quantized = name.rsplit(".", 1)[1] in ("scales", "biases") or got[name].dtype == mx.uint32
        # Router, routing bias, norms: untouched. The embedding is a lookup,
        # not a matmul: round to nearest.
        if not quantized or name.startswith("model.embed_tokens."):
            assert same, name
        elif not same:
            changed.append(name)
    for what in ("self_attn.q_proj", "self_attn.o_proj", "switch_mlp.gate_proj", "switch_mlp.down_proj", "lm_head"):
        assert any(what in n for n in changed), what


def test_summary_reports_layers_experts_and_tokens(calibrated, text):
    _, summary = calibrated
    c = summary.calibration
    assert c.held_out_tokens > 0 and c.calibration_tokens + c.held_out_tokens == TOKENS
    assert len(c.layers) == SMALL_HF["num_hidden_layers"]
    for r in c.layers:
        assert 0 < r.calibrated_error and 0 < r.rtn_error
        assert 0 <= r.min_expert_tokens <= c.calibration_tokens and 0 <= r.fallback_experts <= SMALL_HF["num_local_experts"]
    # Calibrated weights reproduce the layers better on held-out text.
    assert np.mean([r.calibrated_error for r in c.layers]) < np.mean([r.rtn_error for r in c.layers])
    lines = "\n".join(summary.lines())
    assert "calibration: " in lines and "fewest calibration tokens" in lines and "layer 2: " in lines


def test_calibration_is_reproducible_and_packed_matches_stock(calibrated, hf_bf16, text, tmp_path):
    """Calibrating again, to a packed checkpoint, gives bit for bit the same
    tensors once unpacked to stock."""
    dst, _ = calibrated
    fm.convert(hf_bf16, tmp_path / "packed", recipe=SEED, calibrate=text, calib_tokens=TOKENS, calib_seq_len=SEQ_LEN)
    fm.convert(tmp_path / "packed", tmp_path / "unpacked", to="stock")
    a, b = load_tensors(dst), load_tensors(tmp_path / "unpacked")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(np.array(a[name].view(mx.uint8)),
                                                                 np.array(b[name].view(mx.uint8))), name


def test_jsonl_and_folder_text(hf_bf16, text, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    words = text.read_text().split()
    with open(folder / "a.jsonl", "w") as f:
        for i in range(0, len(words), 100):
            f.write(json.dumps({"text": " ".join(words[i:i + 100]), "id": i}) + "\n")
    (folder / "ignored.md").write_text("not read")
    summary = fm.convert(hf_bf16, tmp_path / "out", recipe=SEED, to="stock", calibrate=folder, calib_tokens=512,
                         calib_seq_len=SEQ_LEN)
    assert summary.calibration.calibration_tokens + summary.calibration.held_out_tokens == 512


# ---------------------------------------------------------------- bad input


def _missing(tmp):
    return tmp / "nope.txt", r"nope.txt: no such calibration text file or folder"


def _empty(tmp):
    (tmp / "empty.txt").write_text("  \n\n")
    return tmp / "empty.txt", r"empty.txt: the calibration text is empty"


def _not_utf8(tmp):
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    return tmp / "latin1.txt", r"latin1.txt: not UTF-8 text"


def _too_short(tmp):
    (tmp / "short.txt").write_text("the router")
    return tmp / "short.txt", r"short.txt: \d+ tokens are fewer than one sequence of 64"


def _bad_jsonl(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    return tmp / "bad.jsonl", r"bad.jsonl:2: expected an object with a string \"text\" field"


def _empty_folder(tmp):
    (tmp / "none").mkdir()
    return tmp / "none", r"none: no .txt or .jsonl files in this folder"


BAD_TEXT = {"missing": _missing, "empty": _empty, "not-utf8": _not_utf8, "fewer-than-one-sequence": _too_short,
            "bad-jsonl": _bad_jsonl, "empty-folder": _empty_folder}


@pytest.mark.parametrize("case", BAD_TEXT)
def test_bad_calibration_text(case, hf_bf16, tmp_path, capsys):
    path, expected = BAD_TEXT[case](tmp_path)
    code, out, err = run_cli([hf_bf16, tmp_path / "out", "--recipe", SEED, "--calibrate", path,
                              "--calib-seq-len", SEQ_LEN], capsys)
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fused-moe convert: error: "), err
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args,expected", [
    (["--calib-shrinkage", "-1"], r"--calib-shrinkage.*expert shrinkage -1.0: expected a finite number of tokens >= 0"),
    (["--calib-min-expert-tokens", "-5"], r"expert min_tokens -5: expected a whole number of tokens >= 0"),
    (["--calib-shrinkage", "nan"], r"expert shrinkage nan"),
])
def test_bad_expert_calibration_options(args, expected, hf_bf16, text, tmp_path, capsys):
    code, out, err = run_cli([hf_bf16, tmp_path / "out", "--recipe", SEED, "--calibrate", text, *args], capsys)
    assert code == 1 and "Traceback" not in err, err
    import re

    assert re.search(expected, err.strip().splitlines()[-1]), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_expert_options_need_calibrate(hf_bf16, tmp_path, capsys):
    code, out, err = run_cli([hf_bf16, tmp_path / "out", "--recipe", SEED, "--calib-min-expert-tokens", "64"], capsys)
    assert code == 1 and "applies only with calibrate (--calibrate)" in err, err
    assert not (tmp_path / "out").exists()


def test_expert_options_reach_the_calibration(hf_bf16, text, tmp_path):
    """Diagonal statistics with near-miss samples: the summary says which,
    and the experts differ from the default (full statistics, GPTQ)."""
    from fused_moe.quant.calibrate import ExpertCalibration

    options = ExpertCalibration("diagonal", 32.0, 400)
    summary = fm.convert(hf_bf16, tmp_path / "diag", recipe=SEED, to="stock", calibrate=text, calib_tokens=TOKENS,
                         calib_seq_len=SEQ_LEN, calib_experts=options)
    lines = "\n".join(summary.lines())
    assert "experts (diagonal statistics)" in lines and "fewer than 32 and lean on their prior" in lines
    assert sum(r.topped_up_experts for r in summary.calibration.layers) > 0 and "near-miss samples up to 400" in lines
    full = fm.convert(hf_bf16, tmp_path / "full", recipe=SEED, to="stock", calibrate=text, calib_tokens=TOKENS,
                      calib_seq_len=SEQ_LEN)
    assert "experts (full statistics)" in "\n".join(full.lines())
    a, b = load_tensors(tmp_path / "diag"), load_tensors(tmp_path / "full")
    name = "model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"
    assert not mx.array_equal(a[name], b[name]).item()
    name = "model.layers.0.self_attn.q_proj.weight"  # attention statistics are the same
    assert mx.array_equal(a[name], b[name]).item()


def test_calibration_needs_a_hugging_face_source(tmp_path, text):
    stock = make_checkpoint(tmp_path / "stock", dict(SMALL, num_hidden_layers=1))
    with pytest.raises(ConversionError, match="mlx-lm quantized checkpoint, which holds no original weights to calibrate"):
        fm.convert(stock, tmp_path / "out", calibrate=text)
    assert not (tmp_path / "out").exists()


def test_calib_tokens_below_one_sequence(hf_bf16, text, tmp_path):
    with pytest.raises(ConversionError, match="--calib-tokens 32 is fewer than one sequence of 64"):
        fm.convert(hf_bf16, tmp_path / "out", recipe=SEED, calibrate=text, calib_tokens=32, calib_seq_len=SEQ_LEN)
    with pytest.raises(ConversionError, match="at least two are needed"):
        fm.convert(hf_bf16, tmp_path / "out", recipe=SEED, calibrate=text, calib_tokens=64, calib_seq_len=SEQ_LEN)
    with pytest.raises(ConversionError, match="--verify re-derives experts by round to nearest"):
        fm.convert(hf_bf16, tmp_path / "out", recipe=SEED, calibrate=text, verify=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- memory


def test_peak_memory_does_not_grow_with_the_model(tmp_path, text):
    """Peak RSS of a calibrated conversion is one layer plus the hidden
    states: 2 and 6 layers of the same shapes peak alike (the way
    test_convert's memory test measures it), though the 6-layer source is 3x
    larger."""
    config = dict(SMALL_HF, hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, rotary_dim=32, num_local_experts=32)
    peaks, sizes = {}, {}
    for layers in (2, 6):
        src = write_hf_checkpoint(tmp_path / f"src{layers}", dict(config, num_hidden_layers=layers), fp8=True,
                                  mtp=False)
        sizes[layers] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        peaks[layers], out = _peak_rss_mb(
            "fused_moe", "convert", src, tmp_path / f"out{layers}", "--recipe", SEED,
            "--calibrate", text, "--calib-tokens", "256", "--calib-seq-len", "64")
    bf16_layer_mb = 2 * (sizes[6] - sizes[2]) / 4 / 1e6  # one layer's weights in bf16
    print(f"\ncalibrated conversion peak RSS: 2 layers {peaks[2]:.0f} MB, 6 layers {peaks[6]:.0f} MB "
          f"(source {sizes[2] / 1e6:.0f} / {sizes[6] / 1e6:.0f} MB FP8; one layer {bf16_layer_mb:.0f} MB in bf16)")
    # Keeping the model would add the 4 extra layers (4 x bf16_layer_mb); allow half of that.
    assert peaks[6] - peaks[2] < 2 * bf16_layer_mb


def test_head_is_quantized_by_gptq_with_its_full_hessian():
    """The driver hands lm_head the full E[x x^T] of the final norm's output,
    so "auto" is GPTQ there."""
    import mlx.nn as nn

    from fused_moe.quant import InputStats, quantize_weight
    from fused_moe.quant.calibrate import BATCH_SEQUENCES, Calibrator

    rng = np.random.default_rng(5)
    D, V = 128, 64
    states = mx.array(rng.normal(size=(6, 16, D)).astype(np.float32))
    norm = nn.RMSNorm(D)
    weight = mx.array(rng.normal(0, 0.02, size=(V, D)).astype(np.float32)).astype(mx.bfloat16)
    got = Calibrator(states, states[:1]).head(norm, weight, 3, 64)
    stats = InputStats(D)
    for i in range(0, states.shape[0], BATCH_SEQUENCES):
        stats.update(norm(states[i:i + BATCH_SEQUENCES]))
    want = quantize_weight(weight, 3, 64, hessian=stats.hessian(), method="gptq")
    for a, b in zip(got, want):
        assert np.array_equal(np.array(a.view(mx.uint8)), np.array(b.view(mx.uint8)))
    weighted = quantize_weight(weight, 3, 64, hessian=stats.diagonal(), method="weighted")
    assert not np.array_equal(np.array(got[0]), np.array(weighted[0]))
