"""Every MoE model type of the installed mlx-lm on the fused experts
(tests/support/zoo.py builds them tiny): `fm.patch` replaces every routed
expert module under the model's own router, and the float32 logits of a
prefill and of a cached decode step equal stock's under the tolerance rule,
with stock itself as the reference (the two differ only in summation order).
"""

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe.supported import FP_MODES
from support import zoo
from support.tolerance import rel_err, slack

RUNNABLE = [t for t in zoo.MOE_MODEL_TYPES if t not in zoo.CPU_IMPOSSIBLE]
# (mode, bits) of the experts: every affine width at group size 64, and
# MLX's fp modes at their own bits and group size.
SETTINGS = [("affine", b) for b in (2, 3, 4, 5, 6, 8)] + [(m, FP_MODES[m]["bits"]) for m in ("mxfp4", "mxfp8", "nvfp4")]


def _logits(pair) -> np.ndarray:
    prefill, decode = pair
    return np.concatenate([np.array(prefill[0]), np.array(decode[0])])


def _quantized(model_type: str, mode: str, bits: int):
    model, _ = zoo.build(model_type, seed=0)
    if mode == "affine":
        zoo.quantize_experts(model, bits, group_size=64)
    else:
        layout = FP_MODES[mode]
        zoo.quantize_experts(model, layout["bits"], group_size=layout["group_size"], mode=mode)
    return model


@pytest.mark.parametrize("mode,bits", SETTINGS, ids=[f"{m}{b}" for m, b in SETTINGS])
@pytest.mark.parametrize("model_type", RUNNABLE)
def test_fused_experts_match_stock(model_type, mode, bits):
    stock = _quantized(model_type, mode, bits)
    fused = _quantized(model_type, mode, bits)
    expected = len(zoo.expert_modules(fused))
    replaced = fm.patch(fused)
    assert zoo.expert_modules(fused) == [], f"{model_type}: stock expert modules left"
    assert replaced >= 1 and replaced <= expected, (replaced, expected)
    fused_experts = [m for m in fused.modules() if isinstance(m, (fm.FusedExperts, fm.MiniMaxMoE))]
    assert len(fused_experts) == replaced
    want, got = _logits(zoo.run(stock)), _logits(zoo.run(fused))
    err = rel_err(got, want)
    assert np.all(np.isfinite(got)), f"{model_type}: fused logits have NaN/Inf"
    assert err <= slack(mx.float32), f"{model_type} {mode}{bits}: fused logits differ from stock: rel err {err:.3g}"


def test_the_registry_is_the_zoo():
    """Every MoE type of the installed mlx-lm is registered, the CPU-impossible
    ones with their reason, and each registered activation is the one the
    fused module takes from the built model."""
    from fused_moe.models.experts import activation_of
    from fused_moe.models.families import FAMILIES

    assert set(FAMILIES) == set(zoo.MOE_MODEL_TYPES)
    assert {t for t, f in FAMILIES.items() if f.cpu_impossible} == set(zoo.CPU_IMPOSSIBLE)
    for model_type, family in FAMILIES.items():
        model, _ = zoo.build(model_type, seed=0)
        acts = {activation_of(m).name for _, m in zoo.expert_modules(model)}
        assert acts == family.activations, (model_type, acts)


def test_the_docs_table_is_the_registry():
    from pathlib import Path

    from fused_moe.models.families import markdown_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    table = doc.split("<!-- families:begin -->\n", 1)[1].split("<!-- families:end -->", 1)[0]
    assert table == markdown_table(), "docs/models.md is stale: python -m fused_moe.models.families"


# ---------------------------------------------------------------- mixed settings, through the converter

# A family of each kind: SwiGLU, gpt-oss's activation with expert biases, a
# non-gated SwitchMLP, group-limited routing, MiniMax's fused block, GeGLU
# under a wrapper's prefix, top-1 with the score on the input, and a
# SwitchMLP with biases.
MIXED_TYPES = ["qwen3_moe", "gpt_oss", "nemotron_h", "deepseek_v3", "minimax", "gemma4", "llama4", "phixtral"]


def _quantize_mixed(model) -> dict:
    """Even expert stacks: gate/up affine 4-bit g64, down 6-bit g32; odd ones:
    gate/up mxfp4, down mxfp8. Returns {projection path: its setting}."""
    from mlx.nn import quantize
    from mlx_lm.models.switch_layers import SwitchLinear

    settings = {}
    for i, (path, experts) in enumerate(zoo.expert_modules(model)):
        first = {"group_size": 64, "bits": 4, "mode": "affine"} if i % 2 == 0 else \
            {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        down = {"group_size": 32, "bits": 6, "mode": "affine"} if i % 2 == 0 else \
            {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        for name, child in experts.children().items():
            if isinstance(child, SwitchLinear):
                settings[f"{path}.{name}"] = down if name in ("down_proj", "fc2") else first
    quantize(model, class_predicate=lambda p, m: settings.get(p, False))
    return settings


def _mixed_model(model_type: str):
    model, _ = zoo.build(model_type, seed=0)
    return model, _quantize_mixed(model)


@pytest.mark.parametrize("model_type", MIXED_TYPES)
def test_mixed_widths_and_modes_within_and_across_layers(model_type):
    (stock, settings), (fused, _) = _mixed_model(model_type), _mixed_model(model_type)
    stacks = len(zoo.expert_modules(stock))
    # gate/up and down differ in every stack, and the stacks alternate.
    assert len({tuple(s.values()) for s in settings.values()}) == 2 * min(stacks, 2)
    assert fm.patch(fused) >= 1 and zoo.expert_modules(fused) == []
    err = rel_err(_logits(zoo.run(fused)), _logits(zoo.run(stock)))
    assert err <= slack(mx.float32), f"{model_type}: rel err {err:.3g}"


@pytest.mark.parametrize("model_type", MIXED_TYPES)
def test_any_family_converts_losslessly_and_loads(model_type, tmp_path):
    """An mlx-lm quantized checkpoint of the family (mixed settings) repacked
    by `fused-moe convert` (verified), opened by `fm.load` with the packed
    experts in place: the same logits as the stock model; and back to stock
    bit for bit."""
    import json

    from mlx_lm.utils import save_config, save_model

    from support.minimax_models import build_tokenizer

    stock, settings = _mixed_model(model_type)
    src = tmp_path / "stock"
    save_model(src, stock)
    config = dict(zoo.tiny_config(model_type), quantization={"group_size": 64, "bits": 4, "mode": "affine",
                                                             **settings})
    save_config(config, src / "config.json")
    build_tokenizer(320).save_pretrained(src)  # the tokenizer is only copied and loaded
    fm.convert(src, tmp_path / "packed", verify=True)
    packed_config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert len(packed_config["fused_moe"]["experts"]) == len(zoo.expert_modules(stock))
    loaded, _ = fm.load(str(tmp_path / "packed"))
    assert zoo.expert_modules(loaded) == []
    err = rel_err(_logits(zoo.run(loaded)), _logits(zoo.run(stock)))
    assert err <= slack(mx.float32), f"{model_type}: loaded packed checkpoint, rel err {err:.3g}"
    fm.convert(tmp_path / "packed", tmp_path / "back", to="stock", verify=True)
    a, b = mx.load(str(src / "model.safetensors")), {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        b.update(mx.load(str(f)))
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name
