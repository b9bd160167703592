"""The synthetic MiniMax of e2e.py as a GGUF for llama.cpp (architecture
``minimax-m2``), random weights written directly in their quantized types.

Same shapes as the ``--e2e`` model (MiniMax-M2.5-REAP widths, 48/8 heads of
128, vocabulary 200,064) and the same recipe as its quantization:

- routed experts Q3_K (3.4375 bits per weight), Q4_K (4.5) in the first and
  the last layer when there are at least three, as e2e's 4-bit edge layers;
- q/k/v/o projections, token embedding and output Q8_0 (8.5), as e2e's
  8-bit attention, embedding and lm_head;
- router, norms and the selection bias F32.

Each quantized block is random bytes with its fp16 super-block scale(s) set
to a small value, so every weight is finite and bounded (nothing NaN or
Inf reaches the router or the KV cache). The vocabulary is a byte-level
placeholder. Needs ``pip install gguf``; 4 layers take about 5.8 GB and
half a minute.

    python benchmarks/gguf_minimax.py OUT.gguf --layers 4
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import ATTENTION, VOCAB  # noqa: E402
from moe_tok_s import MINIMAX_M25_REAP  # noqa: E402

# ggml block shapes: (values per block, bytes per block) and where each
# type's fp16 super-block scale(s) sit in a block.
BLOCKS = {"Q8_0": (32, 34), "Q3_K": (256, 110), "Q4_K": (256, 144)}
# Per-type fp16 scale: a weight's magnitude is about this many times the
# type's largest code. Chosen so activations stay O(1) through 4 layers.
SCALE = {"attention": 2.4e-4, "o_proj": 1.7e-4, "embedding": 0.01, "output": 2.4e-4, "Q3_K": 5e-4, "Q4_K": 7e-5}


def _set_scales(blocks: np.ndarray, qtype: str, d: float) -> None:
    """Overwrites the fp16 block scale(s) of `blocks` [n, bytes] in place."""
    half = lambda x: np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)
    if qtype == "Q8_0":
        blocks[:, 0:2] = half(d)  # d, then 32 int8 codes
    elif qtype == "Q3_K":
        blocks[:, 108:110] = half(d)  # hmask, qs, scales, then d
    else:  # Q4_K: d, dmin, scales, qs
        blocks[:, 0:2] = half(d)
        blocks[:, 2:4] = half(7.5 * d)


def _quantized(rng, qtype: str, rows: tuple, cols: int, d: float) -> np.ndarray:
    per, nbytes = BLOCKS[qtype]
    assert cols % per == 0, f"{cols} values are not whole {qtype} blocks"
    shape = rows + (cols // per * nbytes,)
    data = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape).copy()
    _set_scales(data.reshape(-1, nbytes), qtype, d)
    return data


def _tokens() -> list[str]:
    """GPT-2's byte-to-unicode table for the first 256 ids, placeholders
    after: a valid byte-level BPE vocabulary of VOCAB entries."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)] + [f"<tok{i}>" for i in range(256, VOCAB)]


def plan(layers: int, rng) -> list[tuple[str, tuple, str, Callable[[], np.ndarray]]]:
    """(name, numpy shape, type, make) for every tensor, in file order."""
    D, H, E, _ = MINIMAX_M25_REAP
    heads, kv_heads, head_dim = (ATTENTION[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    out = []

    def q(name, qtype, rows, cols, d):
        per, nbytes = BLOCKS[qtype]
        out.append((name, rows + (cols // per * nbytes,), qtype, lambda: _quantized(rng, qtype, rows, cols, d)))

    def f32(name, shape, make):
        out.append((name, shape, "F32", lambda: make(shape).astype(np.float32)))

    ones = lambda s: np.ones(s)
    q("token_embd.weight", "Q8_0", (VOCAB,), D, SCALE["embedding"])
    f32("output_norm.weight", (D,), ones)
    q("output.weight", "Q8_0", (VOCAB,), D, SCALE["output"])
    for i in range(layers):
        experts = "Q4_K" if layers >= 3 and i in (0, layers - 1) else "Q3_K"
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", (D,), ones)
        q(p + "attn_q.weight", "Q8_0", (heads * head_dim,), D, SCALE["attention"])
        q(p + "attn_k.weight", "Q8_0", (kv_heads * head_dim,), D, SCALE["attention"])
        q(p + "attn_v.weight", "Q8_0", (kv_heads * head_dim,), D, SCALE["attention"])
        q(p + "attn_output.weight", "Q8_0", (D,), heads * head_dim, SCALE["o_proj"])
        f32(p + "attn_q_norm.weight", (heads * head_dim,), ones)
        f32(p + "attn_k_norm.weight", (kv_heads * head_dim,), ones)
        f32(p + "ffn_norm.weight", (D,), ones)
        f32(p + "ffn_gate_inp.weight", (E, D), lambda s: 0.02 * rng.standard_normal(s))
        q(p + "ffn_gate_exps.weight", experts, (E, H), D, SCALE[experts])
        q(p + "ffn_up_exps.weight", experts, (E, H), D, SCALE[experts])
        q(p + "ffn_down_exps.weight", experts, (E, D), H, SCALE[experts])
        f32(p + "exp_probs_b.bias", (E,), lambda s: 0.05 * rng.standard_normal(s))
    return out


def write(path: str, layers: int, seed: int = 0, log=print) -> int:
    """Writes the GGUF; returns its tensor bytes."""
    import gguf

    D, H, E, k = MINIMAX_M25_REAP
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "minimax-m2")
    w.add_name(f"synthetic MiniMax-M2 ({layers} layers at REAP widths, random weights)")
    w.add_block_count(layers)
    w.add_context_length(196608)
    w.add_embedding_length(D)
    w.add_feed_forward_length(H)
    w.add_expert_feed_forward_length(H)
    w.add_head_count(ATTENTION["num_attention_heads"])
    w.add_head_count_kv(ATTENTION["num_key_value_heads"])
    w.add_key_length(ATTENTION["head_dim"])
    w.add_value_length(ATTENTION["head_dim"])
    w.add_rope_dimension_count(ATTENTION["rotary_dim"])
    w.add_rope_freq_base(ATTENTION["rope_theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q3_K_M)  # a label: each tensor has its own type
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("minimax-m2")
    w.add_token_list(_tokens())
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    w.add_add_bos_token(False)

    tensors = plan(layers, rng)
    for name, shape, qtype, _ in tensors:
        n = int(np.prod(shape))
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.uint8), n, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, _, qtype, make in tensors:
        t = make()
        total += t.nbytes
        w.write_tensor_data(t)
        log(f"  {name:32} {qtype:5} {t.nbytes / 1e6:9.1f} MB")
        del t
    w.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    total = write(args.out, args.layers, args.seed)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of tensors")


if __name__ == "__main__":
    main()
