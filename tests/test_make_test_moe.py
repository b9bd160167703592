"""benchmarks/make_test_moe.py on a tiny random Llama (no GGUF needed): the
MoE it builds is what mlx-lm's MiniMax computes from the checkpoint it
writes, the converter reads that checkpoint, and its pieces do what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_test_moe as mt  # noqa: E402
import smollm2  # noqa: E402

D, HEADS, KV, N, LAYERS, VOCAB = 128, 4, 2, 256, 2, 320


def llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion of Hugging Face q/k rows (its `permute`), written out."""
    rows, cols = w.shape
    half = rows // heads // 2
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(half):
            out[h * 2 * half + 2 * i] = w[h * 2 * half + i]
            out[h * 2 * half + 2 * i + 1] = w[h * 2 * half + half + i]
    return out


def tiny_llama(seed: int = 0) -> tuple[smollm2.Llama, dict]:
    """A random Llama in GGUF's tensor names (float weights, no quantization)."""
    rng = np.random.default_rng(seed)
    hd = D // HEADS

    def t(*shape, scale=0.08):
        return mx.array(rng.normal(0, scale, size=shape).astype(np.float32))

    tensors = {"token_embd.weight": t(VOCAB, D, scale=1.0), "output_norm.weight": 1 + t(D, scale=0.1)}
    for i in range(LAYERS):
        p = f"blk.{i}"
        tensors.update({
            f"{p}.attn_norm.weight": 1 + t(D, scale=0.1), f"{p}.ffn_norm.weight": 1 + t(D, scale=0.1),
            f"{p}.attn_q.weight": t(HEADS * hd, D), f"{p}.attn_k.weight": t(KV * hd, D),
            f"{p}.attn_v.weight": t(KV * hd, D), f"{p}.attn_output.weight": t(D, HEADS * hd),
            f"{p}.ffn_gate.weight": t(N, D), f"{p}.ffn_up.weight": t(N, D), f"{p}.ffn_down.weight": t(D, N),
        })
    md = {
        "llama.block_count": mx.array(LAYERS), "llama.attention.head_count": mx.array(HEADS),
        "llama.attention.head_count_kv": mx.array(KV), "llama.embedding_length": mx.array(D),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5), "llama.rope.freq_base": mx.array(10000.0),
        "llama.context_length": mx.array(1024), "tokenizer.ggml.bos_token_id": mx.array(0),
        "tokenizer.ggml.eos_token_id": mx.array(1),
    }
    return smollm2.Llama(tensors, md), md


def test_hf_qk_rows_undoes_llama_cpp_permutation():
    w = np.random.default_rng(1).normal(size=(6 * 8, 5)).astype(np.float32)
    assert np.array_equal(smollm2.hf_qk_rows(llama_cpp_rows(w, 6), 6), w)
    assert not np.array_equal(smollm2.hf_qk_rows(w, 6), w)


def test_cluster_neurons_balanced_and_seeded():
    rng = np.random.default_rng(0)
    # Four planted groups of 16 neurons that fire on disjoint token sets.
    tokens, groups = 400, 4
    profiles = rng.uniform(0, 0.1, size=(tokens, 64)).astype(np.float32)
    planted = rng.permutation(64) % groups
    for g in range(groups):
        profiles[g::groups][:, planted == g] += 1.0
    assign = mt.cluster_neurons(profiles, groups, np.random.default_rng(3))
    assert np.bincount(assign, minlength=groups).tolist() == [16] * groups
    # The planted groups are found (up to the groups' order).
    for g in range(groups):
        assert len(set(assign[planted == g])) == 1
    assert np.array_equal(assign, mt.cluster_neurons(profiles, groups, np.random.default_rng(3)))


