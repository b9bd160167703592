"""Every Mixture-of-Experts model type of the installed mlx-lm, built tiny.

The zoo test's model side: each type whose routed experts are mlx-lm's
`switch_layers.SwitchGLU` or `SwitchMLP` is built with mlx-lm's own classes
from a config small enough for the CPU, in float32, with random weights from
a seed. Router weights and biases that mlx-lm initialises to zero are random
too, so top-k routing never decides a tie. Only the experts are quantized,
so a comparison of two models isolates the experts.

Sizes: hidden width 128, routed expert width 64 (both multiples of the
quantization group 64, as is every expert projection's input width, latent
widths included), 4 experts (8 under group-limited routers), top-2, a
vocabulary of 128, 2 or 3 layers with at least one MoE layer. The sizes in
mlx-lm's own tests/test_models.py were the starting point. Departures, each
forced by the model's code: llama4 routes top-1 and needs 4 layers (every
fourth is its global-attention layer); phixtral's expert width is fixed at
4 x hidden (512). Clamp limits that are config entries are lowered
(deepseek_v41, minimax_m3_vl, step3p5) and gpt-oss's gate/up weights scaled
up, so the clamps bite at this size.

Every type runs text only through `model(tokens, cache=cache)`, VL and
wrapper types included, with mlx-lm's own `make_prompt_cache` (KV, rotating,
chunked, MLA and indexer cache lists, and the ArraysCache of the Mamba,
gated-delta and other linear-attention layers).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear, SwitchMLP
from mlx_lm.utils import MODEL_REMAPPING, _get_classes

EXPERT_CLASSES = (SwitchGLU, SwitchMLP)

# Shared tiny sizes.
D = 128  # hidden width
H = 64  # routed expert intermediate width
E = 4  # routed experts
E_GROUPED = 8  # routed experts of group-limited routers: 4 groups of 2, 2 kept
K = 2  # experts per token
VOCAB = 128

# The prompt every run feeds: a prefill of 12 tokens, then one decode step.
PROMPT = [5, 17, 42, 99, 7, 120, 3, 64, 88, 11, 101, 26]
NEXT_TOKEN = 77

_ATTN = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# Multi-head latent attention (DeepSeek V2 and its descendants).
_MLA = dict(
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
)

_YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}

# DeepSeek V3's block: group-limited sigmoid routing with a score correction
# bias, a shared expert, the first layer dense.
_DEEPSEEK_V3 = dict(
    _ATTN,
    **_MLA,
    num_hidden_layers=2,
    intermediate_size=128,
    moe_intermediate_size=H,
    n_routed_experts=E_GROUPED,
    num_experts_per_tok=K,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    rope_scaling=_YARN,
)

_QWEN3_MOE = dict(
    _ATTN,
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=E,
    num_experts_per_tok=K,
    moe_intermediate_size=H,
    decoder_sparse_step=1,
    mlp_only_layers=[0],
    norm_topk_prob=True,
)

# Qwen3-Next / Qwen3.5: gated-delta linear attention in layer 0, full
# attention in layer 1, MoE with a gated shared expert in both.
_QWEN3_NEXT = dict(
    _ATTN,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    head_dim=32,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,
    num_experts=E,
    num_experts_per_tok=K,
    moe_intermediate_size=H,
    shared_expert_intermediate_size=H,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    partial_rotary_factor=0.5,
)

_QWEN3_5 = dict(
    _QWEN3_NEXT,
    rope_parameters={
        "type": "default",
        "mrope_section": [2, 1, 1],
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    },
)

_MISTRAL4 = dict(
    _ATTN,
    **_MLA,
    num_hidden_layers=2,
    intermediate_size=128,
    moe_intermediate_size=H,
    n_routed_experts=E,
    num_experts_per_tok=K,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    # Mistral 4 reads its llama-4 attention scaling from here.
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "llama_4_scaling_beta": 0.1,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)

_GEMMA4_TEXT = dict(
    _ATTN,
    model_type="gemma4_text",
    num_hidden_layers=2,
    intermediate_size=128,
    num_key_value_heads=1,
    global_head_dim=64,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    final_logit_softcapping=30.0,
    enable_moe_block=True,
    num_experts=E,
    top_k_experts=K,
    moe_intermediate_size=H,
    rope_parameters={
        "full_attention": {
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
            "rope_type": "proportional",
        },
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
)

_MINIMAX = dict(
    _ATTN,
    num_hidden_layers=2,
    intermediate_size=H,
    num_local_experts=E,
    num_experts_per_tok=K,
    shared_intermediate_size=0,
    rotary_dim=16,
    use_qk_norm=True,
)

_LONGCAT = dict(
    _ATTN,
    **_MLA,
    attention_method="MLA",
    zero_expert_type="identity",
    ffn_hidden_size=128,
    moe_topk=K,
    expert_ffn_hidden_size=H,
    n_routed_experts=E,
    zero_expert_num=2,
    num_layers=1,
    routed_scaling_factor=1.0,
    mla_scale_q_lora=True,
    mla_scale_kv_lora=True,
    attention_bias=False,
)

# Configs of the concrete modules, by module name.
_CONFIGS: dict[str, dict] = {
    "Klear": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        attention_bias=False,
        mlp_only_layers=[0],
        num_experts=E,
        num_experts_per_tok=K,
        decoder_sparse_step=1,
        n_shared_experts=1,
        moe_intermediate_size=H,
        norm_topk_prob=True,
    ),
    "afmoe": dict(
        _ATTN,
        num_hidden_layers=3,
        intermediate_size=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4,
        num_experts=E_GROUPED,
        num_experts_per_tok=K,
        moe_intermediate_size=H,
        num_shared_experts=1,
        num_dense_layers=1,
        n_group=4,
        topk_group=2,
    ),
    "bailing_hybrid": dict(
        _ATTN,
        **_MLA,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts=E_GROUPED,
        num_experts_per_tok=K,
        num_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        layer_group_size=2,
        group_norm_size=1,
        routed_scaling_factor=2.5,
        partial_rotary_factor=0.5,
    ),
    "bailing_moe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts=E_GROUPED,
        num_shared_experts=1,
        norm_topk_prob=True,
        num_experts_per_tok=K,
        first_k_dense_replace=1,
        use_qk_norm=True,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
    ),
    "bailing_moe_linear": dict(
        _ATTN,
        num_hidden_layers=2,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts=E_GROUPED,
        num_shared_experts=1,
        norm_topk_prob=True,
        num_experts_per_tok=K,
        first_k_dense_replace=0,
        layer_group_size=2,
        group_norm_size=1,
        use_qk_norm=True,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
    ),
    "bailing_moe_v3": dict(
        _ATTN,
        **_MLA,
        # As Ling 2.5 checkpoints spell it: mlx-lm picks bailing_moe_v3 by
        # architecture.
        model_type="bailing_hybrid",
        architectures=["BailingMoeV3ForCausalLM"],
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=H,
        moe_shared_expert_intermediate_size=H,
        num_experts=E_GROUPED,
        num_experts_per_tok=K,
        num_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        layer_group_size=2,
        short_conv_kernel_size=4,
    ),
    "deepseek": dict(
        _ATTN,
        num_hidden_layers=2,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=H,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=1,
        first_k_dense_replace=1,
    ),
    "deepseek_v2": dict(
        _DEEPSEEK_V3,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.0,
    ),
    "deepseek_v3": _DEEPSEEK_V3,
    "deepseek_v32": dict(
        _DEEPSEEK_V3, index_head_dim=32, index_n_heads=2, index_topk=4
    ),
    "deepseek_v41": dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=64,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        o_groups=2,
        o_lora_rank=32,
        moe_intermediate_size=H,
        n_routed_experts=E,
        num_experts_per_tok=K,
        scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5,
        # The real limit is 10; at this scale only a small one clamps.
        swiglu_limit=1.0,
        rms_norm_eps=1e-6,
        sliding_window=4,
        hc_mult=2,
        hc_sinkhorn_iters=4,
        max_position_embeddings=256,
    ),
    "dots1": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        first_k_dense_replace=1,
        moe_intermediate_size=H,
        n_routed_experts=E_GROUPED,
        n_shared_experts=1,
        norm_topk_prob=True,
        num_experts_per_tok=K,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
    ),
    "ernie4_5_moe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        use_bias=False,
        moe_num_experts=E,
        moe_k=K,
        moe_intermediate_size=H,
        moe_layer_start_index=1,
        moe_num_shared_experts=1,
    ),
    "exaone_moe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts=E_GROUPED,
        num_experts_per_tok=K,
        num_shared_experts=1,
        n_group=4,
        topk_group=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        is_moe_layer=[False, True],
    ),
    "gemma4": dict(model_type="gemma4", vocab_size=VOCAB, text_config=_GEMMA4_TEXT),
    "gemma4_text": _GEMMA4_TEXT,
    "glm4_moe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=H,
        norm_topk_prob=True,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        n_routed_experts=E_GROUPED,
        routed_scaling_factor=2.5,
        num_experts_per_tok=K,
        first_k_dense_replace=1,
        rope_scaling=None,
        use_qk_norm=True,
        attention_bias=False,
        partial_rotary_factor=0.5,
    ),
    "glm4_moe_lite": dict(
        _DEEPSEEK_V3, rope_scaling=None, partial_rotary_factor=1.0, n_group=1
    ),
    "glm_moe_dsa": dict(
        _DEEPSEEK_V3,
        index_head_dim=32,
        index_n_heads=2,
        index_topk=4,
        rope_parameters={"rope_theta": 10000.0, "type": "default"},
        attention_bias=False,
    ),
    "gpt_oss": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "granitemoe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        logits_scaling=2.0,
        attention_multiplier=0.1,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_bias=False,
        num_local_experts=E,
        num_experts_per_tok=K,
    ),
    "granitemoehybrid": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        attention_bias=False,
        embedding_multiplier=4.0,
        attention_multiplier=0.1,
        logits_scaling=2.0,
        residual_multiplier=0.5,
        layer_types=["mamba", "attention"],
        num_local_experts=E,
        num_experts_per_tok=K,
        shared_intermediate_size=H,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_proj_bias=False,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_conv_bias=True,
    ),
    "hunyuan": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        attention_bias=False,
        moe_topk=K,
        num_experts=E,
        num_shared_expert=1,
        use_mixed_mlp_moe=True,
        use_qk_norm=True,
        use_cla=True,
        cla_share_factor=2,
        moe_intermediate_size=H,
        rope_scaling={"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    ),
    "jamba": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        attn_layer_offset=1,
        attn_layer_period=2,
        expert_layer_offset=1,
        expert_layer_period=2,
        mamba_d_conv=4,
        mamba_d_state=16,
        mamba_expand=1,
        num_experts=E,
        num_experts_per_tok=K,
    ),
    "kimi_k25": dict(model_type="kimi_k25", text_config=_DEEPSEEK_V3),
    # Latent MoE: the experts run at routed_expert_hidden_size between a down
    # and an up projection, with a norm; the SiTU activation's linear_beta
    # is set so its tanh on the up half runs too.
    "kimi_k3": dict(
        model_type="kimi_k3",
        text_config=dict(
            _ATTN,
            **dict(_MLA, qk_rope_head_dim=0),
            model_type="kimi_linear",
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=128,
            linear_attn_config={
                "num_heads": 4,
                "head_dim": 32,
                "short_conv_kernel_size": 4,
                "kda_layers": [1],
            },
            activation_situ_beta=1.0,
            activation_situ_linear_beta=3.0,
            num_experts=E_GROUPED,
            num_experts_per_token=K,
            num_shared_experts=1,
            moe_intermediate_size=H,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            num_expert_group=4,
            topk_group=2,
            routed_expert_hidden_size=64,
            latent_moe_use_norm=True,
        ),
    ),
    "kimi_linear": dict(
        _ATTN,
        **_MLA,
        num_hidden_layers=2,
        num_key_value_heads=4,
        intermediate_size=128,
        linear_attn_config={
            "num_heads": 4,
            "head_dim": 32,
            "short_conv_kernel_size": 4,
            "kda_layers": [1],
        },
        model_max_length=256,
        num_experts=E_GROUPED,
        num_experts_per_token=K,
        num_shared_experts=1,
        moe_intermediate_size=H,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_expert_group=4,
        topk_group=2,
    ),
    "kimi_vl": dict(model_type="kimi_vl", text_config=_DEEPSEEK_V3),
    "laguna": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        sliding_window=4,
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=H,
        shared_expert_intermediate_size=H,
        moe_routed_scaling_factor=2.5,
        moe_router_score_func="sqrtsoftplus",
        layer_types=["full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse"],
        num_attention_heads_per_layer=[4, 4],
        rope_parameters={
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "beta_slow": 1.0,
                "beta_fast": 32.0,
                "partial_rotary_factor": 0.5,
            },
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 1.0,
            },
        },
    ),
    "lfm2_moe": dict(
        _ATTN,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
        use_expert_bias=True,
        num_dense_layers=1,
        norm_eps=1e-5,
        conv_bias=True,
        conv_L_cache=3,
        full_attn_idxs=[1],
    ),
    "llama4": dict(
        model_type="llama4",
        text_config=dict(
            _ATTN,
            model_type="llama4",
            # Every fourth layer is the global one; the model needs it.
            num_hidden_layers=4,
            attention_bias=False,
            attention_chunk_size=4,
            interleave_moe_layer_step=2,
            intermediate_size=H,
            intermediate_size_mlp=128,
            # Llama 4's MoE asserts top-1.
            num_experts_per_tok=1,
            num_local_experts=E,
            rope_scaling=None,
            use_qk_norm=True,
        ),
    ),
    # Two zero (identity) experts beside the 4 routed ones.
    "longcat_flash": _LONGCAT,
    "longcat_flash_ngram": dict(
        _LONGCAT, ngram_vocab_size_ratio=2, emb_neighbor_num=2, emb_split_num=2
    ),
    "mellum": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=H,
        norm_topk_prob=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            "full_attention": {"rope_theta": 500000.0, "rope_type": "default"},
        },
    ),
    "mimo_v2_flash": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=H,
        num_experts_per_tok=K,
        hybrid_layer_pattern=[1, 0],
        moe_layer_freq=[0, 1],
        add_swa_attention_sink_bias=True,
        add_full_attention_sink_bias=False,
        sliding_window_size=4,
        n_shared_experts=None,
        n_routed_experts=E_GROUPED,
        routed_scaling_factor=None,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        n_group=4,
        topk_group=2,
        layernorm_epsilon=1e-5,
        swa_rope_theta=10000.0,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        v_head_dim=32,
        swa_head_dim=32,
        swa_v_head_dim=32,
        partial_rotary_factor=0.5,
    ),
    "minimax": _MINIMAX,
    "minimax_m3_vl": dict(
        model_type="minimax_m3_vl",
        text_config=dict(
            _ATTN,
            num_hidden_layers=2,
            intermediate_size=H,
            dense_intermediate_size=128,
            shared_intermediate_size=H,
            num_local_experts=E,
            num_experts_per_tok=K,
            rotary_dim=16,
            # The real limit is 7; at this scale only a small one clamps.
            swiglu_limit=1.0,
            moe_layer_freq=[0, 1],
        ),
    ),
    "mistral3": dict(
        model_type="mistral3", text_config=dict(_MISTRAL4, model_type="mistral4")
    ),
    "mistral4": _MISTRAL4,
    "mixtral": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
    ),
    # Builds; cannot run on the CPU (CPU_IMPOSSIBLE). The experts run at the
    # compressed width moe_hidden_size.
    "muse_spark": dict(
        model_type="muse_spark",
        text_config=dict(
            _ATTN,
            num_hidden_layers=2,
            post_norm_eps=1e-5,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            layer_rope_theta=[10000.0, 0],
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            final_logit_softcapping=30.0,
            output_multiplier=1.0,
            num_local_experts=E,
            num_experts_per_tok=K,
            moe_hidden_size=64,
            moe_intermediate_size=H,
        ),
    ),
    # Mamba, attention, then a latent MoE layer (experts at moe_latent_size,
    # ReLU^2, not gated).
    "nemotron_h": dict(
        _ATTN,
        intermediate_size=128,
        attention_bias=False,
        mamba_num_heads=8,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        hybrid_override_pattern=["M", "*", "E"],
        moe_intermediate_size=H,
        moe_shared_expert_intermediate_size=H,
        moe_latent_size=64,
        n_group=1,
        n_routed_experts=E,
        n_shared_experts=1,
        topk_group=1,
        num_experts_per_tok=K,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "olmoe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=False,
        # Released OLMoE has no expert biases; on here so one SwiGLU type
        # runs SwitchGLU's bias path (gpt_oss's activation differs).
        mlp_bias=True,
    ),
    "phimoe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
        rope_scaling={
            "long_factor": [1.0] * 16,
            "long_mscale": 1.243163121016122,
            "original_max_position_embeddings": 4096,
            "short_factor": [1.0] * 16,
            "short_mscale": 1.243163121016122,
            "type": "longrope",
        },
    ),
    # Not gated, GELU (tanh approximation) with biases; the expert width is
    # 4 x model_dim in the model's code.
    "phixtral": dict(
        num_vocab=VOCAB,
        model_dim=D,
        num_heads=4,
        num_layers=2,
        rotary_dim=16,
        num_experts_per_tok=K,
        num_local_experts=E,
    ),
    "prism_hadamard_qwen35": dict(
        schema_version=1,
        tensor_namespace="mlx-lm-text",
        quantization={"bits": 2, "group_size": 128, "mode": "affine"},
        # The smallest pack: only the output head is packed (2-bit; no
        # rotation, as the blocks start at 512); build() fills it from a
        # random float weight.
        modules=[
            {"path": "lm_head", "embedding": False, "dtype": "float16", "block": 0}
        ],
        text_config=_QWEN3_5,
    ),
    "qwen2_moe": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=H,
        shared_expert_intermediate_size=128,
    ),
    "qwen3_5": _QWEN3_5,
    "qwen3_5_moe": _QWEN3_5,
    "qwen3_moe": _QWEN3_MOE,
    "qwen3_next": _QWEN3_NEXT,
    "qwen3_vl_moe": dict(
        model_type="qwen3_vl_moe",
        text_config=dict(_QWEN3_MOE, model_type="qwen3_moe"),
    ),
    "solar_open": dict(
        _ATTN,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=H,
        n_shared_experts=1,
        n_routed_experts=E_GROUPED,
        routed_scaling_factor=2.5,
        num_experts_per_tok=K,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        partial_rotary_factor=1.0,
        n_group=4,
        topk_group=2,
    ),
    "step3p5": dict(
        _ATTN,
        num_hidden_layers=3,
        num_attention_groups=2,
        intermediate_size=128,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        partial_rotary_factors=[0.5, 1.0, 0.5],
        attention_other_setting={"num_attention_heads": 4, "num_attention_groups": 2},
        use_head_wise_attn_gate=True,
        moe_num_experts=E,
        moe_top_k=K,
        moe_intermediate_size=H,
        share_expert_dim=H,
        moe_layers_enum="1,2",
        # Layer 1 plain SwiGLU, layer 2 clamped (the real limits are ~7; at
        # this scale only a small one clamps).
        swiglu_limits=[0.0, 0.0, 1.0],
        swiglu_limits_shared=[0.0, 0.0, 1.0],
    ),
}


def _module_names() -> list[str]:
    root = Path(mlx_lm.models.__file__).parent
    return sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")


def scan_moe_model_types() -> list[str]:
    """The model types of the installed mlx-lm whose model can hold a
    SwitchGLU or SwitchMLP: the model modules that name one, the modules that
    import such a module (wrappers, VL models), and the aliases of
    `MODEL_REMAPPING` that lead to any of them. Read from the sources, so the
    zoo's list can be checked against a newer mlx-lm."""
    root = Path(mlx_lm.models.__file__).parent
    imports: dict[str, set[str]] = {}
    direct = set()
    for name in _module_names():
        src = (root / f"{name}.py").read_text()
        deps = set(re.findall(r"^from \.(\w+) import", src, re.M))
        for line in re.findall(r"^from \. import (.+)$", src, re.M):
            deps |= {d.strip() for d in line.split(",")}
        imports[name] = deps
        if name != "switch_layers" and re.search(r"\bSwitch(GLU|MLP)\b", src):
            direct.add(name)

    def reaches(name, seen):
        if name in direct:
            return True
        seen.add(name)
        return any(reaches(d, seen) for d in imports.get(name, ()) if d not in seen)

    modules = {n for n in imports if reaches(n, set())}
    aliases = {a for a, target in MODEL_REMAPPING.items() if target in modules}
    return sorted(modules | aliases)


