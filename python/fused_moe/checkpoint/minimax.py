"""MiniMax's checkpoint layout: its model types, module paths and, from
config.json, every module's shape (`MiniMaxShapes`).

Names follow mlx-lm's `minimax` model after `sanitize`: the stacked experts of
layer L are `model.layers.L.block_sparse_moe.switch_mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fused_moe.checkpoint.modules import ATTENTION, EMBED, EXPERTS, LM_HEAD, NORM, ROUTER, ROUTING_BIAS, Module
from fused_moe.errors import CheckpointError
from fused_moe.packed.spec import MODULE_NAME, STOCK_PROJECTIONS

# mlx-lm runs both with its `minimax` module; Hugging Face writes minimax_m2.
MODEL_TYPES = ("minimax_m2", "minimax")
# The attribute of a decoder layer that holds its MoE block.
BLOCK_ATTR = "block_sparse_moe"

def block_path(layer: int) -> str:
    """Module path of layer `layer`'s MoE block in an mlx-lm MiniMax model:
    the prefix of its tensor names."""
    return f"model.layers.{layer}.{BLOCK_ATTR}"


def expert_path(layer: int, projection: str) -> str:
    return f"{block_path(layer)}.switch_mlp.{projection}"


@dataclass(frozen=True)
class MiniMaxShapes:
    """The shapes of a MiniMax model's modules."""

    hidden: int  # D
    intermediate: int  # H, of one expert
    experts: int  # E
    layers: int
    vocab: int
    q_dim: int  # query heads * head_dim
    kv_dim: int  # key/value heads * head_dim
    tie_word_embeddings: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "MiniMaxShapes":
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{where}: unknown model_type {model_type!r}; fused_moe converts "
                f"MiniMax checkpoints ({', '.join(MODEL_TYPES)})"
            )

        def field(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
            return value

        if config.get("shared_intermediate_size", 0):
            raise CheckpointError(
                f"{where}: shared_intermediate_size={config['shared_intermediate_size']}: "
                f"shared experts are not supported"
            )
        heads, kv_heads = field("num_attention_heads"), field("num_key_value_heads")
        hidden = field("hidden_size")
        head_dim = field("head_dim") if config.get("head_dim") is not None else hidden // heads
        return cls(
            hidden=hidden,
            intermediate=field("intermediate_size"),
            experts=field("num_local_experts"),
            layers=field("num_hidden_layers"),
            vocab=field("vocab_size"),
            q_dim=heads * head_dim,
            kv_dim=kv_heads * head_dim,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=bool(config.get("use_qk_norm", True)),
        )

    def layer_modules(self, layer: int) -> list[Module]:
        D, H, E = self.hidden, self.intermediate, self.experts
        p = f"model.layers.{layer}"
        attn = f"{p}.self_attn"
        mods = [
            Module(f"{p}.input_layernorm", NORM, layer, (D,)),
            Module(f"{attn}.q_proj", ATTENTION, layer, (self.q_dim, D)),
            Module(f"{attn}.k_proj", ATTENTION, layer, (self.kv_dim, D)),
            Module(f"{attn}.v_proj", ATTENTION, layer, (self.kv_dim, D)),
            Module(f"{attn}.o_proj", ATTENTION, layer, (D, self.q_dim)),
        ]
        if self.qk_norm:
            mods += [
                Module(f"{attn}.q_norm", NORM, layer, (self.q_dim,)),
                Module(f"{attn}.k_norm", NORM, layer, (self.kv_dim,)),
            ]
        mods += [
            Module(f"{p}.post_attention_layernorm", NORM, layer, (D,)),
            Module(f"{block_path(layer)}.gate", ROUTER, layer, (E, D)),
            Module(f"{block_path(layer)}.e_score_correction_bias", ROUTING_BIAS, layer, (E,)),
        ]
        expert_shapes = {"gate_proj": (E, H, D), "up_proj": (E, H, D), "down_proj": (E, D, H)}
        mods += [Module(expert_path(layer, proj), EXPERTS, layer, expert_shapes[proj]) for proj in STOCK_PROJECTIONS]
        return mods

    @staticmethod
    def packed_path(stack_path: str) -> str:
        """Where the packed experts of the stack at `stack_path` (a block's
        switch_mlp) live: MiniMax's fused block holds them as `fused_experts`."""
        return f"{stack_path.rpartition('.')[0]}.{MODULE_NAME}"

    @staticmethod
    def stack_path(packed_path: str) -> str:
        """The inverse of packed_path."""
        return f"{packed_path.rpartition('.')[0]}.switch_mlp"

    def units(self) -> list[tuple[str, list[Module]]]:
        """The modules in the order they are converted and written: the
        embedding, each layer, then the final norm and the head."""
        D, V = self.hidden, self.vocab
        units = [("embed", [Module("model.embed_tokens", EMBED, None, (V, D))])]
        units += [(f"layer {i}", self.layer_modules(i)) for i in range(self.layers)]
        final = [Module("model.norm", NORM, None, (D,))]
        if not self.tie_word_embeddings:
            final.append(Module("lm_head", LM_HEAD, None, (V, D)))
        units.append(("head", final))
        return units

    def modules(self) -> list[Module]:
        return [m for _, mods in self.units() for m in mods]
