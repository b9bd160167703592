"""MiniMaxMoE, patch and load on real mlx-lm MiniMax models, end to end.

Whole models are compared in float32: in half precision, top-k routing flips
on near-ties and two correct implementations diverge. The layer itself is
checked in bfloat16 under the tolerance rule.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
import pytest
from mlx_lm import batch_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step
from mlx_lm.models import minimax
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.minimax import MiniMaxAttention as StockMiniMaxAttention

import fused_moe as fm
from fused_moe.packed import spec
from support.minimax_models import FULL_WIDTH, PROMPT, SMALL, build_model, save_checkpoint, tiny_llama
from support.moe_reference import Experts, reference_h, reference_y
from support.tolerance import assert_within_tolerance, rel_err, slack



@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    model, config = build_model(SMALL, seed=1)
    return save_checkpoint(model, config, tmp_path_factory.mktemp("small") / "stock")


@pytest.fixture(scope="module")
def full_width_dir(tmp_path_factory):
    model, config = build_model(FULL_WIDTH, seed=2)
    return save_checkpoint(model, config, tmp_path_factory.mktemp("full") / "stock")


def float32_pair(path):
    """(stock, patched) models from one checkpoint, both in float32."""
    stock, _ = mlx_lm_load(str(path))
    fused, _ = fm.load(str(path))
    stock.set_dtype(mx.float32)
    fused.set_dtype(mx.float32)
    return stock, fused


def greedy(model, prompt, n=32, **kwargs):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kwargs)]


def assert_logits_match(fused, stock):
    # The tolerance rule in float32 with stock itself as the reference: the
    # two differ only in summation order, so any real error shows.
    err = rel_err(fused, stock)
    assert err <= slack(mx.float32), f"patched logits differ from stock: rel err {err:.3g}"


def dense_layer_kinds(model):
    """The class of every quantized linear and embedding, by path."""
    return {
        p: type(m)
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and ".switch_mlp." not in p
    }


@pytest.mark.parametrize("which", ["small", "full_width"])
def test_patched_model_matches_stock(which, request):
    path = request.getfixturevalue(f"{which}_dir")
    stock, fused = float32_pair(path)
    assert all(isinstance(l.block_sparse_moe, fm.MiniMaxMoE) for l in fused.layers)
    # On the CPU every 8-bit projection, lm_head and the embedding run on the
    # fused ops too.
    kinds = dense_layer_kinds(fused)
    assert kinds["lm_head"] is fm.QuantizedLinear
    assert kinds["model.embed_tokens"] is fm.QuantizedEmbedding
    assert kinds["model.layers.0.self_attn.q_proj"] is fm.QuantizedLinear
    assert set(kinds.values()) == {fm.QuantizedLinear, fm.QuantizedEmbedding}
    # ... and the attention on the fused attention kernel.
    assert all(type(l.self_attn) is fm.MiniMaxAttention for l in fused.layers)
    tokens = mx.array([PROMPT])
    assert_logits_match(fused(tokens), stock(tokens))
    assert greedy(fused, PROMPT) == greedy(stock, PROMPT)


def test_experts_only_keeps_the_dense_layers_stock(small_dir):
    stock, _ = mlx_lm_load(str(small_dir))
    model, _ = mlx_lm_load(str(small_dir))
    stock.set_dtype(mx.float32)
    model.set_dtype(mx.float32)
    before = dense_layer_kinds(model)
    assert fm.patch(model, experts_only=True) == 3
    assert dense_layer_kinds(model) == before
    assert set(before.values()) == {nn.QuantizedLinear, nn.QuantizedEmbedding}
    assert all(type(l.self_attn) is StockMiniMaxAttention for l in model.layers)
    tokens = mx.array([PROMPT])
    assert_logits_match(model(tokens), stock(tokens))
    # A later full patch swaps the dense layers and still matches.
    assert fm.patch(model) == 0
    assert dense_layer_kinds(model)["lm_head"] is fm.QuantizedLinear
    assert all(type(l.self_attn) is fm.MiniMaxAttention for l in model.layers)
    assert_logits_match(model(tokens), stock(tokens))


def test_patched_checkpoint_keeps_its_parameter_names(small_dir):
    stock, _ = mlx_lm_load(str(small_dir))
    fused, _ = fm.load(str(small_dir))
    names = lambda m: {k for k, _ in tree_flatten(m.parameters()) if ".block_sparse_moe." not in k}
    assert names(fused) == names(stock)


def test_mixed_precision_is_kept(small_dir):
    model, _ = fm.load(str(small_dir))
    bits = [(l.block_sparse_moe.experts.gate_up_bits, l.block_sparse_moe.experts.down_bits) for l in model.layers]
    assert bits == [(4, 4), (3, 3), (4, 4)]
    assert all(l.block_sparse_moe.experts.gate_up_group_size == 64 for l in model.layers)


def test_layer_within_tolerance_in_bfloat16():
    model, _ = build_model(SMALL, seed=3)
    block = model.layers[1].block_sparse_moe  # 3-bit
    layer = fm.MiniMaxMoE.from_block(block)
    x = mx.random.normal((2, 5, SMALL["hidden_size"]), key=mx.random.key(4)).astype(mx.bfloat16)
    inds, weights = layer.route(x)
    sm = block.switch_mlp
    ex = Experts(sm.gate_proj, sm.up_proj, sm.down_proj, layer.experts, mx.bfloat16)
    flat_x, flat_i, flat_w = x.reshape(10, -1), inds.reshape(10, -1), weights.reshape(10, -1)
    ref = reference_y(ex, reference_h(ex, flat_x, flat_i), flat_i, flat_w)
    fused, stock = layer(x), block(x)
    assert fused.shape == stock.shape and fused.dtype == stock.dtype == mx.bfloat16
    assert_within_tolerance(fused.reshape(10, -1), stock.reshape(10, -1), ref, mx.bfloat16, "MiniMaxMoE")


def test_from_block_keeps_router_bias_k_and_group():
    model, _ = build_model(SMALL, seed=5)
    block = model.layers[0].block_sparse_moe
    block.sharding_group = object()  # any marker: it must carry over as is
    layer = fm.MiniMaxMoE.from_block(block)
    assert layer.gate is block.gate
    assert layer.e_score_correction_bias is block.e_score_correction_bias
    assert layer.num_experts_per_tok == block.num_experts_per_tok
    assert layer.sharding_group is block.sharding_group


def test_constructor_has_the_packed_parameter_tree():
    args = minimax.ModelArgs.from_dict(SMALL)
    layer = fm.MiniMaxMoE(args, bits=3, group_size=64, down_bits=4, down_group_size=32)
    shapes = dict((k, v.shape) for k, v in tree_flatten(layer.parameters()))
    expected = {n[len("B."):] for n in spec.tensor_names(f"B.{spec.MODULE_NAME}", layer.experts.specs())}
    assert {k for k in shapes if spec.MODULE_NAME in k} == expected
    D, H, E = SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["num_local_experts"]
    assert shapes[f"{spec.MODULE_NAME}.gate_up.weight"] == (E, 2 * H, D * 3 // 32)
    assert shapes[f"{spec.MODULE_NAME}.down.scales"] == (E, D, H // 32)
    assert shapes["gate.weight"] == (E, D)
    assert shapes["e_score_correction_bias"] == (E,)
    with pytest.raises(ValueError, match="intermediate_size=100"):
        fm.MiniMaxMoE(minimax.ModelArgs.from_dict(dict(SMALL, intermediate_size=100)))


def test_batched_prompts_of_different_lengths(small_dir):
    stock, fused = float32_pair(small_dir)
    _, tokenizer = mlx_lm_load(str(small_dir))
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]
    got = batch_generate(fused, tokenizer, prompts, max_tokens=12, return_token_ids=True)
    want = batch_generate(stock, tokenizer, prompts, max_tokens=12, return_token_ids=True)
    assert got.token_ids == want.token_ids
    # Each row of the batch is the sequence that prompt gives on its own,
    # up to where the row stopped (on an end-of-sequence token).
    for prompt, row in zip(prompts, got.token_ids):
        assert len(row) > 0
        assert greedy(fused, prompt, n=len(row)) == row


def test_prompt_cache_reuse(small_dir):
    # A second turn continues from the first turn's cache, as mlx-lm's chat
    # and server do; patched and stock must agree on both turns.
    def two_turns(model):
        cache = make_prompt_cache(model)
        first = greedy(model, PROMPT, n=6, prompt_cache=cache)
        offset = cache[0].offset
        second = greedy(model, [12, 13, 14], n=6, prompt_cache=cache)
        return first, offset, second

    stock, fused = float32_pair(small_dir)
    got = two_turns(fused)
    assert got[1] >= len(PROMPT) + 5  # the second turn did reuse the cache
    assert got == two_turns(stock)


def test_compiled_model_matches(small_dir):
    _, fused = float32_pair(small_dir)
    tokens = mx.array([PROMPT])
    eager = fused(tokens)
    compiled = mx.compile(fused)(tokens)
    assert rel_err(compiled, eager) <= slack(mx.float32)


def test_patch_peak_memory_is_model_plus_one_layer():
    config = dict(SMALL, hidden_size=1024, intermediate_size=512, num_local_experts=16, num_hidden_layers=4)
    model, _ = build_model(config, seed=6)
    mx.eval(model.parameters())

    def expert_bytes(layer):
        return sum(v.nbytes for _, v in tree_flatten(layer.block_sparse_moe.switch_mlp.parameters()))

    largest = max(expert_bytes(l) for l in model.layers)
    total = sum(expert_bytes(l) for l in model.layers)
    assert total > 3 * largest  # the bound below must be able to fail
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    assert fm.patch(model) == 4
    peak, after = mx.get_peak_memory(), mx.get_active_memory()
    # The gate/up rows of one layer are copied (down is shared), then the
    # stock arrays go: the peak grows by at most one layer, the total not at all.
    assert peak - before <= largest, (peak - before, largest)
    assert after - before <= 0.05 * largest, (after - before, largest)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_a_model_without_experts_warns_and_replaces_nothing():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"llama\.Model has no mlx-lm SwitchGLU/SwitchMLP experts"):
        assert fm.patch(model, experts_only=True) == 0


def _model_with_unquantized_experts(layers_quantized):
    mx.random.seed(0)
    model = minimax.Model(minimax.ModelArgs.from_dict(SMALL))
    nn.quantize(
        model,
        group_size=64,
        bits=3,
        class_predicate=lambda p, m: hasattr(m, "to_quantized")
        and ".switch_mlp." in p
        and int(p.split(".")[2]) in layers_quantized,
    )
    return model


def test_unquantized_experts_strict_raises_and_changes_nothing():
    model = _model_with_unquantized_experts({0, 2})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.block_sparse_moe\.switch_mlp: gate_proj: not quantized"):
        fm.patch(model)
    assert not any(isinstance(l.block_sparse_moe, fm.MiniMaxMoE) for l in model.layers)


def test_unquantized_experts_non_strict_warn_and_stay_stock():
    model = _model_with_unquantized_experts({0, 2})
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.block_sparse_moe\.switch_mlp stays stock"):
        assert fm.patch(model, strict=False) == 2
    kinds = [type(l.block_sparse_moe).__name__ for l in model.layers]
    assert kinds == ["MiniMaxMoE", "MiniMaxSparseMoeBlock", "MiniMaxMoE"]
    model(mx.array([PROMPT]))  # still runs, mixed


def test_unsupported_bits_are_refused():
    mx.random.seed(0)
    model = minimax.Model(minimax.ModelArgs.from_dict(SMALL))
    nn.quantize(
        model, group_size=64, bits=1,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and ".switch_mlp." in p,
    )
    with pytest.raises(ValueError, match=r"bits=1 is not supported; supported bits: \(2, 3, 4, 5, 6, 8\)"):
        fm.patch(model)


def test_gate_and_up_quantized_differently_are_refused():
    mx.random.seed(0)
    model = minimax.Model(minimax.ModelArgs.from_dict(SMALL))
    # gate_proj at 3 bits, up_proj and down_proj at 4: gate/up rows are
    # packed side by side, so they must share one setting.
    nn.quantize(
        model, group_size=64, bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and ".switch_mlp." in p
        and ({"group_size": 64, "bits": 3} if p.endswith("gate_proj") else True),
    )
    with pytest.raises(ValueError, match=r"switch_mlp: gate_proj and up_proj are quantized differently"):
        fm.patch(model)


def test_patching_twice_replaces_nothing(small_dir):
    model, _ = fm.load(str(small_dir))
    assert fm.patch(model) == 0


def test_newer_format_version_is_refused(small_dir, tmp_path):
    fake = tmp_path / "packed"
    shutil.copytree(small_dir, fake)
    config = json.loads((fake / "config.json").read_text())
    config[spec.CONFIG_KEY] = {spec.CONFIG_FORMAT_VERSION: spec.FORMAT_VERSION + 1, spec.CONFIG_EXPERTS: {}}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer than this fused_moe"):
        fm.load(str(fake))


def test_load_rejects_unknown_keywords(small_dir):
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['tokenizer_cfg'\\]"):
        fm.load(str(small_dir), tokenizer_cfg={})


# ---------------------------------------------------------------------------
# Converted (packed) checkpoints
# ---------------------------------------------------------------------------


def test_load_of_a_converted_checkpoint_matches_the_stock_one(small_dir, tmp_path):
    packed_dir = tmp_path / "packed"
    fm.convert(str(small_dir), str(packed_dir))
    config = json.loads((packed_dir / "config.json").read_text())
    assert config[spec.CONFIG_KEY][spec.CONFIG_FORMAT_VERSION] == spec.FORMAT_VERSION
    stock, from_stock = float32_pair(small_dir)
    from_packed, _ = fm.load(str(packed_dir))
    from_packed.set_dtype(mx.float32)
    assert all(isinstance(l.block_sparse_moe, fm.MiniMaxMoE) for l in from_packed.layers)
    # Opened directly: the packed arrays are the checkpoint's, bit for bit.
    for a, b in zip(from_packed.layers, from_stock.layers):
        for proj in spec.PROJECTIONS:
            for arr in spec.ARRAYS:
                assert mx.array_equal(a.block_sparse_moe.experts[proj][arr], b.block_sparse_moe.experts[proj][arr])
    tokens = mx.array([PROMPT])
    assert_logits_match(from_packed(tokens), stock(tokens))
    assert greedy(from_packed, PROMPT) == greedy(from_stock, PROMPT)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_converted_hugging_face_checkpoint_matches_mlx_lm(fp8, tmp_path):
    from mlx_lm.utils import load_model, quantize_model

    from support.hf_checkpoints import write_hf_checkpoint
    from support.minimax_models import seed_recipe

    src = write_hf_checkpoint(tmp_path / "hf", fp8=fp8, mtp=False)
    fm.convert(str(src), str(tmp_path / "packed"), recipe="seed-3.7bit")
    fused, _ = fm.load(str(tmp_path / "packed"))
    # mlx-lm on the same weights and recipe: its own loading (FP8
    # dequantization in sanitize), the bf16 cast of mlx_lm.convert, and its
    # own quantization under the seed recipe.
    stock, config = load_model(src)
    stock.update(tree_map_with_path(
        lambda p, a: a.astype(mx.bfloat16) if stock.cast_predicate(p) else a, stock.parameters()))
    config["quantization"] = {"group_size": 64, "bits": 8, "mode": "affine"}
    stock, _ = quantize_model(stock, config, 64, 8, quant_predicate=seed_recipe(config["num_hidden_layers"]))
    stock.set_dtype(mx.float32)
    fused.set_dtype(mx.float32)
    tokens = mx.array([PROMPT])
    assert_logits_match(fused(tokens), stock(tokens))
    assert greedy(fused, PROMPT, n=16) == greedy(stock, PROMPT, n=16)


def test_a_router_the_fused_op_cannot_take_keeps_its_block():
    """A 4-bit router gate: the block stays mlx-lm's, routing as it does,
    and its experts run fused under it (a warning names the router)."""

    def model_with_4_bit_gate():
        model, _ = build_model(SMALL, seed=8)
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: p.endswith("block_sparse_moe.gate"))
        model.set_dtype(mx.float32)
        return model

    stock, fused = model_with_4_bit_gate(), model_with_4_bit_gate()
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.block_sparse_moe: router: .*4-bit QuantizedLinear"):
        assert fm.patch(fused) == 3
    assert all(type(l.block_sparse_moe).__name__ == "MiniMaxSparseMoeBlock" for l in fused.layers)
    assert all(isinstance(l.block_sparse_moe.switch_mlp, fm.FusedExperts) for l in fused.layers)
    tokens = mx.array([PROMPT])
    assert_logits_match(fused(tokens), stock(tokens))


def test_an_8_bit_router_as_mlx_lm_quantizes_it_by_default():
    def model_with_8_bit_gate():
        model, _ = build_model(SMALL, seed=9)
        nn.quantize(model, group_size=64, bits=8, class_predicate=lambda p, m: p.endswith("block_sparse_moe.gate"))
        model.set_dtype(mx.float32)
        return model

    stock, fused = model_with_8_bit_gate(), model_with_8_bit_gate()
    assert isinstance(stock.layers[0].block_sparse_moe.gate, nn.QuantizedLinear)
    assert fm.patch(fused) == 3
    tokens = mx.array([PROMPT])
    assert_logits_match(fused(tokens), stock(tokens))
