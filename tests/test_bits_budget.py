"""fused-moe convert --bits-budget: the experts' widths chosen per layer by
their error on the calibration text, within a bits-per-weight budget."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

import fused_moe as fm
from fused_moe.checkpoint.sources import open_checkpoint
from fused_moe.conversion import ConversionError, bits_per_weight_of
from fused_moe.conversion.budget import Budget
from fused_moe.conversion.recipes import get
from fused_moe.quant.budget import DOWN, GATE_UP, allocate, expert_errors, quantizer_gain
from support.hf_checkpoints import SMALL_HF, write_hf_checkpoint
from support.tolerance import rel_err, slack
from test_calibrate import SEQ_LEN, TOKENS, english_like
from test_convert import leftovers, load_tensors, run_cli

SEED = "seed-3.7bit"
LAYERS = SMALL_HF["num_hidden_layers"]


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "bf16", fp8=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return english_like(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def seed_bpw():
    """The seed recipe's own bits per weight on the small model: the budget."""
    return bits_per_weight_of(SMALL_HF, SEED)


@pytest.fixture(scope="module")
def budgeted(hf_bf16, text, seed_bpw, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "stock"
    summary = fm.convert(hf_bf16, dst, to="stock", calibrate=text, calib_tokens=TOKENS, calib_seq_len=SEQ_LEN,
                         bits_budget=seed_bpw)
    return dst, summary


def _budget(path, bpw, to="stock") -> Budget:
    return Budget(open_checkpoint(path).model, get(SEED), to, bpw)


def test_budget_is_kept_and_close(budgeted, hf_bf16, seed_bpw):
    """At most the budget, and no single step up of one (layer, group) to
    the next width would still fit: as close as the widths allow."""
    _, summary = budgeted
    chosen = summary.budget.expert_bits
    assert summary.bits_per_weight <= seed_bpw
    assert summary.budget.bits_per_weight == summary.bits_per_weight
    budget = _budget(hf_bf16, seed_bpw)
    assert budget.bits_per_weight(chosen) == summary.bits_per_weight
    for layer in range(LAYERS):
        for g in range(2):
            k = budget.bits.index(chosen[layer][g])
            if k + 1 < len(budget.bits):
                up = [list(p) for p in chosen]
                up[layer][g] = budget.bits[k + 1]
                assert budget.bits_per_weight(up) > seed_bpw, (layer, g)
    # The widths are mixed: not the seed's own rule (4-bit first and last layer).
    assert len({b for p in chosen for b in p}) > 1


def test_output_config_and_tensors_follow_the_widths(budgeted):
    dst, summary = budgeted
    config = json.loads((dst / "config.json").read_text())
    tensors = load_tensors(dst)
    for layer, (gu, d) in enumerate(summary.budget.expert_bits):
        for proj, bits in (("gate_proj", gu), ("up_proj", gu), ("down_proj", d)):
            path = f"model.layers.{layer}.block_sparse_moe.switch_mlp.{proj}"
            assert config["quantization"][path] == {"group_size": 64, "bits": bits, "mode": "affine"}
            w = tensors[f"{path}.weight"]
            assert w.shape[-1] * 32 // bits == (SMALL_HF["intermediate_size"] if proj == "down_proj"
                                                else SMALL_HF["hidden_size"])
    # Outside the experts the seed recipe: attention 8-bit, router float.
    assert config["quantization"]["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert config["quantization"]["model.layers.0.block_sparse_moe.gate"] is False
    lines = "\n".join(summary.lines())
    assert re.search(rf"bits budget {summary.budget.budget:g}: {summary.bits_per_weight:.4f} bits per weight", lines)
    for layer, (gu, d) in enumerate(summary.budget.expert_bits):
        assert f"  layer {layer}: {gu}, {d} (calibrated / RTN error " in lines


def test_stock_and_fused_loads_agree_and_packed_matches(budgeted, hf_bf16, text, seed_bpw, tmp_path):
    """The packed conversion (a second run: reproducible) unpacks to the
    stock one bit for bit; mlx-lm on the stock output and fused_moe on the
    packed one give the same logits in float32."""
    from mlx_lm import load

    dst, summary = budgeted
    packed = fm.convert(hf_bf16, tmp_path / "packed", calibrate=text, calib_tokens=TOKENS, calib_seq_len=SEQ_LEN,
                        bits_budget=seed_bpw)
    assert packed.budget.expert_bits == summary.budget.expert_bits
    assert packed.bits_per_weight == summary.bits_per_weight
    fused_config = json.loads((tmp_path / "packed" / "config.json").read_text())["fused_moe"]
    assert fused_config["recipe"] == "seed-3.7bit+bits-budget"
    fm.convert(tmp_path / "packed", tmp_path / "unpacked", to="stock")
    a, b = load_tensors(dst), load_tensors(tmp_path / "unpacked")
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(np.array(a[name].view(mx.uint8)), np.array(b[name].view(mx.uint8))), name
    stock, _ = load(str(dst))
    fused, _ = fm.load(str(tmp_path / "packed"))
    bits = [(l.block_sparse_moe.experts.gate_up_bits, l.block_sparse_moe.experts.down_bits) for l in fused.layers]
    assert bits == [tuple(p) for p in summary.budget.expert_bits]
    stock.set_dtype(mx.float32)
    fused.set_dtype(mx.float32)
    tokens = mx.array([[3, 17, 42, 5, 99, 7, 250, 11]])
    err = rel_err(fused(tokens), stock(tokens))
    assert err <= slack(mx.float32), f"fused logits differ from stock: rel err {err:.3g}"


def test_a_sensitive_layer_gets_more_bits(text, seed_bpw, tmp_path):
    """Layer 1's experts write 4x larger outputs (its down projections
    scaled): its errors weigh 16x, so it gets the widest experts."""
    src = write_hf_checkpoint(tmp_path / "hf", fp8=False, down_scale={1: 4.0})
    summary = fm.convert(src, tmp_path / "out", to="stock", calibrate=text, calib_tokens=TOKENS,
                         calib_seq_len=SEQ_LEN, bits_budget=seed_bpw)
    chosen = summary.budget.expert_bits
    assert summary.bits_per_weight <= seed_bpw
    for layer in (0, 2):
        assert chosen[1][0] >= chosen[layer][0] and chosen[1][1] >= chosen[layer][1], chosen
        assert sum(chosen[1]) > sum(chosen[layer]), chosen


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,expected", [
    (["--bits-budget", "1.5"], r"--bits-budget 1.5: below the \d\.\d{4} bits per weight of 2-bit experts"),
    (["--bits-budget", "9"], r"--bits-budget 9: above the \d\.\d{4} bits per weight of 8-bit experts"),
    (["--bits-budget", "abc"], r"--bits-budget 'abc': expected a number of bits per weight"),
    (["--bits-budget", "nan"], r"--bits-budget 'nan': expected a number"),
    (["--bits-budget", "-3"], r"--bits-budget '-3': expected a number"),
    (["--bits-budget", "3.6", "--bits", "4"], r"--bits-budget keeps the seed-3.7bit recipe outside the experts"),
])
def test_bad_budgets(args, expected, hf_bf16, text, tmp_path, capsys):
    code, out, err = run_cli([hf_bf16, tmp_path / "out", "--calibrate", text, *args], capsys)
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fused-moe convert: error: "), err
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_budget_needs_calibrate(hf_bf16, tmp_path, capsys):
    code, out, err = run_cli([hf_bf16, tmp_path / "out", "--recipe", SEED, "--bits-budget", "3.6"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--bits-budget chooses the experts' widths on the calibration text: it needs --calibrate" in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_budget_needs_original_weights(hf_bf16, text, tmp_path, capsys):
    fm.convert(hf_bf16, tmp_path / "rtn", recipe=SEED, to="stock")
    capsys.readouterr()
    code, out, err = run_cli([tmp_path / "rtn", tmp_path / "out", "--calibrate", text, "--bits-budget", "3.6"],
                             capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "holds no original weights to measure the experts' widths for --bits-budget on" in err, err
    assert not (tmp_path / "out").exists()


def test_python_budget_errors(hf_bf16, text, tmp_path):
    with pytest.raises(ConversionError, match="below the"):
        fm.convert(hf_bf16, tmp_path / "out", calibrate=text, bits_budget=0.5)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- the parts


def test_allocate_keeps_the_budget_and_favours_the_larger_errors():
    errors = [[16.0, 4.0, 1.0], [1.0, 0.25, 0.0625], [160.0, 40.0, 10.0]]
    costs = [[0, 10, 20]] * 3
    assert allocate(errors, costs, 0) == [0, 0, 0]
    assert allocate(errors, costs, 10) == [0, 0, 1]
    assert allocate(errors, costs, 20) == [0, 0, 2]
    assert allocate(errors, costs, 30) == [1, 0, 2]
    assert allocate(errors, costs, 60) == [2, 2, 2]
    with pytest.raises(ValueError, match="over the budget"):
        allocate(errors, [[5, 10, 20]] * 3, 10)
    # An option that saves nothing is never bought; the exact choice, not
    # the greedy one (which would take item 0's best step per byte first).
    assert allocate([[5.0, 5.0, 1.0]], [[0, 1, 2]], 1) == [0]
    assert allocate([[9.0, 1.5, 0.5], [9.0, 8.0, 0.0]], [[0, 3, 4], [0, 1, 4]], 4) == [0, 2]


def test_allocate_is_optimal_on_random_instances():
    """Against every combination of options: within the budget and no
    combination that fits has a lower summed error."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = int(rng.integers(1, 5)), int(rng.integers(2, 6))
        errors = [sorted(rng.uniform(0, 10, m), reverse=True) for _ in range(n)]
        costs = [sorted((rng.integers(0, 12, m) * 3).tolist()) for _ in range(n)]
        budget = int(rng.integers(sum(c[0] for c in costs), sum(c[-1] for c in costs) + 1))
        pick = allocate(errors, costs, budget)
        assert sum(c[k] for c, k in zip(costs, pick)) <= budget
        best = min(sum(e[k] for e, k in zip(errors, combo)) for combo in itertools.product(range(m), repeat=n)
                   if sum(c[k] for c, k in zip(costs, combo)) <= budget)
        assert sum(e[k] for e, k in zip(errors, pick)) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_expert_errors_estimate_the_measured_output_error():
    """The estimate (first order, diagonal) against the output error
    measured with round-to-nearest experts, per group, at 2 to 4 bits:
    within a factor of 1.5, and falling with the width."""
    rng = np.random.default_rng(1)
    E, D, H, T, k = 4, 128, 64, 512, 2
    x = rng.normal(size=(T, D)).astype(np.float32)
    routed = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    routed[:, :] = np.where(routed == 3, 0, routed)  # expert 3: no tokens
    routed[:, 1] = np.where(routed[:, 1] == routed[:, 0], (routed[:, 0] + 1) % 3, routed[:, 1])
    weights = rng.uniform(0.2, 1, size=(T, k)).astype(np.float32)
    weights /= weights.sum(-1, keepdims=True)
    gate, up = (mx.array(rng.normal(0, 0.1, size=(E, H, D)).astype(np.float32)) for _ in range(2))
    down = mx.array(rng.normal(0, 0.1, size=(E, D, H)).astype(np.float32))
    bits = (2, 3, 4)
    est = expert_errors(x, routed, weights, gate, up, down, bits, 64, mx.float32)

    def rtn(w, b):
        return mx.dequantize(*mx.quantize(w, group_size=64, bits=b), group_size=64, bits=b)

    def output(g, u, d):
        total = np.zeros((T, D), np.float32)
        for j in range(k):
            for e in range(E):
                sel = routed[:, j] == e
                xs = mx.array(x[sel])
                a, b = xs @ g[e].T, xs @ u[e].T
                total[sel] += weights[sel, j, None] * np.array((a * mx.sigmoid(a) * b) @ d[e].T)
        return total

    reference = output(gate, up, down)
    for n, b in enumerate(bits):
        measured = {GATE_UP: output(rtn(gate, b), rtn(up, b), down), DOWN: output(gate, up, rtn(down, b))}
        for g in (GATE_UP, DOWN):
            m = float(((measured[g] - reference).astype(np.float64) ** 2).sum())
            assert m / 1.5 <= est[g][n] <= m * 1.5, (g, b, est[g][n], m)
    for g in (GATE_UP, DOWN):
        assert np.all(np.diff(est[g]) < 0)


def test_quantizer_gain():
    """The calibrated quantizer's error over round to nearest's: never above
    1 for the weighted search (diagonal statistics; never worse than RTN
    under its objective), and well below 1 for GPTQ on correlated inputs."""
    rng = np.random.default_rng(2)
    D, H, T = 128, 64, 1024
    x = (rng.normal(size=(T, 16)) @ rng.normal(size=(16, D)) + 0.3 * rng.normal(size=(T, D))).astype(np.float32)
    gate, up = (mx.array(rng.normal(0, 0.05, size=(H, D)).astype(np.float32)) for _ in range(2))
    down = mx.array(rng.normal(0, 0.05, size=(D, H)).astype(np.float32))
    bits = (2, 3, 4, 8)
    full = quantizer_gain(x, gate, up, down, bits, 64, mx.bfloat16, full=True)
    diagonal = quantizer_gain(x, gate, up, down, bits, 64, mx.bfloat16, full=False)
    for g in (GATE_UP, DOWN):
        assert np.all(diagonal[g] <= 1 + 1e-9), (g, diagonal[g])
        assert np.all(full[g] < diagonal[g]), (g, full[g], diagonal[g])
    assert np.all(full[GATE_UP] < 0.5), full[GATE_UP]
