"""The mlx-lm MoE model families fused_moe runs: the one place they are
registered.

`patch` needs no list to find experts (it walks the module tree for mlx-lm's
SwitchGLU/SwitchMLP); this registry records, per model type of mlx-lm
0.32.2, what its experts are and how the fused path takes them, for the
documentation (docs/models.md is generated from it, and a test checks the two
agree) and for the zoo test, which builds every type tiny and holds the
registry to the installed mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    model_type: str
    experts: str  # where the experts live, N the layer
    activation: str  # the fused kernels' activation (several: "a or b", by layer)
    router: str  # the router's kind (it stays the model's own)
    notes: str = ""
    # Why the model cannot run on MLX's CPU backend at all, if it cannot.
    cpu_impossible: Optional[str] = None
    # An mlx-lm alias of another type (mlx_lm.utils.MODEL_REMAPPING).
    alias_of: Optional[str] = None

    @property
    def fused_as(self) -> str:
        """What replaces the stock experts."""
        if self.model_type in ("minimax", "minimax_m2"):
            return "MiniMaxMoE (router, experts and combine fused)"
        return "FusedExperts (SwitchMLP)" if self.activation in ("gelu_approx", "relu2") else "FusedExperts"

    @property
    def activations(self) -> set[str]:
        return set(self.activation.split(" or "))


# Router kinds (DESIGN.md): A top-k on logits, softmax over the k; B softmax
# over all, top-k, no renormalisation; C softmax, top-k, optional
# renormalisation; D sigmoid plus selection bias, renormalised; G
# group-limited noaux_tc.
_L = "model.layers.N"
_LM = "language_model.model.layers.N"
FAMILIES = {f.model_type: f for f in (
    Family("Klear", f"{_L}.mlp.experts", "swiglu", "D", "shared expert mixed by a learned coefficient"),
    Family("afmoe", f"{_L}.mlp.experts", "swiglu", "G", "shared experts; dense first layers"),
    Family("bailing_hybrid", f"{_L}.mlp.switch_mlp", "swiglu", "G", "linear-attention layers"),
    Family("bailing_moe", f"{_L}.mlp.switch_mlp", "swiglu", "softmax or G", "shared experts"),
    Family("bailing_moe_linear", f"{_L}.mlp.switch_mlp", "swiglu", "softmax or G", "linear attention"),
    Family("bailing_moe_v3", f"{_L}.mlp.switch_mlp", "swiglu", "G", "reached as bailing_hybrid by architecture"),
    Family("deepseek", f"{_L}.mlp.switch_mlp", "swiglu", "B", "shared experts"),
    Family("deepseek_v2", f"{_L}.mlp.switch_mlp", "swiglu", "B, group-limited", "MLA"),
    Family("deepseek_v3", f"{_L}.mlp.switch_mlp", "swiglu", "G", "MLA, shared expert"),
    Family("deepseek_v32", f"{_L}.mlp.switch_mlp", "swiglu", "G", "indexer sparse attention"),
    Family("deepseek_v41", f"{_L}.mlp.experts.switch_mlp", "deepseek_v41_swiglu", "sqrtsoftplus + bias",
           "x is [T, D]; routed sum in fp32"),
    Family("deepseek_v41_text", f"{_L}.mlp.experts.switch_mlp", "deepseek_v41_swiglu", "sqrtsoftplus + bias",
           alias_of="deepseek_v41"),
    Family("dots1", f"{_L}.mlp.experts", "swiglu", "G", "shared experts"),
    Family("ernie4_5_moe", f"{_L}.mlp.switch_mlp", "swiglu", "softmax or sigmoid, renormalised", "shared experts"),
    Family("exaone_moe", f"{_L}.mlp.switch_mlp", "swiglu", "G"),
    Family("gemma4", f"{_LM}.experts.switch_glu", "geglu", "softmax over the k, per-expert scale",
           "experts on the decoder layer, beside a dense MLP"),
    Family("gemma4_text", f"{_L}.experts.switch_glu", "geglu", "softmax over the k, per-expert scale"),
    Family("gemma4_unified", f"{_LM}.experts.switch_glu", "geglu", "softmax over the k, per-expert scale",
           alias_of="gemma4"),
    Family("glm4_moe", f"{_L}.mlp.switch_mlp", "swiglu", "G", "shared expert"),
    Family("glm4_moe_lite", f"{_L}.mlp.switch_mlp", "swiglu", "G", "MLA"),
    Family("glm_moe_dsa", f"{_L}.mlp.switch_mlp", "swiglu", "G", "deepseek_v32's model class"),
    Family("gpt_oss", f"{_L}.mlp.experts", "swiglu_oai", "A (router bias)", "expert biases on gate, up, down"),
    Family("granitemoe", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "A"),
    Family("granitemoehybrid", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "A", "Mamba2 layers"),
    Family("hunyuan", f"{_L}.mlp.switch_mlp", "swiglu", "B", "shared MLP"),
    Family("jamba", f"{_L}.feed_forward.switch_mlp", "swiglu", "A", "Mamba layers"),
    Family("joyai_llm_flash", f"{_L}.mlp.switch_mlp", "swiglu", "G", alias_of="deepseek_v3"),
    Family("kimi_k2", f"{_L}.mlp.switch_mlp", "swiglu", "G", alias_of="deepseek_v3"),
    Family("kimi_k25", f"{_LM}.mlp.switch_mlp", "swiglu", "G", "VL wrapper of deepseek_v3"),
    Family("kimi_k3", f"{_LM}.mlp.switch_mlp", "situ", "sigmoid + bias, groups", "latent MoE (experts at a narrower width)"),
    Family("kimi_linear", f"{_L}.mlp.switch_mlp", "swiglu", "sigmoid + bias, groups", "KDA attention"),
    Family("kimi_vl", f"{_LM}.mlp.switch_mlp", "swiglu", "G", "VL wrapper"),
    Family("laguna", f"{_L}.mlp.switch_mlp", "swiglu", "sigmoid or sqrtsoftplus + bias", "shared expert"),
    Family("lfm2_moe", f"{_L}.feed_forward.switch_mlp", "swiglu", "D", "short-conv layers"),
    Family("llama4", f"{_LM}.feed_forward.experts", "swiglu", "top-1, the score scales the expert input",
           "k = 1"),
    Family("llava", f"{_LM}.mlp.switch_mlp", "swiglu", "softmax + groups", alias_of="mistral3"),
    Family("longcat_flash", f"{_L}.mlp.switch_mlp", "swiglu", "softmax + bias, zero experts",
           "zero experts reach the experts with weight 0"),
    Family("longcat_flash_ngram", f"{_L}.mlp.switch_mlp", "swiglu", "softmax + bias, zero experts"),
    Family("mellum", f"{_L}.mlp.switch_mlp", "swiglu", "C"),
    Family("mimo_v2_flash", f"{_L}.mlp.switch_mlp", "swiglu", "G"),
    Family("minimax", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "D"),
    Family("minimax_m2", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "D", alias_of="minimax"),
    Family("minimax_m3_vl", f"{_LM}.block_sparse_moe.switch_mlp", "swiglu_oai", "D + scaling",
           "x is [T, D]; no expert biases"),
    Family("mistral3", f"{_LM}.mlp.switch_mlp", "swiglu", "softmax + groups", "wrapper of mistral4"),
    Family("mistral4", f"{_L}.mlp.switch_mlp", "swiglu", "softmax + groups", "MLA"),
    Family("mixtral", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "A"),
    Family("muse_spark", "model.language_model.layers.N.mlp.experts", "swiglu", "sigmoid + bias",
           "its norm lives under the experts module",
           cpu_impossible="its router, norms and residual adds are mlx-lm Metal-only kernels "
                          "('[metal_kernel] No Metal back-end.')"),
    Family("nemotron_h", "backbone.layers.N.mixer.switch_mlp", "relu2", "sigmoid + bias, groups",
           "SwitchMLP; latent projections around the experts"),
    Family("olmoe", f"{_L}.mlp.switch_mlp", "swiglu", "C", "x is [T, D]"),
    Family("phi-msft", "transformer.h.N.moe.switch_mlp", "gelu_approx", "A", alias_of="phixtral"),
    Family("phimoe", f"{_L}.block_sparse_moe.switch_mlp", "swiglu", "sparsemixer"),
    Family("phixtral", "transformer.h.N.moe.switch_mlp", "gelu_approx", "A", "SwitchMLP with expert biases"),
    Family("prism_hadamard_qwen35", f"{_LM}.mlp.switch_mlp", "swiglu", "C", "gated shared expert"),
    Family("qwen2_moe", f"{_L}.mlp.switch_mlp", "swiglu", "B", "gated shared expert"),
    Family("qwen3_5", f"{_LM}.mlp.switch_mlp", "swiglu", "C", "gated delta layers"),
    Family("qwen3_5_moe", f"{_LM}.mlp.switch_mlp", "swiglu", "C", "gated delta layers"),
    Family("qwen3_moe", f"{_L}.mlp.switch_mlp", "swiglu", "C"),
    Family("qwen3_next", f"{_L}.mlp.switch_mlp", "swiglu", "C", "gated delta layers"),
    Family("qwen3_vl_moe", f"{_LM}.mlp.switch_mlp", "swiglu", "C", "VL wrapper"),
    Family("solar_open", f"{_L}.mlp.switch_mlp", "swiglu", "G", "glm4_moe's model class"),
    Family("step3p5", f"{_L}.mlp.switch_mlp", "clamped_swiglu or swiglu", "sigmoid + bias",
           "per-layer limits; swiglu where a layer's limit is 0"),
)}


def markdown_table() -> str:
    """The table of docs/models.md."""
    lines = ["| model type | experts at | fused as | activation | router (the model's own) | notes |",
             "|---|---|---|---|---|---|"]
    for f in FAMILIES.values():
        notes = f.notes
        if f.alias_of:
            notes = f"alias of {f.alias_of}" + (f"; {notes}" if notes else "")
        if f.cpu_impossible:
            notes = f"**does not run on MLX's CPU backend**: {f.cpu_impossible}" + (f"; {notes}" if notes else "")
        lines.append(f"| `{f.model_type}` | `{f.experts}` | {f.fused_as} | `{f.activation}` | {f.router} | {notes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m fused_moe.models.families: the table of docs/models.md
    print(markdown_table(), end="")