# Every model type string mlx-lm's `_get_classes` accepts whose model holds
# routed experts: the modules configured above and the MODEL_REMAPPING aliases
# that lead to them (checked against `scan_moe_model_types()` by the zoo's
# own test).
MOE_MODEL_TYPES: tuple[str, ...] = tuple(
    sorted(
        set(_CONFIGS)
        | {alias for alias, target in MODEL_REMAPPING.items() if target in _CONFIGS}
    )
)

# Types that cannot run on MLX's CPU backend at all, with the exact error
# they raise there (the zoo's own test checks it, so the list cannot go
# stale).
CPU_IMPOSSIBLE: dict[str, str] = {
    # Its router, attention norms and residual adds call mlx_lm.kernels'
    # `mx.fast.metal_kernel`s, which have no CPU path.
    "muse_spark": "[metal_kernel] No Metal back-end.",
}


def tiny_config(model_type: str) -> dict:
    """A config.json-style dict that builds `model_type` tiny."""
    module = MODEL_REMAPPING.get(model_type, model_type)
    if module not in _CONFIGS:
        raise KeyError(f"no tiny config for model type {model_type!r}")
    config = copy.deepcopy(_CONFIGS[module])
    if module != model_type:
        config["model_type"] = model_type
    config.setdefault("model_type", model_type)
    return config


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every SwitchGLU / SwitchMLP of the model with its path, in layer order."""

    def natural(item):
        return [int(p) if p.isdigit() else p for p in item[0].split(".")]

    found = [(p, m) for p, m in model.named_modules() if isinstance(m, EXPERT_CLASSES)]
    return sorted(found, key=natural)


def _randomize(model: nn.Module, seed: int) -> None:
    """Every floating parameter from the seed. Weight matrices and kernels are
    normal with std 1/sqrt(fan_in); every other parameter (norm scales, biases,
    router score corrections, SSM constants) is its initial value plus
    N(0, 0.1^2), so norms stay near their neutral value while the biases that
    start at zero become distinct. A layer the model builds already quantized
    gets the quantization of a random float weight."""
    owners = dict(model.named_modules())
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), max(len(params), 1))
    new = []
    for i, (path, p) in enumerate(params):
        owner_path, _, name = path.rpartition(".")
        owner = owners.get(owner_path)
        if _prequantized(owner):
            if name == "weight":
                new.extend(_random_quantized(owner_path, owner, keys[i]))
            continue
        if not mx.issubdtype(p.dtype, mx.floating):
            continue
        if name == "weight" and p.ndim >= 2:
            # Stacked experts [E, out, in] read `in`; a conv kernel
            # [out, width, in] reads width * in.
            stacked = isinstance(owner, SwitchLinear)
            fan_in = p.shape[-1] if stacked or p.ndim == 2 else math.prod(p.shape[1:])
            if isinstance(owner, nn.Embedding):
                # Unit-variance embeddings keep each token's own vector
                # ahead of what attention mixes in, so routing differs
                # between tokens (at 1/sqrt(D) every token of qwen3_moe
                # picked the same two experts).
                fan_in = 1
            v = mx.random.normal(p.shape, key=keys[i]) / math.sqrt(fan_in)
        else:
            v = p.astype(mx.float32) + 0.1 * mx.random.normal(p.shape, key=keys[i])
        new.append((path, v.astype(mx.float32)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def _prequantized(module) -> bool:
    return (
        isinstance(module, nn.Module)
        and hasattr(module, "bits")
        and hasattr(module, "group_size")
        and "scales" in module
        and "weight" in module
        and module["weight"].dtype == mx.uint32
    )


def _random_quantized(path: str, module: nn.Module, key) -> list:
    out_dims = module["weight"].shape[0]
    in_dims = module["scales"].shape[-1] * module.group_size
    w = mx.random.normal((out_dims, in_dims), key=key) / math.sqrt(in_dims)
    q, scales, biases = mx.quantize(w, module.group_size, module.bits)
    return [
        (f"{path}.weight", q),
        (f"{path}.scales", scales.astype(module["scales"].dtype)),
        (f"{path}.biases", biases.astype(module["biases"].dtype)),
    ]


# gpt-oss's clamp limit (7) is a constant of its activation, not a config
# entry; its experts' gate and up projections are scaled up instead, so that
# the clamps bite at this size as they do in the real model.
_EXPERT_GAIN = {"gpt_oss": 5.0}


def build(model_type: str, seed: int = 0) -> tuple[nn.Module, object]:
    """The tiny model of `model_type` from mlx-lm's own classes, float32, every
    parameter random from `seed`. Returns (model, model_args)."""
    config = tiny_config(model_type)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    args = args_class.from_dict(config)
    model = model_class(args)
    _randomize(model, seed)
    gain = _EXPERT_GAIN.get(MODEL_REMAPPING.get(model_type, model_type))
    if gain is not None:
        for _, experts in expert_modules(model):
            for proj in (experts.gate_proj, experts.up_proj):
                proj.update({k: v * gain for k, v in proj.parameters().items()})
        mx.eval(model.parameters())
    return model, args


def quantize_experts(
    model: nn.Module, bits: int, group_size: int = 64, mode: str = "affine"
) -> int:
    """Quantize the routed experts' projections only (with mlx-lm's
    `SwitchLinear.to_quantized`); everything else stays float32, so a
    comparison isolates the experts. Returns how many projections it
    quantized."""
    targets = set()
    for _, m in expert_modules(model):
        for _, child in m.children().items():
            if isinstance(child, SwitchLinear):
                targets.add(id(child))
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        mode=mode,
        class_predicate=lambda _, m: id(m) in targets,
    )
    return len(targets)


def run(model: nn.Module, tokens=PROMPT, cache=None, *, next_token=NEXT_TOKEN):
    """A prefill of `tokens` and one cached decode step of `next_token` through
    mlx-lm's own cache (`make_prompt_cache` unless `cache` is given), text
    only. Returns the logits (prefill [1, len(tokens), V], decode [1, 1, V]),
    which must be float32: a model computing in half precision would flip
    top-k routing on near ties."""
    if cache is None:
        cache = make_prompt_cache(model)
    prefill = model(mx.array([list(tokens)]), cache=cache)
    mx.eval(prefill)
    decode = model(mx.array([[next_token]]), cache=cache)
    mx.eval(decode)
    for name, logits in (("prefill", prefill), ("decode", decode)):
        if logits.dtype != mx.float32:
            raise TypeError(f"{name} logits are {logits.dtype}, expected float32")
    return prefill, decode
