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
# (mode, bits) of the experts, group size 64 where the mode lets one choose.
SETTINGS = [("affine", 3), ("affine", 4)]


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