def test_moe_layer_is_minimax_sparse_block():
    """`route` and `MoELayer` compute what mlx-lm's MiniMaxSparseMoeBlock
    does with the same weights (top-k of sigmoid + bias, weights the unbiased
    scores renormalised)."""
    from mlx_lm.models import minimax

    rng = np.random.default_rng(2)
    E, H, k = 8, 32, 3
    x = rng.normal(size=(50, D)).astype(np.float32)
    gate = rng.normal(0, 0.1, size=(E, D)).astype(np.float32)
    bias = rng.normal(0, 0.2, size=E).astype(np.float32)
    w1, w3 = (rng.normal(0, 0.1, size=(E, H, D)).astype(np.float32) for _ in range(2))
    w2 = rng.normal(0, 0.1, size=(E, D, H)).astype(np.float32)
    layer = mt.MoELayer(np.arange(E * H).reshape(E, H), w1, w3, w2, gate, bias, k)
    got, chosen = layer(x)
    args = minimax.ModelArgs(model_type="minimax", hidden_size=D, intermediate_size=H, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=k,
                             num_local_experts=E, shared_intermediate_size=0, num_hidden_layers=1,
                             rms_norm_eps=1e-5, rope_theta=1e4, rotary_dim=32, vocab_size=32)
    block = minimax.MiniMaxSparseMoeBlock(args)
    block.gate.weight = mx.array(gate)
    block.e_score_correction_bias = mx.array(bias)
    for name, w in (("gate_proj", w1), ("up_proj", w3), ("down_proj", w2)):
        getattr(block.switch_mlp, name).weight = mx.array(w)
    want = np.array(block(mx.array(x)))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    # The bias changes the selection here, so its handling is tested.
    assert not np.array_equal(np.sort(chosen, -1), np.sort(mt.top_k(x @ gate.T, k), -1))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny Llama made an MoE (4 experts of 64 neurons, top-2) and written."""
    from support.minimax_models import build_tokenizer

    out = tmp_path_factory.mktemp("test_moe") / "src"
    dense, model, figs, held, x_held = build_and_write(out)
    build_tokenizer(VOCAB).save_pretrained(out)
    return dense, model, figs, held, x_held, out


def build_and_write(out: Path):
    dense, md = tiny_llama()
    seqs = np.random.default_rng(5).integers(2, VOCAB, size=(12, 32))
    fit, held = seqs[:8], seqs[8:]
    model, figs, x_held = mt.build_moe(dense, fit, held, LAYERS, 4, 2, np.random.default_rng(0), 50, 1.0,
                                       log=lambda *a, **k: None)
    out.mkdir()
    mt.write_checkpoint(out, model, mt.model_config(dense, md, LAYERS, 4, 2))
    return dense, model, figs, held, x_held


def test_build_moe_figures(built):
    _, model, figs, held, _, _ = built
    assert len(model.moe) == LAYERS and len(figs) == LAYERS
    for layer, fig in zip(model.moe, figs):
        # Every neuron in exactly one expert.
        assert sorted(layer.gate_up_rows.ravel().tolist()) == list(range(N))
        assert abs(sum(fig["load"]) - 1) < 1e-9
        assert 2 / 4 - 1e-9 <= fig["pairwise_overlap"] <= 1 + 1e-9
        # The least-squares scales do better than no FFN at all.
        assert 0 <= fig["fit_error"] < 1
        assert 0 <= fig["target_error"] < 1


def test_checkpoint_is_the_numpy_moe_in_mlx_lm(built):
    """mlx-lm's MiniMax on the written checkpoint gives the numpy MoE's logits:
    attention rows, RoPE layout, routing and scaled experts all map over."""
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    _, model, _, held, x_held, out = built
    want = model.base.logits(x_held)
    mlx_model, config = load_model(out)
    assert config["model_type"] == "minimax_m2" and config["num_local_experts"] == 4
    mlx_model.update(tree_map(lambda a: a.astype(mx.float32), mlx_model.parameters()))
    got = np.array(mlx_model(mx.array(held)))
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
    # Without the q/k row fix the logits differ: the comparison can fail.
    dense = model.base.w["blk.0.attn_q"]
    assert not np.allclose(smollm2.hf_qk_rows(dense, HEADS), dense)


def test_checkpoint_converts(built, tmp_path):
    import fused_moe as fm

    out = built[-1]
    summary = fm.convert(out, tmp_path / "stock", recipe="seed-3.7bit", to="stock")
    assert summary.source_kind == "hf" and summary.bits_per_weight > 3


def test_checkpoint_bytes_are_deterministic(built, tmp_path):
    """Built again from scratch, the same seed writes the same bytes."""
    again = tmp_path / "again"
    build_and_write(again)
    first = mt.sha256_files(built[-1])
    assert mt.sha256_files(again) == {n: h for n, h in first.items() if (again / n).exists()}
    assert len(list(again.glob("*.safetensors"))) == LAYERS + 1
